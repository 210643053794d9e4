"""SDXL: SDXL base's exact layout (built on the meta device, no weights), and every fit and erase path
on `xl-tiny`, SDXL's layout at small widths with random weights, at 64-pixel images (8x8 latents).

The identities are those SD 1.5 is held to: the eraser switched off leaves the model bit-identical,
nnsight patching equals torch-hook patching, artifacts and statistics round-trip exactly, and text
injected everywhere is the source's text states (with the target's pooled embedding, not per block)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from nnsight import DiffusionModel

from tests.conftest import fired_order, hook_count, traced_images

from acterase_interp.erase import EraseOptions, Eraser, EraserFitter, FitStatistics, PromptPairs, merge
from acterase_interp.generation import TextInjection, generate
from acterase_interp.injection import encode_prompts
from acterase_interp.loading import GenerationDefaults, architecture_hash, load, wrap
from acterase_interp.random_sd import build_random_sd
from acterase_interp.sites import UNET_OUT, Site, discover_sites, select_sites

STEPS = 2
SIDE = 64  # pixels: 8x8 latents, 4x4 tokens at level 1, 2x2 at level 2
PROMPTS = ["a red triangle on a plain background", "a green circle on a dotted background"]
KINDS = ("attn1_out", "attn2_k", "attn2_v", "attn2_out", "ffn_hidden", "ffn_out", "block_out")
LAYERS = {"down.1": 2, "down.2": 10, "mid": 10, "up.0": 10, "up.1": 2}
"""Transformer layers per attention module of SDXL base, by UNet block (down.0 and up.2 have no attention)."""
MODULES = {"down.1": ["down.1.0", "down.1.1"], "down.2": ["down.2.0", "down.2.1"], "mid": ["mid.0"],
           "up.0": ["up.0.0", "up.0.1", "up.0.2"], "up.1": ["up.1.0", "up.1.1", "up.1.2"]}  # fmt: skip
SDXL_BLOCKS = [f"{m}.t{k}" for group, ms in MODULES.items() for m in ms for k in range(LAYERS[group])]


def _blocks(sites: list[Site]) -> list[str]:
    return list(dict.fromkeys(s.block for s in sites if s.kind != UNET_OUT))


# -- SDXL base, on the meta device ------------------------------------------------------------


@pytest.fixture(scope="module")
def base() -> StableDiffusionXLPipeline:
    return build_random_sd("xl", device="meta")


def test_sdxl_base_has_the_published_architecture(base):
    assert isinstance(base, StableDiffusionXLPipeline) and base.unet.device.type == "meta"
    counts = {part: sum(p.numel() for p in getattr(base, part).parameters()) for part in ("unet", "text_encoder",
              "text_encoder_2", "vae")}  # fmt: skip
    # SDXL base 1.0's UNet has 2,567,463,684 parameters; CLIP ViT-L/14 text 123,060,480; OpenCLIP bigG text 694,659,840
    assert counts["unet"] == 2_567_463_684
    assert counts["text_encoder"] == 123_060_480 and counts["text_encoder_2"] == 694_659_840
    config = base.unet.config
    widths = base.text_encoder.config.hidden_size, base.text_encoder_2.config.hidden_size
    assert config.cross_attention_dim == sum(widths) == 2048  # the two encoders' states, concatenated
    # pooled bigG embedding + 6 time ids (original size, crop corner, target size) of 256 each
    assert config.projection_class_embeddings_input_dim == base.text_encoder_2.config.projection_dim + 6 * 256
    assert base.vae_scale_factor * config.sample_size == 1024


def test_sdxl_base_site_table(base):
    sites = discover_sites(base.unet)  # shapes at the native 128x128 latents (1024 px); free on meta
    assert _blocks(sites) == SDXL_BLOCKS and len(SDXL_BLOCKS) == 70
    assert len(sites) == len(KINDS) * 70 + 1 and sites[-1].kind == UNET_OUT and sites[-1].shape == (4, 128, 128)
    for block in SDXL_BLOCKS:
        assert [s.kind for s in sites if s.block == block] == list(KINDS)
    level = {"down.1": 1, "down.2": 2, "mid": 2, "up.0": 2, "up.1": 1}
    for s in sites[:-1]:
        lv = next(v for g, v in level.items() if s.block.startswith(g + "."))
        channels, tokens = (320, 640, 1280)[lv], (128 // 2**lv) ** 2
        tokens = 77 if s.kind in ("attn2_k", "attn2_v") else tokens  # keys and values: one row per text token
        assert s.shape == (tokens, 4 * channels if s.kind == "ffn_hidden" else channels), s
    assert sites[0].module_path == "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    deep = next(s for s in sites if s.name == "down.2.1.t3.ffn_hidden")
    assert deep.module_path == deep.reader_path == "down_blocks.2.attentions.1.transformer_blocks.3.ff.net.2"
    # the order activations appear in a forward pass (meta tensors: shapes only, no arithmetic)
    x, context = torch.zeros(1, 4, 16, 16, device="meta"), torch.zeros(1, 77, 2048, device="meta")
    cond = {"text_embeds": torch.zeros(1, 1280, device="meta"), "time_ids": torch.zeros(1, 6, device="meta")}
    order = fired_order(base.unet, sites, lambda: base.unet(x, 999, encoder_hidden_states=context, added_cond_kwargs=cond))
    assert order == [s.name for s in sites]


def test_block_prefixes_select_sdxl_modules(base):
    sites = discover_sites(base.unet, sample_size=4)
    counts = {b: len(select_sites(sites, "ffn_hidden", [b])) for b in ("down", "mid", "up", "down.2.1", "up.1", "mid.0.t9")}
    assert counts == {"down": 24, "mid": 10, "up": 36, "down.2.1": 10, "up.1": 6, "mid.0.t9": 1}
    assert [s.name for s in select_sites(sites, "ffn_hidden", ["up.1.2"])] == ["up.1.2.t0.ffn_hidden", "up.1.2.t1.ffn_hidden"]
    # the first down block has no attention at all, and up.2 neither; the message folds the layers
    with pytest.raises(ValueError, match=r"unknown block\(s\) \['down.0'\]; this UNet has down.1.0.t0-t1, "):
        select_sites(sites, "ffn_hidden", ["down.0"])
    with pytest.raises(ValueError, match="unknown block"):
        select_sites(sites, "ffn_hidden", ["up.2"])


# -- xl-tiny: the whole pipeline -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> DiffusionModel:
    pipe = build_random_sd("xl-tiny", seed=0, sample_size=SIDE // 8)
    return wrap(pipe, GenerationDefaults(STEPS, 5.0))


@pytest.fixture(scope="module")
def fitted(tiny) -> tuple[Eraser, FitStatistics]:
    pairs = PromptPairs("triangle", ["a red triangle on a plain background", "a blue triangle on a striped background"],
                        ["a red square on a plain background", "a blue square on a striped background"])  # fmt: skip
    fitter = EraserFitter(tiny, EraseOptions(tau=0.05), progress=False)
    return fitter.fit(pairs), fitter.statistics


@pytest.fixture(scope="module")
def eraser(fitted) -> Eraser:
    return fitted[0]


@pytest.fixture(scope="module")
def stats(fitted) -> FitStatistics:
    return fitted[1]


def _images(model, prompts=PROMPTS, seeds=0) -> torch.Tensor:
    return generate(model, prompts, seeds=seeds, progress=False)


def _traced(model, patch: Eraser, prompts=PROMPTS) -> torch.Tensor:
    return traced_images(model, patch, prompts, STEPS)


def test_tiny_has_sdxl_base_layout(tiny, base):
    pipe = tiny.pipeline
    assert isinstance(pipe, StableDiffusionXLPipeline) and pipe.text_encoder_2 is not None
    tiny_sites, base_sites = discover_sites(pipe.unet, sample_size=4), discover_sites(base.unet, sample_size=4)
    assert [(s.name, s.module_path, s.io) for s in tiny_sites] == [(s.name, s.module_path, s.io) for s in base_sites]
    assert architecture_hash(pipe) != architecture_hash(base)


def test_tiny_order_in_a_pipeline_call(tiny):
    """Through the real pipeline: both text encoders, pooled embeddings and time ids reach the UNet."""
    pipe = tiny.pipeline
    sites = discover_sites(pipe.unet)
    run = lambda: pipe("a red circle", num_inference_steps=1, guidance_scale=1.0, output_type="latent")  # noqa: E731
    assert fired_order(pipe.unet, sites, run) == [s.name for s in sites]


def test_generation_is_seeded_per_image(tiny):
    a = _images(tiny, seeds=[0, 1])
    assert a.shape == (2, 3, SIDE, SIDE) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, _images(tiny, seeds=[0, 1])) and not torch.equal(a, _images(tiny, seeds=[5, 6]))
    torch.testing.assert_close(_images(tiny, PROMPTS[1], seeds=1)[0], a[1], atol=1e-5, rtol=0)


def test_fit_covers_every_sdxl_block(eraser):
    assert [s.block for s in eraser.sites] == SDXL_BLOCKS
    for s in eraser.sites:  # xl-tiny: 64/128 channels at levels 1/2, GEGLU 4x as wide
        level = 1 if s.block.startswith(("down.1.", "up.1.")) else 2
        assert s.shape == ((SIDE // 8 // 2**level) ** 2, 4 * (32 << level))
        assert eraser.masks[s.name].shape == (1, 1, s.shape[1])
    density = eraser.mask_density()
    assert all(0 < d < 1 for d in density.values())


def test_eraser_off_is_the_original_model_bit_for_bit(tiny, eraser):
    hooks = hook_count(tiny)
    before = _images(tiny)
    with eraser.applied(tiny):
        on = _images(tiny)
    assert torch.equal(_images(tiny), before) and hook_count(tiny) == hooks
    assert (on - before).abs().max() > 1e-3


@pytest.fixture(scope="module")
def mixed(tiny, eraser) -> Eraser:
    """A per-step eraser on an input site, an output site and the UNet output, random masks and values."""
    g = torch.Generator().manual_seed(0)
    shapes = {"down.2.1.t3.ffn_hidden": (4, 512), "up.1.2.t1.attn2_out": (16, 64), "unet_out": (64, 4)}
    masks = {n: torch.rand(STEPS, *s, generator=g) < 0.3 for n, s in shapes.items()}
    values = {n: torch.randn(STEPS, *s, generator=g) for n, s in shapes.items()}
    return Eraser.from_tensors(tiny, masks, values, timesteps=eraser.manifest["timesteps"])


@pytest.mark.parametrize("variant", ["fitted", "per_step", "absolute", "mixed", "merged"])
def test_nnsight_patching_equals_torch_hooks(tiny, eraser, stats, mixed, variant):
    chosen = {
        "fitted": lambda: eraser,
        "per_step": lambda: stats.eraser(time_mask="per_step", tau=0.2),
        "absolute": lambda: stats.eraser(tau=0.3, tau_mode="absolute"),
        "mixed": lambda: mixed,
        "merged": lambda: merge([eraser, stats.eraser(time_mask="per_step", tau=0.2)]),
    }[variant]()
    with chosen.applied(tiny):
        hooked = _images(tiny)
    assert torch.equal(_traced(tiny, chosen), hooked)


def test_artifacts_and_rethresholding_round_trip(tiny, eraser, stats, tmp_path):
    eraser.save(tmp_path / "eraser", statistics=stats)
    manifest = json.loads((tmp_path / "eraser" / "eraser.json").read_text())
    assert manifest["architecture_hash"] == architecture_hash(tiny.pipeline) and manifest["height"] == SIDE
    back = Eraser.load(tmp_path / "eraser", model=tiny)
    assert back.sites == eraser.sites
    assert all(torch.equal(back.masks[n], m) and torch.equal(back.values[n], eraser.values[n]) for n, m in eraser.masks.items())
    with back.applied(tiny):
        loaded = _images(tiny)
    with eraser.applied(tiny):
        assert torch.equal(_images(tiny), loaded)
    # re-thresholding needs no model: the loaded statistics give the fresh fit's masks
    st = stats
    again = FitStatistics.load(tmp_path / "eraser").eraser(tau=0.3, blocks=("mid",))
    assert [s.name for s in again.sites] == [f"mid.0.t{k}.ffn_hidden" for k in range(10)]
    assert all(torch.equal(again.masks[n], st.eraser(tau=0.3).masks[n]) for n in again.masks)
    st.save(tmp_path / "stats")
    assert torch.equal(FitStatistics.load(tmp_path / "stats").eraser(tau=0.5).masks["down.2.1.t9.ffn_hidden"],
                       st.eraser(tau=0.5).masks["down.2.1.t9.ffn_hidden"])  # fmt: skip


def test_save_and_reload_the_pipeline(tiny, tmp_path):
    tiny.pipeline.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = load(tmp_path)
    assert isinstance(reloaded.pipeline, StableDiffusionXLPipeline) and reloaded.defaults == tiny.defaults
    for part in ("unet", "text_encoder", "text_encoder_2", "vae"):
        a, b = getattr(tiny.pipeline, part).state_dict(), getattr(reloaded.pipeline, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert architecture_hash(reloaded.pipeline) == architecture_hash(tiny.pipeline)
    assert torch.equal(_images(reloaded), _images(tiny))


def test_pipelines_the_toolkit_does_not_run_are_refused(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match="is a KandinskyPipeline; acterase_interp runs StableDiffusionPipeline, "
                                         "StableDiffusionXLPipeline"):  # fmt: skip
        load(tmp_path)
    with pytest.raises(ValueError, match="multiple of 4"):
        build_random_sd("xl-tiny", sample_size=6)
    with pytest.raises(ValueError, match="device must be one of"):
        build_random_sd("xl-tiny", device="cuda")


SOURCES = ["a red square on a plain background", "a blue star on a striped background"]


def test_text_injection_swaps_only_the_cross_attention_text(tiny):
    """Both encoders' states of the sources reach every attn2; the pooled embedding and time ids
    stay the targets': the image is the pipeline's for source states with target pooled embeddings."""
    pipe, d = tiny.pipeline, tiny.defaults
    everywhere = generate(tiny, PROMPTS, seeds=0, inject=TextInjection(SOURCES, None), progress=False)
    pooled = pipe.encode_prompt(PROMPTS, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=False)[2]
    expected = pipe(prompt_embeds=encode_prompts(pipe, SOURCES), pooled_prompt_embeds=pooled, num_inference_steps=STEPS,
                    guidance_scale=d.guidance_scale, height=d.height, width=d.width, output_type="pt",
                    generator=[torch.Generator().manual_seed(i) for i in range(2)]).images.float().cpu()  # fmt: skip
    assert torch.equal(everywhere, expected)
    assert not torch.equal(everywhere, _images(tiny, SOURCES))  # the pooled embedding matters on SDXL
    target = _images(tiny)
    assert torch.equal(generate(tiny, PROMPTS, seeds=0, inject=TextInjection(SOURCES, ()), progress=False), target)
    assert torch.equal(generate(tiny, PROMPTS, seeds=0, inject=TextInjection(SOURCES, None, (0, 0)), progress=False),
                       target)  # fmt: skip
    some = generate(tiny, PROMPTS, seeds=0, inject=TextInjection(SOURCES, ("up.1.2.t1",)), progress=False)
    assert not torch.equal(some, target) and not torch.equal(some, everywhere)


def test_the_causal_sweep_runs_on_sdxl(tiny, classifier):  # ConceptWorld's reads any image size
    """Every family kind of the sweep (an FFN site, a cross-attention value site, text injection),
    both directions, on SDXL's layout: records complete, and patching moves the images."""
    from acterase_interp.analysis import causal_sweep

    pairs = PromptPairs("triangle", ["a red triangle on a plain background"], ["a red square on a plain background"],
                        non_target=["a green circle on a dotted background"])  # fmt: skip
    records = causal_sweep(tiny, classifier, pairs, ("ffn_hidden", "attn2_v", "text"), [("mid.0",), ("up.1.2",)],
                           [(0, STEPS)], tau=1.0, seeds=(0,), progress=False)  # fmt: skip
    assert [(r["family"], r["direction"], r["layer_label"]) for r in records] == [
        (f, d, b) for f in ("ffn_hidden", "attn2_v", "text") for d in ("erase", "restore") for b in ("mid.0", "up.1.2")]
    for r in records:
        assert 0.0 <= r["concept_rate"] <= 1.0 and r["seeds"] == [0]
        if r["family"] != "text" and r["direction"] == "erase":
            assert r["image_distance"] is not None and r["damage"] is not None
    # "mid.0" selects all ten transformer layers of the mid block; patching them moves the non-target images
    assert all(r["image_distance"] > 0 for r in records if r["family"] != "text" and r["direction"] == "erase")
