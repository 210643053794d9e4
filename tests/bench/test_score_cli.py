"""`acterase score`: the localizers scored on a planted pipeline folder with a reader imported from
the user's own module (or a ConceptWorld classifier), results.json and table.md written, bad
readers, pairs and concepts refused with exit status 2 and one line."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
import torch

from acterase_interp.cli import SHARED, _import_reader, _parser, main
from acterase_interp.integrity import sha256_file
from acterase_interp.loading import load
from acterase_interp.plant import plant
from acterase_interp.world.architecture import save_world
from acterase_interp.world.pairs import conceptworld_pairs
from tests.bench.test_own import SOURCES, SPEC, TARGETS, _own_images

READERS = "score_cli_readers"
"""The module of readers the tests write (a name no other test imports)."""
READER_SOURCE = '''
import torch

THRESHOLD = 0.5


def bright(images):
    """A reader without a logit."""
    return images.mean(dim=(1, 2, 3)) > THRESHOLD


class Redness:
    """A reader with a differentiable logit."""

    def logit(self, images):
        return 20 * (images[:, 0] - images[:, 2]).mean(dim=(1, 2))

    def __call__(self, images):
        return self.logit(images) > 0


red = Redness()
'''
LOCALIZERS = ("zscore", "importance_difference")


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory) -> Path:
    """A pipeline folder as `acterase plant` writes one: the default model with "blob" planted into
    three units of two blocks in two training steps (the default model's records kept)."""
    model = load("conceptworld")
    images, captions = _own_images()
    record = plant(model.pipeline, images, captions, "blob", SPEC, progress=False)
    folder = tmp_path_factory.mktemp("score") / "planted"
    save_world(model.pipeline, folder, [*model.planted, record.to_dict()])
    return folder


@pytest.fixture
def readers(tmp_path, monkeypatch) -> Path:
    """The current folder holds the readers' module, a package with one inside, a module that fails
    to import, and prompt pairs of "blob"; none of them stays imported after the test."""
    (tmp_path / f"{READERS}.py").write_text(READER_SOURCE)
    (tmp_path / "score_cli_pkg").mkdir()
    (tmp_path / "score_cli_pkg" / "__init__.py").write_text("")
    (tmp_path / "score_cli_pkg" / "inner.py").write_text(READER_SOURCE)
    (tmp_path / "score_cli_broken.py").write_text("raise RuntimeError('no GPU here')\n")
    pairs = {"targets": list(TARGETS), "sources": list(SOURCES), "non_target": ["a green square on stripes"]}
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    monkeypatch.chdir(tmp_path)
    path = list(sys.path)
    yield tmp_path
    for name in (READERS, "score_cli_pkg", "score_cli_pkg.inner", "score_cli_broken"):
        sys.modules.pop(name, None)
    assert sys.path == path  # the import put the current folder on sys.path only while it ran


def test_score_writes_rows_for_every_localizer_and_a_table(planted_dir, readers, capsys):
    out = readers / "out"
    argv = ["score", "--model", str(planted_dir), "--concept", "blob", "--reader", f"{READERS}:red", "--pairs",
            "pairs.json", "--localizers", *LOCALIZERS, "--steps", "2", "--grid", "0", "2", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "results.json").read_text())
    table = (out / "table.md").read_text()
    assert table in printed and "| own:blob | ffn_units | zscore |" in table
    rows = {(r["localizer"], r["metric"]): r for r in result["rows"]}
    assert {r["localizer"] for r in result["rows"]} == set(LOCALIZERS)
    for loc in LOCALIZERS:
        auroc = rows[(loc, "unit_auroc")]
        assert auroc["planting"] == "own:blob" and auroc["split"] == "test" and 0 <= auroc["value"] <= 1
        assert rows[(loc, "faithfulness_damage_auc")]["value"] is None  # a reader labels no non-target content
    # the truth is the record that planted.json holds for blob
    record = load(planted_dir).planted[-1]
    truth = result["planting"]["truth"]
    assert record["concept"] == "blob" and truth["concept"] == "blob" and truth["family"] == "ffn_units"
    assert truth["sites"] == ["mid.0.ffn_hidden", "up.0.0.ffn_hidden"]
    assert truth["units"] == {f"{b}.ffn_hidden": u for b, u in record["units"].items()}
    # two curve points (n = 0 and 2) per localizer, on the pairs of the file
    assert [c["n"] for c in result["curves"]] == [[0, 2]] * 2
    manifest = result["manifest"]
    assert manifest["pairs"]["targets"] == list(TARGETS) and manifest["pairs"]["concept"] == "blob"
    assert manifest["options"]["localizers"] == list(LOCALIZERS) and manifest["options"]["num_inference_steps"] == 2
    assert set(manifest["localizers"]) == set(LOCALIZERS) and "git_commit" in manifest and manifest["versions"]["torch"]
    assert manifest["reader_source"]["sha256"] == sha256_file(readers / f"{READERS}.py")
    command = shlex.split(manifest["command"])
    assert command[:2] == ["acterase", "score"] and command[command.index("--reader") + 1] == f"{READERS}:red"
    assert command[command.index("--localizers") + 1 : command.index("--localizers") + 3] == list(LOCALIZERS)


def test_score_a_conceptworld_value_with_default_pairs_and_the_classifier_as_reader(planted_dir, readers, capsys):
    """heart, the default model's own planting, kept in the folder: ConceptWorld pairs by default."""
    out = readers / "heart"
    argv = ["score", "--model", str(planted_dir), "--concept", "heart", "--reader", "conceptworld", "--n-pairs", "2",
            "--localizers", "zscore", "--steps", "2", "--grid", "0", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    result = json.loads((out / "results.json").read_text())
    assert result["manifest"]["pairs"]["targets"] == list(conceptworld_pairs("heart", n=2, seed=0).targets)
    assert result["manifest"]["reader_source"] is None
    rows = {(r["localizer"], r["metric"]): r for r in result["rows"]}
    assert rows[("zscore", "unit_auroc")]["planting"] == "own:heart" and 0 <= rows[("zscore", "unit_auroc")]["value"] <= 1
    assert result["planting"]["truth"]["sites"] == ["up.0.0.ffn_hidden", "up.0.1.ffn_hidden"]
    assert (out / "table.md").is_file()


@pytest.mark.parametrize(
    "reader, message",
    [
        (READERS, "--reader must be MODULE:ATTR"),
        (f"{READERS}:", "--reader must be MODULE:ATTR"),
        ("score_cli_no_such_module:reader", "no module named 'score_cli_no_such_module' importable from"),
        (f"{READERS}:missing", "has no attribute 'missing'"),
        (f"{READERS}:Redness.nothing", "has no attribute 'Redness.nothing'"),
        (f"{READERS}:THRESHOLD", "is a float, not a reader: it must be callable"),
        (f"{READERS}:Redness", "is a class; name an instance of it"),
        ("score_cli_broken:reader", "importing 'score_cli_broken' failed: RuntimeError: no GPU here"),
    ],
)  # fmt: skip
def test_bad_readers_exit_2_with_one_line(reader, message, readers, capsys):
    """Refused before the model loads: the --model folder does not even exist."""
    argv = ["score", "--model", str(readers / "nowhere"), "--concept", "blob", "--reader", reader, "--pairs",
            "pairs.json", "--out", str(readers / "out")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("acterase score: error: ") and message in err and err.count("\n") == 1, err
    assert not (readers / "out").exists()


def test_readers_import_from_the_current_folder_by_dotted_path(readers):
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    inner = _import_reader("score_cli_pkg.inner:red")
    assert inner(images).tolist() == (inner.logit(images) > 0).tolist() and callable(inner.logit)
    bright = _import_reader(f"{READERS}:bright")
    assert bright(images).dtype == torch.bool and not hasattr(bright, "logit")
    assert _import_reader(f"{READERS}:Redness.logit").__name__ == "logit"  # a dotted attribute


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--concept", "triangle", "--reader", f"{READERS}:bright"],
         "no planted 'triangle'; its planted concepts are ['moon', 'heart', 'cyan', 'blob']"),
        (["--concept", "blob", "--reader", f"{READERS}:bright", "--pairs", "missing.json"], "no prompt pairs file at"),
        (["--concept", "blob", "--reader", f"{READERS}:bright"], "'blob' is not a ConceptWorld value"),
        (["--concept", "blob", "--reader", f"{READERS}:bright", "--pairs", "pairs.json", "--localizers",
          "attribution_patching"], "attribution_patching needs a reader with a differentiable"),
        (["--concept", "blob", "--reader", f"{READERS}:red", "--pairs", "pairs.json", "--localizers", "psychic"],
         "unknown localizer(s) ['psychic']"),
        (["--concept", "ring", "--reader", f"{READERS}:red", "--pairs", "pairs.json"],
         "pairs.json holds pairs of 'blob', not of --concept 'ring'"),
        (["--concept", "heart", "--reader", f"{READERS}:red", "--n-pairs", "0"], "--n-pairs must be at least 1"),
        (["--concept", "blob", "--reader", f"{READERS}:red", "--pairs", "pairs.json", "--n-pairs", "3"],
         "--n-pairs 3, but pairs.json holds only 2 pairs"),
        (["--concept", "blob", "--reader", f"{READERS}:red", "--pairs", "pairs.json", "--grid", "1", "4"],
         "--grid must increase from 0 with at least two points"),
    ],
)  # fmt: skip
def test_bad_concepts_pairs_and_localizers_exit_2_with_one_line(extra, message, planted_dir, readers, capsys):
    pairs = json.loads((readers / "pairs.json").read_text())
    (readers / "pairs.json").write_text(json.dumps({"concept": "blob", **pairs}))  # a file may name its concept
    argv = ["score", "--model", str(planted_dir), *extra, "--out", str(readers / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err  # beside the error, only the pipeline's loading bar where the model loaded
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("acterase score: error: ") and message in errors[0], err
    assert not (readers / "out").exists()


def test_score_lists_and_parses_its_shared_options_as_every_verb_does(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    flags = ["--model", "--concept", "--n-pairs", "--seeds", "--steps", "--out", "--device", "--no-verify"]
    assert [f for f in [*flags, "--reader", "--pairs", "--localizers"] if f not in shown] == []
    verb = next(a for a in _parser()._actions if a.dest == "command").choices["score"]
    actions = {f: a for a in verb._actions for f in a.option_strings}
    for flag in flags:
        spec = SHARED[flag]
        arity = spec.get("nargs", 0 if spec.get("action") == "store_true" else None)
        assert (actions[flag].type, actions[flag].nargs) == (spec.get("type"), arity), flag
