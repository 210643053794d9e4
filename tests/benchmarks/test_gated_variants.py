"""The gated-eraser ablation's variants: the one gate read from a projection's input is the union
of the site gates, a gate that never passes changes nothing, and the table's formatting."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from acterase_interp.erase import fit_gated
from acterase_interp.evaluation.method import per_image, read_sites
from acterase_interp.generation import generate
from acterase_interp.world.pairs import conceptworld_pairs
from benchmarks.gated_variants import any_site, counterpart_rows, full_row, markdown, union_gate


@pytest.fixture(scope="module")
def eraser(conceptworld):
    return fit_gated(conceptworld, conceptworld_pairs("red", n=4, seed=0))


def test_the_one_gate_is_the_union_of_the_site_gates(conceptworld, eraser):
    prompts = ["a crimson box on a blank background", "a red circle on a plain background", "a blue star, dotted background"]
    rows = read_sites(conceptworld, prompts, eraser.sites, lambda x, n: per_image(x.float(), n), seed=0,
                      num_inference_steps=1, steps=1)  # fmt: skip
    sites = torch.stack([eraser.gate(s.name, rows[s.name][0][-1]) for s in eraser.sites])
    tokenizer = conceptworld.pipeline.tokenizer
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = conceptworld.pipeline.text_encoder(ids.input_ids)[0]
    union = union_gate(conceptworld, eraser)(h.float())
    assert union.any() and not union.all()  # the check can fail both ways
    assert torch.equal(union, sites.any(0))


def test_a_gate_that_never_passes_changes_nothing(conceptworld, eraser):
    shut = replace(eraser, threshold={k: torch.tensor(float("inf")) for k in eraser.threshold})
    pairs = conceptworld_pairs("red", n=4, seed=0)
    images = lambda: generate(conceptworld, list(pairs.targets[:2]), seeds=[0, 1], num_inference_steps=2, progress=False)  # noqa: E731
    before = images()
    for variant in (any_site(conceptworld, shut, False), full_row(conceptworld, shut, counterpart_rows(conceptworld, shut, pairs))):
        with variant:
            assert torch.equal(images(), before)
    with any_site(conceptworld, eraser, False):
        assert not torch.equal(images(), before)  # and an open gate edits


def test_the_table_shows_undefined_preservation():
    rows = [{"concept": "red", "scope": "token", "variant": "any_site", "target_rate": 0.5, "paraphrase_rate": 0.25,
             "zero_shot_rate": 0.0, "preservation": None, "fit_recall": 0.75, "dead_gates": 3}]  # fmt: skip
    manifest = {"seed": 0, "n_images": 4, "steps": 20, "git_commit": "abc", "architecture_hash": "h", "seconds": 3.0, "command": "x"}
    assert "| red | token | any_site | 0.500 | 0.250 | 0.000 | n/a | 0.750 | 3 |" in markdown({"rows": rows, "manifest": manifest})
