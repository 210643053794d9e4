"""Choosing tau on the fit pairs: the first tau, in increasing order, that meets the rate."""

from __future__ import annotations

import pytest
import torch

from acterase_interp.erase import EraseOptions, EraserFitter
from acterase_interp.erase.select import SELECT_SEED_OFFSET, choose_tau
from acterase_interp.world.pairs import conceptworld_pairs

STEPS = 2


@pytest.fixture(scope="module")
def fitted(conceptworld):
    pairs = conceptworld_pairs("heart", n=1)
    fitter = EraserFitter(conceptworld, EraseOptions(num_inference_steps=STEPS), progress=False)
    fitter.fit(pairs)
    return pairs, fitter.statistics


def test_choose_tau_stops_at_the_first_tau_that_erases(conceptworld, fitted):
    pairs, statistics = fitted
    seen = []

    def shows(images):  # the concept is gone once the mask covers more than a fifth of the units
        seen.append(len(images))
        return torch.full((len(images),), len(seen) < 3)

    choice = choose_tau(conceptworld, statistics, pairs, shows, taus=(0.01, 0.1, 0.3, 1.0), seeds_per_prompt=2,
                        num_inference_steps=STEPS)  # fmt: skip
    assert choice.tau == 0.3 and choice.eraser.manifest["options"]["tau"] == 0.3
    assert [t["tau"] for t in choice.trace] == [0.01, 0.1, 0.3] and seen == [2, 2, 2]
    assert [t["fit_target_rate"] for t in choice.trace] == [1.0, 1.0, 0.0]
    densities = [t["mean_mask_density"] for t in choice.trace]
    assert densities == sorted(densities) and densities[0] < densities[-1]
    assert f"seeds {SELECT_SEED_OFFSET}-{SELECT_SEED_OFFSET + 1}" in choice.rule


def test_choose_tau_reports_when_no_tau_erases(conceptworld, fitted):
    pairs, statistics = fitted
    choice = choose_tau(conceptworld, statistics, pairs, lambda x: torch.ones(len(x), dtype=torch.bool),
                        taus=(0.01, 0.5), seeds_per_prompt=1, num_inference_steps=STEPS)  # fmt: skip
    assert choice.tau is None and len(choice.trace) == 2 and choice.eraser.manifest["options"]["tau"] == 0.5
    with pytest.raises(ValueError, match="increasing"):
        choose_tau(conceptworld, statistics, pairs, lambda x: x, taus=(0.5, 0.1))
    with pytest.raises(TypeError, match="fit statistics"):
        choose_tau(conceptworld, statistics.eraser(), pairs, lambda x: x)  # an eraser keeps no statistics
