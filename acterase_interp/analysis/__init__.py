"""The analysis library behind the research notebooks: where concepts live (difference, spatial
and causal maps; one causal sweep over site families, layer and step windows, both directions),
how many dimensions they occupy (mask density and overlap, difference spectra, probes, subspace
patches), and ablations of the method's open choices (tau sweeps, Pareto fronts,
multi-concept scaling).

Functions return tidy records (lists of flat dicts: one row each, carrying seeds and options;
`to_dataframe` converts them when pandas is installed) and `figures` draws them with plotly.
Masks for a new tau, time rule, pair rule or layer subset come from stored `FitStatistics`, so
only image generation is ever repeated.
"""

from ..hooks import count_steps
from ..patching import patched
from ..text_layers import text_layers
from .activations import collect_activations
from .causal import (
    best_cells,
    block_difference,
    causal_sweep,
    difference_vs_causal,
    layer_windows,
    sweep_families,
    window_label,
)
from .dimensionality import (
    concept_iou,
    concept_masks,
    difference_spectrum,
    dimension_findings,
    effective_rank,
    explained_variance,
    iou_matrix,
    mask_density,
    mask_density_curve,
    mask_iou,
    masks_iou,
    mean_pairwise_iou,
    pair_iou,
    pair_masks,
    planted_dimension,
    spectrum_records,
    step_iou,
    step_masks,
    unit_masks,
)
from .evaluation import Evaluator, evaluate_eraser, prompts_without, scene_of
from .localization import (
    causal_map,
    difference_map,
    eraser_measure,
    layers_of,
    map_correlation,
    normalized_difference,
    site_profile,
    spatial_difference,
    spatial_map,
    step_windows,
    token_grid,
    window_mean,
)
from .probes import probe_accuracy, probe_eraser_sites
from .records import group_mean, summarize, to_dataframe, where
from .subspace import SubspacePatch, subspace_efficacy, top_directions, top_units
from .sweeps import (
    PAPER_TAUS,
    SUMMARY_FIELDS,
    ablation_findings,
    best_tau,
    choice_ablation,
    fit_seeds,
    margin,
    multi_concept_scaling,
    pareto_front,
    tau_grid,
    tau_sweep,
)

__all__ = [
    "PAPER_TAUS",
    "SUMMARY_FIELDS",
    "Evaluator",
    "SubspacePatch",
    "ablation_findings",
    "best_cells",
    "best_tau",
    "block_difference",
    "causal_map",
    "causal_sweep",
    "choice_ablation",
    "collect_activations",
    "concept_iou",
    "concept_masks",
    "count_steps",
    "difference_map",
    "difference_spectrum",
    "dimension_findings",
    "difference_vs_causal",
    "effective_rank",
    "eraser_measure",
    "evaluate_eraser",
    "explained_variance",
    "fit_seeds",
    "group_mean",
    "iou_matrix",
    "layer_windows",
    "layers_of",
    "map_correlation",
    "margin",
    "mask_density",
    "mask_density_curve",
    "mask_iou",
    "masks_iou",
    "mean_pairwise_iou",
    "multi_concept_scaling",
    "normalized_difference",
    "pair_iou",
    "pair_masks",
    "pareto_front",
    "planted_dimension",
    "patched",
    "probe_accuracy",
    "probe_eraser_sites",
    "prompts_without",
    "scene_of",
    "site_profile",
    "spatial_difference",
    "spatial_map",
    "spectrum_records",
    "step_iou",
    "step_masks",
    "step_windows",
    "subspace_efficacy",
    "summarize",
    "sweep_families",
    "tau_grid",
    "tau_sweep",
    "text_layers",
    "to_dataframe",
    "token_grid",
    "top_directions",
    "top_units",
    "unit_masks",
    "where",
    "window_label",
    "window_mean",
]
