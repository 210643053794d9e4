"""How a benchmark figure decides whether its goal is met (fast: no model)."""

from __future__ import annotations

from benchmarks.run import _summary, figure


def _runs(a: list[float], b: list[float], quantity: str) -> dict:
    return {"a": {quantity: _summary(a)}, "b": {quantity: _summary(b)}}


def test_a_memory_goal_must_hold_in_every_repetition_not_only_the_median():
    runs = _runs([100.0, 100.0, 100.0], [110.0, 112.0, 210.0], "peak_bytes")  # median 1.12x, one run 2.1x
    f = figure("fit peak memory", "plain", "fit", runs, "peak_bytes", 1.3, "n")
    assert f["ratio"] == 1.12 and f["worst_ratio"] == 2.1 and f["met"] is False
    assert "worst repetition 2.10x" in f["note"]
    ok = figure("fit peak memory", "plain", "fit", _runs([100.0] * 3, [110.0, 112.0, 129.0], "peak_bytes"),
                "peak_bytes", 1.3, "n")  # fmt: skip
    assert ok["met"] is True


def test_a_time_goal_is_read_on_the_medians():
    f = figure("fit time", "floor", "fit", _runs([1.0, 1.0, 1.0], [1.1, 1.1, 3.0], "seconds"), "seconds", 1.2, "n")
    assert f["worst_ratio"] is None and f["met"] is True and abs(f["ratio"] - 1.1) < 1e-12
