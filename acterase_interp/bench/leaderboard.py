"""The localizer leaderboard: every localizer on every planting, scored against the planted truth.

    python -m acterase_interp.bench.leaderboard --out results/benchmark [--plantings NAME ...]
        [--localizers NAME ...] [--n-pairs 16] [--seeds 0] [--steps N] [--workers N]

Per planting (a cell, run alone or on a worker): the model and truth (`bench.plantings.load_planting`;
`default:<concept>` names the default model's own plantings, moon / heart / cyan, for smoke runs),
one ActErase fit over every family of `FAMILIES` on `n_pairs` prompt pairs, then per localizer its
scores and these metrics (rows `(localizer, planting, split, family, metric, value, goal, met)`):

- unit level, where the truth names units: the universe is every unit of every fitted block of
  the planted units' family (the units of inactive planted sites left out); `unit_auroc`, `average_precision`, `precision_at_k`, `recall_at_k`,
  `iou_at_k` (k = the planted size); `acterase_mask` adds `mask_precision/recall/iou@tau=...`;
- site level (family x block): site score = `metrics.site_scores`; `site_auc` over every threshold,
  `sites_first` (every planted site above every other) and `family_first`; planted sites that the
  verification found inactive are left out of both sides and scored apart, `inactive_site_auc`
  (those sites against the unplanted ones; reported, never a goal);
- subspace truths: `principal_angle` (the largest principal angle, degrees, worst active site) and
  `principal_angle_mean`, between the planted basis and the localizer's `directions` at that site;
- faithfulness: the top-n units (family-normalised order, `localizers.top_units`) patched to their
  source means for n on `FAITHFULNESS_GRID`: `faithfulness_removed_auc`, `faithfulness_damage_auc`
  (curves in `results.json["curves"]`);
- `seconds`: the localizer's scoring time.

No localizer hyperparameter is tuned here: all are fixed before any run (their options are in the
manifest), so the dev half is where a change of them must be justified and the test half is
reported apart. Cells are cached in `<out>/cells/<planting>.json` and reused when their options
match (resumable). `results.json` (tidy rows, curves, manifest) and `table.md` are written atomically.
`score_planting` scores one planted model given its truth, pairs and reader, so a user's own
planting is scored the same way (`bench.own`).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..analysis.evaluation import Evaluator
from ..erase import EraseOptions, EraserFitter
from ..erase.pairs import PromptPairs
from ..integrity import read_json, sha256_json
from ..io import atomic_write_json, atomic_write_text
from ..provenance import git_commit, library_versions
from ..world.pairs import conceptworld_pairs
from .localizers import (LOCALIZERS, ActEraseMask, AttributionPatching, CausalAblation, LocalizationContext, Localizer,
                         top_units, unit_eraser)  # fmt: skip
from .metrics import (FAITHFULNESS_GRID, SITE_TOP_K, faithfulness_curve, family_of, mask_scores, average_precision,
                      precision_recall_iou_at_k, principal_angles, site_roc, site_scores, unit_auroc)  # fmt: skip
from .truth import PlantingTruth

FAMILIES: tuple[str, ...] = ("ffn_hidden", "ffn_out", "attn1_out", "attn2_k", "attn2_v")
"""The site kinds every localizer scores (every kind a benchmark planting writes)."""
MASK_TAUS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2)
"""Taus at which the thresholded ActErase mask is scored too (the paper's range)."""
GOALS: dict[str, tuple[str, float]] = {
    "unit_auroc": (">=", 0.99), "iou_at_k": (">=", 0.8), "principal_angle": ("<=", 15.0),
    "sites_first": (">=", 1.0), "family_first": (">=", 1.0),
}  # fmt: skip
"""The issue's goals for the best localizer on the test half; every cell says whether it meets them."""
DEFAULT_SPLITS = {"heart": "test", "moon": "dev", "cyan": "dev"}
"""Halves of the default model's own plantings (`default:<concept>`), used for smoke runs."""
_DEFAULT_SITES = {"ffn": ("ffn_hidden", "ffn_out"), "ffn_units": ("ffn_hidden",), "attn2_kv": ("attn2_k", "attn2_v")}


@dataclass(frozen=True)
class BenchOptions:
    """Everything a cell's numbers depend on besides the planting."""

    n_pairs: int = 16
    """Prompt pairs of the fit (and of AtP), and target / non-target prompts of the evaluations."""
    seeds: tuple[int, ...] = (0,)
    """Evaluation replicates (faithfulness and causal ablation)."""
    num_inference_steps: int | None = None
    """None: the model's default."""
    families: tuple[str, ...] = FAMILIES
    faithfulness_grid: tuple[int, ...] = FAITHFULNESS_GRID
    site_top_k: int = SITE_TOP_K
    causal_candidates: int = 64
    atp_batch_size: int = 4
    mask_taus: tuple[float, ...] = MASK_TAUS
    localizers: tuple[str, ...] = tuple(LOCALIZERS)

    def __post_init__(self) -> None:
        unknown = [n for n in self.localizers if n not in LOCALIZERS]
        if unknown:
            raise ValueError(f"unknown localizer(s) {unknown}; choose from {sorted(LOCALIZERS)}")
        if self.n_pairs < 1 or not self.seeds:
            raise ValueError("need at least one pair and one seed")

    def build(self) -> list[Localizer]:
        """The localizers, with this run's options."""
        special = {"causal_ablation": lambda: CausalAblation(candidates=self.causal_candidates),
                   "attribution_patching": lambda: AttributionPatching(batch_size=self.atp_batch_size)}  # fmt: skip
        return [special.get(n, LOCALIZERS[n])() for n in self.localizers]

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


@dataclass(frozen=True)
class Row:
    """One tidy result: `to_dataframe([asdict(r) ...])` friendly."""

    localizer: str
    planting: str
    split: str
    family: str
    metric: str
    value: float | None
    goal: str | None = None
    met: bool | None = None


def _row(loc: str, truth: PlantingTruth, metric: str, value: float | None) -> Row:
    goal = GOALS.get(metric)
    met = None
    if goal is not None and value is not None:
        met = value >= goal[1] if goal[0] == ">=" else value <= goal[1]
    return Row(loc, truth.name, truth.split, truth.family, metric, value,
               None if goal is None else f"{goal[0]} {goal[1]:g}", met)  # fmt: skip


# -- plantings -----------------------------------------------------------------------------------


def default_truth(model: Any, concept: str) -> PlantingTruth:
    """The truth of one of the default model's own plantings, from `model.planted`."""
    record = next((r for r in model.planted if r["concept"] == concept), None)
    if record is None:
        raise ValueError(f"the model holds no planted {concept!r}; it holds {[r['concept'] for r in model.planted]}")
    family = record["spec"]["family"]
    sites = tuple(f"{b}.{k}" for b in record["blocks"] for k in _DEFAULT_SITES[family])
    units = {f"{b}.ffn_hidden": tuple(u) for b, u in (record.get("units") or {}).items()}
    return PlantingTruth(f"default:{concept}", concept, family, DEFAULT_SPLITS.get(concept, "dev"), sites, units)


def open_planting(name: str) -> tuple[Any, PlantingTruth, Any]:
    """(model, truth, classifier) of planting `name`: a benchmark planting with the benchmark
    classifier, or `default:<concept>` with the default model and its classifier."""
    from ..loading import BENCH, CONCEPTWORLD, load as load_model, load_classifier

    if name.startswith("default:"):
        model = load_model(CONCEPTWORLD)
        return model, default_truth(model, name.split(":", 1)[1]), load_classifier(CONCEPTWORLD)
    from .plantings import load_planting

    model, truth = load_planting(name)
    return model, truth, load_classifier(BENCH)


def weights_sha256(model: Any) -> str:
    """sha256 of the UNet's parameters (names, shapes and float32 bytes, in name order): the
    planted model as scored."""
    digest = hashlib.sha256()
    for name, p in sorted(model.pipeline.unet.state_dict().items()):
        digest.update(f"{name}{tuple(p.shape)}".encode())
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# -- one cell -----------------------------------------------------------------------------------


def _unit_rows(loc: str, truth: PlantingTruth, context: LocalizationContext,
               scores: dict) -> tuple[list[Row], list[str], torch.Tensor]:  # fmt: skip
    families = {family_of(s) for s in truth.units}
    names = [s.name for s in context.sites if s.kind in families and s.name not in truth.inactive]
    flat = torch.cat([scores[n].flatten() for n in names])
    labels = torch.cat([torch.isin(torch.arange(scores[n].numel()), torch.tensor(truth.units.get(n, ()), dtype=torch.long))
                        for n in names])  # fmt: skip
    top = precision_recall_iou_at_k(flat, labels)
    rows = [_row(loc, truth, "unit_auroc", unit_auroc(flat, labels)),
            _row(loc, truth, "average_precision", average_precision(flat, labels)),
            _row(loc, truth, "precision_at_k", top.precision), _row(loc, truth, "recall_at_k", top.recall),
            _row(loc, truth, "iou_at_k", top.iou)]  # fmt: skip
    return rows, names, labels


def _mask_rows(localizer: ActEraseMask, truth: PlantingTruth, context: LocalizationContext, names: list[str],
               labels: torch.Tensor, taus: Sequence[float]) -> list[Row]:  # fmt: skip
    rows = []
    for tau in taus:
        masks = localizer.masks(context, tau)
        m = mask_scores(torch.cat([masks[n] for n in names]), labels)
        rows += [_row(localizer.name, truth, f"mask_{k}@tau={tau:g}", getattr(m, k)) for k in ("precision", "recall", "iou")]
    return rows


def _site_rows(loc: str, truth: PlantingTruth, scores: dict, top_k: int) -> list[Row]:
    every = site_scores(scores, top_k)
    values = {n: v for n, v in every.items() if n not in truth.inactive}
    planted = [s for s in truth.sites if s not in truth.inactive]
    if not planted:  # no planted site was verified to take part: nothing to rank first, no blame either
        rows = [_row(loc, truth, m, None) for m in ("site_auc", "sites_first", "family_first")]
    else:
        roc = site_roc(values, planted)
        rows = [_row(loc, truth, "site_auc", roc.auc), _row(loc, truth, "sites_first", float(roc.sites_first)),
                _row(loc, truth, "family_first", float(roc.family_first))]  # fmt: skip
    return rows + _inactive_rows(loc, truth, every)


def _inactive_rows(loc: str, truth: PlantingTruth, every: dict[str, float]) -> list[Row]:
    """Planted sites the verification found inactive, scored apart: their site AUC against the
    sites nothing was planted in (0.5 is chance: a localizer that finds no concept there is right
    not to rank them high, so this is reported, never a goal)."""
    if not truth.inactive:
        return []
    unplanted = {n: v for n, v in every.items() if n not in truth.sites}
    return [_row(loc, truth, "inactive_site_auc", site_roc({**unplanted, **{n: every[n] for n in truth.inactive}},
                                                              list(truth.inactive)).auc)]  # fmt: skip


def _subspace_rows(localizer: Localizer, truth: PlantingTruth, context: LocalizationContext, scores: dict) -> list[Row]:
    worst, means = 0.0, []
    for site, basis in truth.subspaces.items():
        if site in truth.inactive:
            continue
        angles = principal_angles(basis, localizer.directions(context, site, basis.shape[1], scores))
        worst, means = max(worst, angles[0]), means + [sum(angles) / len(angles)]
    if not means:
        return []
    return [_row(localizer.name, truth, "principal_angle", worst),
            _row(localizer.name, truth, "principal_angle_mean", sum(means) / len(means))]  # fmt: skip


def _faithfulness(context: LocalizationContext, evaluator: Evaluator, scores: dict, grid: Sequence[int],
                  seeds: Sequence[int]) -> Any:  # fmt: skip
    total = sum(s.numel() for s in scores.values())

    def measure(n: int) -> tuple[float, float | None]:
        patch = None if n == 0 else unit_eraser(context, top_units(scores, n))
        rows = [evaluator(patch, s) for s in seeds]
        damage = [None if r["preservation"] is None else 1 - r["preservation"] for r in rows]
        return (sum(r["concept_rate"] for r in rows) / len(rows),
                None if None in damage else sum(damage) / len(damage))  # fmt: skip

    return faithfulness_curve(measure, [n for n in grid if n <= total],
                              progress=lambda g: tqdm(g, desc="faithfulness", leave=False, disable=not context.progress))


def _identity(model: Any, truth: PlantingTruth) -> dict[str, Any]:
    """What a cached cell must match to be reused: the planted weights and the truth."""
    return {"truth": truth.to_dict(), "weights_sha256": weights_sha256(model)}


def run_planting(name: str, options: BenchOptions, progress: bool = True) -> dict[str, Any]:
    """Every localizer of `options` on planting `name`: {"rows", "curves", "planting"} (JSON-ready)."""
    started = time.perf_counter()  # the cell's load counts in its `load_and_fit_seconds`
    model, truth, classifier = open_planting(name)
    pairs = conceptworld_pairs(truth.concept, n=options.n_pairs, seed=0)
    return score_planting(model, truth, classifier, pairs, options, progress, started=started)


def score_planting(model: Any, truth: PlantingTruth, classifier: Any, pairs: PromptPairs, options: BenchOptions,
                   progress: bool = True, *, evaluator_class: type[Evaluator] = Evaluator,
                   started: float | None = None) -> dict[str, Any]:  # fmt: skip
    """Every localizer of `options` on a planted `model` against its `truth`: one ActErase fit on
    `pairs`, then rows and faithfulness curves as the module docstring says; `classifier` reads the
    concept (for `evaluator_class`'s faithfulness evaluations and the localizers that run the model).
    `started`: `time.perf_counter()` when the cell began (default: now)."""
    commit = git_commit()  # at the start: the code that scores is the code checked out now
    start = time.perf_counter() if started is None else started
    steps = options.num_inference_steps or model.defaults.num_inference_steps
    fit = EraserFitter(model, EraseOptions(site_kind=options.families, num_inference_steps=steps), progress=progress)
    fit.fit(pairs)
    stats = fit.statistics
    fit_seconds = time.perf_counter() - start
    context = LocalizationContext(model, classifier, truth.concept, pairs, {k: stats for k in options.families},
                                  tuple(options.seeds), steps, progress)  # fmt: skip
    evaluator = evaluator_class(model, classifier, truth.concept, pairs.targets, pairs.non_target, num_inference_steps=steps)
    rows: list[Row] = []
    curves = []
    for localizer in tqdm(options.build(), desc=f"localizers: {truth.name}", disable=not progress):
        began = time.perf_counter()
        scores = localizer.scores(context)
        rows.append(_row(localizer.name, truth, "seconds", time.perf_counter() - began))
        if any(s not in truth.inactive for s in truth.units):
            unit_rows, names, labels = _unit_rows(localizer.name, truth, context, scores)
            rows += unit_rows
            if isinstance(localizer, ActEraseMask):
                rows += _mask_rows(localizer, truth, context, names, labels, options.mask_taus)
        rows += _site_rows(localizer.name, truth, scores, options.site_top_k)
        if truth.subspaces:
            rows += _subspace_rows(localizer, truth, context, scores)
        curve = _faithfulness(context, evaluator, scores, options.faithfulness_grid, options.seeds)
        rows += [_row(localizer.name, truth, "faithfulness_removed_auc", curve.removed_auc),
                 _row(localizer.name, truth, "faithfulness_damage_auc", curve.damage_auc)]  # fmt: skip
        curves.append({"localizer": localizer.name, "planting": truth.name, "split": truth.split, **asdict(curve)})
    planting = {**_identity(model, truth), "architecture_hash": stats.architecture_hash, "fit_seeds": list(stats.seeds),
                "load_and_fit_seconds": round(fit_seconds, 1), "seconds": round(time.perf_counter() - start, 1),
                "git_commit": commit}  # fmt: skip
    return {"rows": [asdict(r) for r in rows], "curves": curves, "planting": planting}


def _cell(name: str, options: BenchOptions, folder: Path, progress: bool) -> dict[str, Any]:
    """`run_planting`, cached in `folder/<name>.json` under the options' hash, reused while the
    planting's weights and truth are those it was scored on."""
    path = folder / f"{name.replace(':', '_')}.json"
    key = sha256_json(options.to_dict())
    if path.exists():
        stored = read_json(path, "leaderboard cell")
        if stored.get("options_sha256") == key:
            model, truth, _ = open_planting(name)  # a planting planted again since makes the cell stale
            if all(sha256_json(stored["planting"].get(k)) == sha256_json(v) for k, v in _identity(model, truth).items()):
                return stored
    result = {"options_sha256": key, **run_planting(name, options, progress)}
    atomic_write_json(result, path)
    return result


# -- the whole board ------------------------------------------------------------------------------


def run_leaderboard(plantings: Sequence[str], options: BenchOptions, out: Path, workers: int = 0,
                    progress: bool = True, command: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Every cell (here, or on `workers` one-thread processes), then `results.json` and `table.md` in `out`."""
    from ..executor import one_thread_processes, run_cells

    if not plantings:
        raise ValueError("no plantings to score")
    out = Path(out)
    cells = [(name, options, out / "cells", progress and not workers) for name in plantings]
    if workers:
        with one_thread_processes(workers) as pool:
            results = run_cells(_cell, cells, pool, desc="plantings", progress=progress)
    else:
        results = run_cells(_cell, cells, desc="plantings", progress=progress)
    board = {
        "rows": [r for c in results for r in c["rows"]],
        "curves": [r for c in results for r in c["curves"]],
        "manifest": manifest(options, command, plantings={n: c["planting"] for n, c in zip(plantings, results)}),
    }
    atomic_write_json(board, out / "results.json")
    atomic_write_text(markdown_table(board["rows"]), out / "table.md")
    return board


def manifest(options: BenchOptions, command: str | None, **extra: Any) -> dict[str, Any]:
    """What a scored result rests on: options, each localizer's settings, goals, versions, commit, command."""
    return {"options": options.to_dict(), "localizers": {l.name: _jsonable(l.options()) for l in options.build()},
            **extra, "goals": GOALS, "versions": library_versions(), "git_commit": git_commit(), "command": command}  # fmt: skip


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


# -- the table ------------------------------------------------------------------------------------

TABLE_METRICS: tuple[str, ...] = (
    "unit_auroc", "average_precision", "iou_at_k", "site_auc", "sites_first", "family_first", "principal_angle",
    "faithfulness_removed_auc", "faithfulness_damage_auc", "inactive_site_auc", "seconds",
)  # fmt: skip


def _cell_text(row: dict | None) -> str:
    if row is None or row["value"] is None:
        return "n/a"
    value = row["value"]
    text = f"{value:.0f}" if row["metric"] == "seconds" else f"{value:.3f}"
    return text if row["met"] is None else f"{text} {'met' if row['met'] else 'not met'}"


def markdown_table(rows: Sequence[dict]) -> str:
    """Per half (dev, then test), one line per (planting, localizer) with the main metrics; goal
    metrics say met / not met in every cell."""
    index = {(r["planting"], r["localizer"], r["metric"]): r for r in rows}
    lines = ["Goals (best localizer, test half): " + "; ".join(f"{m} {op} {v:g}" for m, (op, v) in GOALS.items()), ""]
    for split in ("dev", "test"):
        keys = list(dict.fromkeys((r["planting"], r["family"], r["localizer"]) for r in rows if r["split"] == split))
        lines += [f"## {split} half", ""]
        if not keys:
            lines += ["(no plantings)", ""]
            continue
        lines.append("| planting | family | localizer | " + " | ".join(TABLE_METRICS) + " |")
        lines.append("|---" * (3 + len(TABLE_METRICS)) + "|")
        for planting, family, loc in keys:
            cells = [_cell_text(index.get((planting, loc, m))) for m in TABLE_METRICS]
            lines.append(f"| {planting} | {family} | {loc} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


GOAL_KINDS: dict[str, tuple[str, ...]] = {
    "ffn_units": ("unit_auroc", "iou_at_k", "sites_first", "family_first"),
    "lowrank": ("principal_angle", "sites_first", "family_first"),
}
"""Which goals apply to a planting family (the issue's: sparse plantings by units, rotated ones by
angle, every planting by site rank); any other family is held to the site-level goals."""


def goals_of(family: str) -> tuple[str, ...]:
    return GOAL_KINDS.get(family, ("sites_first", "family_first"))


def goal_summary(rows: Sequence[dict], split: str = "test") -> dict[str, Any]:
    """The issue's goals on one half: per localizer, how many (planting, goal) cells it meets; the
    best localizer (most cells met; ties: higher mean unit AUROC); and, per planting and goal, the
    best localizer's value and whether it meets the goal, beside the best value any localizer reached."""
    half = [r for r in rows if r["split"] == split and r["metric"] in GOALS]
    plantings = {r["planting"]: r["family"] for r in half}
    wanted = [(p, m) for p, f in plantings.items() for m in goals_of(f)]
    index = {(r["planting"], r["localizer"], r["metric"]): r for r in half}
    localizers = sorted({r["localizer"] for r in half})
    met = {loc: sum(bool((index.get((p, loc, m)) or {}).get("met")) for p, m in wanted) for loc in localizers}
    auroc = {loc: _mean([r["value"] for r in half if r["localizer"] == loc and r["metric"] == "unit_auroc"]) for loc in localizers}
    best = max(localizers, key=lambda loc: (met[loc], auroc[loc] if auroc[loc] is not None else -1.0), default=None)
    cells = []
    for p, m in wanted:
        row = index.get((p, best, m))
        values = [index[(p, loc, m)]["value"] for loc in localizers if (p, loc, m) in index and index[(p, loc, m)]["value"] is not None]
        op = GOALS[m][0]
        cells.append({"planting": p, "family": plantings[p], "metric": m, "goal": f"{op} {GOALS[m][1]:g}",
                      "best_localizer": best, "value": None if row is None else row["value"],
                      "met": None if row is None else row["met"],
                      "best_any": (max(values) if op == ">=" else min(values)) if values else None})  # fmt: skip
    return {"split": split, "cells_met": met, "cells": len(wanted), "best_localizer": best, "goals": cells}


def best_by_family(rows: Sequence[dict], metric: str, split: str = "test") -> dict[str, tuple[str, float]]:
    """Which localizer to trust for which kind of concept: per planting family of the half, the
    localizer with the best mean `metric` over that family's plantings (lowest for principal
    angles), and that mean. Families without a measured value are left out."""
    lower = metric in GOALS and GOALS[metric][0] == "<="
    out = {}
    for family in sorted({r["family"] for r in rows if r["split"] == split}):
        chosen = [r for r in rows if r["split"] == split and r["family"] == family and r["metric"] == metric]
        means = {loc: _mean([r["value"] for r in chosen if r["localizer"] == loc]) for loc in {r["localizer"] for r in chosen}}
        means = {loc: m for loc, m in sorted(means.items()) if m is not None}
        if means:
            winner = (min if lower else max)(means, key=means.get)
            out[family] = (winner, means[winner])
    return out


TRUST_METRICS = ("site_auc", "unit_auroc", "principal_angle")
"""What a user trusts a localizer for: the sites, the units and the subspace of a concept."""


def trust_table(rows: Sequence[dict], split: str = "test") -> str:
    """Markdown: per planting family of the half, the localizer to trust for each of `TRUST_METRICS`
    (`best_by_family`) with its mean, or n/a where the family's truth has no such part."""
    trust = {m: best_by_family(rows, m, split) for m in TRUST_METRICS}
    lines = [f"| kind of planting ({split} half) | best site ranking (mean site AUC) | best unit ranking (mean unit AUROC) "
             "| closest subspace (largest angle) |", "|---|---|---|---|"]  # fmt: skip
    for family in sorted({f for by in trust.values() for f in by}):
        cells = [f"{by[family][0]} ({by[family][1]:.3f})" if family in by else "n/a" for by in trust.values()]
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def trust_findings(rows: Sequence[dict], split: str = "test") -> list[str]:
    """Findings lines: the best localizer's goal cells on the half, and per planting family whom to
    trust for sites, units and subspace."""
    s = goal_summary(rows, split)
    out = [f"- benchmark, {split} half: the best localizer is {s['best_localizer']}, meeting "
           f"{s['cells_met'][s['best_localizer']]} of {s['cells']} goal cells; the thresholded ActErase mask "
           f"meets {s['cells_met'].get('acterase_mask', 0)}"]  # fmt: skip
    sites, units, subspace = (best_by_family(rows, m, split) for m in TRUST_METRICS)
    for family, (loc, value) in sites.items():
        unit, sub = units.get(family), subspace.get(family)
        out.append(f"- benchmark, {family} plantings: trust {loc} for sites (mean site AUC {value:.3f})"
                   + (f", {unit[0]} for units (mean unit AUROC {unit[1]:.3f})" if unit else "")
                   + (f", {sub[0]} for the subspace ({sub[1]:.1f} degrees)" if sub else ""))  # fmt: skip
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def heatmap(rows: Sequence[dict], metric: str, split: str | None = None) -> Any:
    """A plotly heat map of `metric`, localizers (rows) x plantings (columns), of one half or both."""
    from ..analysis.figures import heatmap as records_heatmap

    chosen = [r for r in rows if r["metric"] == metric and (split is None or r["split"] == split)]
    if not chosen:
        raise ValueError(f"no rows of metric {metric!r}" + (f" in the {split} half" if split else ""))
    return records_heatmap(chosen, x="planting", y="localizer", value="value", title=f"{metric} ({split or 'both halves'})")


def faithfulness_figure(curves: Sequence[dict], planting: str) -> Any:
    """The concept rate as each localizer's top-n units are patched (n on the grid, log axis; n = 0
    drawn at 0.5), one line per localizer, for one planting."""
    from ..analysis.figures import curves as curve_figure

    records = [{"localizer": c["localizer"], "n": max(n, 0.5), "concept_rate": rate}
               for c in curves if c["planting"] == planting for n, rate in zip(c["n"], c["concept_rate"])]  # fmt: skip
    if not records:
        raise ValueError(f"no faithfulness curves of planting {planting!r}")
    return curve_figure(records, "n", "concept_rate", group="localizer", log_x=True,
                        title=f"{planting}: concept rate as the top-n units are patched to the source mean")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/benchmark"))
    parser.add_argument("--plantings", nargs="+", default=None, help="default: every benchmark planting")
    parser.add_argument("--localizers", nargs="+", default=list(LOCALIZERS), choices=sorted(LOCALIZERS))
    parser.add_argument("--n-pairs", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--grid", type=int, nargs="+", default=list(FAITHFULNESS_GRID), help="faithfulness n grid")
    parser.add_argument("--causal-candidates", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="one-thread worker processes, one planting each (0: here)")
    args = parser.parse_args(argv)
    if args.plantings is None:
        from .plantings import PLANTINGS

        args.plantings = [p.name for p in PLANTINGS]
    options = BenchOptions(n_pairs=args.n_pairs, seeds=tuple(args.seeds), num_inference_steps=args.steps,
                           faithfulness_grid=tuple(args.grid), causal_candidates=args.causal_candidates,
                           localizers=tuple(args.localizers))  # fmt: skip
    board = run_leaderboard(args.plantings, options, args.out, args.workers,
                            command="python -m acterase_interp.bench.leaderboard " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(markdown_table(board["rows"]))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'table.md'}")
    return board


if __name__ == "__main__":
    main()
