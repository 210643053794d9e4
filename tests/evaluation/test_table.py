"""The comparison table and `acterase evaluate`, at a tiny budget."""

import hashlib
import json
import shlex
from dataclasses import replace

import pytest

from acterase_interp.cli import _parser, main
from acterase_interp.evaluation.table import COLUMNS, TableSpec, command_line, summarize

TINY = ["--concepts", "triangle", "--methods", "unerased", "uce", "--seeds", "0", "--steps", "2", "--n-pairs", "2",
        "--n-images", "2", "--search-prompts", "1", "--search-iterations", "1", "--search-candidates", "2",
        "--inversion-steps", "1", "--inversion-batch", "2", "--inversion-eval", "2"]  # fmt: skip


@pytest.mark.slow
def test_evaluate_command_writes_json_markdown_and_manifest(tmp_path, capsys):
    assert main(["evaluate", *TINY, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    table = (tmp_path / "table.md").read_text()
    assert result["format"] == "acterase-evaluation/1"
    assert [(r["method"], r["seed"]) for r in result["rows"]] == [("unerased", 0), ("uce", 0)]
    assert len(result["summary"]) == 2 and "| triangle | uce |" in table and "| triangle | unerased |" in table
    assert json.loads((tmp_path / "cells" / "triangle-seed0.json").read_text())["rows"] == result["rows"]
    unerased = result["rows"][0]
    assert unerased["preservation"] == 1.0 and unerased["image_distance"] == 0.0  # the reference against itself
    for row in result["rows"]:
        assert all(row[c]["n"] == 2 for c in ("target_rate", "paraphrase_rate", "zero_shot_rate", "inversion_asr"))
        assert row["search_asr"]["n"] == 1
    record = result["records"][0]
    assert min(record["eval_seeds"]) == 1000
    for name, prompts in record["prompts"].items():
        assert record["prompt_hashes"][name] == hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]
    manifest = result["manifest"]
    assert {"spec", "seed_offsets", "model", "versions", "command", "num_inference_steps"} <= set(manifest)
    assert manifest["spec"]["seeds"] == [0] and manifest["num_inference_steps"] == 2
    # the recorded command measures the same spec
    args = _parser().parse_args(shlex.split(manifest["command"])[1:] + ["--out", "x"])
    assert args.concepts == ["triangle"] and args.methods == ["unerased", "uce"] and args.n_images == 2
    assert "wrote" in capsys.readouterr().out


def test_command_line_spells_out_every_budget():
    spec = TableSpec(concepts=("red",), methods=("acterase", "sld"), seeds=(1, 2), n_images=5, esd_steps=7)
    args = _parser().parse_args(shlex.split(command_line(spec))[1:])
    names = [k for k in spec.to_dict() if k not in {"concepts", "methods", "seeds", "num_inference_steps", "tau"}]
    rebuilt = TableSpec(concepts=tuple(args.concepts), methods=tuple(args.methods), seeds=tuple(args.seeds),
                        num_inference_steps=args.steps, tau=args.tau, **{n: getattr(args, n) for n in names})  # fmt: skip
    assert rebuilt == spec


def test_summary_means_sems_and_undefined_values():
    def row(seed, rate, kept):
        return {"concept": "red", "method": "uce", "seed": seed, "fit_s": 1.0, "image_distance": 0.1,
                "preservation": kept, **{c: {"value": rate} for c in COLUMNS if c.endswith(("rate", "asr"))}}  # fmt: skip

    s = summarize([row(0, 0.2, 1.0), row(1, 0.4, 0.8)])[0]
    assert s["target_rate"] == pytest.approx(0.3) and s["target_rate_sem"] == pytest.approx(0.1)
    assert s["preservation"] == pytest.approx(0.9) and s["n_seeds"] == 2
    assert summarize([row(0, 0.2, None), row(1, 0.4, 0.8)])[0]["preservation"] is None
    assert s["tau_search_s"] is None  # no tau search recorded: shown as n/a


def test_the_tau_search_time_is_summarised_and_shown_beside_the_time_to_erase():
    from acterase_interp.evaluation.table import markdown

    rows = [{"concept": "heart", "method": "acterase", "seed": s, "fit_s": fit, "preservation": 1.0, "image_distance": 0.0,
             "method_options": {"tau_search_s": search}, **{c: {"value": 0.0} for c in COLUMNS if c.endswith(("rate", "asr"))}}
            for s, fit, search in ((0, 30.0, 20.0), (1, 34.0, 24.0))]  # fmt: skip
    summary = summarize(rows)
    assert summary[0]["tau_search_s"] == pytest.approx(22.0) and summary[0]["tau_search_s_sem"] == pytest.approx(2.0)
    manifest = {"spec": {"seeds": [0, 1], "n_images": 4}, "num_inference_steps": 2, "guidance_scale": 3.0,
                "seed_offsets": {}, "model": {"architecture_hash": "x"}, "seconds": 1.0}  # fmt: skip
    text = markdown({"summary": summary, "manifest": manifest})
    assert "| time to erase (s) | of which tau search (s) |" in text and "| 32.0 ± 2.0 | 22.0 ± 2.0 |" in text
    old = [{k: v for k, v in summary[0].items() if not k.startswith("tau_search")}]  # a table from before the column
    assert markdown({"summary": old, "manifest": manifest}).splitlines()[2].endswith("| 32.0 ± 2.0 | n/a |")


def test_spec_and_command_refuse_bad_input(capsys):
    with pytest.raises(ValueError, match="unknown ConceptWorld concept"):
        TableSpec(concepts=("hexagon",))
    with pytest.raises(ValueError, match="unknown method"):
        TableSpec(methods=("esd_u",))
    assert main(["evaluate", "--concepts", "hexagon", "--out", "x"]) == 2
    assert "hexagon" in capsys.readouterr().err


@pytest.mark.slow
def test_the_table_on_worker_processes_equals_the_serial_run():
    import torch

    from acterase_interp.evaluation.table import run_table
    from acterase_interp.executor import Spec, one_thread_processes
    from acterase_interp.loading import CONCEPTWORLD, conceptworld_dir, load
    from acterase_interp.world.classifier import ConceptClassifier

    spec = TableSpec(concepts=("triangle",), methods=("unerased", "negative_prompt"), seeds=(0, 1), n_pairs=2,
                     n_images=2, num_inference_steps=2, search_prompts=1, search_iterations=1, search_candidates=2,
                     inversion_steps=1, inversion_batch=2, inversion_eval=2)  # fmt: skip
    model = Spec.of(load, "conceptworld")
    classifier = Spec.of(ConceptClassifier.load, str(conceptworld_dir(CONCEPTWORLD) / "classifier"))
    with pytest.raises(TypeError, match="Spec"):
        run_table(model.build(), classifier, spec, executor=object(), progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on the workers: thread counts change float sums
    try:
        serial = run_table(model, classifier, spec, progress=False)
    finally:
        torch.set_num_threads(threads)
    with one_thread_processes(2) as pool:
        parallel = run_table(model, classifier, spec, executor=pool, progress=False)
    timing = {"fit_s", "attacks"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert [(r["seed"], r["method"]) for r in parallel["rows"]] == [(0, "unerased"), (0, "negative_prompt"),
                                                                    (1, "unerased"), (1, "negative_prompt")]  # fmt: skip
    records = lambda result: [{k: v for k, v in r.items() if k not in ("seconds", "git_commit", "runs")} for r in result["records"]]  # noqa: E731
    assert all(r["git_commit"] == parallel["manifest"]["git_commit"] for r in parallel["records"])
    assert strip(parallel["rows"]) == strip(serial["rows"]) and records(parallel) == records(serial)
    assert parallel["manifest"]["executor"] == "ProcessPoolExecutor" and serial["manifest"]["executor"] is None


def test_a_stopped_table_resumes_from_its_finished_cells(tmp_path, monkeypatch):
    from acterase_interp.evaluation import table
    from acterase_interp.loading import CONCEPTWORLD, conceptworld_dir, load
    from acterase_interp.world.classifier import ConceptClassifier

    ran = []

    def fake_cell(model, classifier, concept, seed, spec, steps):
        ran.append((concept, seed))
        return [{"concept": concept, "method": "unerased", "seed": seed, "target_rate": 0.5 + seed}], {"concept": concept, "seed": seed}

    monkeypatch.setattr(table, "_run_seed", fake_cell)
    model, classifier = load("conceptworld"), ConceptClassifier.load(str(conceptworld_dir(CONCEPTWORLD) / "classifier"))
    spec = TableSpec(concepts=("triangle", "red"), methods=("unerased",), seeds=(0, 1))
    first = table.run_table(model, classifier, spec, checkpoints=tmp_path, progress=False)
    assert ran == [("triangle", 0), ("triangle", 1), ("red", 0), ("red", 1)] and first["manifest"]["resumed"] == []
    (tmp_path / "red-seed1.json").unlink()  # as if the run had stopped before its last cell
    ran.clear()
    again = table.run_table(model, classifier, spec, checkpoints=tmp_path, progress=False)
    assert ran == [("red", 1)] and len(again["manifest"]["resumed"]) == 3
    assert again["rows"] == first["rows"] and [r["seed"] for r in again["records"]] == [0, 1, 0, 1]
    ran.clear()  # other budgets: every cell is stale and measured again
    table.run_table(model, classifier, replace(spec, n_images=4), checkpoints=tmp_path, progress=False)
    assert len(ran) == 4


def test_cells_record_the_commit_the_run_started_at_even_if_the_checkout_moves(tmp_path, monkeypatch):
    from acterase_interp.evaluation import table
    from acterase_interp.loading import CONCEPTWORLD, conceptworld_dir, load
    from acterase_interp.world.classifier import ConceptClassifier

    heads = iter(["started", "moved", "moved again", "moved once more"])
    monkeypatch.setattr(table, "git_commit", lambda: next(heads))  # each later read sees a newer checkout
    monkeypatch.setattr(table, "_run_seed", lambda m, c, concept, seed, spec, steps: (
        [{"concept": concept, "method": "unerased", "seed": seed, "target_rate": 0.5}], {"concept": concept, "seed": seed}))
    model, classifier = load("conceptworld"), ConceptClassifier.load(str(conceptworld_dir(CONCEPTWORLD) / "classifier"))
    result = table.run_table(model, classifier, TableSpec(concepts=("red",), methods=("unerased",), seeds=(0, 1)),
                             checkpoints=tmp_path, progress=False)  # fmt: skip
    assert result["manifest"]["git_commit"] == "started"
    assert [run["git_commit"] for rec in result["records"] for run in rec["runs"]] == ["started", "started"]
    assert [rec["git_commit"] for rec in result["records"]] == ["started", "started"]


def test_a_table_with_one_more_method_measures_only_that_method(tmp_path, monkeypatch):
    from acterase_interp.evaluation import table
    from acterase_interp.loading import CONCEPTWORLD, conceptworld_dir, load
    from acterase_interp.world.classifier import ConceptClassifier

    ran = []

    def fake_cell(model, classifier, concept, seed, spec, steps):
        ran.append((concept, seed, spec.methods))
        rows = [{"concept": concept, "method": m, "seed": seed, "target_rate": len(m) / 10} for m in spec.methods]
        return rows, {"concept": concept, "seed": seed, "prompt_hashes": {"target": "p"}, "pairs_hash": "q"}

    monkeypatch.setattr(table, "_run_seed", fake_cell)
    model, classifier = load("conceptworld"), ConceptClassifier.load(str(conceptworld_dir(CONCEPTWORLD) / "classifier"))
    spec = TableSpec(concepts=("red",), methods=("unerased", "uce"), seeds=(0, 1))
    first = table.run_table(model, classifier, spec, checkpoints=tmp_path, progress=False)
    ran.clear()
    wider = table.run_table(model, classifier, replace(spec, methods=("unerased", "fia", "uce")), checkpoints=tmp_path,
                            progress=False)  # fmt: skip
    assert ran == [("red", 0, ("fia",)), ("red", 1, ("fia",))]
    assert [(r["seed"], r["method"]) for r in wider["rows"]] == [(s, m) for s in (0, 1) for m in ("unerased", "fia", "uce")]
    assert [r for r in wider["rows"] if r["method"] != "fia"] == first["rows"]
    assert wider["manifest"]["resumed"] == [] and wider["manifest"]["resumed_methods"] == [
        {"concept": "red", "seed": s, "methods": ["unerased", "uce"]} for s in (0, 1)]
    assert [[run["methods"] for run in rec["runs"]] for rec in wider["records"]] == [[["unerased", "uce"], ["fia"]]] * 2
    ran.clear()  # everything is stored now, and a narrower table reads its methods back
    narrow = table.run_table(model, classifier, replace(spec, methods=("fia",)), checkpoints=tmp_path, progress=False)
    assert ran == [] and [r["method"] for r in narrow["rows"]] == ["fia", "fia"] and len(narrow["manifest"]["resumed"]) == 2
    drawn_elsewhere = lambda *a: (fake_cell(*a)[0], {"prompt_hashes": {"target": "other"}, "pairs_hash": "q"})  # noqa: E731
    monkeypatch.setattr(table, "_run_seed", drawn_elsewhere)  # rows on other prompts must not join a cell
    with pytest.raises(ValueError, match="other prompts"):
        table.run_table(model, classifier, replace(spec, methods=("sld",)), checkpoints=tmp_path, progress=False)


def _summary_row(concept, method, rate, kept, sem=0.01):
    row = {"concept": concept, "method": method, "n_seeds": 3}
    for c in COLUMNS:
        row[c], row[f"{c}_sem"] = (kept if c == "preservation" else rate), sem
    return row


def test_comparisons_say_where_acterase_loses():
    from acterase_interp.evaluation.table import comparisons

    summary = [_summary_row("red", "unerased", 0.0, 1.0), _summary_row("red", "acterase", 0.5, 0.9),
               _summary_row("red", "uce", 0.1, 0.95), _summary_row("red", "sld", 0.49, 0.2)]  # fmt: skip
    by = {r["column"]: r for r in comparisons(summary)}
    # the unerased model is never "the best other" (its rate 0.0 would win every rate column)
    assert by["target_rate"]["best_other"] == "uce" and by["target_rate"]["beaten"]
    assert by["target_rate"]["margin"] == pytest.approx(0.4)
    assert by["preservation"]["best_other"] == "uce" and by["preservation"]["margin"] == pytest.approx(0.05)
    near = comparisons([_summary_row("red", "acterase", 0.5, 0.9), _summary_row("red", "sld", 0.49, 0.9)])
    assert not any(r["beaten"] for r in near)  # 0.01 apart with sems of 0.01 each: not beaten
    with pytest.raises(ValueError, match="not in the table"):
        comparisons([_summary_row("red", "uce", 0.1, 0.9)])
    assert not by["target_rate"]["wins"] and near[0]["wins"] is False
    ahead = {r["column"]: r for r in comparisons(summary, "uce")}  # uce beats acterase and sld beyond both sems
    assert ahead["target_rate"]["wins"] and ahead["target_rate"]["best_other"] == "sld"
    without = {r["column"]: r for r in comparisons(summary, "acterase", exclude=("unerased", "uce"))}
    assert without["target_rate"]["best_other"] == "sld" and not without["target_rate"]["beaten"]


def test_goal_rows_check_each_goal_and_say_by_how_much_it_is_missed():
    from acterase_interp.evaluation.table import GOALS, goal_rows

    summary = [_summary_row("red", "gated_kv", 0.15, 0.97), _summary_row("dots", "gated_kv", 0.05, 0.90),
               _summary_row("red", "uce", 0.0, 1.0)]  # fmt: skip
    summary[1]["fit_s"] = None
    rows = {(r["concept"], r["column"]): r for r in goal_rows(summary, "gated_kv")}
    assert len(rows) == 2 * len(GOALS)
    assert not rows["red", "target_rate"]["met"] and rows["red", "target_rate"]["miss"] == pytest.approx(0.05)
    assert rows["red", "preservation"]["met"] and rows["red", "preservation"]["miss"] == 0.0
    assert rows["dots", "target_rate"]["met"] and rows["dots", "preservation"]["miss"] == pytest.approx(0.05)
    assert rows["red", "fit_s"]["met"] and rows["red", "fit_s"]["goal"] == "<= 10"  # 0.15 s
    assert not rows["dots", "fit_s"]["met"] and rows["dots", "fit_s"]["miss"] is None  # undefined: not met
    with pytest.raises(ValueError, match="not in the table"):
        goal_rows(summary, "fia")


def test_table_figures_have_a_panel_per_column_and_a_series_per_concept(tmp_path):
    from acterase_interp.evaluation.figures import RATE_COLUMNS, table_bars, tradeoff
    from acterase_interp.evaluation.table import FORMAT, load_result

    summary = [_summary_row(c, m, 0.2, 0.8) for c in ("triangle", "red") for m in ("unerased", "acterase", "uce")]
    summary[1]["preservation"] = None  # undefined values are left out
    result = {"format": FORMAT, "summary": summary}
    fig = table_bars(result)
    assert len(fig.data) == len(RATE_COLUMNS) * 2 and [a.text for a in fig.layout.annotations][0] == "erasure: target rate"
    kept = [t for t in fig.data if t.xaxis == f"x{len(RATE_COLUMNS)}"]
    assert [list(t.x) for t in kept] == [["unerased", "uce"], ["unerased", "acterase", "uce"]]
    points = tradeoff(result)
    assert [t.name for t in points.data] == ["triangle", "red"] and list(points.data[0].text) == ["unerased", "uce"]
    with pytest.raises(ValueError, match="unknown column"):
        table_bars(result, ["nope"])
    path = tmp_path / "results.json"
    path.write_text(json.dumps(result))
    assert load_result(path)["summary"] == summary
    path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not an evaluation table"):
        load_result(path)
    with pytest.raises(FileNotFoundError, match="acterase evaluate"):
        load_result(tmp_path / "missing.json")
