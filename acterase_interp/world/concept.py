"""A ConceptWorld concept, read once: its value, factor, words and planting record.

A name ("heart") becomes a `Concept` at the entry of every public function (`as_concept`); below
that, code reads the concept's fields instead of looking its factor up again. `str(concept)` is
the value, so f-strings and JSON keys read as the name did.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .captions import WORDS
from .factors import FACTORS, NATURAL, Scene, factor_of


@dataclass(frozen=True)
class Concept:
    """One value of one ConceptWorld factor (e.g. the shape "heart"); build it with `as_concept`."""

    value: str
    factor: str
    planted: dict[str, Any] | None = field(default=None, compare=False)
    """Its entry in a model's `planted` records (planted.json), or None: natural, not planted, or not
    asked for. Not compared: a concept equals itself with or without its record."""

    def __post_init__(self) -> None:
        if self.value not in FACTORS.get(self.factor, ()):
            raise ValueError(f"{self.value!r} is not a ConceptWorld {self.factor}")

    def __str__(self) -> str:
        return self.value

    @property
    def words(self) -> tuple[str, ...]:
        """How captions say it: the canonical word, then synonyms."""
        return WORDS[self.value]

    @property
    def natural(self) -> bool:
        """Whether a base model knows it; False for a plantable value (`factors.PLANTABLE`)."""
        return self.value in NATURAL[self.factor]

    @property
    def others(self) -> tuple[Concept, ...]:
        """The other natural values of its factor: what replaces it in sources and non-target prompts."""
        return tuple(Concept(v, self.factor) for v in NATURAL[self.factor] if v != self.value)

    def replace_in(self, scene: Scene) -> Scene:
        """`scene` with this concept in place of its factor's value."""
        return replace(scene, **{self.factor: self.value})


def as_concept(concept: str | Concept, planted: Sequence[dict[str, Any]] | None = None) -> Concept:
    """The concept named `concept` (a Concept is returned as it is); a clear error for an unknown
    name. With `planted` (a model's `model.planted`), it carries its record from there, or None."""
    if not isinstance(concept, Concept):
        concept = Concept(concept, factor_of(concept))
    if planted is None:
        return concept
    return replace(concept, planted=next((r for r in planted if r["concept"] == concept.value), None))


def with_values(
    extra: Mapping[str, Iterable[str | Concept]] | Iterable[str | Concept],
) -> dict[str, tuple[str, ...]]:
    """The natural values plus `extra` concepts (e.g. a model's planted ones), per factor."""
    groups = extra.values() if isinstance(extra, Mapping) else [extra]
    added = [as_concept(c) for cs in groups for c in cs]
    return {f: NATURAL[f] + tuple(c.value for c in added if c.factor == f and not c.natural) for f in NATURAL}
