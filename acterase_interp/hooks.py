"""The one place where this package hooks torch modules, and the denoising step counter.

Patches, text injections, probes, site discovery and plantings all reach a model through forward
hooks and pre-hooks. They register them here, on a `Hooks` object, so that every hook follows one
rule: it lives in a `with Hooks() as hooks:` block and is removed on leaving it, also on an
exception (or, for a hook that lives as long as an object, until that object calls `close()`).
Every hook has a name: an exception raised inside it carries the name as a note, and `names`
lists what a `Hooks` holds.

The step counter is one more hook: a pre-hook on the denoiser (`Hooks.count_steps`) that reads
each call's timestep (`call_timestep`) and tells the other hooks which denoising step is running.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

Window = tuple[int, int]
"""A half-open range of denoising steps [start, stop)."""


class Hooks:
    """Forward hooks and pre-hooks registered together and removed together: on leaving
    `with Hooks() as hooks:` (also on an exception) or by `close()`."""

    def __init__(self) -> None:
        self._held: list[tuple[str, RemovableHandle]] = []

    @property
    def names(self) -> list[str]:
        """The names of the hooks held, in the order they were added."""
        return [name for name, _ in self._held]

    def forward(self, module: nn.Module, fn: Callable[..., Any], *, name: str, path: str = "",
                with_kwargs: bool = False, prepend: bool = False) -> RemovableHandle:  # fmt: skip
        """Run `fn(module, args, output)` (`fn(module, args, kwargs, output)` `with_kwargs`) after
        `module`, or its submodule at `path`, runs; a value it returns replaces the output.
        `prepend`: before the module's other forward hooks. The handle removes this hook early."""
        target, hook = _submodule(module, path, name), _named(fn, name)
        return self._hold(name, target.register_forward_hook(hook, with_kwargs=with_kwargs, prepend=prepend))

    def pre(self, module: nn.Module, fn: Callable[..., Any], *, name: str, path: str = "",
            with_kwargs: bool = False, prepend: bool = False) -> RemovableHandle:  # fmt: skip
        """Run `fn(module, args)` (`fn(module, args, kwargs)` `with_kwargs`) before `module`, or its
        submodule at `path`, runs; a value it returns replaces the inputs (`(args, kwargs)`
        `with_kwargs`). `prepend`: before the module's other pre-hooks."""
        target, hook = _submodule(module, path, name), _named(fn, name)
        return self._hold(name, target.register_forward_pre_hook(hook, with_kwargs=with_kwargs, prepend=prepend))

    def count_steps(self, denoiser: nn.Module, schedule: StepSchedule | None = None) -> StepCounter:
        """A step counter (see `StepCounter`) of `denoiser`'s calls while these hooks are held."""
        counter = StepCounter(schedule, repeat_is_same_step=is_dit(denoiser))

        def tick(module: nn.Module, args: tuple, kwargs: dict) -> None:
            counter.advance(call_timestep(args, kwargs))

        # prepend: the counter must advance before any other pre-hook of this call reads it
        self.pre(denoiser, tick, name="step counter", with_kwargs=True, prepend=True)
        return counter

    def close(self) -> None:
        """Remove every hook held (those removed early by their handles too: removing is idempotent)."""
        while self._held:
            self._held.pop()[1].remove()

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Hooks({self.names})"

    def _hold(self, name: str, handle: RemovableHandle) -> RemovableHandle:
        self._held.append((name, handle))
        return handle


def _submodule(module: nn.Module, path: str, name: str) -> nn.Module:
    try:
        return module.get_submodule(path)  # "": the module itself
    except AttributeError as error:
        raise ValueError(f"hook {name!r}: a {type(module).__name__} has no submodule {path!r}") from error


def _named(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """`fn`, with `name` noted on any exception it raises (hooks run deep inside a pipeline call)."""

    def hook(*args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as error:
            error.add_note(f"raised in hook {name!r}")
            raise

    return hook


# -- the step counter ----------------------------------------------------------------------------


def is_dit(model: nn.Module) -> bool:
    """Whether `model` is a diffusion transformer with double-stream (joint) blocks (here, since the
    step counter counts a DiT's steps its own way; `sites` lists its sites)."""
    return isinstance(getattr(model, "transformer_blocks", None), nn.ModuleList) and not hasattr(model, "down_blocks")


def timestep_value(timestep: Any) -> float:
    """A timestep as a float (a scalar, a 0-d tensor, or a per-row tensor of equal entries)."""
    return float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)


def call_timestep(args: tuple, kwargs: dict) -> float:
    """The timestep of a denoiser call `unet(sample, timestep, ...)`, given positionally or by name
    (DiT pipelines pass `timestep=`; FLUX's is the flow-matching sigma, SD3's sigma x 1000)."""
    if len(args) > 1:
        return timestep_value(args[1])
    if "timestep" not in kwargs:
        raise TypeError("this UNet call has no timestep: call it as unet(sample, timestep, ...)")
    return timestep_value(kwargs["timestep"])


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
    steps) count as steps of the same run, except on a DiT (`repeat_is_same_step`): FLUX's
    true CFG (`true_cfg_scale > 1`) calls the transformer twice per sigma, and flow-matching
    sigmas never repeat, so a repeated timestep there is the same step."""

    schedule: StepSchedule | None = None
    """If given, runs are `schedule.num_steps` calls long and each call's timestep is checked."""
    step: int = -1
    """Current step, counted from 0 in every sampling run."""
    timestep: float = float("inf")
    """The scheduler timestep of the current step."""
    repeat_is_same_step: bool = False
    """Whether a call at the current step's timestep belongs to that step (a DiT's: see above)."""

    def advance(self, timestep: float) -> None:
        """Count one UNet call at `timestep`."""
        if self.repeat_is_same_step and timestep == self.timestep:
            return
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
    with Hooks() as hooks:
        yield hooks.count_steps(unet, schedule)
