"""Text injection (`generate(..., inject=TextInjection(...))`) on ConceptWorld and random-weight
SD 1.5 / 2.1, with known answers: text reaches an SD UNet only through cross-attention, so the
source injected into every block at every step is the source prompt's image, bit for bit."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from tests.conftest import hook_count, traced_images

from acterase_interp.generation import TextInjection, generate
from acterase_interp.loading import GenerationDefaults, wrap
from acterase_interp.patching import patched
from acterase_interp.sites import Site, select_sites

STEPS = 3
TARGETS = ["a red triangle on a plain background", "a green circle on a dotted background"]
SOURCES = ["a red square on a plain background", "a blue star on a striped background"]


def _images(model, prompts=TARGETS, inject: TextInjection | None = None, steps: int = STEPS) -> torch.Tensor:
    return generate(model, prompts, seeds=0, num_inference_steps=steps, progress=False, inject=inject)


@dataclass
class Recorded:
    """A patch that returns recorded activations (the same at every step)."""

    sites: tuple[Site, ...]
    values: dict[str, torch.Tensor]

    def __call__(self, site_name: str, x: torch.Tensor, step: int | None = None) -> torch.Tensor:
        return self.values[site_name]


def _record(model, sites: list[Site], prompts: list[str]) -> dict[str, torch.Tensor]:
    """The activations of `sites` while `prompts` are generated, checked to be the same at every step."""
    seen: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
    unet = model.pipeline.unet
    handles = [unet.get_submodule(s.module_path).register_forward_hook(
        lambda m, a, out, name=s.name: seen[name].append(out.detach().clone())) for s in sites]  # fmt: skip
    try:
        _images(model, prompts)
    finally:
        for h in handles:
            h.remove()
    for name, xs in seen.items():
        assert len(xs) == STEPS and all(torch.equal(x, xs[0]) for x in xs), name  # keys/values ignore the latent
    return {name: xs[0] for name, xs in seen.items()}


@pytest.fixture(scope="module")
def cw_images(conceptworld) -> dict[str, torch.Tensor]:
    return {"target": _images(conceptworld), "source": _images(conceptworld, SOURCES)}


def test_injecting_the_source_everywhere_is_the_source_image(conceptworld, cw_images):
    hooks = hook_count(conceptworld)
    everywhere = _images(conceptworld, inject=TextInjection(SOURCES, blocks=None))
    assert torch.equal(everywhere, cw_images["source"])
    assert torch.equal(_images(conceptworld, inject=TextInjection(SOURCES, ("down", "mid", "up"), (0, STEPS))),
                       cw_images["source"])  # fmt: skip
    assert hook_count(conceptworld) == hooks and (cw_images["source"] - cw_images["target"]).abs().max() > 1e-2


def test_injecting_nowhere_or_never_leaves_the_target_image(conceptworld, cw_images):
    for inject in (TextInjection(SOURCES, ()), TextInjection(SOURCES, None, steps=(1, 1)),
                   TextInjection(SOURCES, "up", steps=(STEPS, STEPS + 2))):  # fmt: skip
        assert torch.equal(_images(conceptworld, inject=inject), cw_images["target"]), inject


def test_injecting_some_blocks_or_steps_changes_the_image_partly(conceptworld, cw_images):
    target, source = cw_images["target"], cw_images["source"]
    for inject in (TextInjection(SOURCES, ("up.1",)), TextInjection(SOURCES, "mid.0"),
                   TextInjection(SOURCES, None, steps=(0, 1))):  # fmt: skip
        partly = _images(conceptworld, inject=inject)
        assert (partly - target).abs().max() > 1e-3 and (partly - source).abs().max() > 1e-3, inject


def test_batches_inject_in_lockstep(conceptworld, cw_images):
    """Batches of one encode each source beside its own prompt; the rows come out in order."""
    one_by_one = generate(conceptworld, TARGETS, seeds=0, num_inference_steps=STEPS, progress=False, batch_size=1,
                          inject=TextInjection(SOURCES, None))  # fmt: skip
    torch.testing.assert_close(one_by_one, cw_images["source"], atol=1e-5, rtol=0)  # batch-size rounding only


def test_patching_keys_and_values_everywhere_equals_text_injection(conceptworld, conceptworld_sites, cw_images):
    """to_k and to_v are the only modules that read the injected text: patching their outputs with
    the source run's is the same injection, through either patching engine."""
    sites = select_sites(conceptworld_sites, ["attn2_k", "attn2_v"])
    patch = Recorded(tuple(sites), _record(conceptworld, sites, SOURCES))
    with patched(conceptworld, patch):
        hooked = _images(conceptworld)
    assert torch.equal(hooked, cw_images["source"])
    assert torch.equal(traced_images(conceptworld, patch, TARGETS, STEPS), hooked)


def test_injection_errors(conceptworld):
    with pytest.raises(ValueError, match="2 source prompts to inject for 1 prompts"):
        generate(conceptworld, TARGETS[:1], inject=TextInjection(SOURCES, None), progress=False)
    with pytest.raises(ValueError, match="unknown block"):
        _images(conceptworld, inject=TextInjection(SOURCES, ("up.7",)))
    with pytest.raises(ValueError, match="window"):
        TextInjection(SOURCES, None, steps=(3, 1))
    with pytest.raises(ValueError, match="source prompt"):
        TextInjection([], None)
    assert TextInjection("a red circle", "up").blocks == ("up",)


@pytest.mark.slow
def test_injection_on_random_sd(random_sd):
    """SD 1.5 and 2.1 layouts (random weights, 64-pixel images, 2 steps): the same known answers."""
    model = wrap(random_sd.pipeline, GenerationDefaults(2, 5.0, height=64, width=64))
    target, source = _images(model, TARGETS[:1], steps=2), _images(model, SOURCES[:1], steps=2)
    assert torch.equal(_images(model, TARGETS[:1], TextInjection(SOURCES[:1], None), steps=2), source)
    assert torch.equal(_images(model, TARGETS[:1], TextInjection(SOURCES[:1], ()), steps=2), target)
    some = _images(model, TARGETS[:1], TextInjection(SOURCES[:1], ("locogen",)), steps=2)
    assert not torch.equal(some, target) and not torch.equal(some, source)
