"""Scoring localization against planted ground truth: does the causal sweep rank the planted
family and blocks first, does the difference map, and does the eraser's mask find the planted units?

    python -m acterase_interp.analysis.ground_truth [--model conceptworld] [--workers 2] [--out runs/ground_truth.json]

For every planted concept of a model (`model.planted`), per family (`ffn_hidden`, `attn2_k`,
`attn2_v`, `text` by default): the causal map is `causal_sweep` erasing with each block alone over
all steps at `CAUSAL_TAU` (the drop of the concept rate), and, for activation families, the
difference map (mean over steps) of the same fit; the top-k blocks of each (k = the number of
planted blocks) are scored against the planted ones. `family_rank` orders the families by their
best block's drop and says whether the planted family comes first. For a concept planted in FFN
units, the IoU of the eraser's `ffn_hidden` mask with the planted (block, unit) set, per tau, and
of the top-N units of two per-unit rankings (|z|, and I_t - I_s), N = the number of planted units.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..erase import EraseOptions, EraserFitter
from ..executor import Executor, resolve
from ..io import atomic_write_json
from ..provenance import library_versions
from ..world.pairs import conceptworld_pairs
from .causal import TEXT, block_difference, causal_sweep
from .records import Record

CAUSAL_TAU = 1.0
"""One-block erasers mask every unit whose target importance exceeds the source's: a strong probe."""
IOU_TAUS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2)
FAMILIES: tuple[str, ...] = ("ffn_hidden", "attn2_k", "attn2_v", TEXT)
"""The sweep's families scored by default: the FFN, the cross-attention keys and values, the text."""
PLANTED_FAMILIES: dict[str, tuple[str, ...]] = {
    "ffn": ("ffn_hidden",),
    "ffn_units": ("ffn_hidden",),
    "attn2_kv": ("attn2_k", "attn2_v", TEXT),
}
"""The sweep families that hold a planting (`plant.py`'s spec family): a concept planted in the
cross-attention's K/V projections is carried by their outputs and, since those read nothing but
the text, equally by text injection into those blocks: all three count as planted."""


def planted_families(spec_family: str) -> tuple[str, ...]:
    """The sweep families that count as planted for a planting's spec family (`PLANTED_FAMILIES`)."""
    if spec_family not in PLANTED_FAMILIES:
        raise ValueError(f"unknown planted family {spec_family!r}; known: {sorted(PLANTED_FAMILIES)}")
    return PLANTED_FAMILIES[spec_family]


def ranked_blocks(values: dict[str, float]) -> list[str]:
    """Blocks by decreasing value (ties keep execution order)."""
    return sorted(values, key=lambda b: -values[b])


def precision_recall(ranked: Sequence[str], truth: Sequence[str], k: int | None = None) -> Record:
    """Precision and recall of the top `k` (default: as many as `truth`) of `ranked` against `truth`."""
    truth = set(truth)
    if not truth:
        raise ValueError("no ground-truth blocks to score against")
    k = len(truth) if k is None else k
    top = set(ranked[:k])
    hits = len(top & truth)
    return {"k": k, "top": list(ranked[:k]), "precision": hits / k, "recall": hits / len(truth)}


def unit_iou(masks: dict[str, Any], planted_units: dict[str, list[int]], sites: Sequence[Any]) -> float:
    """IoU of the (block, unit) entries a unit mask switches on with the planted ones, over every
    `ffn_hidden` site of the eraser (a mask (steps, 1, units) counts a unit once if on at any step)."""
    on = set()
    for site in sites:
        if site.kind == "ffn_hidden":
            units = masks[site.name].reshape(-1, masks[site.name].shape[-1]).any(0).nonzero().flatten().tolist()
            on |= {(site.block, u) for u in units}
    truth = {(b, u) for b, us in planted_units.items() for u in us}
    union = on | truth
    return len(on & truth) / len(union) if union else 0.0


def top_units_iou(scores: Mapping[str, Any], planted_units: dict[str, list[int]], sites: Sequence[Any]) -> float:
    """IoU with the planted (block, unit) set of the N highest-scoring `ffn_hidden` units over all
    blocks together (N = the number of planted units, so IoU 1 means exactly the planted units):
    a per-unit ranking with no threshold and no union over pairs or steps."""
    entries = [(float(v), site.block, u) for site in sites if site.kind == "ffn_hidden"
               for u, v in enumerate(scores[site.name].flatten().tolist())]  # fmt: skip
    truth = {(b, u) for b, us in planted_units.items() for u in us}
    top = {(b, u) for _, b, u in sorted(entries, key=lambda e: -e[0])[: len(truth)]}
    return len(top & truth) / len(top | truth) if truth else 0.0


def family_rank(causal: Mapping[str, Mapping[str, float]], planted: Sequence[str]) -> Record:
    """Families ordered by their best block's concept drop (`causal[family][block]`; ties keep the
    given order), and `planted_first`: whether the best planted family's drop beats every other
    family's strictly (a tie is no evidence). None when `causal` holds no planted family or nothing
    but planted ones."""
    best = {f: max(((b, d) for b, d in v.items() if d is not None), key=lambda x: x[1], default=(None, None))
            for f, v in causal.items()}  # fmt: skip
    drops = {f: -math.inf if d is None else d for f, (_, d) in best.items()}  # unmeasured ranks last
    ranks = [{"family": f, "block": best[f][0], "concept_drop": best[f][1]} for f in sorted(best, key=lambda f: -drops[f])]
    ours, others = [drops[f] for f in best if f in planted], [drops[f] for f in best if f not in planted]
    first = max(ours) > max(others) if ours and others else None
    return {"ranks": ranks, "planted_families": [f for f in best if f in planted], "planted_first": first}


def _fit(model: Any, pairs: Any, kind: str, steps: int, progress: bool) -> Any:
    fitter = EraserFitter(model, EraseOptions(site_kind=kind, num_inference_steps=steps), progress=progress)
    fitter.fit(pairs)
    return fitter.statistics


def score_concept(
    model: Any,
    classifier: Any,
    record: dict,
    families: Sequence[str] = FAMILIES,
    n_pairs: int = 10,
    seeds: Sequence[int] = (0, 1),
    num_inference_steps: int | None = None,
    executor: Executor | None = None,
    progress: bool = True,
) -> Record:
    """Ground-truth scores for one planted concept (see the module docstring): per family of
    `families`, `maps[family]["causal"]` (the sweep's drop and damage per block, top-k precision
    and recall) and, for activation families, `maps[family]["difference"]`; `family_rank`; and
    `unit_iou` when the planting names units and `ffn_hidden` is scored. With `executor`, `model`
    and `classifier` are `Spec`s and the sweep's cells run on its workers (the fits run here)."""
    concept, truth = record["concept"], record["blocks"]
    planted = planted_families(record["spec"]["family"])
    loaded = resolve(model)
    steps = num_inference_steps or loaded.defaults.num_inference_steps
    pairs = conceptworld_pairs(concept, n=n_pairs, seed=0)
    fits = {f: _fit(loaded, pairs, f, steps, progress) for f in families if f != TEXT}
    rows = causal_sweep(model, classifier, pairs, families, directions="erase", tau=CAUSAL_TAU, seeds=seeds,
                        statistics=fits, evaluation={"num_inference_steps": steps}, executor=executor,
                        progress=progress)  # fmt: skip
    out: Record = {"concept": concept, "family": record["spec"]["family"], "planted_blocks": truth, "maps": {}}
    for family in families:
        part = [r for r in rows if r["family"] == family]
        causal = {r["layer_label"]: r["concept_drop"] for r in part}
        maps = {"causal": {"values": causal, "damage": {r["layer_label"]: r["damage"] for r in part},
                           **precision_recall(ranked_blocks(causal), truth)}}  # fmt: skip
        if family in fits:
            difference = block_difference(fits[family])
            maps["difference"] = {"values": difference, **precision_recall(ranked_blocks(difference), truth)}
        out["maps"][family] = maps
    out["family_rank"] = family_rank({f: m["causal"]["values"] for f, m in out["maps"].items()}, planted)
    if "ffn_hidden" in fits and record.get("units"):
        stats = fits["ffn_hidden"]
        out["unit_iou"] = {str(t): unit_iou(stats.eraser(tau=t).masks, record["units"], stats.sites) for t in IOU_TAUS}
        rankings = {"zscore": {s.name: stats.zscores(s.name).abs() for s in stats.sites},  # LocoGen's |z|
                    "importance": {s.name: (stats.importance_target[s.name] - stats.importance_source[s.name]).mean((0, 1))
                                   for s in stats.sites}}  # Eq. 5's I_t - I_s, mean over pairs and steps  # fmt: skip
        out["top_units_iou"] = {k: top_units_iou(v, record["units"], stats.sites) for k, v in rankings.items()}
    return out


def score_planted(model: Any, classifier: Any, progress: bool = True, **kwargs: Any) -> dict:
    """`score_concept` for every planted concept of `model` (a loaded model, or a `Spec` with an
    `executor=`), with provenance."""
    planted = resolve(model).planted
    if not planted:
        raise ValueError("this model holds no planted concepts (model.planted is empty)")
    concepts = [score_concept(model, classifier, r, progress=progress, **kwargs)
                for r in tqdm(planted, desc="planted concepts", disable=not progress)]  # fmt: skip
    options = {"causal_tau": CAUSAL_TAU, **{k: v for k, v in kwargs.items() if k != "executor"}}
    return {"concepts": concepts, "options": options, "versions": library_versions()}


def _top(m: Record) -> str:
    return f"{', '.join(m['top'])} ({m['precision']:.2f} / {m['recall']:.2f})"


def markdown_table(result: dict) -> str:
    """Per planted concept and family, the top-k blocks (precision / recall) of the difference map
    (activation families) and of the causal sweep, the family with the largest drop, the planted
    family's rank, and the unit IoU where the planting was unit-sparse."""
    lines = ["| concept | planted in | family | difference map top-k (P / R) | causal top-k (P / R) | best drop |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for c in result["concepts"]:
        for family, m in c["maps"].items():
            diff = _top(m["difference"]) if "difference" in m else "n/a"
            drops = [d for d in m["causal"]["values"].values() if d is not None]
            best = f"{max(drops):.3f}" if drops else "n/a"
            lines.append(f"| {c['concept']} | {c['family']}: {', '.join(c['planted_blocks'])} | {family} | {diff} | "
                         f"{_top(m['causal'])} | {best} |")  # fmt: skip
    lines.append("")
    for c in result["concepts"]:
        rank = c["family_rank"]
        order = ", ".join(f"{r['family']} ({r['block']}: {r['concept_drop']:.3f})" if r["block"] else r["family"]
                           for r in rank["ranks"])  # fmt: skip
        verdict = {True: "first", False: "not first", None: "not ranked"}[rank["planted_first"]]
        lines.append(f"- {c['concept']!r}: families by best drop: {order}; planted "
                     f"({', '.join(rank['planted_families']) or 'none scored'}) {verdict}")  # fmt: skip
    for c in result["concepts"]:
        if "unit_iou" in c:
            lines.append(f"- IoU of the ffn_hidden mask with the planted units of {c['concept']!r}: " +
                         ", ".join(f"tau {t}: {v:.3f}" for t, v in c["unit_iou"].items()))  # fmt: skip
        if "top_units_iou" in c:
            lines.append(f"- IoU of the top-N ffn_hidden units (N = planted) with the planted units of {c['concept']!r}: "
                         + ", ".join(f"{k} ranking {v:.3f}" for k, v in c["top_units_iou"].items()))  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    from ..executor import Spec, one_thread_processes
    from ..loading import load, load_classifier

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="conceptworld")
    parser.add_argument("--n-pairs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="evaluation seeds of the causal sweep")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), help="sweep families to score")
    parser.add_argument("--workers", type=int, default=0, help="one-thread worker processes (0: run here)")
    parser.add_argument("--out", type=Path, default=Path("runs/ground_truth.json"))
    args = parser.parse_args(argv)
    model = Spec.of(load, args.model)
    classifier = Spec.of(load_classifier, "conceptworld")
    kwargs = {"families": tuple(args.families), "n_pairs": args.n_pairs, "seeds": tuple(args.seeds),
              "num_inference_steps": args.steps}
    if args.workers:
        with one_thread_processes(args.workers) as pool:
            result = score_planted(model, classifier, executor=pool, **kwargs)
    else:
        result = score_planted(model, classifier, **kwargs)
    atomic_write_json(result, args.out)
    print(markdown_table(result))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
