"""Known-answer tests of the benchmark's metrics (hand-computed values)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from acterase_interp.bench.metrics import (
    average_precision,
    faithfulness_curve,
    mask_scores,
    normalised_scores,
    precision_recall_iou_at_k,
    principal_angles,
    site_roc,
    site_scores,
    unit_auroc,
)

SCORES = [0.9, 0.8, 0.7, 0.6, 0.5]
LABELS = [True, False, True, False, False]
TIED = [0.9, 0.7, 0.7, 0.1]


def test_auroc_by_hand():
    # positive 0.9 beats all 3 negatives, 0.7 beats 2 of 3: 5 of 6 pairs
    assert unit_auroc(SCORES, LABELS) == pytest.approx(5 / 6)
    # ties count one half: 0.9 beats 2, 0.7 ties 0.7 (1/2) and beats 0.1: 3.5 of 4
    assert unit_auroc(TIED, [True, True, False, False]) == pytest.approx(0.875)


def test_average_precision_by_hand():
    # hits at ranks 1 and 3: 1/2 * 1 + 1/2 * 2/3
    assert average_precision(SCORES, LABELS) == pytest.approx(0.5 + 1 / 3)
    # the tie group (0.7, 0.7) enters at once: recall 1/2 at precision 1, then 1 at 2/3
    assert average_precision(TIED, [True, False, True, False]) == pytest.approx(0.5 + 1 / 3)


def test_auroc_and_ap_agree_with_sklearn_on_random_ties():
    rng = np.random.default_rng(0)
    s, y = rng.integers(0, 5, 200).astype(float), rng.random(200) < 0.3
    assert unit_auroc(s, y) == pytest.approx(roc_auc_score(y, s))
    assert average_precision(s, y) == pytest.approx(average_precision_score(y, s))


def test_auroc_needs_both_classes_and_finite_scores():
    with pytest.raises(ValueError, match="both positive and negative"):
        unit_auroc([1.0, 2.0], [True, True])
    with pytest.raises(ValueError, match="finite"):
        average_precision([1.0, float("nan")], [True, False])


def test_precision_recall_iou_at_k_by_hand():
    top = precision_recall_iou_at_k(torch.tensor([5.0, 4, 3, 2, 1]), torch.tensor(LABELS))
    assert (top.k, top.precision, top.recall, top.iou) == (2, 0.5, 0.5, pytest.approx(1 / 3))
    exact = precision_recall_iou_at_k(torch.tensor([5.0, 1, 4, 2, 1]), torch.tensor(LABELS))
    assert (exact.precision, exact.recall, exact.iou) == (1.0, 1.0, 1.0)
    m = mask_scores(torch.tensor([True, True, False, False, False]), torch.tensor(LABELS))
    assert (m.k, m.precision, m.recall, m.iou) == (2, 0.5, 0.5, pytest.approx(1 / 3))
    assert mask_scores(torch.zeros(5, dtype=torch.bool), torch.tensor(LABELS)).precision == 0.0


def test_principal_angles_of_a_rotated_basis():
    theta = math.radians(20)
    a = torch.eye(3)[:, :2]
    b = torch.stack([torch.tensor([1.0, 0, 0]), torch.tensor([0, math.cos(theta), math.sin(theta)])], 1)
    assert principal_angles(a, b) == pytest.approx([20.0, 0.0], abs=1e-4)
    q, _ = torch.linalg.qr(torch.randn(6, 2, generator=torch.Generator().manual_seed(0)))
    assert max(principal_angles(q, q @ torch.tensor([[0.6, -0.8], [0.8, 0.6]]))) < 1e-3  # same span
    with pytest.raises(ValueError, match="same dim"):
        principal_angles(torch.eye(3), torch.eye(4))


def test_site_scores_normalise_per_family():
    scores = {"a.ffn_hidden": torch.tensor([4.0, 0.0]), "b.ffn_hidden": torch.tensor([0.0, 0.0]),
              "a.attn1_out": torch.tensor([40.0, 40.0])}
    normed = normalised_scores(scores)
    assert normed["a.ffn_hidden"].tolist() == [4.0, 0.0]  # family mean |score| is 1
    assert normed["a.attn1_out"].tolist() == [1.0, 1.0]  # family mean |score| is 40
    assert site_scores(scores, top_k=1) == {"a.ffn_hidden": 4.0, "b.ffn_hidden": 0.0, "a.attn1_out": 1.0}


def test_site_roc_by_hand():
    values = {"a.ffn_hidden": 3.0, "b.ffn_hidden": 1.0, "a.attn1_out": 2.0}
    first = site_roc(values, ["a.ffn_hidden"])
    assert (first.auc, first.sites_first, first.family_first) == (1.0, True, True)
    assert first.ranked == ("a.ffn_hidden", "a.attn1_out", "b.ffn_hidden")
    last = site_roc(values, ["b.ffn_hidden"])
    assert (last.auc, last.sites_first, last.family_first) == (0.0, False, True)  # its family's best site (3) leads
    assert last.tpr[-1] == 1.0 and last.fpr[-1] == 1.0
    with pytest.raises(ValueError, match="not scored"):
        site_roc(values, ["c.ffn_hidden"])


def test_faithfulness_curve_by_hand():
    table = {0: (0.8, 0.0), 1: (0.4, 0.1), 2: (0.0, 0.2)}
    curve = faithfulness_curve(table.__getitem__, (0, 1, 2))
    # removed shares 0, 0.5, 1 on positions 0, 0.5, 1: area 0.5; damage 0, 0.1, 0.2: area 0.1
    assert curve.removed_auc == pytest.approx(0.5) and curve.damage_auc == pytest.approx(0.1)
    assert faithfulness_curve(lambda n: (0.0, None), (0, 1)).removed_auc is None
    with pytest.raises(ValueError, match="increase from 0"):
        faithfulness_curve(table.__getitem__, (1, 2))
