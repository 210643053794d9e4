"""Text-encoder layer sites (`text_layer`) in the fitter and both patch engines, with known answers
on ConceptWorld's BERT, SDXL-tiny's two CLIPs and a random-weight SD 1.5 CLIP: the UNet sees only
what the last text layer outputs (ConceptWorld: that output itself; CLIP: its final layer norm), so
the saturated eraser there turns the target prompt's image into the source prompt's."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.conftest import hook_count, traced_images

from acterase_interp.erase import EraseOptions, Eraser, EraserFitter, FitStatistics, PromptPairs
from acterase_interp.erase._util import model_sites, site_from_dict, site_to_dict
from acterase_interp.generation import generate
from acterase_interp.injection import encode_prompts
from acterase_interp.loading import GenerationDefaults, wrap
from acterase_interp.patching import encoder_calls, hook_site, patched
from acterase_interp.random_sd import build_random_sd
from acterase_interp.sites import TEXT_LAYER, select_sites
from acterase_interp.text_layers import text_layer_sites

STEPS = 2
TARGET, SOURCE = "a red triangle on a plain background", "a red square on a plain background"
PAIRS = PromptPairs("triangle", [TARGET], [SOURCE])
PROMPTS = [TARGET, "a blue star on a striped background"]


def _fit(model, kinds, blocks, **options) -> EraserFitter:
    fitter = EraserFitter(model, EraseOptions(site_kind=kinds, blocks=blocks, num_inference_steps=STEPS, **options),
                          progress=False)  # fmt: skip
    fitter.fit(PAIRS)
    return fitter


def _images(model, prompts, steps=STEPS, **kw) -> torch.Tensor:
    return generate(model, prompts, seeds=list(range(len(prompts))), num_inference_steps=steps, progress=False, **kw)


def _text_hooks(pipe) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in pipe.text_encoder.modules())


@pytest.fixture(scope="module")
def text_fit(conceptworld) -> EraserFitter:
    """Layers 3 and 5 of ConceptWorld's BERT, 30% of the units."""
    return _fit(conceptworld, "text_layer", ("text_encoder.3", "text_encoder.5"), tau=0.3)


@pytest.fixture(scope="module")
def mixed(conceptworld) -> Eraser:
    """Text layers 3 and 5 and the mid block's GEGLU, one fit."""
    return _fit(conceptworld, ("text_layer", "ffn_hidden"), ("text_encoder.3", "text_encoder.5", "mid"), tau=0.3).eraser()


def test_text_layer_sites_are_listed_with_shapes(conceptworld):
    pipe = conceptworld.pipeline
    sites = text_layer_sites(pipe)
    assert [s.name for s in sites] == [f"text_encoder.{i}" for i in range(6)]
    last = sites[-1]
    assert (last.kind, last.block, last.component) == (TEXT_LAYER, "text_encoder.5", "text_encoder")
    assert last.module_path == "encoder.layer.5"  # inside the encoder, BERT's layer list
    assert (last.io, last.reader_path, last.shape) == ("output", None, (24, 384))  # 24 tokens, MiniLM's width
    table = model_sites(conceptworld)
    assert table[:6] == sites and all(s.component == "unet" for s in table[6:])  # the encoder runs first
    assert select_sites(table, "text_layer", ["text_encoder"]) == sites
    assert select_sites(table, ("text_layer", "ffn_hidden"), ["text_encoder.5", "mid"])[0] == last
    assert select_sites(table, "text_layer") == sites and not select_sites(table, "ffn_hidden", ["text_encoder"])
    options = EraseOptions(site_kind=["text_layer", "ffn_hidden"])
    assert options.site_kind == ("text_layer", "ffn_hidden") and EraseOptions.from_dict(options.to_dict()) == options
    assert EraseOptions(site_kind=("text_layer",)).site_kind == "text_layer"


def test_saturated_last_layer_makes_the_target_image_the_source_image(conceptworld):
    """No CFG (guidance 1.0: the negative prompt is never encoded), one pair: the value at the last
    layer is the source prompt's encoding, exactly (the mean of one pair's equal per-step float32
    readings is that reading again), so the images are equal bit for bit."""
    fitter = _fit(conceptworld, "text_layer", ("text_encoder.5",), guidance_scale=1.0)
    eraser = fitter.eraser()
    assert torch.equal(eraser.values["text_encoder.5"][0], encode_prompts(conceptworld.pipeline, [SOURCE, TARGET])[0])
    source = _images(conceptworld, [SOURCE], guidance_scale=1.0)
    target = _images(conceptworld, [TARGET], guidance_scale=1.0)
    with eraser.saturated().applied(conceptworld):
        erased = _images(conceptworld, [TARGET], guidance_scale=1.0)
    assert torch.equal(erased, source) and (target - source).abs().max() > 0.1


def test_statistics_of_a_text_site_repeat_at_every_step(text_fit):
    stats = text_fit.statistics
    for field in (stats.importance_source, stats.importance_target):
        scores = field["text_encoder.3"]
        assert scores.shape == (1, STEPS, 384) and torch.equal(scores[:, 0], scores[:, 1])
    assert stats.values["text_encoder.3"].shape == (1, 24, 384)
    assert stats.importance_source["text_encoder.3"].ne(stats.importance_target["text_encoder.3"]).any()
    assert text_fit.statistics_bytes(1) > 0 and text_fit._tokens["text_encoder.5"] == 24  # the tokenizer's length


def test_hooks_and_nnsight_give_the_same_images(conceptworld, text_fit, mixed):
    """Guidance 3.0 (the model's default): the encoder runs twice, and both engines patch both calls."""
    plain = _images(conceptworld, PROMPTS)
    for eraser in (text_fit.eraser(), mixed):
        hooks = hook_count(conceptworld), _text_hooks(conceptworld.pipeline)
        with eraser.applied(conceptworld):
            on = _images(conceptworld, PROMPTS)
        assert (hook_count(conceptworld), _text_hooks(conceptworld.pipeline)) == hooks
        assert torch.equal(traced_images(conceptworld, eraser, PROMPTS, STEPS), on)
        assert not torch.equal(on, plain)
    assert torch.equal(_images(conceptworld, PROMPTS), plain)  # bit-identical once the block exits
    assert [s.component for s in mixed.sites] == ["text_encoder", "text_encoder", "unet"]


def test_text_sites_can_be_patched_before_the_loop(conceptworld, mixed):
    d = conceptworld.defaults
    with mixed.applied(conceptworld):
        on = _images(conceptworld, PROMPTS)
    generators = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    with conceptworld.generate(PROMPTS, num_inference_steps=STEPS, guidance_scale=d.guidance_scale, height=d.height,
                               width=d.width, generator=generators, output_type="pt") as tracer:  # fmt: skip
        mixed.apply(conceptworld)  # text sites now; the UNet's at step 0 (this call) and in the loop
        for step in tracer.iter[1:STEPS]:
            mixed.apply(conceptworld, step)
        images = conceptworld.output.images.save()
    assert torch.equal(images.float().cpu(), on)


def test_a_first_patch_call_after_the_encoders_ran_is_an_error(conceptworld, text_fit):
    eraser = text_fit.eraser()
    with pytest.raises(RuntimeError, match=r"first patch call of a trace: call eraser.apply\(model, step\)"):
        with conceptworld.generate(PROMPTS, num_inference_steps=STEPS, output_type="pt") as tracer:
            for step in tracer.iter[1:STEPS]:
                eraser.apply(conceptworld, step)
    with pytest.raises(ValueError, match="cannot be limited to steps"):
        with patched(conceptworld, eraser, steps=(0, 1)):
            pass
    with pytest.raises(ValueError, match="not prompt_embeds"):
        encoder_calls(conceptworld.pipeline, {"prompt_embeds": torch.zeros(1)})
    pipe = conceptworld.pipeline
    assert [encoder_calls(pipe, kw) for kw in ({"guidance_scale": 1.0}, {"guidance_scale": 3.0}, {})] == [1, 2, 2]


def test_artifacts_round_trip(conceptworld, text_fit, mixed, tmp_path):
    mixed.save(tmp_path / "eraser", statistics=None)
    back = Eraser.load(tmp_path / "eraser", model=conceptworld)
    assert back.sites == mixed.sites
    assert all(torch.equal(back.masks[n], mixed.masks[n]) and torch.equal(back.values[n], mixed.values[n]) for n in back.masks)
    eraser = text_fit.eraser()
    eraser.save(tmp_path / "text", statistics=text_fit.statistics)
    stats = FitStatistics.load(tmp_path / "text")
    assert stats.sites == text_fit.statistics.sites and stats.sites[0].component == "text_encoder"
    again = stats.eraser(tau=0.05, blocks=("text_encoder.5",))  # re-thresholded from disk
    assert [s.name for s in again.sites] == ["text_encoder.5"] and again.mask_density()["text_encoder.5"] < 0.1


def test_old_site_records_load_as_unet_sites(conceptworld):
    table = model_sites(conceptworld)
    ffn = next(s for s in table if s.name == "mid.0.ffn_hidden")
    old = {k: v for k, v in site_to_dict(ffn).items() if k != "component"}  # as artifacts were written before
    assert site_from_dict(old) == ffn and ffn.component == "unet"
    assert site_from_dict(site_to_dict(table[5])) == table[5]


def test_unknown_text_layers_and_bare_unets_are_refused(conceptworld, text_fit):
    pipe, eraser = conceptworld.pipeline, text_fit.eraser()
    with pytest.raises(ValueError, match=r"unknown block\(s\) \['text_encoder.6'\].*text-encoder layers text_encoder.0-5"):
        EraserFitter(conceptworld, EraseOptions(site_kind="text_layer", blocks=("text_encoder.6",)), progress=False)
    with pytest.raises(KeyError, match=r"unknown site\(s\) \['text_encoder.6'\]"):
        mask, value = torch.ones(384, dtype=torch.bool), torch.zeros(24, 384)
        Eraser.from_tensors(conceptworld, {"text_encoder.6": mask}, {"text_encoder.6": value})
    moved = replace(eraser, sites=(replace(eraser.sites[0], module_path="encoder.layer.9"), *eraser.sites[1:]))
    with pytest.raises(ValueError, match=r"site 'text_encoder.3' \(text_encoder: encoder.layer.9\) does not exist"):
        moved.check_model(conceptworld)
    with pytest.raises(ValueError, match="lives in the pipeline's text_encoder, not in the UNet"):
        with eraser.applied(pipe.unet):
            pass
    with pytest.raises(ValueError, match="not in the UNet"):
        hook_site(pipe.unet, eraser.sites[0], lambda x: x)
    assert _text_hooks(pipe) == 0 and hook_count(conceptworld) == 0


@pytest.mark.slow
def test_sdxl_second_encoder_in_both_engines():
    """SDXL-tiny: sites in both CLIPs (the UNet reads `text_encoder_2`'s penultimate hidden states,
    which transformers collects by its own hooks) and in the UNet; the zeroed empty negative prompt
    is never encoded, so each encoder runs once."""
    model = wrap(build_random_sd("xl-tiny", seed=0, sample_size=8), GenerationDefaults(STEPS, 5.0))
    blocks = ("text_encoder.0", "text_encoder_2", "mid.0.t0")
    eraser = _fit(model, ("text_layer", "ffn_hidden"), blocks, tau=0.3).eraser()
    assert [s.name for s in eraser.sites] == ["text_encoder.0", "text_encoder_2.0", "text_encoder_2.1", "mid.0.t0.ffn_hidden"]
    plain = _images(model, PROMPTS)
    with eraser.applied(model):
        on = _images(model, PROMPTS)
    assert torch.equal(traced_images(model, eraser, PROMPTS, STEPS), on) and not torch.equal(on, plain)


@pytest.mark.slow
def test_saturated_last_clip_layer_on_random_sd15():
    """SD 1.5's CLIP (random weights, 64-pixel images, one step, no CFG): the UNet reads the final
    layer norm of the last layer's output, so the saturated eraser there is the source image."""
    model = wrap(build_random_sd("1.5", seed=0, sample_size=8), GenerationDefaults(1, 1.0, height=64, width=64))
    fitter = EraserFitter(model, EraseOptions(site_kind="text_layer", blocks=("text_encoder.11",)), progress=False)
    assert [(s.name, s.shape) for s in fitter.sites] == [("text_encoder.11", (77, 768))]
    saturated = fitter.fit(PAIRS).saturated()
    with saturated.applied(model):
        erased = _images(model, [TARGET], steps=1)
    assert torch.equal(traced_images(model, saturated, [TARGET], 1), erased)
    # exact: the value is row 0 of the fit's batch [source, target], which CLIP encodes as it does alone
    assert torch.equal(erased, _images(model, [SOURCE], steps=1))
    assert not torch.equal(_images(model, [TARGET], steps=1), erased)
