"""Localizers behind one interface: fit statistics (or the model) in, a score per unit per site
out, higher meaning "more of the concept lives here". Every localizer scores every site of the
context's fits, so site-level metrics compare families and blocks.

    context = LocalizationContext(model, classifier, concept, pairs, {"ffn_hidden": fit, ...})
    scores = ZScore().scores(context)            # {site name: (units,) tensor}
    basis = DifferenceDirections().directions(context, "up.0.0.ffn_out", r=4)   # (units, r)

- `ActEraseMask`: Eq. 4-5 on a tau grid; a unit's score is the share of the grid's taus at which
  it is masked. Masks grow with tau (fraction mode: the top ceil(tau * n) units by source
  importance, AND I_s < I_t, union over steps and pairs), so this ranks units by the smallest tau
  at which they enter the mask; units never masked score 0. `masks(context, tau)` gives each mask.
- `ImportanceDifference`: mean over pairs and steps of I_t - I_s (Eq. 4's importance).
- `LateDifference`: |I_t - I_s| over the last k denoising steps only, where the image's detail is
  drawn; k = 5 and the magnitude were chosen on development plantings only (ring / grid unit AUROC
  0.933 / 0.997 against 0.855 / 0.967 for all steps signed; at site level it ranks worse).
- `ZScore`: LocoGen's |z|, target minus source mean over the pooled std (`masks.zscores`).
- `Wanda`: ConceptPrune's |W| * ||x||, per unit: sum_i |W_ij| (the reading Linear's column, as
  Eq. 4) times the difference, target minus source, of the unit's RMS activation (sqrt of the
  fit's mean square over steps, tokens and rows), mean over pairs. ConceptPrune scores each weight
  W_ij by |W_ij| ||X_j|| and keeps the weights whose score rises for the concept; summing the rise
  over the weights reading unit j gives this. At sites no Linear reads, the weight factor is 1.
- `AttributionPatching` (`bench.attribution`): the gradient of the concept logit times the
  source-minus-target activation difference, summed over steps and positions; ranked by its
  magnitude by default (`absolute`).
- `CausalAblation`: each of the top-C units of a cheap localizer patched alone to its source mean
  at every step; its score is the fall of the mean concept probability over the targets' images
  (a probability, not the concept rate, because one unit rarely flips a whole image). Other units
  rank below every candidate, in the cheap localizer's order.
- `DifferenceDirections`: the top-r right singular vectors of the per-pair target-minus-source
  mean differences (subspace truths); a unit's score is its loading's norm in the rank-`rank`
  approximation, so it ranks units too.

A unit-scoring localizer's `directions` are the unit vectors of its r best units at the site.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from ..analysis.subspace import top_directions
from ..erase.eraser import Eraser
from ..erase.masks import importance_mask
from ..erase.pairs import PromptPairs
from ..erase.statistics import FitStatistics
from ..evaluation.core import image_seeds
from ..generation import generate
from ..patching import patched
from ..sites import Site, reader_weight_norm
from .attribution import LoopSettings, attribution_patching
from .metrics import normalised_scores

Scores = dict[str, torch.Tensor]
TAU_GRID: tuple[float, ...] = tuple(round(10 ** (-3 + 3 * i / 23), 6) for i in range(24))
"""24 taus, geometric from 0.001 to 1 (fraction mode: from the top unit to every unit)."""


@dataclass
class LocalizationContext:
    """What a localizer may look at for one concept of one model."""

    model: Any
    """The acterase model (`loading.load`); None for statistics-only localizers in tests."""
    classifier: Any
    """The concept classifier (`world.classifier.ConceptClassifier`), or a user's reader (`bench.own.ReaderClassifier`)."""
    concept: str
    pairs: PromptPairs
    """The prompt pairs of the fits (targets show the concept, sources another value)."""
    statistics: Mapping[str, FitStatistics]
    """Site kind -> the fit holding that kind's sites (several kinds may share one fit)."""
    seeds: tuple[int, ...] = (0,)
    """Image replicates of localizers that run the model (`CausalAblation`)."""
    num_inference_steps: int | None = None
    """Denoising steps of model runs (None: the fits')."""
    progress: bool = True

    @property
    def sites(self) -> tuple[Site, ...]:
        """Every fitted site of the context's kinds, each once, in its fit's order."""
        seen: dict[str, Site] = {}
        for fit in dict.fromkeys(self.statistics.values()):
            for s in fit.sites:
                if s.kind in self.statistics and s.name not in seen:
                    seen[s.name] = s
        return tuple(seen.values())

    def fit_of(self, site_name: str) -> FitStatistics:
        """The fit holding `site_name`."""
        for s in self.sites:
            if s.name == site_name:
                return self.statistics[s.kind]
        raise KeyError(f"no fitted site {site_name!r}; the context holds {[s.name for s in self.sites]}")

    @property
    def steps(self) -> int:
        return self.num_inference_steps or next(iter(self.statistics.values())).num_inference_steps

    @property
    def settings(self) -> LoopSettings:
        return LoopSettings.of(self.model, self.steps)


class Localizer:
    """One localization method: `scores(context)` -> {site name: (units,) scores}, higher = more
    concept. `name` identifies it in results; `options()` is its hyperparameters (JSON)."""

    name: ClassVar[str]
    runs_model: ClassVar[bool] = False
    """True when scoring runs the model (seconds to minutes), False for fit statistics only."""

    def scores(self, context: LocalizationContext) -> Scores:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def directions(self, context: LocalizationContext, site: str, r: int, scores: Scores | None = None) -> torch.Tensor:
        """An orthonormal (units, r) basis of the site's concept subspace: here the unit vectors of
        the r best units (`scores` as computed already, to save a recomputation)."""
        s = (scores or self.scores(context))[site]
        return torch.eye(s.numel())[:, s.topk(r).indices]


# -- statistics-only localizers ---------------------------------------------------------------


@dataclass
class ActEraseMask(Localizer):
    name: ClassVar[str] = "acterase_mask"
    taus: tuple[float, ...] = TAU_GRID

    def masks(self, context: LocalizationContext, tau: float) -> dict[str, torch.Tensor]:
        """Per site, the (units,) bool Eq. 5 mask at `tau` (fraction mode, union over steps and pairs)."""
        out = {}
        for s in context.sites:
            fit = context.fit_of(s.name)
            options = replace(fit.options, tau=tau, tau_mode="fraction", time_mask="union", granularity="unit")
            out[s.name] = importance_mask(fit.importance_source[s.name], fit.importance_target[s.name], options).flatten()
        return out

    def scores(self, context: LocalizationContext) -> Scores:
        counts: Scores = {}
        for tau in self.taus:
            for name, mask in self.masks(context, tau).items():
                counts[name] = counts.get(name, 0) + mask.float()
        return {n: c / len(self.taus) for n, c in counts.items()}


@dataclass
class ImportanceDifference(Localizer):
    name: ClassVar[str] = "importance_difference"

    def scores(self, context: LocalizationContext) -> Scores:
        return {s.name: (f.importance_target[s.name] - f.importance_source[s.name]).mean((0, 1))
                for s in context.sites for f in (context.fit_of(s.name),)}  # fmt: skip


@dataclass
class LateDifference(Localizer):
    name: ClassVar[str] = "late_difference"
    last_steps: int = 5
    """k: the denoising steps averaged, counted from the last (all of them when the fit has fewer)."""
    absolute: bool = True
    """Rank by |I_t - I_s|: a planted unit may encode the concept by falling as well as by rising."""

    def __post_init__(self) -> None:
        if self.last_steps < 1:
            raise ValueError(f"last_steps must be at least 1, got {self.last_steps}")

    def scores(self, context: LocalizationContext) -> Scores:
        k = self.last_steps
        out = {s.name: (f.importance_target[s.name][:, -k:] - f.importance_source[s.name][:, -k:]).mean((0, 1))
               for s in context.sites for f in (context.fit_of(s.name),)}  # fmt: skip
        return {n: v.abs() for n, v in out.items()} if self.absolute else out


@dataclass
class ZScore(Localizer):
    name: ClassVar[str] = "zscore"

    def scores(self, context: LocalizationContext) -> Scores:
        return {s.name: context.fit_of(s.name).zscores(s.name).abs() for s in context.sites}


@dataclass
class Wanda(Localizer):
    name: ClassVar[str] = "wanda"

    def scores(self, context: LocalizationContext) -> Scores:
        out = {}
        for s in context.sites:
            fit = context.fit_of(s.name)
            rms = [fit.square_mean_target[s.name], fit.square_mean_source[s.name]]
            rise = (rms[0].clamp_min(0).sqrt() - rms[1].clamp_min(0).sqrt()).mean(0)
            norm = reader_weight_norm(context.model.pipeline.unet, s) if s.reader_path else None
            out[s.name] = rise * (norm.cpu() if norm is not None else 1.0)
        return out


def difference_directions(differences: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-`rank` right singular vectors (units, rank) of `differences` (vectors, units),
    uncentred, and each unit's loading norm in the rank-`rank` approximation (singular values
    included): sqrt(sum_k s_k^2 V_jk^2)."""
    rank = min(rank, *differences.shape)
    _, s, vh = torch.linalg.svd(differences.double(), full_matrices=False)
    basis = vh[:rank].T
    return basis.float(), (basis * s[:rank]).norm(dim=1).float()


@dataclass
class DifferenceDirections(Localizer):
    name: ClassVar[str] = "difference_directions"
    rank: int = 1
    """Directions whose loadings score the units (the subspace of `directions` takes its own r)."""

    def scores(self, context: LocalizationContext) -> Scores:
        return {s.name: difference_directions(self._differences(context, s.name), self.rank)[1] for s in context.sites}

    def directions(self, context: LocalizationContext, site: str, r: int, scores: Scores | None = None) -> torch.Tensor:
        return top_directions(self._differences(context, site), r)

    @staticmethod
    def _differences(context: LocalizationContext, site: str) -> torch.Tensor:
        fit = context.fit_of(site)
        return fit.mean_target[site] - fit.mean_source[site]


# -- localizers that run the model --------------------------------------------------------------


@dataclass
class AttributionPatching(Localizer):
    name: ClassVar[str] = "attribution_patching"
    runs_model: ClassVar[bool] = True
    batch_size: int = 4
    """Pairs per backward pass (memory grows with it)."""
    absolute: bool = True
    """Rank units by |predicted drop| (as AtP is used for circuit discovery: a unit whose patch
    would raise the concept is involved too, and first-order signs are noisy per unit)."""

    def scores(self, context: LocalizationContext) -> Scores:
        fit = next(iter(context.statistics.values()))
        pairs = list(zip(context.pairs.targets, context.pairs.sources))
        drops = attribution_patching(context.model.pipeline, context.classifier, context.concept, pairs, fit.seeds,
                                     context.sites, context.settings, batch_size=self.batch_size,
                                     progress=context.progress)  # fmt: skip
        return {n: d.abs() for n, d in drops.items()} if self.absolute else drops


def top_units(scores: Scores, n: int) -> dict[str, list[int]]:
    """The `n` best units over every site, by family-normalised score (`metrics.normalised_scores`),
    as {site: unit indices}; ties go to the earlier site and unit."""
    normed = normalised_scores(scores)
    flat = [(float(v), i, name, u) for i, (name, s) in enumerate(normed.items()) for u, v in enumerate(s.tolist())]
    best = sorted(flat, key=lambda e: (-e[0], e[1], e[3]))[:n]
    out: dict[str, list[int]] = {}
    for _, _, name, u in best:
        out.setdefault(name, []).append(u)
    return out


def unit_eraser(context: LocalizationContext, units: Mapping[str, Sequence[int]]) -> Eraser:
    """An eraser that patches exactly `units` ({site: indices}) to their fitted source means, at
    every step and token."""
    sites = [s for s in context.sites if units.get(s.name)]
    if not sites:
        raise ValueError("no units to patch")
    masks, values = {}, {}
    for s in sites:
        fit = context.fit_of(s.name)
        mask = torch.zeros(s.shape[-1], dtype=torch.bool)
        mask[list(units[s.name])] = True
        masks[s.name], values[s.name] = mask, fit.values[s.name]
    manifest = {**context.fit_of(sites[0].name).manifest(), "units": {k: list(v) for k, v in units.items()}}
    return Eraser(tuple(sites), masks, values, manifest)


def concept_probability(context: LocalizationContext, patch: Any, seed: int) -> float:
    """The classifier's mean probability of the concept over the targets' images (selection seeds
    `tau_selection`, disjoint from the fit's and the evaluation's), with `patch` on; a classifier
    without ConceptWorld `factors` (a user's reader, `bench.own.ReaderClassifier`) gives its own."""
    targets = list(context.pairs.targets)
    with patched(context.model, patch):
        images = generate(context.model, targets, seeds=image_seeds("tau_selection", len(targets), replicate=seed),
                          num_inference_steps=context.steps, progress=False)  # fmt: skip
    classifier = context.classifier
    if not hasattr(classifier, "factors"):
        return float(classifier.probability(images).mean())
    factor = next(f for f, v in classifier.factors.items() if context.concept in v)
    with torch.no_grad():
        logits = classifier(images.to(next(classifier.parameters()).device) * 2 - 1)[factor]
    return float(logits.softmax(-1)[:, classifier.factors[factor].index(context.concept)].mean())


@dataclass
class CausalAblation(Localizer):
    name: ClassVar[str] = "causal_ablation"
    runs_model: ClassVar[bool] = True
    candidates: int = 64
    """C: the units of `base`'s top-C (over all sites, family-normalised) that are ablated one by one."""
    base: Localizer = field(default_factory=lambda: ZScore())
    """The cheap localizer that picks the candidates and orders the rest."""

    def options(self) -> dict[str, Any]:
        return {"candidates": self.candidates, "base": self.base.name, "base_options": self.base.options()}

    def scores(self, context: LocalizationContext) -> Scores:
        cheap = self.base.scores(context)
        chosen = top_units(cheap, self.candidates)
        seeds = context.seeds
        before = sum(concept_probability(context, None, s) for s in seeds) / len(seeds)
        # below every candidate (drops lie in [-1, 1]), in the cheap localizer's order
        order = normalised_scores(cheap)
        low = min(float(v.min()) for v in order.values())
        span = max(float(v.max()) for v in order.values()) - low or 1.0
        out = {name: -3.0 + (v - low) / span for name, v in order.items()}
        cells = [(name, u) for name, us in chosen.items() for u in us]
        for name, u in tqdm(cells, desc=f"causal ablation: {context.concept}", disable=not context.progress):
            eraser = unit_eraser(context, {name: [u]})
            after = sum(concept_probability(context, eraser, s) for s in seeds) / len(seeds)
            out[name][u] = before - after
        return out


LOCALIZERS: dict[str, type[Localizer]] = {c.name: c for c in (
    ActEraseMask, ImportanceDifference, LateDifference, ZScore, Wanda, AttributionPatching, CausalAblation,
    DifferenceDirections)}  # fmt: skip
"""Every localizer by name, default options."""


def localizer(name: str) -> Localizer:
    """The localizer called `name`, with default options."""
    if name not in LOCALIZERS:
        raise ValueError(f"unknown localizer {name!r}; choose from {sorted(LOCALIZERS)}")
    return LOCALIZERS[name]()


__all__ = ["LOCALIZERS", "TAU_GRID", "ActEraseMask", "AttributionPatching", "CausalAblation", "DifferenceDirections",
           "ImportanceDifference", "LateDifference", "LocalizationContext", "Localizer", "Wanda", "ZScore",
           "concept_probability", "difference_directions", "localizer", "top_units", "unit_eraser"]  # fmt: skip
