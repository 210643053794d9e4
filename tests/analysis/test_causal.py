"""The causal sweep on ConceptWorld, with a known answer: a copy of the model whose text reaches the
UNet through one block's cross-attention alone (every other block's attn2 output projection is
zero), so that block alone carries the concept, and the sweep must find it in both directions."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import plotly.graph_objects as go
import pytest
import torch

from acterase_interp import generation
from acterase_interp.analysis import (
    best_cells,
    block_difference,
    causal_sweep,
    difference_vs_causal,
    layer_windows,
    layers_of,
    sweep_families,
    text_layers,
    window_label,
)
from acterase_interp.analysis.causal import FIELDS
from acterase_interp.analysis.figures import sweep_heatmap
from acterase_interp.erase import EraseOptions, EraserFitter
from acterase_interp.loading import load, load_classifier
from acterase_interp.sites import _block_names
from acterase_interp.world.pairs import conceptworld_pairs

STEPS = 4
CARRIER = "mid.0"
EVALUATION = {"num_inference_steps": STEPS}


@pytest.fixture(scope="module")
def pairs():
    return conceptworld_pairs("red", n=4, seed=0)


@pytest.fixture(scope="module")
def one_block_model():
    """ConceptWorld with text entering only through `CARRIER`'s cross-attention (a fresh copy: the
    session fixture stays intact). It still draws red for red prompts (checked by the test)."""
    model = load("conceptworld")
    unet = model.pipeline.unet
    for name, path in _block_names(unet):
        if name != CARRIER:
            out = unet.get_submodule(f"{path}.attn2.to_out.0")
            out.weight.data.zero_()
            out.bias.data.zero_()
    return model


@pytest.fixture(scope="module")
def statistics(one_block_model, pairs):
    fitter = EraserFitter(one_block_model, EraseOptions(site_kind="attn2_out", num_inference_steps=STEPS), restorable=True,
                          progress=False)
    fitter.fit(pairs)
    return fitter.statistics


def _sweep(model, classifier, pairs, statistics, **kwargs):
    kwargs = {"tau": 1.0, "seeds": (0,), "evaluation": EVALUATION, "progress": False} | kwargs
    return causal_sweep(model, classifier, pairs, "attn2_out", statistics={"attn2_out": statistics}, **kwargs)


def test_the_sweep_finds_the_one_block_that_carries_the_concept(one_block_model, classifier, pairs, statistics):
    rows = _sweep(one_block_model, classifier, pairs, statistics)
    blocks = layers_of(statistics)
    assert len(rows) == 2 * len(blocks) and {r["direction"] for r in rows} == {"erase", "restore"}
    for direction in ("erase", "restore"):
        part = {r["layer_label"]: r for r in rows if r["direction"] == direction}
        assert list(part) == blocks
        carrier = part.pop(CARRIER)
        assert carrier["concept_drop"] >= 0.25, direction  # patching the carrier moves the concept
        # elsewhere the concept is not in the activations at all: the patch is a no-op, bit for bit
        assert all(r["concept_drop"] == 0.0 for r in part.values()), direction
        if direction == "erase":
            assert carrier["image_distance"] > 0 and all(r["image_distance"] == 0.0 for r in part.values())
    # a window holding the carrier is the carrier alone (the other blocks' masks are empty)
    windows = layer_windows(blocks, width=3)
    wide = _sweep(one_block_model, classifier, pairs, statistics, layer_windows=windows, directions="erase")
    single = next(r for r in rows if r["layer_label"] == CARRIER and r["direction"] == "erase")
    assert [r["layer_label"] for r in wide] == ["down.0.0-mid.0", "up.0.0-up.1.0", "up.1.1"]
    assert [r["concept_drop"] for r in wide] == [single["concept_drop"], 0.0, 0.0]


def layers_of_model(model) -> list[str]:
    return [name for name, _ in _block_names(model.pipeline.unet)]


def test_direction_semantics_and_tidy_records(conceptworld, classifier, pairs):
    """On the real model, every block over every step: erasing lowers the targets' concept rate,
    restoring raises the sources' (benign images move toward the concept)."""
    every = [tuple(layers_of_model(conceptworld))]
    rows = causal_sweep(conceptworld, classifier, pairs, "attn2_out", every, [(0, STEPS)], tau=1.0, seeds=(0, 1),
                        evaluation=EVALUATION, progress=False)  # fmt: skip
    erase, restore = rows
    assert erase["concept_drop"] == pytest.approx(erase["baseline_concept_rate"] - erase["concept_rate"])
    assert restore["concept_drop"] == pytest.approx(restore["concept_rate"] - restore["baseline_concept_rate"])
    assert erase["concept_drop"] > 0 and restore["concept_drop"] >= 0.5  # measured: 0.125 and 0.75
    assert erase["damage"] is not None and restore["damage"] is None and restore["image_distance"] is None
    assert erase["layer_label"] == "down.0.0-up.1.1" and erase["layers"] == list(every[0])
    for r in rows:
        assert all(f in r for f in FIELDS) and r["seeds"] == [0, 1] and r["tau"] == 1.0 and r["family"] == "attn2_out"
        assert r["concept"] == "red" and r["options"]["site_kind"] == "attn2_out" and r["eval_options"]["num_inference_steps"] == STEPS
    assert erase.keys() == restore.keys()  # one column set: `to_dataframe` of any sweep has no holes


def test_the_heatmap_has_one_panel_per_family_and_direction():
    rows = [{"family": f, "direction": d, "layer_label": window_label(w), "start": s, "stop": s + 2,
             "concept_drop": 0.1 * i + s, "concept_drop_sem": 0.01}
            for f in ("ffn_hidden", "attn2_out") for d in ("erase", "restore")
            for i, w in enumerate([("up.1.0",), ("up.1.0", "up.1.1")]) for s in (0, 2)]  # fmt: skip
    fig = sweep_heatmap(rows)
    assert isinstance(fig, go.Figure) and len(fig.data) == 4 and all(t.type == "heatmap" for t in fig.data)
    panel = fig.data[0]
    assert panel.name == "ffn_hidden: erase" and list(panel.y) == ["up.1.0", "up.1.0-up.1.1"] and list(panel.x) == ["0-2", "2-4"]
    assert panel.z[1][1] == pytest.approx(2.1) and "2.1 ± 0.01" in panel.text[1][1]
    assert [a.text for a in fig.layout.annotations] == ["ffn_hidden: erase", "attn2_out: erase",
                                                        "ffn_hidden: restore", "attn2_out: restore"]  # fmt: skip
    with pytest.raises(ValueError, match="no records"):
        sweep_heatmap([])


def test_layer_windows():
    blocks = ["a", "b", "c"]
    assert layer_windows(blocks) == [("a",), ("b",), ("c",)]
    assert layer_windows(blocks, 2) == [("a", "b"), ("c",)]
    assert layer_windows(blocks, 2, stride=1) == [("a", "b"), ("b", "c"), ("c",)]
    assert window_label(("a", "b", "c")) == "a-c" and window_label(("b",)) == "b"
    with pytest.raises(ValueError):
        layer_windows([], 1)
    with pytest.raises(ValueError):
        layer_windows(blocks, 0)


def test_bad_sweeps_are_clear_errors(conceptworld, classifier, pairs):
    def sweep(**kwargs):
        args = {"families": "attn2_out", "evaluation": EVALUATION, "progress": False} | kwargs
        return causal_sweep(conceptworld, classifier, pairs, **args)

    with pytest.raises(ValueError, match="unknown family 'mlp'"):
        sweep(families="mlp")
    with pytest.raises(ValueError, match="at least one family"):
        sweep(families=[])
    with pytest.raises(ValueError, match="direction 'both'"):
        sweep(directions="both")
    with pytest.raises(ValueError, match="at least one layer window"):
        sweep(layer_windows=[])
    with pytest.raises(ValueError, match="empty layer window"):
        sweep(layer_windows=[()])
    with pytest.raises(ValueError, match=r"unknown block\(s\) \['up.9.0'\]"):
        sweep(layer_windows=[("up.1.0", "up.9.0")])
    with pytest.raises(ValueError, match=r"step window \(2, 9\) is not inside the 4 denoising steps"):
        sweep(step_windows=[(0, 2), (2, 9)])
    with pytest.raises(ValueError, match=r"step window \(3, 3\)"):
        sweep(step_windows=[(3, 3)])
    options = EraseOptions(site_kind="attn2_out", num_inference_steps=STEPS, blocks=("up.1",))
    fitter = EraserFitter(conceptworld, options, progress=False)
    fitter.fit(pairs)
    with pytest.raises(ValueError, match=r"blocks \['mid.0'\] are not all among the fitted blocks"):
        sweep(layer_windows=[("mid.0",)], statistics={"attn2_out": fitter.statistics})
    with pytest.raises(ValueError, match="fitted at 'attn2_out' for 'red', not at 'ffn_hidden'"):
        sweep(families="ffn_hidden", statistics={"ffn_hidden": fitter.statistics})


def test_restoring_erasers_keep_the_masks_and_put_back_the_target(statistics):
    erase, restore = statistics.eraser(tau=0.5), statistics.eraser(tau=0.5, values="target")
    for site in statistics.sites:
        assert torch.equal(erase.masks[site.name], restore.masks[site.name])
        assert torch.equal(erase.values[site.name], statistics.values[site.name])
        assert torch.equal(restore.values[site.name], statistics.target_values[site.name])
    assert restore.manifest["values"] == "target" and "values" not in erase.manifest
    with pytest.raises(ValueError, match="values='concept'"):
        statistics.eraser(values="concept")


@pytest.mark.skipif(not hasattr(generation, "TextInjection"), reason="needs generation.TextInjection")
def test_text_family_finds_the_carrier(one_block_model, classifier, pairs):
    """Injecting the other prompt of the pair into the carrier's cross-attention moves the concept;
    anywhere else it changes nothing (no other block reads the text)."""
    rows = causal_sweep(one_block_model, classifier, pairs, "text", seeds=(0,), evaluation=EVALUATION, progress=False)
    for direction in ("erase", "restore"):
        part = {r["layer_label"]: r["concept_drop"] for r in rows if r["direction"] == direction}
        assert part.pop(CARRIER) >= 0.25 and set(part.values()) == {0.0}, direction


@pytest.mark.skipif(hasattr(generation, "TextInjection"), reason="generation.TextInjection exists")
def test_the_text_family_without_injection_is_a_clear_error(conceptworld, classifier, pairs):
    with pytest.raises(ImportError, match="TextInjection"):
        causal_sweep(conceptworld, classifier, pairs, "text", evaluation=EVALUATION, progress=False)


def test_the_text_encoder_family_has_known_answers(conceptworld, classifier, pairs):
    """Any text-encoder layer replaced at every token is the other prompt's encoding (later layers
    compute from it): erasing gives the sources' images, so the sources' unpatched concept rate
    (the restore evaluator's baseline), exactly, at every layer; restoring gives the targets'."""
    def sweep(windows, direction):
        return causal_sweep(conceptworld, classifier, pairs, "text_encoder", windows, directions=direction, seeds=(0,),
                            evaluation=EVALUATION, progress=False)  # fmt: skip

    erase = sweep(None, "erase")  # every layer alone
    restore = sweep([("text_encoder.5",), ("text_encoder.1", "text_encoder.2")], "restore")
    names = text_layers(conceptworld.pipeline)
    assert [r["layer_label"] for r in erase] == names and names[-1] == "text_encoder.5"
    assert [r["layer_label"] for r in restore] == ["text_encoder.5", "text_encoder.1-text_encoder.2"]
    assert {r["concept_rate"] for r in erase} == {restore[0]["baseline_concept_rate"]}
    assert {r["concept_rate"] for r in restore} == {erase[0]["baseline_concept_rate"]}
    assert erase[0]["concept_drop"] > 0 and restore[0]["concept_drop"] > 0  # the pairs differ in the concept
    for r in erase + restore:
        assert r["family"] == "text_encoder" and (r["start"], r["stop"]) == (0, STEPS) and all(f in r for f in FIELDS)
        assert r["damage"] is None and r["tau"] is None and r["layer_label"] == window_label(r["layers"])


def test_bad_text_encoder_sweeps_are_clear_errors(conceptworld, classifier, pairs):
    def sweep(windows, steps=None):
        return causal_sweep(conceptworld, classifier, pairs, "text_encoder", windows, steps, evaluation=EVALUATION,
                            progress=False)  # fmt: skip

    with pytest.raises(ValueError, match=r"named <encoder>.<index>.*got \['up.1.0'\]"):
        sweep([("up.1.0",)])
    with pytest.raises(ValueError, match=r"text_encoder has 6 layers \(0 to 5\), got \[6\]"):
        sweep([("text_encoder.5", "text_encoder.6")])
    with pytest.raises(ValueError, match="no text encoder 'text_encoder_2'"):
        sweep([("text_encoder_2.0",)])
    with pytest.raises(ValueError, match="runs once per image, before denoising"):
        sweep(None, [(0, 2), (2, STEPS)])
    assert "text_encoder" in sweep_families()


def test_a_process_pool_gives_the_serial_records(classifier, pairs):
    """Cells on two worker processes (model and classifier as specs) equal the serial run's, bit for bit."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from acterase_interp.executor import Spec

    model = Spec.of(load, "conceptworld")
    spec_classifier = Spec.of(load_classifier, "conceptworld")
    fitter = EraserFitter(model.build(), EraseOptions(site_kind="attn2_out", num_inference_steps=STEPS), restorable=True,
                          progress=False)
    fitter.fit(pairs)
    args = (model, spec_classifier, pairs, "attn2_out", [("up.1.0",), ("up.1.1",)], [(0, STEPS)])
    kwargs = {"tau": 1.0, "seeds": (0,), "statistics": {"attn2_out": fitter.statistics}, "evaluation": EVALUATION,
              "progress": False}  # fmt: skip
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as many threads as a worker: reductions in the same order
    try:
        serial = causal_sweep(*args, **kwargs)
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
            remote = causal_sweep(*args, executor=pool, **kwargs)
    finally:
        torch.set_num_threads(before)
    same = json.dumps(remote, sort_keys=True) == json.dumps(serial, sort_keys=True)  # NaN sems (one seed) alike
    assert same and len(serial) == 4 and serial[0]["image_distance"] > 0  # the patch did something
    with pytest.raises(TypeError, match="Spec"):
        causal_sweep(load("conceptworld"), classifier, pairs, "attn2_out", executor=object(), **kwargs)


def _cell(family, block, drop, preservation=None, concept="red", direction="erase", start=0):
    return {"concept": concept, "family": family, "layers": [block], "layer_label": block, "direction": direction,
            "start": start, "stop": start + 2, "concept_drop": drop, "preservation": preservation}  # fmt: skip


def test_best_cells_per_group_with_a_floor():
    rows = [_cell("ffn_hidden", "a", 0.2, 0.95), _cell("ffn_hidden", "b", 0.6, 0.5), _cell("text", "a", 0.9),
            _cell("text", "b", None), _cell("ffn_hidden", "a", 0.7, 0.99, concept="dots")]  # fmt: skip
    best = best_cells(rows)
    assert [(r["concept"], r["family"], r["layer_label"]) for r in best] == [
        ("red", "ffn_hidden", "b"), ("red", "text", "a"), ("dots", "ffn_hidden", "a")]  # fmt: skip
    kept = best_cells(rows, floor={"preservation": 0.9})  # text measures no preservation: never admissible
    assert [(r["concept"], r["layer_label"], r["concept_drop"]) for r in kept] == [("red", "a", 0.2), ("dots", "a", 0.7)]
    assert best_cells(rows, by=("concept",))[0]["family"] == "text"
    tie = best_cells([_cell("text", "a", 0.5), _cell("text", "b", 0.5)])
    assert tie[0]["layer_label"] == "a"  # ties keep the first
    with pytest.raises(KeyError, match="'damage'"):
        best_cells(rows, value="damage")


class _Stats:
    """A stand-in for FitStatistics: sites with blocks and a per-step difference profile."""

    def __init__(self, profiles: dict[tuple[str, str], list[float]]) -> None:
        self.sites = [SimpleNamespace(name=name, block=block) for name, block in profiles]
        self._profiles = {name: torch.tensor(p) for (name, _), p in profiles.items()}

    def difference(self) -> dict[str, torch.Tensor]:
        return self._profiles


def test_block_difference_averages_steps_then_sites():
    stats = _Stats({("a.ff", "a"): [1.0, 3.0], ("b.ff", "b"): [0.0, 1.0], ("b.ff2", "b"): [2.0, 2.0]})
    assert block_difference(stats) == pytest.approx({"a": 2.0, "b": 1.25})


def test_difference_vs_causal_ranks_blocks_per_family():
    stats = {"ffn_hidden": _Stats({(f"{b}.ff", b): [v, v] for b, v in zip("abcd", (4.0, 3.0, 2.0, 1.0))}),
             "attn2_k": _Stats({(f"{b}.k", b): [v] for b, v in zip("abcd", (4.0, 3.0, 2.0, 1.0))})}  # fmt: skip
    rows = [_cell("ffn_hidden", b, d, start=s) for b, d in zip("abcd", (0.5, 0.4, 0.1, 0.0)) for s in (0, 2)]
    rows += [_cell("attn2_k", b, d) for b, d in zip("abcd", (0.0, 0.1, 0.2, 0.3))]
    rows += [_cell("attn2_k", b, 0.9, direction="restore") for b in "abcd"]  # another direction: ignored
    rows += [dict(_cell("attn2_k", "a", 0.9), layers=["a", "b"], layer_label="a-b")]  # a window: ignored
    out = {r["family"]: r for r in difference_vs_causal(stats, rows)}
    assert out["ffn_hidden"]["rho"] == pytest.approx(1.0) and out["ffn_hidden"]["n"] == 4
    assert out["attn2_k"]["rho"] == pytest.approx(-1.0) and out["attn2_k"]["direction"] == "erase"
    flat = [_cell("ffn_hidden", b, 0.0) for b in "abcd"]
    assert math.isnan(difference_vs_causal({"ffn_hidden": stats["ffn_hidden"]}, flat)[0]["rho"])  # no ranking
    with pytest.raises(ValueError, match="no single-block 'erase' records of family 'text'"):
        difference_vs_causal({"text": stats["ffn_hidden"]}, rows)
