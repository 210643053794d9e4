"""The evaluation core shared by the demo, the quality check, the analysis evaluator and the
baseline table: one `Bar` type with one printer, one preservation policy, named seed offsets, and
prompt sets that carry the scenes they ask for.

Seeds. Every image seed is `base + offset + replicate * REPLICATE_STRIDE + k` for image k, with
one offset per purpose (`SEED_OFFSETS`), so fitting, choosing tau, evaluating and attacking never
share noise:

- fit: pair i of a fit with seed s uses s + i (`EraserFitter`);
- tau selection: s + 500 + k (`choose_tau`);
- evaluation: s + 1000 + k, replicate r adding r * 100 000 (the demo, `Evaluator`, the table);
- attack: s + 2000 + k (the prompt search and concept inversion score their candidates there; the
  attack success rate is then measured on evaluation seeds).

The quality check draws its image seeds from its own random stream (`world.quality`): it tests the
model, not an eraser, and shares no prompts with erasure runs.

Preservation: `after / before`; when `before` is 0 the ratio is undefined and is None (JSON null),
never 0, NaN or an error, and a bar on an undefined value fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from ..metrics import preservation  # the one policy: None when before is 0
from ..world.factors import Scene

FIT_OFFSET = 0
TAU_SELECTION_OFFSET = 500
EVALUATION_OFFSET = 1000
ATTACK_OFFSET = 2000
REPLICATE_STRIDE = 100_000
"""Replicate r of a purpose moves its seeds by r * REPLICATE_STRIDE: fresh noise per replicate."""
SEED_OFFSETS: dict[str, int] = {
    "fit": FIT_OFFSET, "tau_selection": TAU_SELECTION_OFFSET, "evaluation": EVALUATION_OFFSET, "attack": ATTACK_OFFSET,
}  # fmt: skip

Direction = Literal[">=", "<="]

__all__ = ["ATTACK_OFFSET", "EVALUATION_OFFSET", "FIT_OFFSET", "REPLICATE_STRIDE", "SEED_OFFSETS", "TAU_SELECTION_OFFSET",
           "Bar", "PromptSet", "format_bars", "image_seeds", "preservation"]  # fmt: skip


def image_seeds(purpose: str, n: int, base: int = 0, replicate: int = 0) -> list[int]:
    """The `n` image seeds of `purpose` ("fit", "tau_selection", "evaluation", "attack") for a run
    with seed `base`, replicate `replicate` (see the module docstring)."""
    if purpose not in SEED_OFFSETS:
        raise ValueError(f"unknown seed purpose {purpose!r}; choose from {sorted(SEED_OFFSETS)}")
    if n < 0 or replicate < 0:
        raise ValueError(f"n and replicate must be non-negative, got {n} and {replicate}")
    start = base + SEED_OFFSETS[purpose] + replicate * REPLICATE_STRIDE
    return [start + k for k in range(n)]


@dataclass(frozen=True)
class Bar:
    """One pass/fail check: `value` must be `direction` (">=" or "<=") `threshold`. A value of
    None (e.g. an undefined preservation ratio) fails."""

    name: str
    value: float | None
    threshold: float
    direction: Direction
    passed: bool

    @classmethod
    def check(cls, name: str, value: float | None, direction: Direction, threshold: float) -> Bar:
        """The bar with `passed` computed (equality passes, with float round-off forgiven)."""
        if direction not in (">=", "<="):
            raise ValueError(f"direction must be '>=' or '<=', got {direction!r}")
        if value is None:
            passed = False
        elif direction == ">=":
            passed = value >= threshold - 1e-12
        else:
            passed = value <= threshold + 1e-12
        return cls(name, None if value is None else float(value), float(threshold), direction, passed)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Bar:
        return cls(**data)

    def __str__(self) -> str:
        value = "n/a" if self.value is None else f"{100 * self.value:.1f}%"
        return f"{'PASS' if self.passed else 'FAIL'}: {self.name} = {value} (needs {self.direction} {100 * self.threshold:.0f}%)"


def format_bars(bars: Sequence[Bar | dict], bullet: str = "") -> str:
    """The bars, one line each (`str(Bar)`), optionally as a markdown list (`bullet="- "`)."""
    return "\n".join(bullet + str(b if isinstance(b, Bar) else Bar.from_dict(b)) for b in bars)


@dataclass(frozen=True)
class PromptSet:
    """A named group of evaluation prompts, one per image, with the scene each asks for."""

    name: str
    prompts: tuple[str, ...]
    scenes: tuple[Scene, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "scenes", tuple(self.scenes))
        if len(self.prompts) != len(self.scenes):
            raise ValueError(f"prompt set {self.name!r}: {len(self.prompts)} prompts for {len(self.scenes)} scenes")
        if not self.prompts:
            raise ValueError(f"prompt set {self.name!r} is empty")

    def __len__(self) -> int:
        return len(self.prompts)

    def repeated(self, times: int) -> PromptSet:
        """Each prompt `times` times in a row (each image has its own seed)."""
        if times < 1:
            raise ValueError(f"times must be at least 1, got {times}")
        return PromptSet(self.name, tuple(p for p in self.prompts for _ in range(times)),
                         tuple(s for s in self.scenes for _ in range(times)))  # fmt: skip
