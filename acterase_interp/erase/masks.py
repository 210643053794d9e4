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
    return _level(scores, tau_mode) >= threshold(tau, tau_mode, scores[0, 0].numel())


def threshold(tau: float, tau_mode: str, n: int) -> float:
    """The level an entry must reach to pass (`_level`): tau itself, or 1 - k for the k largest."""
    if tau_mode == "fraction":
        return 1 - max(1, math.ceil(tau * n - 1e-9))  # the epsilon keeps 0.3 * 10 at 3
    return tau


def _level(scores: torch.Tensor, tau_mode: str) -> torch.Tensor:
    """Per entry, a value that passes a threshold exactly when the entry does, for every tau at once.
    `fraction`: minus the number of the layer's entries strictly above it (it is among the k largest,
    ties at the cut included, iff fewer than k are above it); `absolute`: score over the layer's largest."""
    flat = scores.flatten(2)
    if tau_mode == "fraction":
        ordered = flat.sort(dim=-1, descending=True).values
        above = torch.searchsorted(-ordered.contiguous(), -flat.contiguous(), side="left")  # ascending view
        return (-above).view_as(scores).float()
    top = flat.amax(dim=-1, keepdim=True)
    normalised = torch.where(top > 0, flat / top.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return normalised.view_as(scores)


def combine_levels(levels: torch.Tensor, rule: str, dim: int) -> torch.Tensor:
    """Combine the masks `levels >= t` along `dim` by a rule (union, intersection, strict majority,
    last) for every t at once: the combined mask is `combined >= t`. Union is a max, intersection a
    min, a strict majority of n the (n // 2 + 1)-th largest."""
    if rule == "union":
        return levels.amax(dim)
    if rule == "intersection":
        return levels.amin(dim)
    if rule == "majority":
        return levels.topk(levels.shape[dim] // 2 + 1, dim=dim).values.select(dim, -1)
    if rule == "last":
        return levels.select(dim, -1)
    raise ValueError(f"unknown combination rule {rule!r}")


def mask_levels(source: torch.Tensor, target: torch.Tensor, tau_mode: str, time_mask: str, pair_combine: str) -> torch.Tensor:
    """The level of every mask entry (steps or 1, tokens or 1, units): Eq. 5's mask at any tau is
    `levels >= threshold(tau, tau_mode, n)`. Computed once per fit and rule, so a new tau costs one
    comparison per unit instead of a top-k over every (pair, step)."""
    levels = _level(source, tau_mode).masked_fill(~(source < target), -math.inf)  # Eq. 5: I_s < I_t
    if time_mask != "per_step":
        levels = combine_levels(levels, time_mask, dim=1).unsqueeze(1)
    levels = combine_levels(levels, pair_combine, dim=0)
    return levels if levels.ndim == 3 else levels.unsqueeze(1)


def importance_mask(
    source: torch.Tensor, target: torch.Tensor, options: EraseOptions, levels: torch.Tensor | None = None
) -> torch.Tensor:
    """Eq. 5 per (pair, step), M = (I_s passes the threshold) AND (I_s < I_t), then combined over
    steps (per pair) and then over pairs. `source`/`target`: (pair, step, unit) or
    (pair, step, token, unit). Returns a bool mask (steps or 1, tokens or 1, units). `levels`:
    `mask_levels` of the same scores and rules, when already computed."""
    if levels is None:
        levels = mask_levels(source, target, options.tau_mode, options.time_mask, options.pair_combine)
    return levels >= threshold(options.tau, options.tau_mode, source[0, 0].numel())


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
