"""The fit and erase paths on Stable Diffusion's true layout (random weights, 64-pixel images)."""

from __future__ import annotations

import pytest
import torch

from acterase_interp.erase import EraseOptions, Eraser, EraserFitter, PromptPairs
from acterase_interp.generation import generate
from acterase_interp.loading import GenerationDefaults, wrap

STEPS = 2


@pytest.mark.slow
def test_fit_and_erase_on_random_sd(random_sd, tmp_path):
    if random_sd.version != "1.5":
        pytest.skip("one SD layout is enough here (each UNet call costs seconds); test_sites covers SD 2.1's sites")
    # 64-pixel images (8x8 latents) without guidance keep every UNet call cheap; the weights are SD's full size
    model = wrap(random_sd.pipeline, GenerationDefaults(STEPS, 1.0, height=64, width=64))
    fitter = EraserFitter(model, EraseOptions(blocks=("mid", "up.1.0"), tau=0.05), progress=False)
    assert [s.name for s in fitter.sites] == ["mid.0.ffn_hidden", "up.1.0.ffn_hidden"]
    pairs = PromptPairs("circle", ["a red circle on a plain background"], ["a red square on a plain background"])
    eraser = fitter.fit(pairs)
    channels = random_sd.pipeline.unet.config.block_out_channels[-1]
    for s, tokens in zip(eraser.sites, (1, 4)):  # latent 8 -> 1x1 in the mid block, 2x2 in up.1
        assert s.shape == (tokens, 4 * channels)  # GEGLU width: 4x the channels
        assert eraser.values[s.name].shape == (1, *s.shape) and eraser.masks[s.name].shape == (1, 1, s.shape[1])
        assert 0 < eraser.mask_density()[s.name] < 1
    prompt = ["a blue star on a striped background"]
    before = generate(model, prompt, seeds=0, progress=False)
    with eraser.applied(model):
        on = generate(model, prompt, seeds=0, progress=False)
    assert before.shape == (1, 3, 64, 64) and not torch.equal(on, before)
    eraser.save(tmp_path / "eraser")
    back = Eraser.load(tmp_path / "eraser", model=model)
    with model.generate(prompt, num_inference_steps=STEPS, guidance_scale=1.0, height=64, width=64, output_type="pt",
                        generator=[torch.Generator().manual_seed(0)]) as tracer:  # fmt: skip
        for step in tracer.iter[:STEPS]:
            back.apply(model, step)
        traced = model.output.images.save()
    assert torch.equal(traced.float().cpu(), on)
