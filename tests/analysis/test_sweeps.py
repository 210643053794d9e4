"""Tau grids and Pareto fronts with known answers."""

import math

import pytest

from acterase_interp.analysis.sweeps import PAPER_TAUS, ablation_findings, pareto_front, tau_grid


def test_tau_grid_is_log_spaced_and_includes_the_papers_taus():
    grid = tau_grid(8, 1e-3, 0.128)
    assert all(t in grid for t in PAPER_TAUS) and len(grid) == 10 and grid == sorted(grid)
    logs = [math.log2(t / 1e-3) for t in grid if t not in PAPER_TAUS]
    assert logs == pytest.approx(list(range(8)))  # 1e-3 * 2^i
    with pytest.raises(ValueError):
        tau_grid(8, 0.1, 0.01)


def test_pareto_front_of_known_points():
    points = [
        {"tau": 1, "concept_rate": 0.9, "preservation": 1.0},   # front: best preservation
        {"tau": 2, "concept_rate": 0.5, "preservation": 0.9},   # front
        {"tau": 3, "concept_rate": 0.6, "preservation": 0.8},   # dominated by tau 2
        {"tau": 4, "concept_rate": 0.1, "preservation": 0.7},   # front
        {"tau": 5, "concept_rate": 0.1, "preservation": 0.6},   # dominated by tau 4 (tie on x)
        {"tau": 6, "concept_rate": 0.0, "preservation": 0.2},   # front: lowest rate
    ]  # fmt: skip
    assert [p["tau"] for p in pareto_front(points)] == [6, 4, 2, 1]
    # flipping both senses: higher x and lower y are better
    assert [p["tau"] for p in pareto_front(points, x_lower=False, y_higher=False)] == [6, 5, 3, 1]


def _row(tau, rate, kept, **extra):
    return {"tau": tau, "concept_rate": rate, "heldout_concept_rate": rate, "preservation": kept, **extra}


def test_ablation_findings_of_known_sweeps_and_choices():
    sweeps = {
        "heart": [_row(0.01, 0.3, 1.0), _row(0.02, 0.05, 1.0), _row(1.0, 0.0, 0.5)],  # erased at 0.02
        "triangle": [_row(0.01, 1.0, 1.0), _row(0.02, 0.9, 1.0)],                    # never erased
    }  # fmt: skip
    choices = {"heart": [
        {"choice": "site", "value": "ffn", **_row(0.02, 0.0, 1.0)},
        {"choice": "site", "value": "attn", **_row(0.02, 0.9, 1.0)},   # margin 0.1 vs 1.0: spread 0.9
        {"choice": "cfg", "value": "cond", **_row(0.02, 0.05, 1.0)},
        {"choice": "cfg", "value": "both", **_row(0.02, 0.1, 1.0)},    # spread 0.05
    ]}  # fmt: skip
    lines = ablation_findings(sweeps, {"heart": 0.02, "triangle": None}, choices)
    assert lines[0] == "- heart: best tau by margin 0.02 -> concept rate 0.050, held-out rate 0.050, preservation 1.000"
    assert "  - paper's tau 0.01: concept rate 0.300, held-out rate 0.300, preservation 1.000, on the Pareto front: False" in lines  # 0.02 dominates it
    assert any(line.startswith("  - automatic tau 0.02 (fit targets, first fit): concept rate 0.050") for line in lines)
    assert "  - site: best ffn at tau 0.02 (margin 1.000; spread over values 0.900)" in lines
    assert "  - Pareto front: taus [0.02, 1.0]" in lines
    assert "  - cfg: best cond at tau 0.02 (margin 0.950; spread over values 0.050)" in lines
    assert "  - automatic tau: none of its candidates left the fit targets at <= 5%" in lines
    assert lines[-2] == "- where the method erases (heart), choices whose margin spread exceeds 0.1 in each: ['site']; within 0.1 in each: ['cfg']"
    assert lines[-1] == "- concepts no tau brings to <= 0.1: ['triangle']"
