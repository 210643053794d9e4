"""Intervention sites: names, execution order, measured shapes, selection and errors."""

from __future__ import annotations

import nnsight
import pytest
import torch

from tests.conftest import fired_order

from acterase_interp.sites import (
    PRESETS,
    SITE_KINDS,
    UNET_OUT,
    Site,
    discover_sites,
    reader_weight_norm,
    select_sites,
    site_by_name,
)

BLOCK_KINDS = ("attn1_out", "attn2_k", "attn2_v", "attn2_out", "ffn_hidden", "ffn_out", "block_out")
CW_BLOCKS = ["down.0.0", "down.1.0", "mid.0", "up.0.0", "up.0.1", "up.1.0", "up.1.1"]


def _blocks(sites: list[Site]) -> list[str]:
    return list(dict.fromkeys(s.block for s in sites if s.kind != UNET_OUT))


def _check_order(sites: list[Site]) -> None:
    """Blocks run down -> mid -> up, each block's sites in one run: attn1 < to_k < to_v < attn2 <
    ffn_hidden < ffn_out < the block's output."""
    stages = [s.block.split(".")[0] for s in sites if s.kind != UNET_OUT]
    assert stages == sorted(stages, key=["down", "mid", "up"].index)
    for block in _blocks(sites):
        kinds = [s.kind for s in sites if s.block == block]
        assert kinds == list(BLOCK_KINDS), (block, kinds)
    assert sites[-1].kind == UNET_OUT and sum(s.kind == UNET_OUT for s in sites) == 1


def test_conceptworld_sites(conceptworld_sites):
    sites = conceptworld_sites
    assert _blocks(sites) == CW_BLOCKS
    assert len(sites) == len(BLOCK_KINDS) * len(CW_BLOCKS) + 1
    for kind in BLOCK_KINDS:
        assert len(select_sites(sites, kind)) == len(CW_BLOCKS)
    _check_order(sites)
    assert len({s.name for s in sites}) == len(sites)
    assert all(s.name == f"{s.block}.{s.kind}" for s in sites if s.kind != UNET_OUT)


def test_conceptworld_shapes(conceptworld_sites):
    by_name = {s.name: s.shape for s in conceptworld_sites}
    # 8x8 latents: 64 tokens of 64 channels at the top level, 16 tokens of 128 channels below.
    assert by_name["down.0.0.ffn_hidden"] == (64, 256)
    assert by_name["down.0.0.attn1_out"] == by_name["down.0.0.attn2_out"] == by_name["down.0.0.ffn_out"] == (64, 64)
    assert by_name["down.0.0.block_out"] == (64, 64)
    # keys and values: one row per text token (ConceptWorld's 24), the attention's inner width
    assert by_name["down.0.0.attn2_k"] == by_name["down.0.0.attn2_v"] == (24, 64)
    assert by_name["mid.0.attn2_v"] == (24, 128)
    assert by_name["down.1.0.ffn_hidden"] == (16, 512)
    assert by_name["mid.0.ffn_out"] == (16, 128)
    assert by_name["up.1.1.ffn_hidden"] == (64, 256)
    assert by_name[UNET_OUT] == (4, 8, 8)


def test_order_is_the_order_activations_appear(conceptworld, conceptworld_sites):
    pipe = conceptworld.pipeline

    def one_step():  # the whole pipeline, one denoising step, no CFG: one UNet call
        pipe("a red circle", num_inference_steps=1, guidance_scale=1.0, output_type="latent",
             generator=torch.Generator().manual_seed(0))  # fmt: skip

    assert fired_order(pipe.unet, conceptworld_sites, one_step) == [s.name for s in conceptworld_sites]


def test_sites_can_be_read_in_order_in_an_nnsight_trace(conceptworld, conceptworld_sites):
    """nnsight requires execution order within a step: reading every site in list order works,
    and each read has the measured shape (batch 2: unconditional and conditional rows)."""
    steps = 2
    with conceptworld.generate(["a red circle"], num_inference_steps=steps, guidance_scale=3.0,
                               output_type="pt", seed=0) as tracer:  # fmt: skip
        shapes = nnsight.save([])
        for _ in tracer.iter[:steps]:
            for s in conceptworld_sites:
                module = conceptworld.unet
                for part in filter(None, s.module_path.split(".")):
                    module = module[int(part)] if part.isdigit() else getattr(module, part)
                x = module.input if s.io == "input" else module.output
                x = x[0] if s.kind == UNET_OUT else x
                shapes.append(tuple(x.shape))
    expected = [(2, *s.shape) for s in conceptworld_sites] * steps
    assert list(shapes) == expected


def test_random_sd_sites(random_sd):
    sites = random_sd.sites
    blocks = _blocks(sites)
    assert len(blocks) == 16
    assert blocks[:6] == ["down.0.0", "down.0.1", "down.1.0", "down.1.1", "down.2.0", "down.2.1"]
    assert blocks[6] == "mid.0" and blocks[-1] == "up.3.2"
    _check_order(sites)
    side = random_sd.pipeline.unet.config.sample_size
    for s in sites:
        if s.kind == UNET_OUT:
            assert s.shape == (4, side, side)
            continue
        # Level 0/1/2 have 320/640/1280 channels at side / 2**level; mid is level 3.
        stage, index = s.block.split(".")[:2]
        level = {"down": int(index), "mid": 3, "up": 3 - int(index)}[stage]
        channels = (320, 640, 1280, 1280)[level]
        tokens = 77 if s.kind in ("attn2_k", "attn2_v") else (side // 2**level) ** 2  # CLIP's context: 77
        width = 4 * channels if s.kind == "ffn_hidden" else channels
        assert s.shape == (tokens, width), s
    widths = sorted({s.shape[1] for s in select_sites(sites, "ffn_hidden")})
    assert widths == [1280, 2560, 5120]


def test_random_sd_order_is_the_order_activations_appear(random_sd):
    unet = random_sd.pipeline.unet
    side, width = unet.config.sample_size, unet.config.cross_attention_dim
    gen = torch.Generator().manual_seed(0)
    latents, context = torch.randn(1, 4, side, side, generator=gen), torch.randn(1, 77, width, generator=gen)

    def one_call():  # the UNet alone: the text encoder's 77-token pass costs more than the check
        with torch.no_grad():
            unet(latents, 500, encoder_hidden_states=context)

    assert fired_order(unet, random_sd.sites, one_call) == [s.name for s in random_sd.sites]


def test_select_sites(conceptworld_sites):
    sites = conceptworld_sites
    down = select_sites(sites, "ffn_hidden", blocks=["down"])
    assert [s.name for s in down] == ["down.0.0.ffn_hidden", "down.1.0.ffn_hidden"]
    up0 = select_sites(sites, ["attn2_out", "ffn_out"], blocks=["up.0"])
    assert [s.name for s in up0] == ["up.0.0.attn2_out", "up.0.0.ffn_out", "up.0.1.attn2_out", "up.0.1.ffn_out"]
    exact = select_sites(sites, "ffn_hidden", blocks=["mid.0", "up.1.1"])
    assert [s.name for s in exact] == ["mid.0.ffn_hidden", "up.1.1.ffn_hidden"]
    assert select_sites(sites, "unet_out", blocks=["down"])[0].kind == UNET_OUT
    everything = select_sites(sites, SITE_KINDS)
    assert everything == sites
    # A prefix matches whole name parts only: "up.1" is not "up.10".
    assert all(s.block.startswith("up.1.") for s in select_sites(sites, "ffn_out", blocks=["up.1"]))


def test_site_errors(conceptworld_sites):
    with pytest.raises(ValueError, match="unknown site kind"):
        select_sites(conceptworld_sites, "ffn_middle")
    with pytest.raises(ValueError, match="unknown block"):
        select_sites(conceptworld_sites, "ffn_hidden", blocks=["down.7"])
    with pytest.raises(ValueError, match="unknown block"):
        select_sites(conceptworld_sites, "ffn_hidden", blocks=["dow"])
    with pytest.raises(KeyError, match="down.0.0.ffn_hidden"):  # the message lists the real names
        site_by_name(conceptworld_sites, "down.9.9.ffn_hidden")
    assert site_by_name(conceptworld_sites, "mid.0.attn2_out").kind == "attn2_out"


def test_presets_name_block_sets(conceptworld_sites, random_sd):
    locogen = select_sites(random_sd.sites, "attn2_out", blocks=["locogen"])
    # LocoGen's cross-attention layers 8 and 9 of 16, counted in execution order
    assert locogen == [select_sites(random_sd.sites, "attn2_out")[i] for i in (8, 9)]
    assert [s.module_path for s in locogen] == [f"up_blocks.1.attentions.{j}.transformer_blocks.0.attn2" for j in (1, 2)]
    assert select_sites(random_sd.sites, "ffn_out", blocks=["locogen", "mid"])[0].block == "mid.0"
    assert PRESETS["locogen"] == ("up.1.1", "up.1.2")
    with pytest.raises(ValueError, match="unknown block"):  # ConceptWorld's up.1 has two modules only
        select_sites(conceptworld_sites, "ffn_out", blocks=["locogen"])


def test_reader_weight_norm(conceptworld, conceptworld_sites):
    unet = conceptworld.pipeline.unet
    for s in conceptworld_sites:
        norm = reader_weight_norm(unet, s)
        if s.kind != "ffn_hidden":
            assert norm is None
            continue
        assert norm.shape == (s.shape[-1],)
        assert (norm > 0).all()
        weight = unet.get_submodule(s.reader_path).weight  # (out, in): unit j is column j
        x = torch.rand(s.shape[-1])
        assert torch.allclose((weight.abs() * x).sum(), (norm * x).sum(), rtol=1e-4)


def test_discover_sites_at_another_size(conceptworld):
    sites = discover_sites(conceptworld.pipeline.unet, sample_size=16)
    assert site_by_name(sites, "down.0.0.ffn_hidden").shape == (256, 256)
    assert site_by_name(sites, UNET_OUT).shape == (4, 16, 16)
