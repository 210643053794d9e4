"""Small helpers shared by the fitter and the eraser: the (tokens, units) view of an activation,
module lookup in an nnsight envoy tree, site (de)serialisation and atomic artifact folders."""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from ..sites import Site, discover_sites


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(batch, tokens, units) view of an activation: transformer activations already are; a UNet
    output (batch, C, H, W) becomes (batch, H*W, C), so a "unit" is a channel."""
    if x.ndim == 3:
        return x
    if x.ndim == 4:
        return x.flatten(2).transpose(1, 2)
    raise ValueError(f"expected a (batch, tokens, units) or (batch, C, H, W) activation, got shape {tuple(x.shape)}")


def from_tokens(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of `to_tokens` for an activation of the given original shape."""
    return x if len(shape) == 3 else x.transpose(1, 2).reshape(shape)


def timestep_value(timestep: Any) -> float:
    """A UNet call's timestep as a float (a scalar, a 0-d tensor, or a per-row tensor of equal entries)."""
    return float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)


def envoy_at(root: Any, path: str) -> Any:
    """The envoy (or module) at a dotted module path below `root` ("" is `root` itself)."""
    for part in path.split(".") if path else ():
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def unet_of(model: Any) -> UNet2DConditionModel:
    """The UNet of an nnsight DiffusionModel or of a diffusers pipeline."""
    pipeline = getattr(model, "pipeline", model)
    unet = getattr(pipeline, "unet", None)
    if not isinstance(unet, torch.nn.Module):
        raise TypeError(f"expected an acterase_interp model or a pipeline with a UNet, got {type(model).__name__}")
    return unet


_SITE_TABLES: dict[str, list[Site]] = {}


def site_table(unet: UNet2DConditionModel) -> list[Site]:
    """Every site of `unet` in execution order, with shapes at the smallest latent the UNet accepts.
    Names, paths and order depend only on the UNet's config, so they are found once per config."""
    key = json.dumps(dict(unet.config), sort_keys=True, default=str)
    if key not in _SITE_TABLES:
        _SITE_TABLES[key] = discover_sites(unet, sample_size=2 ** (len(unet.config.block_out_channels) - 1))
    return list(_SITE_TABLES[key])


def site_to_dict(site: Site) -> dict[str, Any]:
    out = asdict(site)
    out["shape"] = list(site.shape)
    return out


def site_from_dict(data: dict[str, Any]) -> Site:
    return Site(**{**data, "shape": tuple(data["shape"])})


def write_artifact_dir(path: str | Path, marker: str, write: Callable[[Path], None]) -> None:
    """Write a folder atomically: `write` fills a temporary sibling folder that then replaces
    `path`. An existing folder is replaced only if it is an artifact of this kind (holds `marker`)."""
    path = Path(path).expanduser()
    if path.exists() and not (path / marker).exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an artifact folder (no {marker}); refusing to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        write(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
