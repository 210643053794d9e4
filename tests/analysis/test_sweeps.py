"""Tau grids and Pareto fronts with known answers."""

import math

import pytest

from acterase_interp.analysis.sweeps import PAPER_TAUS, pareto_front, tau_grid


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
