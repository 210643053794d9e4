"""Where a concept lives in the UNet: correlational maps (how much the target run's activations
differ from the source run's, per site and denoising step, and over the image plane) and a causal
map (how much patching one layer during one window of steps erases the concept, and what it costs
non-target prompts), compared by rank correlation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from scipy.stats import spearmanr

from ..executor import Executor, run_cells
from ..patching import Window
from ..world.concept import as_concept
from .records import Record, column, group_mean

if TYPE_CHECKING:
    from ..erase import FitStatistics
    from .evaluation import Evaluator


def normalized_difference(target: torch.Tensor, source: torch.Tensor, dim: int | tuple[int, ...] = -1) -> torch.Tensor:
    """||target - source|| / ||source|| over `dim`: the size of the concept's change relative to
    the activation's own size, comparable across sites of different widths and scales."""
    if target.shape != source.shape:
        raise ValueError(f"target and source differ in shape: {tuple(target.shape)} vs {tuple(source.shape)}")
    t, s = target.double(), source.double()
    return ((t - s).norm(dim=dim) / s.norm(dim=dim).clamp_min(1e-12)).float()


def token_grid(values: torch.Tensor) -> torch.Tensor:
    """Per-token values (tokens,) as the square (h, w) feature map they came from (UNet
    transformer tokens are the flattened h x w latent grid, row-major)."""
    if values.ndim != 1:
        raise ValueError(f"expected one value per token, got shape {tuple(values.shape)}")
    side = math.isqrt(values.numel())
    if side * side != values.numel():
        raise ValueError(f"{values.numel()} tokens do not form a square feature map")
    return values.reshape(side, side)


def spatial_difference(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Where on the image plane the target run differs from the source run: for activations
    (..., tokens, units) (leading axes, e.g. pairs or steps, are averaged), the per-token norm of the
    difference divided by the mean per-token norm of the source, as an (h, w) map."""
    if target.shape != source.shape or target.ndim < 2:
        raise ValueError(f"need matching (..., tokens, units) activations, got {tuple(target.shape)} and {tuple(source.shape)}")
    diff = (target.double() - source.double()).norm(dim=-1)
    scale = source.double().norm(dim=-1).mean().clamp_min(1e-12)
    per_token = (diff / scale).reshape(-1, target.shape[-2]).mean(0)
    return token_grid(per_token.float())


def step_windows(num_steps: int, width: int, stride: int | None = None) -> list[Window]:
    """Windows of `width` steps every `stride` (default: `width`, no overlap) covering
    `num_steps`; the last window is cut short at `num_steps`."""
    if num_steps < 1 or width < 1:
        raise ValueError(f"num_steps and width must be positive, got {num_steps} and {width}")
    stride = stride or width
    if stride < 1:
        raise ValueError(f"stride must be positive, got {stride}")
    return [(start, min(start + width, num_steps)) for start in range(0, num_steps, stride)]


def causal_map(
    measure: Callable[[str, Window], float | Mapping[str, float]],
    layers: Sequence[str],
    windows: Sequence[Window],
    *,
    executor: Executor | None = None,
    progress: bool = True,
    **meta: Any,
) -> list[Record]:
    """Patch one layer during one window of steps at a time and record what `measure` reports.

    `measure(layer, window)` (a layer is a block name, or a tuple of them patched together) runs the intervention and returns a number (recorded as `value`) or a
    dict of named numbers (e.g. `{"concept_drop": ..., "damage": ...}`), so it can be a
    synthetic stand-in in tests or `eraser_measure(...)` on a real model. One row per (layer,
    window) with `layer`, `start`, `stop` and `meta` (seeds, options). With `executor`, every
    (layer, window) runs on a worker (`measure` must pickle: `eraser_measure` does when its
    evaluator is built from `Spec`s)."""
    if not layers or not windows:
        raise ValueError("causal_map needs at least one layer and one window")
    if executor is not None and hasattr(measure, "evaluator"):
        measure.evaluator.require_specs()
    cells = []
    for layer in layers:
        m = at_layer(measure, layer, executor)
        cells += [(m, layer, tuple(w), meta) for w in windows]
    return run_cells(_causal_cell, cells, executor, desc="causal map", progress=progress)


def _causal_cell(measure: Callable, layer: str, window: Window, meta: dict) -> Record:
    result = measure(layer, window)
    values = dict(result) if isinstance(result, Mapping) else {"value": float(result)}
    return {"layer": layer, "start": window[0], "stop": window[1], **values, **meta}


def window_mean(
    records: Iterable[Record], windows: Sequence[Window], value: str = "value", step: str = "step", by: str = "site"
) -> list[Record]:
    """Average a per-step map (rows with `by`, `step`, `value`) over step windows, so that a
    correlational site x step map lines up with a causal layer x window map."""
    rows = list(records)
    out = []
    for key in dict.fromkeys(r[by] for r in rows):
        for start, stop in windows:
            values = [float(r[value]) for r in rows if r[by] == key and start <= r[step] < stop]
            if values:
                out.append({by: key, "start": start, "stop": stop, value: sum(values) / len(values)})
    return out


def map_correlation(
    a: Iterable[Record], b: Iterable[Record], keys: Sequence[str], value_a: str = "value", value_b: str = "value"
) -> Record:
    """Spearman rank correlation between two maps given as rows, matched on `keys` (e.g.
    `("layer", "start")`): does the layer/step where the difference is large also matter causally?
    Returns `rho`, `p_value` and `n` (matched cells; cells only in one map are ignored)."""
    a, b = list(a), list(b)
    for rows, value in ((a, value_a), (b, value_b)):
        for k in (*keys, value):
            column(rows, k)  # a clear error for a missing field
    index = {tuple(r[k] for k in keys): float(r[value_b]) for r in b}
    pairs = [(float(r[value_a]), index[key]) for r in a if (key := tuple(r[k] for k in keys)) in index]
    if len(pairs) < 3:
        raise ValueError(f"only {len(pairs)} cells match on {tuple(keys)}; need at least 3 to correlate")
    x, y = zip(*pairs)
    result = spearmanr(x, y)
    return {"rho": float(result.statistic), "p_value": float(result.pvalue), "n": len(pairs)}


# -- on a fitted model -----------------------------------------------------------------------


def _meta(statistics: FitStatistics) -> Record:
    return {"concept": statistics.pairs.concept, "fit_seeds": list(statistics.seeds), "options": statistics.options.to_dict()}


def difference_map(statistics: FitStatistics) -> list[Record]:
    """The correlational map: per site (`site`, and its block as `layer`) and denoising `step`
    (with its `timestep`), `FitStatistics.difference()`, the mean |I_t - I_s| over pairs and
    units divided by the mean I_s -- how much the concept changes that site's importance then.
    Computed from stored statistics: no model run."""
    meta = _meta(statistics)
    out = []
    for site in statistics.sites:
        profile = statistics.difference()[site.name]
        for step, value in enumerate(profile.tolist()):
            out.append({"site": site.name, "layer": site.block, "step": step,
                        "timestep": statistics.timesteps[step], "value": value, **meta})  # fmt: skip
    return out


def spatial_map(statistics: FitStatistics, site: str, steps: Window | None = None) -> torch.Tensor:
    """Where on the feature map the concept changes `site`: `spatial_difference` of the target and
    source (token, unit) importances, averaged over pairs and the steps in `steps` (default all),
    as an (h, w) map. Needs a fit with `granularity="token_unit"`."""
    if not statistics.token_importance_source:
        raise ValueError("spatial maps need per-token statistics: fit with EraseOptions(granularity='token_unit')")
    if site not in statistics.token_importance_source:
        raise KeyError(f"no site {site!r} in this fit; it has {[s.name for s in statistics.sites]}")
    start, stop = steps or (0, statistics.num_steps)
    target = statistics.token_importance_target[site][:, start:stop]
    source = statistics.token_importance_source[site][:, start:stop]
    if target.shape[1] == 0:
        raise ValueError(f"steps {steps} select none of the {statistics.num_steps} fitted steps")
    return spatial_difference(target, source)


def site_profile(statistics: Mapping[str, FitStatistics]) -> list[Record]:
    """Which sites carry which concepts: per concept (and its ConceptWorld factor: shape, color or
    background; "concept" for other concepts) and site, the difference map averaged over steps
    (`value`) and its `share` of the concept's total over sites, comparable across concepts."""
    out = []
    for concept, stats in statistics.items():
        try:
            factor = as_concept(concept).factor
        except ValueError:
            factor = "concept"
        means = {s: p.mean().item() for s, p in stats.difference().items()}
        total = sum(means.values()) or 1.0
        for site in stats.sites:
            out.append({"concept": concept, "factor": factor, "site": site.name, "layer": site.block,
                        "value": means[site.name], "share": means[site.name] / total,
                        "fit_seeds": list(stats.seeds), "options": stats.options.to_dict()})  # fmt: skip
    return out


def layers_of(statistics: FitStatistics) -> list[str]:
    """The fitted blocks, in execution order: the "layers" a causal map patches one at a time."""
    return list(dict.fromkeys(s.block for s in statistics.sites))


DIRECTIONS: tuple[str, ...] = ("erase", "restore")
"""Causal tests: `erase` patches the concept out of target prompts (source values in the window),
`restore` puts it back into source prompts (the concept's values only in the window)."""

SEED_FIELDS: tuple[str, ...] = ("concept_rate", "baseline_concept_rate", "concept_drop", "preservation", "image_distance")


def check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r} is not one of {DIRECTIONS}")


def seed_summary(rows: Sequence[Record], direction: str = "erase") -> Record:
    """Evaluator rows of one cell (one per seed) as seed means with `_sem`, `_low` and `_high` of
    `SEED_FIELDS` present in every row. `concept_drop` is signed so that positive means the window
    carries the concept: unpatched minus patched rate when erasing, patched minus unpatched when
    restoring. Erasing adds `damage` = 1 - preservation (restoring puts the concept in on
    purpose: its non-target cost means nothing)."""
    check_direction(direction)
    sign = 1.0 if direction == "erase" else -1.0
    out: Record = {}
    for key in SEED_FIELDS:
        if rows and all(key in r for r in rows):
            signed = [{key: sign * r[key] if key == "concept_drop" else r[key]} for r in rows]
            summary = group_mean(signed, (), key)[0]
            out.update({k: summary[k] for k in (key, f"{key}_sem", f"{key}_low", f"{key}_high")})
    if "preservation" in out and direction == "erase":
        out.update(damage=1.0 - out["preservation"], damage_sem=out["preservation_sem"],
                   damage_low=1.0 - out["preservation_high"], damage_high=1.0 - out["preservation_low"])  # fmt: skip
    return out


def _blocks(layer: str | Sequence[str]) -> tuple[str, ...]:
    return (layer,) if isinstance(layer, str) else tuple(layer)


@dataclass(frozen=True, eq=False)  # holds tensors: equality is identity
class EraserMeasure:
    """The real `measure` for `causal_map` (see `eraser_measure`); a dataclass so it pickles."""

    statistics: FitStatistics
    evaluator: Evaluator
    tau: float
    seeds: tuple[int, ...]
    overrides: dict
    direction: str = "erase"

    def __call__(self, layer: str | Sequence[str], window: Window) -> Record:
        return self.at(layer)(layer, window)

    def at(self, layer: str | Sequence[str]) -> LayerMeasure:
        """This measure at one layer, its eraser built here: what a sweep sends to a worker (an
        eraser of a few blocks, not the whole fit's statistics)."""
        values = "target" if self.direction == "restore" else "source"
        eraser = self.statistics.eraser(tau=self.tau, blocks=_blocks(layer), values=values, **self.overrides)
        meta = {"tau": self.tau, "seeds": list(self.seeds), **_meta(self.statistics), **self.overrides}
        return LayerMeasure(eraser, _blocks(layer), self.evaluator, self.seeds, self.direction, meta)


@dataclass(frozen=True, eq=False)  # holds tensors: equality is identity
class LayerMeasure:
    """`EraserMeasure.at(layer)`: the eraser of one layer (a block or a window of blocks), scored
    by the evaluator on every seed during the window of steps it is called with."""

    eraser: Any
    blocks: tuple[str, ...]
    evaluator: Evaluator
    seeds: tuple[int, ...]
    direction: str
    meta: Record

    def __call__(self, layer: str | Sequence[str], window: Window) -> Record:
        if _blocks(layer) != self.blocks:
            raise ValueError(f"this measure's eraser patches {list(self.blocks)}, not {list(_blocks(layer))}")
        rows = [self.evaluator(self.eraser, s, steps=window) for s in self.seeds]
        return dict(self.meta) | seed_summary(rows, self.direction)


def at_layer(measure: Callable, layer: str | Sequence[str], executor: Executor | None) -> Callable:
    """What a cell at `layer` carries: with an executor, `measure.at(layer)` where the measure
    builds per layer (an `EraserMeasure`), so the cell pickles one layer's eraser, built once here,
    instead of the fit's statistics; run serially, the measure itself (it builds per cell)."""
    return measure.at(layer) if executor is not None and isinstance(measure, EraserMeasure) else measure


def eraser_measure(
    statistics: FitStatistics,
    evaluator: Evaluator,
    tau: float = 0.01,
    seeds: Sequence[int] = (0, 1, 2),
    direction: str = "erase",
    **overrides: Any,
) -> EraserMeasure:
    """The real `measure` for `causal_map`: the fit's eraser restricted to one block or a window
    of blocks (`FitStatistics.eraser(tau, blocks=...)`, no model run) and switched on during one
    window of steps, scored by `evaluator` on every seed: `seed_summary` of its rows
    (`concept_rate`, `concept_drop`, `preservation`, `damage`, `image_distance`, with `_sem`).
    `direction="restore"` puts the target's values in instead (`values="target"`): give an
    evaluator whose target prompts are the pairs' sources, so its concept rate rises."""
    check_direction(direction)
    return EraserMeasure(statistics, evaluator, tau, tuple(seeds), overrides, direction)
