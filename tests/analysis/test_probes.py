"""Probes: informative units in the mask read the concept perfectly; random uninformative units do not."""

import pytest
import torch

from acterase_interp.analysis.probes import probe_accuracy


def _data(n: int = 120, units: int = 60, informative: int = 4):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 2
    x = torch.randn(n, units, generator=g)
    x[:, :informative] += 4.0 * (2 * labels[:, None].float() - 1)  # well separated on the first units
    mask = torch.zeros(units, dtype=torch.bool)
    mask[:informative] = True
    return x, labels, mask


def test_masked_units_separate_random_units_do_not():
    x, y, mask = _data()
    rows = {r["units"]: r for r in probe_accuracy(x, y, mask, random_pool="complement", n_random=3, seed=1, concept="c")}
    assert rows["masked"]["accuracy"] >= 0.99
    assert rows["all"]["accuracy"] >= 0.9
    assert abs(rows["random"]["accuracy"] - 0.5) < 0.15  # uninformative units: about chance
    assert rows["masked"]["n_units"] == rows["random"]["n_units"] == 4 and rows["all"]["n_units"] == 60
    assert all(r["chance"] == 0.5 and r["seed"] == 1 and r["concept"] == "c" for r in rows.values())


def test_empty_mask_gives_nan_not_an_error():
    x, y, _ = _data()
    rows = {r["units"]: r for r in probe_accuracy(x, y, torch.zeros(60, dtype=torch.bool))}
    assert rows["masked"]["accuracy"] != rows["masked"]["accuracy"]  # NaN
    assert rows["all"]["accuracy"] >= 0.9


def test_bad_input_is_rejected():
    x, y, mask = _data()
    with pytest.raises(ValueError, match="mask"):
        probe_accuracy(x, y, mask[:10])
    with pytest.raises(ValueError, match="two classes"):
        probe_accuracy(x, torch.zeros(len(y)), mask)
    with pytest.raises(ValueError, match="random_pool"):
        probe_accuracy(x, y, mask, random_pool="some")
