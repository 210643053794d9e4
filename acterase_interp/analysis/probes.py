"""Linear probes: is the concept linearly readable from the units an eraser's mask selects?

A logistic-regression probe separates concept activations from anchor (source) activations using
(a) only the masked units, (b) as many random units (the control), and (c) all units, each scored
by stratified k-fold cross-validation. If the mask found the concept's units, (a) is close to (c)
and well above (b).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from ..erase import Eraser
from ..patching import Window
from .activations import collect_activations
from .dimensionality import unit_masks
from .records import Record

RANDOM_POOLS = ("all", "complement")


def _check(features: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, folds: int) -> None:
    if features.ndim != 2:
        raise ValueError(f"features must be (samples, units), got shape {tuple(features.shape)}")
    if labels.shape != (features.shape[0],):
        raise ValueError(f"labels must be ({features.shape[0]},), got shape {tuple(labels.shape)}")
    if mask.shape != (features.shape[1],):
        raise ValueError(f"mask must be ({features.shape[1]},) over units, got shape {tuple(mask.shape)}")
    counts = np.unique(labels.numpy(), return_counts=True)[1]
    if len(counts) < 2 or counts.min() < folds:
        raise ValueError(f"need two classes with at least {folds} samples each (folds={folds}); got counts {counts.tolist()}")


def _cv_scores(x: np.ndarray, y: np.ndarray, folds: int, seed: int, c: float) -> np.ndarray:
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return cross_val_score(probe, x, y, cv=split, scoring="accuracy")


def probe_accuracy(
    features: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    n_random: int = 5,
    random_pool: str = "all",
    folds: int = 5,
    seed: int = 0,
    c: float = 1.0,
    **meta: Any,
) -> list[Record]:
    """Cross-validated probe accuracy with the masked units, `n_random` draws of as many random
    units, and all units.

    `features` (samples, units) are site activations (e.g. token-averaged), `labels` 1 for concept
    and 0 for anchor, `mask` a boolean mask over units. Random units come from every unit
    (`random_pool="all"`, the usual control) or only from the unmasked ones (`"complement"`).
    Returns one row per condition (`units` = masked / random / all) with `accuracy` (mean over folds,
    and draws), `accuracy_std`, `n_units`, `chance` (the majority-class share), `seed`, `folds`
    and `meta`; an empty mask gives NaN accuracies for masked and random."""
    if random_pool not in RANDOM_POOLS:
        raise ValueError(f"unknown random_pool {random_pool!r}; choose from {RANDOM_POOLS}")
    mask, labels = mask.bool().cpu(), labels.long().cpu()
    _check(features, labels, mask, folds)
    x, y = features.detach().float().cpu().numpy(), labels.numpy()
    k = int(mask.sum())
    pool = np.arange(x.shape[1]) if random_pool == "all" else np.flatnonzero(~mask.numpy())
    if k > len(pool):
        raise ValueError(f"mask selects {k} units but the random pool has only {len(pool)}")
    rng = np.random.default_rng(seed)
    chance = float(np.bincount(y).max() / len(y))
    base = {"chance": chance, "seed": seed, "folds": folds, "random_pool": random_pool, **meta}

    def row(units: str, scores: list[np.ndarray], n_units: int) -> Record:
        flat = np.concatenate(scores) if scores else np.array([np.nan])
        return {"units": units, "n_units": n_units, "accuracy": float(flat.mean()), "accuracy_std": float(flat.std()), **base}

    masked = [_cv_scores(x[:, mask.numpy()], y, folds, seed, c)] if k else []
    draws = [_cv_scores(x[:, rng.choice(pool, size=k, replace=False)], y, folds, seed, c) for _ in range(n_random)] if k else []
    return [row("masked", masked, k), row("random", draws, k), row("all", [_cv_scores(x, y, folds, seed, c)], x.shape[1])]


def probe_eraser_sites(
    model: Any,
    eraser: Eraser,
    concept_prompts: Sequence[str],
    anchor_prompts: Sequence[str],
    *,
    seed: int = 0,
    steps: Window | None = None,
    num_inference_steps: int | None = None,
    progress: bool = True,
    **probe_options: Any,
) -> list[Record]:
    """`probe_accuracy` at every site of `eraser`, on token- and step-averaged activations of
    `concept_prompts` (label 1) and `anchor_prompts` (label 0), each generated on its own
    trajectory (image i seeded `seed + i`), with the eraser's unit mask as the masked units.
    Rows carry `site`, `layer`, the eraser's concept and options, and the seeds."""
    prompts = list(concept_prompts) + list(anchor_prompts)
    labels = torch.tensor([1] * len(concept_prompts) + [0] * len(anchor_prompts))
    features = collect_activations(model, prompts, eraser.sites, seeds=seed, steps=steps,
                                   num_inference_steps=num_inference_steps, progress=progress)  # fmt: skip
    masks = unit_masks(eraser)
    meta = {"concept": eraser.manifest.get("pairs", {}).get("concept"), "options": eraser.manifest.get("options"),
            "fit_seeds": eraser.manifest.get("seeds"), "steps": list(steps) if steps else None}  # fmt: skip
    out = []
    for site in tqdm(eraser.sites, desc="probes", disable=not progress):
        out += probe_accuracy(features[site.name], labels, masks[site.name], seed=seed, site=site.name,
                              layer=site.block, **meta, **probe_options)  # fmt: skip
    return out
