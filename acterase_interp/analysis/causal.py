"""One causal sweep: patch one window of layers during one window of steps at a time, in each
family of sites and in both directions, with the same prompts, seeds and metric everywhere, so
that families and layers compare fairly.

- `erase`: the pairs' target prompts, with the sources' values in the window. Activation families
  (`ffn_hidden`, `attn2_out`, ...: any site kind) use the fit's eraser restricted to the window's
  blocks; `text` injects each pair's source prompt into the window's blocks' cross-attention;
  `text_encoder` gives the targets the sources' hidden states at the window's text-encoder layers.
- `restore`: the pairs' source prompts, with the concept's values only in the window: the same
  masks holding the target's mean activations (`FitStatistics.eraser(values="target")`), or each
  pair's target prompt injected (its text, or its text-encoder states).

Layer windows are UNet block names for every family but `text_encoder`, whose windows are layers
of one text encoder named `<encoder>.<index>` (`text_encoder.3`; SDXL's second encoder
`text_encoder_2.3`; `text_layers(pipe)` lists them). The text encoder runs once per image, before
denoising, so that family is swept over the whole run only.

`concept_drop` is positive when the window carries the concept, in either direction. Statistics
are fitted once per family (or given) and reused by every cell; the cells run through
`run_cells`, with one progress bar, here or on an `executor`'s workers.

Reading a sweep: `best_cells` (the strongest cell per concept and family, optionally above a
preservation floor) and `difference_vs_causal` (per family, does the difference map rank the
blocks as the sweep does?).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..erase import EraseOptions, EraserFitter, FitStatistics, PromptPairs
from ..erase._util import site_table
from ..executor import Executor, require_spec, resolve, run_cells
from ..patching import Window, unet_of
from ..sites import SITE_KINDS, TEXT_LAYER, UNET_OUT, dit_kinds, is_dit, select_sites
from ..text_layers import TextLayerInjection, encoder_layers, parse_text_layers, text_layers
from .evaluation import Evaluator
from .localization import (DIRECTIONS, _blocks, _causal_cell, at_layer, check_direction, eraser_measure, map_correlation,
                           seed_summary)
from .records import Record, group_mean

if TYPE_CHECKING:
    from ..metrics import Classifier

TEXT = "text"
"""The text-injection family: a prompt's text embedding swapped in a window of blocks' cross-attention."""
TEXT_ENCODER = "text_encoder"
"""The text-encoder family: a prompt's hidden states swapped at a window of text-encoder layers."""
INJECTIONS = (TEXT, TEXT_ENCODER)
"""The families measured by injecting the paired prompt (`InjectionMeasure`), not by an eraser."""

FIELDS: tuple[str, ...] = tuple(
    f"{key}{suffix}" for key in ("concept_rate", "baseline_concept_rate", "concept_drop", "damage", "preservation", "image_distance")
    for suffix in ("", "_sem", "_low", "_high")
)  # fmt: skip
"""The measured fields of every sweep record (None where a cell does not measure one)."""


def sweep_families() -> tuple[str, ...]:
    """The families a sweep can patch: every site kind of the transformer blocks, `text` and
    `text_encoder` (which sweeps text-encoder layers by injection, so `text_layer` sites are not a family)."""
    return (*(k for k in SITE_KINDS if k not in (UNET_OUT, TEXT_LAYER)), *INJECTIONS)


def layer_windows(blocks: Sequence[str], width: int = 1, stride: int | None = None) -> list[tuple[str, ...]]:
    """Windows of `width` consecutive `blocks` (give them in execution order, e.g. `layers_of`)
    every `stride` (default: `width`, no overlap); the last window is cut short, as in `step_windows`."""
    blocks = list(blocks)
    if not blocks or width < 1:
        raise ValueError(f"need at least one block and a positive width, got {len(blocks)} blocks and width {width}")
    stride = stride or width
    if stride < 1:
        raise ValueError(f"stride must be positive, got {stride}")
    return [tuple(blocks[i : i + width]) for i in range(0, len(blocks), stride)]


def window_label(layers: Sequence[str]) -> str:
    """`up.1.1` for one block, `up.1.0-up.1.1` for a window (first and last block)."""
    return layers[0] if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"


def _text_injection() -> type:
    try:
        from ..generation import TextInjection
    except ImportError as err:
        raise ImportError(
            "the 'text' family needs acterase_interp.generation.TextInjection (prompt injection into chosen "
            "blocks' cross-attention), which this version of the package lacks"
        ) from err
    return TextInjection


@dataclass(frozen=True, eq=False)  # holds an evaluator: equality is identity
class InjectionMeasure:
    """The measure of an injection family for `causal_map`: every prompt of `evaluator`'s one
    prompt set generated with its own `donors` prompt injected, scored on every seed
    (`seed_summary`). `text`: into the window's blocks' cross-attention during the window of steps;
    `text_encoder`: at the window's text-encoder layers. A dataclass so it pickles."""

    evaluator: Evaluator
    donors: tuple[str, ...]
    """One injected prompt per generated image, in the evaluator's order."""
    seeds: tuple[int, ...]
    direction: str
    family: str = TEXT

    def __call__(self, layer: str | Sequence[str], window: Window) -> Record:
        rows = [self.evaluator(None, s, inject=self.injection(layer, window)) for s in self.seeds]
        return {"tau": None, "seeds": list(self.seeds), "concept": self.evaluator.concept} | seed_summary(rows, self.direction)

    def injection(self, layer: str | Sequence[str], window: Window) -> Any:
        """The injection of one cell (the text encoder runs before denoising: `window` is the whole run)."""
        if self.family == TEXT_ENCODER:
            encoder, indices = parse_text_layers(_blocks(layer))
            return TextLayerInjection(self.donors, indices, encoder)
        return _text_injection()(prompts=list(self.donors), blocks=_blocks(layer), steps=tuple(window))


def _check(model: Any, family: str, windows: Sequence[tuple[str, ...]], steps: Sequence[Window], n: int) -> None:
    """Clear errors, before any fit, for windows the family cannot patch."""
    if family not in sweep_families():
        raise ValueError(f"unknown family {family!r}; choose from {sweep_families()}")
    if not windows or not steps:
        raise ValueError(f"family {family!r}: the sweep needs at least one layer window and one step window")
    for start, stop in steps:
        if not 0 <= start < stop <= n:
            raise ValueError(f"step window ({start}, {stop}) is not inside the {n} denoising steps")
    if any(not w for w in windows):
        raise ValueError(f"family {family!r}: an empty layer window patches nothing")
    if family == TEXT_ENCODER:
        _check_text_layers(model, windows, steps, n)
        return
    dit = is_dit(unet_of(model))
    kind = _block_kind(model) if family == TEXT else dit_kinds(family) if dit else family
    table = site_table(unet_of(model))
    for w in windows:
        if not select_sites(table, kind, list(w)):  # unknown blocks: a clear error naming the known ones
            raise ValueError(f"family {family!r}: the window {list(w)} has no {family!r} sites on this model")


def _block_kind(model: Any) -> str:
    """A kind every block has once, listing the blocks text reaches: a UNet's cross-attention
    outputs; a DiT's block outputs (its text stream runs through every block)."""
    return "img_out" if is_dit(unet_of(model)) else "attn2_out"


def _check_text_layers(model: Any, windows: Sequence[tuple[str, ...]], steps: Sequence[Window], n: int) -> None:
    if [tuple(s) for s in steps] != [(0, n)]:
        raise ValueError(f"family {TEXT_ENCODER!r}: the text encoder runs once per image, before denoising; sweep it "
                         f"over the whole run (step_windows=None or [(0, {n})]), not {list(steps)}")  # fmt: skip
    for w in windows:
        encoder, indices = parse_text_layers(w)
        count = len(encoder_layers(model.pipeline, encoder))
        if bad := [i for i in indices if i >= count]:
            raise ValueError(f"family {TEXT_ENCODER!r}: {encoder} has {count} layers (0 to {count - 1}), got {bad}")


def _fit(model: Any, pairs: PromptPairs, family: str, options: EraseOptions, restorable: bool,
         progress: bool) -> FitStatistics:
    fitter = EraserFitter(model, replace(options, site_kind=family), restorable=restorable, progress=progress)
    fitter.fit(pairs)
    return fitter.statistics


def _given(statistics: FitStatistics, family: str, pairs: PromptPairs) -> FitStatistics:
    if statistics.options.site_kind != family or statistics.pairs.concept != pairs.concept:
        raise ValueError(f"the statistics given for {family!r} were fitted at {statistics.options.site_kind!r} "
                         f"for {statistics.pairs.concept!r}, not at {family!r} for {pairs.concept!r}")  # fmt: skip
    return statistics


def causal_sweep(
    model: Any,
    classifier: Classifier,
    pairs: PromptPairs,
    families: str | Sequence[str] = ("ffn_hidden",),
    layer_windows: Sequence[Sequence[str]] | None = None,
    step_windows: Sequence[Window] | None = None,
    directions: str | Sequence[str] = DIRECTIONS,
    *,
    tau: float | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    statistics: Mapping[str, FitStatistics] | None = None,
    options: EraseOptions | None = None,
    evaluation: Mapping[str, Any] | None = None,
    executor: Executor | None = None,
    progress: bool = True,
    **overrides: Any,
) -> list[Record]:
    """One record per (family, layer window, step window, direction): see the module docstring.

    `layer_windows`: tuples of block names patched together (`layer_windows(layers_of(stats), 2)`;
    for `text_encoder`, of text-encoder layer names: `layer_windows(text_layers(pipe), 2)`);
    None: every block (text-encoder layer) of the family alone. `step_windows`: (start, stop) denoising steps
    (`step_windows(n, width)`); None: the whole run. Activation families are fitted once each with
    `options` (default `EraseOptions()` at the evaluation's step count) unless `statistics[family]`
    is given; `tau` (None: the fit's) and `overrides` (e.g. `granularity="unit"`) build the
    erasers. `evaluation` goes to every `Evaluator` (num_inference_steps, images_per_prompt, ...).

    Fields: `family`, `layers`, `layer_label`, `start`, `stop`, `direction`, `FIELDS` (seed means
    with `_sem` and t intervals `_low`/`_high`; `baseline_concept_rate` is the unpatched run's;
    `damage`, `preservation` and `image_distance` only when erasing an activation family, whose
    evaluator also runs the pairs' non-target prompts), `seeds`, `tau`, `concept`, `fit_seeds`,
    `options` (of the fit), `eval_options`. With `executor`, `model` and `classifier` are `Spec`s
    and every cell runs on a worker; the fits run here."""
    families = (families,) if isinstance(families, str) else tuple(families)
    directions = (directions,) if isinstance(directions, str) else tuple(directions)
    if not families or not directions:
        raise ValueError("the sweep needs at least one family and one direction")
    for d in directions:
        check_direction(d)
    evaluation = dict(evaluation or {})
    loaded = resolve(model)
    n = evaluation.get("num_inference_steps") or loaded.defaults.num_inference_steps
    steps = [tuple(w) for w in step_windows] if step_windows is not None else [(0, n)]
    blocks = list(dict.fromkeys(s.block for s in select_sites(site_table(unet_of(loaded)), _block_kind(loaded))))
    windows = [tuple(w) for w in layer_windows] if layer_windows is not None else None
    if TEXT_ENCODER in families and is_dit(unet_of(loaded)):
        raise ValueError(f"family {TEXT_ENCODER!r} is not offered on diffusion transformers (FLUX, SD3) yet: "
                         "their text-encoder layers have no sites")  # fmt: skip
    for family in families:
        _check(loaded, family, windows if windows is not None else _one_by_one(family, None, blocks, loaded), steps, n)
    if TEXT in families:
        _text_injection()
    if executor is not None:
        require_spec(model, "model")
        require_spec(classifier, "classifier")
    options = options or EraseOptions(num_inference_steps=evaluation.get("num_inference_steps"))
    given = statistics or {}
    fits = {f: _given(given[f], f, pairs) if f in given else _fit(loaded, pairs, f, options, "restore" in directions, progress)
            for f in families if f not in INJECTIONS}  # fmt: skip
    evaluators = _Evaluators(model, classifier, pairs, evaluation)
    cells = []
    for family in families:
        for direction in directions:
            measure = _measure(family, direction, fits.get(family), evaluators, tau, seeds, overrides)
            meta = {"family": family, "direction": direction, "eval_options": dict(measure.evaluator.options)}
            own = windows if windows is not None else _one_by_one(family, fits.get(family), blocks, loaded)
            for w in own if family in fits else ():
                fits[family].sites_in(w)  # blocks outside the fit: a clear error before any cell runs
            for w in own:
                m = at_layer(measure, w, executor)
                cells += [(m, w, s, meta) for s in steps]
    rows = run_cells(_causal_cell, cells, executor, desc="causal sweep", progress=progress)
    return [_tidy(r) for r in rows]


def _one_by_one(family: str, statistics: FitStatistics | None, blocks: list[str], model: Any) -> list[tuple[str, ...]]:
    """The layers a family patches one at a time by default: every text-encoder layer (of every
    encoder), the fitted blocks, or every block."""
    if family == TEXT_ENCODER:
        return [(name,) for name in text_layers(model.pipeline)]
    if statistics is not None:
        return [(b,) for b in dict.fromkeys(s.block for s in statistics.sites)]
    if family == TEXT or not is_dit(unet_of(model)):
        return [(b,) for b in blocks]
    # a DiT's kinds live in some blocks only (no text K/V in single blocks, no text MLP in SD3's last)
    return [(b,) for b in dict.fromkeys(s.block for s in select_sites(site_table(unet_of(model)), dit_kinds(family)))]


class _Evaluators:
    """The sweep's evaluators, built on first use and shared, so each unpatched run happens once:
    targets with the non-target prompts (erasing sites), targets alone (injection families), sources
    alone (restoring)."""

    def __init__(self, model: Any, classifier: Any, pairs: PromptPairs, evaluation: dict) -> None:
        self.model, self.classifier, self.pairs, self.evaluation = model, classifier, pairs, evaluation
        self._built: dict[str, Evaluator] = {}

    def __call__(self, name: str) -> Evaluator:
        if name not in self._built:
            p = self.pairs
            prompts = {"erase": (p.targets, p.non_target), "erase_text": (p.targets, ()), "restore": (p.sources, ())}[name]
            self._built[name] = Evaluator(self.model, self.classifier, p.concept, *prompts, **self.evaluation)
        return self._built[name]


def _measure(
    family: str,
    direction: str,
    statistics: FitStatistics | None,
    evaluators: _Evaluators,
    tau: float | None,
    seeds: Sequence[int],
    overrides: dict,
) -> Any:
    """The `causal_map` measure of one (family, direction)."""
    if family not in INJECTIONS:
        evaluator = evaluators(direction)
        tau = statistics.options.tau if tau is None else tau
        return eraser_measure(statistics, evaluator, tau, seeds, direction, **overrides)
    evaluator = evaluators("erase_text" if direction == "erase" else "restore")
    p = evaluators.pairs
    donors = p.sources if direction == "erase" else p.targets
    repeat = evaluator.options["images_per_prompt"]
    return InjectionMeasure(evaluator, tuple(d for d in donors for _ in range(repeat)), tuple(seeds), direction, family)


def _tidy(row: Record) -> Record:
    """A `causal_map` row as a sweep record: the window's blocks as a list and a label, every field present."""
    layers = list(_blocks(row.pop("layer")))
    head = {"family": row.pop("family"), "layers": layers, "layer_label": window_label(layers),
            "start": row.pop("start"), "stop": row.pop("stop"), "direction": row.pop("direction")}  # fmt: skip
    measured = {f: row.pop(f, None) for f in FIELDS}
    return head | measured | {"fit_seeds": None, "options": None} | row


# -- reading a sweep -------------------------------------------------------------------------


def best_cells(
    records: Iterable[Record],
    by: Sequence[str] = ("concept", "family"),
    value: str = "concept_drop",
    floor: Mapping[str, float] | None = None,
) -> list[Record]:
    """The record with the largest `value` per group of `by` (first-seen group order; ties keep
    the first record). `floor` keeps only records whose fields reach it, e.g. `{"preservation":
    0.9}`; records whose `value` or floored field is None (not measured) never win, and a group
    with no admissible record is left out."""
    floor = dict(floor or {})
    best: dict[tuple, Record] = {}
    for r in records:
        for k in (*by, value, *floor):
            if k not in r:
                raise KeyError(f"field {k!r} missing from a sweep record; it has {sorted(r)}")
        if r[value] is None or any(r[k] is None or r[k] < v for k, v in floor.items()):
            continue
        key = tuple(r[k] for k in by)
        if key not in best or r[value] > best[key][value]:
            best[key] = r
    return list(best.values())


def block_difference(statistics: FitStatistics) -> dict[str, float]:
    """The difference map per block, in execution order: `FitStatistics.difference()` averaged
    over steps and over the block's sites."""
    profiles = statistics.difference()
    per_block: dict[str, list[float]] = {}
    for site in statistics.sites:
        per_block.setdefault(site.block, []).append(profiles[site.name].mean().item())
    return {b: sum(v) / len(v) for b, v in per_block.items()}


def difference_vs_causal(
    statistics: Mapping[str, FitStatistics], records: Iterable[Record], direction: str = "erase"
) -> list[Record]:
    """Does each family's correlational map predict its causal one? Per family of `statistics`
    (one fit per family, as given to `causal_sweep`), the Spearman rank correlation across blocks
    between `block_difference` and the sweep's `concept_drop` in `direction` for that block patched
    alone (averaged over step windows). `rho` is NaN when either map is constant (no ranking).
    One record per family: `family`, `rho`, `p_value`, `n` (blocks), `direction`."""
    check_direction(direction)
    rows = [r for r in records if r["direction"] == direction and len(r["layers"]) == 1]
    out = []
    for family, stats in statistics.items():
        drops = group_mean([{"layer": r["layers"][0], "concept_drop": r["concept_drop"]}
                            for r in rows if r["family"] == family], "layer", "concept_drop")  # fmt: skip
        if not drops:
            raise ValueError(f"no single-block {direction!r} records of family {family!r} to correlate with")
        difference = [{"layer": b, "value": v} for b, v in block_difference(stats).items()]
        with warnings.catch_warnings():  # a constant map: scipy warns and returns NaN, which we report
            warnings.simplefilter("ignore")
            result = map_correlation(difference, drops, keys=("layer",), value_b="concept_drop")
        out.append({"family": family, "direction": direction, **result})
    return out
