"""Applying, saving and merging ActErase erasers on ConceptWorld: the on/off switch, nnsight
patching against torch-hook patching, Eq. 6, artifacts, Eqs. 7-9 and clear errors."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from diffusers import UNet2DConditionModel

from tests.conftest import hook_count, traced_images

from acterase_interp.erase import EraseOptions, Eraser, EraserFitter, FitStatistics, merge
from acterase_interp.generation import generate
from acterase_interp.loading import wrap
from acterase_interp.world.architecture import TEXT_WIDTH, assemble, build_text_encoder, build_vae
from acterase_interp.world.pairs import conceptworld_pairs
from acterase_interp.world.tokenizer import build_tokenizer

STEPS = 4
PROMPTS = ["a red triangle on a plain background", "a green circle on a dotted background"]
MIXED = ("down.0.0.ffn_hidden", "mid.0.attn2_out", "unet_out")  # an input site, an output site, the UNet output


@pytest.fixture(scope="module")
def statistics(conceptworld) -> FitStatistics:
    fitter = EraserFitter(conceptworld, EraseOptions(num_inference_steps=STEPS, tau=0.05), restorable=True, progress=False)
    fitter.fit(conceptworld_pairs("triangle", n=2, seed=0))
    return fitter.statistics


@pytest.fixture(scope="module")
def eraser(statistics) -> Eraser:
    return Eraser.from_statistics(statistics)


@pytest.fixture(scope="module")
def mixed(conceptworld, eraser) -> Eraser:
    """A hand-made per-step eraser on sites of every access kind, with random masks and values."""
    g = torch.Generator().manual_seed(0)
    shapes = {"down.0.0.ffn_hidden": (64, 256), "mid.0.attn2_out": (16, 128), "unet_out": (64, 4)}
    masks = {n: torch.rand(STEPS, *s, generator=g) < 0.3 for n, s in shapes.items()}
    values = {n: torch.randn(STEPS, *s, generator=g) for n, s in shapes.items()}
    return Eraser.from_tensors(conceptworld, masks, values, timesteps=eraser.manifest["timesteps"])


def _images(model, prompts=PROMPTS, steps=STEPS) -> torch.Tensor:
    return generate(model, prompts, seeds=0, num_inference_steps=steps, progress=False)


def _traced(model, eraser: Eraser, prompts=PROMPTS) -> torch.Tensor:
    return traced_images(model, eraser, prompts, STEPS)


# -- the on/off switch ------------------------------------------------------------------------


def test_eraser_off_is_the_original_model_bit_for_bit(conceptworld, eraser):
    hooks = hook_count(conceptworld)
    before = _images(conceptworld)
    with eraser.applied(conceptworld):
        on = _images(conceptworld)
    after = _images(conceptworld)
    assert torch.equal(before, after) and hook_count(conceptworld) == hooks
    assert (on - before).abs().max() > 1e-3  # the eraser does change the images
    with pytest.raises(RuntimeError, match="boom"):
        with eraser.applied(conceptworld):
            raise RuntimeError("boom")
    assert hook_count(conceptworld) == hooks and torch.equal(_images(conceptworld), before)


@pytest.mark.parametrize("variant", ["fitted", "per_step", "absolute", "restore", "mixed"])
def test_nnsight_patching_equals_torch_hooks(conceptworld, statistics, eraser, mixed, variant):
    chosen = {
        "fitted": eraser,
        "restore": statistics.eraser(tau=0.2, values="target"),
        "per_step": statistics.eraser(time_mask="per_step", tau=0.2),
        "absolute": statistics.eraser(tau=0.3, tau_mode="absolute"),
        "mixed": mixed,
    }[variant]
    with chosen.applied(conceptworld):
        hooked = _images(conceptworld)
    assert torch.equal(_traced(conceptworld, chosen), hooked)


def test_per_step_erasers_check_the_step_schedule(conceptworld, mixed):
    hooks = hook_count(conceptworld)
    with pytest.raises(RuntimeError, match=f"per-step patch .* was fitted for timestep .* and {STEPS} denoising steps"):
        with mixed.applied(conceptworld):
            _images(conceptworld, steps=STEPS + 2)
    assert hook_count(conceptworld) == hooks


# -- Eq. 6 ----------------------------------------------------------------------------------------


def test_call_is_eq6_on_every_row(eraser, mixed):
    name = "mid.0.ffn_hidden"
    mask, value = eraser.masks[name][0], eraser.values[name][0]
    assert mask.any() and not mask.all()
    x = torch.randn(4, *value.shape)  # two prompts, both CFG halves
    out = eraser(name, x)
    assert torch.equal(out, mask * value + (~mask) * x)
    # the UNet output: (batch, C, H, W), a "unit" is a channel and a token a latent pixel
    x = torch.randn(2, 4, 8, 8)
    out = mixed("unet_out", x, step=2)
    m, v = mixed.masks["unet_out"][2], mixed.values["unet_out"][2]
    expected = torch.where(m, v, x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(x.shape)
    assert torch.equal(out, expected) and not torch.equal(out, x)


def test_saturated_replaces_everything_the_values_resolve(eraser, mixed):
    full = eraser.saturated()
    assert set(full.mask_density().values()) == {1.0} and full.manifest["saturated"]
    assert full.mask_density() != eraser.mask_density()  # the original is untouched
    name = "mid.0.ffn_hidden"
    x = torch.randn(4, *eraser.values[name][0].shape)
    assert torch.equal(full(name, x), eraser.values[name][0].expand_as(x))
    per_step = mixed.saturated()
    assert per_step.masks["unet_out"].shape == mixed.values["unet_out"].shape
    x = torch.randn(2, 4, 8, 8)
    expected = mixed.values["unet_out"][1].transpose(0, 1).reshape(1, 4, 8, 8).expand_as(x)
    assert torch.equal(per_step("unet_out", x, step=1), expected)


def test_call_errors(eraser, mixed):
    with pytest.raises(KeyError, match="no site 'mid.0.ffn_out'"):
        eraser("mid.0.ffn_out", torch.zeros(2, 16, 512))
    with pytest.raises(ValueError, match="generate at the fitted size"):
        eraser("mid.0.ffn_hidden", torch.zeros(2, 64, 512))
    with pytest.raises(ValueError, match="pass the step index"):
        mixed("mid.0.attn2_out", torch.zeros(2, 16, 128))
    with pytest.raises(IndexError, match=f"outside the {STEPS} fitted steps"):
        mixed("mid.0.attn2_out", torch.zeros(2, 16, 128), step=STEPS)


def test_mask_density_and_devices(eraser):
    density = eraser.mask_density()
    assert list(density) == [s.name for s in eraser.sites]
    for s in eraser.sites:
        assert density[s.name] == pytest.approx(eraser.masks[s.name].float().mean().item())
        assert 0 < density[s.name] < 1
    moved = eraser.to("cpu")
    assert all(torch.equal(moved.masks[k], v) and moved.values[k].device.type == "cpu" for k, v in eraser.masks.items())
    assert repr(eraser).startswith("Eraser(concept='triangle', sites=7") and len(repr(eraser)) < 200


# -- artifacts ----------------------------------------------------------------------------------


def test_save_load_round_trip(conceptworld, statistics, eraser, tmp_path):
    path = tmp_path / "eraser"
    eraser.save(path, statistics=statistics)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eraser"]  # no temporary folder left behind
    files = ["eraser.json", "masks.safetensors", "statistics", "values.safetensors"]
    assert sorted(p.name for p in path.iterdir()) == files
    back = Eraser.load(path, model=conceptworld)
    assert back.sites == eraser.sites and back.manifest == eraser.manifest
    for k, v in eraser.masks.items():
        assert torch.equal(back.masks[k], v) and torch.equal(back.values[k], eraser.values[k])
    manifest = json.loads((path / "eraser.json").read_text())
    keys = ["architecture_hash", "options", "pairs", "seeds", "num_inference_steps", "timesteps", "scheduler", "versions"]
    assert all(key in manifest for key in keys)
    assert manifest["options"]["tau"] == 0.05 and manifest["pairs"]["concept"] == "triangle"
    assert manifest["seeds"] == [0, 1] and "torch" in manifest["versions"]
    again, fresh = FitStatistics.load(path).eraser(tau=0.2), statistics.eraser(tau=0.2)
    assert all(torch.equal(again.masks[k], v) for k, v in fresh.masks.items())
    with back.applied(conceptworld):
        loaded = _images(conceptworld)
    with eraser.applied(conceptworld):
        assert torch.equal(loaded, _images(conceptworld))
    eraser.save(path)  # replaces the artifact, now without statistics
    assert sorted(p.name for p in path.iterdir()) == [f for f in files if f != "statistics"]
    with pytest.raises(FileNotFoundError, match="no fit statistics"):
        FitStatistics.load(path)
    with pytest.raises(TypeError, match="fitter.statistics"):
        eraser.save(path, statistics=True)


def test_save_refuses_to_replace_other_folders(eraser, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an artifact folder"):
        eraser.save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def _other_architecture():
    """A ConceptWorld-like pipeline with a narrower UNet: another architecture hash."""
    tokenizer = build_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), block_out_channels=(32, 64),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
    )  # fmt: skip
    return wrap(assemble(build_vae(), build_text_encoder(len(tokenizer)), tokenizer, unet))


@pytest.mark.filterwarnings("ignore:.*steps_offset")
def test_artifacts_refuse_another_architecture_or_unknown_sites(conceptworld, eraser, tmp_path):
    path = tmp_path / "eraser"
    eraser.save(path)
    other = _other_architecture()
    with pytest.raises(ValueError, match="fitted on a model with architecture hash"):
        Eraser.load(path, model=other)
    with pytest.raises(ValueError, match="architecture hash"):
        with eraser.applied(other):
            pass
    manifest = json.loads((path / "eraser.json").read_text())
    manifest["sites"][0]["module_path"] = "down_blocks.7.attentions.0.transformer_blocks.0.ff.net.2"
    (path / "eraser.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="site 'down.0.0.ffn_hidden' .* does not exist in this model"):
        Eraser.load(path, model=conceptworld)
    with pytest.raises(FileNotFoundError, match="no eraser in"):
        Eraser.load(tmp_path / "missing")


# -- merging (Eqs. 7-9) -------------------------------------------------------------------------


def _hand_made(model, seed: int, token_masks: bool) -> Eraser:
    g = torch.Generator().manual_seed(seed)
    shapes = {"mid.0.ffn_hidden": (16, 512), "up.1.1.attn2_out": (64, 64)}
    masks = {n: torch.rand(*(s if token_masks else s[1:]), generator=g) < 0.4 for n, s in shapes.items()}
    return Eraser.from_tensors(model, masks, {n: torch.randn(*s, generator=g) for n, s in shapes.items()})


def test_merge_algebra(conceptworld):
    a, b = _hand_made(conceptworld, 0, token_masks=False), _hand_made(conceptworld, 1, token_masks=True)
    merged = merge([a, b])
    for n in ("mid.0.ffn_hidden", "up.1.1.attn2_out"):
        ma, mb = a.masks[n].expand_as(b.masks[n]), b.masks[n]
        va, vb = a.values[n], b.values[n]
        assert torch.equal(merged.masks[n], ma | mb)
        v = merged.values[n]
        assert torch.equal(v[ma & mb], ((va + vb) / 2)[ma & mb])
        assert torch.equal(v[ma & ~mb], va[ma & ~mb]) and torch.equal(v[~ma & mb], vb[~ma & mb])
        assert (ma & mb).any() and (ma & ~mb).any() and (~ma & mb).any()
    c = _hand_made(conceptworld, 2, token_masks=True)
    three = merge([a, b, c])
    n = "mid.0.ffn_hidden"
    every = a.masks[n] & b.masks[n] & c.masks[n]
    torch.testing.assert_close(three.values[n][every], ((a.values[n] + b.values[n] + c.values[n]) / 3)[every])
    assert three.manifest["concepts"] == ["custom"] * 3 and len(three.manifest["merged_from"]) == 3


def test_merging_one_eraser_is_the_identity(conceptworld, statistics, eraser, mixed):
    for single in (eraser, mixed, statistics.eraser(time_mask="per_step")):
        merged = merge([single])
        assert merged.sites == single.sites
        for n in single.masks:
            assert torch.equal(merged.masks[n], single.masks[n]) and torch.equal(merged.values[n], single.values[n])


def test_merged_erasers_apply(conceptworld, statistics, eraser):
    per_step = statistics.eraser(time_mask="per_step", tau=0.2)
    merged = merge([eraser, per_step])
    assert merged.num_steps == STEPS
    assert all(torch.equal(merged.masks[n], eraser.masks[n] | per_step.masks[n]) for n in eraser.masks)
    with merged.applied(conceptworld):
        hooked = _images(conceptworld)
    assert torch.equal(_traced(conceptworld, merged), hooked)


def test_merge_errors(conceptworld, eraser):
    a = _hand_made(conceptworld, 0, token_masks=False)
    with pytest.raises(ValueError, match="at least one eraser"):
        merge([])
    with pytest.raises(TypeError, match="not an Eraser"):
        merge([a, "eraser"])
    with pytest.raises(ValueError, match="different architectures"):
        merge([a, replace(a, manifest={**a.manifest, "architecture_hash": "0" * 16})])
    with pytest.raises(ValueError, match="must patch the same sites"):
        merge([a, eraser])
    def per_step(steps: int) -> Eraser:
        return Eraser.from_tensors(conceptworld, {n: m.expand(steps, -1, -1) for n, m in a.masks.items()}, a.values)

    with pytest.raises(ValueError, match="different step counts"):
        merge([per_step(3), per_step(2)])
