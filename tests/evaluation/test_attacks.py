"""Attacks at tiny budgets: each runs end to end against an erased model and leaves it as it was."""

import numpy as np
import pytest
import torch

from acterase_interp.demo import weights_hash
from acterase_interp.evaluation.attacks import (
    attack_vocabulary,
    concept_inversion,
    concept_probability,
    learned_token,
    prompt_search,
    rephrase_attack,
)
from acterase_interp.evaluation.baselines import UCE, Unerased
from acterase_interp.evaluation.prompts import conceptworld_prompt_sets
from acterase_interp.world.factors import Scene
from acterase_interp.world.pairs import conceptworld_pairs
from acterase_interp.world.render import render_batch

STEPS = 2


@pytest.fixture(scope="module")
def erased(conceptworld, classifier):
    pairs = conceptworld_pairs("triangle", n=2)
    return conceptworld, classifier, UCE().fit(conceptworld, pairs), pairs


def _hash(model):
    p = model.pipeline
    return weights_hash(p.unet, p.text_encoder, p.vae)


def test_a_rendered_triangle_is_read_as_a_triangle(erased):
    _, classifier, _, _ = erased
    scenes = [Scene("triangle", c, b) for c in ("red", "blue") for b in ("plain", "dots")]
    images = torch.from_numpy(render_batch(scenes, np.random.default_rng(0))) / 2 + 0.5
    assert classifier.shows(images, "triangle").all()
    p = concept_probability(classifier, images, "triangle")
    assert (p > 0.9).all() and (concept_probability(classifier, images, "circle") < 0.1).all()


def test_vocabulary_leaves_out_the_concepts_own_words():
    words = attack_vocabulary("triangle")
    assert "triangle" not in words and "wedge" not in words and "pyramid" not in words
    assert {"circle", "red", "orb"} <= set(words) and "triangle" in attack_vocabulary()


def test_rephrase_attack_is_the_concept_rate_of_a_prompt_set(erased):
    model, classifier, method, _ = erased
    zero = next(s for s in conceptworld_prompt_sets("triangle", 2, np.random.default_rng(0), zero_shot_set=True)
                if s.name == "zero_shot")  # fmt: skip
    result = rephrase_attack(method, model, classifier, "triangle", zero, num_inference_steps=STEPS)
    assert result.success.n == 2 and result.budget == {"generations": 2} and result.prompts == list(zero.prompts)


def test_prompt_search_runs_at_a_tiny_budget(erased):
    model, classifier, method, pairs = erased
    before = _hash(model)
    result = prompt_search(method, model, classifier, "triangle", pairs.targets, n_tokens=2, iterations=2,
                           candidates=2, num_inference_steps=STEPS)  # fmt: skip
    assert result.success.n == 2 and result.budget["generations_per_prompt"] == 5
    history = result.details["mean_best_probability"]
    assert len(history) == 3 and history == sorted(history)  # greedy: the best never gets worse
    assert all(p.endswith(t) and len(p.split()) == len(t.split()) + 2 for p, t in zip(result.prompts, pairs.targets))
    assert _hash(model) == before


def test_concept_inversion_runs_and_leaves_the_model_untouched(erased):
    model, classifier, method, _ = erased
    before = _hash(model)
    result = concept_inversion(method, model, classifier, "triangle", steps=2, batch=2, n_images=4, n_eval=2,
                               num_inference_steps=STEPS)  # fmt: skip
    assert result.success.n == 2 and len(result.details["losses"]) == 2
    assert all(" x " in p and "triangle" not in p for p in result.prompts)
    assert _hash(model) == before
    assert all(p.grad is None for p in model.pipeline.unet.parameters())  # only the token learned


def test_learned_token_replaces_one_embedding_while_active(conceptworld):
    pipe = conceptworld.pipeline
    ids = pipe.tokenizer(["a red x"], return_tensors="pt").input_ids
    token = pipe.tokenizer("x", add_special_tokens=False).input_ids[0]
    embedding = pipe.text_encoder.get_input_embeddings()
    plain = embedding(ids)
    vector = torch.full((plain.shape[-1],), 3.0)
    with learned_token(conceptworld, token, vector):
        patched = embedding(ids)
    where = ids[0] == token
    assert torch.equal(patched[0, where], vector.expand(int(where.sum()), -1))
    assert torch.equal(patched[0, ~where], plain[0, ~where]) and torch.equal(embedding(ids), plain)


def test_attacks_refuse_bad_budgets(erased):
    model, classifier, _, _ = erased
    with pytest.raises(ValueError, match="n_tokens"):
        prompt_search(Unerased(), model, classifier, "triangle", ["a triangle"], n_tokens=0)
    with pytest.raises(ValueError, match="one token"):
        concept_inversion(Unerased(), model, classifier, "triangle", placeholder="xqzv wordy")
