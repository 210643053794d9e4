"""Mask algebra of a fit (Eq. 5): which entries pass the importance threshold, and how masks of
several steps and pairs combine. Tensors in, tensors out: no model, no eraser."""

from __future__ import annotations

import math

import torch

from .options import EraseOptions


def passes_threshold(scores: torch.Tensor, tau: float, tau_mode: str) -> torch.Tensor:
    """Which entries of `scores` (pair, step, *layer) pass the importance threshold, judged
    separately for every (pair, step) over the whole layer (its units, or its (token, unit) entries).

    `fraction`: the ceil(tau * n) largest of the layer's n entries pass (ties at the cut pass too).
    `absolute`: an entry passes when score / (the layer's largest score) >= tau."""
    flat = scores.flatten(2)
    if tau_mode == "fraction":
        k = max(1, math.ceil(tau * flat.shape[-1] - 1e-9))  # the epsilon keeps 0.3 * 10 at 3
        cut = flat.topk(k, dim=-1).values[..., -1:]
        return (flat >= cut).view_as(scores)
    top = flat.amax(dim=-1, keepdim=True)
    normalised = torch.where(top > 0, flat / top.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return (normalised >= tau).view_as(scores)


def combine(masks: torch.Tensor, rule: str, dim: int) -> torch.Tensor:
    """Combine boolean masks along `dim` by a rule: union, intersection, strict majority, last."""
    if rule == "union":
        return masks.any(dim)
    if rule == "intersection":
        return masks.all(dim)
    if rule == "majority":
        return masks.sum(dim) * 2 > masks.shape[dim]
    if rule == "last":
        return masks.select(dim, -1)
    raise ValueError(f"unknown combination rule {rule!r}")


def importance_mask(source: torch.Tensor, target: torch.Tensor, options: EraseOptions) -> torch.Tensor:
    """Eq. 5 per (pair, step), M = (I_s passes the threshold) AND (I_s < I_t), then combined over
    steps (per pair) and then over pairs. `source`/`target`: (pair, step, unit) or
    (pair, step, token, unit). Returns a bool mask (steps or 1, tokens or 1, units)."""
    masks = passes_threshold(source, options.tau, options.tau_mode) & (source < target)
    if options.time_mask != "per_step":
        masks = combine(masks, options.time_mask, dim=1).unsqueeze(1)
    mask = combine(masks, options.pair_combine, dim=0)
    return mask if mask.ndim == 3 else mask.unsqueeze(1)
