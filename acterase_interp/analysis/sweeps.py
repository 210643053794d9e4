"""Ablations: a tau sweep traced as an erasure-vs-preservation Pareto curve, each open choice of
the method at its best tau, and multi-concept scaling. Masks for a new tau, time mask, pair
combination or layer subset come from stored fit statistics, so only generation is repeated.

Every sweep takes an `executor` (see `acterase_interp.executor`): its fits and cells then run on
the executor's workers, with the same rows in the same order as the serial run."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from ..erase import EraseOptions, Eraser, EraserFitter, FitStatistics, PromptPairs, merge
from ..evaluation.core import REPLICATE_STRIDE
from ..executor import Executor, require_spec, resolve, run_cells
from .evaluation import Evaluator
from .records import Record, summarize

PAPER_TAUS: tuple[float, ...] = (0.01, 0.02)
"""The paper's thresholds, always part of a tau grid so the Pareto plot can mark them."""

PAIR_SEED_STRIDE = REPLICATE_STRIDE
"""Replicate seed s fits with `EraseOptions.seed = s * PAIR_SEED_STRIDE` (pair i: that plus i), the
stride of every replicate (`evaluation.core`), so fit noise never meets evaluation noise."""

SUMMARY_FIELDS: tuple[str, ...] = (
    "concept_rate", "heldout_concept_rate", "concept_drop", "non_target_accuracy", "preservation",
    "image_distance", "mask_density",
)  # fmt: skip
"""The evaluation fields `summarize` averages over seeds in sweep summaries."""


def tau_grid(n: int = 8, low: float = 1e-3, high: float = 0.2, include: Sequence[float] = PAPER_TAUS) -> list[float]:
    """`n` log-spaced taus from `low` to `high`, plus `include` (the paper's taus), sorted."""
    if n < 2 or not 0 < low < high:
        raise ValueError(f"need n >= 2 and 0 < low < high, got n={n}, low={low}, high={high}")
    step = (math.log(high) - math.log(low)) / (n - 1)
    grid = {round(math.exp(math.log(low) + i * step), 12) for i in range(n)} | set(include)
    return sorted(grid)


def pareto_front(
    records: Iterable[Record], x: str = "concept_rate", y: str = "preservation", x_lower: bool = True, y_higher: bool = True
) -> list[Record]:
    """The records no other record beats on both `x` and `y` (by default: a lower concept rate and
    a higher preservation are better), sorted by `x`. Ties on both are all kept."""
    rows = list(records)
    sx, sy = (1 if x_lower else -1), (-1 if y_higher else 1)  # turn both into "smaller is better"
    key = [(sx * _number(r[x]), sy * _number(r[y])) for r in rows]

    def dominated(i: int) -> bool:
        a, b = key[i]
        return any(c <= a and d <= b and (c < a or d < b) for c, d in key)

    front = [r for i, r in enumerate(rows) if not dominated(i)]
    return sorted(front, key=lambda r: float(r[x]))



def margin(row: Record) -> float:
    """The default trade-off score of a tau: preservation minus concept rate (both shares, so a
    perfect eraser scores 1 and doing nothing scores about 1 - the baseline concept rate)."""
    return _number(row["preservation"]) - _number(row["concept_rate"])


def _number(value: float | None) -> float:
    """A record's value as a float; None (undefined, see `metrics.preservation`) is NaN."""
    return math.nan if value is None else float(value)


def _fit(model: Any, pairs: PromptPairs, options: EraseOptions, seed: int, progress: bool) -> FitStatistics:
    """The statistics of one replicate fit (a cell: `model` may be a `Spec`)."""
    fitter = EraserFitter(resolve(model), replace(options, seed=seed * PAIR_SEED_STRIDE), progress=progress)
    fitter.fit(pairs)
    return fitter.statistics


def _check_executor(executor: Executor | None, model: Any = None, evaluator: Any = None) -> None:
    """Clear errors, before any work, for what cannot travel to an executor's workers."""
    if executor is None:
        return
    if model is not None:
        require_spec(model, "model")
    if evaluator is not None:
        evaluator.require_specs()


def fit_seeds(
    model: Any,
    pairs: PromptPairs,
    options: EraseOptions | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    *,
    executor: Executor | None = None,
    progress: bool = True,
) -> dict[int, FitStatistics]:
    """One fit per replicate seed (fresh initial noise for every pair), as statistics to re-threshold;
    on `executor`'s workers if given (then `model` is a `Spec`)."""
    options = options or EraseOptions()
    seeds = list(seeds)
    _check_executor(executor, model)
    inner = progress and executor is None and len(seeds) == 1  # one fit: show its own bar
    cells = [(model, pairs, options, s, inner) for s in seeds]
    stats = run_cells(_fit, cells, executor, desc="fit seeds", progress=progress and not inner)
    return dict(zip(seeds, stats))


def _by_seed(statistics: FitStatistics | Mapping[int, FitStatistics], seeds: Sequence[int] | None) -> dict[int, FitStatistics]:
    """Replicates: a mapping seed -> statistics (one fit per seed), or one fit scored on `seeds`."""
    if isinstance(statistics, Mapping):
        if seeds is not None and set(seeds) != set(statistics):
            raise ValueError(f"seeds {list(seeds)} differ from the fitted seeds {sorted(statistics)}")
        return dict(statistics)
    return {s: statistics for s in (seeds if seeds is not None else (0, 1, 2))}


def tau_sweep(
    statistics: FitStatistics | Mapping[int, FitStatistics],
    evaluator: Evaluator,
    taus: Sequence[float] | None = None,
    seeds: Sequence[int] | None = None,
    *,
    executor: Executor | None = None,
    progress: bool = True,
    **overrides: Any,
) -> list[Record]:
    """Evaluate the eraser of every tau (default `tau_grid()`), re-thresholding stored statistics
    (no model run for the masks), for every replicate seed: one row per (tau, seed) with the
    evaluator's fields. `overrides` (time_mask, blocks, ...) go to `FitStatistics.eraser`. With
    `executor`, every (tau, seed) cell runs on a worker (the evaluator built from `Spec`s)."""
    taus = list(taus) if taus is not None else tau_grid()
    fits = _by_seed(statistics, seeds)
    _check_executor(executor, evaluator=evaluator)
    cells = [(_carried(fits[s], tau, overrides, executor), evaluator, tau, s, overrides) for tau in taus for s in fits]
    return run_cells(_tau_cell, cells, executor, desc="tau sweep", progress=progress)


def _carried(fit: FitStatistics, tau: float, overrides: dict, executor: Executor | None) -> FitStatistics | Eraser:
    """What a tau cell carries: a cell that travels to a worker, its eraser built here (not the
    fit's statistics); a serial one, the statistics (the eraser is built in the cell)."""
    return fit.eraser(tau=tau, **overrides) if executor is not None else fit


def _tau_cell(fit: FitStatistics | Eraser, evaluator: Evaluator, tau: float, seed: int, overrides: dict) -> Record:
    """One tau sweep row: the eraser re-thresholded at `tau` (built from statistics, or given
    built) scored on one seed."""
    eraser = fit.eraser(tau=tau, **overrides) if isinstance(fit, FitStatistics) else fit
    density = eraser.mask_density()
    return evaluator(eraser, seed, tau=tau, mask_density=sum(density.values()) / len(density),
                     **{k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()})  # fmt: skip


def best_tau(
    records: Iterable[Record], by: Sequence[str] = (), score: Callable[[Record], float] = margin
) -> dict[tuple, float]:
    """Per group of `by`, the tau whose mean `score` over seeds is highest (default: `margin`)."""
    per: dict[tuple, dict[float, list[float]]] = {}
    for r in records:
        per.setdefault(tuple(r[k] for k in by), {}).setdefault(r["tau"], []).append(score(r))
    return {key: max(taus, key=lambda t: sum(taus[t]) / len(taus[t])) for key, taus in per.items()}


def _label(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "+".join(map(str, value))
    return str(value)


def _fit_key(options: EraseOptions) -> EraseOptions:
    """The options that need a model run: re-thresholding options reset, all blocks fitted."""
    default = EraseOptions()
    return replace(options, tau=default.tau, tau_mode=default.tau_mode, time_mask=default.time_mask,
                   pair_combine=default.pair_combine, blocks=None)  # fmt: skip


def _statistics_by_pairs(
    model: Any, pairs: PromptPairs, options: EraseOptions, counts: Sequence[int], seed: int, progress: bool
) -> dict[int, FitStatistics]:
    """Statistics after the first n pairs, for every n in `counts`, from one streaming fit (a cell:
    `model` may be a `Spec`)."""
    if max(counts) > len(pairs) or min(counts) < 1:
        raise ValueError(f"pair counts {list(counts)} must lie in [1, {len(pairs)}]")
    fitter = EraserFitter(resolve(model), replace(options, seed=seed * PAIR_SEED_STRIDE), progress=progress)
    out = {}
    for n, (target, source) in enumerate(pairs, 1):
        if n > max(counts):
            break
        fitter.update(target, source)
        if n in counts:
            subset = PromptPairs(pairs.concept, pairs.targets[:n], pairs.sources[:n], pairs.heldout, pairs.non_target, pairs.meta)
            out[n] = replace(fitter.statistics, pairs=subset)
    return out


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    """A cell that runs `fn(*args)`: lets fits of different kinds share one submission."""
    return fn(*args)


_OVERRIDES = ("tau_mode", "time_mask", "pair_combine", "blocks", "granularity")


def choice_ablation(
    evaluator: Evaluator,
    pairs: PromptPairs,
    choices: Mapping[str, Sequence[Any]],
    *,
    base: EraseOptions | None = None,
    taus: Sequence[float] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    score: Callable[[Record], float] = margin,
    executor: Executor | None = None,
    progress: bool = True,
) -> tuple[list[Record], list[Record]]:
    """Each open choice of the method at its best tau.

    `choices` maps an `EraseOptions` field (site_kind, granularity, time_mask, cfg_rows, blocks,
    pair_combine, value_mode, ...) or `"num_pairs"` to the values to try, e.g.
    `{"time_mask": ["union", "last"], "blocks": [None, ("down",), ("mid",), ("up",)], "num_pairs": [1, 2, 5, 10]}`.
    Every value is fitted once per seed (fits are shared when only re-thresholding options differ;
    the pair counts come from one streaming fit), swept over `taus`, and summarised at the tau with
    the best mean `score`. Returns `(rows, best)`: every (choice, value, tau, seed) row, and one
    summary row per (choice, value) with means, `_sem`/`_low`/`_high` over seeds and its `tau`.
    With `executor`, the fits and then the (choice, value, seed, tau) cells run on its workers."""
    base = base or EraseOptions()
    taus = list(taus) if taus is not None else tau_grid()
    model = evaluator.model_source
    _check_executor(executor, model, evaluator)
    cells = [(name, value, s) for name, values in choices.items() for value in values for s in seeds]
    # 1. every distinct fit, once: a streaming fit per seed gives all pair counts
    jobs: dict[tuple, tuple] = {}
    for name, value, s in cells:
        if name == "num_pairs":
            counts = sorted({int(v) for v in choices["num_pairs"]})
            jobs[("num_pairs", s)] = (_statistics_by_pairs, model, pairs, _fit_key(base), counts, s, False)
        else:
            options = _fit_key(replace(base, **{name: value}))
            jobs[(options, s)] = (_fit, model, pairs, options, s, False)
    done = dict(zip(jobs, run_cells(_call, list(jobs.values()), executor, desc="choice fits", progress=progress)))
    # 2. every (choice, value, seed) swept over the taus
    sweep, labels = [], []
    for name, value, s in cells:
        if name == "num_pairs":
            options, stats = base, done[("num_pairs", s)][int(value)]
        else:
            options = replace(base, **{name: value})
            stats = done[(_fit_key(options), s)]
        overrides = {k: getattr(options, k) for k in _OVERRIDES}
        sweep += [(_carried(stats, tau, overrides, executor), evaluator, tau, s, overrides) for tau in taus]
        labels += [{"choice": name, "value": _label(value)}] * len(taus)
    results = run_cells(_tau_cell, sweep, executor, desc="choice ablation", progress=progress)
    rows: list[Record] = [{**label, **row} for label, row in zip(labels, results)]
    best = []
    for (name, value), tau in best_tau(rows, ("choice", "value"), score).items():
        at = [r for r in rows if r["choice"] == name and r["value"] == value and r["tau"] == tau]
        best.extend(summarize(at, ("choice", "value", "tau"), SUMMARY_FIELDS))
    return rows, best


def multi_concept_scaling(
    statistics: Mapping[str, FitStatistics | Mapping[int, FitStatistics]],
    concept_evaluators: Mapping[str, Evaluator],
    preservation: Evaluator,
    counts: Sequence[int] = (1, 2, 4, 8),
    tau: float = 0.01,
    seeds: Sequence[int] | None = None,
    *,
    executor: Executor | None = None,
    progress: bool = True,
) -> list[Record]:
    """Merge the erasers of the first n concepts (in `statistics` order; Eqs. 7-9) for every n in
    `counts` and replicate seed: one row per (n, seed) with the mean `concept_rate` (and
    `concept_drop`) over the merged concepts, each scored by its own evaluator (target prompts
    only is enough), and the `preservation` evaluator's fields on prompts that show none of the
    concepts (see `evaluation.prompts_without`). With `executor`, every (n, seed) runs on a worker."""
    concepts = list(statistics)
    if max(counts) > len(concepts) or min(counts) < 1:
        raise ValueError(f"concept counts {list(counts)} must lie in [1, {len(concepts)}] (concepts: {concepts})")
    missing = [c for c in concepts[: max(counts)] if c not in concept_evaluators]
    if missing:
        raise ValueError(f"no evaluator for concept(s) {missing}")
    fits = {c: _by_seed(statistics[c], seeds) for c in concepts}
    replicate = sorted(fits[concepts[0]])
    uneven = [c for c in concepts if sorted(fits[c]) != replicate]
    if uneven:
        raise ValueError(f"concept(s) {uneven} were fitted on other seeds than {concepts[0]!r} ({replicate})")
    for e in (preservation, *(concept_evaluators[c] for c in concepts[: max(counts)])):
        _check_executor(executor, evaluator=e)
    cells = [({c: fits[c][s] for c in concepts[:n]}, [concept_evaluators[c] for c in concepts[:n]], preservation, s, tau)
             for n in counts for s in replicate]  # fmt: skip
    return run_cells(_merged_cell, cells, executor, desc="multi-concept", progress=progress)


def _merged_cell(
    fits: Mapping[str, FitStatistics], evaluators: Sequence[Evaluator], preservation: Evaluator, seed: int, tau: float
) -> Record:
    """One multi-concept row: the merged eraser of `fits` (concept -> statistics) scored by each
    concept's evaluator and by `preservation`."""
    merged = merge([f.eraser(tau=tau) for f in fits.values()])
    concepts = list(fits)
    per = [e(merged, seed) for e in evaluators]
    n = len(fits)
    row = preservation(merged, seed, n_concepts=n, tau=tau, concepts=concepts)
    row["concept_rate"] = sum(r["concept_rate"] for r in per) / n
    row["concept_drop"] = sum(r["concept_drop"] for r in per) / n
    row["concept_rates"] = {c: r["concept_rate"] for c, r in zip(concepts, per)}
    return row


def ablation_findings(
    sweeps: Mapping[str, Sequence[Record]],
    auto_taus: Mapping[str, float | None],
    choices: Mapping[str, Sequence[Record]],
    *,
    works: float = 0.1,
    matters: float = 0.1,
) -> list[str]:
    """Notebook 04's findings, one line each, computed from its outputs: per concept, its tau sweep
    summary (`summarize` rows by tau) at the best tau by margin, at the paper's taus and at the
    automatic tau, with the Pareto front; per ablated concept (`choices`: `choice_ablation`'s best
    rows), each choice's best value and its spread of margins over values. Last, across the concepts
    the method erases (a tau with concept rate <= `works`), the choices whose spread exceeds
    `matters` in every one of them and those that stay within it in every one."""
    lines, erased, spreads = [], [], {}
    for concept, sweep in sweeps.items():
        at = {r["tau"]: r for r in sweep}
        front = {r["tau"] for r in pareto_front(sweep)}
        star = max(sweep, key=margin)
        lines.append(f"- {concept}: best tau by margin {star['tau']:g} -> {_rates(star)}")
        lines += [f"  - paper's tau {t:g}: {_rates(at[t])}, on the Pareto front: {t in front}" for t in PAPER_TAUS if t in at]
        auto = auto_taus.get(concept)
        lines.append(f"  - automatic tau {auto:g} (fit targets, first fit): {_rates(at[auto])}, on the Pareto front: "
                     f"{auto in front}" if auto is not None else  # fmt: skip
                     "  - automatic tau: none of its candidates left the fit targets at <= 5%")
        lines.append(f"  - Pareto front: taus {sorted(front)}")
        if min(_number(r["concept_rate"]) for r in sweep) <= works:
            erased.append(concept)
        spreads[concept] = {}
        for name, spread, winner in _choice_spreads(choices.get(concept, ())):
            spreads[concept][name] = spread
            lines.append(f"  - {name}: best {winner['value']} at tau {winner['tau']:g} (margin {margin(winner):.3f}; "
                         f"spread over values {spread:.3f})")  # fmt: skip
    studied = [c for c in erased if c in choices]
    if studied:
        names = [n for n in spreads[studied[0]] if all(n in spreads[c] for c in studied)]
        big = [n for n in names if all(spreads[c][n] > matters for c in studied)]
        small = [n for n in names if all(spreads[c][n] <= matters for c in studied)]
        lines.append(f"- where the method erases ({', '.join(studied)}), choices whose margin spread exceeds {matters:g} "
                     f"in each: {big or 'none'}; within {matters:g} in each: {small or 'none'}")  # fmt: skip
    lines.append(f"- concepts no tau brings to <= {works:g}: {[c for c in sweeps if c not in erased] or 'none'}")
    return lines


def _rates(row: Record) -> str:
    return (f"concept rate {_number(row['concept_rate']):.3f}, held-out rate {_number(row['heldout_concept_rate']):.3f}, "
            f"preservation {_number(row['preservation']):.3f}")  # fmt: skip


def _choice_spreads(best: Sequence[Record]) -> list[tuple[str, float, Record]]:
    """Per choice (in order of appearance): the spread of margins over its values and the best value's row."""
    out = []
    for name in dict.fromkeys(r["choice"] for r in best):
        rows = [r for r in best if r["choice"] == name]
        scores = [margin(r) for r in rows]
        out.append((name, max(scores) - min(scores), max(rows, key=margin)))
    return out
