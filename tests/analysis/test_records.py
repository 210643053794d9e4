"""Tidy records: group means with Student-t intervals, summaries over seeds, and caption parsing."""

import math

import pytest

from acterase_interp.analysis.evaluation import scene_of
from acterase_interp.analysis.records import group_mean, summarize, to_dataframe, where
from acterase_interp.world.factors import Scene


def test_group_mean_has_a_student_t_interval():
    rows = [{"tau": 0.1, "seed": s, "rate": v} for s, v in enumerate((1.0, 2.0, 3.0))]
    (g,) = group_mean(rows, "tau", "rate")
    assert g["rate"] == 2.0 and g["n"] == 3
    assert g["rate_sem"] == pytest.approx(1 / math.sqrt(3))
    assert g["rate_high"] - g["rate"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)  # t(0.975, df=2)
    (single,) = group_mean(rows[:1], "tau", "rate")
    assert math.isnan(single["rate_sem"])


def test_summarize_several_fields_and_seeds():
    rows = [{"tau": t, "seed": s, "a": t + s, "b": 1.0} for t in (1, 2) for s in (0, 1, 2)]
    out = summarize(rows, "tau", ["a", "b", "absent"])
    assert [r["tau"] for r in out] == [1, 2] and [r["a"] for r in out] == [2.0, 3.0]
    assert out[0]["b_sem"] == 0.0 and out[0]["seeds"] == [0, 1, 2] and "absent" not in out[0]
    assert where(rows, tau=2, seed=1) == [{"tau": 2, "seed": 1, "a": 3, "b": 1.0}]


def test_to_dataframe_needs_pandas_or_says_so():
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pandas"):
            to_dataframe([{"a": 1}])
    else:
        assert to_dataframe([{"a": 1}, {"a": 2}])["a"].tolist() == [1, 2]


def test_scene_of_reads_canonical_and_paraphrased_captions():
    assert scene_of("a drawing of a violet plus sign on a chequered backdrop") == Scene("cross", "purple", "checkerboard")
    assert scene_of("a red circle on a dotted background") == Scene("circle", "red", "dots")
    assert scene_of("five-pointed star, golden, spotted background") == Scene("star", "yellow", "dots")
    with pytest.raises(ValueError, match="names no shape"):
        scene_of("a red shape on a plain background")
