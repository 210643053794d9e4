"""The site families beyond the paper's (cross-attention keys and values, block outputs, presets):
fitted by `EraserFitter` and patched by both engines, on ConceptWorld and SD 1.5 / 2.1's layouts."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import traced_images

from acterase_interp.erase import EraseOptions, EraserFitter, PromptPairs
from acterase_interp.generation import generate
from acterase_interp.injection import encode_prompts
from acterase_interp.loading import GenerationDefaults, wrap
from acterase_interp.world.pairs import conceptworld_pairs

STEPS = 2
NEW_KINDS = ("attn2_k", "attn2_v", "block_out")
PROMPTS = ["a red triangle on a plain background", "a green circle on a dotted background"]


@pytest.fixture(scope="module")
def pairs() -> PromptPairs:
    return conceptworld_pairs("triangle", n=1, seed=0)


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_new_kinds_fit_and_patch_alike_in_both_engines(conceptworld, pairs, kind):
    fitter = EraserFitter(conceptworld, EraseOptions(site_kind=kind, num_inference_steps=STEPS, tau=0.1), progress=False)
    eraser = fitter.fit(pairs)
    assert [s.kind for s in eraser.sites] == [kind] * 7
    tokens = 24 if kind != "block_out" else 64  # text tokens, or latent pixels at the top level
    assert eraser.sites[0].shape == (tokens, 64) and fitter.statistics.values[eraser.sites[0].name].shape == (1, tokens, 64)
    stored = sum(t.numel() * t.element_size() for d in fitter._scores.values() for ts in d.values() for t in ts)
    stored += sum(t.numel() * t.element_size() for t in fitter._value_sum.values())
    assert fitter.statistics_bytes(1) == stored  # text-token sites count the tokenizer's tokens
    before = generate(conceptworld, PROMPTS, seeds=0, num_inference_steps=STEPS, progress=False)
    with eraser.applied(conceptworld):
        hooked = generate(conceptworld, PROMPTS, seeds=0, num_inference_steps=STEPS, progress=False)
    assert (hooked - before).abs().max() > 1e-4
    assert torch.equal(traced_images(conceptworld, eraser, PROMPTS, STEPS), hooked)


def test_key_statistics_equal_the_source_prompts_keys(conceptworld, pairs):
    """Keys depend on the prompt only: the fit's per-step source scores repeat, and its moments are
    those of to_k applied to the encoded source prompt (conditional row)."""
    fitter = EraserFitter(conceptworld, EraseOptions(site_kind="attn2_k", num_inference_steps=STEPS), progress=False)
    fitter.fit(pairs)
    st, site = fitter.statistics, fitter.sites[2]
    pipe = conceptworld.pipeline
    with torch.no_grad():
        keys = pipe.unet.get_submodule(site.module_path)(encode_prompts(pipe, [pairs.sources[0]]))[0]
    torch.testing.assert_close(st.mean_source[site.name][0], keys.mean(0))
    torch.testing.assert_close(st.square_mean_source[site.name][0], keys.square().mean(0))
    torch.testing.assert_close(st.importance_source[site.name][0, 1], keys.abs().mean(0))  # no reading Linear
    assert torch.equal(st.importance_source[site.name][0, 0], st.importance_source[site.name][0, 1])


@pytest.mark.slow
def test_every_family_fits_and_patches_on_random_sd(random_sd):
    """SD 1.5 and 2.1 layouts, random weights, 64-pixel images: each new kind at LocoGen's blocks."""
    model = wrap(random_sd.pipeline, GenerationDefaults(STEPS, 1.0, height=64, width=64))
    pairs = PromptPairs("circle", ["a red circle on a plain background"], ["a red square on a plain background"])
    prompt = ["a blue star on a striped background"]
    before = generate(model, prompt, seeds=0, progress=False)
    channels = random_sd.pipeline.unet.config.block_out_channels[2]  # up.1 runs at level 2: 1280 channels
    for kind in NEW_KINDS:
        sites = [s for s in random_sd.sites if s.kind == kind]
        assert len(sites) == 16, kind
        eraser = EraserFitter(model, EraseOptions(site_kind=kind, blocks=("locogen",), tau=0.05), progress=False).fit(pairs)
        assert [s.name for s in eraser.sites] == [f"up.1.{j}.{kind}" for j in (1, 2)]
        tokens = 77 if kind != "block_out" else 4  # CLIP's context, or 2x2 latent pixels in up.1
        assert eraser.sites[0].shape == (tokens, channels), kind
        with eraser.applied(model):
            on = generate(model, prompt, seeds=0, progress=False)
        assert not torch.equal(on, before), kind
        if kind == "block_out":
            assert torch.equal(traced_images(model, eraser, prompt, STEPS), on)
