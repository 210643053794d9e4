"""What a fit collects, kept so that a new threshold, time or pair rule gives a new eraser without
running the model again: per site, the importance of every unit at every (pair, step) for the
source and the target prompt, the mean source activations (and target ones, when fitted
`restorable`), and per-pair first and second moments of the activations (means and mean squares,
for difference vectors and z-scores).
Statistics build erasers (`eraser`, i.e. `Eraser.from_statistics`); erasers never point back."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..integrity import SHA256, ArtifactError, file_hashes, load_tensors, malformed, read_object, verify_files
from ..io import atomic_save_safetensors, atomic_write_dir, atomic_write_json, interrupted_hint
from ..sites import Site, select_sites
from ._util import site_from_dict, site_to_dict
from .eraser import STATISTICS, Eraser
from .masks import mask_levels, zscores
from .options import EraseOptions
from .pairs import PromptPairs

FORMAT = "acterase-statistics/1"
MANIFEST = "statistics.json"
TENSORS = "statistics.safetensors"
# Options a stored fit can change without running the model again.
RETHRESHOLD_OPTIONS = ("tau", "tau_mode", "time_mask", "pair_combine", "blocks", "granularity", "ranking", "top_k")
_TENSOR_FIELDS = (
    "importance_source",
    "importance_target",
    "token_importance_source",
    "token_importance_target",
    "values",
    "target_values",
    "mean_source",
    "mean_target",
    "square_mean_source",
    "square_mean_target",
)


@dataclass(frozen=True, eq=False)  # tensors have no single truth value: equality is identity
class FitStatistics:
    """Everything a fit measured, enough to build erasers for any threshold, time rule, pair rule,
    granularity (token_unit -> unit) and subset of the fitted blocks. Tensor fields map a site name
    to a float32 CPU tensor."""

    sites: tuple[Site, ...]
    """The fitted sites, in execution order, with their measured per-image shapes."""
    options: EraseOptions
    """The options of the fit."""
    pairs: PromptPairs
    """The prompt pairs, in fitting order."""
    seeds: tuple[int, ...]
    """The initial-noise seed of every pair."""
    importance_source: dict[str, torch.Tensor]
    """(pair, step, unit) importance I = |x_s| * reader column norm, mean over tokens (and rows)."""
    importance_target: dict[str, torch.Tensor]
    """(pair, step, unit) importance of the target activations on the same latents."""
    token_importance_source: dict[str, torch.Tensor]
    """(pair, step, token, unit) importance; empty unless the fit's granularity is `token_unit`."""
    token_importance_target: dict[str, torch.Tensor]
    """(pair, step, token, unit) target importance; empty unless `token_unit`."""
    values: dict[str, torch.Tensor]
    """Replacement values x_avg: mean source activation, (1, token, unit) over steps and pairs, or
    (step, token, unit) over pairs with `value_mode="per_step"`."""
    mean_source: dict[str, torch.Tensor]
    """(pair, unit) mean source activation over steps, tokens and rows."""
    mean_target: dict[str, torch.Tensor]
    """(pair, unit) mean target activation over steps, tokens and rows."""
    architecture_hash: str
    """`loading.architecture_hash` of the fitted pipeline."""
    num_inference_steps: int
    """Denoising steps of the collection runs."""
    guidance_scale: float
    """Guidance scale of the collection runs."""
    height: int
    """Image height of the collection runs, in pixels."""
    width: int
    """Image width of the collection runs, in pixels."""
    timesteps: tuple[float, ...]
    """The scheduler's timestep at each UNet call ("step") of a collection run."""
    scheduler: str
    """Class name of the scheduler."""
    versions: dict[str, str]
    """Library versions of the fit."""
    target_values: dict[str, torch.Tensor] = field(default_factory=dict)
    """The target's mean activations, shaped as `values`: what a restoring eraser
    (`eraser(values="target")`) puts back into source prompts. Empty unless the fit was
    `restorable` (it doubles the value memory)."""
    square_mean_source: dict[str, torch.Tensor] = field(default_factory=dict)
    """(pair, unit) mean of the squared source activation over steps, tokens and rows (for
    `ranking="zscore"`); empty in statistics saved before second moments were collected."""
    square_mean_target: dict[str, torch.Tensor] = field(default_factory=dict)
    _levels: dict[tuple, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    """`mask_levels` per (site, granularity, tau_mode, time_mask, pair_combine), computed on first
    use: every later tau re-thresholds with one comparison per unit."""
    """(pair, unit) mean of the squared target activation; empty like `square_mean_source`."""

    def __repr__(self) -> str:
        return (
            f"FitStatistics(concept={self.pairs.concept!r}, pairs={self.num_pairs}, steps={self.num_steps}, "
            f"sites={len(self.sites)}, site_kind={self.options.site_kind!r}, granularity={self.options.granularity!r})"
        )

    @property
    def num_pairs(self) -> int:
        return len(self.seeds)

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor the statistics hold (what a fit keeps for re-thresholding)."""
        return sum(t.numel() * t.element_size() for name in _TENSOR_FIELDS for t in getattr(self, name).values())

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def eraser(self, tau: float | None = None, **options: Any) -> Eraser:
        """An eraser from the stored scores, without running the model: `Eraser.from_statistics`
        (`tau`, `tau_mode`, `time_mask`, `pair_combine`, `blocks`, `granularity`, `ranking`,
        `top_k`; None keeps the fit's option; `values="target"` restores instead of erasing)."""
        return Eraser.from_statistics(self, tau, **options)

    def sites_in(self, blocks: tuple[str, ...] | list[str] | None) -> tuple[Site, ...]:
        """The fitted sites of `blocks` (None: all), in execution order; unfitted blocks are an error."""
        if blocks is None:
            return self.sites
        try:
            # the fitted sites' own kinds: on a DiT, `site_kind` may name a UNet kind (`sites.dit_kinds`)
            return tuple(select_sites(list(self.sites), tuple(dict.fromkeys(s.kind for s in self.sites)), blocks))
        except ValueError as err:
            fitted = sorted({s.block for s in self.sites})
            raise ValueError(f"blocks {list(blocks)} are not all among the fitted blocks {fitted}") from err

    def manifest(self, options: EraseOptions | None = None) -> dict[str, Any]:
        """The provenance an eraser built from these statistics carries."""
        return {
            "architecture_hash": self.architecture_hash,
            "options": (options or self.options).to_dict(),
            "pairs": self.pairs.to_dict(),
            "seeds": list(self.seeds),
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "height": self.height,
            "width": self.width,
            "timesteps": list(self.timesteps),
            "scheduler": self.scheduler,
            "versions": dict(self.versions),
        }

    def difference(self) -> dict[str, torch.Tensor]:
        """Per site, a (step,) profile of how much the target's importance departs from the
        source's: mean over pairs and units of |I_t - I_s|, divided by the mean of I_s (a relative,
        scale-free change that can be compared across layers and steps)."""
        out = {}
        for s in self.sites:
            source, target = self.importance_source[s.name], self.importance_target[s.name]
            scale = source.mean(dim=(0, 2)).clamp_min(torch.finfo(source.dtype).tiny)
            out[s.name] = (target - source).abs().mean(dim=(0, 2)) / scale
        return out

    def difference_vectors(self) -> dict[str, torch.Tensor]:
        """Per site, the (pair, unit) difference of mean activations, target minus source (means
        over steps, tokens and rows): one concept direction per pair, for SVD or probes."""
        return {s.name: self.mean_target[s.name] - self.mean_source[s.name] for s in self.sites}

    def mask_levels(self, site_name: str, options: EraseOptions) -> torch.Tensor:
        """Eq. 5's entry levels of one site under `options`' rules (`masks.mask_levels`), cached."""
        token = options.granularity == "token_unit"
        key = (site_name, token, options.tau_mode, options.time_mask, options.pair_combine)
        if key not in self._levels:
            source = (self.token_importance_source if token else self.importance_source)[site_name]
            target = (self.token_importance_target if token else self.importance_target)[site_name]
            self._levels[key] = mask_levels(source, target, options.tau_mode, options.time_mask, options.pair_combine)
        return self._levels[key]

    def zscores(self, site_name: str) -> torch.Tensor:
        """The (unit,) z-scores of one site (`masks.zscores`: target minus source mean over the
        pooled std), from the stored first and second moments."""
        if site_name not in self.square_mean_source:
            raise ValueError(
                "ranking='zscore' needs second moments, which these statistics lack (saved before they were "
                "collected, or built without them): fit again to rank by z-score"
            )
        moments = (self.mean_source, self.mean_target, self.square_mean_source, self.square_mean_target)
        return zscores(*(m[site_name] for m in moments))

    def save(self, path: str | os.PathLike) -> None:
        """Write to a folder (safetensors + JSON), atomically."""
        atomic_write_dir(path, MANIFEST, self.write_to)

    def write_to(self, folder: Path) -> None:
        """Write the files into an existing folder (the atomic wrapper is the caller's)."""
        tensors = {f"{name}/{site}": t for name in _TENSOR_FIELDS for site, t in getattr(self, name).items()}
        atomic_save_safetensors(tensors, folder / TENSORS)
        meta = self.manifest()
        meta.update(format=FORMAT, sites=[site_to_dict(s) for s in self.sites])
        meta[SHA256] = file_hashes(folder, [TENSORS])  # checked by `load`
        atomic_write_json(meta, folder / MANIFEST)

    @classmethod
    def load(cls, path: str | os.PathLike, *, verify: bool = True) -> FitStatistics:
        """Statistics written by `save`, or stored beside an eraser by `Eraser.save(path, statistics=...)`.
        The tensor file must have the sha256 its manifest recorded; `verify=False` skips the check."""
        folder = Path(path).expanduser()
        if not (folder / MANIFEST).is_file() and (folder / STATISTICS / MANIFEST).is_file():
            folder = folder / STATISTICS
        if not (folder / MANIFEST).is_file() or not (folder / TENSORS).is_file():
            hint = interrupted_hint(folder, MANIFEST)
            raise FileNotFoundError(f"no fit statistics in {folder} (expected {MANIFEST} and {TENSORS}){hint}")
        meta = read_object(folder / MANIFEST, "fit statistics manifest")
        if meta.get("format") != FORMAT:
            raise ArtifactError(f"{folder} holds format {meta.get('format')!r}, expected {FORMAT!r}")
        verify_files(folder, meta.get(SHA256), [TENSORS], manifest=folder / MANIFEST, verify=verify)
        try:
            return cls._from_files(meta, load_tensors(folder / TENSORS))
        except ArtifactError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise malformed(folder / MANIFEST, "fit statistics manifest", err) from err

    @classmethod
    def _from_files(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> FitStatistics:
        fields: dict[str, dict[str, torch.Tensor]] = {name: {} for name in _TENSOR_FIELDS}
        for key, tensor in tensors.items():
            name, _, site = key.partition("/")
            if name not in fields or not site:
                raise ValueError(f"unexpected tensor {key!r} in {TENSORS}")
            fields[name][site] = tensor
        return cls(
            sites=tuple(site_from_dict(s) for s in meta["sites"]),
            options=EraseOptions.from_dict(meta["options"]),
            pairs=PromptPairs.from_dict(meta["pairs"]),
            seeds=tuple(meta["seeds"]),
            architecture_hash=meta["architecture_hash"],
            num_inference_steps=meta["num_inference_steps"],
            guidance_scale=meta["guidance_scale"],
            height=meta["height"],
            width=meta["width"],
            timesteps=tuple(meta["timesteps"]),
            scheduler=meta["scheduler"],
            versions=meta["versions"],
            **fields,
        )
