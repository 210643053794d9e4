"""Text injection: the prompt that chosen transformer blocks' cross-attention reads, swapped for
another prompt's, during chosen denoising steps (a causal probe of where text acts).

The source prompts are encoded exactly as the pipeline encodes its prompts (SDXL: both encoders),
and forward pre-hooks on the chosen blocks' `attn2` replace the conditional rows of its
`encoder_hidden_states`; the unconditional (negative) rows of classifier-free guidance stay as they
are. Only cross-attention inputs change: SDXL's pooled text embedding and time ids condition the
whole UNet through its time embedding, not per block, and stay the target prompt's.

Text reaches an SD UNet only through cross-attention, so injecting the source into every block at
every step reproduces the source prompt's image exactly (tested); on SDXL it gives the image of the
source's text states with the target's pooled embedding.

Diffusion transformers (FLUX, SD3) have no cross-attention: a text stream runs through the blocks
beside the image stream, and each block's joint attention updates both. The analogue: the chosen
blocks (`double.<i>`, `single.<i>`, as `sites.select_sites` names them) read, in their conditional
rows, the text-stream tokens that the source prompt has at that block. Those are computed in the
same transformer call, by shadow rows appended to the batch: the current latents, timestep and
pooled embedding with the source's prompt embedding, untouched by the injection. Injecting into
every block at every step therefore gives exactly the pipeline's image of the source's prompt
embedding with the target's pooled embedding (tested): as on SDXL, the pooled CLIP embedding
conditions every block through the time embedding, is not per block, and stays the target's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .hooks import Hooks, Window
from .sites import is_dit, list_dit_sites, list_sites, select_sites


class Injection(Protocol):
    """What `generation.generate(..., inject=...)` takes: one donor prompt per generated prompt,
    and the hooks that make the pipeline use them (`TextInjection`, `TextLayerInjection`)."""

    prompts: tuple[str, ...]

    def applied(self, pipe: Any, sources: Sequence[str], targets: Sequence[str]) -> AbstractContextManager[None]:
        """Inside the block, a pipeline call on `targets` (a batch of the generated prompts) reads
        `sources` (their donors, 1:1) where this injection says."""
        ...


def prompt_tuple(prompts: str | Sequence[str], what: str) -> tuple[str, ...]:
    """`prompts` as a non-empty tuple of strings (one string: a tuple of one); `what` names the
    injection in the error."""
    prompts = (prompts,) if isinstance(prompts, str) else tuple(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{what} needs one or more source prompt strings, got {prompts!r}")
    return prompts


@dataclass(frozen=True)
class TextInjection:
    """Source prompts for `generation.generate(..., inject=...)`: prompt i of the generation has
    its cross-attention text replaced by `prompts[i]` in `blocks` during `steps`."""

    prompts: tuple[str, ...]
    """Source prompts, one per generated prompt (1:1, in order)."""
    blocks: tuple[str, ...] | None
    """Transformer blocks whose `attn2` reads the source, by name, prefix or preset as in
    `sites.select_sites` (`("up.1",)`; on a DiT `double.<i>`, `single.<i>`, `double.last<N>`);
    None: every block; (): none."""
    steps: Window | None = None
    """Denoising steps [start, stop) of the injection; None: every step."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", prompt_tuple(self.prompts, "TextInjection"))
        if self.blocks is not None:
            object.__setattr__(self, "blocks", (self.blocks,) if isinstance(self.blocks, str) else tuple(self.blocks))
        if self.steps is not None:
            start, stop = self.steps
            if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop):
                raise ValueError(f"steps must be a window (start, stop) of ints with 0 <= start <= stop, got {self.steps}")
            object.__setattr__(self, "steps", (start, stop))

    def applied(self, pipe: Any, sources: Sequence[str], targets: Sequence[str]) -> AbstractContextManager[None]:
        """`injected(pipe, self, sources)`: the blocks read `sources` whatever the prompts are."""
        return injected(pipe, self, sources)


def encode_prompts(pipe: Any, prompts: list[str]) -> torch.Tensor:
    """The conditional text states (prompts, tokens, width) that `pipe` feeds its UNet for
    `prompts`, by the pipeline's own `encode_prompt` (SDXL: both encoders, concatenated; FLUX: T5's
    states; SD3: CLIP's and T5's, joined as the transformer reads them)."""
    if is_dit(getattr(pipe, "transformer", None)):
        return encode_dit_prompts(pipe, prompts)[0]
    # by keyword: SDXL's second positional argument is prompt_2
    return pipe.encode_prompt(prompt=prompts, device=pipe._execution_device, num_images_per_prompt=1,
                              do_classifier_free_guidance=False)[0]


def _swap_conditional(states: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """`states` with its conditional rows replaced by `source`: all rows without guidance, the
    second half with it (pipelines batch [unconditional, conditional])."""
    n = source.shape[0]
    if states.shape[1:] != source.shape[1:] or states.shape[0] not in (n, 2 * n):
        raise ValueError(
            f"cross-attention reads text states of shape {tuple(states.shape)}, the injected prompts are "
            f"{tuple(source.shape)}: inject one source prompt per generated prompt, encoded by the same pipeline"
        )
    source = source.to(device=states.device, dtype=states.dtype)
    return source if states.shape[0] == n else torch.cat([states[:n], source])


def encode_dit_prompts(pipe: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt embedding, pooled embedding) of `prompts` as a FLUX or SD3 pipeline computes them
    for its transformer's `encoder_hidden_states` and `pooled_projections`, at its defaults."""
    device = pipe._execution_device
    if getattr(pipe, "text_encoder_3", None) is not None:  # SD3: its three encoders
        out = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)  # fmt: skip
        return out[0], out[2]
    out = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device, num_images_per_prompt=1)
    return out[0], out[1]


@contextmanager
def injected(pipe: Any, inject: TextInjection, sources: Sequence[str]) -> Iterator[None]:
    """Inside the block, every pipeline call on `pipe` (for as many prompts as `sources`) has the
    text of `inject.blocks`' cross-attention replaced by `sources`' during `inject.steps`. Hooks
    are removed on exit, even on an exception. A DiT: see `dit_injected`."""
    if is_dit(getattr(pipe, "transformer", None)):
        with dit_injected(pipe, inject, sources):
            yield
        return
    unet = pipe.unet
    sites = select_sites(list_sites(unet), "attn2_out", inject.blocks)
    if not sites:
        yield
        return
    source = encode_prompts(pipe, list(sources))
    with Hooks() as hooks:
        counter = hooks.count_steps(unet)

        def swap(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if not counter.within(inject.steps):
                return None
            if kwargs.get("encoder_hidden_states") is None:
                raise RuntimeError("this cross-attention was called without encoder_hidden_states: nothing to inject")
            return args, {**kwargs, "encoder_hidden_states": _swap_conditional(kwargs["encoder_hidden_states"], source)}

        for site in sites:
            hooks.pre(unet, swap, name=f"inject text at {site.block}", path=site.module_path, with_kwargs=True)
        yield


_BATCHED = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")
"""The per-image inputs of a FLUX / SD3 transformer call (ids and attention kwargs are shared)."""


@contextmanager
def dit_injected(pipe: Any, inject: TextInjection, sources: Sequence[str]) -> Iterator[None]:
    """Text injection on a DiT (see the module docstring): each transformer call in `inject.steps`
    gets shadow rows, copies of its conditional rows with the sources' prompt embedding; the chosen
    blocks' conditional rows read the shadows' text stream; the shadows are dropped from the output."""
    transformer = pipe.transformer
    blocks = [s.module_path for s in select_sites(list_dit_sites(transformer), "img_out", inject.blocks)]
    if not blocks:
        yield
        return
    source = encode_dit_prompts(pipe, list(sources))[0]
    n = len(source)
    rows: dict[str, int] = {}  # "batch": the call's own batch while shadows run; absent otherwise

    def widen(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not counter.within(inject.steps):
            return None
        states = kwargs["encoder_hidden_states"]
        _swap_conditional(states, source)  # the shape check, with its clear error
        batch = states.shape[0]
        shadow = {k: kwargs[k][batch - n :] for k in _BATCHED if torch.is_tensor(kwargs.get(k)) and kwargs[k].ndim}
        shadow["encoder_hidden_states"] = source.to(device=states.device, dtype=states.dtype)
        rows["batch"] = batch
        return args, {**kwargs, **{k: torch.cat([kwargs[k], v]) for k, v in shadow.items()}}

    def read_shadow(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if "batch" not in rows:
            return None
        states, batch = kwargs["encoder_hidden_states"], rows["batch"]
        swapped = torch.cat([states[: batch - n], states[batch:], states[batch:]])
        return args, {**kwargs, "encoder_hidden_states": swapped}

    def narrow(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        batch = rows.pop("batch", None)
        if batch is None:
            return None
        return (output[0][:batch], *output[1:]) if isinstance(output, tuple) else type(output)(sample=output.sample[:batch])

    with Hooks() as hooks:
        counter = hooks.count_steps(transformer)
        hooks.pre(transformer, widen, name="add shadow rows", with_kwargs=True)
        hooks.forward(transformer, narrow, name="drop shadow rows", with_kwargs=True)
        for block in blocks:
            hooks.pre(transformer, read_shadow, name=f"read shadow text at {block}", path=block, with_kwargs=True)
        yield
