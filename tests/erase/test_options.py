"""ActErase options, prompt pairs and the mask algebra (Eq. 5 and its combinations), without a model."""

from __future__ import annotations

import json

import pytest
import torch

from acterase_interp.erase import EraseOptions, PromptPairs
from acterase_interp.erase.masks import importance_mask, passes_threshold
from acterase_interp.erase.options import PAIR_COMBINES, TIME_MASKS


def test_defaults_are_the_papers_reading():
    o = EraseOptions()
    assert (o.site_kind, o.tau, o.tau_mode, o.granularity) == ("ffn_hidden", 0.01, "fraction", "unit")
    assert (o.time_mask, o.cfg_rows, o.blocks, o.pair_combine, o.value_mode) == ("union", "cond", None, "union", "mean")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(site_kind="attn3_out"), "site_kind='attn3_out'"),
        (dict(tau_mode="relative"), "tau_mode"),
        (dict(granularity="pixel"), "granularity"),
        (dict(time_mask="first"), "time_mask"),
        (dict(cfg_rows="uncond"), "cfg_rows"),
        (dict(pair_combine="sum"), "pair_combine"),
        (dict(value_mode="median"), "value_mode"),
        (dict(tau=0.0), r"outside \(0, 1\]"),
        (dict(tau=1.5), r"outside \(0, 1\]"),
        (dict(tau=-0.1, tau_mode="absolute"), ">= 0"),
        (dict(blocks=()), "selects nothing"),
        (dict(num_inference_steps=0), "at least 1"),
        (dict(guidance_scale=-1.0), ">= 0"),
    ],
)
def test_bad_options_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EraseOptions(**kwargs)


def test_tau_ranges_and_types():
    assert EraseOptions(tau=1.0).tau == 1.0
    assert EraseOptions(tau=0.0, tau_mode="absolute").tau == 0.0
    assert EraseOptions(tau=3.0, tau_mode="absolute").tau == 3.0
    with pytest.raises(TypeError, match="tau must be a number"):
        EraseOptions(tau="0.1")


def test_blocks_become_a_tuple_and_options_round_trip():
    assert EraseOptions(blocks="mid").blocks == ("mid",)
    o = EraseOptions(blocks=["down", "up.1.0"], tau=0.02, time_mask="per_step")
    assert o.blocks == ("down", "up.1.0")
    assert EraseOptions.from_dict(json.loads(json.dumps(o.to_dict()))) == o


# -- prompt pairs ---------------------------------------------------------------------------------


def _pairs(**kw) -> PromptPairs:
    base = dict(concept="triangle", targets=["a red triangle", "a blue triangle"],
                sources=["a red circle", "a blue star"])  # fmt: skip
    return PromptPairs(**{**base, **kw})


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(sources=["a red circle"]), ValueError, "2 targets but 1 sources"),
        (dict(targets=[], sources=[]), ValueError, "no prompt pairs"),
        (dict(sources=["a red circle", "  "]), ValueError, r"sources\[1\] is an empty prompt"),
        (dict(heldout=[""]), ValueError, r"heldout\[0\] is an empty prompt"),
        (dict(targets="a red triangle"), TypeError, "not one string"),
        (dict(targets=["a red triangle", 3]), TypeError, r"targets\[1\] must be a string"),
        (dict(concept=""), ValueError, "concept"),
    ],
)
def test_bad_pairs_are_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        _pairs(**kwargs)


def test_pairs_iterate_and_round_trip(tmp_path):
    pairs = _pairs(heldout=["a red wedge"], non_target=["a green square"], meta={"author": "test"})
    assert len(pairs) == 2 and list(pairs) == [("a red triangle", "a red circle"), ("a blue triangle", "a blue star")]
    pairs.save(tmp_path / "p.json")
    assert PromptPairs.load(tmp_path / "p.json") == pairs
    assert isinstance(PromptPairs.load(tmp_path / "p.json").targets, tuple)


def test_pairs_load_by_name_from_the_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTERASE_DATA", str(tmp_path))
    _pairs().save(tmp_path / "prompts" / "mine.json")
    assert PromptPairs.load("mine") == _pairs()
    assert PromptPairs.load("conceptworld_heart").concept == "heart"  # the shipped pairs stay visible
    with pytest.raises(FileNotFoundError, match=r"no prompt pairs named 'other'.*known: \[.*'conceptworld_heart'.*'mine'"):
        PromptPairs.load("other")
    with pytest.raises(FileNotFoundError, match="no prompt pairs file"):
        PromptPairs.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"concept": "x", "targets": ["a"], "sources": ["b"], "extra": 1}))
    with pytest.raises(ValueError, match="unknown field"):
        PromptPairs.load(tmp_path / "bad.json")


# -- Eq. 5 and the combination rules ------------------------------------------------------------


def test_fraction_threshold_keeps_the_top_share_per_pair_and_step():
    scores = torch.rand(3, 4, 100)
    passed = passes_threshold(scores, 0.05, "fraction")
    assert passed.sum(-1).eq(5).all()  # ceil(0.05 * 100) units per (pair, step), no ties in random floats
    top = scores.topk(5, dim=-1).indices
    assert passed.gather(-1, top).all()
    assert passes_threshold(scores, 0.001, "fraction").sum(-1).eq(1).all()  # at least one unit
    assert passes_threshold(scores, 1.0, "fraction").all()
    assert passes_threshold(torch.rand(2, 3, 10), 0.3, "fraction").sum(-1).eq(3).all()  # 0.3 * 10 is 3, not 4


def test_fraction_threshold_over_token_unit_entries():
    scores = torch.rand(2, 3, 8, 50)  # (pair, step, token, unit): the share is of all 400 entries
    assert passes_threshold(scores, 0.1, "fraction").flatten(2).sum(-1).eq(40).all()


def test_absolute_threshold_is_on_scores_divided_by_the_layer_max():
    scores = torch.tensor([[[1.0, 2.0, 4.0, 8.0]], [[0.0, 0.0, 0.0, 0.0]]])
    assert passes_threshold(scores, 0.25, "absolute").tolist() == [[[False, True, True, True]], [[False] * 4]]
    assert passes_threshold(scores, 0.0, "absolute").all()  # a silent layer scores 0, not NaN
    assert passes_threshold(scores * 1000, 0.25, "absolute").equal(passes_threshold(scores, 0.25, "absolute"))
    assert not passes_threshold(scores[:1], 1.01, "absolute").any()


def _mask(source, target, **kw):
    return importance_mask(source, target, EraseOptions(tau=1.0, **kw))


def test_eq5_needs_the_target_to_matter_more():
    source = torch.tensor([[[1.0, 2.0, 3.0]]])
    target = torch.tensor([[[2.0, 2.0, 1.0]]])
    assert _mask(source, target).tolist() == [[[True, False, False]]]  # tau=1: only I_s < I_t decides
    strict = EraseOptions(tau=0.5, tau_mode="absolute")  # only units at >= half the layer's top source score
    assert importance_mask(source, target, strict).tolist() == [[[False, False, False]]]


def test_time_and_pair_combinations():
    # (pair=3, step=3, unit=4): on[p, s, u] says where Eq. 5 holds (tau=1 keeps every unit)
    on = torch.tensor(
        [
            [[1, 0, 0, 1], [1, 0, 1, 0], [0, 0, 1, 1]],
            [[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 1]],
            [[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]],
        ],
        dtype=torch.bool,
    )
    source = torch.ones(3, 3, 4)
    target = source + on.float()
    union_t = on.any(1)  # per pair over time
    assert _mask(source, target).view(-1).tolist() == union_t.any(0).tolist()
    assert _mask(source, target, time_mask="last").view(-1).tolist() == on[:, -1].any(0).tolist()
    majority_t = on.sum(1) >= 2
    assert _mask(source, target, time_mask="majority").view(-1).tolist() == majority_t.any(0).tolist()
    assert _mask(source, target, pair_combine="intersection").view(-1).tolist() == union_t.all(0).tolist()
    assert _mask(source, target, pair_combine="majority").view(-1).tolist() == (union_t.sum(0) >= 2).tolist()
    per_step = _mask(source, target, time_mask="per_step")
    assert per_step.shape == (3, 1, 4) and per_step[:, 0].tolist() == on.any(0).tolist()


def test_token_unit_masks_keep_the_token_axis():
    source = torch.rand(2, 3, 5, 7)
    target = source + torch.randn(2, 3, 5, 7)
    mask = importance_mask(source, target, EraseOptions(tau=0.5, granularity="token_unit"))
    assert mask.shape == (1, 5, 7)
    assert mask.equal((passes_threshold(source, 0.5, "fraction") & (source < target)).any(1).any(0).unsqueeze(0))


def _reference_mask(source, target, options):
    """Eq. 5 as first written: a top-k cut per (pair, step), then boolean combinations."""
    import math

    flat = source.flatten(2)
    if options.tau_mode == "fraction":
        k = max(1, math.ceil(options.tau * flat.shape[-1] - 1e-9))
        passes = (flat >= flat.topk(k, dim=-1).values[..., -1:]).view_as(source)
    else:
        top = flat.amax(dim=-1, keepdim=True)
        passes = (torch.where(top > 0, flat / top, torch.zeros_like(flat)) >= options.tau).view_as(source)
    rules = {"union": lambda m, d: m.any(d), "intersection": lambda m, d: m.all(d),
             "majority": lambda m, d: m.sum(d) * 2 > m.shape[d], "last": lambda m, d: m.select(d, -1)}  # fmt: skip
    masks = passes & (source < target)
    if options.time_mask != "per_step":
        masks = rules[options.time_mask](masks, 1).unsqueeze(1)
    mask = rules[options.pair_combine](masks, 0)
    return mask if mask.ndim == 3 else mask.unsqueeze(1)


@pytest.mark.parametrize("tau_mode", ["fraction", "absolute"])
@pytest.mark.parametrize("time_mask", TIME_MASKS)
@pytest.mark.parametrize("pair_combine", PAIR_COMBINES)
def test_levels_computed_once_give_the_reference_mask_at_every_tau(tau_mode, time_mask, pair_combine):
    """Re-thresholding reads levels computed once per fit; at every tau, granularity and rule they
    give the top-k mask bit for bit, ties at the cut included (scores drawn from few values)."""
    from acterase_interp.erase.masks import mask_levels

    g = torch.Generator().manual_seed(0)
    for shape in [(4, 5, 40), (3, 4, 6, 10)]:  # (pair, step, unit) and (pair, step, token, unit)
        source = torch.randint(0, 6, shape, generator=g).float() / 5
        target = torch.randint(0, 6, shape, generator=g).float() / 5
        levels = mask_levels(source, target, tau_mode, time_mask, pair_combine)
        for tau in (0.01, 0.05, 0.1, 0.25, 0.3, 0.5, 0.8, 1.0):
            options = EraseOptions(tau=tau, tau_mode=tau_mode, time_mask=time_mask, pair_combine=pair_combine)
            expected = _reference_mask(source, target, options)
            assert torch.equal(importance_mask(source, target, options, levels), expected)
            assert torch.equal(importance_mask(source, target, options), expected)
