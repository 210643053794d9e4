"""The one patching layer on toy modules with known answers: the step counter, timestep parsing,
the output adapter on tensor / tuple / dataclass outputs, hooks removed on exceptions; and on
ConceptWorld, the nnsight path against the hooks path for a patch that is not an eraser."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

from tests.conftest import traced_images

from acterase_interp.analysis.subspace import SubspacePatch
from acterase_interp.generation import generate
from acterase_interp.patching import (
    StepCounter,
    StepSchedule,
    call_timestep,
    count_steps,
    from_tokens,
    hook_site,
    patched,
    rewrap,
    to_tokens,
    unet_of,
    unwrap,
)
from acterase_interp.sites import Site

TOKENS, UNITS = 3, 4


@dataclass
class Output:
    """A dataclass output with more than the activation in it."""

    sample: torch.Tensor
    extra: str = "kept"


class Inner(nn.Module):
    """Returns its input as a tensor, a tuple or a dataclass with more in it."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> object:
        return {"tensor": x, "tuple": (x, "extra"), "dataclass": Output(x)}[self.kind]


class ToyUNet(nn.Module):
    """Called like a UNet, (sample, timestep), returning a `UNet2DConditionOutput`; its sites are
    the input of `lin`, the output of `inner_mod` and the UNet's output."""

    def __init__(self, kind: str = "tensor") -> None:
        super().__init__()
        self.lin = nn.Identity()
        self.inner_mod = Inner(kind)

    def forward(self, x: torch.Tensor, timestep: float) -> UNet2DConditionOutput:
        return UNet2DConditionOutput(sample=unwrap(self.inner_mod(self.lin(x))))


def _hooks(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@dataclass
class AddStep:
    """A patch that adds 100 * (step + 1) at its sites, so the step it saw can be read off."""

    sites: tuple[Site, ...]
    schedule: StepSchedule | None = None

    def __call__(self, site_name: str, x: torch.Tensor, step: int | None = None) -> torch.Tensor:
        return x + 100 * (step + 1)


INPUT_SITE = Site("b.in", "ffn_hidden", "b", "lin", "input", None, (TOKENS, UNITS))
INNER_SITE = Site("b.inner", "attn2_out", "b", "inner_mod", "output", None, (TOKENS, UNITS))
OUT_SITE = Site("unet_out", "unet_out", "unet", "", "output", None, (UNITS, 1, TOKENS))


# -- the step counter --------------------------------------------------------------------------


def test_step_counter_counts_a_run_and_restarts_when_the_timestep_rises():
    counter = StepCounter()
    steps = []
    for t in (900, 700, 500, 300, 900, 700):  # two runs
        counter.advance(t)
        steps.append(counter.step)
    assert steps == [0, 1, 2, 3, 0, 1]
    assert counter.within((1, 2)) and not counter.within((2, 4)) and counter.within(None)


def test_repeated_timesteps_stay_in_one_run():
    """PNDM (SD 1.x's default scheduler) repeats a timestep: 5 steps are 6 UNet calls."""
    counter = StepCounter()
    steps = []
    for t in (801, 601, 601, 401, 201, 1):
        counter.advance(t)
        steps.append(counter.step)
    assert steps == [0, 1, 2, 3, 4, 5]


def test_a_schedule_fixes_the_run_length_and_checks_every_timestep():
    counter = StepCounter(StepSchedule(num_steps=1))  # two one-step runs at the same timestep
    counter.advance(500)
    counter.advance(500)
    assert counter.step == 0
    checked = StepCounter(StepSchedule(2, (900.0, 400.0)))
    for t in (900, 400, 900):
        checked.advance(t)
    assert checked.step == 0
    with pytest.raises(RuntimeError, match="timestep 300 is step 1 .* fitted for timestep 400.0 .* 2 denoising"):
        checked.advance(300)


def test_count_steps_reads_the_timestep_however_it_is_passed():
    unet = ToyUNet()
    x = torch.zeros(1, TOKENS, UNITS)
    with count_steps(unet) as counter:
        unet(x, 900)
        unet(x, timestep=torch.tensor([800, 800]))
        assert (counter.step, counter.timestep) == (1, 800.0)
    assert _hooks(unet) == 0
    assert call_timestep((x, torch.tensor(5)), {}) == 5.0
    with pytest.raises(TypeError, match="no timestep"):
        call_timestep((x,), {})


# -- the output adapter and the tensor layout --------------------------------------------------


def test_unwrap_and_rewrap_every_output_kind():
    x, y = torch.zeros(2), torch.ones(2)
    assert unwrap(x) is x and rewrap(x, y) is y
    pair = (x, "extra")
    assert unwrap(pair) is x and rewrap(pair, y)[0] is y and rewrap(pair, y)[1] == "extra" and pair[0] is x
    out = Output(x, extra="other")
    new = rewrap(out, y)
    assert unwrap(out) is x and new.sample is y and new.extra == "other" and out.sample is x
    unet_out = rewrap(UNet2DConditionOutput(sample=x), y)
    assert type(unet_out) is UNet2DConditionOutput and unet_out.sample is y
    for bad in ("text", (), ("text", x)):
        with pytest.raises(TypeError, match="cannot"):
            unwrap(bad)
        with pytest.raises(TypeError, match="cannot"):
            rewrap(bad, y)


def test_token_layout_round_trips():
    x = torch.randn(2, 4, 3, 5)  # (batch, C, H, W)
    tokens = to_tokens(x)
    assert tokens.shape == (2, 15, 4) and torch.equal(tokens[1, 7], x[1, :, 1, 2])
    assert torch.equal(from_tokens(tokens, x.shape), x)
    assert to_tokens(tokens) is tokens
    with pytest.raises(ValueError, match="activation"):
        to_tokens(torch.zeros(3))


def test_unet_of_finds_the_unet():
    unet = ToyUNet()

    class Pipe:
        pass

    pipe, model = Pipe(), Pipe()
    pipe.unet, model.pipeline = unet, pipe
    assert unet_of(unet) is unet and unet_of(pipe) is unet and unet_of(model) is unet
    with pytest.raises(TypeError, match="UNet"):
        unet_of(object())


# -- the hooks path ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tensor", "tuple", "dataclass"])
def test_hooks_patch_every_site_kind_and_keep_the_rest_of_the_output(kind):
    unet = ToyUNet(kind)
    x = torch.zeros(1, TOKENS, UNITS)
    seen = []
    handle = hook_site(unet, INNER_SITE, lambda a: a + 1)
    unet.inner_mod.register_forward_hook(lambda m, args, out: seen.append(out))
    y = unet(x, 0)
    assert torch.equal(y.sample, x + 1) and type(seen[0]) is type(Inner(kind)(x))
    if kind == "tuple":  # the other parts of the output pass through unchanged
        assert seen[0][1] == "extra"
    if kind == "dataclass":
        assert seen[0].extra == "kept"
    handle.remove()
    with patched(unet, AddStep((INPUT_SITE, INNER_SITE, OUT_SITE))):
        out = unet(x, 10)
    assert type(out) is UNet2DConditionOutput and torch.equal(out.sample, x + 300)  # three sites at step 0
    assert torch.equal(unet(x, 10).sample, x) and _hooks(unet) == 1  # only the reader hook of this test


def test_patched_passes_the_step_only_inside_its_window():
    unet = ToyUNet()
    x = torch.zeros(1, TOKENS, UNITS)
    with patched(unet, AddStep((INPUT_SITE,)), steps=(1, 3)) as counter:
        added = [unet(x, t).sample[0, 0, 0].item() for t in (900, 700, 500, 300)]
        assert counter.step == 3
    assert added == [0.0, 200.0, 300.0, 0.0]


def test_hooks_are_removed_on_exceptions_in_the_block_and_in_a_hook():
    unet = ToyUNet()
    x = torch.zeros(1, TOKENS, UNITS)
    hooks = _hooks(unet)
    with pytest.raises(KeyError, match="boom"):
        with patched(unet, AddStep((INPUT_SITE, OUT_SITE))):
            raise KeyError("boom")
    assert _hooks(unet) == hooks
    schedule = StepSchedule(2, (900.0, 700.0))
    with pytest.raises(RuntimeError, match="fitted for timestep 700.0"):
        with patched(unet, AddStep((INPUT_SITE, INNER_SITE), schedule)):
            unet(x, 900)
            unet(x, 650)  # not the fitted schedule: the step counter refuses it
    assert _hooks(unet) == hooks and torch.equal(unet(x, 900).sample, x)


# -- nnsight and hooks agree on ConceptWorld ---------------------------------------------------

STEPS = 3
PROMPTS = ["a red heart on a plain background", "a blue square on a striped background"]


def test_nnsight_path_equals_hooks_path_for_a_subspace_patch(conceptworld, conceptworld_sites):
    """A patch that is not an eraser, on an input site and an output site, every step."""
    m = conceptworld
    sites = [s for s in conceptworld_sites if s.name in ("down.0.0.ffn_hidden", "up.1.0.attn2_out")]
    g = torch.Generator().manual_seed(0)
    diffs = {s.name: torch.randn(5, s.shape[-1], generator=g) for s in sites}
    means = {s.name: torch.randn(s.shape[-1], generator=g) for s in sites}
    patch = SubspacePatch.from_differences(sites, diffs, means, k=3)
    before = generate(m, PROMPTS, seeds=0, num_inference_steps=STEPS, progress=False)
    with patch.applied(m):
        hooked = generate(m, PROMPTS, seeds=0, num_inference_steps=STEPS, progress=False)
    assert torch.equal(traced_images(m, patch, PROMPTS, STEPS), hooked)
    assert (hooked - before).abs().max() > 1e-3
    assert torch.equal(generate(m, PROMPTS, seeds=0, num_inference_steps=STEPS, progress=False), before)
