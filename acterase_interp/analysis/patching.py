"""Torch-hook plumbing shared by the analysis patches: replace a site's activation, know which
denoising step the UNet is in (the pipeline calls the UNet once per step, both CFG rows batched),
and switch a patch on for a window of steps only.

A *patch* is anything with `sites` and a call `patch(site_name, x, step) -> x`: an `Eraser` (its
Eq. 6), a merged eraser, or a `SubspacePatch`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..sites import Site

Window = tuple[int, int]
"""A half-open range of denoising steps [start, stop)."""


class Patch(Protocol):
    """What `patched` switches on: sites, and the patched activation of one site at one step."""

    sites: Sequence[Site]

    def __call__(self, site_name: str, x: torch.Tensor, step: int | None = None) -> torch.Tensor: ...


def unet_of(model: object) -> nn.Module:
    """The UNet of a traceable model (`model.pipeline.unet`), a pipeline (`.unet`), or the module itself."""
    pipeline = getattr(model, "pipeline", model)
    unet = getattr(pipeline, "unet", pipeline)
    if not isinstance(unet, nn.Module):
        raise TypeError(f"expected a model, a pipeline or a UNet module, got {type(model).__name__}")
    return unet


def replace_activation(unet: nn.Module, site: Site, fn: Callable[[torch.Tensor], torch.Tensor]) -> RemovableHandle:
    """Hook `site` so its activation x becomes fn(x); remove the returned handle to undo."""
    module = unet.get_submodule(site.module_path) if site.module_path else unet
    if site.io == "input":
        return module.register_forward_pre_hook(lambda mod, args: (fn(args[0]), *args[1:]))

    def hook(mod: nn.Module, args: tuple, output: object) -> object:
        if isinstance(output, torch.Tensor):
            return fn(output)
        if isinstance(output, tuple):  # the UNet called with return_dict=False
            return (fn(output[0]), *output[1:])
        if hasattr(output, "sample"):
            return type(output)(sample=fn(output.sample))
        raise TypeError(f"cannot patch the {type(output).__name__} output of site {site.name}")

    return module.register_forward_hook(hook)


@dataclass
class StepCounter:
    """The index of the denoising step being computed (-1 before the first UNet call)."""

    step: int = -1
    """Current step, counted from 0 in every sampling run."""
    timestep: float = float("inf")
    """The scheduler timestep of the current step."""

    def within(self, window: Window | None) -> bool:
        """Whether the current step lies in `window` (always, for None)."""
        return window is None or window[0] <= self.step < window[1]


@contextmanager
def count_steps(unet: nn.Module) -> Iterator[StepCounter]:
    """Count denoising steps while the context is open. Timesteps fall during a sampling run, so a
    timestep that does not fall marks a new run (e.g. the next batch of `generate`): the count restarts."""
    counter = StepCounter()

    def tick(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        t = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
        counter.step = counter.step + 1 if t < counter.timestep else 0
        counter.timestep = t

    # prepend: the counter must advance before any other pre-hook of this call reads it
    handle = unet.register_forward_pre_hook(tick, prepend=True, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


@contextmanager
def patched(model: object, patch: Patch | None, steps: Window | None = None) -> Iterator[StepCounter]:
    """Switch `patch` on for `model` inside the block (None: leave the model as it is), only during
    denoising `steps` [start, stop) if given, via torch hooks on the UNet, removed on exit. Any
    pipeline call inside the block, e.g. `generate`, is patched; a per-step eraser gets the step index."""
    unet = unet_of(model)
    if patch is not None and hasattr(patch, "check_model"):
        patch.check_model(model)
    with ExitStack() as stack:
        counter = stack.enter_context(count_steps(unet))
        for site in patch.sites if patch is not None else ():

            def fn(x: torch.Tensor, name: str = site.name) -> torch.Tensor:
                return patch(name, x, counter.step) if counter.within(steps) else x

            stack.callback(replace_activation(unet, site, fn).remove)
        yield counter
