"""Several concepts in one eraser (Eqs. 7-9 of the paper)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import reduce

import torch

from ..provenance import library_versions
from .eraser import Eraser


def _check_compatible(erasers: list[Eraser]) -> None:
    for i, e in enumerate(erasers):
        if not isinstance(e, Eraser):
            raise TypeError(f"item {i} is a {type(e).__name__}, not an Eraser")
    hashes = [e.manifest["architecture_hash"] for e in erasers]
    if len(set(hashes)) > 1:
        raise ValueError(f"erasers fitted on different architectures (hashes {hashes}) cannot be merged")
    names = [s.name for s in erasers[0].sites]
    for i, e in enumerate(erasers[1:], 1):
        other = [s.name for s in e.sites]
        if other != names:
            raise ValueError(
                f"eraser {i} patches sites {other}, eraser 0 patches {names}: erasers to merge must patch the "
                "same sites (fit them with the same site_kind and blocks)"
            )
        for n in names:
            mine, theirs = tuple(e.values[n].shape[1:]), tuple(erasers[0].values[n].shape[1:])
            if mine != theirs:
                raise ValueError(f"site {n!r}: eraser {i} has (tokens, units) {mine}, eraser 0 {theirs} (image sizes?)")
    steps = {e.num_steps for e in erasers} - {None}
    if len(steps) > 1:
        raise ValueError(f"per-step erasers with different step counts {sorted(steps)} cannot be merged")
    timesteps = {tuple(e.manifest.get("timesteps") or ()) for e in erasers if e.num_steps is not None}
    if len(timesteps) > 1:
        raise ValueError("per-step erasers fitted with different timesteps cannot be merged")


def _drop_constant_steps(value: torch.Tensor) -> torch.Tensor:
    """(steps, tokens, units) -> (1, tokens, units) when every step holds the same value."""
    return value[:1] if value.shape[0] > 1 and torch.equal(value, value[:1].expand_as(value)) else value


def merge(erasers: Sequence[Eraser]) -> Eraser:
    """One eraser for several concepts: M = OR_i M_i (Eq. 7) and, where M is on,
    x_avg = sum_i M_i x_avg_i / max(1, sum_i M_i) (Eqs. 8-9), the mean of the values of the
    erasers that mask the entry. Where no eraser masks an entry its value is never used; it is set
    to the plain mean of the values, so merging a single eraser returns its masks and values.

    The erasers must share the architecture, the sites and the image size (clear errors otherwise)."""
    erasers = list(erasers)
    if not erasers:
        raise ValueError("merge needs at least one eraser")
    _check_compatible(erasers)
    masks, values = {}, {}
    for site in erasers[0].sites:
        ms = [e.masks[site.name] for e in erasers]
        vs = [e.values[site.name] for e in erasers]
        masks[site.name] = reduce(torch.logical_or, ms)
        weights = [m.to(v.dtype) for m, v in zip(ms, vs)]
        count = sum(weights)
        total = sum(w * v for w, v in zip(weights, vs))
        mean = sum(vs) / len(vs)
        values[site.name] = _drop_constant_steps(torch.where(count > 0, total / count.clamp_min(1), mean))
    first = erasers[0].manifest
    manifest = {
        "architecture_hash": first["architecture_hash"],
        "concepts": [e.manifest.get("pairs", {}).get("concept", "custom") for e in erasers],
        "merged_from": [e.manifest for e in erasers],
        "versions": library_versions(),
    }
    for key in ("num_inference_steps", "height", "width"):
        if key in first:
            manifest[key] = first[key]
    per_step = next((e for e in erasers if e.num_steps is not None), None)
    if per_step is not None and per_step.manifest.get("timesteps"):
        manifest["timesteps"] = per_step.manifest["timesteps"]
    return Eraser(erasers[0].sites, masks, values, manifest)
