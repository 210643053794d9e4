"""Site records of the fitter and the eraser: the site tables of a UNet and of a pipeline's text
encoders (found once per config), and sites as JSON for artifacts."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from diffusers import UNet2DConditionModel

from ..integrity import SHA256, ArtifactError, read_object, verify_files
from ..io import interrupted_hint
from ..sites import Site, discover_dit_sites, discover_sites, is_dit
from ..text_layers import ENCODERS, text_layer_sites

_SITE_TABLES: dict[str, list[Site]] = {}
_TEXT_TABLES: dict[str, list[Site]] = {}


def site_table(unet: UNet2DConditionModel) -> list[Site]:
    """Every site of `unet` in execution order, with shapes at the smallest latent the UNet accepts.
    Names, paths and order depend only on the UNet's config, so they are found once per config."""
    key = json.dumps([type(unet).__name__, dict(unet.config)], sort_keys=True, default=str)
    if key not in _SITE_TABLES:
        if is_dit(unet):  # a DiT (FLUX, SD3): its sites at a 4x4 latent and 8 text tokens
            _SITE_TABLES[key] = discover_dit_sites(unet)
        else:
            _SITE_TABLES[key] = discover_sites(unet, sample_size=2 ** (len(unet.config.block_out_channels) - 1))
    return list(_SITE_TABLES[key])


def text_site_table(pipe: Any) -> list[Site]:
    """Every text-encoder layer site of `pipe` (`text_layers.text_layer_sites`), found once per
    configuration of its encoders and tokenizers."""
    parts = []
    for name in ENCODERS:
        if (encoder := getattr(pipe, name, None)) is not None:
            tokenizer = getattr(pipe, name.replace("text_encoder", "tokenizer"), None)
            parts.append([name, encoder.config.to_dict(), getattr(tokenizer, "model_max_length", None)])
    key = json.dumps(parts, sort_keys=True, default=str)
    if key not in _TEXT_TABLES:
        _TEXT_TABLES[key] = text_layer_sites(pipe)
    return list(_TEXT_TABLES[key])


def model_sites(model: Any) -> list[Site]:
    """Every site of `model` in execution order: its text encoders' layers, then its UNet's
    (`site_table`). A bare UNet has the UNet's only; a DiT pipeline (FLUX, SD3) its transformer's
    (text-encoder layer sites are not offered on DiTs yet)."""
    pipeline = getattr(model, "pipeline", model)
    unet = getattr(pipeline, "unet", None)
    if getattr(pipeline, "transformer", None) is not None:
        return site_table(pipeline.transformer)
    if unet is None:
        return site_table(pipeline)
    return text_site_table(pipeline) + site_table(unet)


def site_to_dict(site: Site) -> dict[str, Any]:
    out = asdict(site)
    out["shape"] = list(site.shape)
    return out


def site_from_dict(data: dict[str, Any]) -> Site:
    """The site of `site_to_dict`; a record from before text-encoder sites (no `component`) is a UNet's."""
    return Site(**{**data, "shape": tuple(data["shape"])})


def read_manifest(folder: Path, name: str, fmt: str, files: tuple[str, ...], what: str, verify: bool) -> dict[str, Any]:
    """The manifest `name` of an artifact folder, checked for its format `fmt`, with the files it
    lists verified against their recorded sha256 (unless `verify=False`); format and hashes removed."""
    if not (folder / name).is_file():
        raise FileNotFoundError(f"no {what} in {folder} (expected {name}){interrupted_hint(folder, name)}")
    manifest = read_object(folder / name, f"{what} manifest")
    if manifest.pop("format", None) != fmt:
        raise ArtifactError(f"{folder / name} is not an {fmt} manifest")
    verify_files(folder, manifest.pop(SHA256, None), files, manifest=folder / name, verify=verify)
    return manifest
