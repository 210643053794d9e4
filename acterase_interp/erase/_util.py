"""Site records of the fitter and the eraser: the site table of a UNet (found once per config) and
sites as JSON for artifacts."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from diffusers import UNet2DConditionModel

from ..sites import Site, discover_sites

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
