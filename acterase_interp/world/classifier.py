"""The ConceptWorld concept classifier: a small CNN with one head per factor.

It reads which shape, color and background a 32x32 image shows; trained on clean renders, it is
the ground truth that tells whether a generated image still shows an erased concept.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..io import atomic_save_safetensors, atomic_write_json
from .factors import FACTORS

_CONFIG = "classifier.json"
_WEIGHTS = "classifier.safetensors"


class ConceptClassifier(nn.Module):
    """Images (N, 3, 32, 32) in [-1, 1] -> one logit tensor per factor."""

    def __init__(self, width: int = 32, factors: dict[str, tuple[str, ...]] = FACTORS) -> None:
        super().__init__()
        self.width = width
        self.factors = {f: tuple(v) for f, v in factors.items()}  # v1's classifier knows no planted values

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.MaxPool2d(2),
            )  # fmt: skip

        self.features = nn.Sequential(
            block(3, width), block(width, 2 * width), block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.heads = nn.ModuleDict({f: nn.Linear(4 * width, len(v)) for f, v in self.factors.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(images)
        return {f: head(h) for f, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, list[str]]:
        """Factor value names per image; `images` (N, 3, 32, 32) in [0, 1], as `generate` returns them."""
        was_training = self.training
        self.eval()
        logits = self(images.to(next(self.parameters()).device, torch.float32) * 2 - 1)
        self.train(was_training)
        return {f: [self.factors[f][i] for i in lg.argmax(-1).tolist()] for f, lg in logits.items()}

    def shows(self, images: torch.Tensor, concept: str) -> torch.Tensor:
        """Bool per image: does it show `concept` (a value of any factor)? `images` as for `predict`."""
        factor = next((f for f, values in self.factors.items() if concept in values), None)
        if factor is None:
            raise ValueError(f"this classifier does not read {concept!r}; it knows {self.factors}")
        return torch.tensor([v == concept for v in self.predict(images)[factor]])

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors({k: v.contiguous() for k, v in self.state_dict().items()}, directory / _WEIGHTS)
        config = {"width": self.width, "factors": {k: list(v) for k, v in self.factors.items()}}
        atomic_write_json(config, directory / _CONFIG)

    @classmethod
    def load(cls, directory: str | Path) -> "ConceptClassifier":
        directory = Path(directory)
        if not (directory / _WEIGHTS).exists():
            raise FileNotFoundError(f"no concept classifier in {directory} (expected {_WEIGHTS}); train one with "
                                    "`python -m acterase_interp.world.train`")
        config = json.loads((directory / _CONFIG).read_text())
        model = cls(width=config["width"], factors=config["factors"])
        model.load_state_dict(load_file(directory / _WEIGHTS))
        return model.eval()

