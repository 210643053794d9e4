"""ConceptPrune's reference rule, FIA and CASteer against hand computations: the selection rules on
tiny weights with known answers, then on ConceptWorld against activations read by a plain forward
hook, written here independently of `evaluation.method.read_sites`."""

import math

import pytest
import torch

from acterase_interp.evaluation.baselines import FIA, CASteer, ConceptPrune
from acterase_interp.evaluation.core import image_seeds
from acterase_interp.evaluation.pruning import (
    concept_prune_mask,
    fia_concept_mask,
    fia_contrast,
    fia_fuse,
    fia_sensitivity,
    unit_mask,
)
from acterase_interp.evaluation.steering import steer_away, steering_vectors
from acterase_interp.generation import generate
from acterase_interp.world.pairs import conceptworld_pairs

STEPS = 2
W = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])


def test_concept_prune_weight_rule_by_hand():
    """k = int(0.5 * 4) = 2 per output row. Step 0: row 0's top target scores are columns 2, 3
    (3, 4), of which only column 2 beats the source (3 > 0; 4 > 8 fails); row 1's are columns 0, 1
    (4, 3 > 0). Step 1: row 0 {2, 3} (3, 1.2) and row 1 {1, 2} (0.6, 2) beat no source (3, 4; 3, 2)."""
    target = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.1, 0.2, 1.0, 0.3]])
    source = torch.tensor([[0.0, 0.0, 0.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    want = torch.tensor([[False, False, True, False], [True, True, False, False]])
    assert torch.equal(concept_prune_mask(-W, target, source, top_fraction=0.5), want)  # |W|: signs do not matter
    assert not concept_prune_mask(W, target, source, 0.5, select_ratio=0.5).any()  # each was skilled at 1 of 2 steps
    assert not concept_prune_mask(W, target, source, 0.2).any()  # int(0.2 * 4) = 0 weights per row, as the reference


def test_unit_rule_by_hand():
    """Column sums of |W| are all 5, so unit scores are 5 * a; k = round(0.25 * 4) = 1."""
    target = torch.tensor([[0.0, 0.0, 1.0, 0.5], [0.0, 0.0, 1.0, 0.5]])
    source = torch.tensor([[0.0, 0.0, 0.5, 1.0], [0.0, 0.0, 1.0, 0.0]])
    assert unit_mask(W, target, source, 0.25, min_step_fraction=0.5).tolist() == [False, False, True, False]
    assert not unit_mask(W, target, source, 0.25, min_step_fraction=1.0).any()  # top on the sources at step 1


def test_fia_rules_by_hand():
    # Eq. 2: mu_c = (2, 4, 0), mu_b = (1, 1.5, 1), sigma_b = (0, 0.5, 0)
    concept = torch.tensor([[[1.0, 3.0, 0.0], [3.0, 5.0, 0.0]]])
    base = torch.tensor([[[1.0, 1.0, 1.0], [1.0, 2.0, 1.0]]])
    assert fia_contrast(concept, base).tolist() == [[1.0, 2.0, 0.0]]
    # Eq. 3 with W = [[1, 2, 3], [3, 2, 1]]: S_0 = [[1, 4, 0], [3, 4, 0]], S_1 = [[0, 2, 3], [0, 2, 1]];
    # k = int(0.5 * 6) = 3, so tau_0 = 3 (S_0 > 3 at (0,1), (1,1)), tau_1 = 2 (S_1 > 2 at (0,2));
    # strength / its max 3 = [[1/6, 1, 1/2], [1/2, 1, 1/6]], frequency = [[0, 1/2, 1/2], [0, 1/2, 0]]
    w = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    a = fia_sensitivity(w, torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0]]), r1=0.5)
    assert torch.allclose(a, torch.tensor([[1 / 12, 3 / 4, 1 / 2], [1 / 4, 3 / 4, 1 / 12]], dtype=a.dtype))
    # Eq. 4-6, r2 = 0.5: the row top int(1.5) = 1 is column 1 in both rows; the layer top int(3) = 3
    # adds (0, 2), which no row keeps
    assert fia_concept_mask(a, 0.5).tolist() == [[False, True, False], [False, True, False]]
    assert not fia_concept_mask(torch.zeros(2, 3), 0.5).any()  # no contrast: nothing, not arbitrary ties
    # Eq. 8: tau_ca = ceil(0.6 * 3) = 2, so weights of exactly one concept are pruned, of two or three kept
    masks = [torch.tensor([True, True, True, False]), torch.tensor([False, True, True, False]),
             torch.tensor([False, False, True, False])]  # fmt: skip
    assert fia_fuse(masks, 0.6).tolist() == [True, False, False, False]
    assert math.ceil(0.6 * 3) == 2 and fia_fuse(masks[:1], 0.6).tolist() == [True, True, True, False]  # one concept


def test_casteer_rules_by_hand():
    assert torch.allclose(steering_vectors(torch.tensor([[3.0, 4.0]]), torch.zeros(1, 2)), torch.tensor([[0.6, 0.8]]))
    v = torch.tensor([1.0, 0.0])
    x = torch.tensor([[2.0, 1.0], [-1.0, 3.0], [0.0, 0.5]])
    # beta 2: <x, v> = 2 -> (2, 1) - 4 v = (-2, 1), norm kept; <x, v> <= 0: absent, returned exactly
    assert torch.equal(steer_away(x, v, 2.0), torch.tensor([[-2.0, 1.0], [-1.0, 3.0], [0.0, 0.5]]))
    # beta 1: (3, 4) -> (0, 4), rescaled to norm 5
    assert torch.allclose(steer_away(torch.tensor([[3.0, 4.0]]), v, 1.0), torch.tensor([[0.0, 5.0]]))


@pytest.fixture(scope="module")
def setup(conceptworld):
    return conceptworld, conceptworld_pairs("triangle", n=2)


def _calls(model, module, prompts, output: bool):
    """Every call's input (or output) of `module` while the model samples `prompts` in one batch."""
    seen = []
    hook = (module.register_forward_hook(lambda m, a, o: seen.append(o.detach().float())) if output
            else module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().float())))  # fmt: skip
    try:
        generate(model, prompts, seeds=image_seeds("fit", len(prompts)), num_inference_steps=STEPS,
                 batch_size=len(prompts), progress=False)  # fmt: skip
    finally:
        hook.remove()
    assert len(seen) == STEPS
    return seen


def test_concept_prune_on_conceptworld_is_the_reference_rule(setup):
    """Every row of the UNet batch (both guidance halves) normalised, column norms per step, the
    rule of wanda.py / save_union_over_time.py: the edit zeroes exactly those weights."""
    model, pairs = setup
    prune = ConceptPrune(top_fraction=0.05, num_inference_steps=STEPS).fit(model, pairs)
    block = "up_blocks.1.attentions.0.transformer_blocks.0"
    layer = model.pipeline.unet.get_submodule(f"{block}.ff.net.2")
    norms = []
    for prompts in (pairs.targets, pairs.sources):
        rows = [torch.nn.functional.normalize(x.reshape(-1, x.shape[-1]), dim=1) for x in _calls(model, layer, prompts, False)]
        norms.append(torch.stack([r.norm(dim=0) for r in rows]).double())
    w = layer.weight.detach().abs().double()
    k, want = int(0.05 * w.shape[1]), torch.zeros_like(w, dtype=torch.bool)
    for t in range(STEPS):
        for i in range(w.shape[0]):
            top = sorted(range(w.shape[1]), key=lambda j: -(w[i, j] * norms[0][t, j]).item())[:k]
            for j in top:
                want[i, j] |= bool(w[i, j] * norms[0][t, j] > w[i, j] * norms[1][t, j])
    assert torch.equal(prune.masks_[block], want) and want.any()
    assert torch.equal(prune.edits_[f"{block}.ff.net.2.weight"], layer.weight.detach() * ~want)
    assert 0 < prune.density_ < 1 and len(prune.units_) == len(prune.masks_)


def test_concept_prune_first_steps_counts_steps(setup):
    model, pairs = setup
    one = ConceptPrune(top_fraction=0.05, first_steps=1, num_inference_steps=STEPS).fit(model, pairs)
    both = ConceptPrune(top_fraction=0.05, num_inference_steps=STEPS).fit(model, pairs)
    assert all((one.masks_[b] <= both.masks_[b]).all() for b in one.masks_)  # the union over fewer steps
    assert sum(int(m.sum()) for m in one.masks_.values()) < sum(int(m.sum()) for m in both.masks_.values())


def test_casteer_vectors_on_conceptworld_are_the_reference_rule(setup):
    """Per step: the conditional half's attn2 output averaged over images and tokens, targets minus
    sources, normalised (compute_steering_vectors.py)."""
    model, pairs = setup
    method = CASteer(num_inference_steps=STEPS).fit(model, pairs)
    attn = model.pipeline.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn2")
    means = [torch.stack([x[len(x) // 2:].mean((0, 1)) for x in _calls(model, attn, p, True)]).double()
             for p in (pairs.targets, pairs.sources)]  # fmt: skip
    diff = means[0] - means[1]
    assert torch.allclose(method.vectors_["mid.0.attn2_out"], diff / diff.norm(dim=-1, keepdim=True), atol=1e-6)
    assert len(method.vectors_) == sum(n.endswith("attn2") for n, _ in model.pipeline.unet.named_modules())


def test_fia_with_its_own_concept_again_keeps_everything(setup):
    """Two identical concepts: every selected weight is in both masks, s = 2 >= ceil(0.6 * 2), so
    all are concept-agnostic and kept; alone, the same concept prunes its mask."""
    model, pairs = setup
    alone = FIA(r2=0.05, num_inference_steps=STEPS).fit(model, pairs)
    twice = FIA(r2=0.05, also=[pairs], num_inference_steps=STEPS).fit(model, pairs)
    assert alone.density_ > 0 and twice.density_ == 0
    params = dict(model.pipeline.unet.named_parameters())
    assert all(torch.equal(v, params[n].detach()) for n, v in twice.edits_.items())


def test_bad_peer_settings_are_refused():
    with pytest.raises(ValueError, match="rule"):
        ConceptPrune(rule="neuron")
    with pytest.raises(ValueError, match="r1, r2 and alpha"):
        FIA(alpha=0)
    with pytest.raises(ValueError, match="beta"):
        CASteer(beta=0)
