"""The package's import graph has no cycles: no module imports one that imports it back, not even
inside a function (imports under `if TYPE_CHECKING:` are for annotations only and do not count).
The top-level package exports the names the README and the notebooks use most."""

from __future__ import annotations

import ast
import importlib
import json
import re
from pathlib import Path

import acterase_interp

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "acterase_interp"
COMMON: dict[str, str] = {
    "load": "loading", "load_classifier": "loading", "conceptworld_dir": "loading", "generate": "generation",
    "TextInjection": "generation", "EraseOptions": "erase", "EraserFitter": "erase", "Eraser": "erase",
    "FitStatistics": "erase", "PromptPairs": "erase", "merge": "erase", "ConceptClassifier": "world.classifier",
    "conceptworld_pairs": "world.pairs", "library_versions": "provenance", "Spec": "executor",
    "PlantSpec": "plant", "build_random_sd": "random_sd",
}  # fmt: skip
"""Names the README and the notebooks import most, and the module each lives in."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Modules of the package that `module` imports at run time."""
    out: set[str] = set()
    here = module.split(".") if is_package else module.split(".")[:-1]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            base = base if node.level else node.module or ""
            for alias in node.names:  # `from .pkg import submodule` imports the submodule
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in out if m in known and m != module}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    return {m: _runtime_imports(ast.parse(p.read_text()), m, p.name == "__init__.py", known) for m, p in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, or None. A package's own `__init__` importing its submodules is not one."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def edges(m: str) -> set[str]:  # a submodule importing its parent package waits for the parent
        return {n for n in graph[m] if not m.startswith(n + ".")}

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges(m)):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_graph_sees_the_imports_that_matter():
    graph = _graph()
    assert "acterase_interp.erase.eraser" in graph["acterase_interp.erase.statistics"]
    assert "acterase_interp.patching" in graph["acterase_interp.erase.eraser"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    assert _cycle(_graph()) is None


def test_erasers_do_not_import_statistics_and_the_patching_layer_imports_no_method():
    graph = _graph()
    assert "acterase_interp.erase.statistics" not in graph["acterase_interp.erase.eraser"]
    assert not {m for m in graph["acterase_interp.patching"] if m.startswith(("acterase_interp.erase", "acterase_interp.analysis"))}


def _top_level_imports() -> set[str]:
    """Every name the README and the notebooks' code cells import `from acterase_interp`."""
    texts = [(ROOT / "README.md").read_text()]
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        texts += ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    found = re.findall(r"^from acterase_interp import ([\w, ]+)$", "\n".join(texts), re.MULTILINE)
    return {name.strip() for names in found for name in names.split(",")}


def test_the_top_level_exports_every_name_the_readme_and_notebooks_import_from_it():
    names = _top_level_imports()
    assert {"load", "generate", "load_classifier"} <= names
    assert names <= set(acterase_interp.__all__)


def test_common_names_are_exported_and_are_the_objects_of_their_home_modules():
    assert set(COMMON) <= set(acterase_interp.__all__)
    assert all(hasattr(acterase_interp, name) for name in acterase_interp.__all__)
    for name, module in COMMON.items():
        assert getattr(acterase_interp, name) is getattr(importlib.import_module(f"acterase_interp.{module}"), name)


def test_exports_do_not_shadow_submodules():
    """`acterase_interp.plant` stays the module (a function of that name would hide it)."""
    modules = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert not modules & set(acterase_interp.__all__)
