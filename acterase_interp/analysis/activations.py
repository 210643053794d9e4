"""Site activations of ordinary generations (each prompt on its own trajectory), averaged over
tokens and denoising steps: one feature vector per image, e.g. for linear probes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..generation import generate, seed_list
from ..hooks import Hooks, Window
from ..patching import hook_site, to_tokens, unet_of
from ..sites import Site

ROWS = ("cond", "uncond", "both")


def collect_activations(
    model: Any,
    prompts: Sequence[str],
    sites: Sequence[Site],
    *,
    seeds: int | Sequence[int] = 0,
    steps: Window | None = None,
    rows: str = "cond",
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Per site, a (prompts, units) tensor: the activation averaged over tokens and over the
    denoising steps in `steps` (default all), from the classifier-free-guidance `rows` ("cond",
    "uncond" or both averaged). Image i is seeded as `generate` seeds it."""
    if rows not in ROWS:
        raise ValueError(f"rows={rows!r} is not one of {ROWS}")
    prompts = list(prompts)
    seeds = seed_list(seeds, len(prompts))
    unet = unet_of(model)
    out: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
    for start in tqdm(range(0, len(prompts), batch_size), desc="activations", disable=not progress):
        chunk = slice(start, start + batch_size)
        n = len(prompts[chunk])
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        with Hooks() as hooks:
            counter = hooks.count_steps(unet)
            for site in sites:

                def read(x: torch.Tensor, name: str = site.name) -> torch.Tensor:
                    if not counter.within(steps):
                        return x
                    mean = to_tokens(x.detach()).float().mean(1)  # (batch, units)
                    if mean.shape[0] == 2 * n:  # CFG: [uncond rows, cond rows]
                        mean = {"cond": mean[n:], "uncond": mean[:n], "both": (mean[:n] + mean[n:]) / 2}[rows]
                    sums[name] = sums.get(name, 0) + mean.cpu()
                    counts[name] = counts.get(name, 0) + 1
                    return x  # a read: the activation passes unchanged

                hook_site(unet, site, read, hooks)
            generate(model, prompts[chunk], seeds=seeds[chunk], num_inference_steps=num_inference_steps,
                     guidance_scale=guidance_scale, batch_size=batch_size, progress=False)  # fmt: skip
        missing = [s.name for s in sites if s.name not in sums]
        if missing:
            raise ValueError(f"sites {missing} were never read: is the window {steps} inside the sampling steps?")
        for name in out:
            out[name].append(sums[name] / counts[name])
    return {name: torch.cat(parts) for name, parts in out.items()}
