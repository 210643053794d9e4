"""acterase-interp: ActErase concept erasure and mechanistic interpretability for text-to-image
diffusion models, built on nnsight tracing, with ConceptWorld as the bundled offline model."""

from ._quiet import silence_torchvision_fallback

silence_torchvision_fallback()  # before diffusers imports transformers' image processors


from .erase import EraseOptions, Eraser, EraserFitter, FitStatistics, PromptPairs, merge
from .executor import Spec
from .integrity import ArtifactError
from .generation import TextInjection, TextLayerInjection, generate
from .loading import GenerationDefaults, architecture_hash, conceptworld_dir, load, load_classifier, load_pipeline, wrap
from .plant import PlantSpec
from .provenance import library_versions
from .random_sd import build_random_sd
from .sites import PRESETS, SITE_KINDS, Site, discover_sites, select_sites, site_by_name
from .world.classifier import ConceptClassifier
from .world.pairs import conceptworld_pairs

__all__ = [
    "ArtifactError",
    "PRESETS",
    "SITE_KINDS",
    "ConceptClassifier",
    "EraseOptions",
    "Eraser",
    "EraserFitter",
    "FitStatistics",
    "PlantSpec",
    "PromptPairs",
    "merge",
    "GenerationDefaults",
    "Site",
    "Spec",
    "TextInjection",
    "TextLayerInjection",
    "architecture_hash",
    "build_random_sd",
    "conceptworld_dir",
    "conceptworld_pairs",
    "discover_sites",
    "generate",
    "library_versions",
    "load",
    "load_classifier",
    "load_pipeline",
    "select_sites",
    "site_by_name",
    "wrap",
]
