"""ActErase: training-free concept erasure by activation patching (arXiv 2601.00267).

    pairs = PromptPairs.load("nudity")
    fitter = EraserFitter(model, EraseOptions(tau=0.01))
    eraser = fitter.fit(pairs)
    with eraser.applied(model):
        images = generate(model, prompts)
    looser = Eraser.from_statistics(fitter.statistics, tau=0.02)  # re-threshold without the model
"""

from .eraser import Eraser
from .fit import EraserFitter
from .gated import GatedEraser, fit_gated
from .merge import merge
from .options import EraseOptions
from .pairs import PromptPairs
from .statistics import FitStatistics

__all__ = ["EraseOptions", "Eraser", "EraserFitter", "FitStatistics", "GatedEraser", "PromptPairs", "fit_gated", "merge"]
