"""The research notebooks are committed executed in full mode (`python -m acterase_interp.notebooks`
records when, on what and how long in `notebooks/executed.json`), and run headless, top to bottom,
from a stripped copy in their small settings (`ACTERASE_NOTEBOOK_SMALL=1`: few pairs, steps, images
and seeds), each ending by printing its findings."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from acterase_interp.notebooks import RECORD_FILE, execute

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 900  # generous: CI machines are slow and share their cores
MAX_NOTEBOOK_BYTES = 3_000_000  # outputs included: readable on the web, cheap to clone


def test_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == [
        "01_quickstart.ipynb",
        "02_where_concepts_live.ipynb",
        "03_dimensionality.ipynb",
        "04_ablations.ipynb",
        "05_evaluation.ipynb",
        "06_benchmark.ipynb",
    ]


def _findings(nb) -> str:
    cell = next(c for c in reversed(nb.cells) if "findings" in c.metadata.get("tags", []))
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_executed_in_full_mode(path: Path):
    """Opens with a question and a parameters cell, closes with findings, and carries the outputs of a
    full-mode run that the record describes."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert nb.cells[0].cell_type == "markdown" and "**Question:**" in nb.cells[0].source
    assert "parameters" in code[0].metadata.get("tags", []) and "ACTERASE_NOTEBOOK_SMALL" in code[0].source
    assert "findings" in code[-1].metadata.get("tags", [])
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), "execute it with `python -m acterase_interp.notebooks`"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert "'SMALL': False" in "".join(o.get("text", "") for o in code[0].outputs), "executed in small mode"
    assert _findings(nb).count("\n- ") >= 3
    assert path.stat().st_size <= MAX_NOTEBOOK_BYTES
    entry = json.loads((path.parent / RECORD_FILE).read_text())[path.stem]
    assert entry["mode"] == "full" and entry["seconds"] > 0 and entry["commit"] and entry["versions"]["torch"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_small_mode(path: Path):
    nb = nbformat.read(path, as_version=4)
    execute(nb, small=True, cwd=path.parent, timeout_s=CELL_TIMEOUT_S)  # strips it first; raises on a failing cell
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    parameters = next(c for c in nb.cells if c.cell_type == "code")
    assert "'SMALL': True" in "".join(o.get("text", "") for o in parameters.outputs)
    printed = _findings(nb)
    assert printed.count("\n- ") >= 3, f"the findings cell printed too little:\n{printed}"
