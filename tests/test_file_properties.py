"""Every file the package reads, fuzzed (Hypothesis): prompt-pair JSON, eraser and fit-statistics
manifests and their tensor files, planted.json and evaluation cells. Random bytes, random JSON, a
valid file with one value changed or deleted, truncated or byte-flipped: each either loads or raises
the package's `ArtifactError` with a message, never an error from deep inside a parser.
`ACTERASE_FUZZ_EXAMPLES` sets the examples per test (default 50)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from acterase_interp.erase.eraser import MANIFEST, MASKS, VALUES, Eraser
from acterase_interp.erase.pairs import PromptPairs
from acterase_interp.erase.statistics import MANIFEST as STATISTICS_MANIFEST
from acterase_interp.erase.statistics import TENSORS, FitStatistics
from acterase_interp.evaluation.table import read_cell, write_cell
from acterase_interp.integrity import ArtifactError
from acterase_interp.io import atomic_save_safetensors
from acterase_interp.loading import PLANTED_FILE, read_planted, write_planted

FIXTURES = Path(__file__).parent / "fixtures" / "v1"
FUZZ = settings(max_examples=int(os.environ.get("ACTERASE_FUZZ_EXAMPLES", "50")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])  # fmt: skip

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def mutated(draw: st.DrawFn, valid: dict) -> dict:
    """`valid` with one value somewhere inside it replaced by random JSON, or deleted."""
    doc = copy.deepcopy(valid)
    node: Any = doc
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, (dict, list)) and child and draw(st.booleans()):
            node = child  # go deeper
            continue
        if draw(st.booleans()):
            node[key] = draw(JSON)
        elif isinstance(node, dict):
            del node[key]
        else:
            node.pop(key)
        return doc


def damaged(valid: bytes) -> st.SearchStrategy[bytes]:
    """`valid` cut short, with one byte changed, or replaced by random bytes."""
    n = len(valid)
    cut = st.integers(0, n - 1).map(lambda i: valid[:i])
    flip = st.tuples(st.integers(0, n - 1), st.integers(1, 255)).map(
        lambda t: valid[: t[0]] + bytes([valid[t[0]] ^ t[1]]) + valid[t[0] + 1 :]
    )
    return cut | flip | st.binary(max_size=2 * n)


def contents(valid: dict) -> st.SearchStrategy[bytes]:
    """Bytes of a file that should hold `valid`: random JSON, `valid` mutated, or damaged bytes."""
    text = json.dumps(valid, indent=2).encode()
    as_bytes = lambda doc: json.dumps(doc).encode()  # noqa: E731
    return JSON.map(as_bytes) | mutated(valid).map(as_bytes) | damaged(text)


def loads_or_says_why(load: Callable[[], Any]) -> Any:
    """`load()`, where the one error allowed is an ArtifactError with a message."""
    try:
        out = load()
    except ArtifactError as err:
        assert str(err).strip()
        event("refused")
        return None
    event("loaded")  # --hypothesis-show-statistics: both outcomes occur
    return out


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, Path]:
    """Valid artifacts of this version to damage: an eraser with statistics, a cell, a planted folder."""
    root = tmp_path_factory.mktemp("templates")
    with pytest.warns(UserWarning):  # the v1 fixtures carry no hashes
        eraser, statistics = Eraser.load(FIXTURES / "eraser"), FitStatistics.load(FIXTURES / "statistics")
    eraser.save(root / "eraser", statistics=statistics)
    row = {"concept": "red", "method": "unerased", "seed": 0, "fit_s": 1.0}
    write_cell(root / "cell.json", "k", [row], {"seed": 0})
    atomic_save_safetensors({"w": torch.arange(4.0)}, root / "pipe" / "unet" / "diffusion_pytorch_model.safetensors")
    write_planted(root / "pipe", [{"concept": "heart", "blocks": ["up.0.0"]}])
    return {"eraser": root / "eraser", "cell": root / "cell.json", "pipe": root / "pipe"}


def _valid(path: Path) -> dict:
    return json.loads(path.read_text())


def _copy(folder: Path, tmp: str) -> Path:
    return Path(shutil.copytree(folder, Path(tmp) / folder.name))


# a mutation that drops the recorded hashes loads with a notice: expected here
pytestmark = pytest.mark.filterwarnings("ignore::acterase_interp.integrity.UnverifiedArtifactWarning")

PAIRS = {"concept": "heart", "targets": ["a red heart", "a blue heart"], "sources": ["a red circle", "a blue circle"],
         "heldout": ["a heart shape"], "non_target": ["a green square"], "meta": {"by": "hand"}}  # fmt: skip


@FUZZ
@given(data=contents(PAIRS))
def test_prompt_pair_files(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pairs.json"
        path.write_bytes(data)
        pairs = loads_or_says_why(lambda: PromptPairs.load(path))
        assert pairs is None or isinstance(pairs, PromptPairs)


@FUZZ
@given(data=st.data())
def test_eraser_manifests(templates, data):
    manifest = templates["eraser"] / MANIFEST
    content = data.draw(contents(_valid(manifest)))
    with tempfile.TemporaryDirectory() as tmp:
        folder = _copy(templates["eraser"], tmp)
        (folder / MANIFEST).write_bytes(content)
        for verify in (True, False):
            eraser = loads_or_says_why(lambda: Eraser.load(folder, verify=verify))
            assert eraser is None or isinstance(eraser, Eraser)


@FUZZ
@given(name=st.sampled_from([MASKS, VALUES]), data=st.data())
def test_eraser_tensor_files(templates, name, data):
    content = data.draw(damaged((templates["eraser"] / name).read_bytes()))
    with tempfile.TemporaryDirectory() as tmp:
        folder = _copy(templates["eraser"], tmp)
        (folder / name).write_bytes(content)
        with pytest.raises(ArtifactError, match=f"{name} has sha256"):  # any change at all is caught
            Eraser.load(folder)
        eraser = loads_or_says_why(lambda: Eraser.load(folder, verify=False))
        assert eraser is None or isinstance(eraser, Eraser)


@FUZZ
@given(tensors=st.booleans(), data=st.data())
def test_fit_statistics_files(templates, tensors, data):
    folder = templates["eraser"] / "statistics"
    name = TENSORS if tensors else STATISTICS_MANIFEST
    valid = (folder / name).read_bytes()
    content = data.draw(damaged(valid) if tensors else contents(_valid(folder / name)))
    with tempfile.TemporaryDirectory() as tmp:
        copied = _copy(folder, tmp)
        (copied / name).write_bytes(content)
        for verify in (True, False):
            statistics = loads_or_says_why(lambda: FitStatistics.load(copied, verify=verify))
            assert statistics is None or isinstance(statistics, FitStatistics)


@FUZZ
@given(data=st.data())
def test_planted_json(templates, data):
    content = data.draw(contents(_valid(templates["pipe"] / PLANTED_FILE)))
    with tempfile.TemporaryDirectory() as tmp:
        folder = _copy(templates["pipe"], tmp)
        (folder / PLANTED_FILE).write_bytes(content)
        for verify in (True, False):
            planted = loads_or_says_why(lambda: read_planted(folder, verify=verify))
            assert planted is None or all(isinstance(r["concept"], str) for r in planted)


@FUZZ
@given(data=st.data())
def test_evaluation_cells(templates, data):
    content = data.draw(contents(_valid(templates["cell"])))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cell.json"
        path.write_bytes(content)
        for verify in (True, False):
            cell = loads_or_says_why(lambda: read_cell(path, "k", verify=verify))
            assert cell is None or (isinstance(cell[0], list) and isinstance(cell[1], dict))
