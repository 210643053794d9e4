"""Stable Diffusion 1.5 and 2.1 architectures with random weights, built offline from the real configs.

SD weights cannot be downloaded on the project's machines, yet every code path that a user runs
on real SD (site discovery, shapes, hooks, saving and loading) must be tested on SD's true layout:
16 UNet transformer blocks, 320/640/1280 channels, a 768- or 1024-wide text encoder. These
pipelines have exactly that layout and random weights, so their images are noise.

The configs (UNet, text encoder, VAE, scheduler) are the published ones, stored in
`data/configs/sd15` and `data/configs/sd21`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .loading import data_path
from .world.tokenizer import build_tokenizer

VERSIONS: dict[str, str] = {"1.5": "sd15", "2.1": "sd21"}
"""SD version -> folder of its configs under `data/configs`."""


def config_dir(version: str) -> Path:
    """The folder holding the configs of SD `version` ("1.5" or "2.1")."""
    if version not in VERSIONS:
        raise ValueError(f"unknown Stable Diffusion version {version!r}; choose from {sorted(VERSIONS)}")
    directory = data_path("configs", VERSIONS[version])
    if not (directory / "unet" / "config.json").exists():
        raise FileNotFoundError(f"no Stable Diffusion {version} configs in {directory}")
    return directory


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def build_random_sd(version: str, seed: int = 0, sample_size: int | None = None) -> StableDiffusionPipeline:
    """A `StableDiffusionPipeline` with SD `version`'s architecture ("1.5" or "2.1") and random
    weights drawn from `seed`, sampled with DPM-Solver++ on the version's noise schedule.

    `sample_size` sets the UNet's latent side (default: the real 64, i.e. 512-pixel images); a
    small one such as 16 keeps CPU runs cheap without changing any weight shape. About 1.1 (SD 1.5)
    to 1.3 (SD 2.1) billion float32 parameters: 4-5 GB of memory.

    The tokenizer is ConceptWorld's offline one, since CLIP's BPE vocabulary cannot be downloaded:
    its few hundred ids all index rows of the 49,408-row embedding table, which is all the text
    encoder needs, and every word of ConceptWorld's captions is one token."""
    directory = config_dir(version)
    unet_config = _read(directory / "unet" / "config.json")
    if sample_size is not None:
        if sample_size < 8 or sample_size % 8:  # three 2x downsamplings need a side divisible by 8
            raise ValueError(f"sample_size must be a positive multiple of 8 latent pixels, got {sample_size}")
        unet_config["sample_size"] = sample_size
    text_config = CLIPTextConfig.from_dict(_read(directory / "text_encoder" / "config.json"))
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's global RNG
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(_read(directory / "vae" / "config.json"))
        text_encoder = CLIPTextModel(text_config)
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = text_config.max_position_embeddings  # SD's 77-token context
    scheduler = DPMSolverMultistepScheduler.from_config(
        _read(directory / "scheduler" / "scheduler_config.json"), algorithm_type="dpmsolver++"
    )
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
