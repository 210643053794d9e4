"""Analyses of stored fit statistics, with known answers: hand-made `FitStatistics` (no model run)
and stub evaluators stand in for ConceptWorld."""

import pytest
import torch

from acterase_interp.analysis import (
    SubspacePatch,
    best_tau,
    causal_map,
    concept_iou,
    concept_masks,
    difference_map,
    difference_spectrum,
    eraser_measure,
    layers_of,
    mask_density_curve,
    masks_iou,
    multi_concept_scaling,
    pair_iou,
    pair_masks,
    planted_dimension,
    site_profile,
    spatial_map,
    step_iou,
    step_masks,
    tau_sweep,
    unit_masks,
)
from acterase_interp.analysis.localization import LayerMeasure
from acterase_interp.erase import EraseOptions, Eraser, FitStatistics, PromptPairs
from acterase_interp.sites import Site

PAIRS, STEPS, TOKENS, UNITS = 2, 3, 4, 100
BLOCKS = ("down.0.0", "mid.0")


def _sites() -> tuple[Site, ...]:
    return tuple(Site(f"{b}.ffn_hidden", "ffn_hidden", b, f"{b}.ff.net.2", "input", f"{b}.ff.net.2", (TOKENS, UNITS))
                 for b in BLOCKS)  # fmt: skip


def _stats(concept: str = "red", concept_block: str = "mid.0", hot_token: int = 1, seed: int = 0) -> FitStatistics:
    """Source importance of unit j is j (the same at every pair, step and token); the target
    exceeds the source only in `concept_block`, only at `hot_token`, only at step 1."""
    sites = _sites()
    source = torch.arange(UNITS, dtype=torch.float32).expand(PAIRS, STEPS, TOKENS, UNITS).clone()
    target = source.clone() - 0.5  # below the source: masks stay empty
    token_s, token_t = {}, {}
    for s in sites:
        t = target.clone()
        if s.block == concept_block:
            t[:, 1, hot_token] = source[:, 1, hot_token] * 3 + 3
        token_s[s.name], token_t[s.name] = source.clone(), t
    g = torch.Generator().manual_seed(seed)
    direction = torch.zeros(UNITS)
    direction[:3] = torch.tensor([3.0, 2.0, 1.0])
    return FitStatistics(
        sites=sites,
        options=EraseOptions(granularity="token_unit", seed=seed),
        pairs=PromptPairs(concept, ("a red circle",) * PAIRS, ("a blue circle",) * PAIRS),
        seeds=tuple(range(seed, seed + PAIRS)),
        importance_source={n: v.mean(2) for n, v in token_s.items()},
        importance_target={n: v.mean(2) for n, v in token_t.items()},
        token_importance_source=token_s,
        token_importance_target=token_t,
        values={s.name: torch.full((1, TOKENS, UNITS), 2.0) for s in sites},
        mean_source={s.name: torch.zeros(PAIRS, UNITS) for s in sites},
        mean_target={s.name: torch.stack([direction * (i + 1) + 1e-4 * torch.randn(UNITS, generator=g)
                                          for i in range(PAIRS)]) for s in sites},  # fmt: skip
        architecture_hash="test",
        num_inference_steps=STEPS,
        guidance_scale=3.0,
        height=32,
        width=32,
        timesteps=(900.0, 500.0, 100.0),
        scheduler="DPMSolverMultistepScheduler",
        versions={},
    )


def test_mask_density_curve_of_known_scores():
    rows = mask_density_curve(_stats(), [0.05, 0.1, 0.5], granularity="unit")
    density = {(r["tau"], r["layer"]): r["density"] for r in rows}
    # in mid.0 the token-averaged target beats the source on every unit: the mask is the top-tau share
    assert density[(0.05, "mid.0")] == pytest.approx(0.05)
    assert density[(0.1, "mid.0")] == pytest.approx(0.10)
    assert density[(0.5, "mid.0")] == pytest.approx(0.50)
    assert density[(0.1, "down.0.0")] == 0.0  # the target never exceeds the source there
    assert all(r["concept"] == "red" and r["fit_seeds"] == [0, 1] and r["granularity"] == "unit" for r in rows)


def test_pair_step_and_concept_iou():
    stats = _stats()
    pairs = masks_iou(pair_masks(stats, 0.1, granularity="unit"))
    assert {r["iou"] for r in pairs if r["site"] == "mid.0.ffn_hidden"} == {1.0}  # both pairs alike
    steps = step_masks(stats, 0.1, granularity="unit")
    assert int(steps["step 1"]["mid.0.ffn_hidden"].sum()) == 10 and int(steps["step 0"]["mid.0.ffn_hidden"].sum()) == 0
    rows = step_iou(stats, 0.1, granularity="unit")
    assert all(r["tau"] == 0.1 and r["fit_seeds"] == [0, 1] for r in rows)
    assert {r["iou"] for r in rows if r["site"] == "mid.0.ffn_hidden" and {r["a"], r["b"]} == {"step 1"}} == {1.0}
    assert [r["iou"] for r in pair_iou(stats, 0.1, granularity="unit") if r["site"] == "all"] == [1.0] * 4
    a, b = stats.eraser(0.1, granularity="unit"), stats.eraser(0.2, granularity="unit")
    assert masks_iou(concept_masks({"a": a, "b": b})) == [
        {k: v for k, v in r.items() if not k.startswith("seeds")} for r in concept_iou({"a": a, "b": b})
    ]
    cell = {(r["a"], r["b"], r["site"]): r["iou"] for r in concept_iou({"a": a, "b": b})}
    assert cell[("a", "b", "mid.0.ffn_hidden")] == pytest.approx(10 / 20)  # top 10% inside top 20%
    assert cell[("a", "b", "all")] == pytest.approx(10 / 20)


def test_difference_map_spatial_map_and_profile():
    stats = _stats(concept_block="mid.0", hot_token=1)
    rows = difference_map(stats)
    hot = [r for r in rows if r["value"] > 0.05]  # elsewhere only the 0.5 offset: ~0.01
    assert {(r["layer"], r["step"]) for r in hot} == {("mid.0", 1)}
    assert all(r["timestep"] == (900.0, 500.0, 100.0)[r["step"]] for r in rows)
    grid = spatial_map(stats, "mid.0.ffn_hidden")
    assert grid.shape == (2, 2) and grid.flatten().argmax().item() == 1  # token 1: row 0, column 1
    profile = site_profile({"red": stats, "square": _stats("square", concept_block="down.0.0")})
    top = {c: max((r for r in profile if r["concept"] == c), key=lambda r: r["share"])["layer"] for c in ("red", "square")}
    assert top == {"red": "mid.0", "square": "down.0.0"}
    assert {r["factor"] for r in profile} == {"color", "shape"}
    assert layers_of(stats) == list(BLOCKS)


def test_difference_spectrum_and_subspace_patch_from_statistics():
    stats = _stats()
    _, ranks = difference_spectrum(stats)
    assert [r["n_components"] for r in ranks] == [1, 1]  # both pairs differ along one direction
    patch = SubspacePatch.from_statistics(stats, k=1, blocks=("mid",))
    assert [s.name for s in patch.sites] == ["mid.0.ffn_hidden"]
    assert patch.means["mid.0.ffn_hidden"].shape == (TOKENS, UNITS)
    basis = patch.bases["mid.0.ffn_hidden"][:, 0].abs()
    assert basis[:3] == pytest.approx(torch.tensor([3.0, 2.0, 1.0]) / 14**0.5, abs=1e-3)


class StubEvaluator:
    """Scores an eraser without a model: the concept is carried by mid.0 at step 1 only; the
    concept rate drops to 0 when an eraser covering mid.0 is on at step 1, and preservation falls
    with the mask density."""

    def __call__(self, eraser, seed=0, steps=None, **meta):
        on_step = steps is None or steps[0] <= 1 < steps[1]
        hit = any(s.block == "mid.0" for s in eraser.sites) and on_step
        density = sum(eraser.mask_density().values()) / len(eraser.sites)
        rate = 0.0 if hit and density > 0 else 0.9
        return {"seed": seed, "concept_rate": rate, "concept_drop": 0.9 - rate, "preservation": 1 - density,
                "image_distance": density, **meta}  # fmt: skip


def test_causal_map_wired_to_statistics_finds_the_concept_layer():
    stats = _stats()
    rows = causal_map(eraser_measure(stats, StubEvaluator(), tau=0.1, seeds=(0, 1, 2)), layers_of(stats),
                      [(0, 1), (1, 2), (2, 3)], progress=False)  # fmt: skip
    drop = {(r["layer"], r["start"]): r["concept_drop"] for r in rows}
    assert drop == {(b, s): 0.9 if (b, s) == ("mid.0", 1) else 0.0 for b in BLOCKS for s in range(3)}
    assert all(r["seeds"] == [0, 1, 2] and "damage" in r for r in rows)


def test_a_sweep_cell_carries_one_layer_s_eraser_not_the_statistics():
    import pickle

    stats = _stats()
    measure = eraser_measure(stats, StubEvaluator(), tau=0.1, seeds=(0, 1))
    at = measure.at("mid.0")
    assert [s.block for s in at.eraser.sites] == ["mid.0"]
    assert at("mid.0", (1, 2)) == measure("mid.0", (1, 2))
    assert len(pickle.dumps(at)) < len(pickle.dumps(measure)) / 2  # the statistics stay in the parent
    with pytest.raises(ValueError, match="patches \\['mid.0'\\], not \\['down.0.0'\\]"):
        at("down.0.0", (1, 2))


class _Inline:
    """An executor that runs each cell at once and keeps what it was sent (what would be pickled)."""

    def __init__(self):
        self.sent = []

    def submit(self, fn, *args):
        from concurrent.futures import Future

        self.sent.append(args)
        future = Future()
        future.set_result(fn(*args))
        return future


class _TravellingStub(StubEvaluator):
    def require_specs(self):
        pass


def test_sweep_cells_for_workers_carry_erasers_built_here_with_the_serial_rows():
    stats, evaluator, inline = _stats(), _TravellingStub(), _Inline()
    serial = tau_sweep({0: stats}, evaluator, [0.05, 0.6], progress=False)
    assert tau_sweep({0: stats}, evaluator, [0.05, 0.6], executor=inline, progress=False) == serial
    measure = eraser_measure(stats, evaluator, tau=0.1, seeds=(0, 1))
    serial = causal_map(measure, layers_of(stats), [(1, 2)], progress=False)
    assert causal_map(measure, layers_of(stats), [(1, 2)], executor=inline, progress=False) == serial
    sent = [a for args in inline.sent for a in args]
    assert not any(isinstance(a, FitStatistics) for a in sent)
    assert any(isinstance(a, Eraser) for a in sent) and any(isinstance(a, LayerMeasure) for a in sent)


def test_planted_dimension_sets_each_estimate_beside_the_truth():
    stats = _stats()  # the difference vectors point along units 0, 1, 2 (energies 9, 4, 1) at every site
    sparse = {"spec": {"family": "ffn_units"}, "blocks": ["mid.0"], "units": {"mid.0": [0, 5]}}
    rows = {r["block"]: r for r in planted_dimension(stats, sparse, tau=0.1)}
    assert rows["mid.0"]["planted_units"] == 2 and rows["mid.0"]["planted_share"] == 2 / UNITS
    assert rows["mid.0"]["top_unit_recall"] == 0.5  # the top two by energy are units 0 and 1
    assert rows["down.0.0"]["planted_units"] == 0 and rows["down.0.0"]["top_unit_recall"] is None
    assert all(r["n_components"] == 1 for r in rows.values())  # one direction: one component
    masks = unit_masks(stats.eraser(tau=0.1))
    units_on = {s.block: masks[s.name].float().mean().item() for s in stats.sites}
    assert [rows[b]["mask_density"] for b in BLOCKS] == [units_on[b] for b in BLOCKS] and units_on["mid.0"] > 0
    dense = {r["block"]: r for r in planted_dimension(stats, {"spec": {"family": "ffn"}, "blocks": ["mid.0"], "units": {}}, 0.1)}
    assert dense["mid.0"]["planted_units"] == "all" and dense["down.0.0"]["planted_share"] == 0.0
    natural = planted_dimension(stats, None, 0.1)
    assert all(r["planted_units"] is None and r["planted_family"] is None for r in natural)


def test_tau_sweep_and_best_tau():
    fits = {s: _stats(seed=s) for s in (0, 1, 2)}
    rows = tau_sweep(fits, StubEvaluator(), [0.05, 0.2, 0.6], progress=False, granularity="unit")
    assert len(rows) == 9 and {r["seed"] for r in rows} == {0, 1, 2}
    assert all(r["granularity"] == "unit" for r in rows)
    density = {r["tau"]: r["mask_density"] for r in rows}
    assert density[0.05] < density[0.2] < density[0.6]
    # every tau erases (rate 0); the smallest mask preserves most
    assert best_tau(rows) == {(): 0.05}
    with pytest.raises(ValueError, match="seeds"):
        tau_sweep(fits, StubEvaluator(), [0.1], seeds=[5], progress=False)


def test_multi_concept_scaling_merges_erasers():
    stats = {c: {0: _stats(c, concept_block=b)} for c, b in (("red", "mid.0"), ("square", "down.0.0"))}
    stub = StubEvaluator()
    rows = multi_concept_scaling(stats, {"red": stub, "square": stub}, stub, counts=(1, 2), tau=0.1, progress=False)
    assert [r["n_concepts"] for r in rows] == [1, 2] and rows[1]["concepts"] == ["red", "square"]
    # merging adds the second concept's units: preservation (1 - density) drops
    assert rows[1]["preservation"] < rows[0]["preservation"]
    with pytest.raises(ValueError, match="counts"):
        multi_concept_scaling(stats, {"red": stub, "square": stub}, stub, counts=(3,), progress=False)
