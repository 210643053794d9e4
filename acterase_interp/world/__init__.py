"""ConceptWorld: a tiny text-to-image world whose concepts (shapes, colors, backgrounds) are known
exactly. A concept is a `Concept`, built from its name by `as_concept`."""

from .concept import Concept, as_concept

__all__ = ["Concept", "as_concept"]
