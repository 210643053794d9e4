"""Erasure methods behind one interface, for side-by-side tables on one model, prompt set and seeds.

    method = UCE().fit(model, pairs)
    with method.applied(model) as sample:
        images = sample(prompts, seeds)          # the erased model's images
    # here the model is bit for bit what it was

`fit` learns what the method needs from the same `PromptPairs` ActErase fits on (targets show the
concept, sources are the same scenes without it) and returns the method; `applied` erases
reversibly: weight edits swap the edited tensors in and copy the originals back on exit (even on
an exception), hooks are removed, guidance methods only change how `sample` samples. Inside the
block the UNet is the erased one, so attacks that differentiate through it (concept inversion)
see what `sample` samples.

- `Unerased`: the model as it is (the row every other is compared to).
- `ActErase`: this project's eraser (`EraserFitter`, optionally tau chosen by `choose_tau`).
- `NegativePrompt`: the concept as the negative prompt of classifier-free guidance.
- `SLD`: Safe Latent Diffusion guidance away from the concept (Schramowski et al. 2023; the
  "medium" hyperparameters, its warm-up as a share of the steps).
- `UCE` (`evaluation.weight_edits`): Unified Concept Editing (Gandikota et al. 2024), a
  closed-form edit of every cross-attention K/V mapping the targets' text states onto the sources'.
- `ESDx` (`evaluation.weight_edits`): Erased Stable Diffusion's cross-attention variant (Gandikota
  et al. 2023), every `attn2` weight fine-tuned towards negative guidance.
- `ConceptPrune` (`evaluation.pruning`): Chavhan et al. 2024, `ff.net.2` weights with top Wanda
  scores on the targets (per-token-normalised activations, first 10 steps) above the sources'.
- `FIA` (`evaluation.pruning`): Forget-It-All (Deng et al. 2026), `ff.net.2` weights by
  contrastive saliency over time and space, concept-agnostic weights kept.
- `CASteer` (`evaluation.steering`): the normalised mean difference of cross-attention outputs
  over the pairs, removed at inference only where present (ICLR 2026).

Each class's docstring names its reference implementation (repository, file, commit) and every
departure from it, with the reason; the README's "Evaluation and baselines" lists them too.

On FLUX and SD3 (diffusion transformers) run `Unerased`, `ActErase` (its default site: the MLP
hidden units), `NegativePrompt` (SD3: CFG's negative half; FLUX: true CFG), `UCE` (the text
stream's K/V projections of the joint blocks) and `CASteer` (the joint blocks' image-stream
attention outputs); the others refuse a DiT with a clear error (`Method.runs_on_dit`).

Every method runs on SD 1.x/2.x and SDXL: those that call the UNet themselves (SLD, ESD-x) take
its conditioning from `evaluation.conditioning` (on SDXL: pooled embeddings and time ids too, and
the pipeline's zero unconditional); UCE edits K/V against SDXL's concatenated two-encoder context;
ConceptPrune, FIA and CASteer read and patch sites through `patching.patched`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import FluxPipeline

from ..erase.eraser import Eraser
from ..erase.fit import EraserFitter
from ..erase.gated import SCOPES, choose_scope, fit_gated
from ..erase.options import EraseOptions
from ..erase.pairs import PromptPairs
from ..erase.select import choose_tau
from ..generation import seed_list
from .conditioning import Conditioning, encode, encode_for_guidance, image_size, is_xl, pipeline_of
from .method import Method, Sampler, WeightEdit, _defaults, _pipeline_output
from .pruning import FIA, ConceptPrune
from .steering import CASteer
from .weight_edits import UCE, ESDx, _text_states  # noqa: F401  (_text_states: read here by tests)


class Unerased(Method):
    """The model as it is."""

    name = "unerased"
    runs_on_dit = True


class ActErase(Method):
    """ActErase with `options`; `tau="auto"` picks it with `choose_tau` on the fit targets, read by
    `shows_concept` (images -> bool per image)."""

    name = "acterase"
    runs_on_dit = True

    def __init__(self, options: EraseOptions | None = None, tau: float | str = "auto",
                 shows_concept: Callable[[torch.Tensor, str], torch.Tensor] | None = None) -> None:  # fmt: skip
        self.options = options or EraseOptions()
        self.tau = tau
        self.shows_concept = shows_concept

    def _fit(self, model: Any, pairs: PromptPairs) -> None:
        super()._fit(model, pairs)
        options = self.options if self.tau == "auto" else EraseOptions.from_dict({**self.options.to_dict(), "tau": self.tau})
        if self.tau == "auto" and self.shows_concept is None:  # before the fit is paid for
            raise ValueError("tau='auto' needs shows_concept (e.g. ConceptClassifier.shows) to judge the fit targets")
        fitter = EraserFitter(model, options, progress=False)
        eraser = fitter.fit(pairs)
        self.tau_search_seconds_ = 0.0
        if self.tau == "auto":
            start = time.perf_counter()
            choice = choose_tau(model, fitter.statistics, pairs, lambda x: self.shows_concept(x, pairs.concept), seed=options.seed,
                                num_inference_steps=options.num_inference_steps)  # fmt: skip
            eraser, self.chosen_tau_ = choice.eraser, choice.tau
            self.tau_search_seconds_ = time.perf_counter() - start  # fit_seconds_ includes it
        self.eraser_: Eraser = eraser

    @contextmanager
    def _erased(self, model: Any) -> Iterator[None]:
        with self.eraser_.applied(model):
            yield

    def describe(self) -> dict:
        return {"name": self.name, "tau": self.tau, "chosen_tau": getattr(self, "chosen_tau_", None),
                "tau_search_s": getattr(self, "tau_search_seconds_", None), "options": self.options.to_dict()}  # fmt: skip


class GatedKV(Method):
    """The gated subspace eraser (`erase.gated`), beyond the paper: at every cross-attention key
    and value, the tokens that pass a gate calibrated on the sources get their rank-`rank` concept
    subspace set to the benign coordinates. `scope="auto"` edits either the passing tokens or every
    token of a prompt with one, whichever leaves fewer fit targets showing the concept (read by
    `shows_concept`, as ActErase's automatic tau). Not a baseline: the project's own extension."""

    name = "gated_kv"

    def __init__(self, rank: int = 4, margin: float = 0.0, scope: str = "auto",
                 shows_concept: Callable[[torch.Tensor, str], torch.Tensor] | None = None,
                 num_inference_steps: int | None = None, seed: int = 0) -> None:  # fmt: skip
        if scope != "auto" and scope not in SCOPES:
            raise ValueError(f"scope must be 'auto' or one of {SCOPES}, got {scope!r}")
        self.rank, self.margin, self.scope, self.shows_concept = rank, margin, scope, shows_concept
        self.num_inference_steps, self.seed = num_inference_steps, seed

    def _fit(self, model: Any, pairs: PromptPairs) -> None:
        super()._fit(model, pairs)
        if self.scope == "auto" and self.shows_concept is None:
            raise ValueError("scope='auto' needs shows_concept (e.g. ConceptClassifier.shows) to judge the fit targets")
        auto = self.scope == "auto"
        self.eraser_ = fit_gated(model, pairs, rank=self.rank, margin=self.margin, scope="token" if auto else self.scope)
        self.scope_rates_ = None
        if auto:
            self.eraser_, self.scope_rates_ = choose_scope(model, self.eraser_, pairs, lambda x: self.shows_concept(x, pairs.concept),
                                                           seed=self.seed, num_inference_steps=self.num_inference_steps)  # fmt: skip

    @contextmanager
    def _erased(self, model: Any) -> Iterator[None]:
        with self.eraser_.applied(model):
            yield

    def describe(self) -> dict:
        return {**super().describe(), "chosen_scope": getattr(self, "eraser_", None) and self.eraser_.manifest["scope"],
                "scope_rates": getattr(self, "scope_rates_", None)}  # fmt: skip


class NegativePrompt(Method):
    """The concept (its words, `pairs.meta["concept_text"]` or the concept's name) as negative prompt.

    SD3 batches it as the unconditional half of its classifier-free guidance, as SD does. FLUX.1-dev
    is distilled for embedded guidance and reads a negative prompt only under "true" CFG, a second
    transformer call per step (`true_cfg_scale` > 1; the step counter counts both calls as one
    step): `true_cfg_scale` (default 4.0, a choice, not a model-card value) is passed on FLUX only."""

    name = "negative_prompt"
    runs_on_dit = True
    true_cfg_scale: float = 4.0
    """FLUX only (a class default, so SD manifests are unchanged; set it on an instance to change it)."""

    def _sampler(self, model: Any) -> Sampler:
        extra = {}
        if isinstance(pipeline_of(model), FluxPipeline):
            if self.true_cfg_scale <= 1:
                raise ValueError("true_cfg_scale must be above 1 (FLUX reads no negative prompt otherwise), "
                                 f"got {self.true_cfg_scale}")
            extra = {"true_cfg_scale": self.true_cfg_scale}

        def sample(prompts, seeds=0, num_inference_steps=None, guidance_scale=None):
            prompts = list(prompts)
            images = _pipeline_output(model, prompts, seed_list(seeds, len(prompts)), num_inference_steps, guidance_scale,
                                      negative_prompt=[self.concept_text_] * len(prompts), **extra)  # fmt: skip
            return images.float().cpu()

        return sample


@dataclass(frozen=True)
class SLDConfig:
    """Safe Latent Diffusion hyperparameters (default: the paper's "medium")."""

    guidance_scale: float = 1000.0
    threshold: float = 0.01
    momentum_scale: float = 0.3
    momentum_beta: float = 0.4
    warmup_fraction: float = 0.2
    """Steps before safety guidance starts, as a share of the steps (medium: 10 of 50)."""


class SLD(Method):
    """Safe Latent Diffusion: at every step past the warm-up, guidance is pushed away from the
    concept's noise prediction where the prompt's prediction is close to it."""

    name = "sld"

    def __init__(self, config: SLDConfig = SLDConfig()) -> None:
        self.config = config

    def describe(self) -> dict:
        return {"name": self.name, **vars(self.config)}

    def _sampler(self, model: Any) -> Sampler:
        def sample(prompts, seeds=0, num_inference_steps=None, guidance_scale=None):
            steps, guidance = _defaults(model, num_inference_steps, guidance_scale)
            return sld_sample(model, list(prompts), seed_list(seeds, len(prompts)), self.concept_text_, steps, guidance,
                              self.config)  # fmt: skip

        return sample


@torch.no_grad()
def sld_sample(model: Any, prompts: list[str], seeds: list[int], concept: str, steps: int, guidance: float,
               config: SLDConfig) -> torch.Tensor:  # fmt: skip
    """Images of `prompts` under SLD away from `concept`; the same initial noise, scheduler and
    conditioning (on SDXL pooled embeddings and time ids too) as `generate`, so with safety
    guidance off (warm-up past the last step) it returns its images."""
    pipe = pipeline_of(model)
    device, n = pipe.device, len(prompts)
    cond, uncond = encode_for_guidance(model, prompts)
    safety = encode(model, [concept] * n)
    height, width = image_size(model)
    generators = [torch.Generator(device).manual_seed(s) for s in seeds]
    latents = pipe.prepare_latents(n, pipe.unet.config.in_channels, height, width, cond.states.dtype, device, generators)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps, device=device)
    extra = pipe.prepare_extra_step_kwargs(generators, 0.0)
    warmup = math.ceil(config.warmup_fraction * steps)
    momentum = None
    context = Conditioning.cat([uncond, cond, safety]).unet_kwargs()
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.scale_model_input(torch.cat([latents] * 3), t)
        e_u, e_c, e_s = pipe.unet(x, t, **context).sample.chunk(3)
        direction = e_c - e_u
        scale = torch.clamp((e_c - e_s).abs() * config.guidance_scale, max=1.0)
        scale = torch.where(e_c - e_s >= config.threshold, torch.zeros_like(scale), scale)
        safety_guidance = (e_s - e_u) * scale
        momentum = torch.zeros_like(direction) if momentum is None else momentum
        safety_guidance = safety_guidance + config.momentum_scale * momentum
        momentum = config.momentum_beta * momentum + (1 - config.momentum_beta) * safety_guidance
        if i >= warmup:
            direction = direction - safety_guidance
        latents = scheduler.step(e_u + guidance * direction, t, latents, **extra).prev_sample
    return _decode(model, latents)


def _decode(model: Any, latents: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] of final latents, decoded as the pipeline decodes them: SDXL's pipeline
    runs a float16 VAE marked `force_upcast` in float32 (it overflows in float16), SD's does not."""
    vae = pipeline_of(model).vae
    upcast = is_xl(model) and vae.dtype == torch.float16 and vae.config.get("force_upcast", False)
    if upcast:
        vae.to(torch.float32)  # float16 -> float32 -> float16 restores every weight exactly
    try:
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    finally:
        if upcast:
            vae.to(torch.float16)
    return (images / 2 + 0.5).clamp(0, 1).float().cpu()


METHODS: dict[str, Callable[..., Method]] = {
    "unerased": Unerased, "acterase": ActErase, "negative_prompt": NegativePrompt, "sld": SLD, "uce": UCE,
    "concept_prune": ConceptPrune, "esd_x": ESDx, "fia": FIA, "casteer": CASteer, "gated_kv": GatedKV,
}  # fmt: skip
"""Method name -> class, as `acterase evaluate --methods` names them."""


__all__ = ["FIA", "METHODS", "SLD", "UCE", "ActErase", "CASteer", "ConceptPrune", "ESDx", "GatedKV", "Method", "NegativePrompt",
           "SLDConfig", "Sampler", "Unerased", "WeightEdit", "sld_sample"]  # fmt: skip
