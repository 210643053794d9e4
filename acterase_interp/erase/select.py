"""Choosing tau on the fit pairs alone: the smallest threshold that erases the concept from the
fit's own target prompts, re-thresholded from stored statistics (no new fit per tau).

Held-out prompts and evaluation seeds never enter: the images are the fit targets under their own
seeds, `seed_offset` away from the fit's, so a chosen tau says nothing yet about generalisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..evaluation.core import TAU_SELECTION_OFFSET
from ..generation import generate
from .eraser import Eraser
from .pairs import PromptPairs
from .statistics import FitStatistics

TAU_GRID: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
"""Fractions of units tried, smallest first (`tau_mode="fraction"`)."""
SELECT_SEED_OFFSET = TAU_SELECTION_OFFSET
"""Selection image k of a fit with seed s uses seed s + 500 + k (evaluation starts at s + 1000;
`evaluation.core` names every offset)."""


@dataclass
class TauChoice:
    """The chosen eraser and how it was chosen."""

    tau: float | None
    """The smallest tau meeting `max_rate`; None if none did (then `eraser` is the largest tau's)."""
    eraser: Eraser = field(repr=False)
    trace: list[dict] = field(default_factory=list)
    """One entry per tau tried: tau, concept rate on the fit targets, mask density."""
    rule: str = ""

    def to_dict(self) -> dict:
        return {"tau": self.tau, "trace": self.trace, "rule": self.rule}


def choose_tau(
    model,
    statistics: FitStatistics,
    pairs: PromptPairs,
    shows_concept: Callable[[torch.Tensor], torch.Tensor],
    *,
    taus: Sequence[float] = TAU_GRID,
    max_rate: float = 0.05,
    seeds_per_prompt: int = 3,
    seed: int = 0,
    num_inference_steps: int | None = None,
    progress: bool = False,
) -> TauChoice:
    """Try `taus` in increasing order on a fit's `statistics` (`fitter.statistics`) and return
    the first whose erased images of `pairs.targets` show the concept (`shows_concept`: images in
    [0, 1] -> bool per image) in at most `max_rate` of them. Stops at the first success."""
    if not isinstance(statistics, FitStatistics):
        raise TypeError(f"choose_tau re-thresholds fit statistics (fitter.statistics), got {type(statistics).__name__}")
    if not taus or sorted(taus) != list(taus):
        raise ValueError(f"taus must be a non-empty increasing sequence, got {taus}")
    if seeds_per_prompt < 1:
        raise ValueError(f"seeds_per_prompt must be at least 1, got {seeds_per_prompt}")
    prompts = [p for p in pairs.targets for _ in range(seeds_per_prompt)]
    seeds = [seed + SELECT_SEED_OFFSET + k for k in range(len(prompts))]
    rule = (f"smallest tau in {list(taus)} whose eraser leaves the concept in <= {max_rate:.0%} of the "
            f"{len(pairs.targets)} fit targets x {seeds_per_prompt} seeds (seeds {seeds[0]}-{seeds[-1]})")  # fmt: skip
    trace: list[dict] = []
    for tau in taus:
        candidate = statistics.eraser(tau=tau, tau_mode="fraction")
        with candidate.applied(model):
            images = generate(model, prompts, seeds=seeds, num_inference_steps=num_inference_steps, progress=progress)
        rate = shows_concept(images).float().mean().item()
        density = candidate.mask_density()
        trace.append({"tau": tau, "fit_target_rate": rate, "mean_mask_density": sum(density.values()) / len(density)})
        if rate <= max_rate:
            return TauChoice(tau, candidate, trace, rule)
    return TauChoice(None, candidate, trace, rule)
