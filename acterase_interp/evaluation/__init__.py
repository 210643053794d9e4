"""Evaluation: one core (bars, seeds, prompt sets, preservation) for the demo, the quality check,
the analysis evaluator and the comparison table; baselines (`evaluation.baselines`), attacks
(`evaluation.attacks`), real-SD metrics (`evaluation.sd_metrics`) and the table
(`evaluation.table`) build on it, and on the UNet conditioning of SD and SDXL pipelines
(`evaluation.conditioning`)."""

from .core import (
    ATTACK_OFFSET,
    EVALUATION_OFFSET,
    FIT_OFFSET,
    REPLICATE_STRIDE,
    SEED_OFFSETS,
    TAU_SELECTION_OFFSET,
    Bar,
    PromptSet,
    format_bars,
    image_seeds,
    preservation,
)
from .prompts import SET_NAMES, conceptworld_prompt_sets, prompts_without, scene_of

__all__ = [
    "ATTACK_OFFSET", "EVALUATION_OFFSET", "FIT_OFFSET", "REPLICATE_STRIDE", "SEED_OFFSETS", "SET_NAMES",
    "TAU_SELECTION_OFFSET", "Bar", "PromptSet", "conceptworld_prompt_sets", "format_bars", "image_seeds",
    "preservation", "prompts_without", "scene_of",
]  # fmt: skip
