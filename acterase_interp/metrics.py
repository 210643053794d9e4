"""Evaluation metrics on ConceptWorld: classifier accuracies and concept rates with Wilson
intervals, and per-image distances for same-seed preservation checks.

Every metric that needs a classifier has a `*_from_predictions` twin that takes the classifier's
output (`{"shape": [...], "color": [...], "background": [...]}`) instead, so it can be computed
from stored predictions and tested without a model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import torch

from .world.concept import Concept, as_concept
from .world.factors import FACTORS, Scene

Predictions = Mapping[str, Sequence[str]]
"""Factor name -> the value predicted for each image, as `ConceptClassifier.predict` returns it."""

_Z95 = 1.959963984540054  # standard normal quantile for a two-sided 95% interval


class Classifier(Protocol):
    """Anything that reads factor values from images in [0, 1], like `ConceptClassifier`."""

    def predict(self, images: torch.Tensor) -> dict[str, list[str]]: ...


@dataclass(frozen=True)
class Rate:
    """A proportion with its Wilson score 95% interval (sound near 0% and 100%, unlike the
    normal approximation, which matters for erasure rates close to 0)."""

    value: float
    """Successes divided by `n`."""
    n: int
    """Number of trials (images)."""
    ci_low: float
    """Lower end of the 95% Wilson interval."""
    ci_high: float
    """Upper end of the 95% Wilson interval."""

    @classmethod
    def of(cls, successes: int, n: int) -> Rate:
        """The rate of `successes` out of `n` trials, with its interval."""
        if n <= 0:
            raise ValueError(f"a rate needs at least one trial, got n={n}")
        if not 0 <= successes <= n:
            raise ValueError(f"successes must lie in [0, n={n}], got {successes}")
        p = successes / n
        z2n = _Z95**2 / n
        centre = (p + z2n / 2) / (1 + z2n)
        half = _Z95 / (1 + z2n) * math.sqrt(p * (1 - p) / n + z2n / (4 * n))
        # clamp: at p = 0 or 1 the bound equals p exactly, up to rounding
        return cls(p, n, max(0.0, centre - half), min(1.0, centre + half))

    @classmethod
    def from_outcomes(cls, outcomes: torch.Tensor | Sequence[bool]) -> Rate:
        """The share of true entries in a 1-D boolean tensor or sequence."""
        outcomes = torch.as_tensor(outcomes, dtype=torch.bool)
        if outcomes.ndim != 1:
            raise ValueError(f"outcomes must be 1-D, got shape {tuple(outcomes.shape)}")
        return cls.of(int(outcomes.sum()), outcomes.numel())

    @property
    def successes(self) -> int:
        """Number of successes (`value * n`, rounded)."""
        return round(self.value * self.n)

    def to_dict(self) -> dict[str, float | int]:
        """The fields as a JSON-ready dict; `Rate(**d)` reads it back."""
        return asdict(self)

    def __str__(self) -> str:
        return f"{100 * self.value:.1f}% [{100 * self.ci_low:.1f}, {100 * self.ci_high:.1f}] n={self.n}"


def _check_predictions(predictions: Predictions, n: int, factors: Sequence[str]) -> None:
    for factor in factors:
        if factor not in predictions:
            raise ValueError(f"predictions lack factor {factor!r}; they have {sorted(predictions)}")
        if len(predictions[factor]) != n:
            raise ValueError(f"{len(predictions[factor])} {factor} predictions for {n} images")


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}")


def factor_accuracy_from_predictions(predictions: Predictions, scenes: Sequence[Scene]) -> dict[str, Rate]:
    """Accuracy of each factor against the scenes the images were asked to show, plus "all":
    the share of images with all three factors right."""
    if not scenes:
        raise ValueError("no scenes given")
    _check_predictions(predictions, len(scenes), tuple(FACTORS))
    correct = {
        f: torch.tensor([p == getattr(s, f) for p, s in zip(predictions[f], scenes)]) for f in FACTORS
    }
    rates = {f: Rate.from_outcomes(c) for f, c in correct.items()}
    rates["all"] = Rate.from_outcomes(torch.stack(list(correct.values())).all(0))
    return rates


def factor_accuracy(classifier: Classifier, images: torch.Tensor, scenes: Sequence[Scene]) -> dict[str, Rate]:
    """Per-factor accuracy (and "all" three right) of `classifier` on `images` (N, 3, H, W) in
    [0, 1] that were generated for `scenes`."""
    _check_images(images)
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images for {len(scenes)} scenes")
    return factor_accuracy_from_predictions(classifier.predict(images), scenes)


def concept_rate_from_predictions(predictions: Predictions, concept: str | Concept) -> Rate:
    """Share of images whose predicted value for the concept's factor is `concept` (e.g. the
    share of images read as "red")."""
    concept = as_concept(concept)
    values = predictions.get(concept.factor)
    if not values:
        raise ValueError(f"no {concept.factor} predictions to look for {concept.value!r} in")
    return Rate.from_outcomes([v == concept.value for v in values])


def concept_rate(classifier: Classifier, images: torch.Tensor, concept: str | Concept) -> Rate:
    """Share of `images` (N, 3, H, W) in [0, 1] that `classifier` reads as showing `concept`:
    after erasing "red", the share still read as red."""
    _check_images(images)
    concept = as_concept(concept)  # fail on an unknown concept before running the classifier
    return concept_rate_from_predictions(classifier.predict(images), concept)


def image_distance(a: torch.Tensor, b: torch.Tensor, metric: str = "mae") -> torch.Tensor:
    """Per-image distance between two batches of images (N, 3, H, W) in [0, 1], e.g. the same
    seeds with and without an eraser. "mae": mean absolute pixel difference; "rmse": root mean
    squared difference. Both are in pixel units: 0 for identical images, 1 at most."""
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    _check_images(a)
    diff = (a.float() - b.float()).flatten(1)
    if metric == "mae":
        return diff.abs().mean(1)
    if metric == "rmse":
        return diff.pow(2).mean(1).sqrt()
    raise ValueError(f"unknown metric {metric!r}; choose 'mae' or 'rmse'")


def preservation(before: Rate | float, after: Rate | float) -> float | None:
    """`after / before`: the share of the original accuracy that is kept, as the paper reports
    non-target accuracy ("percent of SD's accuracy"). The one policy for an undefined share:
    None when `before` is 0 (never 0, NaN or an error), and a bar on it fails."""
    b = before.value if isinstance(before, Rate) else float(before)
    a = after.value if isinstance(after, Rate) else float(after)
    return a / b if b > 0 else None
