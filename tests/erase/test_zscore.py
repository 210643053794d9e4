"""LocoGen-style z-score ranking (`EraseOptions(ranking="zscore", top_k=...)`): the scores against a
hand computation, the masks it gives, old statistics without second moments, and option errors."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from acterase_interp.erase import EraseOptions, Eraser, FitStatistics, PromptPairs
from acterase_interp.erase.masks import importance_mask, zscore_mask, zscores
from acterase_interp.erase.statistics import TENSORS
from acterase_interp.sites import Site

# Two pairs, four units. Source and target moments per pair (each pair's mean over its activations):
M_S = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
Q_S = torch.tensor([[1.0, 1.0, 1.0, 0.0], [5.0, 1.0, 1.0, 0.0]])
M_T = torch.tensor([[3.0, -3.0, 0.5, 0.0], [3.0, -3.0, 0.5, 0.0]])
Q_T = torch.tensor([[11.0, 10.0, 3.25, 0.0], [11.0, 10.0, 3.25, 0.0]])
# By hand, over both pairs:
#   unit 0: source mean 1, E[x^2] 3, var 2; target mean 3, var 11 - 9 = 2; pooled std sqrt(2): z = 2 / sqrt(2)
#   unit 1: source var 1, target var 10 - 9 = 1; z = -3 / 1
#   unit 2: source var 1, target var 3.25 - 0.25 = 3; pooled std sqrt(2): z = 0.5 / sqrt(2)
#   unit 3: no spread, no difference: z = 0
Z = torch.tensor([math.sqrt(2.0), -3.0, 0.5 / math.sqrt(2.0), 0.0])


def test_zscores_equal_a_hand_computation():
    z = zscores(M_S, M_T, Q_S, Q_T)
    torch.testing.assert_close(z, Z)
    assert zscore_mask(z, 2).tolist() == [[[True, True, False, False]]]  # |z| ranks units 1, 0, 2, 3
    assert zscore_mask(z, 1).tolist() == [[[False, True, False, False]]]
    assert zscore_mask(z, 9).all() and zscore_mask(z, 9).shape == (1, 1, 4)  # at most every unit


def _statistics(moments: bool = True) -> FitStatistics:
    site = Site("mid.0.ffn_out", "ffn_out", "mid.0", "mid_block.attentions.0.transformer_blocks.0.ff", "output",
                None, (2, 4))  # fmt: skip
    g = torch.Generator().manual_seed(0)
    name = site.name
    square = {"square_mean_source": {name: Q_S}, "square_mean_target": {name: Q_T}} if moments else {}
    return FitStatistics(
        sites=(site,), options=EraseOptions(tau=0.5), pairs=PromptPairs("c", ("a red circle",) * 2, ("a circle",) * 2),
        seeds=(0, 1), importance_source={name: torch.rand(2, 3, 4, generator=g)},
        importance_target={name: torch.rand(2, 3, 4, generator=g)}, token_importance_source={},
        token_importance_target={}, values={name: torch.randn(1, 2, 4, generator=g)}, mean_source={name: M_S},
        mean_target={name: M_T}, architecture_hash="test", num_inference_steps=3, guidance_scale=3.0, height=32,
        width=32, timesteps=(900.0, 500.0, 100.0), scheduler="DPMSolverMultistepScheduler", versions={}, **square,
    )  # fmt: skip


def test_zscore_eraser_replaces_the_top_units_with_the_source_mean():
    st = _statistics()
    eraser = st.eraser(ranking="zscore", top_k=2)
    name = "mid.0.ffn_out"
    assert eraser.masks[name].tolist() == [[[True, True, False, False]]]
    assert torch.equal(eraser.values[name], st.values[name]) and eraser.manifest["options"]["top_k"] == 2
    x = torch.full((1, 2, 4), 7.0)
    out = eraser(name, x)
    assert torch.equal(out[..., :2], st.values[name][..., :2]) and (out[..., 2:] == 7).all()
    # the default ranking is Eq. 4-5, as before
    default = Eraser.from_statistics(st)
    assert torch.equal(default.masks[name], importance_mask(st.importance_source[name], st.importance_target[name],
                                                            st.options))  # fmt: skip
    assert st.eraser(ranking="zscore", top_k=1).masks[name].sum() == 1


def test_statistics_without_second_moments_load_and_refuse_only_zscore(tmp_path):
    st = _statistics()
    st.save(tmp_path / "stats")
    back = FitStatistics.load(tmp_path / "stats")
    assert torch.equal(back.square_mean_target["mid.0.ffn_out"], Q_T)
    # an artifact from before second moments were collected
    path = tmp_path / "stats" / TENSORS
    save_file({k: v for k, v in load_file(path).items() if not k.startswith("square_")}, path)
    old = FitStatistics.load(tmp_path / "stats", verify=False)  # the edit above changed the hashed file
    assert old.square_mean_source == {} and torch.equal(old.eraser().masks["mid.0.ffn_out"], st.eraser().masks["mid.0.ffn_out"])
    with pytest.raises(ValueError, match="second moments"):
        old.eraser(ranking="zscore", top_k=2)


def test_ranking_options():
    assert EraseOptions().ranking == "importance" and EraseOptions().top_k is None
    assert EraseOptions.from_dict(EraseOptions(ranking="zscore", top_k=3).to_dict()).top_k == 3
    with pytest.raises(ValueError, match="needs top_k"):
        EraseOptions(ranking="zscore")
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        EraseOptions(ranking="zscore", top_k=0)
    with pytest.raises(ValueError, match="ranking='locogen' is not one of"):
        EraseOptions(ranking="locogen")
