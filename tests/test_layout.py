"""The test tree mirrors the package: a subpackage's tests live in a folder of the same name."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = sorted(p.parent.name for p in (ROOT / "acterase_interp").glob("*/__init__.py"))


def test_every_subpackage_with_tests_has_a_test_folder_of_its_name():
    flat = [p.name for p in (ROOT / "tests").glob("test_*.py")]
    misplaced = [n for n in flat for sub in SUBPACKAGES if n.startswith(f"test_{sub}_")]
    assert not misplaced, f"tests of a subpackage belong in tests/<subpackage>/: {misplaced}"
    folders = {p.parent.name for p in (ROOT / "tests").glob("*/test_*.py")}
    assert folders - {"benchmarks"} <= set(SUBPACKAGES), f"test folders without a subpackage: {folders - set(SUBPACKAGES)}"
    assert {"analysis", "bench", "erase", "evaluation", "world"} <= folders


def test_no_notebook_code_cell_is_longer_than_a_screen():
    import json

    long = {(nb.name, i): n for nb in sorted((ROOT / "notebooks").glob("*.ipynb"))
            for i, cell in enumerate(json.loads(nb.read_text())["cells"]) if cell["cell_type"] == "code"
            if (n := len("".join(cell["source"]).splitlines())) > 40}  # fmt: skip
    assert not long, f"notebook code cells over 40 lines (move the logic into the package): {long}"


def test_the_classifier_is_loaded_in_one_place():
    files = [*(ROOT / "acterase_interp").rglob("*.py"), *(ROOT / "notebooks").glob("*.ipynb")]
    copies = [p.relative_to(ROOT) for p in files if "ConceptClassifier.load(" in p.read_text()]
    assert copies == [Path("acterase_interp/loading.py")], f"use load_classifier(name) instead: {copies}"


def test_notebooks_show_tables_as_data_frames_not_printers_of_their_own():
    import json

    printers = [nb.name for nb in sorted((ROOT / "notebooks").glob("*.ipynb"))
                for cell in json.loads(nb.read_text())["cells"] if cell["cell_type"] == "code"
                if "def table(" in "".join(cell["source"]) or ".ljust(" in "".join(cell["source"])]  # fmt: skip
    assert not printers, f"show records with analysis.to_dataframe(rows, columns=..., digits=...): {printers}"
