"""The gated subspace eraser (`erase.gated`): its pieces against hand computations, and on
ConceptWorld the two promises of the gate (a prompt whose tokens never pass it is bit-identical to
the unerased model; a target prompt changes). Both engines, hooks and nnsight, and the save/load
round trip are in tests/test_conformance.py."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from acterase_interp.erase import GatedEraser, fit_gated
from acterase_interp.erase.gated import (
    MANIFEST,
    TENSORS,
    _site_rows,
    choose_scope,
    concept_tokens,
    fit_recall,
    gate_coverage,
    gate_scores,
    with_scope,
)
from acterase_interp.generation import generate
from acterase_interp.integrity import ArtifactError
from acterase_interp.sites import Site
from acterase_interp.world.pairs import conceptworld_pairs


def test_concept_tokens_are_the_targets_tokens_its_source_replaces():
    assert concept_tokens([1, 2, 3, 4], [1, 5, 3, 4]) == [([1], [1])]
    assert concept_tokens([1, 2, 7, 3, 0], [1, 5, 3, 0, 0]) == [([1, 2], [1])]  # two tokens for one
    assert concept_tokens([1, 2, 3], [1, 3, 0]) == [([1], [])]  # deleted: no counterpart (the fit skips it)
    assert concept_tokens([1, 3], [1, 2, 3]) == []  # the source only inserts: no target token to erase
    assert concept_tokens([4, 5], [4, 5]) == []


def _toy(threshold: float) -> GatedEraser:
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(6, 2, generator=g)).Q
    site = Site("b.attn2_v", "attn2_v", "b", "b.attn2.to_v", "output", None, (3, 6))
    return GatedEraser((site,), {site.name: basis}, {site.name: torch.tensor([0.5, -1.0])},
                       {site.name: torch.tensor([1.0, 0.0])}, {site.name: torch.tensor(threshold)},
                       {"architecture_hash": "toy"})  # fmt: skip


def test_the_edit_equals_a_hand_computation_where_the_gate_passes_and_nothing_elsewhere():
    x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(1))
    closed = _toy(float("inf"))
    assert closed("b.attn2_v", x) is x  # nothing passes: the input itself
    q = closed.basis["b.attn2_v"]
    coords = x @ q - torch.tensor([0.5, -1.0])
    by_hand = x - coords @ q.T
    assert torch.allclose(_toy(float("-inf"))("b.attn2_v", x), by_hand, atol=1e-6)
    assert torch.allclose(by_hand @ q, torch.tensor([0.5, -1.0]).expand(2, 3, 2), atol=1e-5)  # coordinates set to c
    half = _toy(0.0)
    gate = coords[..., 0] > 0
    assert torch.equal(half.gate("b.attn2_v", x), gate) and gate.any() and not gate.all()
    out = half("b.attn2_v", x)
    assert torch.equal(out[~gate], x[~gate]) and torch.allclose(out[gate], by_hand[gate], atol=1e-6)
    with pytest.raises(KeyError, match="no site"):
        half("other.attn2_v", x)


def test_bad_options_and_shapes_are_refused(conceptworld):
    pairs = conceptworld_pairs("triangle", n=2)
    with pytest.raises(ValueError, match="rank"):
        fit_gated(conceptworld, pairs, rank=0)
    with pytest.raises(ValueError, match="margin"):
        fit_gated(conceptworld, pairs, margin=1.0)
    with pytest.raises(ValueError, match="no sites"):
        fit_gated(conceptworld, pairs, kinds=())
    toy = _toy(0.0)
    with pytest.raises(ValueError, match="do not fit"):
        GatedEraser(toy.sites, toy.basis, {"b.attn2_v": torch.zeros(3)}, toy.direction, toy.threshold, toy.manifest)


@pytest.fixture(scope="module")
def triangle(conceptworld):
    pairs = conceptworld_pairs("triangle", n=4)
    return pairs, fit_gated(conceptworld, pairs)


def test_sources_never_pass_the_gate_and_stay_bit_identical_while_targets_change(conceptworld, triangle):
    pairs, eraser = triangle
    prompts = [pairs.sources[0], pairs.sources[1], pairs.targets[0]]
    plain = generate(conceptworld, prompts, seeds=0, num_inference_steps=4, progress=False)
    with eraser.applied(conceptworld):
        erased = generate(conceptworld, prompts, seeds=0, num_inference_steps=4, progress=False)
    assert torch.equal(erased[:2], plain[:2])  # calibrated on them: no source token passes
    assert (erased[2] - plain[2]).abs().max() > 1e-2
    assert len(eraser.sites) == 14 and eraser.manifest["concept_tokens"] >= 4


def test_gate_coverage_says_which_sites_each_prompt_passes(conceptworld, triangle):
    pairs, eraser = triangle
    prompts = [*pairs.sources[:2], *pairs.targets[:2]]
    covered = gate_coverage(conceptworld, eraser, prompts)
    assert covered.shape == (14, 4) and covered.dtype == torch.bool
    assert not covered[:, :2].any()  # the thresholds sit above every source token
    assert covered[:, 2:].any(0).all()  # each target's concept token passes somewhere
    every, none = (replace(eraser, threshold={k: torch.tensor(v) for k in eraser.threshold}) for v in (-1e9, 1e9))
    assert gate_coverage(conceptworld, every, prompts).all() and not gate_coverage(conceptworld, none, prompts).any()
    with pytest.raises(ValueError, match="no prompts"):
        gate_coverage(conceptworld, eraser, [])


def test_fit_recall_is_the_share_of_concept_tokens_each_gate_passes(conceptworld, triangle):
    pairs, eraser = triangle
    recall = fit_recall(conceptworld, eraser, pairs)
    tokenizer = conceptworld.pipeline.tokenizer
    word = tokenizer.convert_tokens_to_ids("triangle")
    positions = [tokenizer(t).input_ids.index(word) for t in pairs.targets]  # one token, replaced by another shape
    rows = _site_rows(conceptworld, pairs.targets, eraser.sites)
    scores = gate_scores(conceptworld, eraser, pairs.targets)
    for site in eraser.sites:
        gate = eraser.gate(site.name, rows[site.name][-1])
        assert torch.equal(scores[site.name] > eraser.threshold[site.name], gate)  # the score is what the gate reads
        assert recall[site.name] == pytest.approx(sum(bool(gate[i, p]) for i, p in enumerate(positions)) / len(positions))
    assert list(recall) == [s.name for s in eraser.sites] and max(recall.values()) == 1.0
    every, none = (replace(eraser, threshold={k: torch.tensor(v) for k in eraser.threshold}) for v in (-1e9, 1e9))
    assert set(fit_recall(conceptworld, every, pairs).values()) == {1.0}
    assert set(fit_recall(conceptworld, none, pairs).values()) == {0.0}


def test_a_tampered_or_foreign_artifact_is_refused(conceptworld, triangle, tmp_path):
    _, eraser = triangle
    eraser.save(tmp_path / "e")
    manifest = json.loads((tmp_path / "e" / MANIFEST).read_text())
    manifest["architecture_hash"] = "another"
    (tmp_path / "e" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="architecture hash"):
        GatedEraser.load(tmp_path / "e", model=conceptworld)
    eraser.save(tmp_path / "f")
    data = bytearray((tmp_path / "f" / TENSORS).read_bytes())
    data[-1] ^= 1
    (tmp_path / "f" / TENSORS).write_bytes(bytes(data))
    with pytest.raises(ArtifactError):
        GatedEraser.load(tmp_path / "f")
    with pytest.raises(FileNotFoundError, match="no gated eraser"):
        GatedEraser.load(tmp_path / "missing")


def test_the_scope_is_chosen_on_the_fit_targets_with_ties_going_to_the_lighter_edit(conceptworld, triangle):
    pairs, eraser = triangle
    calls = []

    def always(images):  # every image shows the concept under both scopes: a tie
        calls.append(len(images))
        return torch.ones(len(images), dtype=torch.bool)

    chosen, rates = choose_scope(conceptworld, eraser, pairs, always, num_inference_steps=2)
    assert chosen.manifest["scope"] == "token" and rates == {"token": 1.0, "prompt": 1.0} and calls == [4, 4]
    first = iter([True, False])  # the token scope leaves the concept, the prompt scope does not
    reader = lambda images: torch.full((len(images),), next(first))  # noqa: E731
    chosen, rates = choose_scope(conceptworld, eraser, pairs, reader, num_inference_steps=2)
    assert chosen.manifest["scope"] == "prompt" and rates == {"token": 1.0, "prompt": 0.0}
    assert all(torch.equal(chosen.basis[n], eraser.basis[n]) for n in eraser.basis)  # the same gates
    with pytest.raises(ValueError, match="scope"):
        with_scope(eraser, "everything")


def test_the_prompt_scope_edits_every_token_of_a_prompt_with_one_that_passes():
    x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(2))  # one token of the first prompt passes
    token = _toy(0.0)
    prompt = with_scope(token, "prompt")
    gate = token.gate("b.attn2_v", x)
    rows = gate.any(-1)
    assert gate.sum() == 1 and rows.tolist() == [True, False]
    out, everywhere = prompt("b.attn2_v", x), _toy(float("-inf"))("b.attn2_v", x)
    assert torch.equal(out[rows], everywhere[rows]) and torch.equal(out[~rows], x[~rows])
