"""One entry point for models: ConceptWorld (bundled), any SD 1.x/2.x diffusers pipeline, or a
pipeline object, returned wrapped for nnsight tracing with the raw pipeline at `.pipeline`."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from nnsight import DiffusionModel
from nnsight.modeling.diffusion import _PipelineModule

CONCEPTWORLD = "conceptworld"
DEFAULTS_FILE = "acterase.json"  # generation defaults shipped beside a pipeline


def data_dir() -> Path:
    """The project's data folder (`$ACTERASE_DATA`, else `data/` beside the package)."""
    return Path(os.environ.get("ACTERASE_DATA", Path(__file__).resolve().parents[1] / "data"))


def conceptworld_dir() -> Path:
    return data_dir() / "conceptworld"


@dataclass(frozen=True)
class GenerationDefaults:
    """How a model is sampled unless the caller says otherwise."""

    num_inference_steps: int = 30
    """Denoising steps (the paper's appendix: 30 DPM-Solver steps)."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale."""
    height: int | None = None
    """Image height in pixels; None: the pipeline's own default."""
    width: int | None = None
    """Image width in pixels; None: the pipeline's own default."""


def _read_defaults(directory: Path) -> GenerationDefaults:
    path = directory / DEFAULTS_FILE
    return GenerationDefaults(**json.loads(path.read_text())) if path.exists() else GenerationDefaults()


def load_pipeline(
    name_or_path: str | os.PathLike = CONCEPTWORLD,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    local_files_only: bool = False,
) -> StableDiffusionPipeline:
    """The raw diffusers pipeline for a name, a local directory or a hub id."""
    source = str(name_or_path)
    if source == CONCEPTWORLD:
        directory = conceptworld_dir() / "pipeline"
        if not (directory / "model_index.json").exists():
            raise FileNotFoundError(
                f"ConceptWorld weights are missing from {directory}. They live in the repository's "
                "data/ folder: install from a clone with `pip install -e .`, or point $ACTERASE_DATA at a "
                "copy of that folder, or train them with `python -m acterase_interp.world.train --out "
                "data/conceptworld`"
            )
        source, local_files_only = str(directory), True
    elif Path(source).expanduser().is_dir():
        source = str(Path(source).expanduser())
    elif source.startswith((".", "/", "~")) or Path(source).expanduser().exists():
        raise FileNotFoundError(f"no pipeline directory at {source}")
    elif not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        raise ValueError(
            f"unknown model {source!r}: give {CONCEPTWORLD!r}, a local diffusers pipeline directory, "
            "or a hub id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5'"
        )
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source, dtype=dtype, local_files_only=local_files_only, safety_checker=None, requires_safety_checker=False
        )
    except OSError as err:
        where = "in the local cache (local_files_only=True)" if local_files_only else "locally or on the hub"
        raise FileNotFoundError(f"could not load pipeline weights for {source!r} {where}: {err}") from err
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def wrap(pipeline: StableDiffusionPipeline, defaults: GenerationDefaults | None = None) -> DiffusionModel:
    """Wrap a ready pipeline for nnsight tracing; `model.pipeline` is the pipeline itself."""
    model = DiffusionModel(_PipelineModule(pipeline))
    object.__setattr__(model, "pipeline", pipeline)  # nnsight leaves it unset for a ready module
    object.__setattr__(model, "defaults", defaults or GenerationDefaults())
    return model


def load(
    name_or_path: str | os.PathLike | StableDiffusionPipeline = CONCEPTWORLD,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    local_files_only: bool = False,
) -> DiffusionModel:
    """A traceable model: "conceptworld" (bundled, offline), a local pipeline directory, a hub id,
    or a `StableDiffusionPipeline` object. `model.pipeline` is the raw pipeline and
    `model.defaults` its generation defaults."""
    if isinstance(name_or_path, StableDiffusionPipeline):
        return wrap(name_or_path)
    pipe = load_pipeline(name_or_path, device=device, dtype=dtype, local_files_only=local_files_only)
    return wrap(pipe, _read_defaults(Path(pipe.config._name_or_path or ".")))


def architecture_hash(pipeline: StableDiffusionPipeline) -> str:
    """A short hash of the UNet and text-encoder configs: artifacts fitted on one architecture
    refuse to load onto another."""
    unet = {k: v for k, v in dict(pipeline.unet.config).items() if not k.startswith("_")}
    text = pipeline.text_encoder.config.to_diff_dict()
    text = {k: text.get(k) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size")}
    blob = json.dumps({"unet": unet, "text": text}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
