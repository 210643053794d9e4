"""Stable Diffusion 1.5, 2.1 and SDXL architectures with random weights, built offline from the real configs.

SD weights cannot be downloaded on the project's machines, yet every code path that a user runs
on real SD (site discovery, shapes, hooks, saving and loading) must be tested on SD's true layout:
16 UNet transformer blocks, 320/640/1280 channels, a 768- or 1024-wide text encoder; for SDXL, 70
transformer layers (1, 2 and 10 per attention module at the three levels, none in the first down
block), two text encoders, pooled embeddings and time ids. These pipelines have exactly that
layout and random weights, so their images are noise.

The configs (UNet, text encoders, VAE, scheduler) are the published ones, stored in
`data/configs/sd15`, `sd21` and `sdxl` (SDXL base 1.0). `sdxl-tiny` keeps SDXL's layout (every
block type, layer count and conditioning input) at 1/10 of its widths, for tests that run the
whole pipeline on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .loading import Pipeline, data_path
from .world.tokenizer import build_tokenizer

VERSIONS: dict[str, str] = {"1.5": "sd15", "2.1": "sd21", "xl": "sdxl", "xl-tiny": "sdxl-tiny"}
"""SD version -> folder of its configs under `data/configs`."""
DEVICES = ("cpu", "meta")


def config_dir(version: str) -> Path:
    """The folder holding the configs of SD `version` (a key of `VERSIONS`)."""
    if version not in VERSIONS:
        raise ValueError(f"unknown Stable Diffusion version {version!r}; choose from {sorted(VERSIONS)}")
    directory = data_path("configs", VERSIONS[version])
    if not (directory / "unet" / "config.json").exists():
        raise FileNotFoundError(f"no Stable Diffusion {version} configs in {directory}")
    return directory


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _unet_config(directory: Path, sample_size: int | None) -> dict:
    config = _read(directory / "unet" / "config.json")
    if sample_size is not None:
        step = 2 ** (len(config["block_out_channels"]) - 1)  # the UNet halves the latent side this often
        if sample_size < step or sample_size % step:
            raise ValueError(f"sample_size must be a positive multiple of {step} latent pixels, got {sample_size}")
        config["sample_size"] = sample_size
    return config


def _text_encoder(directory: Path, name: str) -> CLIPTextModel | CLIPTextModelWithProjection:
    config = _read(directory / name / "config.json")
    kind = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}
    return kind[config["architectures"][0]](CLIPTextConfig.from_dict(config)).eval()


def build_random_sd(
    version: str, seed: int = 0, sample_size: int | None = None, *, device: str = "cpu"
) -> Pipeline:
    """A pipeline with SD `version`'s architecture ("1.5", "2.1", "xl" or "xl-tiny") and random
    weights drawn from `seed`, sampled with DPM-Solver++ on the version's noise schedule: a
    `StableDiffusionPipeline`, or for "xl"/"xl-tiny" a `StableDiffusionXLPipeline`.

    `sample_size` sets the UNet's latent side (default: the real 64 for SD 1.5/2.1, i.e. 512-pixel
    images, 128 for SDXL, 1024 pixels); a small one such as 16 keeps CPU runs cheap without
    changing any weight shape. Float32 parameters: about 1.1 (SD 1.5) to 1.3 (SD 2.1) billion,
    4-5 GB; SDXL 3.47 billion (UNet 2.57), 13.9 GB; "xl-tiny" 27 million. `device="meta"` builds
    the modules without memory or weights: enough for site tables, shapes and memory budgets.

    The tokenizers are ConceptWorld's offline one, since CLIP's BPE vocabulary cannot be downloaded:
    its few hundred ids all index rows of the 49,408-row embedding tables, which is all the text
    encoders need, and every word of ConceptWorld's captions is one token."""
    directory = config_dir(version)
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES} (build, then move with .to()), got {device!r}")
    unet_config = _unet_config(directory, sample_size)
    xl = (directory / "text_encoder_2").is_dir()
    with torch.random.fork_rng(devices=[]), torch.device(device):  # seeded without touching the caller's RNG
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(unet_config).eval()
        vae = AutoencoderKL.from_config(_read(directory / "vae" / "config.json")).eval()
        encoders = [_text_encoder(directory, n) for n in ("text_encoder", "text_encoder_2")[: 1 + xl]]
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = encoders[0].config.max_position_embeddings  # SD's 77-token context
    scheduler = DPMSolverMultistepScheduler.from_config(
        _read(directory / "scheduler" / "scheduler_config.json"), algorithm_type="dpmsolver++"
    )
    common = dict(vae=vae, text_encoder=encoders[0], tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    if xl:
        pipe = StableDiffusionXLPipeline(
            **common, text_encoder_2=encoders[1], tokenizer_2=tokenizer, add_watermarker=False
        )
    else:
        pipe = StableDiffusionPipeline(
            **common, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe
