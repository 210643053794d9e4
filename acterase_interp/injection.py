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
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .patching import Window, count_steps
from .sites import list_sites, select_sites


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
    `sites.select_sites` (`("up.1",)`); None: every block; (): none."""
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
    `prompts`, by the pipeline's own `encode_prompt` (SDXL: both encoders, concatenated)."""
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


@contextmanager
def injected(pipe: Any, inject: TextInjection, sources: Sequence[str]) -> Iterator[None]:
    """Inside the block, every pipeline call on `pipe` (for as many prompts as `sources`) has the
    text of `inject.blocks`' cross-attention replaced by `sources`' during `inject.steps`. Hooks
    are removed on exit, even on an exception."""
    unet = pipe.unet
    sites = select_sites(list_sites(unet), "attn2_out", inject.blocks)
    if not sites:
        yield
        return
    source = encode_prompts(pipe, list(sources))
    with ExitStack() as stack:
        counter = stack.enter_context(count_steps(unet))

        def swap(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if not counter.within(inject.steps):
                return None
            if kwargs.get("encoder_hidden_states") is None:
                raise RuntimeError("this cross-attention was called without encoder_hidden_states: nothing to inject")
            return args, {**kwargs, "encoder_hidden_states": _swap_conditional(kwargs["encoder_hidden_states"], source)}

        for site in sites:
            handle = unet.get_submodule(site.module_path).register_forward_pre_hook(swap, with_kwargs=True)
            stack.callback(handle.remove)
        yield
