"""Scoring localization against planted ground truth: do the difference and causal maps rank the
planted blocks highest, and does the eraser's mask find the planted units?

    python -m acterase_interp.analysis.ground_truth [--model conceptworld] [--out runs/ground_truth.json]

For every planted concept of a model (`model.planted`), per site kind: fit on its prompt pairs,
rank blocks by the difference map (mean over steps) and by the causal map (the drop of the concept
rate when one block is patched over all steps), and compare the top-k blocks (k = the number of
planted blocks) with the planted ones. For a concept planted in FFN units, the IoU of the
eraser's `ffn_hidden` mask with the planted (block, unit) set, per tau.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..erase import EraseOptions, EraserFitter
from ..io import atomic_write_json
from ..provenance import library_versions
from ..world.pairs import conceptworld_pairs
from .evaluation import Evaluator
from .localization import causal_map, eraser_measure, layers_of
from .records import Record

CAUSAL_TAU = 1.0
"""One-block erasers mask every unit whose target importance exceeds the source's: a strong probe."""
IOU_TAUS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2)


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


def score_concept(
    model: Any,
    classifier: Any,
    record: dict,
    site_kinds: Sequence[str] = ("ffn_hidden", "attn2_out"),
    n_pairs: int = 10,
    seeds: Sequence[int] = (0, 1),
    num_inference_steps: int | None = None,
    progress: bool = True,
) -> Record:
    """Ground-truth scores for one planted concept (see the module docstring)."""
    concept, truth = record["concept"], record["blocks"]
    steps = num_inference_steps or model.defaults.num_inference_steps
    pairs = conceptworld_pairs(concept, n=n_pairs, seed=0)
    evaluator = Evaluator.from_pairs(model, classifier, pairs, num_inference_steps=steps)
    out: Record = {"concept": concept, "family": record["spec"]["family"], "planted_blocks": truth, "maps": {}}
    for kind in site_kinds:
        fitter = EraserFitter(model, EraseOptions(site_kind=kind, num_inference_steps=steps), progress=progress)
        fitter.fit(pairs)
        stats = fitter.statistics
        blocks = {s.name: s.block for s in stats.sites}
        difference = {blocks[n]: p.mean().item() for n, p in stats.difference().items()}
        rows = causal_map(eraser_measure(stats, evaluator, tau=CAUSAL_TAU, seeds=seeds), layers_of(stats),
                          [(0, steps)], progress=progress)  # fmt: skip
        causal = {r["layer"]: r["concept_drop"] for r in rows}
        out["maps"][kind] = {
            "difference": {"values": difference, **precision_recall(ranked_blocks(difference), truth)},
            "causal": {"values": causal, "damage": {r["layer"]: r["damage"] for r in rows},
                       **precision_recall(ranked_blocks(causal), truth)},
        }  # fmt: skip
        if kind == "ffn_hidden" and record.get("units"):
            out["unit_iou"] = {str(t): unit_iou(stats.eraser(tau=t).masks, record["units"], stats.sites)
                               for t in IOU_TAUS}  # fmt: skip
    return out


def score_planted(model: Any, classifier: Any, progress: bool = True, **kwargs: Any) -> dict:
    """`score_concept` for every planted concept of `model`, with provenance."""
    if not model.planted:
        raise ValueError("this model holds no planted concepts (model.planted is empty)")
    concepts = [score_concept(model, classifier, r, progress=progress, **kwargs)
                for r in tqdm(model.planted, desc="planted concepts", disable=not progress)]  # fmt: skip
    return {"concepts": concepts, "options": {"causal_tau": CAUSAL_TAU, **kwargs}, "versions": library_versions()}


def markdown_table(result: dict) -> str:
    lines = ["| concept | planted in | site kind | difference map top-k (P / R) | causal map top-k (P / R) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for c in result["concepts"]:
        for kind, m in c["maps"].items():
            d, k = m["difference"], m["causal"]
            lines.append(f"| {c['concept']} | {c['family']}: {', '.join(c['planted_blocks'])} | {kind} | "
                         f"{', '.join(d['top'])} ({d['precision']:.2f} / {d['recall']:.2f}) | "
                         f"{', '.join(k['top'])} ({k['precision']:.2f} / {k['recall']:.2f}) |")  # fmt: skip
    for c in result["concepts"]:
        if "unit_iou" in c:
            lines.append(f"\nIoU of the ffn_hidden mask with the planted units of {c['concept']!r}: " +
                         ", ".join(f"tau {t}: {v:.3f}" for t, v in c["unit_iou"].items()))  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    from ..loading import conceptworld_dir, load
    from ..world.classifier import ConceptClassifier

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="conceptworld")
    parser.add_argument("--n-pairs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="evaluation seeds of the causal map")
    parser.add_argument("--out", type=Path, default=Path("runs/ground_truth.json"))
    args = parser.parse_args(argv)
    model = load(args.model)
    classifier = ConceptClassifier.load(conceptworld_dir() / "classifier")
    result = score_planted(model, classifier, n_pairs=args.n_pairs, seeds=tuple(args.seeds))
    atomic_write_json(result, args.out)
    print(markdown_table(result))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
