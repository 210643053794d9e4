"""The analysis library on ConceptWorld itself, with tiny settings (two pairs, two steps, a few
images): patches switch on exactly when and where asked, and the evaluation compares same-seed runs."""

import pytest
import torch

from acterase_interp import generate
from acterase_interp.analysis import (
    Evaluator,
    SubspacePatch,
    choice_ablation,
    collect_activations,
    fit_seeds,
    patched,
    probe_eraser_sites,
)
from acterase_interp.erase import EraseOptions, Eraser
from acterase_interp.world.pairs import conceptworld_pairs

STEPS = 2


@pytest.fixture(scope="module")
def world(conceptworld, classifier):
    model = conceptworld
    pairs = conceptworld_pairs("red", n=2)
    statistics = fit_seeds(model, pairs, EraseOptions(num_inference_steps=STEPS), seeds=(0,), progress=False)[0]
    evaluator = Evaluator.from_pairs(model, classifier, pairs, num_inference_steps=STEPS)
    return model, classifier, pairs, statistics, evaluator


def test_unpatched_evaluation_equals_its_baseline(world):
    model, _, pairs, _, evaluator = world
    row = evaluator(None, seed=1, tau=None)
    assert row["concept_drop"] == 0.0 and row["image_distance"] == 0.0 and row["seed"] == 1
    assert row["concept_rate_n"] == len(pairs.targets) and 0 <= row["concept_rate_low"] <= row["concept_rate"] <= row["concept_rate_high"]
    assert row["non_target_accuracy_n"] == len(pairs.non_target) and "versions" in row


@pytest.mark.slow
def test_windowed_patch_matches_the_erasers_own_switch(world):
    model, _, pairs, statistics, evaluator = world
    eraser = statistics.eraser(tau=1.0)  # every unit whose target importance beats the source
    prompts = list(pairs.non_target)
    with eraser.applied(model):
        expected = generate(model, prompts, seeds=0, num_inference_steps=STEPS, progress=False)
    plain = generate(model, prompts, seeds=0, num_inference_steps=STEPS, progress=False)
    assert not torch.equal(expected, plain)
    for window in (None, (0, STEPS)):
        with patched(model, eraser, window):
            assert torch.equal(generate(model, prompts, seeds=0, num_inference_steps=STEPS, progress=False), expected)
    with patched(model, eraser, (STEPS, STEPS + 3)):  # a window after the last step: never on
        assert torch.equal(generate(model, prompts, seeds=0, num_inference_steps=STEPS, progress=False), plain)
    assert evaluator(eraser, seed=0)["image_distance"] > 0
    assert evaluator(eraser, seed=0, steps=(STEPS, STEPS + 1))["image_distance"] == 0.0


def test_full_unit_subspace_patch_equals_replacing_every_unit(world):
    model, _, pairs, statistics, _ = world
    units = statistics.sites[0].shape[-1]
    patch = SubspacePatch.from_statistics(statistics, k=units, kind="units", blocks=(statistics.sites[0].block,))
    site = patch.sites[0].name
    everything = Eraser.from_tensors(model, {site: torch.ones(units, dtype=torch.bool)}, {site: patch.means[site]})
    prompts = list(pairs.targets)
    with patch.applied(model):
        ours = generate(model, prompts, seeds=0, num_inference_steps=STEPS, progress=False)
    with everything.applied(model):
        theirs = generate(model, prompts, seeds=0, num_inference_steps=STEPS, progress=False)
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_activations_and_probes(world):
    model, _, pairs, statistics, _ = world
    sites = statistics.sites[:2]
    feats = collect_activations(model, list(pairs.targets), sites, num_inference_steps=STEPS, progress=False)
    assert [tuple(f.shape) for f in feats.values()] == [(2, s.shape[-1]) for s in sites]
    late = collect_activations(model, list(pairs.targets), sites, steps=(1, 2), num_inference_steps=STEPS, progress=False)
    assert not torch.equal(feats[sites[0].name], late[sites[0].name])
    rows = probe_eraser_sites(model, statistics.eraser(tau=0.5), pairs.targets + pairs.heldout,
                              pairs.sources + pairs.non_target, num_inference_steps=STEPS, folds=2, n_random=1,
                              progress=False)  # fmt: skip
    assert len(rows) == 3 * len(statistics.sites) and {r["units"] for r in rows} == {"masked", "random", "all"}


@pytest.mark.slow
def test_a_small_choice_ablation(world):
    model, classifier, pairs, _, _ = world
    evaluator = Evaluator(model, classifier, pairs.concept, pairs.targets[:1], pairs.non_target[:1], num_inference_steps=STEPS)
    rows, best = choice_ablation(evaluator, pairs, {"time_mask": ["union", "last"], "num_pairs": [1, 2]},
                                 base=EraseOptions(num_inference_steps=STEPS), taus=[0.05, 0.5], seeds=(0,),
                                 progress=False)  # fmt: skip
    assert len(rows) == 8 and len(best) == 4
    assert {(b["choice"], b["value"]) for b in best} == {("time_mask", "union"), ("time_mask", "last"),
                                                         ("num_pairs", "1"), ("num_pairs", "2")}  # fmt: skip
    assert all(b["tau"] in (0.05, 0.5) and b["n"] == 1 and b["seeds"] == [0] for b in best)
    one_pair = [r for r in rows if r["choice"] == "num_pairs" and r["value"] == "1"]
    assert all(r["fit_seeds"] == [0] and len(r["options"]) > 0 for r in one_pair)
    last = [r for r in rows if r["value"] == "last"]
    assert all(r["time_mask"] == "last" and r["options"]["time_mask"] == "last" for r in last)
