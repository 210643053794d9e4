"""ActErase: training-free concept erasure by activation patching (arXiv 2601.00267).

    pairs = PromptPairs.load("nudity")
    eraser = EraserFitter(model, EraseOptions(tau=0.01)).fit(pairs)
    with eraser.applied(model):
        images = generate(model, prompts)
    looser = eraser.statistics.eraser(tau=0.02)  # re-threshold without the model
"""

from .eraser import Eraser
from .fit import EraserFitter
from .merge import merge
from .options import EraseOptions
from .pairs import PromptPairs
from .statistics import FitStatistics

__all__ = ["EraseOptions", "Eraser", "EraserFitter", "FitStatistics", "PromptPairs", "merge"]
