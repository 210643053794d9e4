"""How patches reach a diffusers UNet: the one layer between a patch and the model.

A *patch* is anything with `sites` and a call `patch(site_name, x, step) -> x` (an `Eraser`'s
Eq. 6, a merged eraser, a `SubspacePatch`). It reaches the model by one of two engines, which
share the parts below: the output adapter (`unwrap` / `rewrap`: a site's tensor inside a module's
output), the (batch, tokens, units) layout (`to_tokens` / `from_tokens`), `unet_of`, timestep
parsing (`call_timestep`) and the step index.

- **torch hooks** (`patched`; `Eraser.applied` and `SubspacePatch.applied` are built on it, and
  so is every evaluation in `analysis`): forward hooks on the UNet's modules, removed on exit even
  on an exception. Any pipeline call inside the block is patched, a nnsight trace too. The step
  index comes from the one step counter (`count_steps`), a pre-hook on the UNet. This is the fast
  path: no tracing.
- **nnsight** (`patch_in_trace`; `Eraser.apply`): whole-value assignments to sites' `.input` /
  `.output` inside a user's trace, in execution order (nnsight's one hard rule: within a step,
  modules are visited in the order they run). The step index is the caller's `tracer.iter` index.
  Activation *collection* (`EraserFitter`) reads sites with `read_in_trace` the same way.

Both engines patch the same tensors with the same call, so their images are bit-identical (tested).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .sites import Site

Window = tuple[int, int]
"""A half-open range of denoising steps [start, stop)."""


class Patch(Protocol):
    """What `patched` and `patch_in_trace` switch on: sites, and the patched activation of one
    site at one step. A per-step patch may also have `schedule` (a `StepSchedule`), which the
    step counter then follows and checks; an `Eraser` has it."""

    sites: Sequence[Site]

    def __call__(self, site_name: str, x: torch.Tensor, step: int | None = None) -> torch.Tensor: ...


# -- model and tensor layout -------------------------------------------------------------------


def unet_of(model: Any) -> nn.Module:
    """The UNet of an acterase / nnsight model (`model.pipeline.unet`), of a diffusers pipeline
    (`.unet`), or the module itself."""
    pipeline = getattr(model, "pipeline", model)
    unet = getattr(pipeline, "unet", pipeline)
    if not isinstance(unet, nn.Module):
        raise TypeError(f"expected an acterase_interp model, a pipeline with a UNet, or a UNet, got {type(model).__name__}")
    return unet


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(batch, tokens, units) view of an activation: transformer activations already are; a UNet
    output (batch, C, H, W) becomes (batch, H*W, C), so a "unit" is a channel."""
    if x.ndim == 3:
        return x
    if x.ndim == 4:
        return x.flatten(2).transpose(1, 2)
    raise ValueError(f"expected a (batch, tokens, units) or (batch, C, H, W) activation, got shape {tuple(x.shape)}")


def from_tokens(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of `to_tokens` for an activation of the given original shape."""
    return x if len(shape) == 3 else x.transpose(1, 2).reshape(shape)


def timestep_value(timestep: Any) -> float:
    """A timestep as a float (a scalar, a 0-d tensor, or a per-row tensor of equal entries)."""
    return float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)


def call_timestep(args: tuple, kwargs: dict) -> float:
    """The timestep of a UNet call `unet(sample, timestep, ...)`, given positionally or by name."""
    if len(args) > 1:
        return timestep_value(args[1])
    if "timestep" not in kwargs:
        raise TypeError("this UNet call has no timestep: call it as unet(sample, timestep, ...)")
    return timestep_value(kwargs["timestep"])


# -- the output adapter --------------------------------------------------------------------------


def unwrap(value: Any) -> torch.Tensor:
    """The activation tensor inside a module's input or output: the tensor itself, the first item
    of a tuple (a UNet called with `return_dict=False`, as pipelines do), or the first field of a
    dataclass output (`UNet2DConditionOutput.sample`)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return unwrap(getattr(value, dataclasses.fields(value)[0].name))
    raise TypeError(f"cannot find the activation tensor in a {type(value).__name__}")


def rewrap(value: Any, x: torch.Tensor) -> Any:
    """`value` with its activation tensor (see `unwrap`) replaced by `x`, as a new object of the
    same kind: a whole value, so nnsight assignments are never in-place edits."""
    if isinstance(value, torch.Tensor):
        return x
    if isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
        return (x, *value[1:])
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = dataclasses.fields(value)[0].name
        return dataclasses.replace(value, **{name: rewrap(getattr(value, name), x)})
    raise TypeError(f"cannot replace the activation tensor in a {type(value).__name__}")


# -- the step counter ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StepSchedule:
    """The steps a per-step patch was fitted for."""

    num_steps: int
    """UNet calls per sampling run."""
    timesteps: tuple[float, ...] | None = None
    """The scheduler's timestep at each call, if known: every call is checked against it."""

    def check(self, step: int, timestep: float) -> None:
        if self.timesteps is not None and timestep != self.timesteps[step]:
            raise RuntimeError(
                f"UNet call at timestep {timestep} is step {step} of its sampling run, but the per-step patch (e.g. "
                f"an eraser with per-step masks) was fitted for timestep {self.timesteps[step]} there: generate with "
                f"the fitted scheduler and {self.num_steps} denoising steps, one generation at a time"
            )


@dataclass
class StepCounter:
    """The index of the denoising step being computed (-1 before the first UNet call).

    Pipelines call the UNet once per step (both CFG halves batched) with falling timesteps, so a
    call whose timestep rises above the previous one starts a new sampling run, as does the call
    after the last step of a `schedule`. Equal consecutive timesteps (PNDM's and Heun's repeated
    steps) count as steps of the same run."""

    schedule: StepSchedule | None = None
    """If given, runs are `schedule.num_steps` calls long and each call's timestep is checked."""
    step: int = -1
    """Current step, counted from 0 in every sampling run."""
    timestep: float = float("inf")
    """The scheduler timestep of the current step."""

    def advance(self, timestep: float) -> None:
        """Count one UNet call at `timestep`."""
        full = self.schedule is not None and self.step + 1 >= self.schedule.num_steps
        self.step = 0 if timestep > self.timestep or full else self.step + 1
        self.timestep = timestep
        if self.schedule is not None:
            self.schedule.check(self.step, timestep)

    def within(self, window: Window | None) -> bool:
        """Whether the current step lies in `window` (always, for None)."""
        return window is None or window[0] <= self.step < window[1]


@contextmanager
def count_steps(unet: nn.Module, schedule: StepSchedule | None = None) -> Iterator[StepCounter]:
    """Count denoising steps (see `StepCounter`) while the context is open."""
    counter = StepCounter(schedule)

    def tick(module: nn.Module, args: tuple, kwargs: dict) -> None:
        counter.advance(call_timestep(args, kwargs))

    # prepend: the counter must advance before any other pre-hook of this call reads it
    handle = unet.register_forward_pre_hook(tick, prepend=True, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


# -- engine 1: torch hooks -----------------------------------------------------------------------


def hook_site(unet: nn.Module, site: Site, fn: Callable[[torch.Tensor], torch.Tensor]) -> RemovableHandle:
    """Hook `site` so that its activation x becomes fn(x); remove the returned handle to undo."""
    module = unet.get_submodule(site.module_path) if site.module_path else unet
    if site.io == "input":
        return module.register_forward_pre_hook(lambda mod, args: (fn(args[0]), *args[1:]))
    return module.register_forward_hook(lambda mod, args, output: rewrap(output, fn(unwrap(output))))


@contextmanager
def patched(model: Any, patch: Patch | None, steps: Window | None = None) -> Iterator[StepCounter]:
    """Switch `patch` on for `model` inside the block (None: leave the model as it is), only during
    denoising `steps` [start, stop) if given, via torch hooks on the UNet, removed on exit (even on
    an exception). Any pipeline call inside the block, e.g. `generate`, is patched; the patch gets
    the step index of the step counter. Hooks are global state: a second `patched` on the same
    model inside the block adds its patch after this one's."""
    unet = unet_of(model)
    if patch is not None and hasattr(patch, "check_model"):
        patch.check_model(model)
    with ExitStack() as stack:
        counter = stack.enter_context(count_steps(unet, getattr(patch, "schedule", None)))
        for site in patch.sites if patch is not None else ():

            def fn(x: torch.Tensor, name: str = site.name) -> torch.Tensor:
                return patch(name, x, counter.step) if counter.within(steps) else x

            stack.callback(hook_site(unet, site, fn).remove)
        yield counter


# -- engine 2: nnsight, inside a user's trace ----------------------------------------------------


def envoy_at(unet: Any, site: Site) -> Any:
    """The envoy of `site`'s module below a UNet envoy (`model.unet`), by nnsight's `Envoy.get`."""
    return unet.get(site.module_path) if site.module_path else unet


def read_in_trace(unet: Any, site: Site) -> torch.Tensor:
    """Inside a trace: the activation of `site` at the current step (`unet`: `model.unet`)."""
    envoy = envoy_at(unet, site)
    return unwrap(envoy.input if site.io == "input" else envoy.output)


def write_in_trace(unet: Any, site: Site, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Inside a trace: replace the activation x of `site` at the current step by fn(x), by
    whole-value assignment (in-place edits are lost with several invokes)."""
    envoy = envoy_at(unet, site)
    if site.io == "input":
        envoy.input = fn(envoy.input)
    else:
        output = envoy.output
        envoy.output = rewrap(output, fn(unwrap(output)))


def patch_in_trace(model: Any, patch: Patch, step: int | None = None) -> None:
    """Inside a running nnsight trace, patch every site of `patch` at denoising `step`, in
    execution order (the order of `patch.sites`):

        with model.generate(prompts, num_inference_steps=n, ...) as tracer:
            for step in tracer.iter[:n]:
                patch_in_trace(model, eraser, step)
    """
    for site in patch.sites:
        write_in_trace(model.unet, site, lambda x, name=site.name: patch(name, x, step))
