"""Fitting ActErase on ConceptWorld: the source trajectory, the statistics against independent
recordings, re-thresholding, the cross-attention identity, and clear errors."""

from __future__ import annotations

import nnsight
import pytest
import torch

from acterase_interp import load
from acterase_interp.erase import EraseOptions, Eraser, EraserFitter, FitStatistics, PromptPairs
from acterase_interp.erase import fit as fit_module
from acterase_interp.erase.fit import follow_source
from acterase_interp.generation import generate
from acterase_interp.patching import read_in_trace, write_in_trace
from acterase_interp.sites import reader_weight_norm, select_sites
from acterase_interp.world.pairs import conceptworld_pairs

STEPS = 4


@pytest.fixture(scope="module")
def pairs() -> PromptPairs:
    return conceptworld_pairs("triangle", n=2, seed=0)


@pytest.fixture(scope="module")
def fitter(conceptworld, pairs) -> EraserFitter:
    options = EraseOptions(num_inference_steps=STEPS, tau=0.05, granularity="token_unit")
    f = EraserFitter(conceptworld, options, restorable=True, progress=False)
    f.fit(pairs)
    return f


def _alone(model, prompt: str, seed: int, module_path: str) -> torch.Tensor:
    """The input of `module_path` at every step when `prompt` is generated on its own:
    (step, CFG rows [uncond, cond], tokens, units)."""
    seen = []
    module = model.pipeline.unet.get_submodule(module_path)
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        generate(model, [prompt], seeds=seed, num_inference_steps=STEPS, progress=False)
    finally:
        handle.remove()
    return torch.stack(seen)


def test_follow_source_copies_source_rows_within_each_cfg_half():
    out = torch.arange(4.0).view(4, 1).expand(4, 3)  # rows: uncond_s, uncond_t, cond_s, cond_t
    assert follow_source(out)[:, 0].tolist() == [0.0, 0.0, 2.0, 2.0]
    assert follow_source(out[:2])[:, 0].tolist() == [0.0, 0.0]


def test_statistics_shapes_and_provenance(fitter, pairs, conceptworld):
    st = fitter.statistics
    assert [s.kind for s in st.sites] == ["ffn_hidden"] * 7
    assert st.num_pairs == 2 and st.num_steps == STEPS and st.seeds == (0, 1)
    assert st.pairs == pairs and st.scheduler == type(conceptworld.pipeline.scheduler).__name__
    scheduler = type(conceptworld.pipeline.scheduler).from_config(conceptworld.pipeline.scheduler.config)
    scheduler.set_timesteps(STEPS)
    assert st.timesteps == tuple(float(t) for t in scheduler.timesteps)
    for s in st.sites:
        tokens, units = s.shape
        assert st.importance_source[s.name].shape == (2, STEPS, units) == st.importance_target[s.name].shape
        assert st.token_importance_source[s.name].shape == (2, STEPS, tokens, units)
        assert st.values[s.name].shape == (1, tokens, units) == st.target_values[s.name].shape
        # the same target activations, summed two ways: mean over tokens of x_t-bar = mean over pairs of m_t
        torch.testing.assert_close(st.target_values[s.name][0].mean(0), st.mean_target[s.name].mean(0))
        assert st.mean_source[s.name].shape == (2, units) == st.mean_target[s.name].shape
        assert all(t.isfinite().all() for t in (st.importance_source[s.name], st.values[s.name]))


def test_fit_follows_the_source_trajectory(fitter, pairs, conceptworld):
    """The fit's source statistics equal those of the source prompt generated alone (up to
    batched-float rounding); its target statistics equal the target prompt's own only at step 0,
    where both runs share the latent."""
    st = fitter.statistics
    site = st.sites[3]
    norm = reader_weight_norm(conceptworld.pipeline.unet, site)
    close = dict(rtol=1e-3, atol=1e-4)  # a batch of one vs the fit's batch of two: rounding grows over steps
    values = []
    for p, (target, source) in enumerate(pairs):
        src = _alone(conceptworld, source, st.seeds[p], site.module_path)[:, 1]  # cond rows
        tgt = _alone(conceptworld, target, st.seeds[p], site.module_path)[:, 1]
        torch.testing.assert_close(st.importance_source[site.name][p], (src.abs() * norm).mean(1), **close)
        torch.testing.assert_close(st.token_importance_source[site.name][p], src.abs() * norm, **close)
        torch.testing.assert_close(st.mean_source[site.name][p], src.mean(dim=(0, 1)), **close)
        torch.testing.assert_close(st.importance_target[site.name][p, 0], (tgt[0].abs() * norm).mean(0), **close)
        own_last = (tgt[-1].abs() * norm).mean(0)  # the target's own trajectory has moved away by the last step
        assert not torch.allclose(st.importance_target[site.name][p, -1], own_last, **close)
        values.append(src.mean(0))
    torch.testing.assert_close(st.values[site.name][0], torch.stack(values).mean(0), **close)


def test_the_trajectory_check_catches_a_drifting_target(conceptworld, monkeypatch):
    monkeypatch.setattr(fit_module, "follow_source", lambda output: output)  # let the target row drift
    f = EraserFitter(conceptworld, EraseOptions(num_inference_steps=2), progress=False)
    with pytest.raises(RuntimeError, match="at step 1 the target latent differs from the source latent"):
        f.update("a red triangle on a plain background", "a red circle on a plain background")


def test_rethresholding_equals_a_fresh_fit(fitter, pairs, conceptworld):
    for options in (
        dict(tau=0.2),
        dict(tau=0.5, tau_mode="absolute", time_mask="majority", pair_combine="intersection"),
        dict(tau=0.1, time_mask="per_step"),
    ):
        fresh = EraserFitter(conceptworld, EraseOptions(num_inference_steps=STEPS, **options), progress=False)
        fresh = fresh.fit(pairs)
        stored = fitter.statistics.eraser(granularity="unit", **options)
        assert fresh.masks.keys() == stored.masks.keys()
        for name in fresh.masks:
            assert torch.equal(fresh.masks[name], stored.masks[name]), (options, name)
            assert torch.equal(fresh.values[name], stored.values[name])
        assert fresh.manifest["options"] == stored.manifest["options"]
    assert any(m.any() and not m.all() for m in fitter.statistics.eraser(tau=0.2, granularity="unit").masks.values())


def test_stored_options_shape_the_masks(fitter):
    st = fitter.statistics
    union, last = st.eraser(granularity="unit"), st.eraser(granularity="unit", time_mask="last")
    per_step = st.eraser(granularity="unit", time_mask="per_step")
    inter = st.eraser(granularity="unit", pair_combine="intersection")
    tokens = st.eraser()  # the fit's own granularity: token_unit
    for s in st.sites:
        n = s.name
        assert union.masks[n].shape == (1, 1, s.shape[1]) and per_step.masks[n].shape == (STEPS, 1, s.shape[1])
        assert tokens.masks[n].shape == (1, *s.shape)
        assert not (last.masks[n] & ~union.masks[n]).any() and not (inter.masks[n] & ~union.masks[n]).any()
        assert torch.equal(per_step.masks[n].any(0, keepdim=True), union.masks[n])
    sub = st.eraser(blocks=["up.1", "mid"])
    assert [s.name for s in sub.sites] == ["mid.0.ffn_hidden", "up.1.0.ffn_hidden", "up.1.1.ffn_hidden"]
    with pytest.raises(ValueError, match="not all among the fitted blocks"):
        fitter.statistics.eraser(blocks=["down.3"])
    with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
        st.eraser(tau=2.0)


def test_token_unit_masks_need_token_unit_statistics(conceptworld):
    f = EraserFitter(conceptworld, EraseOptions(num_inference_steps=2, blocks=["mid"]), progress=False)
    f.update("a red triangle", "a red circle")
    with pytest.raises(ValueError, match="needs a fit with granularity='token_unit'"):
        f.statistics.eraser(granularity="token_unit")


def test_cfg_rows_both_halves_the_difference(fitter, pairs, conceptworld):
    """The unconditional rows see the same latent and the same empty prompt for source and target,
    so averaging them in halves every target-minus-source difference."""
    both = EraserFitter(conceptworld, EraseOptions(num_inference_steps=STEPS, cfg_rows="both"), progress=False)
    both.update(*next(iter(pairs)), seed=0)
    cond, st = fitter.statistics, both.statistics
    for s in st.sites:
        d_cond = cond.importance_target[s.name][0] - cond.importance_source[s.name][0]
        d_both = st.importance_target[s.name][0] - st.importance_source[s.name][0]
        torch.testing.assert_close(d_both, d_cond / 2, rtol=1e-4, atol=1e-5)
        v_cond = (cond.mean_target[s.name] - cond.mean_source[s.name])[:1]
        v_both = st.mean_target[s.name] - st.mean_source[s.name]
        torch.testing.assert_close(v_both, v_cond / 2, rtol=1e-4, atol=1e-5)


def test_difference_accessors(fitter):
    st = fitter.statistics
    diff, vectors = st.difference(), st.difference_vectors()
    for s in st.sites:
        source, target = st.importance_source[s.name], st.importance_target[s.name]
        expected = (target - source).abs().mean(dim=(0, 2)) / source.mean(dim=(0, 2))
        torch.testing.assert_close(diff[s.name], expected)
        assert diff[s.name].shape == (STEPS,) and (diff[s.name] >= 0).all()
        assert torch.equal(vectors[s.name], st.mean_target[s.name] - st.mean_source[s.name])


def test_statistics_memory_estimate_is_exact(fitter):
    stored = sum(t.numel() * t.element_size() for d in fitter._scores.values() for ts in d.values() for t in ts)
    stored += sum(t.numel() * t.element_size() for sums in (fitter._value_sum, fitter._target_value_sum)
                  for t in sums.values())  # fmt: skip
    assert fitter.statistics_bytes(2) == stored


def test_statistics_over_budget_are_refused(conceptworld, pairs):
    options = EraseOptions(num_inference_steps=STEPS, granularity="token_unit")
    f = EraserFitter(conceptworld, options, max_statistics_gb=1e-4, progress=False)
    with pytest.raises(MemoryError, match="granularity='token_unit'.*above max_statistics_gb=0.0001"):
        f.fit(pairs)


def test_statistics_save_and_load(fitter, tmp_path):
    st = fitter.statistics
    st.save(tmp_path / "stats")
    back = FitStatistics.load(tmp_path / "stats")
    assert back.sites == st.sites and back.options == st.options and back.pairs == st.pairs
    assert back.timesteps == st.timesteps and back.versions == st.versions
    for name in ("importance_source", "token_importance_target", "values", "target_values", "mean_target"):
        assert all(torch.equal(getattr(back, name)[k], v) for k, v in getattr(st, name).items())
    assert torch.equal(back.eraser(tau=0.3).masks["mid.0.ffn_hidden"], st.eraser(tau=0.3).masks["mid.0.ffn_hidden"])


def _one_inf(output):
    out = output.clone()
    out[0, 3, 5] = -float("inf")  # one element of the uncond source row
    return out


@pytest.mark.parametrize("bad", [lambda output: output * float("nan"), _one_inf], ids=["all NaN", "one -inf"])
def test_nan_activations_name_the_site_and_step(conceptworld, bad):
    f = EraserFitter(conceptworld, EraseOptions(num_inference_steps=3), progress=False)
    geglu = conceptworld.pipeline.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.ff.net.0")
    calls = []

    def poison(module, args, output):
        calls.append(1)
        return bad(output) if len(calls) == 2 else output

    handle = geglu.register_forward_hook(poison)
    try:
        with pytest.raises(FloatingPointError, match=r"NaN or inf\) at site mid\.0\.ffn_hidden, denoising step 1"):
            f.update("a red triangle", "a red circle")
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="no pairs yet"):
        f.statistics  # the failed pair left nothing behind


def test_bad_fit_inputs_are_clear_errors(conceptworld, pairs):
    with pytest.raises(ValueError, match=r"unknown block\(s\) \['down.7'\]"):
        EraserFitter(conceptworld, EraseOptions(blocks=["down.7"]))
    with pytest.raises(ValueError, match="site_kind='mlp'"):
        EraseOptions(site_kind="mlp")
    f = EraserFitter(conceptworld, EraseOptions(num_inference_steps=2), progress=False)
    with pytest.raises(ValueError, match="the target prompt must be a non-empty string"):
        f.update("", "a red circle")
    with pytest.raises(TypeError, match="fit takes PromptPairs"):
        f.fit([("a red triangle", "a red circle")])
    with pytest.raises(ValueError, match="2 seeds for 3 prompts|got 2 seeds"):
        f.fit(PromptPairs("triangle", ["a", "b", "c"], ["d", "e", "f"]), seeds=[0, 1])


# -- text enters the UNet only through cross-attention ---------------------------------------


SOURCE, TARGET = "a blue square on a striped background", "a red triangle on a plain background"


def test_patching_every_attn2_output_reproduces_the_source_image(conceptworld):
    """Record every cross-attention output of the source run (both CFG rows, every step) and write
    them into the target run: the target prompt then draws exactly the source image."""
    m = conceptworld
    sites = select_sites(EraserFitter(m, EraseOptions(site_kind="attn2_out")).sites, "attn2_out")
    run = dict(num_inference_steps=STEPS, guidance_scale=m.defaults.guidance_scale, output_type="pt",
               height=m.defaults.height, width=m.defaults.width)  # fmt: skip
    with m.generate([SOURCE], generator=[torch.Generator().manual_seed(0)], **run) as tracer:
        recorded = nnsight.save([])
        for step in tracer.iter[:STEPS]:
            recorded.append([read_in_trace(m.unet, s).clone() for s in sites])
        source_image = m.output.images.save()
    with m.generate([TARGET], generator=[torch.Generator().manual_seed(0)], **run) as tracer:
        for step in tracer.iter[:STEPS]:
            for s, x in zip(sites, recorded[step]):
                write_in_trace(m.unet, s, lambda _, x=x: x)
        patched = m.output.images.save()
    target_image = generate(m, [TARGET], seeds=0, num_inference_steps=STEPS, progress=False)
    assert len(recorded) == STEPS and len(recorded[0]) == 7
    assert torch.equal(patched, source_image)
    assert (target_image - source_image.float()).abs().max() > 1e-3


def test_a_per_step_attn2_fit_with_full_masks_redraws_the_source(conceptworld):
    """The same identity through the fitter: attn2 values per step from a fit at guidance 1 (one
    row per prompt), every mask bit on. Equal up to the rounding of the fit's batch of two."""
    m = conceptworld
    f = EraserFitter(m, EraseOptions(site_kind="attn2_out", value_mode="per_step", num_inference_steps=STEPS,
                                     guidance_scale=1.0), progress=False)  # fmt: skip
    f.update(TARGET, SOURCE, seed=0)
    st = f.statistics
    full = {s.name: torch.ones(s.shape[1], dtype=torch.bool) for s in st.sites}
    eraser = Eraser.from_tensors(m, full, st.values, timesteps=list(st.timesteps), num_inference_steps=STEPS)
    assert eraser.num_steps == STEPS
    gen = dict(seeds=0, num_inference_steps=STEPS, guidance_scale=1.0, progress=False)
    source_image, target_image = generate(m, [SOURCE], **gen), generate(m, [TARGET], **gen)
    with eraser.applied(m):
        patched = generate(m, [TARGET], **gen)
    assert (patched - source_image).abs().max() < 1e-4
    assert (target_image - source_image).abs().max() > 1e-2


def test_only_a_restorable_fit_keeps_target_values(conceptworld, pairs, fitter):
    options = EraseOptions(num_inference_steps=STEPS, tau=0.05, granularity="token_unit")
    plain = EraserFitter(conceptworld, options, progress=False)
    values = sum(8 * v.numel() for v in fitter.statistics.target_values.values())  # one float64 sum per (token, unit)
    assert fitter.statistics_bytes(2) - plain.statistics_bytes(2) == values
    plain.fit(pairs)
    assert plain.statistics.target_values == {}
    with pytest.raises(ValueError, match="restorable=True"):
        plain.statistics.eraser(values="target")
    # the rest of the statistics are the same with or without target values
    assert all(torch.equal(plain.statistics.values[k], v) for k, v in fitter.statistics.values.items())


def test_large_finite_half_precision_activations_are_not_called_non_finite():
    """The finiteness check sums each activation; a float16 sum of these would overflow to inf."""
    model = load("conceptworld", dtype=torch.float16)
    f = EraserFitter(model, EraseOptions(num_inference_steps=2), progress=False)
    geglu = model.pipeline.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.ff.net.0")
    big = []

    def scale(module, args, output):
        out = torch.full_like(output, 1000.0)  # finite in float16, but 66 of them sum past its range
        big.append(torch.isinf(out.sum()).item())
        return out

    handle = geglu.register_forward_hook(scale)
    try:
        f.update("a red triangle", "a red circle")
    finally:
        handle.remove()
    assert big and all(big)  # the trap is real at this size
    assert torch.isfinite(f.statistics.importance_source["mid.0.ffn_hidden"]).all()


def test_nbytes_counts_every_tensor_the_fit_keeps(conceptworld):
    fitter = EraserFitter(conceptworld, EraseOptions(num_inference_steps=2, granularity="token_unit"), progress=False)
    fitter.fit(conceptworld_pairs("heart", n=1, seed=0))
    stats = fitter.statistics
    named = ("importance_source", "importance_target", "token_importance_source", "token_importance_target",
             "values", "mean_source", "mean_target", "square_mean_source", "square_mean_target")  # fmt: skip
    expected = sum(t.numel() * t.element_size() for name in named for t in getattr(stats, name).values())
    assert stats.target_values == {} and stats.nbytes == expected > 0
