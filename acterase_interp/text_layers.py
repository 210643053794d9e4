"""Text-encoder layer injection: the hidden states that chosen layers of a pipeline's text encoder
output for the generated prompts, replaced by their donor prompts' states at the same layers (a
causal probe of where in the text encoder a concept is written, as Basu et al., ICLR 2024, do for
CLIP).

The donors' states are recorded by the pipeline's own `encode_prompt` (same tokenizer, padding and
encoder call), and forward hooks on the chosen layers replace the outputs only while the encoder
reads the generated prompts' input ids: the negative (unconditional) prompt's encoding, a separate
encoder call, is left alone, unless its ids are the prompts' own (prompts that are all the
negative prompt, e.g. ""), whose encodings are the same call.

Layers are named `<encoder>.<index>` in sweeps (`text_encoder.3`, SDXL's second encoder
`text_encoder_2.3`), indices counting from 0 in execution order. Known answers (tested): SD 1.x/2.x
feed the UNet the final layer norm of the last layer's output and ConceptWorld's BERT the last
layer's output itself, so replacing the last layer at every token is the donor's image exactly.
The same layers are `text_layer` intervention sites (`text_layer_sites`) for fitting and erasing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .hooks import Hooks
from .injection import encode_prompts, prompt_tuple
from .patching import unwrap
from .sites import TEXT_LAYER, Site

ENCODERS = ("text_encoder", "text_encoder_2")
"""The pipeline attributes that hold text encoders (SD: the first; SDXL: both)."""
LAYER_PATHS = ("encoder.layers", "text_model.encoder.layers", "encoder.layer")
"""Where encoders keep their transformer layers: CLIPTextModel (transformers 5), a CLIP wrapping its
text model (CLIPTextModelWithProjection, older CLIPTextModel), BERT."""


@dataclass(frozen=True)
class TextLayerInjection:
    """Donor prompts for `generation.generate(..., inject=...)`: while the pipeline encodes prompt
    i, the outputs of `layers` of its `encoder` are `prompts[i]`'s (at `tokens`)."""

    prompts: tuple[str, ...]
    """Donor prompts, one per generated prompt (1:1, in order)."""
    layers: tuple[int, ...]
    """Indices of the encoder's layers whose outputs are replaced; (): none."""
    encoder: str = "text_encoder"
    """The pipeline attribute of the encoder (`text_encoder_2`: SDXL's second)."""
    tokens: tuple[int, ...] | None = None
    """Token positions replaced (0 is the first token, e.g. CLIP's start token); None: all."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", prompt_tuple(self.prompts, "TextLayerInjection"))
        object.__setattr__(self, "layers", _indices(self.layers, "layers"))
        if self.tokens is not None:
            object.__setattr__(self, "tokens", _indices(self.tokens, "tokens"))
        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown text encoder {self.encoder!r}; choose from {ENCODERS}")

    def applied(self, pipe: Any, sources: Sequence[str], targets: Sequence[str]) -> AbstractContextManager[None]:
        """Inside the block, `pipe`'s encoder reading `targets`' ids outputs `sources`' states at
        the chosen layers (see the module docstring). Hooks are removed on exit, even on an exception."""
        return _layers_injected(pipe, self, list(sources), list(targets))


def _indices(values: int | Sequence[int], what: str) -> tuple[int, ...]:
    values = (values,) if isinstance(values, int) else tuple(values)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{what} must be non-negative int indices, got {values!r}")
    return values


def layers_path(pipe: Any, encoder: str = "text_encoder") -> str:
    """The dotted path of `encoder`'s layer list inside the encoder, one of `LAYER_PATHS`."""
    module = getattr(pipe, encoder, None) if encoder in ENCODERS else None
    if module is None:
        have = [e for e in ENCODERS if getattr(pipe, e, None) is not None]
        raise ValueError(f"this pipeline has no text encoder {encoder!r}; it has {have}")
    for path in LAYER_PATHS:
        try:
            module.get_submodule(path)
        except AttributeError:
            continue
        return path
    raise TypeError(f"{encoder} is a {type(module).__name__}; layer injection knows CLIP and BERT encoders, whose "
                    f"layers are at one of {list(LAYER_PATHS)}")  # fmt: skip


def encoder_layers(pipe: Any, encoder: str = "text_encoder") -> torch.nn.ModuleList:
    """The transformer layers of `pipe`'s text encoder `encoder`, in execution order: CLIP's
    `encoder.layers` (or `text_model.encoder.layers`) or BERT's `encoder.layer`."""
    path = layers_path(pipe, encoder)  # first: a clear error for a missing encoder
    return getattr(pipe, encoder).get_submodule(path)


def text_layers(pipe: Any, encoder: str | None = None) -> list[str]:
    """The sweep names (`text_encoder.0`, ...) of `encoder`'s layers; None: every encoder's, in turn."""
    encoders = [encoder] if encoder is not None else [e for e in ENCODERS if getattr(pipe, e, None) is not None]
    return [f"{e}.{i}" for e in encoders for i in range(len(encoder_layers(pipe, e)))]


@torch.no_grad()
def text_layer_sites(pipe: Any) -> list[Site]:
    """Every layer of `pipe`'s text encoders as a `text_layer` site (`sites.Site`, named as
    `text_layers` names them, encoders in turn: execution order), with its per-prompt shape
    (tokens, width) measured by one encode of a probe prompt (tokens: the tokenizer's padded length)."""
    names = text_layers(pipe)
    shapes: dict[str, tuple[int, ...]] = {}
    with Hooks() as hooks:
        for name in names:
            encoder, _, i = name.rpartition(".")

            def hook(module: torch.nn.Module, args: tuple, output: Any, name: str = name) -> None:
                shapes.setdefault(name, tuple(unwrap(output).shape[1:]))

            hooks.forward(encoder_layers(pipe, encoder)[int(i)], hook, name=f"shape of {name}")
        encode_prompts(pipe, ["a red circle"])
    sites = []
    for name in names:
        encoder, _, i = name.rpartition(".")
        path = f"{layers_path(pipe, encoder)}.{i}"
        sites.append(Site(name, TEXT_LAYER, name, path, "output", None, shapes[name], component=encoder))
    return sites


def parse_text_layers(names: Sequence[str]) -> tuple[str, tuple[int, ...]]:
    """(encoder, indices) of layer names of one encoder (`("text_encoder.4", "text_encoder.5")`)."""
    parsed = [name.rpartition(".") for name in names]
    if not names or any(sep != "." or e not in ENCODERS or not i.isdigit() for e, sep, i in parsed):
        raise ValueError(f"text-encoder layers are named <encoder>.<index> with encoder in {ENCODERS} "
                         f"(e.g. 'text_encoder.3'), got {list(names)}")  # fmt: skip
    encoders = {e for e, _, _ in parsed}
    if len(encoders) > 1:
        raise ValueError(f"a window of text-encoder layers lies in one encoder, got {sorted(encoders)}")
    return encoders.pop(), tuple(int(i) for _, _, i in parsed)


def _input_ids(args: tuple, kwargs: dict) -> torch.Tensor:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        raise RuntimeError("the text encoder was called without input_ids: cannot tell which prompts it encodes")
    return ids


def _record(pipe: Any, encoder: str, layers: dict[int, torch.nn.Module], prompts: list[str]) -> tuple[torch.Tensor, dict]:
    """The input ids that `pipe.encode_prompt` gives `encoder` for `prompts`, and `layers`' outputs."""
    ids: list[torch.Tensor] = []
    states: dict[int, torch.Tensor] = {}
    with Hooks() as hooks:
        hooks.pre(getattr(pipe, encoder), lambda m, a, kw: ids.append(_input_ids(a, kw).cpu()),
                  name=f"record {encoder} input ids", with_kwargs=True)  # fmt: skip
        for i, layer in layers.items():
            hooks.forward(layer, lambda m, a, out, i=i: states.__setitem__(i, out.detach().clone()),
                          name=f"record {encoder}.{i}")  # fmt: skip
        encode_prompts(pipe, prompts)
    if len(ids) != 1:
        raise RuntimeError(f"encoding one batch of prompts called {encoder} {len(ids)} times; expected once")
    return ids[0], states


def _swapped(output: torch.Tensor, source: torch.Tensor, tokens: tuple[int, ...] | None) -> torch.Tensor:
    """`output` with `source`'s states at `tokens` (None: all)."""
    if output.shape != source.shape:
        raise ValueError(f"the encoder's layer outputs {tuple(output.shape)}, the donors' {tuple(source.shape)}: "
                         "inject one donor prompt per generated prompt, encoded by the same pipeline")  # fmt: skip
    source = source.to(device=output.device, dtype=output.dtype)
    if tokens is None:
        return source
    if max(tokens) >= output.shape[1]:
        raise ValueError(f"token positions {list(tokens)} are outside the encoder's {output.shape[1]} tokens")
    out = output.clone()
    out[:, list(tokens)] = source[:, list(tokens)]
    return out


@contextmanager
def _layers_injected(pipe: Any, inject: TextLayerInjection, sources: list[str], targets: list[str]) -> Iterator[None]:
    if len(sources) != len(targets):
        raise ValueError(f"got {len(sources)} donor prompts for {len(targets)} prompts: give one each")
    all_layers = encoder_layers(pipe, inject.encoder)
    if bad := [i for i in inject.layers if i >= len(all_layers)]:
        raise ValueError(f"{inject.encoder} has {len(all_layers)} layers (0 to {len(all_layers) - 1}), got layer(s) {bad}")
    layers = {i: all_layers[i] for i in inject.layers}
    if not layers:
        yield
        return
    _, source = _record(pipe, inject.encoder, layers, sources)
    target_ids, _ = _record(pipe, inject.encoder, {}, targets)
    reading = [False]  # True while the encoder runs on the targets' ids

    def enter(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = _input_ids(args, kwargs).cpu()
        reading[0] = ids.shape == target_ids.shape and torch.equal(ids, target_ids)

    def leave(module: torch.nn.Module, args: tuple, output: Any) -> None:
        reading[0] = False

    def swap(module: torch.nn.Module, args: tuple, output: torch.Tensor, i: int) -> torch.Tensor | None:
        return _swapped(output, source[i], inject.tokens) if reading[0] else None

    with Hooks() as hooks:
        encoder = getattr(pipe, inject.encoder)
        hooks.pre(encoder, enter, name=f"{inject.encoder} enters", with_kwargs=True)
        hooks.forward(encoder, leave, name=f"{inject.encoder} leaves")
        # prepended: transformers collects `output_hidden_states` (SDXL reads them) by its own layer
        # hooks, which must see the replaced output
        for i, layer in layers.items():
            hooks.forward(layer, lambda m, a, out, i=i: swap(m, a, out, i), name=f"inject {inject.encoder}.{i}",
                          prepend=True)  # fmt: skip
        yield
