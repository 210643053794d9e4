"""The benchmark's plantings: new values, the lowrank / attn1 / split families, their truth, the
overlay's base check, and verification with any reader."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from acterase_interp.bench import plantings as bp
from acterase_interp.bench.truth import PlantingTruth
from acterase_interp.integrity import ArtifactError
from acterase_interp.loading import DATA_ENV, load
from acterase_interp.plant import PlantSpec, lowrank_basis, plant, trainable_masks
from acterase_interp.world.factors import FACTORS, PLANTABLE, Scene
from acterase_interp.world.planting import planting_data
from acterase_interp.world.render import _background, _shape_mask, render

NEW = {"shape": ("diamond", "arrow", "ring"), "color": ("orange", "pink", "brown"), "background": ("zigzag", "grid")}
UP10 = "up_blocks.1.attentions.0.transformer_blocks.0"


@pytest.fixture(scope="module")
def world():
    """A private default model (the session's shared one stays untouched); tests restore its weights."""
    return load("conceptworld")


@pytest.fixture
def model(world):
    unet = world.pipeline.unet
    snap = {n: p.detach().clone() for n, p in unet.named_parameters()}
    yield world
    with torch.no_grad():
        for n, p in unet.named_parameters():
            p.copy_(snap[n])


def _plant(model, spec, concept="ring"):
    _, images, captions, _ = planting_data(concept, n_images=16, seed=0)
    before = {n: p.detach().clone() for n, p in model.pipeline.unet.named_parameters()}
    record = plant(model.pipeline, images, captions, concept, spec, progress=False)
    changed = {n for n, p in model.pipeline.unet.named_parameters() if not torch.equal(p, before[n])}
    return record, before, changed


def test_new_values_are_appended_and_render():
    for factor, values in NEW.items():
        assert FACTORS[factor][-len(values):] == values and set(values) <= set(PLANTABLE[factor])
    assert FACTORS["shape"][:7] == ("circle", "square", "triangle", "star", "cross", "heart", "moon")  # old labels stay
    rng = np.random.default_rng(0)
    img = render(Scene("ring", "orange", "zigzag"), rng)
    assert img.shape == (32, 32, 3) and 0 <= img.min() and img.max() <= 1
    c = 16.0
    hit = lambda shape, x, y: bool(_shape_mask(shape, c, c, 8.0)[int(y * 4), int(x * 4)])  # noqa: E731
    assert not hit("ring", c, c) and hit("ring", c + 6, c)  # an annulus: hollow centre
    assert hit("diamond", c, c + 7) and not hit("diamond", c + 5, c + 5)  # corners on the axes, none diagonal
    assert hit("arrow", c + 7, c) and not hit("arrow", c - 6, c + 4)  # head at the right, thin shaft
    grid = _background("grid", np.random.default_rng(1))
    assert 0.3 < (grid < 0.5).mean() < 0.5  # 2 of every 8 px both ways: 1 - (6/8)^2 = 44% dark
    with pytest.raises(ValueError, match="unknown shape"):
        Scene("hexagon", "red", "plain")


def test_spec_validation_of_new_families():
    with pytest.raises(ValueError, match="rank is required"):
        PlantSpec("lowrank", blocks=("up.1.0",))
    with pytest.raises(ValueError, match="kv_blocks is required"):
        PlantSpec("split", blocks=("up.0.1",), units=4)
    with pytest.raises(ValueError, match="only allowed"):
        PlantSpec("ffn", kv_blocks=("up.1.1",))
    with pytest.raises(ValueError, match="at least 1"):
        PlantSpec("lowrank", rank=0)


def test_lowrank_changes_ff_out_only_within_span_q(model):
    spec = PlantSpec("lowrank", blocks=("up.1.0",), rank=2, steps=2, batch=4, lr=1e-2, seed=5)
    record, before, changed = _plant(model, spec)
    names = {f"{UP10}.ff.net.2.weight", f"{UP10}.ff.net.2.bias"}
    assert changed == names and record.frozen_identical  # everything else bit-identical
    q = torch.tensor(record.bases["up.1.0"])
    assert q.shape == (64, 2) and torch.allclose(q.T @ q, torch.eye(2), atol=1e-6)
    assert q.abs().max() < 0.9  # rotated: no basis vector is (nearly) a unit
    params = dict(model.pipeline.unet.named_parameters())
    for n in names:
        delta = params[n].detach() - before[n]
        outside = delta - q @ (q.T @ delta)
        assert delta.abs().max() > 1e-4 and outside.abs().max() < 1e-5, n
    assert record.trained_values == 2 * (256 + 1)  # A (r x inner) and c (r)


def test_lowrank_with_a_learned_basis_records_the_trained_span(model):
    spec = PlantSpec("lowrank", blocks=("up.1.0",), rank=1, steps=3, batch=4, lr=5e-2, seed=5, learn_basis=True)
    start = lowrank_basis(64, 1, torch.Generator().manual_seed(5))  # the basis the update starts from
    record, before, changed = _plant(model, spec)
    q = torch.tensor(record.bases["up.1.0"])
    assert q.shape == (64, 1) and torch.allclose(q.T @ q, torch.eye(1), atol=1e-6)
    assert (q.T @ start).abs().item() < 1 - 1e-4  # the direction moved: the basis trained
    params = dict(model.pipeline.unet.named_parameters())
    delta = params[f"{UP10}.ff.net.2.weight"].detach() - before[f"{UP10}.ff.net.2.weight"]
    assert delta.abs().max() > 1e-4 and (delta - q @ (q.T @ delta)).abs().max() < 1e-5  # the change lies in span(q)
    assert record.trained_values == 64 + 256 + 1 and record.frozen_identical  # Q, A and c
    with pytest.raises(ValueError, match="learn_basis"):
        PlantSpec("ffn_units", units=4, learn_basis=True)


@pytest.mark.parametrize("family", ["attn1", "split"])
def test_attn1_and_split_train_only_their_parameters(model, family):
    kw = {"units": 4, "kv_blocks": ("up.1.1",)} if family == "split" else {}
    spec = PlantSpec(family, blocks=("up.0.1",), steps=2, batch=4, lr=1e-2, **kw)
    masks, units = trainable_masks(model.pipeline.unet, spec)
    record, _, changed = _plant(model, spec)
    assert changed == set(masks) == set(record.parameters) and record.frozen_identical
    up01, up11 = "up_blocks.0.attentions.1.transformer_blocks.0", "up_blocks.1.attentions.1.transformer_blocks.0"
    if family == "attn1":
        assert set(masks) == {f"{up01}.attn1.{p}" for p in ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias")}
    else:
        assert {n for n in masks if ".attn2." in n} == {f"{up11}.attn2.to_k.weight", f"{up11}.attn2.to_v.weight"}
        assert record.kv_blocks == ["up.1.1"] and list(record.units) == ["up.0.1"] and len(units["up.0.1"]) == 4
        parts = bp.planting_parts(record, model.pipeline.unet)
        assert [(p.name, p.sites) for p in parts] == [("up.0.1 units", ("up.0.1.ffn_hidden",)),
                                                      ("up.1.1 attn2_kv", ("up.1.1.attn2_k", "up.1.1.attn2_v"))]


def test_truth_json_round_trip_from_a_real_record(model):
    spec = PlantSpec("split", blocks=("up.0.1",), units=4, kv_blocks=("up.1.1",), steps=1, batch=4)
    record, _, _ = _plant(model, spec)
    p = bp.BenchPlanting("t", "ring", spec, "dev")
    parts = bp.planting_parts(record, model.pipeline.unet)
    shares = {"up.0.1 units": {"share": 0.6, "active": True}, "up.1.1 attn2_kv": {"share": 0.01, "active": False}}
    truth = bp.planting_truth(p, record, parts, shares)
    back = PlantingTruth.from_dict(json.loads(json.dumps(truth.to_dict())))
    assert back == truth and back.units == {"up.0.1.ffn_hidden": tuple(record.units["up.0.1"])}
    assert back.active == {"up.0.1.ffn_hidden": 0.6} and back.inactive == ("up.1.1.attn2_k", "up.1.1.attn2_v")
    low = PlantSpec("lowrank", blocks=("up.1.0",), rank=3, steps=1, batch=4)
    rec_low, _, _ = _plant(model, low)
    t_low = bp.planting_truth(bp.BenchPlanting("l", "ring", low, "test"), rec_low, bp.planting_parts(rec_low, model.pipeline.unet))
    back = PlantingTruth.from_dict(json.loads(json.dumps(t_low.to_dict())))
    assert back.sites == ("up.1.0.ffn_out",) and torch.allclose(back.subspaces["up.1.0.ffn_out"], t_low.subspaces["up.1.0.ffn_out"])


def test_overlay_load_refuses_a_wrong_base_hash(tmp_path, monkeypatch, model):
    (tmp_path / "conceptworld-bench").mkdir()
    monkeypatch.setenv(DATA_ENV, str(tmp_path))  # the override holds the bench folder, not the default model
    p = bp.PLANTINGS[0]
    spec = PlantSpec("ffn_units", blocks=("mid.0",), units=2, steps=1, batch=4)
    record, _, _ = _plant(model, spec)
    folder = bp.save_planting(p, model, record, None)
    assert folder == tmp_path / "conceptworld-bench" / p.name
    stored = json.loads((folder / bp.TRUTH).read_text())
    loaded, truth = bp.load_planting(p.name)  # the right base: loads, with the overlay in place
    assert truth.sites == ("mid.0.ffn_hidden",) and loaded.planted[-1]["parameters"] == record.parameters
    ours, theirs = dict(model.pipeline.unet.named_parameters()), dict(loaded.pipeline.unet.named_parameters())
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    stored["base_unet_sha256"] = "0" * 64
    (folder / bp.TRUTH).write_text(json.dumps(stored))
    with pytest.raises(ArtifactError, match="default UNet with sha256 0000"):
        bp.load_planting(p.name)
    with pytest.raises(ValueError, match="unknown benchmark planting"):
        bp.load_planting("nope")


def test_share_removed_known_answer():
    planted = torch.tensor([1] * 8 + [0] * 2, dtype=torch.bool)
    restored = torch.tensor([1] * 2 + [0] * 8, dtype=torch.bool)
    share, se = bp.share_removed(planted, restored)
    assert share == pytest.approx(0.75) and 0 < se < 0.3
    assert bp.share_removed(planted, planted) == (0.0, 0.0)
    with pytest.raises(ValueError, match="never draws"):
        bp.share_removed(torch.zeros(4, dtype=torch.bool), planted[:4])


def test_verify_with_a_fake_reader_gives_the_known_shares(model, monkeypatch):
    """A fake generator whose image i is lit while the planted weights of the block that carries
    prompt i are in place: the first block carries 24 of 40 prompts, the second 8, the third none."""
    spec = PlantSpec("attn1", blocks=("mid.0", "up.0.0", "up.0.1"), steps=1, batch=4, lr=1e-2)
    record, before, _ = _plant(model, spec)
    parts = bp.planting_parts(record, model.pipeline.unet)
    carries = {parts[0].parameters[0]: range(0, 24), parts[1].parameters[0]: range(24, 32)}

    def fake_generate(m, prompts, seeds, progress):
        params = dict(m.pipeline.unet.named_parameters())
        lit = torch.zeros(len(prompts))
        for name, rows in carries.items():
            if not torch.equal(params[name], before[name]):
                lit[list(rows)] = 1.0
        return lit[:, None, None, None].expand(-1, 3, 32, 32)

    monkeypatch.setattr(bp, "generate", fake_generate)
    reader = lambda images: images.mean(dim=(1, 2, 3)) > 0.5  # noqa: E731
    out = bp.verify(model, record, before, reader, [f"p{i}" for i in range(40)], list(range(40)), progress=False)
    assert out["drawn"] == pytest.approx(0.8)
    shares = [out["parts"][p.name] for p in parts]
    assert [s["share"] for s in shares] == pytest.approx([0.75, 0.25, 0.0])
    assert [s["active"] for s in shares] == [True, True, False]


def test_captured_variance_is_whole_at_the_first_step(model):
    spec = PlantSpec("lowrank", blocks=("up.1.0",), rank=1, steps=3, batch=4, lr=5e-2, seed=1)
    record, before, _ = _plant(model, spec, concept="orange")
    q = torch.tensor(record.bases["up.1.0"])
    touched = {n: before[n] for n in record.parameters}
    cv = bp.captured_variance(model, touched, f"{UP10}.ff", q, ["an orange circle"], ["a red circle"])
    assert cv["first_step"] > 0.999 and 0 < cv["pooled"] <= 1 + 1e-9 and cv["n_steps"] == 20


def test_bench_classifier_reads_every_value_also_through_the_vae():
    """The benchmark's classifier (`bench.classifier`) reads each value, new ones included, on
    clean renders and on VAE round trips (what generated images look like)."""
    from acterase_interp.bench.classifier import bench_dir, load_bench_classifier, per_value_accuracy
    from acterase_interp.world.factors import sample_scenes
    from acterase_interp.world.render import render_batch
    from acterase_interp.world.train import vae_roundtrip

    if not (bench_dir() / "classifier" / "classifier.safetensors").exists():
        pytest.skip("no benchmark classifier: train it with `python -m acterase_interp.bench.classifier`")
    classifier = load_bench_classifier()
    assert classifier.factors == FACTORS
    rng = np.random.default_rng(20_261_204)  # a seed that training never used
    scenes = sample_scenes(500, rng, FACTORS)
    clean = torch.from_numpy(render_batch(scenes, rng))
    assert min(per_value_accuracy(classifier, scenes, clean).values()) >= 0.97
    vae = load("conceptworld").pipeline.vae
    roundtrip = per_value_accuracy(classifier, scenes, vae_roundtrip(vae, clean))
    assert min(roundtrip.values()) >= 0.85, roundtrip


@pytest.mark.parametrize("p", bp.PLANTINGS, ids=lambda p: p.name)
def test_stored_planting_was_made_by_its_recipe(p):
    """The committed truth.json of each planting records exactly the recipe in `PLANTINGS`, so a
    recipe changed without planting again (or a planting stored under another name) is caught."""
    stored = json.loads((bp.bench_dir() / p.name / bp.TRUTH).read_text())
    spec = p.spec.to_dict()
    defaults = {f.name: f.default for f in dataclasses.fields(PlantSpec)}  # fields added after a planting was made
    assert {**{k: defaults[k] for k in spec}, **stored["record"]["spec"]} == spec
    assert stored["record"]["concept"] == stored["truth"]["concept"] == p.concept
    assert (stored["truth"]["name"], stored["truth"]["split"]) == (p.name, p.split)
    assert stored["record"]["data"]["fraction"] == pytest.approx(p.fraction)
