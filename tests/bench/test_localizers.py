"""Localizers on synthetic fit statistics whose planted units and subspace are known."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import acterase_interp.bench.localizers as localizers
from acterase_interp.bench.localizers import (
    ActEraseMask,
    CausalAblation,
    DifferenceDirections,
    ImportanceDifference,
    LateDifference,
    LocalizationContext,
    Wanda,
    ZScore,
    difference_directions,
    localizer,
    top_units,
    unit_eraser,
)
from acterase_interp.bench.metrics import principal_angles, unit_auroc
from acterase_interp.erase import EraseOptions, FitStatistics, PromptPairs
from acterase_interp.sites import Site

PAIRS, STEPS, TOKENS, UNITS = 6, 3, 4, 16
PLANTED = {"b0.ffn_hidden": (2, 5), "b1.ffn_hidden": (7,)}


def _site(block: str, kind: str) -> Site:
    reader = f"{block}.ff.net.2" if kind == "ffn_hidden" else None
    return Site(f"{block}.{kind}", kind, block, f"{block}.ff", "input", reader, (TOKENS, UNITS))


def synthetic_fit(basis: torch.Tensor | None = None) -> FitStatistics:
    """Two blocks x two kinds; the target raises the PLANTED units (importance, means, RMS) and,
    with `basis` (UNITS, r), moves `b0.ffn_out`'s per-pair means only inside span(basis)."""
    g = torch.Generator().manual_seed(0)
    sites = tuple(_site(b, k) for b in ("b0", "b1") for k in ("ffn_hidden", "ffn_out"))
    fields = {k: {} for k in ("I_s", "I_t", "m_s", "m_t", "q_s", "q_t", "v")}
    for s in sites:
        source = torch.rand(PAIRS, STEPS, UNITS, generator=g) + 1
        lift = torch.zeros(UNITS)
        lift[list(PLANTED.get(s.name, ()))] = 3.0
        fields["I_s"][s.name], fields["I_t"][s.name] = source, source + lift + 0.1 * torch.rand(PAIRS, STEPS, UNITS, generator=g)
        m_s = torch.randn(PAIRS, UNITS, generator=g)
        if basis is not None and s.name == "b0.ffn_out":
            m_t = m_s + torch.randn(PAIRS, basis.shape[1], generator=g) @ basis.T
        else:
            m_t = m_s + lift + 0.05 * torch.randn(PAIRS, UNITS, generator=g)
        fields["m_s"][s.name], fields["m_t"][s.name] = m_s, m_t
        fields["q_s"][s.name], fields["q_t"][s.name] = m_s**2 + 1, m_t**2 + 1
        fields["v"][s.name] = torch.randn(1, TOKENS, UNITS, generator=g)
    return FitStatistics(
        sites=sites, options=EraseOptions(site_kind=("ffn_hidden", "ffn_out")),
        pairs=PromptPairs("heart", tuple(f"t{i}" for i in range(PAIRS)), tuple(f"s{i}" for i in range(PAIRS))),
        seeds=tuple(range(PAIRS)), importance_source=fields["I_s"], importance_target=fields["I_t"],
        token_importance_source={}, token_importance_target={}, values=fields["v"], mean_source=fields["m_s"],
        mean_target=fields["m_t"], architecture_hash="synthetic", num_inference_steps=STEPS, guidance_scale=3.0,
        height=8, width=8, timesteps=tuple(float(t) for t in range(STEPS, 0, -1)), scheduler="none", versions={},
        square_mean_source=fields["q_s"], square_mean_target=fields["q_t"],
    )  # fmt: skip


class _Readers(nn.Module):
    """A stand-in UNet holding the Linears that read the ffn_hidden sites (all weights 1 but one column)."""

    def __init__(self) -> None:
        super().__init__()
        for b in ("b0", "b1"):
            ff = nn.Module()
            ff.net = nn.ModuleList([nn.Identity(), nn.Identity(), nn.Linear(UNITS, 3, bias=False)])
            nn.init.ones_(ff.net[2].weight)
            self.add_module(b, nn.Module())
            getattr(self, b).ff = ff
        with torch.no_grad():
            self.b0.ff.net[2].weight[:, 0] = 100.0  # a unit read strongly, but not raised by the concept


def context(fit: FitStatistics) -> LocalizationContext:
    model = SimpleNamespace(pipeline=SimpleNamespace(unet=_Readers()))
    return LocalizationContext(model, None, "heart", fit.pairs, {"ffn_hidden": fit, "ffn_out": fit}, progress=False)


def _auroc(scores: dict) -> float:
    names = ["b0.ffn_hidden", "b1.ffn_hidden"]
    flat = torch.cat([scores[n] for n in names])
    labels = torch.tensor([u in PLANTED[n] for n in names for u in range(UNITS)])
    return unit_auroc(flat, labels)


@pytest.mark.parametrize("cls", [ImportanceDifference, LateDifference, ZScore, Wanda, DifferenceDirections])
def test_statistics_localizers_rank_the_planted_units_first(cls):
    """(Not ActEraseMask: Eq. 5 picks rising units by *source* importance, which the planted units
    here do not lead; its own test below checks it by hand.)"""
    scores = cls().scores(context(synthetic_fit()))
    assert set(scores) == {"b0.ffn_hidden", "b0.ffn_out", "b1.ffn_hidden", "b1.ffn_out"}
    assert all(s.shape == (UNITS,) for s in scores.values())
    assert _auroc(scores) == 1.0


def test_acterase_mask_score_is_the_share_of_taus_masking_a_unit():
    fit = synthetic_fit()
    name = "b0.ffn_hidden"
    fit.importance_source[name] = torch.tensor([4.0, 3, 2, 1]).repeat(PAIRS, STEPS, 1)
    fit.importance_target[name] = torch.tensor([5.0, 1, 3, 0]).repeat(PAIRS, STEPS, 1)  # units 0 and 2 rise
    loc = ActEraseMask(taus=(0.25, 0.5, 0.75, 1.0))
    # tau 0.25: top-1 {0}; 0.5: top-2 {0, 1}, rising {0}; 0.75 and 1: {0, 2}
    assert loc.masks(context(fit), 0.5)[name].tolist() == [True, False, False, False]
    assert loc.scores(context(fit))[name].tolist() == [1.0, 0.0, 0.5, 0.0]


def test_late_difference_reads_only_the_last_steps():
    fit = synthetic_fit()
    name = "b0.ffn_hidden"
    fit.importance_source[name] = torch.zeros(PAIRS, STEPS, UNITS)
    fit.importance_target[name] = torch.zeros(PAIRS, STEPS, UNITS)
    fit.importance_target[name][:, 0, 3] = 9.0  # unit 3 rises at the first step only
    fit.importance_target[name][:, 1:, 4] = 1.0  # unit 4 rises at the last two
    fit.importance_source[name][:, 1:, 5] = 2.0  # unit 5 falls there
    late = LateDifference(last_steps=2).scores(context(fit))[name]
    assert late[3] == 0 and late[4] == 1.0 and late[5] == 2.0
    assert LateDifference(last_steps=2, absolute=False).scores(context(fit))[name][5] == -2.0
    every = LateDifference(last_steps=STEPS + 5, absolute=False).scores(context(fit))[name]  # k past the fit's steps: all
    torch.testing.assert_close(every, ImportanceDifference().scores(context(fit))[name])
    with pytest.raises(ValueError, match="last_steps"):
        LateDifference(last_steps=0)


def test_wanda_by_hand():
    fit = synthetic_fit()
    scores = Wanda().scores(context(fit))
    name = "b0.ffn_hidden"
    rise = (fit.square_mean_target[name].sqrt() - fit.square_mean_source[name].sqrt()).mean(0)
    weight = torch.full((UNITS,), 3.0)
    weight[0] = 300.0  # column sums of |W|
    torch.testing.assert_close(scores[name], rise * weight)
    rms = (fit.square_mean_target["b0.ffn_out"].sqrt() - fit.square_mean_source["b0.ffn_out"].sqrt()).mean(0)
    torch.testing.assert_close(scores["b0.ffn_out"], rms)  # no Linear reads ffn_out: weight factor 1


def test_difference_directions_recover_a_planted_subspace_exactly():
    basis, _ = torch.linalg.qr(torch.randn(UNITS, 3, generator=torch.Generator().manual_seed(1)))
    ctx = context(synthetic_fit(basis))
    found = DifferenceDirections().directions(ctx, "b0.ffn_out", 3)
    assert max(principal_angles(basis, found)) < 1e-3
    # unit-scoring localizers give coordinate directions: the planted units at an ffn_hidden site
    coords = ZScore().directions(ctx, "b0.ffn_hidden", 2)
    assert sorted(coords.argmax(0).tolist()) == [2, 5]


def test_difference_direction_scores_are_loading_norms():
    d = torch.tensor([[3.0, 0.0, 0.0], [3.0, 0.0, 0.0]])  # one direction, e_0, singular value sqrt(18)
    basis, scores = difference_directions(d, rank=1)
    assert basis.abs().flatten().tolist() == [1.0, 0.0, 0.0]
    torch.testing.assert_close(scores, torch.tensor([18**0.5, 0.0, 0.0]))


def test_top_units_and_unit_eraser():
    ctx = context(synthetic_fit())
    scores = {"b0.ffn_hidden": torch.arange(UNITS, dtype=torch.float), "b0.ffn_out": torch.zeros(UNITS),
              "b1.ffn_hidden": torch.zeros(UNITS), "b1.ffn_out": torch.zeros(UNITS)}  # fmt: skip
    assert top_units(scores, 2) == {"b0.ffn_hidden": [15, 14]}
    eraser = unit_eraser(ctx, {"b0.ffn_hidden": [1, 3]})
    x = torch.randn(2, TOKENS, UNITS)
    y = eraser("b0.ffn_hidden", x)
    value = ctx.fit_of("b0.ffn_hidden").values["b0.ffn_hidden"][0]
    torch.testing.assert_close(y[:, :, [1, 3]], value[:, [1, 3]].expand(2, -1, -1))
    keep = [u for u in range(UNITS) if u not in (1, 3)]
    torch.testing.assert_close(y[:, :, keep], x[:, :, keep])
    with pytest.raises(ValueError, match="no units"):
        unit_eraser(ctx, {})


def test_causal_ablation_scores_candidates_by_their_drop(monkeypatch):
    """With a fake model (the concept probability falls by 0.1 per planted unit ablated), the
    candidates get their drop and every other unit ranks below them in the cheap order."""

    def fake(context, patch, seed):
        if patch is None:
            return 0.9
        (site, units), = patch.manifest["units"].items()
        return 0.9 - 0.1 * sum(u in PLANTED.get(site, ()) for u in units)

    monkeypatch.setattr(localizers, "concept_probability", fake)
    scores = CausalAblation(candidates=5).scores(context(synthetic_fit()))
    chosen = top_units(ZScore().scores(context(synthetic_fit())), 5)
    planted = [(s, u) for s, us in PLANTED.items() for u in us]
    for s, us in chosen.items():
        for u in us:
            assert scores[s][u].item() == pytest.approx(0.1 if (s, u) in planted else 0.0)
    others = [scores[s][u].item() for s in scores for u in range(UNITS) if u not in chosen.get(s, [])]
    assert max(others) < -1.0 and _auroc(scores) == 1.0


def test_unknown_localizer_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown localizer"):
        localizer("nope")


# -- the leaderboard ---------------------------------------------------------------------------

from acterase_interp.bench import leaderboard as board  # noqa: E402
from acterase_interp.bench.truth import PlantingTruth  # noqa: E402

TRUTH = PlantingTruth("p1", "heart", "ffn_units", "test", ("up.0.0.ffn_hidden",), {"up.0.0.ffn_hidden": (1, 2)})


def test_rows_say_whether_each_goal_is_met():
    assert board._row("zscore", TRUTH, "unit_auroc", 0.995).met is True
    assert board._row("zscore", TRUTH, "principal_angle", 20.0).met is False
    assert board._row("zscore", TRUTH, "sites_first", 1.0).met is True
    row = board._row("zscore", TRUTH, "average_precision", 0.5)
    assert (row.goal, row.met, row.split, row.family) == (None, None, "test", "ffn_units")


def test_markdown_table_and_heatmap():
    dev = PlantingTruth("p0", "moon", "ffn", "dev", ("up.0.0.ffn_out",))
    rows = [vars(board._row("zscore", TRUTH, "unit_auroc", 0.5)), vars(board._row("wanda", TRUTH, "unit_auroc", 1.0)),
            vars(board._row("zscore", dev, "site_auc", 0.75))]  # fmt: skip
    text = board.markdown_table(rows)
    dev_part, test_part = text.split("## test half")
    assert "| p0 | ffn | zscore | n/a | n/a | n/a | 0.750 |" in dev_part and "p1" not in dev_part
    assert "| p1 | ffn_units | zscore | 0.500 not met |" in test_part and "| p1 | ffn_units | wanda | 1.000 met |" in test_part
    fig = board.heatmap(rows, "unit_auroc", split="test")
    assert list(fig.data[0].y) == ["zscore", "wanda"] and [row[0] for row in fig.data[0].z] == [0.5, 1.0]
    with pytest.raises(ValueError, match="no rows"):
        board.heatmap(rows, "iou_at_k")


def test_default_truth_from_the_planted_record(conceptworld):
    truth = board.default_truth(conceptworld, "heart")
    assert truth.sites == ("up.0.0.ffn_hidden", "up.0.1.ffn_hidden") and truth.split == "test"
    assert {s: len(u) for s, u in truth.units.items()} == {"up.0.0.ffn_hidden": 32, "up.0.1.ffn_hidden": 32}
    assert board.default_truth(conceptworld, "cyan").sites[:2] == ("up.1.0.attn2_k", "up.1.0.attn2_v")
    with pytest.raises(ValueError, match="no planted"):
        board.default_truth(conceptworld, "ring")


@pytest.mark.slow
def test_leaderboard_end_to_end_and_resumes(tmp_path):
    options = board.BenchOptions(n_pairs=2, num_inference_steps=4, faithfulness_grid=(0, 8),
                                 localizers=("zscore", "difference_directions"))  # fmt: skip
    result = board.run_leaderboard(["default:heart"], options, tmp_path, progress=False)
    metrics = {(r["localizer"], r["metric"]) for r in result["rows"]}
    for loc in options.localizers:
        for m in ("unit_auroc", "average_precision", "iou_at_k", "site_auc", "sites_first", "faithfulness_removed_auc"):
            assert (loc, m) in metrics
    assert (tmp_path / "table.md").read_text().count("default:heart") == 2
    manifest = result["manifest"]
    assert manifest["plantings"]["default:heart"]["weights_sha256"] and manifest["options"]["n_pairs"] == 2
    cell = tmp_path / "cells" / "default_heart.json"
    written = cell.stat().st_mtime_ns
    again = board.run_leaderboard(["default:heart"], options, tmp_path, progress=False)
    assert cell.stat().st_mtime_ns == written and again["rows"] == result["rows"]


def test_goal_summary_picks_the_localizer_meeting_most_goals_on_the_half():
    def row(loc, planting, family, metric, value, split="test"):
        goal = board.GOALS.get(metric)
        met = None if goal is None else (value >= goal[1] if goal[0] == ">=" else value <= goal[1])
        return {"localizer": loc, "planting": planting, "split": split, "family": family, "metric": metric,
                "value": value, "goal": None, "met": met}

    rows = [row("a", "u", "ffn_units", "unit_auroc", 0.995), row("a", "u", "ffn_units", "iou_at_k", 0.5),
            row("b", "u", "ffn_units", "unit_auroc", 0.9), row("b", "u", "ffn_units", "iou_at_k", 0.9),
            row("a", "r", "lowrank", "principal_angle", 10.0), row("b", "r", "lowrank", "principal_angle", 40.0),
            row("b", "x", "attn1", "sites_first", 1.0), row("a", "x", "attn1", "sites_first", 1.0),
            row("b", "d", "ffn_units", "unit_auroc", 1.0, split="dev")]  # fmt: skip
    summary = board.goal_summary(rows, "test")
    assert summary["cells_met"] == {"a": 3, "b": 2} and summary["best_localizer"] == "a"
    cells = {(c["planting"], c["metric"]): c for c in summary["goals"]}
    assert cells[("u", "iou_at_k")]["met"] is False and cells[("u", "iou_at_k")]["best_any"] == 0.9
    assert cells[("r", "principal_angle")]["best_any"] == 10.0
    assert cells[("u", "sites_first")]["value"] is None  # not measured: reported, not counted as met
    assert summary["cells"] == 4 + 3 + 2  # units: 4 goals, low rank: 3, attn1: 2


def test_a_planting_whose_parts_all_took_no_part_is_not_ranked():
    import torch

    from acterase_interp.bench.truth import PlantingTruth

    truth = PlantingTruth("p", "orange", "lowrank", "dev", ("up.1.0.ffn_out",), inactive=("up.1.0.ffn_out",))
    scores = {"up.1.0.ffn_out": torch.rand(8), "up.0.0.ffn_out": torch.rand(8)}
    rows = board._site_rows("zscore", truth, scores, top_k=2)
    assert [(r.metric, r.value, r.met) for r in rows[:3]] == [("site_auc", None, None), ("sites_first", None, None),
                                                              ("family_first", None, None)]  # fmt: skip
    assert [r.metric for r in rows[3:]] == ["inactive_site_auc"] and rows[3].met is None


def test_inactive_sites_are_scored_apart_against_the_unplanted_sites():
    import torch

    from acterase_interp.bench.truth import PlantingTruth

    # one active planted site (a), one inactive (b), four unplanted; sites score by the mean of their
    # top-2 units over their family's mean |score|: ffn_hidden mean 4.55, attn2_k mean 3.5
    truth = PlantingTruth("p", "grid", "split", "dev", ("a.ffn_hidden", "b.attn2_k"), inactive=("b.attn2_k",))
    flat = {"a.ffn_hidden": 9.0, "f.ffn_hidden": 0.1, "b.attn2_k": 5.0, "c.attn2_k": 6.0, "d.attn2_k": 1.0, "e.attn2_k": 2.0}
    scores = {n: torch.full((4,), v) for n, v in flat.items()}
    rows = {r.metric: r for r in board._site_rows("zscore", truth, scores, top_k=2)}
    # b (5 / 3.5 = 1.43) outranks d (0.29), e (0.57) and f (0.02), not c (1.71): 3 of 4
    assert rows["inactive_site_auc"].value == pytest.approx(3 / 4) and rows["inactive_site_auc"].met is None
    assert rows["site_auc"].value == 1.0  # the inactive site is on neither side of the main score


def test_best_by_family_averages_each_localizer_over_a_familys_plantings():
    def row(loc, planting, family, metric, value, split="test"):
        return {"localizer": loc, "planting": planting, "split": split, "family": family, "metric": metric, "value": value}

    rows = [row("a", "u1", "ffn_units", "unit_auroc", 0.9), row("a", "u2", "ffn_units", "unit_auroc", 0.7),  # a: 0.8
            row("b", "u1", "ffn_units", "unit_auroc", 0.85), row("b", "u2", "ffn_units", "unit_auroc", 0.85),  # b: 0.85
            row("a", "r", "lowrank", "principal_angle", 10.0), row("b", "r", "lowrank", "principal_angle", 40.0),
            row("c", "r", "lowrank", "principal_angle", None),  # not measured: never chosen
            row("c", "u1", "ffn_units", "unit_auroc", 1.0, split="dev")]  # fmt: skip
    best = board.best_by_family(rows, "unit_auroc")
    assert best["ffn_units"][0] == "b" and best["ffn_units"][1] == pytest.approx(0.85) and "lowrank" not in best
    assert board.best_by_family(rows, "principal_angle") == {"lowrank": ("a", 10.0)}  # lower is better
    assert board.best_by_family(rows, "unit_auroc", "dev") == {"ffn_units": ("c", 1.0)}


def test_trust_table_and_findings_name_the_best_by_family_localizers():
    def row(loc, planting, family, metric, value, met=None):
        return {"localizer": loc, "planting": planting, "split": "test", "family": family, "metric": metric,
                "value": value, "met": met}  # fmt: skip

    rows = [row("a", "u", "ffn_units", "site_auc", 0.9), row("b", "u", "ffn_units", "site_auc", 0.6),
            row("a", "u", "ffn_units", "unit_auroc", 0.7), row("b", "u", "ffn_units", "unit_auroc", 0.95, met=False),
            row("a", "u", "ffn_units", "sites_first", 1.0, met=True), row("b", "u", "ffn_units", "sites_first", 0.0, met=False),
            row("a", "r", "lowrank", "site_auc", 0.5), row("b", "r", "lowrank", "site_auc", 0.8),
            row("a", "r", "lowrank", "principal_angle", 30.0), row("b", "r", "lowrank", "principal_angle", 12.5)]  # fmt: skip
    table = board.trust_table(rows).splitlines()
    assert table[2:] == ["| ffn_units | a (0.900) | b (0.950) | n/a |", "| lowrank | b (0.800) | n/a | b (12.500) |"]
    lines = board.trust_findings(rows)
    assert lines[0].startswith("- benchmark, test half: the best localizer is a, meeting 1 of ")
    assert lines[1:] == ["- benchmark, ffn_units plantings: trust a for sites (mean site AUC 0.900), b for units (mean unit AUROC 0.950)",
                         "- benchmark, lowrank plantings: trust b for sites (mean site AUC 0.800), b for the subspace (12.5 degrees)"]  # fmt: skip
