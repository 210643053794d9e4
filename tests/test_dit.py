"""Diffusion transformers (FLUX.1, SD3): the published architectures on the meta device (parameter
counts, site tables), and the core path on `flux-tiny` / `sd3-tiny` (every block type and conditioning
input at tiny widths, random weights, 16-pixel images): loading, generation, sites in execution order,
fit and erase on flow-matching schedules, eraser off bit-identical, nnsight equal to torch hooks,
artifacts round-trip, merge, text injection into the text stream, the causal sweep, the evaluation
methods with a DiT form (each leaves the model bit-identical outside `applied`; UCE's edit is the
hand-computed closed form), FLUX's true CFG counted as one step per sigma, and the 1024-px
statistics memory of a default fit."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from tests.conftest import fired_order, traced_images

from acterase_interp.erase import EraseOptions, Eraser, EraserFitter, FitStatistics, PromptPairs
from acterase_interp.erase.merge import merge
from acterase_interp.evaluation.baselines import METHODS, UCE, ActErase, CASteer, NegativePrompt, Unerased
from acterase_interp.evaluation.core import image_seeds
from acterase_interp.flow import denoiser_timesteps
from acterase_interp.generation import TextInjection, generate
from acterase_interp.injection import encode_dit_prompts
from acterase_interp.loading import GenerationDefaults, architecture_hash, load, wrap
from acterase_interp.patching import call_timestep, patched
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
    torch.testing.assert_close(reader_weight_norm(pipe.transformer, site), weight[:, 32:].abs().sum(0), rtol=1e-6, atol=0)


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


def test_merging_dit_erasers_is_the_union_of_their_masks(tiny, fitted):
    stats = fitted[1]
    a, b = stats.eraser(tau=0.05), stats.eraser(tau=0.2, time_mask="union")
    alone = merge([a])
    assert all(torch.equal(alone.masks[n], a.masks[n]) for n in a.masks)
    with alone.applied(tiny):
        merged_alone = _images(tiny)
    with a.applied(tiny):
        assert torch.equal(_images(tiny), merged_alone)
    both = merge([a, b])
    assert all(torch.equal(both.masks[n], a.masks[n] | b.masks[n]) for n in a.masks)
    before = _images(tiny)
    with both.applied(tiny):
        assert not torch.equal(_images(tiny), before)
    assert torch.equal(_images(tiny), before)


# -- text injection ------------------------------------------------------------------------------

SOURCES = ["a red square on a plain background", "a blue star on a striped background"]


def _source_states_target_pooled(model) -> torch.Tensor:
    """The pipeline's own images of the sources' prompt embedding with the targets' pooled embedding."""
    pipe, d = model.pipeline, model.defaults
    states, pooled = encode_dit_prompts(pipe, SOURCES)[0], encode_dit_prompts(pipe, PROMPTS)[1]
    extra = {}
    if isinstance(pipe, StableDiffusion3Pipeline):  # its unconditional half: the empty prompt's, as `generate` has it
        empty = pipe.encode_prompt(prompt=[""] * 2, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False)
        extra = {"negative_prompt_embeds": empty[0], "negative_pooled_prompt_embeds": empty[2]}
    return pipe(prompt_embeds=states, pooled_prompt_embeds=pooled, num_inference_steps=STEPS, guidance_scale=d.guidance_scale,
                height=d.height, width=d.width, output_type="pt", generator=[torch.Generator().manual_seed(i) for i in range(2)],
                **extra).images.float()  # fmt: skip


def test_text_injection_gives_the_blocks_the_sources_text_stream(tiny):
    """Injected everywhere: the pipeline's image of the sources' prompt embedding with the targets'
    pooled embedding (up to float rounding: the shadow rows change the batch's size), not the
    sources' own image (the pooled embedding conditions every block); the text stream from the
    first block on is the source's, so injecting there alone is the same (up to float rounding too:
    the same rows sit at other batch positions, and multi-threaded matmuls may round them apart)."""
    inject = lambda blocks, steps=None: generate(tiny, PROMPTS, seeds=0, inject=TextInjection(SOURCES, blocks, steps),
                                                  progress=False)  # noqa: E731  fmt: skip
    everywhere, target = inject(None), _images(tiny)
    torch.testing.assert_close(everywhere, _source_states_target_pooled(tiny), atol=1e-5, rtol=0)
    assert (everywhere - _images(tiny, SOURCES)).abs().max() > 1e-4 and (everywhere - target).abs().max() > 1e-4
    torch.testing.assert_close(inject(("double.0",)), everywhere, atol=1e-5, rtol=0)
    assert torch.equal(inject(()), target) and torch.equal(inject(None, (0, 0)), target)
    late = inject(("double.last1",))
    assert not torch.equal(late, target) and not torch.equal(late, everywhere)
    assert not torch.equal(inject(None, (1, 2)), everywhere)  # the first step's text stream stays the target's


# -- the causal sweep ----------------------------------------------------------------------------


@pytest.mark.slow
def test_the_causal_sweep_covers_every_block_window(tiny, classifier):
    from acterase_interp.analysis import causal_sweep

    pairs = PromptPairs("triangle", PAIRS.targets[:1], PAIRS.sources[:1], non_target=[PROMPTS[1]])
    families = ("ffn_hidden", "txt_v", "text")
    records = causal_sweep(tiny, classifier, pairs, families, None, [(0, STEPS)], tau=1.0, seeds=(0,), progress=False)
    sites = discover_dit_sites(tiny.pipeline.transformer)
    blocks = lambda kinds: list(dict.fromkeys(s.block for s in sites if s.kind in kinds))  # noqa: E731
    windows = {"ffn_hidden": blocks(("img_mlp_hidden", "mlp_hidden")), "txt_v": blocks(("txt_v",)), "text": blocks(("img_out",))}
    assert [(r["family"], r["direction"], r["layer_label"]) for r in records] == [
        (f, d, b) for f in families for d in ("erase", "restore") for b in windows[f]]
    assert len(windows["text"]) == (5 if isinstance(tiny.pipeline, FluxPipeline) else 3)  # double + single blocks
    for r in records:
        assert 0.0 <= r["concept_rate"] <= 1.0 and r["seeds"] == [0]
    # every erasing eraser cell moves the non-target images (the window's sites are found on a DiT)
    assert all(r["image_distance"] > 0 for r in records if r["family"] != "text" and r["direction"] == "erase")
    with pytest.raises(ValueError, match="not offered on diffusion transformers"):
        causal_sweep(tiny, classifier, pairs, "text_encoder", progress=False)


# -- evaluation methods --------------------------------------------------------------------------


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.pipeline.transformer.state_dict().items()}


@pytest.mark.parametrize("method", [Unerased, lambda: ActErase(EraseOptions(tau=0.3), tau=0.3), NegativePrompt, UCE, CASteer],
                         ids=["unerased", "acterase", "negative_prompt", "uce", "casteer"])  # fmt: skip
def test_evaluation_methods_leave_the_dit_bit_identical_outside_applied(tiny, method):
    method = method()
    before, weights = _images(tiny), _state(tiny)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny.pipeline.transformer.modules())
    method.fit(tiny, PAIRS)
    with method.applied(tiny) as sample:
        inside = sample(PROMPTS, 0)
    assert torch.equal(_images(tiny), before) and all(torch.equal(v, weights[k]) for k, v in _state(tiny).items())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny.pipeline.transformer.modules()) == hooks
    if method.name == "unerased":
        assert torch.equal(inside, before)
    elif method.name != "casteer":  # CASteer steers only tokens with <x, v> > 0: on sd3-tiny there are none
        assert (inside - before).abs().max() > 1e-4


def test_methods_without_a_dit_form_refuse_one(tiny):
    for name in ("sld", "esd_x", "concept_prune", "fia"):
        with pytest.raises(ValueError, match="no form for diffusion transformers"):
            METHODS[name]().fit(tiny, PAIRS)


def test_uce_edits_the_text_kv_projections_by_the_closed_form(tiny):
    """The edit, recomputed by hand: the inputs of every joint block's add_k_proj read by a plain
    hook (conditional rows, averaged over steps), and W = (lam W0 + W0 C*^T C + s W0 P^T P)(lam I + C^T C + s P^T P)^-1."""
    pipe = tiny.pipeline
    blocks = pipe.transformer.transformer_blocks
    uce = UCE().fit(tiny, PAIRS)
    assert sorted(uce.edits_) == sorted(f"transformer_blocks.{i}.attn.{p}.weight" for i in range(len(blocks))
                                        for p in ("add_k_proj", "add_v_proj"))  # fmt: skip

    def inputs(prompts):
        seen = {i: [] for i in range(len(blocks))}
        hooks = [b.attn.add_k_proj.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0][-len(prompts):]))
                 for i, b in enumerate(blocks)]  # fmt: skip
        try:
            _images(tiny, prompts, seeds=image_seeds("fit", len(prompts)))
        finally:
            for h in hooks:
                h.remove()
        return {i: torch.stack(v).mean(0).reshape(-1, v[0].shape[-1]).double() for i, v in seen.items()}

    c, c_star, keep = inputs(PAIRS.targets), inputs(PAIRS.sources), inputs(PAIRS.sources)  # no non-target: sources kept
    lam, s = 0.5, 1.0  # preserve scale: max(0.1, 1 / max(1, 0 non-target prompts))
    for i, block in enumerate(blocks):
        for p in ("add_k_proj", "add_v_proj"):
            w0 = getattr(block.attn, p).weight.detach().double()
            eye = torch.eye(w0.shape[1], dtype=torch.float64)
            hand = (lam * w0 + w0 @ c_star[i].T @ c[i] + s * w0 @ keep[i].T @ keep[i]) @ torch.linalg.inv(
                lam * eye + c[i].T @ c[i] + s * keep[i].T @ keep[i])  # fmt: skip
            torch.testing.assert_close(uce.edits_[f"transformer_blocks.{i}.attn.{p}.weight"].double(), hand, rtol=1e-5, atol=1e-6)
            assert (hand - w0).abs().max() > 1e-4


# -- FLUX's true CFG and the statistics memory ------------------------------------------------------


class _StepLog:
    """A patch that records the step index of every call at one site and changes nothing."""

    def __init__(self, site) -> None:
        self.sites, self.steps = (site,), []

    def __call__(self, name, x, step=None):
        self.steps.append(step)
        return x


def test_true_cfg_counts_one_step_per_sigma():
    model = wrap(build_random_sd("flux-tiny", seed=0, sample_size=8), GenerationDefaults(STEPS, 3.5, 16, 16))
    pipe = model.pipeline
    log = _StepLog(discover_dit_sites(pipe.transformer)[0])
    run = lambda: pipe(PROMPTS[0], negative_prompt="triangle", true_cfg_scale=2.0, num_inference_steps=STEPS, height=16,
                       width=16, output_type="latent")  # noqa: E731  fmt: skip
    with patched(model, log):
        run()
    assert log.steps == [0, 0, 1, 1]  # two transformer calls (prompt, negative prompt) per sigma
    stats = EraserFitter(model, EraseOptions(tau=0.2), progress=False)
    stats.fit(PAIRS)
    with stats.statistics.eraser(time_mask="per_step", tau=0.2).applied(model):
        run()  # its schedule check passes: each step's sigma is the fitted one


def test_the_1024px_statistics_memory_of_a_default_fit():
    """The README's figures: float64 value sums per (token, unit) of every site, plus per pair two
    float32 scores per (step, unit) and four moment vectors, at 1024 px and 28 steps."""
    for version, double, single, units, text in (("flux-dev", 19, 38, 12288, 512), ("sd3-medium", 24, 0, 6144, 333)):
        model = wrap(build_random_sd(version, device="meta"), GenerationDefaults(28, 3.5, 1024, 1024))
        fitter = EraserFitter(model, progress=False)
        image = 64 * 64  # 128 x 128 latent, 2 x 2 patches
        values = 8 * units * (double * image + single * (image + text))
        per_pair = 8 * units * (28 + 2) * (double + single)
        assert fitter.statistics_bytes(0) == values and fitter.statistics_bytes(8) == values + 8 * per_pair
