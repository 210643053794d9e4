"""ConceptWorld as a ground-truth benchmark: plantings of known site, sparsity and rank
(`truth`), localizers behind one interface, their scores against the truth, and the leaderboard."""

from .truth import PlantingTruth

__all__ = ["PlantingTruth"]
