"""How patches reach a diffusers pipeline's UNet and text encoders: the one layer between a patch
and the model.

A *patch* is anything with `sites` and a call `patch(site_name, x, step) -> x` (an `Eraser`'s
Eq. 6, a merged eraser, a `SubspacePatch`). It reaches the model by one of two engines, which
share the parts below: the output adapter (`unwrap` / `rewrap`: a site's tensor inside a module's
output), the (batch, tokens, units) layout (`to_tokens` / `from_tokens`), `unet_of`, and the step
index (`hooks.StepCounter`, which parses each call's timestep: `call_timestep`). A site lives in
its `Site.component`: the UNet, or for a `text_layer` site the pipeline's `text_encoder` /
`text_encoder_2` (`site_module`).

- **torch hooks** (`patched`; `Eraser.applied` and `SubspacePatch.applied` are built on it, and
  so is every evaluation in `analysis`): forward hooks on the UNet's modules (`hooks.Hooks`),
  removed on exit even on an exception. Any pipeline call inside the block is patched, a nnsight
  trace too. The step index comes from the one step counter (`Hooks.count_steps`), a pre-hook on
  the UNet. This is the fast path: no tracing. Text-encoder sites are hooked on their encoder and
  patched at *every* encoder call, the prompts' and the negative prompt's (under CFG) alike, as
  UNet sites patch both CFG halves, with step index 0 (their statistics are the same at every step).
- **nnsight** (`patch_in_trace`; `Eraser.apply`): whole-value assignments to sites' `.input` /
  `.output` inside a user's trace, in execution order (nnsight's one hard rule: within a step,
  modules are visited in the order they run). The step index is the caller's `tracer.iter` index.
  Activation *collection* (`EraserFitter`) reads sites with `read_in_trace` the same way.
  Text encoders run before the denoising loop, so a patch's text-encoder sites are written by its
  first `patch_in_trace` call in a trace, which must come before any other request of the trace
  reaches the UNet: at the loop's step 0, or before the loop (see `patch_in_trace`).

Both engines patch the same tensors with the same call, so their images are bit-identical (tested).
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from nnsight.intervention.interleaver import Mediator
from torch import nn
from torch.utils.hooks import RemovableHandle

from .hooks import Hooks, StepCounter, StepSchedule, Window, call_timestep, count_steps  # noqa: F401  (re-exported)
from .sites import DENOISERS, Site


class Patch(Protocol):
    """What `patched` and `patch_in_trace` switch on: sites, and the patched activation of one
    site at one step. A per-step patch may also have `schedule` (a `StepSchedule`), which the
    step counter then follows and checks; an `Eraser` has it."""

    sites: Sequence[Site]

    def __call__(self, site_name: str, x: torch.Tensor, step: int | None = None) -> torch.Tensor: ...


# -- model and tensor layout -------------------------------------------------------------------


def denoiser_name(model: Any) -> str:
    """The pipeline attribute of `model`'s denoiser: "unet", or "transformer" for a DiT (FLUX, SD3)."""
    pipeline = getattr(model, "pipeline", model)
    return next((name for name in DENOISERS if isinstance(getattr(pipeline, name, None), nn.Module)), DENOISERS[0])


def unet_of(model: Any) -> nn.Module:
    """The denoiser of an acterase / nnsight model (`model.pipeline.unet`, or `.transformer` for a
    DiT), of a diffusers pipeline, or the module itself."""
    pipeline = getattr(model, "pipeline", model)
    unet = getattr(pipeline, denoiser_name(pipeline), pipeline)
    if not isinstance(unet, nn.Module):
        raise TypeError(f"expected an acterase_interp model, a pipeline with a UNet, or a UNet, got {type(model).__name__}")
    return unet


def is_denoiser_site(site: Site) -> bool:
    """Whether `site` lives in the denoiser (UNet or DiT) rather than in a text encoder."""
    return site.component in DENOISERS


def site_module(model: Any, site: Site) -> nn.Module:
    """The module of `site` in `model` (as `unet_of` takes it): below the UNet, or, for a text-encoder
    site, below the pipeline's `site.component` (a bare UNet has none: a clear error)."""
    if is_denoiser_site(site):
        unet = unet_of(model)
        return unet.get_submodule(site.module_path) if site.module_path else unet
    pipeline = getattr(model, "pipeline", model)
    encoder = getattr(pipeline, site.component, None)
    if not isinstance(encoder, nn.Module):
        if getattr(pipeline, "unet", None) is None:
            raise ValueError(f"site {site.name!r} lives in the pipeline's {site.component}, not in the UNet: patch "
                             "the pipeline (or the acterase model) rather than a bare UNet")  # fmt: skip
        raise ValueError(f"site {site.name!r} lives in {site.component}, which this pipeline does not have")
    return encoder.get_submodule(site.module_path)


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


def call_sample(args: tuple, kwargs: dict) -> torch.Tensor:
    """The latent of a denoiser call: `unet(sample, ...)`, or a DiT's `hidden_states=` keyword."""
    return args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))


# -- the output adapter --------------------------------------------------------------------------


def unwrap(value: Any, index: int = 0) -> torch.Tensor:
    """The activation tensor inside a module's input or output: the tensor itself, item `index` of
    a tuple (a UNet called with `return_dict=False`, as pipelines do; a DiT block's (text, image)
    pair), or the first field of a dataclass output (`UNet2DConditionOutput.sample`)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, tuple) and len(value) > index and isinstance(value[index], torch.Tensor):
        return value[index]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return unwrap(getattr(value, dataclasses.fields(value)[0].name))
    raise TypeError(f"cannot find the activation tensor in a {type(value).__name__}")


def rewrap(value: Any, x: torch.Tensor, index: int = 0) -> Any:
    """`value` with its activation tensor (see `unwrap`) replaced by `x`, as a new object of the
    same kind: a whole value, so nnsight assignments are never in-place edits."""
    if isinstance(value, torch.Tensor):
        return x
    if isinstance(value, tuple) and len(value) > index and isinstance(value[index], torch.Tensor):
        return (*value[:index], x, *value[index + 1 :])
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = dataclasses.fields(value)[0].name
        return dataclasses.replace(value, **{name: rewrap(getattr(value, name), x)})
    raise TypeError(f"cannot replace the activation tensor in a {type(value).__name__}")


# -- engine 1: torch hooks -----------------------------------------------------------------------


def hook_site(
    model: Any, site: Site, fn: Callable[[torch.Tensor], torch.Tensor], hooks: Hooks | None = None
) -> RemovableHandle:
    """Hook `site` of `model` (a UNet, a pipeline or an acterase model; text-encoder sites need a
    pipeline) so that its activation x becomes fn(x): held by `hooks`, removed with them, or if
    None on its own; the returned handle removes it early."""
    module = site_module(model, site)
    hooks = hooks if hooks is not None else Hooks()
    name = f"site {site.name}"
    if site.io == "input":
        return hooks.pre(module, lambda mod, args: (fn(args[0]), *args[1:]), name=name)
    # text layers: prepended, since transformers collects `output_hidden_states` (SDXL reads them)
    # by its own layer hooks, which must see the patched output
    i = site.output_index
    return hooks.forward(module, lambda mod, args, output: rewrap(output, fn(unwrap(output, i)), i), name=name,
                         prepend=not is_denoiser_site(site))  # fmt: skip


@contextmanager
def patched(model: Any, patch: Patch | None, steps: Window | None = None) -> Iterator[StepCounter]:
    """Switch `patch` on for `model` inside the block (None: leave the model as it is), only during
    denoising `steps` [start, stop) if given, via torch hooks on the UNet (and the text encoders,
    for text-encoder sites), removed on exit (even on an exception). Any pipeline call inside the
    block, e.g. `generate`, is patched; the patch gets the step index of the step counter.

    Text-encoder sites are patched at every call of their encoder, the prompts' and, under
    classifier-free guidance, the negative prompt's alike (as UNet sites patch both CFG halves),
    with step index 0: they need a pipeline, not a bare UNet, and cannot be limited to `steps`.
    Hooks are global state: a second `patched` on the same model inside the block adds its patch
    after this one's."""
    unet = unet_of(model)
    sites = tuple(patch.sites) if patch is not None else ()
    text = [s for s in sites if not is_denoiser_site(s)]
    for site in text:
        site_module(model, site)  # a clear error for a bare UNet, before anything is hooked
    if text and steps is not None:
        raise ValueError(f"text-encoder sites ({text[0].name}, ...) run before the denoising loop: they cannot be "
                         f"limited to steps {steps}")  # fmt: skip
    if patch is not None and hasattr(patch, "check_model"):
        patch.check_model(model)
    with Hooks() as hooks:
        counter = hooks.count_steps(unet, getattr(patch, "schedule", None))
        for site in sites:

            def fn(x: torch.Tensor, name: str = site.name, text: bool = not is_denoiser_site(site)) -> torch.Tensor:
                if text:
                    return patch(name, x, 0)
                return patch(name, x, counter.step) if counter.within(steps) else x

            hook_site(model, site, fn, hooks)
        yield counter


# -- engine 2: nnsight, inside a user's trace ----------------------------------------------------


def envoy_at(component: Any, site: Site) -> Any:
    """The envoy of `site`'s module below its component's envoy (`model.unet`, or `model.text_encoder`
    for a text-encoder site: `component_envoy`), by nnsight's `Envoy.get`."""
    return component.get(site.module_path) if site.module_path else component


def component_envoy(model: Any, site: Site) -> Any:
    """The envoy of the component that holds `site`: `model.unet`, `model.transformer`, `model.text_encoder`, ..."""
    return getattr(model, site.component)


def denoiser_envoy(model: Any) -> Any:
    """The envoy of `model`'s denoiser: `model.unet`, or `model.transformer` for a DiT."""
    return getattr(model, denoiser_name(model))


def read_in_trace(component: Any, site: Site) -> torch.Tensor:
    """Inside a trace: the activation of `site` at the current step (`component`: `model.unet`, or
    the site's `component_envoy`)."""
    envoy = envoy_at(component, site)
    return unwrap(envoy.input if site.io == "input" else envoy.output, site.output_index)


def write_in_trace(component: Any, site: Site, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Inside a trace: replace the activation x of `site` at the current step by fn(x), by
    whole-value assignment (in-place edits are lost with several invokes)."""
    envoy = envoy_at(component, site)
    if site.io == "input":
        envoy.input = fn(envoy.input)
    else:
        output, i = envoy.output, site.output_index
        envoy.output = rewrap(output, fn(unwrap(output, i)), i)


def encoder_calls(pipe: Any, kwargs: dict) -> int:
    """How often a pipeline call with `kwargs` runs each text encoder, as diffusers' SD and SDXL
    pipelines do: once for the prompts, and once more for the negative prompt under classifier-free
    guidance (guidance above 1) unless negative embeddings are given or SDXL zeroes the empty one."""
    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
        raise TypeError(f"text-encoder sites are patched by nnsight in SD and SDXL pipelines, not a {type(pipe).__name__}")
    if kwargs.get("prompt_embeds") is not None:
        raise ValueError("text-encoder sites patch the pipeline's encoding of the prompts: pass prompts, not prompt_embeds")
    guidance = kwargs.get("guidance_scale", inspect.signature(type(pipe).__call__).parameters["guidance_scale"].default)
    cfg = guidance > 1 and pipe.unet.config.time_cond_proj_dim is None
    zeroed = kwargs.get("negative_prompt") is None and getattr(pipe.config, "force_zeros_for_empty_prompt", False)
    return 1 + (cfg and kwargs.get("negative_prompt_embeds") is None and not zeroed)


_TEXT_PATCHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Per running trace (its nnsight mediator): the ids of the patches whose text-encoder sites are written."""


def _patch_text_in_trace(model: Any, patch: Patch, sites: list[Site]) -> int | None:
    """Write `sites` (text-encoder sites) at every encoder call of the running trace, once per trace;
    the number of calls written, or None if this trace had them already."""
    mediator = Mediator.current("text-encoder sites")
    done = _TEXT_PATCHED.setdefault(mediator, set())
    if id(patch) in done:
        return None
    if mediator.iteration != 0:
        raise RuntimeError(
            f"text-encoder sites ({sites[0].name}, ...) run before the denoising loop, so they are written by the "
            "first patch call of a trace: call eraser.apply(model, step) from the loop's first step "
            "(`for step in tracer.iter[:n]`, step 0), or eraser.apply(model) before the loop"
        )
    calls = encoder_calls(model.pipeline, mediator.interleaver.batcher.kwargs)
    try:
        for call in range(calls):  # 0: the prompts; 1: the negative prompt, under CFG
            mediator.iteration = call  # what `tracer.iter[call]` pins
            for site in sites:
                write_in_trace(component_envoy(model, site), site, lambda x, name=site.name: patch(name, x, 0))
    finally:
        mediator.iteration = 0
    done.add(id(patch))
    return calls


def _check_encoder_calls(model: Any, site: Site, calls: int) -> None:
    """After the UNet's first site: the encoder ran exactly the `calls` times that were patched."""
    mediator = Mediator.current("text-encoder sites")
    ran = mediator.occurrence(f"{envoy_at(component_envoy(model, site), site).path}.output")
    if ran != calls:
        raise RuntimeError(f"{site.component} ran {ran} times before the first denoising step, but {calls} of its "
                           "calls were patched: this pipeline encodes prompts in a way the nnsight engine does not "
                           "know; use eraser.applied(model) (torch hooks) instead")  # fmt: skip


def patch_in_trace(model: Any, patch: Patch, step: int | None = None) -> None:
    """Inside a running nnsight trace, patch every site of `patch` at denoising `step`, in
    execution order (the order of `patch.sites`):

        with model.generate(prompts, num_inference_steps=n, ...) as tracer:
            for step in tracer.iter[:n]:
                patch_in_trace(model, eraser, step)

    Text-encoder sites run before the loop: the first call of a trace (step 0 above, or a call
    before the loop, `patch_in_trace(model, eraser)`) writes them at every encoder call, the
    prompts' and the negative prompt's (as the hooks engine does), with step index 0, before it
    writes the UNet's sites; later calls write the UNet's only. That first call must come before
    anything else in the trace reaches the UNet (nnsight's execution order); a first call at a
    later step is an error. The number of encoder calls follows the trace's arguments (SD and
    SDXL pipelines; `encoder_calls`) and is checked at the first UNet site."""
    text = [s for s in patch.sites if not is_denoiser_site(s)]
    calls = _patch_text_in_trace(model, patch, text) if text else None
    denoiser = denoiser_envoy(model)
    for i, site in enumerate(s for s in patch.sites if is_denoiser_site(s)):
        write_in_trace(denoiser, site, lambda x, name=site.name: patch(name, x, step))
        if i == 0 and calls is not None:
            _check_encoder_calls(model, text[0], calls)
