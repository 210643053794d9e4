"""acterase-interp: ActErase concept erasure and mechanistic interpretability for text-to-image
diffusion models, built on nnsight tracing, with ConceptWorld as the bundled offline model."""

from ._quiet import silence_torchvision_fallback

silence_torchvision_fallback()  # before diffusers imports transformers' image processors


from .erase import EraseOptions, Eraser, EraserFitter, FitStatistics, PromptPairs, merge
from .integrity import ArtifactError
from .generation import TextInjection, TextLayerInjection, generate
from .loading import GenerationDefaults, architecture_hash, load, load_pipeline, wrap
from .sites import PRESETS, SITE_KINDS, Site, discover_sites, select_sites, site_by_name

__all__ = [
    "ArtifactError",
    "PRESETS",
    "SITE_KINDS",
    "EraseOptions",
    "Eraser",
    "EraserFitter",
    "FitStatistics",
    "PromptPairs",
    "merge",
    "GenerationDefaults",
    "Site",
    "TextInjection",
    "TextLayerInjection",
    "architecture_hash",
    "discover_sites",
    "generate",
    "load",
    "load_pipeline",
    "select_sites",
    "site_by_name",
    "wrap",
]
