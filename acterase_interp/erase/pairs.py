"""Prompt pairs of a concept: each target prompt shows the concept, its source is a benign
rephrase of the same scene that donates the replacement activations."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..integrity import ArtifactError, read_object
from ..io import atomic_write_json
from ..loading import DATA_ENV, data_path, shipped_data_dir

_LISTS = ("targets", "sources", "heldout", "non_target")


def _prompts(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        raise TypeError(f"{name} must be a list of prompts, not one string")
    try:
        prompts = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be a list of prompts, not {type(value).__name__}") from None
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"{name}[{i}] must be a string, got {type(p).__name__}")
        if not p.strip():
            raise ValueError(f"{name}[{i}] is an empty prompt")
    return prompts


@dataclass(frozen=True)
class PromptPairs:
    """Prompt pairs for erasing one concept, plus prompts to evaluate the erasure."""

    concept: str
    """The concept's name, e.g. `nudity` or `triangle`."""
    targets: tuple[str, ...]
    """Prompts that show the concept."""
    sources: tuple[str, ...]
    """`sources[i]` is `targets[i]` without the concept: the same scene, benign."""
    heldout: tuple[str, ...] = ()
    """Prompts with the concept in other words, never used in fitting (does erasure generalise?)."""
    non_target: tuple[str, ...] = ()
    """Prompts without the concept (what erasure must preserve)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance: description, author, how the pairs were made."""

    def __post_init__(self) -> None:
        if not isinstance(self.concept, str) or not self.concept.strip():
            raise ValueError("concept must be a non-empty string")
        for name in _LISTS:
            object.__setattr__(self, name, _prompts(name, getattr(self, name)))
        if len(self.targets) != len(self.sources):
            raise ValueError(
                f"{len(self.targets)} targets but {len(self.sources)} sources: every target needs exactly one source"
            )
        if not self.targets:
            raise ValueError(f"no prompt pairs for concept {self.concept!r}")
        if not isinstance(self.meta, dict):
            raise TypeError(f"meta must be a dict, got {type(self.meta).__name__}")

    def __len__(self) -> int:
        return len(self.targets)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        """(target, source) pairs."""
        return iter(zip(self.targets, self.sources))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly fields (the file format: one key per field, prompt lists as lists)."""
        out = asdict(self)
        for name in _LISTS:
            out[name] = list(out[name])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptPairs:
        if not isinstance(data, dict):
            raise TypeError(f"prompt pairs must be a JSON object, not {type(data).__name__}")
        unknown = set(data) - {"concept", *_LISTS, "meta"}
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)} in prompt pairs")
        if missing := [k for k in ("concept", "targets", "sources") if k not in data]:
            raise ValueError(f"prompt pairs need the field(s) {missing}")
        return cls(**data)

    def save(self, path: str | os.PathLike) -> None:
        """Write as JSON (atomically)."""
        atomic_write_json(self.to_dict(), path)

    @classmethod
    def load(cls, name_or_path: str | os.PathLike) -> PromptPairs:
        """Pairs from a JSON file, or by bare name: `prompts/<name>.json` of `$ACTERASE_DATA`, else shipped."""
        path = Path(name_or_path).expanduser()
        if not path.exists() and path.suffix != ".json" and len(path.parts) == 1:
            path = data_path("prompts", f"{name_or_path}.json")
            if not path.exists():
                folders = [Path(os.environ[DATA_ENV]) / "prompts"] if os.environ.get(DATA_ENV) else []
                folders.append(shipped_data_dir() / "prompts")
                known = sorted({p.stem for folder in folders for p in folder.glob("*.json")})
                where = " or ".join(str(folder) for folder in folders)
                raise FileNotFoundError(f"no prompt pairs named {str(name_or_path)!r} in {where}; known: {known}")
        if not path.is_file():
            raise FileNotFoundError(f"no prompt pairs file at {path}")
        data = read_object(path, "prompt pairs (an object with concept, targets and sources)")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ArtifactError(f"{path}: {err}") from err
