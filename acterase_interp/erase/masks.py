"""Mask algebra of a fit (Eq. 5): which entries pass the importance threshold, and how masks of
several steps and pairs combine; and LocoGen-style z-score ranking as an alternative to Eq. 4-5.
Tensors in, tensors out: no model, no eraser."""

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


def zscores(
    mean_source: torch.Tensor, mean_target: torch.Tensor, square_source: torch.Tensor, square_target: torch.Tensor
) -> torch.Tensor:
    """Per unit, z = (mean_target - mean_source) / pooled std, from (pair, unit) first and second
    moments (each pair's mean over the same number of steps, tokens and rows, so a mean over pairs
    is the mean over every activation). Pooled: std = sqrt((var_source + var_target) / 2), so a
    unit that the concept moves far relative to its spread in *either* prompt ranks high; a unit
    with no spread and no difference gets z = 0."""
    moments = [t.double().mean(0) for t in (mean_source, mean_target, square_source, square_target)]
    m_s, m_t, q_s, q_t = moments
    var = ((q_s - m_s.square()).clamp_min(0) + (q_t - m_t.square()).clamp_min(0)) / 2
    diff = m_t - m_s
    z = torch.where(var > 0, diff / var.sqrt().clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(diff))
    return z.float()


def zscore_mask(z: torch.Tensor, top_k: int) -> torch.Tensor:
    """The (1, 1, units) bool mask of the `top_k` units of largest |z| (all units where a site has
    fewer)."""
    k = min(top_k, z.numel())
    mask = torch.zeros(z.numel(), dtype=torch.bool)
    mask[z.abs().topk(k).indices] = True
    return mask.view(1, 1, -1)
