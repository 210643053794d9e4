"""Erasure restricted to a k-dimensional subspace: the top-k singular directions of the
target-minus-source differences, or the top-k units (coordinate directions).

At a site with activation x, an orthonormal basis V (units, k) and the source mean m, the patch is

    x <- x + ((m - x) V) V^T

i.e. the component of x inside span(V) is replaced by the source mean's component, and the rest of
x is kept. With V the unit vectors of k units this is exactly ActErase's Eq. 6 on those units, so
"top-k directions" and "top-k units" are compared with one patch and the same k.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ..patching import Window, patched
from ..sites import Site
from .records import Record

if TYPE_CHECKING:
    from ..erase.statistics import FitStatistics
    from .evaluation import Evaluator

BASIS_KINDS = ("directions", "units")


def top_directions(differences: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k right singular vectors (units, k) of the difference vectors `differences`
    (vectors, units), uncentred so that the mean difference counts."""
    _check_k(differences, k)
    if k > min(differences.shape):
        raise ValueError(f"{differences.shape[0]} difference vectors span at most {min(differences.shape)} directions; got k={k}")
    _, _, vh = torch.linalg.svd(differences.detach().double(), full_matrices=False)
    return vh[:k].T.float()


def top_units(differences: torch.Tensor, k: int) -> torch.Tensor:
    """The unit vectors (units, k) of the k units with the largest difference energy sum_i d_ij^2:
    the best k coordinates, as `top_directions` is the best k-dimensional subspace."""
    _check_k(differences, k)
    energy = differences.detach().double().pow(2).sum(0)
    index = energy.topk(k).indices
    return torch.eye(differences.shape[1])[:, index]


def _check_k(differences: torch.Tensor, k: int) -> None:
    if differences.ndim != 2:
        raise ValueError(f"differences must be (vectors, units), got shape {tuple(differences.shape)}")
    if not 1 <= k <= differences.shape[1]:
        raise ValueError(f"k must lie in [1, {differences.shape[1]}] units, got {k}")


@dataclass(frozen=True)
class SubspacePatch:
    """Replace the component of site activations inside a subspace by the source mean's component."""

    sites: tuple[Site, ...]
    """The patched sites; each activation is (batch, tokens, units)."""
    bases: Mapping[str, torch.Tensor]
    """Site name -> orthonormal basis (units, k) of the patched subspace."""
    means: Mapping[str, torch.Tensor]
    """Site name -> source mean, (units,) or (tokens, units)."""
    meta: Mapping[str, Any] = field(default_factory=dict)
    """How the patch was made (kind, k, concept, seeds, options)."""

    def __post_init__(self) -> None:
        for site in self.sites:
            if len(site.shape) != 2:
                raise ValueError(f"site {site.name} is not a (tokens, units) transformer site; SubspacePatch patches only those")
            if site.name not in self.bases or site.name not in self.means:
                raise ValueError(f"site {site.name} lacks a basis or a source mean")
            basis, mean = self.bases[site.name], self.means[site.name]
            if basis.ndim != 2 or mean.shape[-1] != basis.shape[0]:
                raise ValueError(f"site {site.name}: basis {tuple(basis.shape)} does not fit mean {tuple(mean.shape)}")

    @classmethod
    def from_differences(
        cls,
        sites: list[Site],
        differences: Mapping[str, torch.Tensor],
        means: Mapping[str, torch.Tensor],
        k: int,
        kind: str = "directions",
        **meta: Any,
    ) -> SubspacePatch:
        """A patch on the top-k `"directions"` or top-k `"units"` of each site's difference
        vectors (vectors, units); `means` are the source means per site."""
        if kind not in BASIS_KINDS:
            raise ValueError(f"unknown kind {kind!r}; choose from {BASIS_KINDS}")
        pick = top_directions if kind == "directions" else top_units
        bases = {s.name: pick(differences[s.name], k) for s in sites}
        return cls(tuple(sites), bases, {s.name: means[s.name] for s in sites}, {"kind": kind, "k": k, **meta})

    @classmethod
    def from_statistics(
        cls, statistics: FitStatistics, k: int, kind: str = "directions", blocks: Sequence[str] | None = None
    ) -> SubspacePatch:
        """A patch from a fit: the per-pair difference vectors (`FitStatistics.difference_vectors`)
        give the subspace, the fit's replacement values (averaged over steps) the source mean."""
        sites = [s for s in statistics.eraser(blocks=blocks).sites]
        means = {s.name: statistics.values[s.name].mean(0) for s in sites}
        return cls.from_differences(sites, statistics.difference_vectors(), means, k, kind,
                                    concept=statistics.pairs.concept, seeds=list(statistics.seeds),
                                    options=statistics.options.to_dict())  # fmt: skip

    def __call__(self, site_name: str, x: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """The patched activation of one site (every batch row; `step` is unused)."""
        basis = self.bases[site_name].to(x.device, x.dtype)
        mean = self.means[site_name].to(x.device, x.dtype)
        return x + ((mean - x) @ basis) @ basis.T

    @contextmanager
    def applied(self, model: object, steps: Window | None = None) -> Iterator[SubspacePatch]:
        """Patch every site while the context is open (only during denoising `steps` [start,
        stop) if given), via torch hooks on the UNet: `generate` inside the block is patched."""
        with patched(model, self, steps):
            yield self


def subspace_efficacy(
    statistics: FitStatistics,
    evaluator: Evaluator,
    ks: Sequence[int] = (1, 2, 4, 8),
    seeds: Sequence[int] = (0, 1, 2),
    *,
    blocks: Sequence[str] | None = None,
    progress: bool = True,
) -> list[Record]:
    """Erasure with the top-k singular directions vs the top-k units, for every k and seed: one
    row per (kind, k, seed) with the evaluator's fields (concept rate, preservation, ...). A k above
    the number of difference vectors (pairs) is skipped for directions, which cannot have more."""
    cells = [(kind, k, s) for kind in BASIS_KINDS for k in ks for s in seeds
             if kind == "units" or k <= statistics.num_pairs]  # fmt: skip
    patches: dict[tuple[str, int], SubspacePatch] = {}
    rows = []
    for kind, k, s in tqdm(cells, desc="subspace efficacy", disable=not progress):
        if (kind, k) not in patches:
            patches[(kind, k)] = SubspacePatch.from_statistics(statistics, k, kind, blocks)
        rows.append(evaluator(patches[(kind, k)], s, kind=kind, k=k))
    return rows
