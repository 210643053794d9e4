"""The evaluation-cell benchmark's table and its refusals (fast: the cells themselves take minutes)."""

from __future__ import annotations

import pytest

from benchmarks.evaluation_cell import main, markdown


def test_the_table_sums_the_cells_and_the_search_share():
    rows = [{"method": m, "cell_s": c, "fit_s": 1.0, "search_s": s, "inversion_s": 2.0, "images_s": c - 3.0 - s}
            for m, c, s in (("a", 10.0, 5.0), ("b", 30.0, 15.0))]  # fmt: skip
    prov = {"command": "x", "git_commit": "abc", "date": "d", "torch_threads": 2, "versions": {"torch": "t"}}
    table = markdown({"device": "cpu", "rows": rows, "provenance": prov})
    assert "| b | 30.0 | 1.0 | 15.0 | 2.0 | 12.0 |" in table
    assert "Median 20.0 s per (concept, method, seed) cell, 40 s for the 2 methods" in table
    assert "the prompt search takes 50% of it" in table
    rows[0]["tau_search_s"] = 0.25
    assert "a: 1.0 s to erase, 0.8 s without its tau search." in markdown({"device": "cpu", "rows": rows, "provenance": prov})


def test_an_unknown_method_is_refused_before_any_model_loads(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--methods", "nope"])
    assert exit_.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
