"""The `acterase` command line and the ConceptWorld demo, at tiny sizes (few pairs, steps, images)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from acterase_interp.cli import main
from acterase_interp.demo import run_demo
from acterase_interp.erase.eraser import Eraser
from acterase_interp.erase.gated import GatedEraser
from acterase_interp.erase.statistics import FitStatistics
from acterase_interp.world.captions import WORDS
from acterase_interp.world.pairs import conceptworld_pairs

STEPS = "3"
RESULT_KEYS = {
    "concept", "factor", "target_rate", "paraphrase_rate", "non_target_accuracy", "non_target_distance", "timing",
    "mask_density", "options", "all_units", "generation", "pairs", "seeds", "prompts", "predictions", "model",
    "versions", "bars", "passed", "files", "planted", "tau_choice", "beside", "eraser",
}  # fmt: skip


@pytest.fixture(scope="module")
def eraser_dir(tmp_path_factory) -> Path:
    """An eraser fitted by `acterase fit` on two ConceptWorld pairs."""
    tmp = tmp_path_factory.mktemp("cli")
    conceptworld_pairs("triangle", n=4).save(tmp / "pairs.json")
    out = tmp / "eraser"
    argv = ["fit", "--model", "conceptworld", "--pairs", str(tmp / "pairs.json"), "--max-pairs", "2",
            "--steps", STEPS, "--tau", "0.05", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    return out


def test_fit_writes_a_loadable_eraser(eraser_dir, conceptworld):
    eraser = Eraser.load(eraser_dir, model=conceptworld)
    density = eraser.mask_density()
    assert density and all(0 <= d <= 1 for d in density.values()) and any(d > 0 for d in density.values())
    assert all(name.endswith("ffn_hidden") for name in density)


def test_generate_writes_a_before_after_grid(eraser_dir, tmp_path):
    png = tmp_path / "grid.png"
    argv = ["generate", "--model", "conceptworld", "--prompt", "a red triangle on a plain background",
            "--prompt", "a blue circle", "--seeds", "0", "1", "--steps", STEPS, "--eraser", str(eraser_dir),
            "--compare", "--out", str(png)]  # fmt: skip
    assert main(argv) == 0
    with Image.open(png) as img:
        assert img.format == "PNG"
        assert img.height > img.width  # 4 rows (2 prompts, before and after) of 2 seeds


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["fit", "--pairs", "no_such_concept", "--out", "x"], "no prompt pairs named 'no_such_concept'"),
        (["fit", "--pairs", "conceptworld_red", "--tau", "5", "--out", "x"], "tau=5.0 is outside"),
        (["generate", "--prompt", "a red star", "--eraser", "does/not/exist", "--out", "x.png"], "does/not/exist"),
        (["generate", "--prompt", "a red star", "--compare", "--out", "x.png"], "--compare needs --eraser"),
        (["generate", "--model", "./missing-model", "--prompt", "a red star", "--out", "x.png"], "missing-model"),
        (["demo", "--concept", "hexagon"], "unknown ConceptWorld concept 'hexagon'"),
        (["demo", "--beside", "hexagon"], "unknown ConceptWorld concept 'hexagon'"),
        (["fit", "--pairs", "conceptworld_red", "--tau", "auto", "--out", "x"],
         "--tau auto needs a concept classifier"),
        (["plant", "--model", "conceptworld", "--out", "x"], "give either --concept or --shipped"),
        (["plant", "--model", "conceptworld", "--concept", "triangle", "--out", "x"], "'triangle' is not plantable"),
        (["plant", "--model", "conceptworld", "--concept", "heart", "--family", "ffn_units", "--out", "x"],
         "units is required"),
        (["demo", "--model", "./missing-model"], "missing-model"),
        (["demo", "--eraser", "gated_kv", "--tau", "0.1"], "the gated eraser takes no tau"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_unknown_site_kind_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--pairs", "conceptworld_red", "--site-kind", "attn3_out", "--out", "x"])
    assert exit_info.value.code == 2
    assert "attn3_out" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("concept", ["triangle", "red", "dots"])
def test_demo_writes_results_and_report(concept, conceptworld, tmp_path):
    results = run_demo(concept, tmp_path, n_pairs=2, n_images=3, num_inference_steps=3, model=conceptworld,
                       tau=0.05, beside=None, progress=False)  # fmt: skip
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert set(on_disk) == RESULT_KEYS
    assert on_disk == json.loads(json.dumps(results))
    assert (tmp_path / "report.html").read_text().count("<h2>") >= 8
    assert all(Path(p).exists() for p in results["files"]["grids"])
    assert Eraser.load(tmp_path / "eraser", model=conceptworld).mask_density() == pytest.approx(results["mask_density"])
    assert FitStatistics.load(tmp_path / "eraser").eraser(tau=0.05).mask_density() == pytest.approx(results["mask_density"])
    assert results["factor"] == {"triangle": "shape", "red": "color", "dots": "background"}[concept]
    for group in ("target", "paraphrase", "non_target"):
        assert len(results["prompts"][group]) == len(results["seeds"][group]) == 3
        assert len(results["predictions"][group]["after"][results["factor"]]) == 3
    fitting = set(results["pairs"]["targets"]) | set(results["pairs"]["sources"])
    assert not fitting & set(results["prompts"]["target"] + results["prompts"]["non_target"])
    assert not any(f" {WORDS[concept][0]} " in f" {p.replace(',', ' ')} " for p in results["prompts"]["non_target"])
    assert results["target_rate"]["before"]["n"] == 3
    assert {b["name"] for b in results["bars"]} >= {"target rate after", "paraphrase rate after"}
    assert len(results["bars"]) == 6
    assert results["passed"] == all(b["passed"] for b in results["bars"])


def test_demo_with_the_gated_eraser(conceptworld, tmp_path):
    results = run_demo("red", tmp_path, n_pairs=2, n_images=2, num_inference_steps=2, model=conceptworld,
                       eraser="gated_kv", progress=False)  # fmt: skip
    assert set(results) == RESULT_KEYS and results["beside"] is None and results["mask_density"] is None
    assert results["eraser"]["name"] == "gated_kv" and results["eraser"]["chosen_scope"] in ("token", "prompt")
    loaded = GatedEraser.load(tmp_path / "eraser", model=conceptworld)
    assert loaded.manifest["scope"] == results["eraser"]["chosen_scope"] and loaded.manifest["concept"] == "red"
    assert "gated subspace eraser" in (tmp_path / "report.html").read_text()
    assert len(results["bars"]) == 6 and results["passed"] == all(b["passed"] for b in results["bars"])


@pytest.mark.slow
def test_demo_command(tmp_path, capsys):
    argv = ["demo", "--concept", "star", "--n-pairs", "2", "--n-images", "2", "--steps", STEPS, "--out", str(tmp_path),
            "--site-kind", "attn2_out", "--tau", "0.5", "--anchor", "circle", "--all-units", "--strict",
            "--beside", "none"]  # fmt: skip
    status = main(argv)
    out = capsys.readouterr().out
    assert "target rate" in out and ("PASS" in out or "FAIL" in out)
    results = json.loads((tmp_path / "results.json").read_text())
    assert status == (0 if results["passed"] else 1)  # --strict: a failed bar is exit status 1
    assert set(results) == RESULT_KEYS
    assert results["all_units"] and set(results["mask_density"].values()) == {1.0}
    assert (results["options"]["site_kind"], results["options"]["tau"]) == ("attn2_out", 0.5)
    assert results["pairs"]["anchor"] == "circle"
    assert all(" circle " in f" {p.replace(',', ' ')} " for p in results["pairs"]["sources"])


@pytest.mark.slow
def test_default_demo_chooses_tau_on_fit_pairs_and_reports_a_natural_concept(conceptworld, tmp_path):
    """The defaults: the planted heart, tau chosen on the fit targets, the natural triangle beside it."""
    results = run_demo(out_dir=tmp_path, n_pairs=2, n_images=2, num_inference_steps=2, model=conceptworld,
                       progress=False)  # fmt: skip
    assert results["concept"] == "heart" and results["planted"]["spec"]["family"] == "ffn_units"
    choice = results["tau_choice"]
    assert choice["trace"] and [t["tau"] for t in choice["trace"]] == sorted(t["tau"] for t in choice["trace"])
    chosen = choice["tau"]
    assert chosen is None or (choice["trace"][-1]["tau"] == chosen == results["options"]["tau"]
                              and choice["trace"][-1]["fit_target_rate"] <= 0.05)  # fmt: skip
    assert all(t["fit_target_rate"] > 0.05 for t in choice["trace"][:-1])  # stopped at the first success
    evaluation = {s for g in ("target", "paraphrase", "non_target") for s in results["seeds"][g]}
    assert min(evaluation) >= 1000  # the choice used seeds 500.., never these
    beside = results["beside"]
    names = list(beside["variants"])
    assert beside["concept"] == "triangle" and names[0].startswith("same recipe, tau ")
    assert names[1:] == ["every FFN hidden unit replaced", "every cross-attention output replaced"]
    assert "Beside: the natural shape" in (tmp_path / "report.html").read_text()


def test_plant_command_plants_and_saves(conceptworld, tmp_path):
    out = tmp_path / "planted"
    argv = ["plant", "--model", "conceptworld", "--concept", "heart", "--family", "attn2_kv", "--blocks", "mid.0",
            "--steps", "1", "--batch", "2", "--n-images", "12", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    from acterase_interp.loading import load

    planted = load(out)
    records = planted.planted
    assert [r["concept"] for r in records] == [r["concept"] for r in conceptworld.planted] + ["heart"]
    assert records[-1]["blocks"] == ["mid.0"] and records[-1]["frozen_identical"]
    assert (out / "text_encoder.json").exists() and not (out / "text_encoder").exists()


@pytest.mark.parametrize("family, extra, recorded", [("lowrank", ["--rank", "2"], {"rank": 2}),
                                                     ("split", ["--units", "4", "--kv-blocks", "up.1.1"],
                                                      {"units": 4, "kv_blocks": ["up.1.1"]})])  # fmt: skip
def test_plant_takes_every_family_s_options(conceptworld, tmp_path, capsys, family, extra, recorded):
    out = tmp_path / family
    argv = ["plant", "--model", "conceptworld", "--concept", "diamond", "--family", family, "--blocks", "up.0.1",
            "--steps", "1", "--batch", "2", "--n-images", "12", "--out", str(out), *extra]  # fmt: skip
    assert main(argv) == 0
    from acterase_interp.loading import load

    spec = load(out).planted[-1]["spec"]
    assert spec["family"] == family and {k: spec[k] for k in recorded} == recorded
    bad = ["plant", "--model", "conceptworld", "--concept", "diamond", "--family", "lowrank", "--out", str(tmp_path / "x")]
    assert main(bad) == 2 and "rank is required for family 'lowrank'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything is written


VERB_OPTIONS = {
    "fit": ["--model", "--device", "--steps", "--guidance", "--no-verify", "--n-pairs", "--seed", "--tau", "--blocks",
            "--out"],
    "generate": ["--model", "--device", "--steps", "--guidance", "--no-verify", "--seeds", "--out"],
    "demo": ["--model", "--steps", "--n-pairs", "--n-images", "--seed", "--tau", "--blocks", "--concept", "--out"],
    "evaluate": ["--model", "--steps", "--n-pairs", "--n-images", "--seeds", "--tau", "--no-verify", "--out"],
    "plant": ["--model", "--n-images", "--seed", "--blocks", "--concept", "--no-verify", "--out"],
}  # fmt: skip
"""The shared options each verb takes (plant's --steps counts training steps: an option of its own)."""


@pytest.mark.parametrize("verb", list(VERB_OPTIONS))
def test_each_verb_lists_its_shared_options_in_its_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    assert [flag for flag in VERB_OPTIONS[verb] if flag not in shown] == []


def test_shared_options_parse_alike_in_every_verb():
    """One definition: a shared option has the same type, arity and action wherever it appears."""
    from acterase_interp.cli import SHARED, _parser

    verbs = next(a for a in _parser()._actions if a.dest == "command").choices
    for verb, flags in VERB_OPTIONS.items():
        actions = {f: a for a in verbs[verb]._actions for f in a.option_strings}
        for flag in flags:
            action, spec = actions[flag], SHARED[flag]
            arity = spec.get("nargs", 0 if spec.get("action") == "store_true" else None)
            assert (action.type, action.nargs) == (spec.get("type"), arity), (verb, flag)


def test_fit_takes_n_pairs_and_keeps_max_pairs_as_its_other_name(tmp_path):
    conceptworld_pairs("triangle", n=4).save(tmp_path / "pairs.json")
    base = ["fit", "--pairs", str(tmp_path / "pairs.json"), "--steps", "2", "--tau", "0.05"]
    for flag, n in (("--n-pairs", "1"), ("--max-pairs", "3")):
        out = tmp_path / flag.strip("-")
        assert main([*base, flag, n, "--out", str(out)]) == 0
        assert len(Eraser.load(out).manifest["pairs"]["targets"]) == int(n)


def test_fit_n_pairs_below_one_is_a_usage_error(capsys):
    assert main(["fit", "--pairs", "conceptworld_red", "--n-pairs", "0", "--out", "x"]) == 2
    assert "--n-pairs must be at least 1" in capsys.readouterr().err
