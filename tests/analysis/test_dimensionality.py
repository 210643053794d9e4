"""Known answers for mask sizes, overlaps and the spectrum of difference vectors."""

import math

import pytest
import torch

from acterase_interp.analysis.dimensionality import (
    effective_rank,
    explained_variance,
    iou_matrix,
    mask_density,
    mask_iou,
    mean_pairwise_iou,
    spectrum_records,
)


def _rank3(n: int = 40, units: int = 64, noise: float = 1e-4, scales=(5.0, 3.0, 2.0)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(units, 3, generator=g))
    coeff = torch.randn(n, 3, generator=g) * torch.tensor(scales)
    return coeff @ basis.T + noise * torch.randn(n, units, generator=g)


def test_rank_three_plus_noise_has_effective_rank_three():
    x = _rank3()
    assert effective_rank(x, "variance", 0.9) <= 3
    assert effective_rank(x, "variance", 0.999) == 3
    ratio = explained_variance(x)
    assert ratio[:3].sum() > 0.9999 and ratio[3:].sum() < 1e-6
    assert torch.isclose(ratio.sum(), torch.tensor(1.0))


def test_participation_ratio_of_equal_components_is_their_count():
    units = 32
    basis = torch.eye(units)[:3]  # three orthogonal directions, equal energy
    x = torch.cat([basis * 2.0, -basis * 2.0])
    assert effective_rank(x, "participation") == pytest.approx(3.0, abs=1e-6)
    # an uneven spectrum has a smaller participation ratio than its algebraic rank
    assert effective_rank(_rank3(), "participation") < 3.0


def test_centering_removes_a_shared_offset():
    x = torch.ones(10, 5) * 3.0  # all vectors equal: rank 1 uncentred, undefined centred
    assert effective_rank(x) == 1
    with pytest.raises(ValueError, match="zero"):
        explained_variance(x, center=True)


def test_spectrum_records_carry_meta():
    curves, ranks = spectrum_records({"a": _rank3(), "b": _rank3(scales=(1.0, 1.0, 1.0))}, threshold=0.999, seed=3)
    assert {r["site"] for r in ranks} == {"a", "b"}
    assert all(r["n_components"] == 3 and r["seed"] == 3 for r in ranks)
    b = [r for r in ranks if r["site"] == "b"][0]
    assert b["participation_ratio"] == pytest.approx(3.0, rel=0.25)
    a_curve = [r for r in curves if r["site"] == "a"]
    assert a_curve[-1]["cumulative"] == pytest.approx(1.0) and len(a_curve) == 40


def test_mask_density_of_known_mask():
    scores = torch.arange(100.0)
    assert mask_density(scores >= 90) == pytest.approx(0.10)
    assert mask_density(torch.zeros(4, 5, dtype=torch.bool)) == 0.0


def test_iou_of_known_masks():
    a = torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool)
    b = torch.tensor([0, 1, 1, 1, 0, 0], dtype=torch.bool)
    assert mask_iou(a, b) == pytest.approx(2 / 4)
    assert mask_iou(a, a) == 1.0
    assert mask_iou(a, ~a) == 0.0
    assert math.isnan(mask_iou(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)))
    with pytest.raises(ValueError, match="shape"):
        mask_iou(a, b[:3])


def test_iou_matrix_and_mean():
    a = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    b = torch.tensor([1, 0, 0, 0], dtype=torch.bool)
    c = torch.tensor([0, 0, 1, 1], dtype=torch.bool)
    rows = iou_matrix({"a": a, "b": b, "c": c}, concept="x")
    cell = {(r["a"], r["b"]): r["iou"] for r in rows}
    assert len(rows) == 9 and cell[("a", "b")] == 0.5 and cell[("b", "a")] == 0.5 and cell[("a", "c")] == 0.0
    assert all(r["concept"] == "x" for r in rows)
    assert mean_pairwise_iou([a, b, c]) == pytest.approx((0.5 + 0 + 0) / 3)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="matrix"):
        effective_rank(torch.zeros(3))
    with pytest.raises(ValueError, match="method"):
        effective_rank(_rank3(), "entropy")


def test_dimension_findings_read_the_truth_probes_and_the_smallest_k():
    from acterase_interp.analysis import dimension_findings

    truth = [{"concept": "heart", "site": f"{b}.ffn_hidden", "planted_family": "ffn_units", "planted_units": n,
              "planted_share": n / 512, "mask_density": d, "top_unit_recall": r, "n_components": c}
             for b, n, d, r, c in (("up.0.0", 32, 0.1, 0.75, 2), ("up.0.1", 32, 0.2, 0.25, 3), ("mid.0", 0, 0.05, None, 5))]  # fmt: skip
    probes = {"heart": {"masked": 0.9, "random": 0.6, "all": 1.0, "chance": 0.5}}
    subspace = {"heart": [{"kind": "units", "k": k, "concept_rate": rate, "preservation": 0.99}
                          for k, rate in ((1, 0.9), (8, 0.3), (32, 0.05), (64, 0.0))]
                + [{"kind": "directions", "k": 8, "concept_rate": 0.5, "preservation": 0.98}]}  # fmt: skip
    lines = dimension_findings(truth, probes, subspace, {"heart": {"concept_rate": 0.0, "preservation": 0.97}})
    assert lines[0] == ("- heart: planted (ffn_units) at 2 of 3 sites; mask density there 0.1500 against a planted share "
                        "of 0.0625, elsewhere 0.0500; difference energy ranks 0.500 of the planted units first; "
                        "components for 90% 2-5 of 3 sites' difference vectors")  # fmt: skip
    assert "masked units 0.900, as many random units 0.600" in lines[1]
    assert lines[2] == "  - units: 32 per site bring the rate to 0.050 (preservation 0.990)"
    assert lines[3] == "  - at an equal budget of 8 per site: directions 0.500, units 0.300"
    assert lines[4] == "  - full eraser: concept rate 0.000, preservation 0.970"
    natural = [dict(r, planted_family=None, planted_units=None, top_unit_recall=None) for r in truth]
    subspace["heart"] = [r for r in subspace["heart"] if r["kind"] == "units" and r["k"] <= 8]
    lines = dimension_findings(natural, probes, subspace, {"heart": {"concept_rate": 0.0, "preservation": 0.97}})
    assert lines[0].startswith("- heart: natural; mask density 0.1167 (mean over sites)")
    assert lines[2] == "  - units: none of k <= 8 per site brings the rate to 0.10 (lowest 0.300 at k 8)"
