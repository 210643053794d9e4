"""What one cell of the evaluation table costs: seconds per (concept, method, seed) at the table's
default budgets (`TableSpec()`: 10 pairs, 32 images per prompt set, prompt search 8 prompts x 10
iterations x 8 candidates, concept inversion 100 steps of 8), split into the method's fit, the
prompt search, the concept inversion and the rest (the four prompt sets' images and their reading,
and the unerased reference the cell draws first).

    python -m benchmarks.evaluation_cell --out benchmarks/results            # every method, triangle, seed 0
    python -m benchmarks.evaluation_cell --methods acterase uce --concept heart

Each method runs as the table runs it (`evaluation.table`'s own cell function, one method per
call), in this process, with the torch threads it has. Writes `<out>/evaluation-cell-<device>.json`
(rows and provenance) and `.md` (the table).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from acterase_interp import load, load_classifier
from acterase_interp.evaluation.baselines import METHODS
from acterase_interp.evaluation.table import TableSpec, _run_seed
from acterase_interp.io import atomic_write_json, atomic_write_text
from acterase_interp.provenance import git_commit, library_versions

PHASES = ("fit_s", "search_s", "inversion_s", "images_s")


def measure(model, classifier, concept: str, method: str, seed: int) -> dict:
    """One (concept, method, seed) cell at default budgets, timed whole and by phase."""
    spec = TableSpec(concepts=(concept,), methods=(method,), seeds=(seed,))
    start = time.perf_counter()
    (row,), _ = _run_seed(model, classifier, concept, seed, spec, model.defaults.num_inference_steps)
    cell = time.perf_counter() - start
    search, inversion = (row["attacks"][a]["seconds"] for a in ("prompt_search", "concept_inversion"))
    return {"concept": concept, "method": method, "seed": seed, "cell_s": cell, "fit_s": row["fit_s"],
            "search_s": search, "inversion_s": inversion, "images_s": cell - row["fit_s"] - search - inversion,
            "tau_search_s": row["method_options"].get("tau_search_s")}  # fmt: skip


def markdown(result: dict) -> str:
    p = result["provenance"]
    lines = [f"# Evaluation-table cell cost on {result['device']}", "",
             f"`{p['command']}` at commit {p['git_commit'] or 'unknown'}, {p['date']}; {p['torch_threads']} torch "
             f"threads; torch {p['versions']['torch']}. Default budgets (`TableSpec()`); one run per method.", "",
             "| method | cell (s) | fit | prompt search | concept inversion | images and reference |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['cell_s']:.1f} | " + " | ".join(f"{r[k]:.1f}" for k in PHASES) + " |")
    cells = [r["cell_s"] for r in result["rows"]]
    search = sum(r["search_s"] for r in result["rows"]) / sum(cells)
    lines += ["", f"Median {statistics.median(cells):.1f} s per (concept, method, seed) cell, {sum(cells):.0f} s for "
              f"the {len(cells)} methods of one (concept, seed); the prompt search takes {100 * search:.0f}% of it."]  # fmt: skip
    lines += [f"{r['method']}: {r['fit_s']:.1f} s to erase, {r['fit_s'] - r['tau_search_s']:.1f} s without its tau search."
              for r in result["rows"] if r.get("tau_search_s")]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.evaluation_cell", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--concept", default="triangle")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model, classifier = load("conceptworld"), load_classifier("conceptworld")
    rows = [measure(model, classifier, args.concept, m, args.seed) for m in tqdm(args.methods, desc="cells")]
    command = " ".join(["python -m benchmarks.evaluation_cell", *(sys.argv[1:] if argv is None else argv)])
    result = {"device": "cpu", "rows": rows,
              "provenance": {"command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             "git_commit": git_commit(), "versions": library_versions(),
                             "torch_threads": torch.get_num_threads(), "spec": TableSpec().to_dict()}}  # fmt: skip
    out = Path(args.out)
    atomic_write_json(result, out / "evaluation-cell-cpu.json")
    atomic_write_text(table := markdown(result), out / "evaluation-cell-cpu.md")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
