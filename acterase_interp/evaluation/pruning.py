"""Baselines that zero FFN weights chosen by Wanda-style scores |W_ij| * ||x_j|| on prompt pairs:
ConceptPrune (Chavhan et al. 2024) and Forget-It-All (FIA; Deng et al. 2026), ActErase's nearest
neighbour at the FFN. Both read the input of every `ff.net.2` (the `ffn_hidden` site, the GEGLU's
output) with each token's row L2-normalised over the units, as both references do ("to avoid inf
values"), and score per weight of `ff.net.2`. The selection rules are pure functions of those
norms (`concept_prune_mask`, `unit_mask`, `fia_contrast`, `fia_sensitivity`, `fia_concept_mask`,
`fia_fuse`), so each is tested against a hand computation."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..erase.pairs import PromptPairs
from ..patching import unet_of
from .method import WeightEdit, per_image, read_sites, sites_of_kind

_READER = ".ff.net.2"


def _squares(normalise: bool) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """Per image, sum over tokens and guidance halves of x_j^2 (n, units); rows normalised first
    if `normalise` (the references accumulate every row of the UNet batch, both halves)."""

    def reduce(x: torch.Tensor, n: int) -> torch.Tensor:
        x = x.float()
        x = F.normalize(x, p=2, dim=-1) if normalise else x
        return per_image(x, n).pow(2).sum((0, 2)).double()

    return reduce


def ffn_input_squares(model: Any, prompts: Sequence[str], normalise: bool, seed: int, num_inference_steps: int | None,
                      steps: int | None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Per `ff.net.2` (its module path), the per-image sum of squares of its input units at each
    of the first `steps` denoising steps: (steps, images, units)."""
    sites = sites_of_kind(model, "ffn_hidden")
    read = read_sites(model, prompts, sites, _squares(normalise), seed, num_inference_steps, steps)
    return {s.reader_path: read[s.name] for s in sites}


def _top_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    top = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        top.scatter_(1, scores.topk(k, dim=1).indices, True)
    return top


def concept_prune_mask(weight: torch.Tensor, target_norms: torch.Tensor, source_norms: torch.Tensor,
                       top_fraction: float, select_ratio: float = 0.0) -> torch.Tensor:  # fmt: skip
    """ConceptPrune's skilled weights of one layer (out, in): at each step t, S = |W| * a_t (a_t
    the input norms, (steps, in)); a weight is skilled at t when it is among the int(top_fraction
    * in) largest target scores of its output row and its target score exceeds its source score;
    it is pruned when skilled at more than `select_ratio` of the steps (0: at any)."""
    w = weight.detach().abs().double()
    count = torch.zeros_like(w)
    for a_target, a_source in zip(target_norms, source_norms):
        s_target, s_source = w * a_target, w * a_source
        count += _top_per_row(s_target, int(top_fraction * w.shape[1])) & (s_target > s_source)
    return count > select_ratio * len(target_norms)


def unit_mask(weight: torch.Tensor, target_norms: torch.Tensor, source_norms: torch.Tensor, top_fraction: float,
              min_step_fraction: float) -> torch.Tensor:  # fmt: skip
    """The unit-level variant (this project's earlier rule), per input unit j: its Wanda score
    sum_i |W_ij| * a_j is among the max(1, round(top_fraction * in)) largest on the targets and not
    among them on the sources, at `min_step_fraction` of the steps or more."""
    column = weight.detach().abs().sum(0).double()
    k = max(1, round(top_fraction * column.numel()))
    top = [torch.zeros_like(n, dtype=torch.bool).scatter_(1, (n * column).topk(k, dim=-1).indices, True)
           for n in (target_norms, source_norms)]  # fmt: skip
    return (top[0] & ~top[1]).float().mean(0) >= min_step_fraction


class _FFNPrune(WeightEdit):
    """Zeroes `masks_[block]` (True: zeroed) of each block's `ff.net.2` weight; `units_` lists the
    input units with at least one weight zeroed, `density_` the share of all those weights zeroed."""

    def _set_masks(self, model: Any, masks: dict[str, torch.Tensor]) -> None:
        params = dict(unet_of(model).named_parameters())
        self.masks_ = {path.removesuffix(_READER): m for path, m in masks.items()}
        self.units_ = {b: m.any(0).nonzero().flatten().tolist() for b, m in self.masks_.items()}
        self.edits_ = {}
        for block, mask in self.masks_.items():
            weight = params[f"{block}{_READER}.weight"].detach()
            self.edits_[f"{block}{_READER}.weight"] = weight.masked_fill(mask.to(weight.device), 0)
        self.density_ = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


class ConceptPrune(_FFNPrune):
    """ConceptPrune's skilled neurons, zeroed (`concept_prune_mask`, `rule="weight"`, the default).

    Reference: `ruchikachavhan/concept-prune` at 72927d9: `neuron_receivers/wanda_receiver.py`
    (`Wanda.hook_fn`: the GEGLU output, every row of the UNet batch L2-normalised, column norms
    accumulated over all prompts' images per step and layer), `wanda/wanda.py` (per-row top
    `skill_ratio` of |W| * a on the targets, and target > base) and
    `wanda/save_union_over_time.py` (the union over the first `--timesteps 10` steps with
    `--select_ratio 0.0`, weights zeroed), as `scripts/wanda.sh` runs them (`skill_ratio` 0.01).
    `top_fraction` is `skill_ratio`: a share of each output row's weights, so more than that share
    of the weights can end up zeroed (the union over steps). Departures: images are seeded per
    pair (the reference: one seed for every prompt); `first_steps` counts this model's steps
    (the reference's 10 are of SD's 50).

    `rule="unit"` keeps this project's earlier rule (`unit_mask`): whole input units, raw
    activations, top on targets and not on sources at `min_step_fraction` of all steps."""

    name = "concept_prune"

    def __init__(self, top_fraction: float = 0.01, rule: str = "weight", first_steps: int = 10, select_ratio: float = 0.0,
                 min_step_fraction: float = 0.5, num_inference_steps: int | None = None, seed: int = 0) -> None:  # fmt: skip
        if not 0 < top_fraction <= 1 or not 0 < min_step_fraction <= 1 or not 0 <= select_ratio < 1:
            raise ValueError(f"top_fraction and min_step_fraction must be in (0, 1] and select_ratio in [0, 1), got "
                             f"{top_fraction}, {min_step_fraction}, {select_ratio}")  # fmt: skip
        if rule not in ("weight", "unit") or first_steps < 1:
            raise ValueError(f"rule must be 'weight' or 'unit' and first_steps at least 1, got {rule!r}, {first_steps}")
        self.top_fraction, self.rule, self.first_steps, self.select_ratio = top_fraction, rule, first_steps, select_ratio
        self.min_step_fraction, self.num_inference_steps, self.seed = min_step_fraction, num_inference_steps, seed

    def _fit(self, model: Any, pairs: PromptPairs) -> None:
        super()._fit(model, pairs)
        weighted = self.rule == "weight"
        steps = self.first_steps if weighted else None
        norms = [{p: s.sum(1).sqrt() for p, s in ffn_input_squares(model, prompts, weighted, self.seed,
                                                                   self.num_inference_steps, steps).items()}
                 for prompts in (pairs.targets, pairs.sources)]  # fmt: skip
        weights = {n: m.weight for n, m in unet_of(model).named_modules() if n in norms[0]}
        masks = {}
        for path, weight in weights.items():
            if weighted:
                masks[path] = concept_prune_mask(weight, norms[0][path], norms[1][path], self.top_fraction, self.select_ratio)
            else:
                units = unit_mask(weight, norms[0][path], norms[1][path], self.top_fraction, self.min_step_fraction)
                masks[path] = units.to(weight.device).expand_as(weight).clone()
        self._set_masks(model, masks)


def fia_contrast(concept_norms: torch.Tensor, base_norms: torch.Tensor) -> torch.Tensor:
    """FIA's Eq. 2 per step and input unit: max(0, mu_c - mu_b - sigma_b) over per-image norms
    (steps, images, units); sigma_b the population standard deviation over base images."""
    mu_b, sigma_b = base_norms.mean(1), base_norms.var(1, unbiased=False).sqrt()
    return (concept_norms.mean(1) - mu_b - sigma_b).clamp_min(0)


def fia_sensitivity(weight: torch.Tensor, contrast: torch.Tensor, r1: float) -> torch.Tensor:
    """FIA's Eq. 3, (out, in): half the mean over steps of S_t = |W| * contrast_t, scaled by its
    maximum, plus half the share of steps where S_t exceeds its layer's top-r1 threshold (the
    max(1, int(r1 * numel))-th largest entry)."""
    w = weight.detach().abs().double()
    strength, frequency = torch.zeros_like(w), torch.zeros_like(w)
    for c in contrast:
        s = w * c
        strength += s
        frequency += s > s.flatten().topk(max(1, int(r1 * s.numel()))).values[-1]
    strength, frequency = strength / len(contrast), frequency / len(contrast)
    return 0.5 * strength / strength.max().clamp_min(1e-12) + 0.5 * frequency


def fia_concept_mask(sensitivity: torch.Tensor, r2: float) -> torch.Tensor:
    """FIA's Eq. 4-6: the top max(1, int(r2 * in)) of each output row, intersected with the top
    max(1, int(r2 * numel)) of the layer; entries with zero sensitivity are never selected."""
    channel = _top_per_row(sensitivity, max(1, int(r2 * sensitivity.shape[1])))
    flat = sensitivity.flatten()
    layer = torch.zeros_like(flat, dtype=torch.bool)
    layer[flat.topk(max(1, int(r2 * flat.numel()))).indices] = True
    return channel & layer.view_as(sensitivity) & (sensitivity > 0)


def fia_fuse(masks: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """FIA's Eq. 7-8: with s the number of concepts whose mask holds a weight, prune 0 < s <
    ceil(alpha * C); weights with s >= ceil(alpha * C) are concept-agnostic and kept. One concept
    (C = 1) prunes its mask (see `FIA`)."""
    s = torch.stack(list(masks)).sum(0)
    return s > 0 if len(masks) == 1 else (s > 0) & (s < math.ceil(alpha * len(masks)))


class FIA(_FFNPrune):
    """Forget-It-All: training-free FFN weight masks from contrastive saliency over time and space,
    keeping concept-agnostic weights (Deng et al. 2026, arXiv 2601.06163).

    Reference: `kaiyuan02415/Forget-It-All` at 4904518: `fia/hooks.py` (per image and step, the
    column norms of the row-normalised GEGLU output over the first `saliency_steps` 10 of 50
    steps), `fia/saliency.py` (Eq. 1-2: S_t = |W| * max(0, mu_c - mu_b - sigma_b)),
    `fia/neurons.py` (Eq. 3-6: `fia_sensitivity`, `fia_concept_mask`), `fia/mask_fusion.py`
    (Eq. 7-8: `fia_fuse`), with `configs/explicit.yaml`'s r1 0.05, r2 0.01, alpha 0.6. The
    concept's pairs give the concept and base prompts; `also` adds concepts fused with it.
    Departures: with one concept, Eq. 8's threshold ceil(alpha) = 1 marks every selected weight
    concept-agnostic, so the reference's fusion prunes nothing; the paper erases single concepts
    ("naked"), so one concept's mask is pruned as it is. Entries with zero sensitivity are never
    selected (the reference's `topk` can pick them among ties when a layer has no contrast).
    Images are seeded per pair (the reference: seed 1244 for every prompt); `saliency_steps`
    counts this model's steps."""

    name = "fia"

    def __init__(self, r1: float = 0.05, r2: float = 0.01, alpha: float = 0.6, saliency_steps: int = 10,
                 also: Sequence[PromptPairs] = (), num_inference_steps: int | None = None, seed: int = 0) -> None:  # fmt: skip
        if not (0 < r1 <= 1 and 0 < r2 <= 1 and 0 < alpha <= 1) or saliency_steps < 1:
            raise ValueError(f"r1, r2 and alpha must be in (0, 1] and saliency_steps at least 1, got {r1}, {r2}, "
                             f"{alpha}, {saliency_steps}")  # fmt: skip
        self.r1, self.r2, self.alpha, self.saliency_steps, self.also = r1, r2, alpha, saliency_steps, tuple(also)
        self.num_inference_steps, self.seed = num_inference_steps, seed

    def _concept_masks(self, model: Any, pairs: PromptPairs) -> dict[str, torch.Tensor]:
        concept, base = (ffn_input_squares(model, prompts, True, self.seed, self.num_inference_steps, self.saliency_steps)
                         for prompts in (pairs.targets, pairs.sources))  # fmt: skip
        weights = {n: m.weight for n, m in unet_of(model).named_modules() if n in concept}
        return {p: fia_concept_mask(fia_sensitivity(w, fia_contrast(concept[p].sqrt(), base[p].sqrt()), self.r1), self.r2)
                for p, w in weights.items()}  # fmt: skip

    def _fit(self, model: Any, pairs: PromptPairs) -> None:
        super()._fit(model, pairs)
        per_concept = [self._concept_masks(model, p) for p in (pairs, *self.also)]
        self._set_masks(model, {p: fia_fuse([m[p] for m in per_concept], self.alpha) for p in per_concept[0]})


__all__ = ["FIA", "ConceptPrune", "concept_prune_mask", "ffn_input_squares", "fia_concept_mask", "fia_contrast",
           "fia_fuse", "fia_sensitivity", "unit_mask"]  # fmt: skip
