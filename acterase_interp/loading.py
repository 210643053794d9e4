"""One entry point for models: ConceptWorld (bundled), any SD 1.x/2.x or SDXL diffusers pipeline,
or a pipeline object, returned wrapped for nnsight tracing with the raw pipeline at `.pipeline`;
and one for the concept classifiers that read ConceptWorld's images (`load_classifier`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import (
    DiffusionPipeline,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from huggingface_hub import hf_hub_download
from nnsight import DiffusionModel
from nnsight.modeling.diffusion import _PipelineModule

from .integrity import SHA256, ArtifactError, file_hashes, read_object, verify_files
from .io import atomic_write_json
from .world.classifier import ConceptClassifier
from .world.text_encoder import FROZEN_ENCODER_FILE, load_minilm

pipeline_logger = logging.getLogger("diffusers.pipelines.pipeline_utils")

CONCEPTWORLD = "conceptworld"
WORLDS: dict[str, str] = {CONCEPTWORLD: "conceptworld", "conceptworld-v1": "conceptworld-v1"}
"""Bundled model name -> its folder under the data folder. v2 (the default) conditions on a frozen
pretrained encoder and holds planted concepts; v1 trained its small text encoder jointly."""
BENCH = "conceptworld-bench"
"""The ground-truth benchmark's data folder; its classifier also reads the benchmark's new values."""
CLASSIFIERS: dict[str, tuple[str, str]] = {
    **{name: (folder, "python -m acterase_interp.world.train") for name, folder in WORLDS.items()},
    BENCH: (BENCH, "python -m acterase_interp.bench.classifier"),
}
"""Classifier name -> (its data folder, holding `classifier/`; the command that trains it)."""
DEFAULTS_FILE = "acterase.json"  # generation defaults shipped beside a pipeline
PLANTED_FILE = "planted.json"  # the ground truth of planted concepts, beside a pipeline
CONFIG_KEY = "_acterase"
"""Key of the generation defaults and planted records in the UNet's config: diffusers saves and reloads
private config keys untouched (and `architecture_hash` ignores them), so `save_pretrained` keeps them."""

Pipeline = StableDiffusionPipeline | StableDiffusionXLPipeline | FluxPipeline | StableDiffusion3Pipeline
"""The pipelines the toolkit runs: SD 1.x/2.x (one text encoder), SDXL (two, pooled embeddings, time
ids), and the diffusion transformers FLUX.1 (CLIP + T5) and SD3 (two CLIPs + T5), flow-matching."""
PIPELINE_KWARGS: dict[type, dict] = {
    StableDiffusionPipeline: {"safety_checker": None, "requires_safety_checker": False},
    StableDiffusionXLPipeline: {"add_watermarker": False},  # the invisible watermark would alter every image
    FluxPipeline: {},
    StableDiffusion3Pipeline: {},
}
"""Pipeline class -> keyword arguments `load_pipeline` gives its `from_pretrained`."""


DATA_ENV = "ACTERASE_DATA"


def shipped_data_dir() -> Path:
    """The data the package ships: `acterase_interp/data` in an installed wheel, `data/` in a clone."""
    package = Path(__file__).resolve().parent
    return package / "data" if (package / "data").is_dir() else package.parent / "data"


def data_path(*parts: str) -> Path:
    """`$ACTERASE_DATA/<parts>` where that exists, else the shipped `<parts>`: the variable overrides
    only what it holds (a retrained `conceptworld/` keeps the shipped configs and prompt pairs)."""
    override = os.environ.get(DATA_ENV)
    if override:
        if not Path(override).expanduser().is_dir():
            raise FileNotFoundError(f"${DATA_ENV} is set to {override!r}, which is not a folder")
        candidate = Path(override).expanduser().joinpath(*parts)
        if candidate.exists():
            return candidate
    return shipped_data_dir().joinpath(*parts)


def conceptworld_dir(name: str = CONCEPTWORLD) -> Path:
    """The folder of a bundled ConceptWorld model ("conceptworld" or "conceptworld-v1")."""
    if name not in WORLDS:
        raise ValueError(f"unknown bundled model {name!r}; choose from {sorted(WORLDS)}")
    return data_path(WORLDS[name])


def load_classifier(
    name_or_path: str | os.PathLike = CONCEPTWORLD, *, device: str | torch.device = "cpu"
) -> ConceptClassifier:
    """The concept classifier that reads ConceptWorld images, in eval mode: "conceptworld" (v2's,
    which reads every value, planted ones too), "conceptworld-v1", "conceptworld-bench" (the
    benchmark's, which also reads its new values), or a classifier folder."""
    source = str(name_or_path)
    if source in CLASSIFIERS:
        folder, command = CLASSIFIERS[source]
        directory = data_path(folder, "classifier")
        try:
            return ConceptClassifier.load(directory).to(device)
        except FileNotFoundError as err:  # name the command that trains this one
            raise FileNotFoundError(f"no {source} classifier in {directory}; train it with `{command}`") from err
    if Path(source).expanduser().is_dir():
        return ConceptClassifier.load(Path(source).expanduser()).to(device)
    if source.startswith((".", "/", "~")) or Path(source).expanduser().exists():
        raise FileNotFoundError(f"no classifier folder at {source}")
    raise ValueError(f"unknown classifier {source!r}: give one of {sorted(CLASSIFIERS)} or a classifier folder")


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


def denoiser(pipeline: Pipeline) -> torch.nn.Module:
    """The pipeline's denoiser: its UNet, or its transformer (FLUX, SD3)."""
    return pipeline.unet if getattr(pipeline, "unet", None) is not None else pipeline.transformer


def model_defaults(pipeline: Pipeline) -> GenerationDefaults:
    """Generation defaults of a pipeline that ships none: the model cards' for the DiTs (FLUX.1-dev
    28 steps at guidance 3.5, its embedded guidance; FLUX.1-schnell, which has no guidance embedding,
    4 steps unguided; SD3 28 steps at classifier-free guidance 7.0), else the paper's 30 at 7.5."""
    if isinstance(pipeline, FluxPipeline):
        guided = pipeline.transformer.config.guidance_embeds
        return GenerationDefaults(28, 3.5) if guided else GenerationDefaults(4, 0.0)
    if isinstance(pipeline, StableDiffusion3Pipeline):
        return GenerationDefaults(28, 7.0)
    return GenerationDefaults()


def _read_json(path: Path) -> dict | list | None:
    return json.loads(path.read_text()) if path.exists() else None


def _weight_files(directory: Path) -> list[str]:
    """The safetensors files of a pipeline folder, relative to it: what planted.json vouches for."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*.safetensors"))


def write_planted(directory: str | os.PathLike, planted: list[dict]) -> None:
    """Write planted.json into a saved pipeline folder (after its weights): the planted records and
    the sha256 of every weight file, which `load` checks. The planting code's writer."""
    directory = Path(directory)
    hashes = file_hashes(directory, _weight_files(directory))
    atomic_write_json({"planted": planted, SHA256: hashes}, directory / PLANTED_FILE)


def read_planted(directory: str | os.PathLike, *, verify: bool = True) -> list[dict] | None:
    """The planted records of a pipeline folder's planted.json, None if it has none. The folder's
    weight files must have the sha256 it recorded (`verify=False` skips the check): planted
    concepts are ground truth only for the weights they were planted in."""
    directory = Path(directory)
    path = directory / PLANTED_FILE
    if not path.is_file():
        return None
    data = read_object(path, "planted-concepts manifest")
    planted = data.get("planted")
    if not isinstance(planted, list) or not all(isinstance(r, dict) and isinstance(r.get("concept"), str) for r in planted):
        raise ArtifactError(f"{path} is not a valid planted-concepts manifest: 'planted' must list records with a concept")
    verify_files(directory, data.get(SHA256), _weight_files(directory), manifest=path, verify=verify)
    return planted


def _read_manifest(directory: Path, pipeline: Pipeline, verify: bool = True) -> tuple[GenerationDefaults, list[dict]]:
    """Generation defaults and planted records of a pipeline folder: from their own files, else
    from the UNet config (where `save_pretrained` of a loaded model wrote them)."""
    saved = denoiser(pipeline).config.get(CONFIG_KEY) or {}
    defaults = _read_json(directory / DEFAULTS_FILE) or saved.get("defaults")
    planted = read_planted(directory, verify=verify)
    defaults = GenerationDefaults(**defaults) if defaults else model_defaults(pipeline)
    return defaults, saved.get("planted", []) if planted is None else planted


class _ExpectedTypes(logging.Filter):
    """Drops diffusers' warning that a pipeline's text encoder is no CLIPTextModel: ConceptWorld v2's
    BERT encoder is one by design, and the pipeline calls it the same way."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Expected types for text_encoder")


def load_pipeline(
    name_or_path: str | os.PathLike = CONCEPTWORLD,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    local_files_only: bool = False,
) -> Pipeline:
    """The raw diffusers pipeline (SD 1.x/2.x or SDXL) for a name, a local directory or a hub id."""
    source = str(name_or_path)
    if source in WORLDS:
        directory = conceptworld_dir(source) / "pipeline"
        if not (directory / "model_index.json").exists():
            raise FileNotFoundError(
                f"ConceptWorld weights are missing from {directory}. The package ships them (a wheel "
                "or a clone of the repository); reinstall it, or point $ACTERASE_DATA at a folder holding "
                f"{WORLDS[source]}/, or train them with `python -m acterase_interp.world.train --out DIR`"
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
    text = {}
    if (Path(source) / FROZEN_ENCODER_FILE).exists():  # ConceptWorld v2: the encoder comes from its wheel
        encoder, tokenizer = load_minilm()
        text = {"text_encoder": encoder.to(dtype), "tokenizer": tokenizer}  # a passed component keeps its dtype
    quiet = _ExpectedTypes()
    pipeline_logger.addFilter(quiet)
    try:
        cls = _pipeline_class(source, local_files_only)
        options = dict(dtype=dtype, local_files_only=local_files_only, **PIPELINE_KWARGS[cls], **text)
        pipe = cls.from_pretrained(source, **options)
    except OSError as err:
        where = "in the local cache (local_files_only=True)" if local_files_only else "locally or on the hub"
        raise FileNotFoundError(f"could not load pipeline weights for {source!r} {where}: {err}") from err
    finally:
        pipeline_logger.removeFilter(quiet)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _pipeline_class(source: str, local_files_only: bool) -> type[Pipeline]:
    """The pipeline class that `model_index.json` of `source` (a folder or a hub id) declares, if
    the toolkit runs it."""
    index = Path(source) / "model_index.json"
    if not Path(source).is_dir():  # a hub id: the file from the cache, or downloaded
        index = Path(hf_hub_download(source, "model_index.json", local_files_only=local_files_only))
    name = json.loads(index.read_text()).get("_class_name")
    for cls in PIPELINE_KWARGS:
        if cls.__name__ == name:
            return cls
    known = ", ".join(cls.__name__ for cls in PIPELINE_KWARGS)
    raise ValueError(f"{source!r} is a {name}; acterase_interp runs {known} (text-to-image pipelines)")


def wrap(
    pipeline: Pipeline, defaults: GenerationDefaults | None = None, planted: list[dict] | None = None
) -> DiffusionModel:
    """Wrap a ready pipeline for nnsight tracing; `model.pipeline` is the pipeline itself,
    `model.defaults` its generation defaults and `model.planted` the records of its planted
    concepts. Both are also put into the UNet's config, so `model.pipeline.save_pretrained(dir)`
    writes a folder that `load(dir)` reads back whole."""
    saved = denoiser(pipeline).config.get(CONFIG_KEY) or {}
    defaults = defaults or (GenerationDefaults(**saved["defaults"]) if "defaults" in saved else model_defaults(pipeline))
    planted = planted if planted is not None else saved.get("planted", [])
    denoiser(pipeline).register_to_config(**{CONFIG_KEY: {"defaults": asdict(defaults), "planted": planted}})
    with warnings.catch_warnings():
        # BERT layers hold submodules named `output`; nnsight serves them as `.E_output` and says so, per layer.
        warnings.filterwarnings("ignore", message=r"Module .* has a submodule named 'output'")
        model = DiffusionModel(_PipelineModule(pipeline))
    object.__setattr__(model, "pipeline", pipeline)  # nnsight leaves it unset for a ready module
    object.__setattr__(model, "defaults", defaults)
    object.__setattr__(model, "planted", planted)
    return model


def load(
    name_or_path: str | os.PathLike | Pipeline = CONCEPTWORLD,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    local_files_only: bool = False,
    verify: bool = True,
) -> DiffusionModel:
    """A traceable model: "conceptworld" (bundled v2, offline), "conceptworld-v1", a local pipeline
    directory or a hub id (SD 1.x/2.x or SDXL), or a `StableDiffusionPipeline` or
    `StableDiffusionXLPipeline` object. `model.pipeline` is the raw pipeline, `model.defaults` its
    generation defaults and `model.planted` its planted concepts (from planted.json, whose
    recorded weight hashes are checked unless `verify=False`: `read_planted`)."""
    if isinstance(name_or_path, tuple(PIPELINE_KWARGS)):
        return wrap(name_or_path)
    if isinstance(name_or_path, DiffusionPipeline):
        raise TypeError(f"acterase_interp runs SD 1.x/2.x, SDXL, FLUX and SD3 pipelines, not a {type(name_or_path).__name__}")
    pipe = load_pipeline(name_or_path, device=device, dtype=dtype, local_files_only=local_files_only)
    return wrap(pipe, *_read_manifest(Path(pipe.config._name_or_path or "."), pipe, verify))


def architecture_hash(pipeline: Pipeline) -> str:
    """A short hash of the UNet and text-encoder configs: artifacts fitted on one architecture
    refuse to load onto another. SDXL's second text encoder counts too (SD 1.x/2.x hashes are
    unchanged by it: they have none). A DiT's transformer config counts under its own key, and so
    does SD3's third encoder."""
    unet = {k: v for k, v in dict(denoiser(pipeline).config).items() if not k.startswith("_")}
    parts = {"unet" if getattr(pipeline, "unet", None) is not None else "transformer": unet,
             "text": _text_shape(pipeline.text_encoder)}  # fmt: skip
    for i in (2, 3):
        if getattr(pipeline, f"text_encoder_{i}", None) is not None:
            parts[f"text_{i}"] = _text_shape(getattr(pipeline, f"text_encoder_{i}"))
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _text_shape(encoder: torch.nn.Module) -> dict:
    config = encoder.config.to_diff_dict()
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size")
    keys += ("d_model", "num_layers", "d_ff") if config.get("model_type") == "t5" else ()  # T5 names its widths so
    return {k: config.get(k) for k in keys}
