"""The evaluation harness on SDXL (`xl-tiny`, 64-pixel images, 2 steps): every baseline fits,
samples, changes the image and leaves the model bit-identical; the conditioning that SLD, ESD-x
and concept inversion build is the pipeline's own; the attacks run end to end."""

from __future__ import annotations

import copy

import pytest
import torch
from nnsight import DiffusionModel

from acterase_interp.erase import EraseOptions, PromptPairs
from acterase_interp.evaluation.attacks import concept_inversion, learned_token, prompt_search
from acterase_interp.evaluation.baselines import (
    FIA,
    SLD,
    UCE,
    ActErase,
    CASteer,
    ConceptPrune,
    ESDx,
    NegativePrompt,
    SLDConfig,
    Unerased,
    _decode,
    _text_states,
)
from acterase_interp.evaluation.conditioning import Conditioning, encode, encode_for_guidance
from acterase_interp.generation import generate
from acterase_interp.loading import GenerationDefaults, wrap
from acterase_interp.random_sd import build_random_sd

STEPS = 2
SIDE = 64  # pixels, as tests/test_sdxl.py: 8x8 latents
PROMPTS = ["a red circle on a plain background"]
PARTS = ("unet", "text_encoder", "text_encoder_2", "vae")


@pytest.fixture(scope="module")
def tiny() -> DiffusionModel:
    return wrap(build_random_sd("xl-tiny", seed=0, sample_size=SIDE // 8), GenerationDefaults(STEPS, 5.0))


@pytest.fixture(scope="module")
def pairs() -> PromptPairs:
    return PromptPairs("triangle", ["a red triangle on a plain background", "a blue triangle on a striped background"],
                       ["a red square on a plain background", "a blue square on a striped background"])  # fmt: skip


@pytest.fixture(scope="module")
def plain(tiny) -> torch.Tensor:
    return generate(tiny, PROMPTS, seeds=1000, progress=False)


def _weights(model) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v.clone() for part in PARTS for k, v in getattr(model.pipeline, part).state_dict().items()}


def _assert_unchanged(model, weights: dict[str, torch.Tensor], plain: torch.Tensor) -> None:
    now = _weights(model)
    assert now.keys() == weights.keys() and all(torch.equal(now[k], v) for k, v in weights.items())
    assert torch.equal(generate(model, PROMPTS, seeds=1000, progress=False), plain)


@pytest.mark.parametrize("make", [
    NegativePrompt, SLD, UCE, lambda: ConceptPrune(top_fraction=0.2, num_inference_steps=STEPS),
    lambda: ESDx(steps=2, batch=2, images_per_prompt=1, num_inference_steps=STEPS, lr=1e-2),
    lambda: ActErase(EraseOptions(num_inference_steps=STEPS), tau=0.5),
    lambda: FIA(r2=0.05, num_inference_steps=STEPS), lambda: CASteer(num_inference_steps=STEPS),
], ids=["negative_prompt", "sld", "uce", "concept_prune", "esd_x", "acterase", "fia", "casteer"])  # fmt: skip
def test_each_method_runs_on_sdxl_and_leaves_it_bit_identical(tiny, pairs, plain, make):
    weights = _weights(tiny)
    method = make().fit(tiny, pairs)
    with method.applied(tiny) as sample:
        erased = sample(PROMPTS, 1000)
    assert erased.shape == plain.shape == (1, 3, SIDE, SIDE) and erased.isfinite().all()
    assert (erased - plain).abs().max() > 1e-3  # it erased something
    _assert_unchanged(tiny, weights, plain)


def test_unerased_samples_what_generate_does(tiny, pairs, plain):
    with Unerased().fit(tiny, pairs).applied(tiny) as sample:
        assert torch.equal(sample(PROMPTS, 1000), plain)


def test_guidance_conditioning_is_what_the_pipeline_gives_its_unet(tiny):
    """Context, pooled embeddings and time ids of both guidance halves (SDXL base zeroes the
    unconditional one), as the UNet receives them in a pipeline call."""
    seen = []
    handle = tiny.pipeline.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    try:
        generate(tiny, PROMPTS, num_inference_steps=1, progress=False)
    finally:
        handle.remove()
    cond, uncond = encode_for_guidance(tiny, PROMPTS)
    want = Conditioning.cat([uncond, cond])
    got = seen[0]
    assert torch.equal(got["encoder_hidden_states"], want.states) and not uncond.states.any()
    assert got["added_cond_kwargs"].keys() == want.added.keys() == {"text_embeds", "time_ids"}
    assert all(torch.equal(got["added_cond_kwargs"][k], v) for k, v in want.added.items())
    assert want.added["time_ids"].tolist() == [[SIDE, SIDE, 0, 0, SIDE, SIDE]] * 2
    assert encode(tiny, PROMPTS, size=(32, 48)).added["time_ids"].tolist() == [[32, 48, 0, 0, 32, 48]]


def test_sld_without_safety_guidance_is_the_plain_sdxl_pipeline(tiny, pairs, plain):
    with SLD(SLDConfig(warmup_fraction=1.01)).fit(tiny, pairs).applied(tiny) as sample:  # guidance never starts
        assert torch.allclose(sample(PROMPTS, 1000), plain, atol=1e-5)


def test_sld_decodes_a_float16_sdxl_vae_in_float32(tiny):
    """As SDXL's pipeline does (`force_upcast`: it overflows in float16), then back to float16, exactly."""
    pipe, latents = tiny.pipeline, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).half()
    original, vae = pipe.vae, copy.deepcopy(pipe.vae).half()
    half = {k: v.clone() for k, v in vae.state_dict().items()}
    pipe.vae = vae  # a float16 copy: the fixture's VAE stays float32
    try:
        with torch.no_grad():
            images = _decode(tiny, latents)
    finally:
        pipe.vae = original
    assert vae.dtype == torch.float16 and all(torch.equal(v, half[k]) for k, v in vae.state_dict().items())
    with torch.no_grad():
        want = (vae.float().decode(latents.float() / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert torch.equal(images, want)


def test_uce_is_the_least_squares_map_of_target_onto_source_states_on_sdxl(tiny, pairs):
    """The context UCE edits is both encoders' states, concatenated (cross_attention_dim wide).
    Here 2 x 77 token states outnumber its 64 dimensions, so without preservation and with a
    vanishing ridge UCE is the least-squares solution of W c = W0 c* (SD 1.x's test: exact)."""
    uce = UCE(lam=1e-8, preserve_scale=0.0).fit(tiny, pairs)
    c, c_star = (_text_states(tiny, p).flatten(0, 1).double() for p in (pairs.targets, pairs.sources))
    assert c.shape == (2 * 77, tiny.pipeline.unet.config.cross_attention_dim) == (154, 64)
    params = dict(tiny.pipeline.unet.named_parameters())
    assert len(uce.edits_) == 2 * sum(n.endswith("attn2.to_k.weight") for n in params) == 140
    for name, w in uce.edits_.items():
        least_squares = torch.linalg.lstsq(c, c_star @ params[name].detach().double().T).solution.T
        assert torch.allclose(w.double(), least_squares, atol=1e-4 * w.abs().max().item()), name


def test_concept_prune_and_esd_edit_what_they_should_on_sdxl(tiny, pairs):
    prune = ConceptPrune(top_fraction=0.2, num_inference_steps=STEPS).fit(tiny, pairs)
    params = dict(tiny.pipeline.unet.named_parameters())
    assert len(prune.masks_) == 70 and prune.density_ > 0
    assert all(torch.equal(prune.edits_[f"{b}.ff.net.2.weight"], params[f"{b}.ff.net.2.weight"].detach() * ~m)
               for b, m in prune.masks_.items())  # fmt: skip
    units = ConceptPrune(top_fraction=0.2, rule="unit", num_inference_steps=STEPS).fit(tiny, pairs)
    assert sum(map(len, units.units_.values())) > 0
    assert all(not units.edits_[f"{b}.ff.net.2.weight"][:, u].any() for b, u in units.units_.items())
    esd = ESDx(steps=2, batch=2, images_per_prompt=1, num_inference_steps=STEPS).fit(tiny, pairs)
    assert esd.edits_ and all(".attn2." in n for n in esd.edits_) and len(esd.losses_) == 2


def test_prompt_search_runs_on_sdxl(tiny, classifier, pairs, plain):
    weights = _weights(tiny)
    result = prompt_search(UCE().fit(tiny, pairs), tiny, classifier, "triangle", pairs.targets[:1], n_tokens=1,
                           iterations=1, candidates=2)  # fmt: skip
    assert result.success.n == 1 and result.budget["generations_per_prompt"] == 3
    assert len(result.prompts[0].split()) == len(pairs.targets[0].split()) + 1
    _assert_unchanged(tiny, weights, plain)


def test_concept_inversion_learns_one_embedding_per_text_encoder(tiny, classifier, pairs, plain):
    weights = _weights(tiny)
    result = concept_inversion(UCE().fit(tiny, pairs), tiny, classifier, "triangle", steps=2, batch=2, n_images=2,
                               n_eval=1, lr=0.1)  # fmt: skip
    assert result.success.n == 1 and len(result.details["losses"]) == 2
    shift = result.details["embedding_shift"]
    assert shift.keys() == {"text_encoder", "text_encoder_2"} and all(v > 0 for v in shift.values())
    assert all(p.grad is None for part in PARTS for p in getattr(tiny.pipeline, part).parameters())
    _assert_unchanged(tiny, weights, plain)


def test_learned_token_on_the_second_encoder(tiny):
    pipe = tiny.pipeline
    ids = pipe.tokenizer_2(["a red x"], return_tensors="pt").input_ids
    token = pipe.tokenizer_2("x", add_special_tokens=False).input_ids[0]
    embedding = pipe.text_encoder_2.get_input_embeddings()
    plain, first = embedding(ids), pipe.text_encoder.get_input_embeddings()
    first_plain = first(ids)
    with learned_token(tiny, token, torch.full((plain.shape[-1],), 3.0), "text_encoder_2"):
        patched = embedding(ids)
        assert torch.equal(first(ids), first_plain)  # the other encoder's table is left alone
    where = ids[0] == token
    assert (patched[0, where] == 3).all() and torch.equal(patched[0, ~where], plain[0, ~where])
    with pytest.raises(ValueError, match="has no text_encoder_3"):
        with learned_token(tiny, token, plain[0, 0], "text_encoder_3"):
            pass
