"""ConceptWorld's architecture: a small but genuine `StableDiffusionPipeline`.

VAE 32x32x3 -> 8x8x4; a 3-layer, 64-wide CLIP text encoder; a UNet with cross-attention down, mid
and up blocks (7 transformer blocks in all); DPM-Solver++ for sampling.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import BertModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..io import atomic_write_json
from ..loading import CONFIG_KEY, DEFAULTS_FILE, GenerationDefaults, write_planted
from . import text_encoder
from .tokenizer import MAX_LENGTH

TEXT_WIDTH = 64
DEFAULT_GUIDANCE = 3.0  # guidance 7.5 over-saturates a model this small
DEFAULT_STEPS = 20
DEFAULTS = GenerationDefaults(DEFAULT_STEPS, DEFAULT_GUIDANCE, height=32, width=32)

_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def build_text_encoder(vocab_size: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=TEXT_WIDTH,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config)


def build_unet(cross_attention_dim: int = TEXT_WIDTH) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128),
        layers_per_block=1,
        norm_num_groups=16,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
    )


def build_train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**_SCHEDULE, prediction_type="epsilon")


def build_sample_scheduler() -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(**_SCHEDULE, prediction_type="epsilon", algorithm_type="dpmsolver++")


def write_defaults(directory: Path) -> None:
    """Record ConceptWorld's generation defaults beside its pipeline, where `load` reads them."""
    atomic_write_json(asdict(DEFAULTS), Path(directory) / DEFAULTS_FILE)


def save_world(pipeline: StableDiffusionPipeline, directory: Path, planted: list[dict] | None = None) -> None:
    """Save a ConceptWorld pipeline with its generation defaults and planted records, whole or not
    at all (written beside, then swapped in). A frozen MiniLM encoder is not copied (90 MB):
    `text_encoder.json` names the wheel that `loading.load` takes it from."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    manifest = {**(pipeline.unet.config.get(CONFIG_KEY) or {}), "defaults": asdict(DEFAULTS), "planted": planted or []}
    pipeline.unet.register_to_config(**{CONFIG_KEY: manifest})
    pipeline.save_pretrained(tmp, safe_serialization=True)
    write_defaults(tmp)
    if isinstance(pipeline.text_encoder, BertModel):
        for part in ("text_encoder", "tokenizer"):
            shutil.rmtree(tmp / part)
        frozen = {"package": text_encoder.PACKAGE, "sha256": text_encoder.SHA256}
        atomic_write_json(frozen, tmp / text_encoder.FROZEN_ENCODER_FILE)
    if planted:
        write_planted(tmp, planted)  # last: it hashes the weight files as they stay
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def assemble(
    vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, unet: UNet2DConditionModel
) -> StableDiffusionPipeline:
    """The components as a pipeline with no safety checker (none exists for this world)."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_sample_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
