"""The research notebooks run headless, top to bottom, in their small settings
(`ACTERASE_NOTEBOOK_SMALL=1`: few pairs, steps, images and seeds), and each ends by printing its
findings.

The kernel is this interpreter (a kernelspec written to a temporary folder), so the test needs no
installed kernelspec and cannot pick up another environment's Python."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL = "acterase-test"
CELL_TIMEOUT_S = 900  # generous: CI machines are slow and share their cores


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory: pytest.TempPathFactory) -> KernelSpecManager:
    """A kernelspec that starts an IPython kernel on `sys.executable`."""
    folder = tmp_path_factory.mktemp("kernels") / KERNEL
    folder.mkdir()
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "acterase-interp tests", "language": "python"}  # fmt: skip
    (folder / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(folder.parent)])


def test_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == [
        "01_quickstart.ipynb",
        "02_where_concepts_live.ipynb",
        "03_dimensionality.ipynb",
        "04_ablations.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_clean(path: Path):
    """Committed without outputs, opening with a question and a parameters cell, closing with findings."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "clear the outputs before committing"
    assert nb.cells[0].cell_type == "markdown" and "**Question:**" in nb.cells[0].source
    assert "parameters" in code[0].metadata.get("tags", []) and "ACTERASE_NOTEBOOK_SMALL" in code[0].source
    assert "findings" in code[-1].metadata.get("tags", [])


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, kernel_specs: KernelSpecManager, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ACTERASE_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MPLBACKEND", "agg")
    nb = nbformat.read(path, as_version=4)
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=kernel_specs)
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, allow_errors=False,
                            resources={"metadata": {"path": str(path.parent)}})  # fmt: skip
    client.execute()  # raises CellExecutionError on the first failing cell

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    findings = next(c for c in reversed(nb.cells) if "findings" in c.metadata.get("tags", []))
    printed = "".join(o.get("text", "") for o in findings.outputs if o.output_type == "stream" and o.name == "stdout")
    assert printed.count("\n- ") >= 3, f"the findings cell printed too little:\n{printed}"
