"""Stable Diffusion 1.5, 2.1, SDXL, FLUX.1 and SD3 architectures with random weights, built offline
from the real configs.

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

The diffusion transformers (MM-DiTs, no UNet) come the same way: `flux-dev` (FLUX.1-dev: 19
double-stream and 38 single-stream blocks, guidance embedding, CLIP-L and T5-XXL encoders, 11.9
billion transformer parameters) and `sd3-medium` (SD3 medium: 24 joint blocks, the last of which
keeps no text stream, CLIP-L, OpenCLIP bigG and T5-XXL encoders, 2.03 billion), with `flux-tiny`
and `sd3-tiny`: every block type, conditioning input and encoder at tiny widths and a few blocks
(2 double + 3 single; 3 joint, the last text-free), for tests that run the whole pipeline on a CPU.
Every text encoder, T5 included, takes ConceptWorld's offline tokenizer (see `build_random_sd`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from .loading import Pipeline, data_path
from .world.tokenizer import build_tokenizer

VERSIONS: dict[str, str] = {
    "1.5": "sd15", "2.1": "sd21", "xl": "sdxl", "xl-tiny": "sdxl-tiny",
    "flux-dev": "flux-dev", "flux-tiny": "flux-tiny", "sd3-medium": "sd3-medium", "sd3-tiny": "sd3-tiny",
}  # fmt: skip
"""Model version -> folder of its configs under `data/configs`."""
TRANSFORMERS: dict[str, tuple[type, type]] = {
    "FluxTransformer2DModel": (FluxTransformer2DModel, FluxPipeline),
    "SD3Transformer2DModel": (SD3Transformer2DModel, StableDiffusion3Pipeline),
}
"""A DiT's `_class_name` -> (its class, the pipeline that runs it)."""
DEVICES = ("cpu", "meta")


def config_dir(version: str) -> Path:
    """The folder holding the configs of SD `version` (a key of `VERSIONS`)."""
    if version not in VERSIONS:
        raise ValueError(f"unknown Stable Diffusion version {version!r}; choose from {sorted(VERSIONS)}")
    directory = data_path("configs", VERSIONS[version])
    if not any((directory / part / "config.json").exists() for part in ("unet", "transformer")):
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


def _text_encoder(directory: Path, name: str) -> CLIPTextModel | CLIPTextModelWithProjection | T5EncoderModel:
    config = _read(directory / name / "config.json")
    if config["architectures"][0] == "T5EncoderModel":
        return T5EncoderModel(T5Config.from_dict(config)).eval()
    kind = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}
    return kind[config["architectures"][0]](CLIPTextConfig.from_dict(config)).eval()


def build_random_sd(
    version: str, seed: int = 0, sample_size: int | None = None, *, device: str = "cpu"
) -> Pipeline:
    """A pipeline with `version`'s architecture (a key of `VERSIONS`) and random
    weights drawn from `seed`, sampled with DPM-Solver++ on the version's noise schedule: a
    `StableDiffusionPipeline`, or for "xl"/"xl-tiny" a `StableDiffusionXLPipeline`.

    `sample_size` sets the UNet's latent side (default: the real 64 for SD 1.5/2.1, i.e. 512-pixel
    images, 128 for SDXL, 1024 pixels); a small one such as 16 keeps CPU runs cheap without
    changing any weight shape. Float32 parameters: about 1.1 (SD 1.5) to 1.3 (SD 2.1) billion,
    4-5 GB; SDXL 3.47 billion (UNet 2.57), 13.9 GB; "xl-tiny" 27 million. `device="meta"` builds
    the modules without memory or weights: enough for site tables, shapes and memory budgets.

    The tokenizers are ConceptWorld's offline one, since CLIP's BPE vocabulary cannot be downloaded:
    its few hundred ids all index rows of the 49,408-row embedding tables, which is all the text
    encoders need, and every word of ConceptWorld's captions is one token. The T5 encoders of the
    DiTs take it too (its ids all index T5's 32,128-row table): T5's SentencePiece model cannot be
    downloaded either, and no image of random weights depends on which ids a word gets.

    The DiTs ("flux-dev", "sd3-medium", "flux-tiny", "sd3-tiny": `build_random_dit`) are sampled with
    their flow-matching Euler scheduler; `sample_size` is then the pipeline's default latent side."""
    directory = config_dir(version)
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES} (build, then move with .to()), got {device!r}")
    if (directory / "transformer").is_dir():
        return build_random_dit(directory, seed, sample_size, device)
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


def _encoder_names(directory: Path) -> list[str]:
    return [n for n in ("text_encoder", "text_encoder_2", "text_encoder_3") if (directory / n).is_dir()]


def build_random_dit(
    directory: Path, seed: int, sample_size: int | None, device: str
) -> FluxPipeline | StableDiffusion3Pipeline:
    """The FLUX or SD3 pipeline of the configs in `directory` (a DiT's; see `build_random_sd`)."""
    config = _read(directory / "transformer" / "config.json")
    transformer_cls, pipeline_cls = TRANSFORMERS[config["_class_name"]]
    if sample_size is not None and sample_size < 2:
        raise ValueError(f"sample_size must be at least 2 latent pixels (one 2x2 patch), got {sample_size}")
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        transformer = transformer_cls.from_config(config).eval()
        vae = AutoencoderKL.from_config(_read(directory / "vae" / "config.json")).eval()
        encoders = {n: _text_encoder(directory, n) for n in _encoder_names(directory)}
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = encoders["text_encoder"].config.max_position_embeddings  # CLIP's 77 tokens
    tokenizers = {n.replace("text_encoder", "tokenizer"): tokenizer for n in encoders}
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(_read(directory / "scheduler" / "scheduler_config.json"))
    pipe = pipeline_cls(transformer=transformer, vae=vae, scheduler=scheduler, **encoders, **tokenizers)
    if sample_size is not None:
        pipe.default_sample_size = sample_size  # both pipelines size their default image by it
    pipe.set_progress_bar_config(disable=True)
    return pipe
