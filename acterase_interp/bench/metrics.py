"""Scores of one localizer's output against one planting's truth, with no threshold chosen where
the metric allows: unit-level ROC AUC and average precision, precision / recall / IoU at k = the
planted size, site-level ROC over every threshold, principal angles for subspace truths, and the
faithfulness curve (concept removed and non-target damage as the top-n units are patched).

Tensors and callables in, numbers out: the model runs that a faithfulness curve needs are the
caller's `measure` (`bench.leaderboard` builds it from an `Evaluator`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import subspace_angles
from sklearn.metrics import average_precision_score, roc_auc_score

SITE_TOP_K = 8
"""Units per site whose (family-normalised) scores make the site's score (`site_scores`)."""
FAITHFULNESS_GRID: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Numbers of top units patched along a faithfulness curve (0: the unpatched baseline)."""


def _binary(scores: torch.Tensor | Sequence[float], labels: torch.Tensor | Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(torch.as_tensor(scores, dtype=torch.float64).flatten())
    y = np.asarray(torch.as_tensor(labels).flatten()).astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores for {y.size} labels")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite (NaN or inf found)")
    if y.all() or not y.any():
        raise ValueError("ROC AUC and average precision need both positive and negative labels")
    return s, y


def unit_auroc(scores: torch.Tensor | Sequence[float], labels: torch.Tensor | Sequence[bool]) -> float:
    """ROC AUC: the probability that a random positive scores above a random negative, ties
    counting one half (scikit-learn's `roc_auc_score`)."""
    s, y = _binary(scores, labels)
    return float(roc_auc_score(y, s))


def average_precision(scores: torch.Tensor | Sequence[float], labels: torch.Tensor | Sequence[bool]) -> float:
    """Average precision, sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds from the
    highest down, tied scores entering together (scikit-learn's `average_precision_score`)."""
    s, y = _binary(scores, labels)
    return float(average_precision_score(y, s))


@dataclass(frozen=True)
class TopK:
    """The top-k units of a ranking against the planted ones."""

    k: int
    precision: float
    recall: float
    iou: float


def precision_recall_iou_at_k(scores: torch.Tensor, labels: torch.Tensor, k: int | None = None) -> TopK:
    """Precision, recall and IoU of the `k` highest scores (default: as many as planted, where
    precision = recall = the share found); ties at the cut go to the earlier index."""
    s, y = _binary(scores, labels)
    k = int(y.sum()) if k is None else k
    if not 1 <= k <= s.size:
        raise ValueError(f"k must lie in [1, {s.size}], got {k}")
    top = np.zeros_like(y)
    top[np.argsort(-s, kind="stable")[:k]] = True
    hits = int((top & y).sum())
    return TopK(k, hits / k, hits / int(y.sum()), hits / int((top | y).sum()))


def mask_scores(mask: torch.Tensor, labels: torch.Tensor) -> TopK:
    """Precision, recall and IoU of a thresholded selection (a bool mask over the same units); an
    empty mask has precision 0."""
    m, y = torch.as_tensor(mask).flatten().bool(), torch.as_tensor(labels).flatten().bool()
    hits = int((m & y).sum())
    union = int((m | y).sum())
    return TopK(int(m.sum()), hits / int(m.sum()) if m.any() else 0.0, hits / max(1, int(y.sum())), hits / max(1, union))


# -- sites -------------------------------------------------------------------------------------


def family_of(site_name: str) -> str:
    """`up.0.0.ffn_hidden` -> `ffn_hidden`."""
    return site_name.rsplit(".", 1)[-1]


def normalised_scores(scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unit scores made comparable across families: each family's scores divided by that family's
    mean |score| over all its units (sites of different kinds have different scales: importance
    carries the reading weight's norm at `ffn_hidden` only, K/V sites repeat over text tokens...).
    Within a family, the order and the ratios between blocks are kept."""
    scale: dict[str, list[torch.Tensor]] = {}
    for name, s in scores.items():
        scale.setdefault(family_of(name), []).append(s.double().abs().flatten())
    typical = {f: torch.cat(v).mean().clamp_min(torch.finfo(torch.float64).tiny) for f, v in scale.items()}
    return {name: (s.double() / typical[family_of(name)]).float() for name, s in scores.items()}


def site_scores(scores: Mapping[str, torch.Tensor], top_k: int = SITE_TOP_K) -> dict[str, float]:
    """A site's score: the mean of its `top_k` highest family-normalised unit scores
    (`normalised_scores`), so that a site whose few strongest units stand out scores high however
    many units it has."""
    normed = normalised_scores(scores)
    return {n: float(s.flatten().topk(min(top_k, s.numel())).values.mean()) for n, s in normed.items()}


@dataclass(frozen=True)
class SiteROC:
    """Planted sites against the others, over every threshold of the site score."""

    fpr: tuple[float, ...]
    tpr: tuple[float, ...]
    auc: float
    """Area under the ROC curve (ties one half)."""
    sites_first: bool
    """Every planted site scores strictly above every other site."""
    family_first: bool
    """The best site of a planted family scores strictly above every site of the other families."""
    ranked: tuple[str, ...]
    """Sites by decreasing score."""


def site_roc(values: Mapping[str, float], planted: Sequence[str]) -> SiteROC:
    """Site-level ROC of `values` (site -> score) against the `planted` site names (all in `values`)."""
    names = list(values)
    missing = sorted(set(planted) - set(names))
    if missing:
        raise ValueError(f"planted sites {missing} were not scored; scored: {names}")
    s = np.array([values[n] for n in names], dtype=float)
    y = np.array([n in set(planted) for n in names])
    auc = unit_auroc(s, y)
    fpr, tpr = [0.0], [0.0]
    for cut in np.unique(s)[::-1]:
        fpr.append(float((s[~y] >= cut).mean()))
        tpr.append(float((s[y] >= cut).mean()))
    families = {family_of(n) for n in planted}
    best_planted = max(values[n] for n in names if family_of(n) in families)
    others = [values[n] for n in names if family_of(n) not in families]
    return SiteROC(tuple(fpr), tuple(tpr), auc, bool(s[y].min() > s[~y].max()),
                   bool(not others or best_planted > max(others)),
                   tuple(sorted(names, key=lambda n: -values[n])))  # fmt: skip


# -- subspaces -----------------------------------------------------------------------------------


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Principal angles in degrees, largest first, between the column spans of `a` (dim, r) and
    `b` (dim, r') (min(r, r') angles; 0 means a shared direction)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"bases must be (dim, r) with the same dim, got {tuple(a.shape)} and {tuple(b.shape)}")
    return [math.degrees(x) for x in subspace_angles(a.double().numpy(), b.double().numpy())]


# -- faithfulness ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaithfulnessCurve:
    """Concept rate and non-target damage as the top-n units of a ranking are patched."""

    n: tuple[int, ...]
    concept_rate: tuple[float, ...]
    damage: tuple[float | None, ...]
    """1 - preservation (None where preservation is undefined)."""
    removed_auc: float | None
    """Mean over the grid (trapezoid on evenly spaced grid positions, so a geometric grid weighs
    every doubling alike) of the share of the baseline concept rate removed; None when the
    baseline rate is 0. 1: the first unit removes everything; 0: nothing is ever removed."""
    damage_auc: float | None
    """The same area for damage (lower is better); None if any damage is undefined."""


def _area(y: Sequence[float]) -> float:
    return float(np.trapezoid(y, dx=1.0 / (len(y) - 1)))


def faithfulness_curve(measure: Callable[[int], tuple[float, float | None]], grid: Sequence[int] = FAITHFULNESS_GRID,
                       progress: Callable | None = None) -> FaithfulnessCurve:  # fmt: skip
    """`measure(n)` -> (concept rate, damage) with the top-n units patched, for every n of `grid`
    (increasing, starting at 0, the unpatched baseline), and the normalised areas (MIB-style:
    integrated over the number of units, so no size is chosen)."""
    grid = list(grid)
    if len(grid) < 2 or grid[0] != 0 or any(b <= a for a, b in zip(grid, grid[1:])):
        raise ValueError(f"grid must increase from 0 with at least two points, got {grid}")
    points = [measure(n) for n in (progress(grid) if progress else grid)]
    rates, damage = [p[0] for p in points], [p[1] for p in points]
    base = rates[0]
    removed = None if base <= 0 else _area([(base - r) / base for r in rates])
    damage_auc = None if any(d is None for d in damage) else _area(damage)
    return FaithfulnessCurve(tuple(grid), tuple(rates), tuple(damage), removed, damage_auc)
