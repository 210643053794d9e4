"""Execute the research notebooks headless, in full mode (committed with their outputs) or small mode
(`ACTERASE_NOTEBOOK_SMALL=1`, the test suite's smoke run), and record when, on what and how long.

    python -m acterase_interp.notebooks                  # every notebook, full mode, outputs written back
    python -m acterase_interp.notebooks 01_quickstart    # one of them

Each notebook runs in a fresh kernel on this interpreter. The record goes to `notebooks/executed.json`
(one entry per notebook: start time, seconds, mode, git commit, machine, library versions)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from .io import atomic_write_json, atomic_write_text
from .provenance import git_commit, library_versions

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
RECORD_FILE = "executed.json"
CELL_TIMEOUT_S = 7200  # full mode: notebook 02's causal maps run for tens of minutes in one cell
KERNEL = "acterase-notebooks"


def _kernel_specs(folder: Path):
    """A kernelspec that starts an IPython kernel on this interpreter (no installed kernelspec needed,
    and no other environment's Python can be picked up)."""
    from jupyter_client.kernelspec import KernelSpecManager

    spec_dir = folder / KERNEL
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "acterase-interp", "language": "python"}  # fmt: skip
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(folder)])


def strip(nb) -> None:
    """Remove every output and execution count, in place."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None


def execute(nb, *, small: bool, cwd: Path = NOTEBOOK_DIR, timeout_s: int = CELL_TIMEOUT_S):
    """Run a notebook (an nbformat node, stripped first, then filled with outputs in place) top to
    bottom in a fresh kernel; raises nbclient's CellExecutionError on the first failing cell."""
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    strip(nb)
    env = {"ACTERASE_NOTEBOOK_SMALL": "1" if small else "0", "MPLBACKEND": "agg",
           "PLOTLY_RENDERER": "plotly_mimetype",  # JupyterLab draws the figures; no plotly.js copy per notebook
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1)),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    with tempfile.TemporaryDirectory() as kernels:
        km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=_kernel_specs(Path(kernels)))
        client = NotebookClient(nb, km=km, timeout=timeout_s, allow_errors=False,
                                resources={"metadata": {"path": str(cwd)}})  # fmt: skip
        client.execute(env={**os.environ, **env})  # passed on to the kernel's start, not set here
    return nb


def run(names: list[str] | None = None, *, small: bool = False, folder: Path = NOTEBOOK_DIR) -> dict:
    """Execute the named notebooks (default: all), write each back with its outputs and update the
    record; returns the record."""
    import nbformat

    paths = sorted(folder.glob("*.ipynb"))
    if not paths:
        raise SystemExit(f"no notebooks in {folder}: run this from a clone of the repository")
    if names:
        unknown = set(names) - {p.stem for p in paths}
        if unknown:
            raise SystemExit(f"unknown notebook(s) {sorted(unknown)}; choose from {[p.stem for p in paths]}")
        paths = [p for p in paths if p.stem in names]
    record_path = folder / RECORD_FILE
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        started, t0 = datetime.now(timezone.utc), time.perf_counter()
        print(f"executing {path.name} ({'small' if small else 'full'} mode) ...", flush=True)
        execute(nb, small=small, cwd=folder)
        seconds = round(time.perf_counter() - t0, 1)
        atomic_write_text(nbformat.writes(nb) + "\n", path)
        record[path.stem] = {
            "started": started.isoformat(timespec="seconds"),
            "seconds": seconds,
            "mode": "small" if small else "full",
            "commit": git_commit(ROOT),
            "machine": {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
                        "python": platform.python_version()},  # fmt: skip
            "versions": library_versions(),
        }
        atomic_write_json(dict(sorted(record.items())), record_path)
        print(f"  {path.name}: {seconds} s", flush=True)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m acterase_interp.notebooks", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebook stems (default: all), e.g. 01_quickstart")
    parser.add_argument("--small", action="store_true", help="small mode (seconds; the numbers mean nothing)")
    args = parser.parse_args(argv)
    run(args.names, small=args.small)


if __name__ == "__main__":
    main()
