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
