"""Results as pandas DataFrames with one call, `to_dataframe`: sweep records, benchmark rows, the
evaluation table's rows (nested measures flattened on request) and the leaderboard's `Row`s."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from acterase_interp.analysis.records import to_dataframe
from acterase_interp.bench.leaderboard import Row
from acterase_interp.evaluation.table import summarize
from benchmarks.run import _summary, figure, rows


def test_sweep_records_become_one_row_each_with_nested_options_kept_or_flattened():
    records = [{"tau": tau, "seed": 0, "erasure": e, "preservation": p, "options": {"tau": tau, "blocks": ["mid"]}}
               for tau, e, p in ((0.01, 0.5, 1.0), (0.05, 0.9, None))]  # fmt: skip
    frame = to_dataframe(records)
    assert list(frame.columns) == ["tau", "seed", "erasure", "preservation", "options"]
    assert frame["erasure"].tolist() == [0.5, 0.9] and frame["options"][1] == {"tau": 0.05, "blocks": ["mid"]}
    assert frame["preservation"][0] == 1.0 and math.isnan(frame["preservation"][1])  # undefined stays undefined
    flat = to_dataframe(records, flatten=True)
    assert flat["options.tau"].tolist() == [0.01, 0.05] and flat["options.blocks"][0] == ["mid"]


def test_benchmark_rows_are_flat_one_per_figure():
    runs = {"a": {"seconds": _summary([1.0, 2.0, 3.0])}, "b": {"seconds": _summary([2.0, 4.0, 9.0])}}
    result = {"device": "cpu", "scales": {"sd15": {"figures": [
        figure("patched generation", "unpatched", "patched", runs, "seconds", 1.03, "note"),
        {"figure": "re-threshold", "a": None, "b": "eraser", "quantity": "seconds", "a_stats": None,
         "b_stats": _summary([0.001]), "ratio": None, "goal_seconds": 0.001, "met": True, "note": "n"}]}}}  # fmt: skip
    frame = to_dataframe(rows(result))
    assert frame.shape[0] == 2 and frame["scale"].tolist() == ["sd15", "sd15"]
    first = frame.iloc[0]
    assert (first.a_median, first.a_min, first.a_max, first.b_median, first.ratio) == (2.0, 1.0, 3.0, 4.0, 2.0)
    assert first.goal_ratio == 1.03 and not first.met and math.isnan(first.goal_seconds)
    assert frame.iloc[1].goal_seconds == 0.001 and math.isnan(frame.iloc[1].a_median)  # no A side


def test_the_evaluation_tables_rows_convert_from_the_result_itself():
    rate = lambda v: {"value": v, "n": 8, "ci_low": v / 2, "ci_high": min(1.0, 2 * v)}  # noqa: E731
    rows_ = [{"concept": "red", "method": m, "seed": s, "target_rate": rate(v), "preservation": 1.0}
             for m, v in (("unerased", 0.75), ("acterase", 0.125)) for s in (0, 1)]  # fmt: skip
    result = {"format": "table", "rows": rows_, "summary": summarize(rows_)}
    frame = to_dataframe(result, flatten=True)
    assert frame.shape[0] == 4 and frame["target_rate.value"].tolist() == [0.75, 0.75, 0.125, 0.125]
    assert frame.groupby("method")["target_rate.value"].mean()["acterase"] == 0.125
    summary = to_dataframe(result["summary"])
    assert summary.set_index("method").loc["unerased", "n_seeds"] == 2


def test_leaderboard_rows_convert_as_dataclasses():
    board = [Row("acterase-mask", "p1", "test", "unit", "precision@k", 0.5, ">= 0.5", True),
             Row("wanda", "p1", "test", "unit", "precision@k", None)]
    frame = to_dataframe(board)
    assert list(frame.columns) == ["localizer", "planting", "split", "family", "metric", "value", "goal", "met"]
    assert frame["localizer"].tolist() == ["acterase-mask", "wanda"] and frame["met"][0]
    assert isinstance(frame, pd.DataFrame)


def test_what_is_not_a_record_is_refused_clearly():
    with pytest.raises(TypeError, match="a dict or a dataclass instance"):
        to_dataframe([1, 2])
    with pytest.raises(TypeError, match="needs a 'rows' list"):
        to_dataframe({"summary": []})


def test_columns_choose_and_order_fields_and_digits_round_floats():
    records = [{"tau": 0.0123456, "site": "mid.0", "n": 3}, {"tau": 0.5, "site": "up.0.0", "n": 4}]
    frame = to_dataframe(records, columns=["site", "tau"], digits=3)
    assert list(frame.columns) == ["site", "tau"]
    assert frame["tau"].tolist() == [0.012, 0.5] and frame["site"].tolist() == ["mid.0", "up.0.0"]
    with pytest.raises(KeyError, match=r"no field \['rho'\].*'tau'"):
        to_dataframe(records, columns=["site", "rho"])
