"""The denoising schedule of the diffusion-transformer pipelines (FLUX, SD3), as their transformer sees it.

Their flow-matching Euler scheduler steps through sigmas falling from 1, not integer timesteps, and
FLUX shifts them by the image's size (`mu`, from the number of latent tokens). Per-step statistics
and per-step erasers key their steps to the values the transformer receives at each call: FLUX's
sigma (`timestep / 1000`, in the latents' dtype), SD3's `1000 * sigma`. Computing them the way each
pipeline does lets the fitter check every call and a per-step eraser refuse another schedule.
"""

from __future__ import annotations

import inspect

import numpy as np
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift


def _shift(scheduler, image_tokens: int, max_shift: float) -> dict:
    """The resolution-dependent shift `mu` where the scheduler uses one (as both pipelines compute it)."""
    config = scheduler.config
    if not config.get("use_dynamic_shifting"):
        return {}
    mu = calculate_shift(image_tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", max_shift))  # fmt: skip
    return {"mu": mu}


def denoiser_timesteps(pipe, num_inference_steps: int, height: int, width: int) -> tuple[float, ...]:
    """The timestep values the transformer of a FLUX or SD3 pipeline receives at each of its
    `num_inference_steps` calls for `height` x `width`-pixel images."""
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    tokens = (height // pipe.vae_scale_factor // 2) * (width // pipe.vae_scale_factor // 2)  # 2x2 latent patches
    n = num_inference_steps
    if isinstance(pipe, FluxPipeline):
        sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / n, n)
        scheduler.set_timesteps(n, sigmas=sigmas, **_shift(scheduler, tokens, 1.15))
        dtype = pipe.transformer.dtype
        return tuple(float(t.expand(1).to(dtype) / 1000) for t in scheduler.timesteps)
    if isinstance(pipe, StableDiffusion3Pipeline):
        scheduler.set_timesteps(n, **_shift(scheduler, tokens, 1.16))
        return tuple(float(t) for t in scheduler.timesteps)
    raise TypeError(f"flow-matching schedules are known for FLUX and SD3 pipelines, not a {type(pipe).__name__}")


def text_tokens(pipe) -> int:
    """Text tokens of the joint sequence at the pipeline's defaults: FLUX's T5 tokens
    (`max_sequence_length`, 512), SD3's 77 CLIP tokens plus its T5 tokens (256)."""
    t5 = inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default
    return t5 + (pipe.tokenizer_max_length if isinstance(pipe, StableDiffusion3Pipeline) else 0)
