"""Planting: only the chosen weights train, the rest stay bit-identical, and the record says where."""

from __future__ import annotations

import pytest
import torch

from acterase_interp.plant import PlantSpec, plant, trainable_masks
from acterase_interp.world.planting import SHIPPED, planting_data


def test_plant_spec_validation():
    with pytest.raises(ValueError, match="unknown plant family"):
        PlantSpec("attn3")
    with pytest.raises(ValueError, match="units is required"):
        PlantSpec("ffn_units")
    with pytest.raises(ValueError, match="only allowed"):
        PlantSpec("ffn", units=4)
    with pytest.raises(ValueError, match="positive"):
        PlantSpec(steps=0)
    with pytest.raises(ValueError, match="p_uncond"):
        PlantSpec(p_uncond=1.0)


def test_trainable_masks_pick_whole_units(conceptworld):
    unet = conceptworld.pipeline.unet
    masks, units = trainable_masks(unet, PlantSpec("ffn_units", blocks=("up.0.0", "mid.0"), units=5, seed=3))
    assert sorted(units) == ["mid.0", "up.0.0"] and all(len(u) == 5 for u in units.values())
    path = "up_blocks.0.attentions.0.transformer_blocks.0"
    proj, out = masks[f"{path}.ff.net.0.proj.weight"], masks[f"{path}.ff.net.2.weight"]
    inner = out.shape[1]
    rows = proj.any(dim=1).nonzero().flatten().tolist()
    assert rows == units["up.0.0"] + [u + inner for u in units["up.0.0"]]  # value and gate halves
    assert out.any(dim=0).nonzero().flatten().tolist() == units["up.0.0"]
    assert proj.all(dim=1).sum() == 10 and out.all(dim=0).sum() == 5  # whole rows and columns
    again, _ = trainable_masks(unet, PlantSpec("ffn_units", blocks=("up.0.0", "mid.0"), units=5, seed=3))
    assert all(torch.equal(masks[k], again[k]) for k in masks)  # seeded
    kv, _ = trainable_masks(unet, PlantSpec("attn2_kv", blocks=("down.0.0",)))
    assert sorted(kv) == [f"down_blocks.0.attentions.0.transformer_blocks.0.attn2.{p}.weight" for p in ("to_k", "to_v")]
    ffn, _ = trainable_masks(unet, PlantSpec("ffn"))
    assert len({k.split(".ff.")[0] for k in ffn}) == 7 and all(v is None for v in ffn.values())
    with pytest.raises(ValueError, match="unknown block"):
        trainable_masks(unet, PlantSpec("ffn", blocks=("up.9.9",)))
    with pytest.raises(ValueError, match="exceeds"):
        trainable_masks(unet, PlantSpec("ffn_units", blocks=("mid.0",), units=10_000))


def test_planting_data_mixes_the_new_concept_in():
    scenes, images, captions, data = planting_data("heart", known=("cyan",), n_images=600, fraction=0.25, seed=1)
    assert images.shape == (600, 3, 32, 32) and len(captions) == 600
    hearts = sum(s.shape == "heart" for s in scenes)
    assert hearts == data["with_concept"] and 0.2 < hearts / 600 < 0.45  # a quarter, plus draws of the 7 shapes
    assert {s.color for s in scenes} == {"red", "green", "blue", "yellow", "purple", "cyan"}
    assert any("heart" in c for c in captions) and "moon" not in " ".join(captions)
    with pytest.raises(ValueError, match="not plantable"):
        planting_data("triangle")
    with pytest.raises(ValueError, match="fraction"):
        planting_data("heart", fraction=1.0)


def test_shipped_recipe_plants_three_kinds_in_three_places():
    assert [(c, s.family) for c, s in SHIPPED] == [("moon", "ffn"), ("heart", "ffn_units"), ("cyan", "attn2_kv")]


def _plant_and_restore(pipeline, spec, images, captions):
    """Plant, check the record against the weights, then put the trained weights back."""
    params = dict(pipeline.unet.named_parameters())
    masks, _ = trainable_masks(pipeline.unet, spec)
    saved = {n: params[n].detach().clone() for n in masks}
    try:
        record = plant(pipeline, images, captions, "heart", spec, progress=False)
        assert record.frozen_identical and record.parameters == list(masks)
        for name, mask in masks.items():
            changed = params[name].detach() != saved[name]
            assert changed.any(), name  # the trainable entries did train
            if mask is not None:
                assert not (changed & ~mask).any(), name  # and nothing outside them
        return record
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)


@pytest.mark.parametrize("family", ["ffn_units", "attn2_kv"])
def test_plant_on_conceptworld(conceptworld, family):
    _, images, captions, _ = planting_data("heart", n_images=32, seed=0)
    units = 4 if family == "ffn_units" else None
    spec = PlantSpec(family, blocks=("up.0.1",), units=units, steps=2, batch=4, lr=1e-2)
    record = _plant_and_restore(conceptworld.pipeline, spec, images, captions)
    assert record.blocks == ["up.0.1"] and len(record.losses) == 2
    n = 4 * (2 * 128 + 2 + 128) if family == "ffn_units" else 2 * 128 * 384  # rows, biases, columns | K, V
    assert record.trained_values == n


@pytest.mark.slow
def test_plant_on_random_sd15(random_sd):
    """The DreamBooth-style path: a user's images and captions, SD 1.5's true layout."""
    if random_sd.version != "1.5":
        pytest.skip("one SD layout is enough for planting")
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 64, 64, generator=gen) * 2 - 1  # 8x8 latents keep each UNet call cheap
    captions = ["a photo of a sks heart"] * 4
    spec = PlantSpec("ffn_units", blocks=("mid.0",), units=8, steps=1, batch=2)
    record = _plant_and_restore(random_sd.pipeline, spec, images, captions)
    assert record.units["mid.0"] == sorted(record.units["mid.0"]) and len(record.units["mid.0"]) == 8
    with pytest.raises(ValueError, match="as many captions"):
        plant(random_sd.pipeline, images, captions[:3], "heart", spec, progress=False)


class _Shifted:
    """A frozen UNet stand-in whose prediction is `unet`'s plus a constant."""

    def __init__(self, unet, shift: float) -> None:
        self.unet, self.shift = unet, shift

    def __call__(self, x, t, encoder_hidden_states, added_cond_kwargs=None):
        out = self.unet(x, t, encoder_hidden_states=encoder_hidden_states)
        return type(out)(sample=out.sample + self.shift)


def test_anchor_adds_the_weighted_squared_distance_on_the_replay_items(conceptworld):
    from diffusers import DDPMScheduler

    from acterase_interp.plant import denoising_loss

    unet = conceptworld.pipeline.unet
    sched = DDPMScheduler.from_config(conceptworld.pipeline.scheduler.config)
    size, n = unet.config.sample_size, 4
    z0 = torch.randn(n, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(1))
    cond = torch.randn(n, 6, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    keep = torch.tensor([True, False, True, False])

    def loss(anchor):
        with torch.no_grad():
            return denoising_loss(unet, z0, cond, sched, torch.Generator().manual_seed(3), 5.0, anchor=anchor).item()

    t = torch.randint(0, sched.config.num_train_timesteps, (n,), generator=torch.Generator().manual_seed(3))
    snr = sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t])
    weight = torch.clamp(snr, max=5.0) / snr
    expected = 2.0 * 0.5**2 * weight[keep].sum().item() / n  # weight 2, shift 0.5, averaged over the batch
    assert loss((_Shifted(unet, 0.5), keep, 2.0)) - loss(None) == pytest.approx(expected, rel=1e-3)
    assert loss((_Shifted(unet, 0.0), keep, 2.0)) == pytest.approx(loss(None), rel=1e-6)  # the same model: no pull


def test_preserve_needs_replay_and_without_replay_items_changes_nothing(conceptworld):
    _, images, captions, _ = planting_data("heart", n_images=16, seed=0)
    spec = PlantSpec("ffn_units", blocks=("up.0.1",), units=4, steps=2, batch=4, lr=1e-2, preserve=1.0)
    with pytest.raises(ValueError, match="replay"):
        plant(conceptworld.pipeline, images, captions, "heart", spec, progress=False)
    with pytest.raises(ValueError, match="preserve"):
        PlantSpec(preserve=-1.0)
    params = dict(conceptworld.pipeline.unet.named_parameters())
    masks, _ = trainable_masks(conceptworld.pipeline.unet, spec)
    saved = {n: params[n].detach().clone() for n in masks}
    trained = []
    for s, replay in ((spec, torch.zeros(16, dtype=torch.bool)), (PlantSpec(**{**spec.__dict__, "preserve": 0.0}), None)):
        try:
            plant(conceptworld.pipeline, images, captions, "heart", s, replay=replay, progress=False)
            trained.append({n: params[n].detach().clone() for n in masks})
        finally:
            with torch.no_grad():
                for n, v in saved.items():
                    params[n].copy_(v)
    assert all(torch.equal(trained[0][n], trained[1][n]) for n in masks)  # no replay item: the v2 recipe, bit for bit
    assert any(not torch.equal(trained[0][n], saved[n]) for n in masks)
