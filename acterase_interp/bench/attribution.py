"""Attribution patching (AtP) over denoising steps: a first-order estimate, from one forward and
one backward pass per batch of pairs, of how much the classifier's concept logit would fall if a
unit took the source prompt's activation instead of the target's.

For a pair (target c_t, source c_s) and seed, the target image is generated with gradients through
the UNet, the scheduler, the VAE decoder and the classifier; at every step the UNet also reads the
source prompt on the same latent (extra batch rows that the sampler never uses). With g_k the
gradient of the concept logit with respect to a site's activation at step k (target rows, the
conditional half of the guidance batch) and a_s, a_t the source and target activations there,

    score(unit) = -sum_k sum_tokens g_k * (a_s - a_t)       (mean over pairs),

the predicted drop of the concept logit (higher = more concept). It is exact for a model linear in
the site's activations; for the unconditional rows a_s = a_t, so they add nothing.

diffusers runs `__call__` under `no_grad`, so `denoise` is the pipeline's own sampling loop
(StableDiffusionPipeline: prompt encoding, CFG, the scheduler's step, VAE decode, postprocess)
written out with gradients allowed; without gradients its images equal `generate`'s (tested).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from ..hooks import Hooks
from ..patching import hook_site, to_tokens
from ..sites import UNET, Site


@dataclass(frozen=True)
class LoopSettings:
    """The sampling settings of `denoise` (those of `generate`: the model's defaults)."""

    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int

    @classmethod
    def of(cls, model: Any, num_inference_steps: int | None = None, guidance_scale: float | None = None) -> LoopSettings:
        """The model's generation defaults, with `num_inference_steps` / `guidance_scale` overriding."""
        d = model.defaults
        return cls(num_inference_steps or d.num_inference_steps, d.guidance_scale if guidance_scale is None else guidance_scale,
                   d.height, d.width)  # fmt: skip


@dataclass(frozen=True)
class Rows:
    """Where each prompt sits in the UNet's batch: [unconditional (under CFG), prompts, readers]."""

    n: int
    """Images (prompts)."""
    cfg: bool
    readers: bool

    @property
    def prompts(self) -> slice:
        return slice(self.n, 2 * self.n) if self.cfg else slice(0, self.n)

    @property
    def readers_slice(self) -> slice:
        if not self.readers:
            raise ValueError("this batch has no reader rows")
        start = self.prompts.stop
        return slice(start, start + self.n)


def _uses_cfg(pipe: Any, guidance_scale: float) -> bool:
    return guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None


def denoise(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], settings: LoopSettings,
            readers: Sequence[str] | None = None) -> torch.Tensor:  # fmt: skip
    """Images (N, 3, H, W) in [0, 1] of `prompts`, image i from `seeds[i]`, by the steps of
    StableDiffusionPipeline.__call__ (without its `no_grad`: gradients flow when enabled). With
    `readers` (one per prompt), the UNet also runs those prompts on the same latents in extra rows
    (`Rows`) whose output is discarded: their activations are there for hooks to read."""
    prompts = list(prompts)
    if len(seeds) != len(prompts) or (readers is not None and len(readers) != len(prompts)):
        raise ValueError(f"need one seed (and reader) per prompt: {len(prompts)} prompts, {len(seeds)} seeds")
    unet = pipe.unet
    device = next(unet.parameters()).device
    cfg = _uses_cfg(pipe, settings.guidance_scale)
    cond, uncond = pipe.encode_prompt(prompts, device, 1, cfg, None)
    embeds = [uncond, cond] if cfg else [cond]
    if readers is not None:
        embeds.append(pipe.encode_prompt(list(readers), device, 1, False, None)[0])
    embeds = torch.cat(embeds)
    copies = embeds.shape[0] // len(prompts)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # fresh state; the pipeline's is untouched
    scheduler.set_timesteps(settings.num_inference_steps, device=device)
    generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
    shape = (len(prompts), unet.config.in_channels, settings.height // pipe.vae_scale_factor,
             settings.width // pipe.vae_scale_factor)  # fmt: skip
    latents = randn_tensor(shape, generator=generators, device=device, dtype=embeds.dtype) * scheduler.init_noise_sigma
    extra = pipe.prepare_extra_step_kwargs(generators, 0.0) if hasattr(pipe, "prepare_extra_step_kwargs") else {}
    rows = Rows(len(prompts), cfg, readers is not None)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * copies), t)
        noise = unet(model_input, t, encoder_hidden_states=embeds, return_dict=False)[0]
        if cfg:
            uncond_noise, text_noise = noise[: rows.n], noise[rows.prompts]
            noise = uncond_noise + settings.guidance_scale * (text_noise - uncond_noise)
        else:
            noise = noise[rows.prompts]
        latents = scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False, generator=generators)[0]
    return pipe.image_processor.postprocess(image, output_type="pt", do_denormalize=[True] * len(prompts))


def concept_logit(classifier: Any, images: torch.Tensor, concept: str) -> torch.Tensor:
    """The classifier's logit of `concept` per image (`images` in [0, 1], as `denoise` returns them);
    a classifier without ConceptWorld `factors` (a user's reader, `bench.own.ReaderClassifier`)
    gives its own `logit`."""
    if not hasattr(classifier, "factors"):
        return classifier.logit(images)
    factor = next((f for f, values in classifier.factors.items() if concept in values), None)
    if factor is None:
        raise ValueError(f"the classifier does not read {concept!r}; it knows {classifier.factors}")
    return classifier(images.float() * 2 - 1)[factor][:, classifier.factors[factor].index(concept)]


@dataclass
class _Probe:
    """The activations of one site at every UNet call, each with a zero leaf added for its gradient."""

    leaves: list[torch.Tensor]
    values: list[torch.Tensor]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        leaf = torch.zeros_like(x, requires_grad=True)
        self.leaves.append(leaf)
        self.values.append(x.detach())
        return x + leaf


@contextmanager
def probed(pipe: Any, sites: Sequence[Site]) -> Iterator[dict[str, _Probe]]:
    """Hook every site so that each UNet call's activation is kept and can take a gradient; the
    hooks are removed on exit, even on an exception."""
    probes = {s.name: _Probe([], []) for s in sites}
    with Hooks() as hooks:
        for s in sites:
            hook_site(pipe, s, probes[s.name], hooks)
        yield probes


def _check_sites(sites: Sequence[Site]) -> None:
    if not sites:
        raise ValueError("no sites to attribute")
    text = [s.name for s in sites if s.component != UNET]
    if text:
        raise ValueError(f"attribution patching reads UNet sites only; {text} run in the text encoder")


def attribution_patching(
    pipe: Any,
    classifier: Any,
    concept: str,
    pairs: Sequence[tuple[str, str]],
    seeds: Sequence[int],
    sites: Sequence[Site],
    settings: LoopSettings,
    *,
    batch_size: int = 4,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Per site, the (units,) AtP score (see the module docstring) of `pairs` (target, source),
    pair i generated from `seeds[i]`, averaged over pairs."""
    _check_sites(sites)
    pairs = list(pairs)
    if len(seeds) != len(pairs) or not pairs:
        raise ValueError(f"need at least one pair and one seed per pair, got {len(pairs)} pairs and {len(seeds)} seeds")
    totals = {s.name: torch.zeros(s.shape[-1], dtype=torch.float64) for s in sites}
    chunks = range(0, len(pairs), batch_size)
    for start in tqdm(chunks, desc=f"attribution patching: {concept}", disable=not progress):
        chunk = pairs[start : start + batch_size]
        targets, sources = [t for t, _ in chunk], [s for _, s in chunk]
        with torch.enable_grad(), probed(pipe, sites) as probes:
            images = denoise(pipe, targets, seeds[start : start + batch_size], settings, readers=sources)
            logit = concept_logit(classifier, images, concept).sum()
            leaves = [leaf for p in probes.values() for leaf in p.leaves]
            grads = iter(torch.autograd.grad(logit, leaves, allow_unused=True))
        rows = Rows(len(chunk), _uses_cfg(pipe, settings.guidance_scale), True)
        for name, probe in probes.items():
            for value, _ in zip(probe.values, probe.leaves):
                grad = next(grads)
                if grad is None:  # the site does not reach the logit (never in a UNet)
                    continue
                x, g = to_tokens(value).double(), to_tokens(grad).double()
                diff = x[rows.readers_slice] - x[rows.prompts]
                totals[name] -= (g[rows.prompts] * diff).sum(dim=(0, 1))
    return {name: (t / len(pairs)).float() for name, t in totals.items()}
