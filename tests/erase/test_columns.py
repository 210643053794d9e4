"""Eq. 6 written only into the masked columns (`Eraser._masked_columns`) is `torch.where` over every
unit, bit for bit: per-unit, per-token and per-step masks, half precision, an empty mask; and the
columns follow a mask edited in place or replaced."""

from __future__ import annotations

import pytest
import torch

from acterase_interp.erase import Eraser

STEPS = 3
SHAPES = {"down.0.0.ffn_hidden": (64, 256), "mid.0.attn2_out": (16, 128), "unet_out": (64, 4)}


def _where(eraser: Eraser, name: str, x: torch.Tensor, step: int) -> torch.Tensor:
    """Eq. 6 as a full `torch.where` (the reference)."""
    mask, value = (t[step if t.shape[0] > 1 else 0] for t in (eraser.masks[name], eraser.values[name]))
    tokens = x.flatten(2).transpose(1, 2) if x.ndim == 4 else x
    out = torch.where(mask, value.to(x.dtype), tokens)
    return out if x.ndim == 3 else out.transpose(1, 2).reshape(x.shape)


def _activation(name: str, g: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    tokens, units = SHAPES[name]
    shape = (4, units, 8, 8) if name == "unet_out" else (4, tokens, units)
    return torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize("kind", ["unit", "token", "step"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_column_patch_is_torch_where_bit_for_bit(conceptworld, kind, dtype):
    g = torch.Generator().manual_seed(1)
    masks, values = {}, {}
    for n, (tokens, units) in SHAPES.items():
        shape = {"unit": (units,), "token": (tokens, units), "step": (STEPS, tokens, units)}[kind]
        masks[n] = torch.rand(shape, generator=g) < 0.2
        values[n] = torch.randn(STEPS if kind == "step" else 1, tokens, units, generator=g)
    eraser = Eraser.from_tensors(conceptworld, masks, values)
    for n in SHAPES:
        for step in range(STEPS):
            x = _activation(n, g, dtype)
            out = eraser(n, x, step)
            assert out.dtype == dtype and torch.equal(out, _where(eraser, n, x, step)) and not torch.equal(out, x)


def test_an_empty_mask_leaves_the_activation_and_edits_are_followed(conceptworld):
    name, (tokens, units) = "mid.0.attn2_out", SHAPES["mid.0.attn2_out"]
    empty = {name: torch.zeros(units, dtype=torch.bool)}
    eraser = Eraser.from_tensors(conceptworld, empty, {name: torch.randn(tokens, units)})
    x = _activation(name, torch.Generator().manual_seed(2))
    assert eraser(name, x) is x
    eraser.masks[name][..., 5] = True  # an edit in place: the cached columns are recomputed
    assert torch.equal(eraser(name, x), _where(eraser, name, x, 0)) and not torch.equal(eraser(name, x), x)
    eraser.masks[name] = torch.ones_like(eraser.masks[name])  # a replaced tensor: likewise
    assert torch.equal(eraser(name, x), eraser.values[name][0].expand_as(x))
    assert eraser.saturated()._columns == {}  # a copy starts with no columns of its own
