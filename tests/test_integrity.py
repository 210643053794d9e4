"""Tamper-evident artifacts: erasers, fit statistics, planted-model manifests and evaluation cells
record the sha256 of what they hold and refuse to load when one byte changed; `verify=False`
(`--no-verify`) loads them anyway; artifacts from before hashes load with a one-line notice."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from acterase_interp.cli import main
from acterase_interp.erase.eraser import MASKS, MANIFEST, VALUES, Eraser
from acterase_interp.erase.statistics import TENSORS, FitStatistics
from acterase_interp.evaluation.table import read_cell, write_cell
from acterase_interp.integrity import ArtifactError, UnverifiedArtifactWarning, sha256_json
from acterase_interp.io import atomic_save_safetensors
from acterase_interp.loading import PLANTED_FILE, conceptworld_dir, load, read_planted, write_planted
from acterase_interp.world.architecture import save_world

FIXTURES = Path(__file__).parent / "fixtures" / "v1"
SITE = "down.0.0.ffn_hidden"
MASK = torch.tensor([[[True, False, True, False]]])
VALUE = torch.arange(8, dtype=torch.float32).reshape(1, 2, 4) / 8


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def _copy_fixture(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name))


@pytest.fixture
def saved(tmp_path) -> Path:
    """The v1 fixture eraser (with its statistics) saved again by this version: hashes recorded."""
    with pytest.warns(UnverifiedArtifactWarning):
        eraser = Eraser.load(FIXTURES / "eraser")
        statistics = FitStatistics.load(FIXTURES / "statistics")
    eraser.save(tmp_path / "er", statistics=statistics)
    return tmp_path / "er"


def test_a_saved_eraser_records_the_sha256_of_its_files_and_loads_silently(saved):
    manifest = json.loads((saved / MANIFEST).read_text())
    assert manifest["sha256"] == {MASKS: _sha(saved / MASKS), VALUES: _sha(saved / VALUES)}
    stats = json.loads((saved / "statistics" / "statistics.json").read_text())
    assert stats["sha256"] == {TENSORS: _sha(saved / "statistics" / TENSORS)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no notice, nothing else
        eraser, statistics = Eraser.load(saved), FitStatistics.load(saved)
    assert "sha256" not in eraser.manifest  # the hashes describe the files, not the eraser
    assert torch.equal(eraser.masks[SITE], MASK) and torch.equal(eraser.values[SITE], VALUE)
    assert statistics.num_pairs == 2


@pytest.mark.parametrize("name", [MASKS, VALUES])
def test_a_flipped_byte_in_an_eraser_is_refused_naming_the_file_and_both_hashes(saved, name):
    recorded = _sha(saved / name)
    _flip_last_byte(saved / name)
    with pytest.raises(ArtifactError) as err:
        Eraser.load(saved)
    message = str(err.value)
    assert str(saved / name) in message and recorded in message and _sha(saved / name) in message
    assert "verify=False" in message and "--no-verify" in message
    edited = Eraser.load(saved, verify=False)  # the rare user who edits a mask on purpose
    if name == MASKS:  # the last byte is the last mask entry: False became True
        assert edited.masks[SITE].flatten().tolist() == [True, False, True, True]
    else:
        assert not torch.equal(edited.values[SITE], VALUE)


def test_flipped_statistics_are_refused(saved):
    _flip_last_byte(saved / "statistics" / TENSORS)
    with pytest.raises(ArtifactError, match=r"statistics\.safetensors has sha256 [0-9a-f]{64}, but .* recorded"):
        FitStatistics.load(saved)
    assert FitStatistics.load(saved, verify=False).num_pairs == 2
    Eraser.load(saved)  # the eraser's own files are untouched


def test_a_manifest_that_lost_a_hash_or_a_file_is_refused(saved):
    manifest = json.loads((saved / MANIFEST).read_text())
    del manifest["sha256"][VALUES]
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="records no sha256 for values.safetensors"):
        Eraser.load(saved)
    (saved / MASKS).unlink()
    with pytest.raises(ArtifactError, match="masks.safetensors is missing"):
        Eraser.load(saved, verify=False)


def test_previous_release_artifacts_load_with_one_notice_and_their_values(tmp_path):
    with pytest.warns(UnverifiedArtifactWarning) as notices:
        eraser = Eraser.load(FIXTURES / "eraser")
        statistics = FitStatistics.load(FIXTURES / "statistics")
        cell = read_cell(FIXTURES / "cells" / "red-seed0.json", "00112233445566aa")
    assert len(notices) == 3 and all("records no sha256" in str(n.message) for n in notices)
    assert all("\n" not in str(n.message) for n in notices)
    assert torch.equal(eraser.masks[SITE], MASK) and torch.equal(eraser.values[SITE], VALUE)
    importance = torch.arange(16, dtype=torch.float32).reshape(2, 2, 4) / 16
    assert torch.equal(statistics.importance_source[SITE], importance)
    assert statistics.pairs.concept == "heart" and statistics.timesteps == (999.0, 499.0)
    assert cell[0][0]["target_rate"] == {"value": 0.75} and cell[1]["seconds"] == 1.5
    eraser.save(tmp_path / "again")  # saving again records the hashes: no notice after that
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(Eraser.load(tmp_path / "again").masks[SITE], MASK)


def test_evaluation_cells_record_a_hash_per_row(tmp_path):
    rows = [{"concept": "red", "method": m, "seed": 0, "target_rate": {"value": v}} for m, v in [("a", 0.5), ("b", 0.2)]]
    record = {"concept": "red", "seed": 0, "seconds": 2.0}
    path = tmp_path / "red-seed0.json"
    write_cell(path, "k1", rows, record)
    cell = json.loads(path.read_text())
    assert cell["sha256"] == {"rows": [sha256_json(r) for r in rows], "record": sha256_json(record)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_cell(path, "k1") == (rows, record)
    assert read_cell(path, "another key") is None  # stale: measured again
    cell["rows"][1]["target_rate"]["value"] = 0.0  # a silently better method
    path.write_text(json.dumps(cell, indent=2))
    with pytest.raises(ArtifactError) as err:
        read_cell(path, "k1")
    assert f"row 1 of {path}" in str(err.value) and sha256_json(rows[1]) in str(err.value)
    assert sha256_json(cell["rows"][1]) in str(err.value) and "delete it" in str(err.value)
    assert read_cell(path, "k1", verify=False)[0][1]["target_rate"] == {"value": 0.0}
    path.write_text(path.read_text()[:-40])  # cut short
    with pytest.raises(ArtifactError, match=r"is not valid JSON \(evaluation cell\)"):
        read_cell(path, "k1")


def _pipeline_folder(root: Path) -> Path:
    folder = root / "pipe"
    atomic_save_safetensors({"w": torch.arange(6.0)}, folder / "unet" / "diffusion_pytorch_model.safetensors")
    atomic_save_safetensors({"w": torch.ones(3)}, folder / "vae" / "diffusion_pytorch_model.safetensors")
    return folder


def test_planted_json_vouches_for_the_weights(tmp_path):
    folder = _pipeline_folder(tmp_path)
    records = [{"concept": "heart", "blocks": ["up.0.0"]}]
    write_planted(folder, records)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    recorded = json.loads((folder / PLANTED_FILE).read_text())["sha256"]
    assert recorded == {"unet/diffusion_pytorch_model.safetensors": _sha(unet), "vae/diffusion_pytorch_model.safetensors":
                        _sha(folder / "vae" / "diffusion_pytorch_model.safetensors")}  # fmt: skip
    assert read_planted(folder) == records
    recorded = _sha(unet)
    _flip_last_byte(unet)
    with pytest.raises(ArtifactError) as err:
        read_planted(folder)
    assert str(unet) in str(err.value) and recorded in str(err.value) and _sha(unet) in str(err.value)
    assert read_planted(folder, verify=False) == records
    atomic_save_safetensors({"w": torch.zeros(1)}, folder / "extra" / "added.safetensors")
    with pytest.raises(ArtifactError, match="records no sha256 for extra/added.safetensors"):
        read_planted(folder)


def test_previous_planted_json_loads_with_a_notice_and_the_shipped_one_verifies(tmp_path):
    folder = _pipeline_folder(tmp_path)
    shutil.copy(FIXTURES / PLANTED_FILE, folder / PLANTED_FILE)
    with pytest.warns(UnverifiedArtifactWarning, match="records no sha256"):
        assert read_planted(folder)[0]["concept"] == "heart"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shipped = read_planted(conceptworld_dir() / "pipeline")
    assert [r["concept"] for r in shipped] == ["moon", "heart", "cyan"]
    assert read_planted(tmp_path) is None  # no planted.json: nothing planted, nothing to check


def test_a_saved_planted_world_loads_checked_and_refuses_changed_weights(conceptworld, tmp_path):
    folder = tmp_path / "world"
    save_world(conceptworld.pipeline, folder, conceptworld.planted)  # the writer `acterase plant` uses
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedArtifactWarning)
        assert load(folder).planted == conceptworld.planted
    _flip_last_byte(folder / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ArtifactError, match=r"vae/diffusion_pytorch_model\.safetensors has sha256"):
        load(folder)
    assert load(folder, verify=False).planted == conceptworld.planted


def _one_site_eraser(model, sites) -> Eraser:
    """A hand-made eraser on the first ffn_hidden site of ConceptWorld (no fit)."""
    site = next(s for s in sites if s.kind == "ffn_hidden")
    tokens, units = site.shape
    masks = {site.name: torch.arange(units) % 3 == 0}
    return Eraser.from_tensors(model, masks, {site.name: torch.zeros(tokens, units)})


def test_generate_refuses_a_flipped_eraser_and_no_verify_loads_it(conceptworld, conceptworld_sites, tmp_path, capsys):
    folder = tmp_path / "er"
    _one_site_eraser(conceptworld, conceptworld_sites).save(folder)
    recorded = _sha(folder / MASKS)
    _flip_last_byte(folder / MASKS)
    png = tmp_path / "grid.png"
    argv = ["generate", "--prompt", "a red heart", "--steps", "1", "--eraser", str(folder), "--out", str(png)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(folder / MASKS) in err and recorded in err and _sha(folder / MASKS) in err
    assert not png.exists()
    assert main([*argv, "--no-verify"]) == 0
    with Image.open(png) as img:
        assert img.format == "PNG"


def test_the_cli_prints_an_old_artifact_notice_as_one_line(tmp_path, capsys):
    folder = _copy_fixture("eraser", tmp_path)  # fitted on another architecture hash: refused after the notice
    assert main(["generate", "--prompt", "a red heart", "--eraser", str(folder), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and "Loading pipeline components" not in ln]  # no progress bar
    assert len(lines) == 2 and "Traceback" not in err, lines
    assert lines[0].startswith("acterase generate: notice: ") and "records no sha256" in lines[0]
    assert lines[1].startswith("acterase generate: error: ") and "architecture hash" in lines[1]
