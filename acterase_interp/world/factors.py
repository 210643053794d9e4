"""The factors of ConceptWorld: what a scene can contain, and how scenes are drawn at random."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
BACKGROUNDS: tuple[str, ...] = ("plain", "stripes", "dots", "checkerboard")
FACTORS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "color": COLORS, "background": BACKGROUNDS}

RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.1, 0.1),
    "green": (0.1, 0.7, 0.15),
    "blue": (0.1, 0.2, 0.9),
    "yellow": (0.95, 0.85, 0.05),
    "purple": (0.55, 0.1, 0.75),
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
        return SHAPES.index(self.shape), COLORS.index(self.color), BACKGROUNDS.index(self.background)


def sample_scenes(n: int, rng: np.random.Generator) -> list[Scene]:
    """`n` scenes with every factor drawn uniformly."""
    s = rng.integers(len(SHAPES), size=n)
    c = rng.integers(len(COLORS), size=n)
    b = rng.integers(len(BACKGROUNDS), size=n)
    return [Scene(SHAPES[i], COLORS[j], BACKGROUNDS[k]) for i, j, k in zip(s, c, b)]


def all_scenes() -> list[Scene]:
    """Every factor combination once (100 scenes)."""
    return [Scene(s, c, b) for s in SHAPES for c in COLORS for b in BACKGROUNDS]
