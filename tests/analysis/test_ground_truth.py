"""Scoring localization against planted ground truth: the pure scores with known answers, and one
real run per entry point (the heart on ConceptWorld v2; the CLI) at 2 steps, checked for shape."""

from __future__ import annotations

import json

import pytest
import torch

from acterase_interp.analysis.ground_truth import (
    IOU_TAUS,
    family_rank,
    main,
    markdown_table,
    planted_families,
    precision_recall,
    score_concept,
    top_units_iou,
    unit_iou,
)
from acterase_interp.sites import Site

BLOCKS = ["down.0.0", "down.1.0", "mid.0", "up.0.0", "up.0.1", "up.1.0", "up.1.1"]


def test_planted_families():
    assert planted_families("ffn") == planted_families("ffn_units") == ("ffn_hidden",)
    assert planted_families("attn2_kv") == ("attn2_k", "attn2_v", "text")
    with pytest.raises(ValueError, match="unknown planted family 'attn1'"):
        planted_families("attn1")


def test_family_rank_orders_families_by_their_best_block():
    causal = {"ffn_hidden": {"a": 0.1, "b": 0.5}, "attn2_k": {"a": 0.6, "b": None}, "text": {"a": None}}
    rank = family_rank(causal, ("ffn_hidden",))
    assert rank["ranks"] == [{"family": "attn2_k", "block": "a", "concept_drop": 0.6},
                             {"family": "ffn_hidden", "block": "b", "concept_drop": 0.5},
                             {"family": "text", "block": None, "concept_drop": None}]  # fmt: skip
    assert rank["planted_families"] == ["ffn_hidden"] and rank["planted_first"] is False
    assert family_rank(causal, ("attn2_k", "attn2_v", "text"))["planted_first"] is True
    assert family_rank({"ffn_hidden": {"a": 0.5}, "attn2_k": {"a": 0.5}}, ("attn2_k",))["planted_first"] is False  # a tie
    assert family_rank({"ffn_hidden": {"a": 0.5}}, ("ffn_hidden",))["planted_first"] is None  # nothing to beat
    assert family_rank({"attn2_v": {"a": 0.5}}, ("ffn_hidden",))["planted_first"] is None  # planted family not scored


def test_precision_recall_and_unit_iou():
    assert precision_recall(["a", "b", "c"], ["b", "d"]) == {"k": 2, "top": ["a", "b"], "precision": 0.5, "recall": 0.5}
    assert precision_recall(["b", "d", "a"], ["b", "d"], k=3)["precision"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no ground-truth"):
        precision_recall(["a"], [])
    sites = [Site("x.ff", "ffn_hidden", "x", "", "input", None, (1, 4)),
             Site("y.attn", "attn2_out", "y", "", "output", None, (1, 4))]
    masks = {"x.ff": torch.tensor([[[True, True, False, False]], [[False, False, True, False]]]),
             "y.attn": torch.ones(1, 1, 4, dtype=torch.bool)}
    # on: x units 0, 1, 2 (any step); planted: x 2, 3 -> 1 shared of 4; attn2 sites never count
    assert unit_iou(masks, {"x": [2, 3]}, sites) == pytest.approx(1 / 4)
    # top-2 over both ffn blocks by score: x.3 (0.9), z.0 (0.8); planted x.2, x.3 -> 1 shared of 3
    sites.append(Site("z.ff", "ffn_hidden", "z", "", "input", None, (1, 2)))
    scores = {"x.ff": torch.tensor([0.1, 0.2, 0.3, 0.9]), "y.attn": torch.ones(4), "z.ff": torch.tensor([0.8, 0.0])}
    assert top_units_iou(scores, {"x": [2, 3]}, sites) == pytest.approx(1 / 3)
    assert top_units_iou(scores, {"x": [3], "z": [0]}, sites) == 1.0


def _concept(family, maps, rank, **extra):
    return {"concept": "heart", "family": family, "planted_blocks": ["a"], "maps": maps, "family_rank": rank, **extra}


def test_markdown_table():
    top = {"top": ["a"], "precision": 1.0, "recall": 1.0}
    maps = {"ffn_hidden": {"causal": {"values": {"a": 0.75, "b": 0.0}, **top}, "difference": top},
            "text": {"causal": {"values": {"a": 0.25, "b": None}, **top}}}  # fmt: skip
    rank = family_rank({f: m["causal"]["values"] for f, m in maps.items()}, ("ffn_hidden",))
    table = markdown_table({"concepts": [_concept("ffn_units", maps, rank, unit_iou={"0.01": 0.5})]})
    lines = table.splitlines()
    assert lines[2] == "| heart | ffn_units: a | ffn_hidden | a (1.00 / 1.00) | a (1.00 / 1.00) | 0.750 |"
    assert lines[3] == "| heart | ffn_units: a | text | n/a | a (1.00 / 1.00) | 0.250 |"  # text has no difference map
    assert "families by best drop: ffn_hidden (a: 0.750), text (a: 0.250); planted (ffn_hidden) first" in table
    assert "planted units of 'heart': tau 0.01: 0.500" in table


def test_score_concept_on_the_planted_heart(conceptworld, classifier):
    record = next(r for r in conceptworld.planted if r["concept"] == "heart")
    out = score_concept(conceptworld, classifier, record, families=("ffn_hidden", "text"), n_pairs=2, seeds=(0,),
                        num_inference_steps=2, progress=False)  # fmt: skip
    assert out["concept"] == "heart" and out["family"] == "ffn_units" and out["planted_blocks"] == ["up.0.0", "up.0.1"]
    assert list(out["maps"]) == ["ffn_hidden", "text"] and "difference" not in out["maps"]["text"]
    for family, m in out["maps"].items():
        assert list(m["causal"]["values"]) == BLOCKS and m["causal"]["k"] == 2, family
    assert list(out["maps"]["ffn_hidden"]["difference"]["values"]) == BLOCKS
    assert all(d is not None for d in out["maps"]["ffn_hidden"]["causal"]["damage"].values())  # erasing measures damage
    assert out["family_rank"]["planted_families"] == ["ffn_hidden"] and len(out["family_rank"]["ranks"]) == 2
    assert list(out["unit_iou"]) == [str(t) for t in IOU_TAUS] and all(0 <= v <= 1 for v in out["unit_iou"].values())
    assert set(out["top_units_iou"]) == {"zscore", "importance"} and all(0 <= v <= 1 for v in out["top_units_iou"].values())


def test_the_command_writes_json_and_prints_the_table(tmp_path, capsys):
    path = tmp_path / "gt.json"
    result = main(["--n-pairs", "2", "--seeds", "0", "--steps", "2", "--families", "text", "--out", str(path)])
    assert json.loads(path.read_text())["concepts"] == json.loads(json.dumps(result["concepts"]))
    assert [c["concept"] for c in result["concepts"]] == ["moon", "heart", "cyan"]
    assert result["options"]["families"] == ("text",) and result["options"]["causal_tau"] == 1.0
    printed = capsys.readouterr().out
    assert "| cyan | attn2_kv: up.1.0, up.1.1 | text | n/a |" in printed and "planted (text)" in printed
    assert "planted (none scored) not ranked" in printed  # the moon is planted in FFNs, and only text was scored
