"""CASteer (ICLR 2026): steering vectors of cross-attention outputs, removed at inference only where
present. ActErase's twin at cross-attention: an activation intervention fitted on prompt pairs,
with no weight changed."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..erase.pairs import PromptPairs
from ..patching import patched, unet_of
from ..sites import is_dit
from .method import Method, dit_block_sites, per_image, read_sites, sites_of_kind


def _conditional_mean(x: torch.Tensor, n: int) -> torch.Tensor:
    """The mean over the conditional half's images and tokens (units,)."""
    return per_image(x.float(), n)[-1].mean((0, 1)).double()


def steering_vectors(target_means: torch.Tensor, source_means: torch.Tensor) -> torch.Tensor:
    """Per step, the difference of the mean cross-attention outputs, normalised to unit length."""
    diff = target_means - source_means
    return diff / diff.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def steer_away(x: torch.Tensor, vector: torch.Tensor, beta: float) -> torch.Tensor:
    """Each token's row x (.., units) with beta * <x, v> v removed where <x, v> > 0 (where the
    concept is present), then rescaled to its original norm; rows with <x, v> <= 0 are returned
    as they are (the reference rescales them by ||x|| / ||x||)."""
    v = vector.to(torch.float32)
    xf = x.float()
    sim = xf @ v
    steered = xf - beta * sim.clamp_min(0).unsqueeze(-1) * v
    steered = steered * (xf.norm(dim=-1, keepdim=True) / steered.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return torch.where((sim > 0).unsqueeze(-1), steered.to(x.dtype), x)


class _Steering:
    """The patch `CASteer.applied` switches on: every `attn2_out` site, per step (past the fitted
    steps, the last fitted step's vector, as the reference)."""

    def __init__(self, sites: tuple, vectors: dict[str, torch.Tensor], beta: float) -> None:
        self.sites, self.vectors, self.beta = sites, vectors, beta

    def __call__(self, site_name: str, x: torch.Tensor, step: int | None = None) -> torch.Tensor:
        v = self.vectors[site_name]
        return steer_away(x, v[min(step or 0, len(v) - 1)].to(x.device), self.beta)


class CASteer(Method):
    """CASteer's concept removal: at every transformer block's cross-attention output and step,
    v = normalise(mean over target prompts - mean over source prompts) of the conditional half's
    output averaged over tokens; at inference every token row of both guidance halves becomes
    x - beta <x, v>+ v rescaled to ||x|| (`steer_away`).

    Reference: `irenjzh/CASteer` at de6dcf0 (a fork of the authors' code): `controller.py`
    (`VectorStore.forward` with `steer_back`: sim = max(<x, v>, 0), x - beta sim v, renormalised;
    stored vectors: `vector[len//2:]`, the conditional half, averaged over batch and tokens),
    `compute_steering_vectors.py` (per step and layer, mean over pairs of positive minus
    negative, normalised), `generate_casteer.py` (`--beta` 2, every layer: `steer_only_up` off).
    The concept's pairs give the positive (targets) and negative (sources) prompts. Departures:
    images are seeded per pair (the reference: seed 0 for every prompt); a row whose steered
    norm is 0 stays 0 (the reference divides by 0).

    On a DiT (FLUX, SD3), which has no cross-attention, the steered sites are the joint blocks'
    image-stream attention outputs (item 0 of `transformer_blocks.<i>.attn`'s output, after its
    `to_out` projection, as the SD UNet's `attn2` output is), where text reaches the image tokens; FLUX's single blocks, whose attention output mixes both streams, are not steered."""

    name = "casteer"
    runs_on_dit = True

    def __init__(self, beta: float = 2.0, num_inference_steps: int | None = None, seed: int = 0) -> None:
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        self.beta, self.num_inference_steps, self.seed = beta, num_inference_steps, seed

    def _fit(self, model: Any, pairs: PromptPairs) -> None:
        super()._fit(model, pairs)
        dit = is_dit(unet_of(model))
        sites = dit_block_sites(model, "attn", "img_attn_out") if dit else sites_of_kind(model, "attn2_out")
        means = [read_sites(model, prompts, sites, _conditional_mean, self.seed, self.num_inference_steps)
                 for prompts in (pairs.targets, pairs.sources)]  # fmt: skip
        self.sites_ = tuple(sites)
        self.vectors_ = {s.name: steering_vectors(means[0][s.name], means[1][s.name]) for s in sites}

    @contextmanager
    def _erased(self, model: Any) -> Iterator[None]:
        with patched(model, _Steering(self.sites_, self.vectors_, self.beta)):
            yield


__all__ = ["CASteer", "steer_away", "steering_vectors"]
