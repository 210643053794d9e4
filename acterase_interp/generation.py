"""Seeded image generation, batched, one generator per image so every image is reproducible alone."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from nnsight import DiffusionModel
from tqdm.auto import tqdm

from .injection import Injection, TextInjection
from .text_layers import TextLayerInjection

__all__ = ["Injection", "TextInjection", "TextLayerInjection", "generate", "seed_list"]


def seed_list(seeds: int | Sequence[int], n: int) -> list[int]:
    """`n` seeds: `seeds, seeds+1, ...` for an int, or the given list (which must have length `n`)."""
    if isinstance(seeds, int):
        return [seeds + i for i in range(n)]
    seeds = list(seeds)
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} prompts")
    return seeds


@torch.no_grad()
def generate(
    model: DiffusionModel,
    prompts: str | Sequence[str],
    *,
    seeds: int | Sequence[int] = 0,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 64,
    progress: bool = True,
    inject: Injection | None = None,
) -> torch.Tensor:
    """Images for `prompts` as float (N, 3, H, W) in [0, 1], on the CPU. Steps and guidance default
    to `model.defaults`. Runs the raw pipeline, so an eraser switched on with `Eraser.applied` (or
    any forward hook) takes effect. With `inject` (a `TextInjection` or `TextLayerInjection`), prompt
    i reads `inject.prompts[i]`'s text where the injection says (in the chosen blocks' cross-attention
    or the chosen text-encoder layers); both lists are batched in lockstep."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    if inject is not None and len(inject.prompts) != len(prompts):
        raise ValueError(f"got {len(inject.prompts)} source prompts to inject for {len(prompts)} prompts: give one each")
    seeds = seed_list(seeds, len(prompts))
    d = model.defaults
    pipe = model.pipeline
    device = pipe.device
    out = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress or len(starts) == 1):
        chunk = slice(start, start + batch_size)
        with nullcontext() if inject is None else inject.applied(pipe, inject.prompts[chunk], prompts[chunk]):
            images = pipe(
                prompts[chunk],
                num_inference_steps=num_inference_steps or d.num_inference_steps,
                guidance_scale=d.guidance_scale if guidance_scale is None else guidance_scale,
                height=d.height,
                width=d.width,
                generator=[torch.Generator(device).manual_seed(s) for s in seeds[chunk]],
                output_type="pt",
            ).images
        out.append(images.float().cpu())
    return torch.cat(out)
