"""Diffusion transformers (FLUX.1, SD3): the published architectures on the meta device (parameter
counts, site tables), and the core path on `flux-tiny` / `sd3-tiny` (every block type and conditioning
input at tiny widths, random weights, 16-pixel images): loading, generation, sites in execution order,
fit and erase on flow-matching schedules, eraser off bit-identical, nnsight equal to torch hooks,
artifacts round-trip."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from conftest import fired_order, traced_images

from acterase_interp.erase import EraseOptions, Eraser, EraserFitter, FitStatistics, PromptPairs
from acterase_interp.flow import denoiser_timesteps
from acterase_interp.generation import generate
from acterase_interp.loading import GenerationDefaults, architecture_hash, load, wrap
from acterase_interp.patching import call_timestep
from acterase_interp.random_sd import build_random_sd
from acterase_interp.sites import discover_dit_sites, reader_weight_norm, select_sites

STEPS = 2
PROMPTS = ["a red triangle on a plain background", "a green circle on a dotted background"]
PAIRS = PromptPairs("triangle", ["a red triangle on a plain background", "a blue triangle on a striped background"],
                    ["a red square on a plain background", "a blue square on a striped background"])  # fmt: skip
DOUBLE = ["txt_k", "txt_v", "img_mlp_hidden", "txt_mlp_hidden", "txt_out", "img_out"]
SINGLE = ["mlp_hidden", "txt_out", "img_out"]
KINDS = ("txt_k", "txt_v", "img_mlp_hidden", "txt_mlp_hidden", "mlp_hidden", "txt_out", "img_out")


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- the published architectures, on the meta device -------------------------------------------


def test_flux_dev_has_the_published_architecture():
    pipe = build_random_sd("flux-dev", device="meta")
    assert isinstance(pipe, FluxPipeline) and pipe.transformer.device.type == "meta"
    # FLUX.1-dev's transformer: 11,901,408,320 parameters ("12B"); T5-XXL encoder 4,762,310,656; CLIP-L text 123,060,480
    assert _count(pipe.transformer) == 11_901_408_320
    assert _count(pipe.text_encoder_2) == 4_762_310_656 and _count(pipe.text_encoder) == 123_060_480
    assert pipe.transformer.config.guidance_embeds and pipe.vae_scale_factor * pipe.default_sample_size == 1024
    sites = discover_dit_sites(pipe.transformer)
    names = [f"double.{i}.{k}" for i in range(19) for k in DOUBLE] + [f"single.{i}.{k}" for i in range(38) for k in SINGLE]
    assert [s.name for s in sites] == names
    hidden = next(s for s in sites if s.name == "single.20.mlp_hidden")
    assert hidden.shape == (8 + 4, 4 * 3072) and hidden.reader_offset == 3072  # text + image tokens; proj_out's MLP columns
    assert next(s for s in sites if s.name == "double.7.txt_k").shape == (8, 3072)


def test_sd3_medium_has_the_published_architecture():
    pipe = build_random_sd("sd3-medium", device="meta")
    assert isinstance(pipe, StableDiffusion3Pipeline)
    # SD3 medium's MMDiT: 2,028,328,000 parameters ("2B"); CLIP-L 123,650,304 with its projection, bigG 694,659,840
    assert _count(pipe.transformer) == 2_028_328_000
    assert _count(pipe.text_encoder_3) == 4_762_310_656 and _count(pipe.text_encoder_2) == 694_659_840
    sites = discover_dit_sites(pipe.transformer)
    # 24 joint blocks; the last keeps no text stream: no text MLP, no text output
    names = [f"double.{i}.{k}" for i in range(23) for k in DOUBLE] + [f"double.23.{k}" for k in ("txt_k", "txt_v", "img_mlp_hidden", "img_out")]
    assert [s.name for s in sites] == names
    assert next(s for s in sites if s.name == "double.3.img_mlp_hidden").shape == (4, 4 * 1536)


# -- the tiny pipelines -------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["flux-tiny", "sd3-tiny"])
def tiny(request):
    return wrap(build_random_sd(request.param, seed=0, sample_size=8), GenerationDefaults(STEPS, 3.5, 16, 16))


@pytest.fixture(scope="module")
def fitted(tiny) -> tuple[Eraser, FitStatistics]:
    fitter = EraserFitter(tiny, EraseOptions(tau=0.05, site_kind=KINDS), progress=False)
    return fitter.fit(PAIRS), fitter.statistics


def _images(model, prompts=PROMPTS, seeds=0) -> torch.Tensor:
    return generate(model, prompts, seeds=seeds, progress=False)


def test_load_takes_dit_pipelines_with_model_defaults(tiny, tmp_path):
    pipe = tiny.pipeline
    flux = isinstance(pipe, FluxPipeline)
    fresh = build_random_sd("flux-tiny" if flux else "sd3-tiny", sample_size=8)  # no defaults saved in its config
    assert load(fresh).defaults == (GenerationDefaults(28, 3.5) if flux else GenerationDefaults(28, 7.0))
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = load(tmp_path)
    assert type(reloaded.pipeline) is type(pipe) and reloaded.defaults == tiny.defaults  # kept in the transformer config
    assert architecture_hash(reloaded.pipeline) == architecture_hash(pipe)
    assert torch.equal(_images(reloaded), _images(tiny))


def test_generation_is_seeded_per_image(tiny):
    a = _images(tiny, seeds=[0, 1])
    assert a.shape == (2, 3, 16, 16) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, _images(tiny, seeds=[0, 1])) and not torch.equal(a, _images(tiny, seeds=[5, 6]))


def test_sites_fire_in_table_order_in_a_pipeline_call(tiny):
    pipe = tiny.pipeline
    sites = discover_dit_sites(pipe.transformer)
    run = lambda: pipe("a red circle", num_inference_steps=1, height=16, width=16, output_type="latent")  # noqa: E731
    fired = fired_order(pipe.transformer, sites, run)
    assert list(dict.fromkeys(fired)) == list(dict.fromkeys(s.name for s in sites))  # txt_out/img_out share a hook
    if isinstance(pipe, FluxPipeline):
        last = select_sites(sites, "mlp_hidden", ["single.last2"])
        assert [s.name for s in last] == ["single.1.mlp_hidden", "single.2.mlp_hidden"]
    else:
        with pytest.raises(ValueError, match="last 1 single blocks; this model has 0"):
            select_sites(sites, "mlp_hidden", ["single.last1"])
    with pytest.raises(ValueError, match="asks for the last 9 double blocks"):
        select_sites(sites, "txt_k", ["double.last9"])


def test_reader_norm_of_the_single_block_mlp_reads_proj_outs_mlp_columns():
    pipe = build_random_sd("flux-tiny", sample_size=8)
    site = next(s for s in discover_dit_sites(pipe.transformer) if s.name == "single.1.mlp_hidden")
    weight = pipe.transformer.single_transformer_blocks[1].proj_out.weight
    assert torch.equal(reader_weight_norm(pipe.transformer, site), weight[:, 32:].abs().sum(0))


def test_the_fit_follows_the_flow_matching_sigmas(tiny, fitted):
    eraser, stats = fitted
    pipe = tiny.pipeline
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(call_timestep(a, k)), with_kwargs=True)
    try:
        _images(tiny, PROMPTS[0])
    finally:
        handle.remove()
    assert tuple(seen) == stats.timesteps == denoiser_timesteps(pipe, STEPS, 16, 16)
    assert seen[0] == (1.0 if isinstance(pipe, FluxPipeline) else 1000.0) and seen[1] < seen[0]  # sigma 1 first
    assert set(s.kind for s in eraser.sites) == set(KINDS) - ({"mlp_hidden"} if isinstance(pipe, StableDiffusion3Pipeline) else set())
    density = list(eraser.mask_density().values())
    assert 0 < sum(density) / len(density) < 1 and max(density) < 1


def test_the_default_fit_takes_the_mlp_hidden_units(tiny):
    sites = EraserFitter(tiny, progress=False).sites  # site_kind="ffn_hidden": its DiT analogue
    assert {s.kind for s in sites} <= {"img_mlp_hidden", "mlp_hidden"} and "double.0.img_mlp_hidden" in [s.name for s in sites]


def test_eraser_off_is_the_original_model_bit_for_bit(tiny, fitted):
    eraser = fitted[0]
    before = _images(tiny)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny.pipeline.transformer.modules())
    with eraser.applied(tiny):
        on = _images(tiny)
    assert torch.equal(_images(tiny), before) and (on - before).abs().max() > 1e-3
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny.pipeline.transformer.modules()) == hooks


@pytest.mark.parametrize("variant", ["fitted", "per_step"])
def test_nnsight_patching_equals_torch_hooks(tiny, fitted, variant):
    eraser, stats = fitted
    chosen = eraser if variant == "fitted" else stats.eraser(time_mask="per_step", tau=0.2)
    with chosen.applied(tiny):
        hooked = _images(tiny)
    assert torch.equal(traced_images(tiny, chosen, PROMPTS, STEPS), hooked)


def test_a_per_step_eraser_refuses_another_schedule(tiny, fitted):
    per_step = fitted[1].eraser(time_mask="per_step", tau=0.2)
    with per_step.applied(tiny), pytest.raises(RuntimeError, match="fitted for timestep"):
        generate(tiny, PROMPTS[0], num_inference_steps=3, progress=False)


def test_artifacts_round_trip(tiny, fitted, tmp_path):
    eraser, stats = fitted
    eraser.save(tmp_path / "eraser", statistics=stats)
    manifest = json.loads((tmp_path / "eraser" / "eraser.json").read_text())
    assert manifest["architecture_hash"] == architecture_hash(tiny.pipeline) and manifest["height"] == 16
    back = Eraser.load(tmp_path / "eraser", model=tiny)
    assert back.sites == eraser.sites
    with back.applied(tiny):
        loaded = _images(tiny)
    with eraser.applied(tiny):
        assert torch.equal(_images(tiny), loaded)
    again = FitStatistics.load(tmp_path / "eraser").eraser(tau=0.3)
    assert all(torch.equal(again.masks[n], stats.eraser(tau=0.3).masks[n]) for n in again.masks)
