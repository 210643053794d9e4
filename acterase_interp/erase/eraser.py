"""The fitted eraser: per-site masks and replacement values, applied as x <- M * x_avg + (1 - M) * x
(Eq. 6) at every denoising step, either by torch hooks (`applied`, an on/off switch for any
pipeline call) or inside a user's nnsight trace (`apply`); both go through `acterase_interp.patching`.
An eraser is tensors and provenance only: it keeps no reference to the statistics it came from."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..integrity import SHA256, ArtifactError, file_hashes, load_tensors, malformed
from ..io import atomic_save_safetensors, atomic_write_dir, atomic_write_json
from ..loading import architecture_hash
from ..patching import StepSchedule, from_tokens, patch_in_trace, patched, to_tokens, unet_of
from ..provenance import library_versions
from ..sites import UNET_OUT, Site
from ._util import model_sites, read_manifest, site_from_dict, site_to_dict
from .masks import importance_mask, zscore_mask

if TYPE_CHECKING:
    from .statistics import FitStatistics

FORMAT = "acterase-eraser/1"
MANIFEST = "eraser.json"
MASKS = "masks.safetensors"
VALUES = "values.safetensors"
STATISTICS = "statistics"
VALUE_ROLES = ("source", "target")
"""Whose mean activations an eraser built from statistics puts in: the source's (erase) or the target's (restore)."""


def _mask3(mask: torch.Tensor) -> torch.Tensor:
    """A mask as (steps or 1, tokens or 1, units): (units,) and (tokens, units) gain leading axes."""
    return mask.reshape((1,) * (3 - mask.ndim) + tuple(mask.shape)) if mask.ndim < 3 else mask


def _value3(value: torch.Tensor) -> torch.Tensor:
    """A value as (steps or 1, tokens, units): (tokens, units) gains a leading axis."""
    return value.unsqueeze(0) if value.ndim == 2 else value


@dataclass(frozen=True, eq=False)  # tensors have no single truth value: equality is identity
class Eraser:
    """ActErase masks and replacement values for some sites of the UNet or the text encoders.

    Tensors are canonical 3-D, an axis of length 1 meaning "the same for every step / token":
    a mask is bool (1, 1, units) per unit, (1, tokens, units) per (token, unit), and (steps, ...)
    per step; a value is (1, tokens, units), or (steps, tokens, units) per step. Per-step tensors
    need the step index: `apply` takes it, `applied` counts UNet calls (`schedule`)."""

    sites: tuple[Site, ...]
    """The patched sites, in execution order."""
    masks: dict[str, torch.Tensor] = field(repr=False)
    """Site name -> bool mask M (True: replace the activation with the value)."""
    values: dict[str, torch.Tensor] = field(repr=False)
    """Site name -> replacement value x_avg (the mean source activation)."""
    manifest: dict[str, Any] = field(repr=False)
    """JSON provenance: architecture_hash (required), options, pairs, seeds, steps, timesteps,
    scheduler, library versions (merged erasers: `merged_from`, one manifest per part)."""
    _columns: dict[tuple, tuple] = field(default_factory=dict, init=False, repr=False)
    """Cache of `_masked_columns` (a copy made by `replace` starts empty)."""

    def __post_init__(self) -> None:
        names = [s.name for s in self.sites]
        extra = sorted((set(self.masks) | set(self.values)) - set(names))
        if extra:
            raise ValueError(f"masks or values given for sites {extra} that are not among the eraser's sites")
        object.__setattr__(self, "masks", {n: _mask3(self.masks[n]) for n in names if n in self.masks})
        object.__setattr__(self, "values", {n: _value3(self.values[n]) for n in names if n in self.values})
        if "architecture_hash" not in self.manifest:
            raise ValueError("an eraser's manifest needs the architecture_hash of its model")
        steps = {t.shape[0] for d in (self.masks, self.values) for t in d.values()} - {1}
        if len(steps) > 1:
            raise ValueError(f"per-step tensors disagree on the number of steps: {sorted(steps)}")
        for n in names:
            self._check_site(n)
        timesteps = self.manifest.get("timesteps")
        if steps and timesteps and len(timesteps) != next(iter(steps)):
            n = next(iter(steps))
            raise ValueError(f"per-step tensors have {n} steps but the manifest lists {len(timesteps)} timesteps")

    def _check_site(self, name: str) -> None:
        if name not in self.masks or name not in self.values:
            raise ValueError(f"site {name!r} needs both a mask and a value")
        mask, value = self.masks[name], self.values[name]
        if mask.dtype != torch.bool:
            raise TypeError(f"the mask of {name!r} must be bool, got {mask.dtype}")
        if mask.ndim != 3 or value.ndim != 3:
            raise ValueError(f"site {name!r}: mask {tuple(mask.shape)} or value {tuple(value.shape)} is not 3-D")
        if mask.shape[2] != value.shape[2] or mask.shape[1] not in (1, value.shape[1]):
            raise ValueError(f"site {name!r}: mask {tuple(mask.shape)} does not fit value {tuple(value.shape)}")

    def __repr__(self) -> str:
        concept = self.manifest.get("pairs", {}).get("concept", "custom")
        density = sum(self.mask_density().values()) / max(1, len(self.sites))
        steps = self.num_steps
        return f"Eraser(concept={concept!r}, sites={len(self.sites)}, steps={steps}, mean mask density={density:.4f})"

    @classmethod
    def from_statistics(
        cls,
        statistics: FitStatistics,
        tau: float | None = None,
        *,
        tau_mode: str | None = None,
        time_mask: str | None = None,
        pair_combine: str | None = None,
        blocks: tuple[str, ...] | list[str] | None = None,
        granularity: str | None = None,
        ranking: str | None = None,
        top_k: int | None = None,
        values: str = "source",
    ) -> Eraser:
        """The eraser of stored fit statistics (Eq. 5 masks, or z-score masks with
        `ranking="zscore"`; the fitted values), without running the model; arguments left None
        keep the fit's options (`blocks` must name fitted blocks). `values="target"` keeps the
        masks but puts back the target's mean activations: applied to source prompts it restores
        the concept where the eraser would remove it (a causal test in the other direction).
        `statistics.eraser(...)` is the same call."""
        if values not in VALUE_ROLES:
            raise ValueError(f"values={values!r} is not one of {VALUE_ROLES}")
        if values == "target" and not statistics.target_values:
            raise ValueError("these statistics hold no target values: refit with EraserFitter(..., restorable=True)")
        changes = dict(tau=tau, tau_mode=tau_mode, time_mask=time_mask, pair_combine=pair_combine, blocks=blocks)
        changes.update(granularity=granularity, ranking=ranking, top_k=top_k)
        options = replace(statistics.options, **{k: v for k, v in changes.items() if v is not None})
        sites = statistics.sites_in(options.blocks)
        stored = statistics.target_values if values == "target" else statistics.values
        kept = {s.name: stored[s.name] for s in sites}
        manifest = statistics.manifest(options) | ({"values": "target"} if values == "target" else {})
        if options.ranking == "zscore":
            masks = {s.name: zscore_mask(statistics.zscores(s.name), options.top_k) for s in sites}
            return cls(sites=sites, masks=masks, values=kept, manifest=manifest)
        token = options.granularity == "token_unit"
        if token and not statistics.token_importance_source:
            raise ValueError("granularity='token_unit' needs a fit with granularity='token_unit'; this one is per unit")
        source = statistics.token_importance_source if token else statistics.importance_source
        target = statistics.token_importance_target if token else statistics.importance_target
        masks = {s.name: importance_mask(source[s.name], target[s.name], options, statistics.mask_levels(s.name, options))
                 for s in sites}  # fmt: skip
        return cls(sites=sites, masks=masks, values=kept, manifest=manifest)

    # -- properties -------------------------------------------------------------

    @property
    def num_steps(self) -> int | None:
        """Length of the steps axis of per-step masks or values; None if nothing is per step."""
        steps = {t.shape[0] for d in (self.masks, self.values) for t in d.values()} - {1}
        return next(iter(steps), None)

    @property
    def schedule(self) -> StepSchedule | None:
        """The steps a per-step eraser was fitted for (with the manifest's timesteps where it has
        them), which the hooks path counts and checks; None if nothing is per step."""
        if self.num_steps is None:
            return None
        timesteps = self.manifest.get("timesteps")
        return StepSchedule(self.num_steps, tuple(timesteps) if timesteps else None)

    def mask_density(self) -> dict[str, float]:
        """Per site, the share of mask entries that are on (over all its axes)."""
        return {s.name: self.masks[s.name].float().mean().item() for s in self.sites}

    # -- patching ---------------------------------------------------------------

    def __call__(self, site_name: str, x: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """Eq. 6 on one site's activation x (all batch rows, both CFG halves): M * x_avg + (1 - M) * x.
        `step` (the denoising step index) is needed only by per-step erasers."""
        if site_name not in self.masks:
            raise KeyError(f"this eraser has no site {site_name!r}; it patches {[s.name for s in self.sites]}")
        value = self._at(self.values[site_name], step, site_name)  # masks: checked in `_masked_columns`
        tokens = to_tokens(x)
        if tokens.shape[1:] != value.shape:
            size = f"{self.manifest.get('height')}x{self.manifest.get('width')} px"
            raise ValueError(
                f"site {site_name!r}: the activation has (tokens, units) {tuple(tokens.shape[1:])}, the eraser "
                f"{tuple(value.shape)}: generate at the fitted size ({size})"
            )
        index, mask_columns, value_columns = self._masked_columns(site_name, step, x)
        if index.numel() == 0:
            return x
        columns = value_columns  # a per-unit mask replaces its columns whole, a per-token one where it is on
        if mask_columns is not None:
            columns = torch.where(mask_columns, value_columns, tokens.index_select(-1, index))
        out = tokens.index_copy(-1, index, columns.expand(tokens.shape[0], -1, -1))
        return from_tokens(out, x.shape)

    def _masked_columns(self, name: str, step: int | None, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The units the mask of `name` touches at `step`, on x's device and dtype: their indices, the
        mask over them (None for a per-unit mask) and the values there. Writing only these columns
        gives Eq. 6's result bit for bit at a fraction of a full `torch.where`; computed once per
        (site, step of per-step tensors, device, dtype) and recomputed if a tensor is replaced or
        edited in place."""
        mask, value = self.masks[name], self.values[name]
        key = (name, step if mask.shape[0] > 1 else 0, step if value.shape[0] > 1 else 0, x.device, x.dtype)
        versions = (mask._version, value._version)
        cached = self._columns.get(key)
        if cached is None or cached[0] is not mask or cached[1] is not value or cached[2] != versions:
            at_step = self._at(mask, step, name).to(x.device)
            index = at_step.any(0).nonzero().squeeze(1)
            values = self._at(value, step, name)[:, index.to(value.device)].to(device=x.device, dtype=x.dtype)
            columns = (index, None if at_step.shape[0] == 1 else at_step[:, index], values)
            cached = self._columns[key] = (mask, value, versions, columns)
        return cached[3]

    def _at(self, tensor: torch.Tensor, step: int | None, name: str) -> torch.Tensor:
        if tensor.shape[0] == 1:
            return tensor[0]
        if step is None:
            raise ValueError(f"site {name!r} has per-step masks or values: pass the step index")
        if not 0 <= step < tensor.shape[0]:
            raise IndexError(f"step {step} is outside the {tensor.shape[0]} fitted steps of site {name!r}")
        return tensor[step]

    @contextmanager
    def applied(self, model: Any) -> Iterator[Eraser]:
        """Switch the eraser on for `model` (an acterase model or a diffusers pipeline) inside the
        `with` block, via torch hooks on its UNet and, for text-encoder sites, its text encoders
        (`patching.patched`, which patches those at every encoder call, the negative prompt's too):
        every pipeline call is patched (nnsight traces too). The hooks are removed on exit, even on
        an exception, leaving the model as it was.

        Per-step erasers take the step from the step counter: runs are `num_steps` UNet calls long,
        each checked against the fitted timesteps where the manifest has them, so generate with the
        fitted scheduler and step count."""
        live = self.to(unet_of(model).device)  # one copy now rather than one per call
        with patched(model, live):
            yield self

    def apply(self, model: Any, step: int | None = None) -> None:
        """Patch every site inside a running nnsight trace, at one denoising step
        (`patching.patch_in_trace`):

            with model.generate(prompts, num_inference_steps=n, ...) as tracer:
                for step in tracer.iter[:n]:
                    eraser.apply(model, step)

        Sites are visited in execution order, each by whole-value assignment. Text-encoder sites,
        which run before the loop, are written by the first call of the trace (step 0 above, as its
        first request; or `eraser.apply(model)` before the loop), at every encoder call; a first
        call at a later step raises an error that says so (see `patching.patch_in_trace`)."""
        patch_in_trace(model, self, step)

    # -- model checks, devices --------------------------------------------------

    def check_model(self, model: Any) -> None:
        """Clear error unless `model` has the fitted architecture and every site of the eraser."""
        got = architecture_hash(getattr(model, "pipeline", model))
        want = self.manifest["architecture_hash"]
        if got != want:
            raise ValueError(
                f"this eraser was fitted on a model with architecture hash {want}, but this model's is {got}: "
                "an eraser only applies to the architecture it was fitted on"
            )
        known = {s.name: (s.component, s.module_path) for s in model_sites(model)}
        for s in self.sites:
            if known.get(s.name) != (s.component, s.module_path):
                raise ValueError(f"site {s.name!r} ({s.component}: {s.module_path}) does not exist in this model")

    def saturated(self) -> Eraser:
        """A copy with every mask entry on: each unit (and token, and step, as far as the values
        resolve them) is replaced by its value. The ceiling of what any tau can do at these sites:
        if the concept survives it, no mask there erases it."""
        masks = {n: torch.ones(v.shape, dtype=torch.bool, device=v.device) for n, v in self.values.items()}
        return replace(self, masks=masks, manifest={**self.manifest, "saturated": True})

    def to(self, device: str | torch.device) -> Eraser:
        """A copy with masks and values on `device`."""
        return replace(
            self,
            masks={k: v.to(device) for k, v in self.masks.items()},
            values={k: v.to(device) for k, v in self.values.items()},
        )

    # -- artifacts ----------------------------------------------------------------

    def save(self, path: str | os.PathLike, *, statistics: FitStatistics | None = None) -> None:
        """Write the eraser to a folder, atomically: masks and values as safetensors, the
        manifest (with sites and library versions) as JSON, and, if given, the fit `statistics`
        in `statistics/` (then `FitStatistics.load(path)` re-thresholds it later)."""
        if statistics is not None:
            if isinstance(statistics, bool) or not hasattr(statistics, "write_to"):
                raise TypeError(f"statistics must be FitStatistics (e.g. fitter.statistics), got {statistics!r}")
            if statistics.architecture_hash != self.manifest["architecture_hash"]:
                raise ValueError("these statistics were fitted on another architecture than the eraser")

        def write(folder: Path) -> None:
            atomic_save_safetensors(self.masks, folder / MASKS)
            atomic_save_safetensors(self.values, folder / VALUES)
            if statistics is not None:
                (folder / STATISTICS).mkdir()
                statistics.write_to(folder / STATISTICS)
            manifest = {"format": FORMAT, **self.manifest, "sites": [site_to_dict(s) for s in self.sites]}
            manifest.setdefault("versions", library_versions())
            manifest[SHA256] = file_hashes(folder, (MASKS, VALUES))  # checked by `load`
            atomic_write_json(manifest, folder / MANIFEST)

        atomic_write_dir(path, MANIFEST, write)

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any = None, *, verify: bool = True) -> Eraser:
        """An eraser written by `save` (any statistics beside it stay on disk: `FitStatistics.load`).
        The masks and values must have the sha256 the manifest recorded (an `ArtifactError` names
        the file and both hashes); `verify=False` skips the check, for a mask edited on purpose.
        With `model`, checks that it has the fitted architecture and sites, and moves the tensors
        to its device."""
        folder = Path(path).expanduser()
        manifest = read_manifest(folder, MANIFEST, FORMAT, (MASKS, VALUES), "eraser", verify)
        try:
            sites = tuple(site_from_dict(s) for s in manifest.pop("sites"))
            eraser = cls(sites, load_tensors(folder / MASKS), load_tensors(folder / VALUES), manifest)
        except ArtifactError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise malformed(folder / MANIFEST, "eraser manifest", err) from err
        if model is not None:
            eraser.check_model(model)
            eraser = eraser.to(unet_of(model).device)
        return eraser

    @classmethod
    def from_tensors(
        cls, model: Any, masks: dict[str, torch.Tensor], values: dict[str, torch.Tensor], **manifest: Any
    ) -> Eraser:
        """An eraser from hand-made masks and values (activation-patching experiments): masks bool
        (units,), (tokens, units) or (steps, tokens, units); values (tokens, units) or
        (steps, tokens, units); `manifest` adds provenance (e.g. timesteps for per-step tensors)."""
        table = model_sites(model)
        unknown = sorted(set(masks) - {s.name for s in table})
        if unknown:
            raise KeyError(f"unknown site(s) {unknown}; this model has {[s.name for s in table]}")
        sites = []
        for s in table:
            if s.name in masks:
                tokens, units = values[s.name].shape[-2:]
                side = math.isqrt(tokens)
                shape = (units, side, side) if s.kind == UNET_OUT else (tokens, units)
                sites.append(replace(s, shape=shape))
        fitted = architecture_hash(getattr(model, "pipeline", model))
        head = {"architecture_hash": fitted, "versions": library_versions()}
        return cls(tuple(sites), masks, values, {**head, **manifest})
