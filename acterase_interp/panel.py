"""The quickstart's control panel: a ConceptWorld concept erased at any tau and set of layers, its
images before and after on the same seeds.

Each concept is fitted once (its collection run); every mask after that comes from the stored fit
statistics without a model run, so a new setting only regenerates the images. Notebook 01 wires
this to widgets; `ErasurePanel.view` is the whole of what one setting shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .erase import EraseOptions, EraserFitter, FitStatistics, PromptPairs
from .generation import generate
from .world.classifier import ConceptClassifier
from .world.concept import as_concept
from .world.pairs import conceptworld_pairs


@dataclass(frozen=True)
class PanelView:
    """One setting of the panel and what it shows."""

    concept: str
    tau: float
    blocks: tuple[str, ...]
    """The patched blocks."""
    density: dict[str, float]
    """Mask density per patched site."""
    images: torch.Tensor
    """The row before erasure, then the row after: (2N, 3, H, W) in [0, 1]."""
    labels: list[str]
    """Per image, what the classifier reads in the concept's factor ("before: heart", "after: circle")."""

    @property
    def mean_density(self) -> float:
        return sum(self.density.values()) / len(self.density)

    def summary(self) -> str:
        """The line the panel prints above its images."""
        return (f"{self.concept}: tau={self.tau:.4f}, layers {', '.join(self.blocks)}; "
                f"mean mask density {self.mean_density:.4f}")  # fmt: skip


class ErasurePanel:
    """Erasers of ConceptWorld concepts re-thresholded from stored statistics, and their images.

    `options` fits a concept seen for the first time (on `n_pairs` pairs of `conceptworld_pairs`
    at `pair_seed`); `fits` holds statistics already collected. Each view shows `n_images` held-out
    paraphrases of the concept and `n_images` non-target prompts, image i on seed `seed + i`."""

    def __init__(
        self,
        model: Any,
        classifier: ConceptClassifier,
        options: EraseOptions,
        *,
        n_pairs: int,
        n_images: int,
        pair_seed: int = 0,
        seed: int = 1000,
        num_inference_steps: int | None = None,
        fits: dict[str, FitStatistics] | None = None,
    ) -> None:
        if n_pairs < 1 or n_images < 1:
            raise ValueError(f"n_pairs and n_images must be at least 1, got {n_pairs} and {n_images}")
        self.model, self.classifier, self.options = model, classifier, options
        self.n_pairs, self.n_images, self.pair_seed = n_pairs, n_images, pair_seed
        self.seed, self.num_inference_steps = seed, num_inference_steps
        self.fits: dict[str, FitStatistics] = dict(fits or {})
        self._before: dict[str, torch.Tensor] = {}  # the unpatched images never change: one run per concept
        self.last: PanelView | None = None
        """The latest view (what the panel shows now)."""

    def pairs(self, concept: str) -> PromptPairs:
        return conceptworld_pairs(concept, n=self.n_pairs, seed=self.pair_seed)

    def statistics(self, concept: str) -> FitStatistics:
        """The concept's fit statistics, collected on its first call."""
        if concept not in self.fits:
            fitter = EraserFitter(self.model, self.options, progress=False)
            fitter.fit(self.pairs(concept))
            self.fits[concept] = fitter.statistics
        return self.fits[concept]

    def prompts(self, concept: str) -> list[str]:
        """Held-out paraphrases of the concept, then non-target prompts (never fitted on)."""
        pairs = self.pairs(concept)
        return list(pairs.heldout[: self.n_images]) + list(pairs.non_target[: self.n_images])

    def view(self, concept: str, tau: float, blocks: tuple[str, ...] | list[str]) -> PanelView:
        """Erase `concept` at `tau` in `blocks` (fitted blocks) and read the images before and after."""
        if not blocks:
            raise ValueError("choose at least one block to patch")
        eraser = self.statistics(concept).eraser(tau=tau, blocks=tuple(blocks))
        prompts = self.prompts(concept)
        if concept not in self._before:
            self._before[concept] = self._generate(prompts)
        with eraser.applied(self.model):
            after = self._generate(prompts)
        factor = as_concept(concept).factor
        rows = (("before", self._before[concept]), ("after", after))
        labels = [f"{when}: {value}" for when, images in rows for value in self.classifier.predict(images)[factor]]
        images = torch.cat([self._before[concept], after])
        self.last = PanelView(concept, tau, tuple(blocks), eraser.mask_density(), images, labels)
        return self.last

    def _generate(self, prompts: list[str]) -> torch.Tensor:
        return generate(self.model, prompts, seeds=self.seed, num_inference_steps=self.num_inference_steps,
                        progress=False)  # fmt: skip
