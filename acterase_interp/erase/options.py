"""The options of an ActErase fit: every choice the paper leaves open, with its most likely reading
as the default (see the table in the project's method notes)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..sites import SITE_KINDS

TAU_MODES = ("fraction", "absolute")
GRANULARITIES = ("unit", "token_unit")
TIME_MASKS = ("union", "last", "per_step", "majority")
CFG_ROWS = ("cond", "both")
PAIR_COMBINES = ("union", "intersection", "majority")
VALUE_MODES = ("mean", "per_step")
RANKINGS = ("importance", "zscore")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")


@dataclass(frozen=True)
class EraseOptions:
    """How ActErase collects statistics and turns them into masks and replacement values."""

    site_kind: str | tuple[str, ...] = "ffn_hidden"
    """Which site of every transformer block is patched: `ffn_hidden` (the paper's default, the
    GEGLU output read by `ff.net.2`), `ffn_out`, `attn1_out`, `attn2_k`, `attn2_v`, `attn2_out`,
    `block_out`, `unet_out`, or `text_layer`, the output of every text-encoder layer (see
    `acterase_interp.sites`); several kinds as a tuple, e.g. `("text_layer", "ffn_hidden")`."""
    tau: float = 0.01
    """Importance threshold of Eq. 5; its meaning depends on `tau_mode`."""
    tau_mode: str = "fraction"
    """`fraction`: per layer, pair and step, the top-`tau` share of units (or (token, unit)
    entries) by source importance pass, tau in (0, 1]. `absolute`: an entry passes when its
    source importance divided by the layer's largest source importance at that (pair, step)
    is >= tau, tau >= 0."""
    granularity: str = "unit"
    """`unit`: one mask bit per unit, importance averaged over tokens; `token_unit`: one bit per
    (token, unit), a spatial "region" mask (memory grows with tokens: see `EraserFitter`)."""
    time_mask: str = "union"
    """How the per-step masks of a pair become one: `union` over steps, the `last` step,
    `per_step` (a mask per step index, applied at that step), or a strict `majority` of steps."""
    cfg_rows: str = "cond"
    """Rows of the classifier-free-guidance batch that feed the statistics: `cond` (conditional
    rows only) or `both` (unconditional rows too, averaged in). Erasure always patches both."""
    blocks: tuple[str, ...] | None = None
    """Transformer blocks to patch, by name, prefix (`down`, `mid.0`, `up.1.2`) or preset
    (`sites.PRESETS`, e.g. `locogen`); None: all."""
    pair_combine: str = "union"
    """How the masks of the pairs become one (after combining over time): `union`,
    `intersection`, or a strict `majority` of pairs."""
    value_mode: str = "mean"
    """Replacement values: `mean` over steps and pairs of the source activations (the paper), or
    `per_step`: a mean over pairs for each step (steps times the memory)."""
    num_inference_steps: int | None = None
    """Denoising steps of the collection runs; None: the model's default."""
    guidance_scale: float | None = None
    """Classifier-free guidance scale of the collection runs; None: the model's default."""
    seed: int = 0
    """Seed of the first pair's initial noise; pair i uses `seed + i` unless given its own."""
    ranking: str = "importance"
    """Which units are replaced: `importance`, Eq. 4-5 (tau, tau_mode, time_mask, pair_combine
    and granularity apply); or `zscore`, LocoGen-style: per site the `top_k` units of largest
    |mean_target - mean_source| / pooled std (see `masks.zscores`), one mask for every token and
    step. Either way a masked unit takes the fitted value, the mean source activation (Eq. 6)."""
    top_k: int | None = None
    """Units replaced per site with `ranking="zscore"` (required there, ignored otherwise)."""

    def __post_init__(self) -> None:
        if isinstance(self.site_kind, str):
            _choice("site_kind", self.site_kind, SITE_KINDS)
        else:
            kinds = tuple(self.site_kind)
            if not kinds:
                raise ValueError("site_kind=() selects nothing; name at least one kind")
            for kind in kinds:
                _choice("site_kind", kind, SITE_KINDS)
            object.__setattr__(self, "site_kind", kinds[0] if len(kinds) == 1 else kinds)
        _choice("tau_mode", self.tau_mode, TAU_MODES)
        _choice("granularity", self.granularity, GRANULARITIES)
        _choice("time_mask", self.time_mask, TIME_MASKS)
        _choice("cfg_rows", self.cfg_rows, CFG_ROWS)
        _choice("pair_combine", self.pair_combine, PAIR_COMBINES)
        _choice("value_mode", self.value_mode, VALUE_MODES)
        _choice("ranking", self.ranking, RANKINGS)
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive int (units per site), got {self.top_k!r}")
        if self.ranking == "zscore" and self.top_k is None:
            raise ValueError("ranking='zscore' needs top_k, the number of units to replace per site")
        check_tau(self.tau, self.tau_mode)
        if isinstance(self.blocks, str):
            object.__setattr__(self, "blocks", (self.blocks,))
        elif self.blocks is not None:
            if not self.blocks:
                raise ValueError("blocks=() selects nothing; pass None for every block")
            object.__setattr__(self, "blocks", tuple(self.blocks))
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {self.num_inference_steps}")
        if self.guidance_scale is not None and self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly fields."""
        out = asdict(self)
        out["blocks"] = list(self.blocks) if self.blocks is not None else None
        out["site_kind"] = self.site_kind if isinstance(self.site_kind, str) else list(self.site_kind)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EraseOptions:
        """The options written by `to_dict`."""
        return cls(**data)


def check_tau(tau: float, mode: str) -> None:
    """Clear error for a threshold outside its mode's range."""
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"tau must be a number, got {tau!r}")
    if mode == "fraction" and not 0 < tau <= 1:
        raise ValueError(f"tau={tau} is outside (0, 1]: with tau_mode='fraction' it is the share of units kept")
    if mode == "absolute" and not tau >= 0:
        raise ValueError(f"tau={tau} must be >= 0 with tau_mode='absolute' (a threshold on normalised scores)")
