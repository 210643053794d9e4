"""How many dimensions a concept occupies: mask sizes and overlaps, and the spectrum of the
target-minus-source difference vectors.

Effective rank, as used throughout the project, has two readings of the variance spectrum
lambda_i (squared singular values of the difference matrix, one difference vector per row):

- `"variance"` (default): the number of components needed to explain `threshold` (90%) of the
  total variance -- an integer, robust to a long tail of tiny components;
- `"participation"`: the participation ratio (sum lambda)^2 / sum lambda^2 -- a real number that
  equals k for k equal components and drops smoothly as the spectrum becomes uneven.

Differences are not centred by default: the mean difference is the concept's main direction, and
centring would remove it from the spectrum (pass `center=True` to study the spread around it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from itertools import combinations
from typing import Any

import torch

from ..erase import Eraser, FitStatistics
from ..erase.masks import importance_mask
from .records import Record

RANK_METHODS = ("variance", "participation")


def _matrix(x: torch.Tensor, center: bool) -> torch.Tensor:
    if x.ndim != 2:
        raise ValueError(f"expected a (vectors, units) matrix, got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"empty difference matrix of shape {tuple(x.shape)}")
    x = x.detach().double()
    return x - x.mean(dim=0, keepdim=True) if center else x


def variance_spectrum(x: torch.Tensor, center: bool = False) -> torch.Tensor:
    """Squared singular values of `x` (rows are difference vectors), largest first."""
    return torch.linalg.svdvals(_matrix(x, center)) ** 2


def explained_variance(x: torch.Tensor, center: bool = False) -> torch.Tensor:
    """The share of total variance each principal direction explains, largest first (sums to 1)."""
    spectrum = variance_spectrum(x, center)
    total = spectrum.sum()
    if total <= 0:
        raise ValueError("all difference vectors are zero: the explained variance is undefined")
    return (spectrum / total).float()


def effective_rank(x: torch.Tensor, method: str = "variance", threshold: float = 0.9, center: bool = False) -> float:
    """The effective rank of the difference vectors `x` (see the module docstring for both methods)."""
    if method not in RANK_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {RANK_METHODS}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    ratio = explained_variance(x, center).double()
    if method == "participation":
        return float(1.0 / (ratio**2).sum())
    # a small tolerance so that threshold=1.0 is not defeated by rounding
    return float(int((ratio.cumsum(0) < threshold - 1e-9).sum()) + 1)


def spectrum_records(
    differences: Mapping[str, torch.Tensor], center: bool = False, threshold: float = 0.9, **meta: Any
) -> tuple[list[Record], list[Record]]:
    """Explained-variance curves and effective ranks for difference matrices keyed by site.

    Returns `(curves, ranks)`: curves has one row per (site, component) with `explained` and
    `cumulative`; ranks one row per site with `n_components` (for `threshold`) and
    `participation_ratio`. `meta` (seeds, options, concept) is copied into every row."""
    curves, ranks = [], []
    for site, x in differences.items():
        ratio = explained_variance(x, center)
        for i, (share, cum) in enumerate(zip(ratio.tolist(), ratio.cumsum(0).tolist())):
            curves.append({"site": site, "component": i + 1, "explained": share, "cumulative": cum, **meta})
        ranks.append({
            "site": site,
            "n_vectors": x.shape[0],
            "n_units": x.shape[1],
            "n_components": effective_rank(x, "variance", threshold, center),
            "threshold": threshold,
            "participation_ratio": effective_rank(x, "participation", center=center),
            **meta,
        })  # fmt: skip
    return curves, ranks


def mask_density(mask: torch.Tensor) -> float:
    """The share of True entries of a boolean mask."""
    if mask.numel() == 0:
        raise ValueError("empty mask")
    return float(mask.bool().float().mean())


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Intersection over union of two boolean masks of one shape; NaN when both are empty."""
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.bool(), b.bool()
    union = int((a | b).sum())
    return float(int((a & b).sum()) / union) if union else math.nan


def iou_matrix(masks: Mapping[str, torch.Tensor], **meta: Any) -> list[Record]:
    """Pairwise IoU of labelled masks (concepts, pairs or steps): one row per ordered pair (`a`,
    `b`, `iou`), the diagonal included, so a heatmap can be drawn straight from the rows."""
    labels = list(masks)
    out = []
    for a in labels:
        for b in labels:
            out.append({"a": a, "b": b, "iou": mask_iou(masks[a], masks[b]), **meta})
    return out


def mean_pairwise_iou(masks: Sequence[torch.Tensor]) -> float:
    """The mean IoU over all unordered pairs of masks (NaN pairs skipped; NaN if none remain)."""
    values = [v for a, b in combinations(masks, 2) if not math.isnan(v := mask_iou(a, b))]
    return sum(values) / len(values) if values else math.nan


# -- on fitted statistics and erasers (no model runs) ----------------------------------------


def _meta(statistics: FitStatistics) -> Record:
    return {"concept": statistics.pairs.concept, "fit_seeds": list(statistics.seeds), "options": statistics.options.to_dict()}


def unit_masks(eraser: Eraser) -> dict[str, torch.Tensor]:
    """Per site, the eraser's mask over units: a unit is on if any of its (step, token) entries is."""
    return {name: mask.flatten(0, -2).any(0) for name, mask in eraser.masks.items()}


def mask_density_curve(statistics: FitStatistics, taus: Sequence[float], **overrides: Any) -> list[Record]:
    """Mask density per site as a function of tau: one row per (tau, site) with `density` (share of
    mask entries on, as `Eraser.mask_density`), from stored statistics (no model run).
    `overrides` (time_mask, pair_combine, granularity, ...) go to `FitStatistics.eraser`."""
    out = []
    for tau in taus:
        eraser = statistics.eraser(tau=tau, **overrides)
        for site, density in eraser.mask_density().items():
            block = next(s.block for s in eraser.sites if s.name == site)
            out.append({"tau": tau, "site": site, "layer": block, "density": density, **_meta(statistics),
                        **{k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}})  # fmt: skip
    return out


def masks_iou(masks: Mapping[str, Mapping[str, torch.Tensor]], **meta: Any) -> list[Record]:
    """IoU between labelled sets of per-site masks (e.g. concept -> site -> mask): rows (`a`, `b`,
    `site`, `iou`) for every site both sets share, plus `site="all"` over all of them at once."""
    labels = list(masks)
    out = []
    for a in labels:
        for b in labels:
            shared = [s for s in masks[a] if s in masks[b]]
            for s in shared:
                out.append({"a": a, "b": b, "site": s, "iou": mask_iou(masks[a][s], masks[b][s]), **meta})
            if shared:
                joined = [torch.cat([m[s].flatten() for s in shared]) for m in (masks[a], masks[b])]
                out.append({"a": a, "b": b, "site": "all", "iou": mask_iou(*joined), **meta})
    return out


def concept_masks(erasers: Mapping[str, Eraser]) -> dict[str, dict[str, torch.Tensor]]:
    """Unit masks of several erasers (e.g. one per concept), for `masks_iou`."""
    return {label: unit_masks(e) for label, e in erasers.items()}


def pair_masks(statistics: FitStatistics, tau: float, **overrides: Any) -> dict[str, dict[str, torch.Tensor]]:
    """The mask each prompt pair alone would give (Eq. 5, combined over time as the options say),
    per site over units: `pair i` -> site -> mask, for `masks_iou` between pairs."""
    options = replace(statistics.options, tau=tau, **overrides)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for i in range(statistics.num_pairs):
        out[f"pair {i}"] = {
            s.name: importance_mask(statistics.importance_source[s.name][i : i + 1],
                                    statistics.importance_target[s.name][i : i + 1], options).flatten(0, -2).any(0)
            for s in statistics.sites
        }  # fmt: skip
    return out


def step_masks(statistics: FitStatistics, tau: float, **overrides: Any) -> dict[str, dict[str, torch.Tensor]]:
    """The per-step masks (`time_mask="per_step"`, pairs combined as the options say), per site
    over units: `step i` -> site -> mask, for `masks_iou` between steps."""
    eraser = statistics.eraser(tau=tau, time_mask="per_step", **overrides)
    return {
        f"step {i}": {name: mask[i].flatten(0, -2).any(0) for name, mask in eraser.masks.items()}
        for i in range(statistics.num_steps)
    }


def pair_iou(statistics: FitStatistics, tau: float, **overrides: Any) -> list[Record]:
    """`masks_iou` between the masks of single pairs (`pair_masks`), rows tagged with tau and the fit."""
    return masks_iou(pair_masks(statistics, tau, **overrides), tau=tau, **_meta(statistics), **overrides)


def step_iou(statistics: FitStatistics, tau: float, **overrides: Any) -> list[Record]:
    """`masks_iou` between the masks of single steps (`step_masks`), rows tagged with tau and the fit."""
    return masks_iou(step_masks(statistics, tau, **overrides), tau=tau, **_meta(statistics), **overrides)


def concept_iou(erasers: Mapping[str, Eraser]) -> list[Record]:
    """`masks_iou` between erasers (e.g. one per concept), rows tagged with each one's fit seeds."""
    seeds = {label: e.manifest.get("seeds") for label, e in erasers.items()}
    return [{**r, "seeds_a": seeds[r["a"]], "seeds_b": seeds[r["b"]]} for r in masks_iou(concept_masks(erasers))]


def difference_spectrum(
    statistics: FitStatistics, center: bool = False, threshold: float = 0.9
) -> tuple[list[Record], list[Record]]:
    """`spectrum_records` of the fit's per-pair difference vectors (`FitStatistics.difference_vectors`)."""
    return spectrum_records(statistics.difference_vectors(), center, threshold, **_meta(statistics))


def planted_dimension(statistics: FitStatistics, planted: Mapping[str, Any] | None, tau: float) -> list[Record]:
    """Each estimate beside the truth, per fitted site: what the planting wrote there (`planted`,
    the concept's record from `model.planted`; None for a natural concept, whose truth is unknown)
    and what the fit says. Truth: `planted_units` (a count for unit plantings, "all" for a dense
    FFN planting, 0 where the planting did not write), `planted_share` of the site's units.
    Estimates: `mask_density` at `tau`; `top_unit_recall`, the share of the planted units among
    as many units ranked by difference energy (`subspace.top_units`' order; unit plantings only);
    `n_components` for 90% of the difference variance and the `participation_ratio`."""
    differences = statistics.difference_vectors()
    rank = {r["site"]: r for r in spectrum_records(differences)[1]}
    masks = unit_masks(statistics.eraser(tau=tau))
    family = planted["spec"]["family"] if planted else None
    rows = []
    for site in statistics.sites:
        units = differences[site.name].shape[1]
        row: Record = {"concept": statistics.pairs.concept, "site": site.name, "block": site.block, "tau": tau,
                       "planted_family": family, "planted_units": None, "planted_share": None, "top_unit_recall": None}  # fmt: skip
        if planted:
            chosen = planted.get("units", {}).get(site.block, [])
            if family == "ffn" and site.kind.startswith("ffn") and site.block in planted["blocks"]:
                row.update(planted_units="all", planted_share=1.0)
            else:
                row.update(planted_units=len(chosen), planted_share=len(chosen) / units)
            if chosen:
                energy = differences[site.name].double().pow(2).sum(0)
                top = set(energy.topk(len(chosen)).indices.tolist())
                row["top_unit_recall"] = len(top & set(chosen)) / len(chosen)
        row.update(mask_density=mask_density(masks[site.name]), n_components=rank[site.name]["n_components"],
                   participation_ratio=rank[site.name]["participation_ratio"])  # fmt: skip
        rows.append(row)
    return rows


def dimension_findings(truth: Sequence[Record], probes: Mapping[str, Mapping[str, float]],
                       subspace: Mapping[str, Sequence[Record]], reference: Mapping[str, Record],
                       goal: float = 0.1) -> list[str]:  # fmt: skip
    """Notebook 03's findings, one line each, computed from its outputs: per concept, the estimates
    beside the truth (`planted_dimension` rows), the probes (mean accuracy per unit set, with
    `chance`), and erasure in k dimensions (`subspace_efficacy` summaries by kind and k; the full
    eraser in `reference`): the fewest units per site that bring the concept rate to `goal`."""
    lines = []
    for concept, summary in subspace.items():
        rows = [r for r in truth if r["concept"] == concept]
        lines.append(f"- {concept}: {_truth_line(rows)}")
        p = probes[concept]
        lines.append(f"  - probes: masked units {p['masked']:.3f}, as many random units {p['random']:.3f}, all units "
                     f"{p['all']:.3f} (chance {p['chance']:.3f})")  # fmt: skip
        units = sorted((r for r in summary if r["kind"] == "units"), key=lambda r: r["k"])
        directions = {r["k"]: r for r in summary if r["kind"] == "directions"}
        enough = next((r for r in units if r["concept_rate"] <= goal), None)
        best = min(units, key=lambda r: r["concept_rate"])
        lines.append(f"  - units: {enough['k']} per site bring the rate to {enough['concept_rate']:.3f} (preservation "
                     f"{enough['preservation']:.3f})" if enough else
                     f"  - units: none of k <= {units[-1]['k']} per site brings the rate to {goal:.2f} (lowest "
                     f"{best['concept_rate']:.3f} at k {best['k']})")  # fmt: skip
        if directions:
            k = max(directions)
            same = next((r for r in units if r["k"] == k), None)
            lines.append(f"  - at an equal budget of {k} per site: directions {directions[k]['concept_rate']:.3f}, units "
                         + (f"{same['concept_rate']:.3f}" if same else "not measured"))  # fmt: skip
        ref = reference[concept]
        lines.append(f"  - full eraser: concept rate {ref['concept_rate']:.3f}, preservation {ref['preservation']:.3f}")
    return lines


def _truth_line(rows: Sequence[Record]) -> str:
    density = {r["site"]: r["mask_density"] for r in rows}
    comps = [r["n_components"] for r in rows]
    spectrum = f"components for 90% {min(comps):.0f}-{max(comps):.0f} of {len(comps)} sites' difference vectors"
    written = [r for r in rows if r["planted_units"] not in (None, 0)]
    if rows[0]["planted_family"] is None:
        return f"natural; mask density {_mean(density.values()):.4f} (mean over sites); {spectrum}"
    others = [density[r["site"]] for r in rows if r not in written]
    line = (f"planted ({rows[0]['planted_family']}) at {len(written)} of {len(rows)} sites; mask density there "
            f"{_mean(density[r['site']] for r in written):.4f} against a planted share of "
            f"{_mean(r['planted_share'] for r in written):.4f}, elsewhere {_mean(others):.4f}")  # fmt: skip
    recall = [r["top_unit_recall"] for r in written if r["top_unit_recall"] is not None]
    if recall:
        line += f"; difference energy ranks {_mean(recall):.3f} of the planted units first"
    return f"{line}; {spectrum}"


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
