"""Baselines at tiny budgets on ConceptWorld: each erases inside `applied` and leaves the model
bit-identical after it; the closed-form and pruning edits have the structure their papers define."""

import pytest
import torch

from acterase_interp.demo import weights_hash
from acterase_interp.erase.options import EraseOptions
from acterase_interp.evaluation.baselines import (
    FIA,
    METHODS,
    SLD,
    UCE,
    ActErase,
    CASteer,
    ConceptPrune,
    ESDx,
    NegativePrompt,
    SLDConfig,
    Unerased,
    _text_states,
)
from acterase_interp.generation import generate
from acterase_interp.world.pairs import conceptworld_pairs

STEPS = 2


@pytest.fixture(scope="module")
def setup(conceptworld):
    pairs = conceptworld_pairs("triangle", n=2)
    prompts = list(pairs.heldout[:1] + pairs.non_target[:1])
    plain = generate(conceptworld, prompts, seeds=1000, num_inference_steps=STEPS, progress=False)
    return conceptworld, pairs, prompts, plain


def _hash(model):
    p = model.pipeline
    return weights_hash(p.unet, p.text_encoder, p.vae)


@pytest.mark.parametrize("make", [
    lambda: NegativePrompt(), lambda: SLD(), lambda: UCE(), lambda: ConceptPrune(top_fraction=0.2, num_inference_steps=STEPS),
    lambda: ESDx(steps=2, batch=2, images_per_prompt=1, num_inference_steps=STEPS, lr=1e-2),
    lambda: ActErase(EraseOptions(num_inference_steps=STEPS), tau=0.5),
    lambda: ConceptPrune(top_fraction=0.2, rule="unit", num_inference_steps=STEPS),
    lambda: FIA(r2=0.05, num_inference_steps=STEPS), lambda: CASteer(num_inference_steps=STEPS),
], ids=["negative_prompt", "sld", "uce", "concept_prune", "esd_x", "acterase", "concept_prune_unit", "fia",
        "casteer"])  # fmt: skip
def test_each_method_erases_inside_and_leaves_the_model_bit_identical(setup, make):
    model, pairs, prompts, plain = setup
    before = _hash(model)
    method = make().fit(model, pairs)
    assert method.fit_seconds_ is not None and method.name in METHODS and method.describe()["name"] == method.name
    assert _hash(model) == before  # fitting touched nothing
    with method.applied(model) as sample:
        erased = sample(prompts, 1000, num_inference_steps=STEPS)
    assert erased.shape == plain.shape and not torch.equal(erased, plain)  # it did something
    assert _hash(model) == before  # and undid it
    assert torch.equal(generate(model, prompts, seeds=1000, num_inference_steps=STEPS, progress=False), plain)


def test_unerased_samples_what_generate_does(setup):
    model, pairs, prompts, plain = setup
    with Unerased().fit(model, pairs).applied(model) as sample:
        assert torch.equal(sample(prompts, 1000, num_inference_steps=STEPS), plain)


def test_sld_without_safety_guidance_is_the_plain_pipeline(setup):
    model, pairs, prompts, plain = setup
    with SLD(SLDConfig(warmup_fraction=1.01)).fit(model, pairs).applied(model) as sample:  # guidance never starts
        assert torch.allclose(sample(prompts, 1000, num_inference_steps=STEPS), plain, atol=1e-5)


def test_weight_edits_are_undone_on_an_exception(setup):
    model, pairs, _, _ = setup
    before = _hash(model)
    method = UCE().fit(model, pairs)
    with pytest.raises(RuntimeError, match="boom"), method.applied(model):
        assert _hash(model) != before
        raise RuntimeError("boom")
    assert _hash(model) == before


def test_uce_maps_target_states_onto_source_states(setup):
    """Without preservation and with a vanishing ridge, UCE solves W c = W0 c* exactly (fewer
    token states than the text width: the system is underdetermined)."""
    model, pairs, _, _ = setup
    uce = UCE(lam=1e-8, preserve_scale=0.0).fit(model, pairs)
    c = _text_states(model, pairs.targets).flatten(0, 1)
    c_star = _text_states(model, pairs.sources).flatten(0, 1)
    params = dict(model.pipeline.unet.named_parameters())
    assert len(uce.edits_) == 2 * sum(n.endswith("attn2.to_k.weight") for n in params)
    for name, w in uce.edits_.items():
        want = c_star @ params[name].detach().T
        assert torch.allclose(c @ w.T, want, atol=1e-3 * want.abs().max().item()), name


def test_concept_prune_unit_rule_zeroes_only_the_chosen_units(setup):
    model, pairs, _, _ = setup
    prune = ConceptPrune(top_fraction=0.2, rule="unit", num_inference_steps=STEPS).fit(model, pairs)
    params = dict(model.pipeline.unet.named_parameters())
    assert sum(map(len, prune.units_.values())) > 0
    for block, units in prune.units_.items():
        new, old = prune.edits_[f"{block}.ff.net.2.weight"], params[f"{block}.ff.net.2.weight"].detach()
        keep = torch.ones(old.shape[1], dtype=torch.bool)
        keep[units] = False
        assert torch.equal(new[:, keep], old[:, keep]) and not new[:, ~keep].any()


def test_esd_trains_only_cross_attention(setup):
    model, pairs, _, _ = setup
    esd = ESDx(steps=2, batch=2, images_per_prompt=1, num_inference_steps=STEPS).fit(model, pairs)
    assert esd.edits_ and all(".attn2." in n for n in esd.edits_) and len(esd.losses_) == 2


def test_bad_settings_are_refused(setup):
    model, pairs, _, _ = setup
    with pytest.raises(ValueError, match="top_fraction"):
        ConceptPrune(top_fraction=0)
    with pytest.raises(ValueError, match="steps"):
        ESDx(steps=0)
    with pytest.raises(ValueError, match="shows_concept"):
        ActErase(EraseOptions(num_inference_steps=STEPS)).fit(model, pairs)


def test_acterase_chooses_tau_on_the_fit_targets(setup):
    """tau="auto" (the table's default) runs `choose_tau` on the fit's statistics."""
    model, pairs, _, _ = setup
    method = ActErase(EraseOptions(num_inference_steps=STEPS), tau="auto",
                      shows_concept=lambda images, concept: torch.ones(len(images), dtype=torch.bool)).fit(model, pairs)
    assert method.chosen_tau_ is None  # a reader that always sees the concept: no tau passes, the largest is kept
    assert method.eraser_.mask_density()
    assert 0 < method.describe()["tau_search_s"] < method.fit_seconds_  # the time to erase, with and without the search
