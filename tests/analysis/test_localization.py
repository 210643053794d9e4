"""Localization maps on a synthetic stand-in with a known answer: only one layer carries the concept."""

import pytest
import torch

from acterase_interp.analysis.localization import (
    causal_map,
    map_correlation,
    normalized_difference,
    spatial_difference,
    step_windows,
    token_grid,
    window_mean,
)

LAYERS = ("down.0", "down.1", "mid.0", "up.0", "up.1")
CONCEPT_LAYER, CONCEPT_STEPS, NUM_STEPS = "mid.0", range(2, 6), 10


def _run(patch: tuple[str, tuple[int, int]] | None) -> float:
    """A toy sampler: every step each layer adds its write to a state; only CONCEPT_LAYER writes
    the concept, during CONCEPT_STEPS. Patching a layer during a window replaces its write by the
    source run's (no concept). Returns the concept left in the final state."""
    state = torch.zeros(2)  # (concept, content)
    for step in range(NUM_STEPS):
        for layer in LAYERS:
            patched = patch is not None and patch[0] == layer and patch[1][0] <= step < patch[1][1]
            concept = 1.0 if layer == CONCEPT_LAYER and step in CONCEPT_STEPS and not patched else 0.0
            state = state + torch.tensor([concept, 1.0])
    return float(state[0])


def _measure(layer: str, window: tuple[int, int]) -> dict[str, float]:
    before, after = _run(None), _run((layer, window))
    return {"concept_drop": (before - after) / before, "damage": 0.0}


def test_causal_map_finds_the_only_concept_layer_and_steps():
    windows = step_windows(NUM_STEPS, 2)
    rows = causal_map(_measure, LAYERS, windows, progress=False, seed=0)
    assert len(rows) == len(LAYERS) * len(windows) and all(r["seed"] == 0 for r in rows)
    for r in rows:
        overlap = len(set(range(r["start"], r["stop"])) & set(CONCEPT_STEPS))
        expected = overlap / len(CONCEPT_STEPS) if r["layer"] == CONCEPT_LAYER else 0.0
        assert r["concept_drop"] == pytest.approx(expected)
    # patching the concept layer for all steps removes the concept entirely
    assert causal_map(_measure, [CONCEPT_LAYER], [(0, NUM_STEPS)], progress=False)[0]["concept_drop"] == 1.0


def test_map_correlation_against_a_matching_correlational_map():
    windows = step_windows(NUM_STEPS, 2)
    causal = causal_map(_measure, LAYERS, windows, progress=False)
    # a per-step "difference map": large exactly where the concept is written
    def per_step(where: str) -> list[dict]:
        return [{"layer": l, "step": s, "value": float(l == where and s in CONCEPT_STEPS)}
                for l in LAYERS for s in range(NUM_STEPS)]  # fmt: skip

    correlational = window_mean(per_step(CONCEPT_LAYER), windows, by="layer")
    assert len(correlational) == len(causal)
    result = map_correlation(causal, correlational, keys=("layer", "start"), value_a="concept_drop")
    assert result["n"] == len(causal) and result["rho"] == pytest.approx(1.0)
    # a map that points at the wrong layer does not correlate positively
    wrong = window_mean(per_step("up.1"), windows, by="layer")
    assert map_correlation(causal, wrong, keys=("layer", "start"), value_a="concept_drop")["rho"] <= 0
    with pytest.raises(KeyError, match="missing"):
        map_correlation(causal, correlational, keys=("layer", "no_such_field"), value_a="concept_drop")
    with pytest.raises(ValueError, match="match"):
        map_correlation(causal[:2], correlational, keys=("layer", "start"), value_a="concept_drop")


def test_step_windows():
    assert step_windows(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert step_windows(4, 2, stride=1) == [(0, 2), (1, 3), (2, 4), (3, 4)]
    with pytest.raises(ValueError):
        step_windows(0, 2)


def test_difference_sizes_with_known_values():
    source = torch.tensor([[3.0, 4.0]])  # norm 5
    target = torch.tensor([[3.0, 4.0 + 5.0]])  # differs by 5
    assert normalized_difference(target, source).item() == pytest.approx(1.0)
    # 16 tokens = a 4x4 map; only token 5 (row 1, col 1) differs
    s = torch.ones(16, 8)
    t = s.clone()
    t[5] += 2.0
    grid = spatial_difference(t, s)
    assert grid.shape == (4, 4)
    assert grid[1, 1] > 0 and grid.sum() == pytest.approx(grid[1, 1].item())
    assert token_grid(torch.arange(9.0))[2, 0] == 6.0
    with pytest.raises(ValueError, match="square"):
        token_grid(torch.zeros(10))
