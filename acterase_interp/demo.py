"""The end-to-end demo on ConceptWorld: fit an eraser for one concept (by default the heart, planted
in 32 FFN hidden units of two blocks), choose tau on the fit pairs, generate the same seeds with and
without it, read the images with the bundled classifier, and check the erasure bars; then show a
natural concept beside it (the triangle), which this recipe does not reach.

Three groups of fresh evaluation prompts, none of them used for fitting:

- target: the concept in canonical templates with random other factors;
- paraphrase: held-out paraphrases of the concept (synonyms in templates never seen in training);
- non_target: other values of the concept's factor, with random other factors.

`results.json` keys: `concept`, `factor`; `target_rate` and `paraphrase_rate` (`before`/`after`,
each a `Rate` dict: value, n, ci_low, ci_high); `non_target_accuracy` (per factor and `all`:
`before`, `after`, `ratio` = after/before, None when before is 0); `non_target_distance` (same-seed mean absolute
pixel difference: `mean`, `max`); `timing` (`fit_s`, `generate_s_per_image_unpatched`,
`generate_s_per_image_patched`, `total_s`); `mask_density` (per site); `options`; `all_units`; `generation`
(steps, guidance, images per group); `pairs`; `seeds` (`fit` and one list per group); `prompts`
and `predictions` (per group); `model` (architecture, weights and classifier hashes); `versions`;
`bars` (`Bar` dicts: name, value, threshold, direction, passed), `passed` (all bars); `files`; `planted` (the concept's
planting record, or None); `tau_choice` (rule and trace of the tau choice, or None for a given tau);
`beside` (the natural concept under the same recipe and the FFN and cross-attention ceilings, or None).

Bars, seeds, prompt sets and the after/before policy come from `evaluation.core`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nnsight import DiffusionModel

from .erase.fit import EraserFitter
from .erase.options import EraseOptions, check_tau
from .erase.select import choose_tau
from .evaluation.core import TAU_SELECTION_OFFSET, Bar, PromptSet, format_bars, image_seeds, preservation
from .evaluation.prompts import conceptworld_prompt_sets
from .generation import generate
from .io import atomic_write_json
from .loading import CONCEPTWORLD, architecture_hash, load, load_classifier
from .metrics import concept_rate_from_predictions, factor_accuracy_from_predictions, image_distance
from .provenance import library_versions
from .report import html_report, image_grid, labelled_grid_png
from .world.classifier import ConceptClassifier
from .world.concept import Concept, as_concept
from .world.factors import FACTORS
from .world.pairs import conceptworld_pairs

DEFAULT_CONCEPT = "heart"
"""Planted in 32 hidden units of two FFNs: the case ActErase's premise describes (a concept computed
by a few FFN units), with its ground truth known."""
DEFAULT_BESIDE = "triangle"
"""A natural concept, reported beside: it reaches the image through cross-attention instead."""
AUTO = "auto"
GROUPS = ("target", "paraphrase", "non_target")
TARGET_AFTER_MAX = 0.10
TARGET_BEFORE_MIN = 0.90
PARAPHRASE_AFTER_MAX = 0.20
PRESERVATION_MIN = 0.90
_GRID_TILES = 16  # images per group shown in the report


def evaluation_groups(
    concept: str | Concept, n_images: int, rng: np.random.Generator, exclude: Sequence[str]
) -> list[PromptSet]:
    """`n_images` fresh prompts per group (see the module docstring): `conceptworld_prompt_sets`
    without the zero-shot set; prompts in `exclude` (the fitting prompts) are skipped."""
    return conceptworld_prompt_sets(concept, n_images, rng, exclude)


def weights_hash(*modules: torch.nn.Module) -> str:
    """A short sha256 of the modules' parameters and buffers: tells the trained ConceptWorld
    model (and classifier) apart from any other with the same architecture."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def check_bars(results: dict) -> list[Bar]:
    """The issue's bars: the concept is erased (from >= 90% to <= 10%), held-out paraphrases too
    (<= 20%), and every factor's accuracy on non-target prompts keeps >= 90% of its value."""
    t, p = results["target_rate"], results["paraphrase_rate"]
    bars = [
        Bar.check("target rate before", t["before"]["value"], ">=", TARGET_BEFORE_MIN),
        Bar.check("target rate after", t["after"]["value"], "<=", TARGET_AFTER_MAX),
        Bar.check("paraphrase rate after", p["after"]["value"], "<=", PARAPHRASE_AFTER_MAX),
    ]
    for factor in FACTORS:
        ratio = results["non_target_accuracy"][factor]["ratio"]
        bars.append(Bar.check(f"non-target {factor} accuracy after/before", ratio, ">=", PRESERVATION_MIN))
    return bars


def _table(results: dict) -> list[dict]:
    """One row per measurement, as printed and as shown in the report."""

    def pct(rate: dict) -> str:
        return f"{100 * rate['value']:.1f}% [{100 * rate['ci_low']:.0f}-{100 * rate['ci_high']:.0f}]"

    rows = [
        {"measure": f"target rate ({results['concept']})", "before": pct(results["target_rate"]["before"]),
         "after": pct(results["target_rate"]["after"]), "after/before": ""},
        {"measure": "held-out paraphrase rate", "before": pct(results["paraphrase_rate"]["before"]),
         "after": pct(results["paraphrase_rate"]["after"]), "after/before": ""},
    ]  # fmt: skip
    for factor, acc in results["non_target_accuracy"].items():
        ratio = "n/a" if acc["ratio"] is None else f"{acc['ratio']:.3f}"
        rows.append({"measure": f"non-target {factor} accuracy", "before": pct(acc["before"]),
                     "after": pct(acc["after"]), "after/before": ratio})  # fmt: skip
    d, tm = results["non_target_distance"], results["timing"]
    rows += [
        {"measure": "non-target same-seed distance (mean abs. pixel)", "before": "", "after": f"{d['mean']:.4f}",
         "after/before": ""},
        _setting_row(results),
        {"measure": "fit time (s)" + (", with tau choice" if results["tau_choice"] else "")
                    + (", with scope choice" if results["options"] is None else ""), "before": "",
         "after": f"{tm['fit_s']:.1f}", "after/before": ""},
        # one run per side, in a fixed order: no ratio (benchmarks/ measures the overhead fairly)
        {"measure": "generation time per image (s; one run each, see benchmarks/ for the overhead)",
         "before": f"{tm['generate_s_per_image_unpatched']:.3f}", "after": f"{tm['generate_s_per_image_patched']:.3f}",
         "after/before": ""},
    ]  # fmt: skip
    return rows


def _setting_row(results: dict) -> dict:
    """The eraser's one chosen setting: ActErase's tau, or the gated eraser's scope."""
    if results["options"] is None:
        return {"measure": "scope (chosen on the fit pairs)", "before": "", "after": results["eraser"]["chosen_scope"],
                "after/before": ""}  # fmt: skip
    tau = str(results["options"]["tau"]) if not results["all_units"] else "every unit"
    return {"measure": "tau" + (" (auto: chosen on the fit pairs)" if results["tau_choice"] else ""), "before": "",
            "after": tau, "after/before": ""}  # fmt: skip


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _print_table(rows: list[dict], bars: list[dict]) -> None:
    cols = ("measure", "before", "after", "after/before")
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    for row in [dict(zip(cols, cols))] + rows:
        print("  ".join(str(row[c]).ljust(w) for c, w in zip(cols, widths)))
    print(format_bars(bars))


def _beside_rows(beside: dict) -> list[dict]:
    def pct(rate: dict) -> str:
        return f"{100 * rate['value']:.1f}%"

    rows = []
    for name, m in beside["variants"].items():
        kept = " / ".join(_fmt(m["non_target_accuracy"][f]["ratio"]) for f in FACTORS)
        rows.append({"eraser": name, "target before": pct(m["target_rate"]["before"]),
                     "target after": pct(m["target_rate"]["after"]),
                     "paraphrase after": pct(m["paraphrase_rate"]["after"]),
                     "non-target kept (shape / color / background)": kept})  # fmt: skip
    return rows


def _print_beside(beside: dict) -> None:
    tau = (beside["tau_choice"] or {}).get("tau")
    print(f"\nbeside: the natural concept {beside['concept']!r}" + (f" (auto tau {tau})" if tau else ""))
    for row in _beside_rows(beside):
        print("  " + "; ".join(f"{k}: {v}" for k, v in row.items()))


def _labels(preds: dict[str, list[str]], factor: str, tag: str) -> list[str]:
    return [f"{tag}: {v}" for v in preds[factor]]


ERASERS = ("acterase", "gated_kv")
_ERASER_TITLES = {"acterase": "ActErase", "gated_kv": "the gated subspace eraser (beyond the paper)"}


def _write_report(out: Path, results: dict, groups: list[PromptSet], images: dict, preds: dict) -> Path:
    factor = results["factor"]
    planted = results["planted"]
    where = (f" It was planted in the {planted['spec']['family']} weights of {', '.join(planted['blocks'])}."
             if planted else " It is a natural concept (not planted).")  # fmt: skip
    sections: list = [
        ("Summary", f"Erasing **{results['concept']}** ({factor}) from ConceptWorld with {_ERASER_TITLES[results['eraser']['name']]}.{where} "
                    "The same seeds "
                    "without and with the eraser; tiles are labelled with the classifier's reading of the "
                    f"{factor}.\n\n" + format_bars(results["bars"], bullet="- ")),
        ("Results", _table(results)),
    ]  # fmt: skip
    for group in groups:
        k = min(_GRID_TILES, len(group.prompts))
        for when in ("before", "after"):
            fig = image_grid(images[group.name][when][:k], _labels(preds[group.name][when], factor, when)[:k])
            sections.append((f"{group.name} prompts, {when}", fig))
        both = torch.cat([images[group.name]["before"][:k], images[group.name]["after"][:k]])
        labels = _labels(preds[group.name]["before"], factor, "before")[:k]
        labels += _labels(preds[group.name]["after"], factor, "after")[:k]
        labelled_grid_png(both, labels, out / f"{group.name}.png", rows=2)
    if results.get("beside"):
        b = results["beside"]
        sections.append((f"Beside: the natural {b['factor']} {b['concept']!r}",
                         "The same recipe on a concept that was not planted, and the two ceilings: every FFN hidden "
                         "unit replaced, and every cross-attention output replaced."))  # fmt: skip
        sections.append((f"{b['concept']}: erasers", _beside_rows(b)))
    sections.append(("Prompts", [{"group": g.name, "seed": s, "prompt": p}
                                 for g in groups for s, p in zip(results["seeds"][g.name], g.prompts)]))  # fmt: skip
    return html_report(out / "report.html", f"ActErase demo: {results['concept']}", sections)


def measure(concept: str | Concept, groups: list[PromptSet], images: dict, preds: dict) -> dict:
    """Concept rates of the target and paraphrase groups, per-factor accuracy on the non-target
    group (with after/before ratios) and the same-seed distance of the non-target images;
    `images` and `preds` map group -> "before"/"after" -> images / classifier predictions."""
    rate = {g: {w: concept_rate_from_predictions(preds[g][w], concept).to_dict() for w in ("before", "after")}
            for g in ("target", "paraphrase")}  # fmt: skip
    scenes = next(g.scenes for g in groups if g.name == "non_target")
    acc = {w: factor_accuracy_from_predictions(preds["non_target"][w], scenes) for w in ("before", "after")}
    dist = image_distance(images["non_target"]["before"], images["non_target"]["after"])
    return {
        "target_rate": rate["target"],
        "paraphrase_rate": rate["paraphrase"],
        "non_target_accuracy": {
            f: {"before": acc["before"][f].to_dict(), "after": acc["after"][f].to_dict(),
                "ratio": preservation(acc["before"][f], acc["after"][f])}
            for f in (*FACTORS, "all")
        },  # fmt: skip
        "non_target_distance": {"metric": "mae", "mean": float(dist.mean()), "max": float(dist.max())},
    }


@dataclass
class _Evaluation:
    """Fresh evaluation prompts for one concept, with their unpatched images generated once."""

    groups: list[PromptSet]
    seeds: list[int]
    before: torch.Tensor
    before_s: float

    @property
    def prompts(self) -> list[str]:
        return [p for g in self.groups for p in g.prompts]


def _evaluation(model, concept: Concept, pairs, n_images: int, seed: int, steps: int, guidance: float,
                progress: bool) -> _Evaluation:  # fmt: skip
    groups = evaluation_groups(concept, n_images, np.random.default_rng(seed + 1), pairs.targets + pairs.sources)
    prompts = [p for g in groups for p in g.prompts]
    seeds = image_seeds("evaluation", len(prompts), base=seed)
    generate(model, prompts[:1], seeds=seeds[:1], num_inference_steps=steps, progress=False)  # warm-up: fair timings
    before, before_s = _timed(lambda: generate(model, prompts, seeds=seeds, num_inference_steps=steps,
                                               guidance_scale=guidance, progress=progress))  # fmt: skip
    return _Evaluation(groups, seeds, before, before_s)


def _erased(model, ev: _Evaluation, eraser, classifier, steps: int, guidance: float, progress: bool):
    """(images, predictions, seeds) per group and "before"/"after", and the patched seconds."""
    with eraser.applied(model):
        after, after_s = _timed(lambda: generate(model, ev.prompts, seeds=ev.seeds, num_inference_steps=steps,
                                                 guidance_scale=guidance, progress=progress))  # fmt: skip
    n = len(ev.prompts) // len(ev.groups)
    images, preds, seeds = {}, {}, {}
    for i, group in enumerate(ev.groups):
        rows = slice(i * n, (i + 1) * n)
        images[group.name] = {"before": ev.before[rows], "after": after[rows]}
        preds[group.name] = {w: classifier.predict(x) for w, x in images[group.name].items()}
        seeds[group.name] = ev.seeds[rows]
    return images, preds, seeds, after_s


def _fit(model, concept: Concept, n_pairs: int, seed: int, anchor: str | None, tau: float | str, classifier,
         progress: bool, **options: Any):  # fmt: skip
    """(pairs, eraser, fit seconds, tau choice or None, fit statistics) for `concept`; tau "auto" is
    `choose_tau` on the fit pairs."""
    pairs = conceptworld_pairs(concept, n=n_pairs, seed=seed, anchor=anchor)
    auto = tau == AUTO
    opts = EraseOptions(seed=seed, **options, **({} if auto else {"tau": tau}))
    fitter = EraserFitter(model, opts, progress=progress)
    eraser, fit_s = _timed(lambda: fitter.fit(pairs))
    choice = None
    if auto:
        start = time.perf_counter()
        choice = choose_tau(model, fitter.statistics, pairs, lambda x: classifier.shows(x, concept.value), seed=seed,
                            num_inference_steps=opts.num_inference_steps)  # fmt: skip
        eraser, fit_s = choice.eraser, fit_s + time.perf_counter() - start
    return pairs, eraser, fit_s, choice, fitter.statistics


def _fit_gated(model, concept: Concept, n_pairs: int, seed: int, anchor: str | None, classifier, steps: int):
    """(pairs, the fitted `GatedKV` method, fit seconds with its scope choice)."""
    from .evaluation.baselines import GatedKV

    pairs = conceptworld_pairs(concept, n=n_pairs, seed=seed, anchor=anchor)
    method = GatedKV(shows_concept=classifier.shows, num_inference_steps=steps, seed=seed).fit(model, pairs)
    return pairs, method, method.fit_seconds_


def _beside(model, concept: Concept, classifier, n_pairs: int, n_images: int, seed: int, steps: int, guidance: float,
            tau: float | str, progress: bool, options: dict) -> dict:  # fmt: skip
    """A natural concept under the same recipe, under every FFN unit replaced, and under every
    cross-attention output replaced: what the FFN default does there, and where it lives instead."""
    pairs, eraser, _, choice, _ = _fit(model, concept, n_pairs, seed, None, tau, classifier, progress, **options)
    cross = EraserFitter(model, replace(eraser_options(eraser), site_kind="attn2_out"), progress=progress).fit(pairs)
    ev = _evaluation(model, concept, pairs, n_images, seed, steps, guidance, progress)
    tau_used = eraser_options(eraser).tau
    unmet = " (no tau met the rule; the largest is shown)" if choice is not None and choice.tau is None else ""
    variants = {
        f"same recipe, tau {tau_used:g}{unmet}": eraser,
        "every FFN hidden unit replaced": eraser.saturated(),
        "every cross-attention output replaced": cross.saturated(),
    }
    rows = {}
    for name, e in variants.items():
        images, preds, _, _ = _erased(model, ev, e, classifier, steps, guidance, progress)
        rows[name] = measure(concept, ev.groups, images, preds)
    return {"concept": concept.value, "factor": concept.factor, "tau_choice": choice and choice.to_dict(),
            "variants": rows, "prompts": {g.name: list(g.prompts) for g in ev.groups}}  # fmt: skip


def eraser_options(eraser) -> EraseOptions:
    return EraseOptions.from_dict(eraser.manifest["options"])


def run_demo(
    concept: str | Concept = DEFAULT_CONCEPT,
    out_dir: str | Path = "runs/demo",
    n_pairs: int = 10,
    anchor: str | None = None,
    all_units: bool = False,
    n_images: int = 32,
    seed: int = 0,
    num_inference_steps: int | None = None,
    model: DiffusionModel | str = CONCEPTWORLD,
    classifier: ConceptClassifier | None = None,
    progress: bool = True,
    tau: float | str = AUTO,
    beside: str | Concept | None = DEFAULT_BESIDE,
    eraser: str = "acterase",
    **options: Any,
) -> dict:
    """Erase a ConceptWorld `concept` (default: the heart planted in 32 FFN units of two blocks) and
    measure the result; returns the results dict, also written to `out_dir/results.json` with an
    HTML report (`report.html`), before/after PNG grids per group and the fitted eraser (`eraser/`).
    `model` is ConceptWorld, a pipeline folder, or a loaded model. `tau` "auto" (default) takes the
    smallest tau that erases the concept from the fit pairs' own targets (`choose_tau`; held-out
    prompts and evaluation seeds are never looked at); a number fixes it. `options` are other
    `EraseOptions` fields (`site_kind`, ...; the paper's defaults otherwise); `num_inference_steps`
    None keeps the model's; `anchor` fixes the value that replaces the concept in the pairs'
    sources (see `conceptworld_pairs`). `all_units` patches every unit of the fitted sites
    (`Eraser.saturated`: the ceiling of any tau). `beside` names a natural concept reported under
    the same recipe and the two ceilings (`results["beside"]`; None or the concept itself skips it).
    `n_images` is per group. `eraser="gated_kv"` fits the gated subspace eraser instead
    (`erase.gated`, its scope chosen on the fit targets; no tau, no erase options, no `beside`)."""
    concept, beside = (None if c is None else as_concept(c) for c in (concept, beside))  # before the model loads
    if n_images < 1 or n_pairs < 1:
        raise ValueError(f"n_images and n_pairs must be at least 1, got {n_images} and {n_pairs}")
    if eraser not in ERASERS:
        raise ValueError(f"eraser must be one of {ERASERS}, got {eraser!r}")
    gated = eraser == "gated_kv"
    if gated and (options or all_units or tau != AUTO):
        raise ValueError("the gated eraser takes no tau, --all-units or erase options; it chooses its scope itself")
    if tau != AUTO:
        check_tau(tau, options.get("tau_mode", "fraction"))
    start = time.perf_counter()
    out = Path(out_dir)
    name = model if isinstance(model, str) else "given"
    model = load(model) if isinstance(model, str) else model
    concept = as_concept(concept, model.planted)
    classifier = classifier if classifier is not None else load_classifier()
    steps = num_inference_steps or model.defaults.num_inference_steps
    guidance = model.defaults.guidance_scale
    options = {**options, "num_inference_steps": steps, "guidance_scale": guidance}
    if gated:
        pairs, fitted, fit_s = _fit_gated(model, concept, n_pairs, seed, anchor, classifier, steps)
        choice, eraser = None, fitted.eraser_
        eraser.save(out / "eraser")
    else:
        pairs, eraser, fit_s, choice, stats = _fit(model, concept, n_pairs, seed, anchor, tau, classifier, progress,
                                                   **options)  # fmt: skip
        eraser = eraser.saturated() if all_units else eraser
        eraser.save(out / "eraser", statistics=stats)  # the statistics beside it: re-threshold without the model

    ev = _evaluation(model, concept, pairs, n_images, seed, steps, guidance, progress)
    images, preds, seeds_by_group, gen_after_s = _erased(model, ev, eraser, classifier, steps, guidance, progress)
    prompts = ev.prompts
    results = {
        "concept": concept.value,
        "factor": concept.factor,
        "planted": concept.planted,
        **measure(concept, ev.groups, images, preds),
        "timing": {
            "fit_s": fit_s,
            "generate_s_per_image_unpatched": ev.before_s / len(prompts),
            "generate_s_per_image_patched": gen_after_s / len(prompts),
        },
        "eraser": fitted.describe() if gated else {"name": "acterase"},
        "mask_density": None if gated else eraser.mask_density(),
        "options": None if gated else eraser_options(eraser).to_dict(),
        "tau_choice": choice and choice.to_dict(),
        "all_units": all_units,
        "generation": {"num_inference_steps": steps, "guidance_scale": guidance, "n_images_per_group": n_images},
        "pairs": {"concept": pairs.concept, "targets": list(pairs.targets), "sources": list(pairs.sources),
                  "seed": seed, "anchor": anchor},
        "seeds": {"fit": seed, "tau_selection_offset": TAU_SELECTION_OFFSET, **seeds_by_group},
        "prompts": {g.name: list(g.prompts) for g in ev.groups},
        "predictions": {g: {w: {f: list(v) for f, v in p.items()} for w, p in preds[g].items()} for g in preds},
        "model": {
            "name": name,
            "architecture_hash": architecture_hash(model.pipeline),
            "weights_hash": weights_hash(model.pipeline.unet, model.pipeline.text_encoder, model.pipeline.vae),
            "classifier_hash": weights_hash(classifier),
        },
        "versions": library_versions(),
    }
    bars = check_bars(results)
    results["bars"], results["passed"] = [b.to_dict() for b in bars], all(b.passed for b in bars)
    use_beside = beside is not None and beside != concept and not gated
    results["beside"] = (_beside(model, beside, classifier, n_pairs, n_images, seed, steps, guidance, tau, progress,
                                 {k: v for k, v in options.items() if k != "site_kind"})
                         if use_beside else None)  # fmt: skip
    report = _write_report(out, results, ev.groups, images, preds)
    results["timing"]["total_s"] = time.perf_counter() - start
    results["files"] = {"results": str(out / "results.json"), "report": str(report), "eraser": str(out / "eraser"),
                        "grids": [str(out / f"{g}.png") for g in GROUPS]}  # fmt: skip
    atomic_write_json(results, out / "results.json")
    _print_table(_table(results), results["bars"])
    if results["beside"]:
        _print_beside(results["beside"])
    print(f"total {results['timing']['total_s']:.1f} s; report: {report}")
    return results
