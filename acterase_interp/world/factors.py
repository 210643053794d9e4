"""The factors of ConceptWorld: what a scene can contain, and how scenes are drawn at random."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Natural values: what a base model learns from scratch. Plantable values are drawn and read by the
# classifier too, but a model only knows them once `world.planting` teaches them to chosen parameters.
NATURAL: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "star", "cross"),
    "color": ("red", "green", "blue", "yellow", "purple"),
    "background": ("plain", "stripes", "dots", "checkerboard"),
}
PLANTABLE: dict[str, tuple[str, ...]] = {
    "shape": ("heart", "moon", "diamond", "arrow", "ring"),
    "color": ("cyan", "orange", "pink", "brown"),
    "background": ("zigzag", "grid"),
}
"""Appended in the order they were added, so earlier classifiers' label indices stay valid: the
values after heart, moon and cyan are the ground-truth benchmark's (`acterase_interp.bench`)."""
FACTORS: dict[str, tuple[str, ...]] = {f: NATURAL[f] + PLANTABLE[f] for f in NATURAL}
"""Every value per factor, in the classifier's label order (natural values first)."""
SHAPES, COLORS, BACKGROUNDS = FACTORS["shape"], FACTORS["color"], FACTORS["background"]

RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.1, 0.1),
    "green": (0.1, 0.7, 0.15),
    "blue": (0.1, 0.2, 0.9),
    "yellow": (0.95, 0.85, 0.05),
    "purple": (0.55, 0.1, 0.75),
    "cyan": (0.1, 0.8, 0.85),
    "orange": (0.95, 0.5, 0.05),
    "pink": (0.95, 0.45, 0.7),
    "brown": (0.45, 0.25, 0.1),
}


def factor_of(concept: str) -> str:
    """The factor ("shape", "color" or "background") that a concept value belongs to."""
    for factor, values in FACTORS.items():
        if concept in values:
            return factor
    known = ", ".join(v for values in FACTORS.values() for v in values)
    raise ValueError(f"unknown ConceptWorld concept {concept!r}; known: {known}")


@dataclass(frozen=True)
class Scene:
    """One object on one background; position and size are drawn at render time from the seed."""

    shape: str
    color: str
    background: str

    def __post_init__(self) -> None:
        for factor, value in (("shape", self.shape), ("color", self.color), ("background", self.background)):
            if value not in FACTORS[factor]:
                raise ValueError(f"unknown {factor} {value!r}; choose from {FACTORS[factor]}")

    def labels(self) -> tuple[int, int, int]:
        """Class indices (shape, color, background), as the classifier predicts them."""
        return tuple(FACTORS[f].index(getattr(self, f)) for f in FACTORS)


def sample_scenes(n: int, rng: np.random.Generator, values: dict[str, tuple[str, ...]] = NATURAL) -> list[Scene]:
    """`n` scenes with every factor drawn uniformly from `values` (default: the natural values)."""
    picks = [rng.integers(len(values[f]), size=n) for f in ("shape", "color", "background")]
    return [Scene(values["shape"][i], values["color"][j], values["background"][k]) for i, j, k in zip(*picks)]


def all_scenes() -> list[Scene]:
    """Every combination of natural values once (100 scenes)."""
    return [Scene(s, c, b) for s in NATURAL["shape"] for c in NATURAL["color"] for b in NATURAL["background"]]
