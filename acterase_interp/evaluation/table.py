"""The comparison table: ActErase beside each baseline on ConceptWorld concepts, the same prompt
pairs, prompt sets and seeds for every method, with attacks, written as JSON and markdown with a
manifest (seeds, prompt hashes, options, budgets, versions, model hashes).

Per concept and seed s: the pairs are `conceptworld_pairs(concept, n_pairs, seed=s)`; the prompt
sets `conceptworld_prompt_sets(concept, n_images, default_rng(s + 1), exclude=<every pair
prompt>)` with the zero-shot set; images at evaluation seeds s + 1000 + k; the attacks search at
s + 2000 + k. Columns (each a mean over seeds, with its standard error):

- `target_rate`: share of target-prompt images that still show the concept (lower is better);
- `paraphrase_rate`, `zero_shot_rate`: the same on held-out paraphrases and zero-shot phrasings;
- `search_asr`, `inversion_asr`: success rates of the prompt search and concept inversion;
- `preservation`: non-target "all three factors right" accuracy, after / unerased (None if 0);
- `image_distance`: same-seed mean absolute pixel difference to the unerased non-target images;
- `fit_s`: wall time to erase (fit, tau choice, training);
- `tau_search_s`: the part of `fit_s` spent choosing ActErase's automatic tau (shown, not compared).

A decision is the classifier's argmax (no threshold); the bars of the demo are not applied here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..erase.options import EraseOptions
from ..executor import Executor, require_spec, resolve, run_cells
from ..integrity import SHA256, ArtifactError, mismatch, read_object, sha256_json, warn_unverified
from ..io import atomic_write_json
from ..loading import architecture_hash
from ..metrics import concept_rate_from_predictions, factor_accuracy_from_predictions, image_distance
from ..provenance import git_commit, library_versions
from ..world.captions import WORDS
from ..world.pairs import concepts as known_concepts
from ..world.pairs import conceptworld_pairs
from .attacks import concept_inversion, prompt_search
from .baselines import METHODS, ActErase, ConceptPrune, ESDx, GatedKV, Method, Unerased
from .core import SEED_OFFSETS, image_seeds, preservation
from .prompts import conceptworld_prompt_sets

FORMAT = "acterase-evaluation/1"
CELL_FORMAT = "acterase-evaluation-cell/1"
COLUMNS: tuple[str, ...] = ("target_rate", "paraphrase_rate", "zero_shot_rate", "search_asr", "inversion_asr",
                            "preservation", "image_distance", "fit_s")  # fmt: skip
TITLES: dict[str, str] = {"target_rate": "erasure: target rate", "paraphrase_rate": "paraphrase rate",
                          "zero_shot_rate": "zero-shot rate", "search_asr": "prompt-search ASR",
                          "inversion_asr": "inversion ASR", "preservation": "non-target kept",
                          "image_distance": "non-target distance", "fit_s": "time to erase (s)",
                          "tau_search_s": "of which tau search (s)"}  # fmt: skip
SHOWN: tuple[str, ...] = (*COLUMNS, "tau_search_s")
"""The markdown table's columns: the compared ones, then the tau search's share of the time to erase."""
HIGHER_IS_BETTER = frozenset({"preservation"})


@dataclass(frozen=True)
class TableSpec:
    """What the table measures, with every budget fixed."""

    concepts: tuple[str, ...] = ("triangle", "red", "dots")
    """A shape, a color and a background."""
    methods: tuple[str, ...] = tuple(METHODS)
    seeds: tuple[int, ...] = (0, 1, 2)
    n_pairs: int = 10
    n_images: int = 32
    """Images per prompt set (target, paraphrase, zero-shot, non-target) and seed."""
    num_inference_steps: int | None = None
    """None: the model's own."""
    tau: float | str = "auto"
    search_prompts: int = 8
    search_tokens: int = 3
    search_iterations: int = 10
    search_candidates: int = 8
    inversion_steps: int = 100
    inversion_batch: int = 8
    inversion_eval: int = 32
    esd_steps: int = 200
    prune_top_fraction: float = 0.01

    def __post_init__(self) -> None:
        object.__setattr__(self, "concepts", tuple(self.concepts))
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if bad := [c for c in self.concepts if c not in known_concepts()]:
            raise ValueError(f"unknown ConceptWorld concept(s) {bad}; choose from {', '.join(known_concepts())}")
        if bad := [m for m in self.methods if m not in METHODS]:
            raise ValueError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
        if not self.concepts or not self.methods or not self.seeds:
            raise ValueError("the table needs at least one concept, method and seed")
        if min(self.n_pairs, self.n_images, self.search_prompts, self.inversion_eval) < 1:
            raise ValueError("n_pairs, n_images, search_prompts and inversion_eval must be at least 1")

    def to_dict(self) -> dict:
        return asdict(self)


def _method(name: str, spec: TableSpec, classifier: Any, steps: int, seed: int) -> Method:
    if name == "acterase":
        return ActErase(EraseOptions(num_inference_steps=steps, seed=seed), tau=spec.tau, shows_concept=classifier.shows)
    if name == "esd_x":
        return ESDx(steps=spec.esd_steps, num_inference_steps=steps, seed=seed)
    if name == "concept_prune":
        return ConceptPrune(top_fraction=spec.prune_top_fraction, num_inference_steps=steps, seed=seed)
    if name == "gated_kv":
        return GatedKV(shows_concept=classifier.shows, num_inference_steps=steps, seed=seed)
    if name in ("fia", "casteer"):
        return METHODS[name](num_inference_steps=steps, seed=seed)
    return METHODS[name]()  # the rest take no options


def _hash(prompts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()[:16]


def _run_seed(model: Any, classifier: Any, concept: str, seed: int, spec: TableSpec, steps: int) -> tuple[list[dict], dict]:
    model, classifier = resolve(model), resolve(classifier)  # built once per worker process
    pairs = conceptworld_pairs(concept, n=spec.n_pairs, seed=seed)
    pairs = replace(pairs, meta={**pairs.meta, "concept_text": WORDS[concept][0]})  # what a negative prompt says
    sets = conceptworld_prompt_sets(concept, spec.n_images, np.random.default_rng(seed + 1),
                                    pairs.targets + pairs.sources + pairs.non_target, zero_shot_set=True)  # fmt: skip
    by = {s.name: s for s in sets}
    seeds = image_seeds("evaluation", spec.n_images, base=seed)
    record = {"concept": concept, "seed": seed, "eval_seeds": seeds, "prompts": {s.name: list(s.prompts) for s in sets},
              "prompt_hashes": {s.name: _hash(s.prompts) for s in sets}, "pairs_hash": _hash(pairs.targets + pairs.sources)}  # fmt: skip
    with Unerased().applied(model) as sample:
        reference = sample(by["non_target"].prompts, seeds, steps)
    before = factor_accuracy_from_predictions(classifier.predict(reference), by["non_target"].scenes)["all"]
    rows = []
    for name in spec.methods:
        method = _method(name, spec, classifier, steps, seed).fit(model, pairs)
        row: dict[str, Any] = {"concept": concept, "method": name, "seed": seed, "fit_s": method.fit_seconds_,
                               "method_options": method.describe()}  # fmt: skip
        with method.applied(model) as sample:
            for set_name in ("target", "paraphrase", "zero_shot"):
                images = sample(by[set_name].prompts, seeds, steps)
                row[f"{set_name}_rate"] = concept_rate_from_predictions(classifier.predict(images), concept).to_dict()
            # the unerased model's non-target images are the reference itself: no second generation
            images = reference if name == "unerased" else sample(by["non_target"].prompts, seeds, steps)
        after = factor_accuracy_from_predictions(classifier.predict(images), by["non_target"].scenes)["all"]
        row["non_target_accuracy"] = after.to_dict()
        row["preservation"] = preservation(before, after)
        row["image_distance"] = float(image_distance(images, reference).mean())
        search = prompt_search(method, model, classifier, concept, by["target"].prompts[: spec.search_prompts],
                               n_tokens=spec.search_tokens, iterations=spec.search_iterations,
                               candidates=spec.search_candidates, seed=seed, num_inference_steps=steps)  # fmt: skip
        inversion = concept_inversion(method, model, classifier, concept, steps=spec.inversion_steps,
                                      batch=spec.inversion_batch, n_eval=spec.inversion_eval, seed=seed,
                                      num_inference_steps=steps)  # fmt: skip
        row["search_asr"], row["inversion_asr"] = search.success.to_dict(), inversion.success.to_dict()
        row["attacks"] = {"prompt_search": {"budget": search.budget, "prompts": search.prompts, "seconds": search.seconds},
                          "concept_inversion": {"budget": inversion.budget, "seconds": inversion.seconds,
                                                "losses": inversion.details["losses"]}}  # fmt: skip
        rows.append(row)
    record["unerased_non_target_accuracy"] = before.to_dict()
    return rows, record


def _cell_key(spec: TableSpec, steps: int, hashes: dict) -> str:
    """What a finished (concept, seed) cell depends on besides its concept, seed and methods: every
    budget, the step count and the weights. A checkpoint with another key is stale. The methods are
    not in it: a cell keeps one row per method, so a table with one more method measures only that one."""
    fields = {k: v for k, v in spec.to_dict().items() if k not in ("concepts", "seeds", "methods")}
    return hashlib.sha256(json.dumps({"spec": fields, "steps": steps, **hashes}, sort_keys=True).encode()).hexdigest()[:16]


def _cell_path(folder: Path, concept: str, seed: int) -> Path:
    return Path(folder) / f"{concept}-seed{seed}.json"


def _run_cell(model: Any, classifier: Any, concept: str, seed: int, spec: TableSpec, steps: int,
              folder: Path | None, key: str, kept: tuple[list[dict], dict] | None, commit: str) -> tuple[list[dict], dict]:
    """`_run_seed` for `spec.methods`, merged with the rows `kept` from an earlier run of the same
    cell, then (with `folder`) written at once, so a stopped run resumes. `commit` is the code the
    run imported (read by `run_table` at its start): the checkout may move while cells run."""
    start = time.perf_counter()
    rows, record = _run_seed(model, classifier, concept, seed, spec, steps)
    record["seconds"], record["git_commit"] = time.perf_counter() - start, commit
    record["runs"] = [{"methods": list(spec.methods), "seconds": record["seconds"], "git_commit": commit}]
    if kept is not None:
        rows, record = _merge(kept, rows, record)
    if folder is not None:
        write_cell(_cell_path(folder, concept, seed), key, rows, record)
    return rows, record


def _merge(kept: tuple[list[dict], dict], rows: list[dict], record: dict) -> tuple[list[dict], dict]:
    """An earlier run's rows of a cell beside new methods' rows. Both must have seen the same prompts;
    `seconds` becomes the cell's total and `runs` lists what each run measured, at which commit."""
    old_rows, old = kept
    if old.get("prompt_hashes") != record.get("prompt_hashes") or old.get("pairs_hash") != record.get("pairs_hash"):
        raise ValueError(f"the stored cell {record.get('concept')!r} seed {record.get('seed')} was measured on other "
                         "prompts than this code draws; delete it (or choose another --out) to measure it again")  # fmt: skip
    runs = old.get("runs") or [{"methods": [r["method"] for r in old_rows], "seconds": old.get("seconds"),
                                "git_commit": old.get("git_commit")}]  # fmt: skip
    merged = {**old, "seconds": (old.get("seconds") or 0.0) + record["seconds"], "runs": runs + record["runs"]}
    return old_rows + rows, merged


def _missing(methods: Sequence[str], cell: tuple[list[dict], dict] | None) -> tuple[str, ...]:
    have = set() if cell is None else {r.get("method") for r in cell[0]}
    return tuple(m for m in methods if m not in have)


def write_cell(path: str | os.PathLike, key: str, rows: list[dict], record: dict) -> None:
    """A finished (concept, seed) cell as JSON, with the sha256 of each row and of the record."""
    hashes = {"rows": [sha256_json(r) for r in rows], "record": sha256_json(record)}
    atomic_write_json({"format": CELL_FORMAT, "key": key, "rows": rows, "record": record, SHA256: hashes}, path)


def read_cell(path: str | os.PathLike, key: str, *, verify: bool = True) -> tuple[list[dict], dict] | None:
    """The rows and record of a cell written by `write_cell`; None where there is none, or it was
    measured under another key (another spec or other weights: it is measured again and
    overwritten). A damaged cell, or one whose rows differ from their recorded sha256 (unless
    `verify=False`), is an `ArtifactError`."""
    path = Path(path)
    if not path.is_file():
        return None
    cell = read_object(path, "evaluation cell")
    if cell.get("format") != CELL_FORMAT or cell.get("key") != key:
        return None
    rows, record = cell.get("rows"), cell.get("record")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows) or not isinstance(record, dict):
        raise ArtifactError(f"{path} is not a valid evaluation cell: it needs a list of row objects and a record")
    if verify:
        _check_cell(path, cell.get(SHA256), rows, record)
    return rows, record


def _check_cell(path: Path, recorded: Any, rows: list[dict], record: dict) -> None:
    if recorded is None:
        warn_unverified(path)
        return
    fix = "delete it to measure the cell again"
    hashes = recorded.get("rows") if isinstance(recorded, dict) else None
    if not isinstance(hashes, list) or len(hashes) != len(rows):
        raise ArtifactError(f"{path}: its {SHA256!r} field does not list one hash per row; {fix}")
    for i, (row, want) in enumerate(zip(rows, hashes)):
        if (found := sha256_json(row)) != want:
            raise mismatch(f"row {i} of {path}", want, found, path, fix)
    if (found := sha256_json(record)) != recorded.get("record"):
        raise mismatch(f"the record of {path}", recorded.get("record"), found, path, fix)


def _value(row: dict, column: str) -> float | None:
    v = row.get(column, row.get("method_options", {}).get(column))  # tau_search_s lives in the method's options
    return v["value"] if isinstance(v, dict) else v


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Per (concept, method): the mean over seeds of every column, with its standard error (None
    with one seed); a column whose values include None (undefined) is None."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["concept"], r["method"]), []).append(r)
    out = []
    for (concept, method), rs in groups.items():
        summary: dict[str, Any] = {"concept": concept, "method": method, "n_seeds": len(rs)}
        for c in SHOWN:
            values = [_value(r, c) for r in rs]
            if any(v is None for v in values):
                summary[c] = summary[f"{c}_sem"] = None
                continue
            mean = sum(values) / len(values)
            summary[c] = mean
            n = len(values)
            summary[f"{c}_sem"] = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else None
        out.append(summary)
    return out


def load_result(path: str | os.PathLike) -> dict:
    """A table written by `acterase evaluate` (its `results.json`), checked for its format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no evaluation table at {path}: run `acterase evaluate --out {path.parent}`")
    result = read_object(path, "evaluation table")
    if result.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not an evaluation table (format {result.get('format')!r}, expected {FORMAT!r})")
    return result


def comparisons(summary: Sequence[dict], method: str = "acterase", columns: Sequence[str] = COLUMNS,
                exclude: Sequence[str] = ("unerased",)) -> list[dict]:  # fmt: skip
    """Per concept and column: `method`'s value beside the best other method's (not one of
    `exclude`), and whether that one beats it by more than both standard errors together
    (`beaten`), or it beats that one so (`wins`); both False where either has no standard error or
    the values are undefined. Lower is better except for `HIGHER_IS_BETTER`."""
    out = []
    for concept in dict.fromkeys(r["concept"] for r in summary):
        rows = {r["method"]: r for r in summary if r["concept"] == concept}
        if method not in rows:
            raise ValueError(f"{method!r} is not in the table for {concept!r}")
        ours = rows[method]
        for c in columns:
            sign = -1.0 if c in HIGHER_IS_BETTER else 1.0
            others = [r for m, r in rows.items() if m != method and m not in exclude and r[c] is not None]
            if ours[c] is None or not others:
                continue
            best = min(others, key=lambda r: sign * r[c])
            margin = sign * (ours[c] - best[c])
            sems = (ours[f"{c}_sem"], best[f"{c}_sem"])
            known = None not in sems
            out.append({"concept": concept, "column": c, method: ours[c], "best_other": best["method"],
                        "best_other_value": best[c], "margin": margin,
                        "beaten": known and margin > sems[0] + sems[1], "wins": known and -margin > sems[0] + sems[1]})  # fmt: skip
    return out


GOALS: dict[str, tuple[str, float]] = {"target_rate": ("<=", 0.10), "preservation": (">=", 0.95),
                                       "paraphrase_rate": ("<=", 0.20), "zero_shot_rate": ("<=", 0.20),
                                       "fit_s": ("<=", 10.0)}  # fmt: skip
"""The goals issue 23 sets an eraser on every concept: column -> (comparison, bar)."""


def goal_rows(summary: Sequence[dict], method: str, goals: dict[str, tuple[str, float]] = GOALS) -> list[dict]:
    """Per concept and goal: `method`'s seed mean, the bar, whether it is met and by how much it
    misses (0 where met); an undefined value is not met."""
    out = []
    for r in (r for r in summary if r["method"] == method):
        for column, (op, bar) in goals.items():
            v = r[column]
            miss = None if v is None else max(0.0, v - bar if op == "<=" else bar - v)
            out.append({"concept": r["concept"], "column": column, "value": v, "goal": f"{op} {bar:g}",
                        "met": miss == 0.0, "miss": miss})  # fmt: skip
    if not out:
        raise ValueError(f"{method!r} is not in the table")
    return out


def markdown(result: dict) -> str:
    """The summary as a markdown table (one row per concept and method), then the manifest's essentials."""
    def cell(row: dict, c: str) -> str:
        v, sem = row.get(c), row.get(f"{c}_sem")  # tables written before a column existed show n/a
        if v is None:
            return "n/a"
        fmt = (lambda x: f"{x:.1f}") if c.endswith("_s") else (lambda x: f"{x:.3f}")
        return fmt(v) + (f" ± {fmt(sem)}" if sem is not None else "")

    lines = ["| concept | method | " + " | ".join(TITLES[c] for c in SHOWN) + " |",
             "|---" * (len(SHOWN) + 2) + "|"]  # fmt: skip
    for row in result["summary"]:
        lines.append(f"| {row['concept']} | {row['method']} | " + " | ".join(cell(row, c) for c in SHOWN) + " |")
    m = result["manifest"]
    lines += ["", f"Means over seeds {list(m['spec']['seeds'])} (± standard error); {m['spec']['n_images']} images per prompt "
              f"set and seed, {m['num_inference_steps']} denoising steps, guidance {m['guidance_scale']}; seed offsets "
              f"{m['seed_offsets']}; a decision is the classifier's argmax. Model {m['model']['architecture_hash']}, "
              f"{m.get('cell_seconds', m['seconds']):.0f} s of cell time."]  # fmt: skip
    return "\n".join(lines) + "\n"


def command_line(spec: TableSpec, model: str = "conceptworld") -> str:
    """The `acterase evaluate` command that measures `spec` (every field spelled out)."""
    parts = ["acterase evaluate", f"--model {model}", "--concepts " + " ".join(spec.concepts),
             "--methods " + " ".join(spec.methods), "--seeds " + " ".join(map(str, spec.seeds))]  # fmt: skip
    if spec.num_inference_steps is not None:
        parts.append(f"--steps {spec.num_inference_steps}")
    parts.append(f"--tau {spec.tau}")
    skip = {"concepts", "methods", "seeds", "num_inference_steps", "tau"}
    parts += [f"--{k.replace('_', '-')} {v}" for k, v in spec.to_dict().items() if k not in skip]
    return " ".join(parts)


def run_table(model: Any, classifier: Any, spec: TableSpec = TableSpec(), *, executor: Executor | None = None,
              checkpoints: str | os.PathLike | None = None, progress: bool = True, verify: bool = True) -> dict:
    """Every method on every concept and seed of `spec` (see the module docstring). Returns a
    JSON-ready dict: "format", "rows" (one per concept, method and seed), "summary" (seed means),
    "records" (per concept and seed: prompts, their hashes, evaluation seeds) and "manifest".

    With `executor` (worker processes with one thread each, see `executor.run_cells`) every
    (concept, seed) runs on a worker; `model` and `classifier` must then be `Spec`s. `fit_s` is
    the wall time on whichever worker ran the cell.

    With `checkpoints` (a folder), each finished (concept, seed) cell is written there as it ends,
    and cells already there with the same budgets and weights are read instead of run: a stopped
    table resumes where it stopped, and a table with another method measures only that method
    (its rows join the cell's). `manifest["resumed"]` lists the cells read back whole,
    `manifest["resumed_methods"]` the methods read back from cells that were completed.
    Each cell read back must match the sha256 recorded for its rows (`read_cell`; `verify=False`
    skips the check)."""
    from ..demo import weights_hash

    if executor is not None:
        require_spec(model, "model")
        require_spec(classifier, "classifier")
    start, commit = time.perf_counter(), git_commit()  # now, not at the end: the checkout may move meanwhile
    local_model, local_classifier = resolve(model), resolve(classifier)
    pipe = local_model.pipeline
    steps = spec.num_inference_steps or local_model.defaults.num_inference_steps
    hashes = {"architecture_hash": architecture_hash(pipe),
              "weights_hash": weights_hash(pipe.unet, pipe.text_encoder, pipe.vae),
              "classifier_hash": weights_hash(local_classifier)}  # fmt: skip
    key, folder = _cell_key(spec, steps, hashes), None if checkpoints is None else Path(checkpoints)
    order = [(c, s) for c in spec.concepts for s in spec.seeds]
    stored = {}
    if folder is not None:
        stored = {cs: cell for cs in order if (cell := read_cell(_cell_path(folder, *cs), key, verify=verify)) is not None}
    missing = {cs: _missing(spec.methods, stored.get(cs)) for cs in order}
    todo = [cs for cs in order if missing[cs]]
    cells = [(model, classifier, c, s, replace(spec, methods=missing[c, s]), steps, folder, key, stored.get((c, s)), commit)
             for c, s in todo]  # fmt: skip
    measured = dict(zip(todo, run_cells(_run_cell, cells, executor, desc="evaluate", progress=progress)))
    rows, records = [], []
    for cs in order:
        r, rec = measured.get(cs) or stored[cs]
        by_method = {row["method"]: row for row in r}
        rows += [by_method[m] for m in spec.methods]  # the table's methods, in its order
        records.append(rec)
    manifest = {
        "spec": spec.to_dict(),
        "num_inference_steps": steps,
        "guidance_scale": local_model.defaults.guidance_scale,
        "seed_offsets": SEED_OFFSETS,
        "decision": "classifier argmax per factor",
        "model": hashes,
        "versions": library_versions(),
        "git_commit": commit,
        "executor": None if executor is None else type(executor).__name__,
        "resumed": [{"concept": c, "seed": s} for c, s in order if not missing[c, s]],
        "resumed_methods": [{"concept": c, "seed": s, "methods": [m for m in spec.methods if m not in missing[c, s]]}
                            for c, s in order if stored.get((c, s)) and missing[c, s]],  # fmt: skip
        "seconds": time.perf_counter() - start,
        "cell_seconds": sum(rec["seconds"] for rec in records),
    }
    return {"format": FORMAT, "rows": rows, "summary": summarize(rows), "records": records, "manifest": manifest}


__all__ = ["COLUMNS", "GOALS", "HIGHER_IS_BETTER", "TITLES", "TableSpec", "command_line", "comparisons", "goal_rows", "load_result", "markdown", "read_cell", "run_table", "summarize", "write_cell"]
