"""The ground truth of one benchmark planting: which sites carry the concept, at which units or in
which subspace, and which planted parts were verified to take part.

Written by the planting code from its `PlantRecord` and the verification runs; read by the scoring
code. A site is named as in `acterase_interp.sites` (`up.0.0.ffn_hidden`, `mid.0.attn1_out`, ...).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch


@dataclass(frozen=True)
class PlantingTruth:
    """Where one planted concept lives."""

    name: str
    """The planting's id in the benchmark (e.g. `diamond_units8_1b`): one concept per planting."""
    concept: str
    """The planted ConceptWorld value."""
    family: str
    """The planting family (`plant.PLANT_FAMILIES`)."""
    split: str
    """"dev" (the only half used to choose localizer hyperparameters) or "test"."""
    sites: tuple[str, ...]
    """Every site whose activations the planted weights write (site-level truth)."""
    units: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Unit-level truth: site -> the planted unit indices on that site's last axis. Empty when the
    planting is not unit-sparse (a whole module, or a rotated subspace)."""
    subspaces: dict[str, torch.Tensor] = field(default_factory=dict)
    """Subspace truth: site -> (dim, r) orthonormal basis of the directions the planting writes."""
    active: dict[str, float] = field(default_factory=dict)
    """Per planted site: the measured share of the concept removed when that site's planted weights
    alone are restored to their values before planting (the verification)."""
    inactive: tuple[str, ...] = ()
    """Planted sites whose restoration removed no measurable share: scored separately, so a
    localizer is not blamed for finding nothing there."""

    def __post_init__(self) -> None:
        if self.split not in ("dev", "test"):
            raise ValueError(f"split must be 'dev' or 'test', got {self.split!r}")
        for where in (*self.units, *self.subspaces, *self.active, *self.inactive):
            if where not in self.sites:
                raise ValueError(f"{where!r} is not among the planting's sites {self.sites}")
        for site, basis in self.subspaces.items():
            if basis.ndim != 2 or basis.shape[1] > basis.shape[0]:
                raise ValueError(f"the basis of {site!r} must be (dim, r) with r <= dim, got {tuple(basis.shape)}")

    def to_dict(self) -> dict:
        """JSON-ready (bases as nested lists)."""
        out = asdict(self)
        out["subspaces"] = {s: b.tolist() for s, b in self.subspaces.items()}
        out["units"] = {s: list(u) for s, u in self.units.items()}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> PlantingTruth:
        return cls(**{**d, "sites": tuple(d["sites"]), "inactive": tuple(d.get("inactive", ())),
                      "units": {s: tuple(u) for s, u in d.get("units", {}).items()},
                      "subspaces": {s: torch.tensor(b, dtype=torch.float32) for s, b in d.get("subspaces", {}).items()}})  # fmt: skip
