"""Seeded image generation, batched, one generator per image so every image is reproducible alone."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from nnsight import DiffusionModel
from tqdm.auto import tqdm


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
) -> torch.Tensor:
    """Images for `prompts` as float (N, 3, H, W) in [0, 1], on the CPU. Steps and guidance default
    to `model.defaults`. Runs the raw pipeline, so an eraser switched on with `Eraser.applied` (or
    any forward hook) takes effect."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    seeds = seed_list(seeds, len(prompts))
    d = model.defaults
    pipe = model.pipeline
    device = pipe.device
    out = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress or len(starts) == 1):
        chunk = slice(start, start + batch_size)
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
