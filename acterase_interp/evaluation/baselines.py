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
- `UCE`: Unified Concept Editing (Gandikota et al. 2024): a closed-form edit of every
  cross-attention key and value projection that maps the targets' text states onto the sources'
  and keeps the non-target prompts' (all token positions; ConceptWorld's encoders are contextual,
  so every position carries the concept).
- `ConceptPrune`: (Chavhan et al. 2024): FFN hidden units whose Wanda score (|W| times the input
  norm, summed over the unit's column of `ff.net.2`) is in the top share on target prompts but
  not on source prompts, at enough denoising steps, are zeroed.
- `ESDx`: Erased Stable Diffusion, cross-attention variant (Gandikota et al. 2023): fine-tune
  every `attn2` weight of a copy of the UNet so its conditional prediction on a target prompt
  matches the frozen model's negatively guided one, eps(x_t, empty) - eta * (eps(x_t, c) -
  eps(x_t, empty)). For a CPU budget x_t is the frozen model's own sample of a target prompt,
  noised forward to a random timestep (ESD samples x_t with the model being trained).

Every method runs on SD 1.x/2.x and SDXL: those that call the UNet themselves (SLD, ESD-x) take
its conditioning from `evaluation.conditioning` (on SDXL: pooled embeddings and time ids too, and
the pipeline's zero unconditional); UCE edits K/V against SDXL's concatenated two-encoder context.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDPMScheduler

from ..erase.eraser import Eraser
from ..erase.fit import EraserFitter
from ..erase.options import EraseOptions
from ..erase.pairs import PromptPairs
from ..erase.select import choose_tau
from ..generation import generate, seed_list
from ..patching import StepCounter, count_steps, unet_of
from .conditioning import Conditioning, encode, encode_for_guidance, image_size, is_xl, pipeline_of
from .core import image_seeds

Sampler = Callable[..., torch.Tensor]
"""`sample(prompts, seeds, num_inference_steps=None, guidance_scale=None)` -> images (N, 3, H, W) in [0, 1]."""


def _defaults(model: Any, steps: int | None, guidance: float | None) -> tuple[int, float]:
    d = model.defaults
    return steps or d.num_inference_steps, d.guidance_scale if guidance is None else guidance


@torch.no_grad()
def _pipeline_output(model: Any, prompts: list[str], seeds: list[int], steps: int | None, guidance: float | None,
                     output_type: str = "pt", **options: Any) -> torch.Tensor:  # fmt: skip
    """The pipeline's images (or latents) of `prompts`, called as `generate` calls it (one
    generator per image, `model.defaults` for what is not given) with extra pipeline `options`."""
    pipe, d = pipeline_of(model), model.defaults
    steps, guidance = _defaults(model, steps, guidance)
    return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=d.height, width=d.width,
                output_type=output_type, generator=[torch.Generator(pipe.device).manual_seed(s) for s in seeds],
                **options).images  # fmt: skip


class Method:
    """An erasure method: `fit` it on prompt pairs, then sample from the erased model inside `applied`."""

    name: str = "method"
    fit_seconds_: float | None = None
    """Wall time of the last `fit` (None before it): the table's "time to erase"."""

    def fit(self, model: Any, pairs: PromptPairs) -> Method:
        """Learn what the method needs from `pairs` (`pairs.concept` names the concept); returns self."""
        start = time.perf_counter()
        self._fit(model, pairs)
        self.fit_seconds_ = time.perf_counter() - start
        return self

    def _fit(self, model: Any, pairs: PromptPairs) -> None:  # guidance-only methods learn nothing
        self.concept_text_ = pairs.meta.get("concept_text", pairs.concept)

    @contextmanager
    def applied(self, model: Any) -> Iterator[Sampler]:
        """The erased model for the `with` block, as a sampler; the model is restored on exit."""
        with self._erased(model):
            yield self._sampler(model)

    @contextmanager
    def _erased(self, model: Any) -> Iterator[None]:
        yield

    def _sampler(self, model: Any) -> Sampler:
        def sample(prompts: Sequence[str], seeds: int | Sequence[int] = 0, num_inference_steps: int | None = None,
                   guidance_scale: float | None = None) -> torch.Tensor:  # fmt: skip
            return generate(model, list(prompts), seeds=seeds, num_inference_steps=num_inference_steps,
                            guidance_scale=guidance_scale, progress=False)  # fmt: skip

        return sample

    def describe(self) -> dict:
        """The method's name and hyperparameters, for the table's manifest."""
        fields = {k: v for k, v in vars(self).items() if not k.endswith("_") and not k.startswith("_")}
        return {"name": self.name, **{k: v for k, v in fields.items() if isinstance(v, (int, float, str, bool, type(None)))}}


class Unerased(Method):
    """The model as it is."""

    name = "unerased"


class ActErase(Method):
    """ActErase with `options`; `tau="auto"` picks it with `choose_tau` on the fit targets, read by
    `shows_concept` (images -> bool per image)."""

    name = "acterase"

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
        if self.tau == "auto":
            choice = choose_tau(model, fitter.statistics, pairs, lambda x: self.shows_concept(x, pairs.concept), seed=options.seed,
                                num_inference_steps=options.num_inference_steps)  # fmt: skip
            eraser, self.chosen_tau_ = choice.eraser, choice.tau
        self.eraser_: Eraser = eraser

    @contextmanager
    def _erased(self, model: Any) -> Iterator[None]:
        with self.eraser_.applied(model):
            yield

    def describe(self) -> dict:
        return {"name": self.name, "tau": self.tau, "chosen_tau": getattr(self, "chosen_tau_", None),
                "options": self.options.to_dict()}  # fmt: skip


class NegativePrompt(Method):
    """The concept (its words, `pairs.meta["concept_text"]` or the concept's name) as negative prompt."""

    name = "negative_prompt"

    def _sampler(self, model: Any) -> Sampler:
        def sample(prompts, seeds=0, num_inference_steps=None, guidance_scale=None):
            prompts = list(prompts)
            images = _pipeline_output(model, prompts, seed_list(seeds, len(prompts)), num_inference_steps, guidance_scale,
                                      negative_prompt=[self.concept_text_] * len(prompts))  # fmt: skip
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


class WeightEdit(Method):
    """A method that replaces some parameters of the pipeline: `edits_` maps a parameter's name
    (under `pipeline.unet`) to its erased value. `applied` copies them in and the originals back."""

    edits_: dict[str, torch.Tensor]

    @contextmanager
    def _erased(self, model: Any) -> Iterator[None]:
        params = dict(unet_of(model).named_parameters())
        if missing := sorted(set(self.edits_) - set(params)):
            raise ValueError(f"{self.name}: this UNet has no parameters {missing[:3]}: fitted on another model?")
        originals = {n: params[n].detach().clone() for n in self.edits_}
        try:
            with torch.no_grad():
                for n, value in self.edits_.items():
                    params[n].copy_(value)
            yield
        finally:
            with torch.no_grad():
                for n, value in originals.items():
                    params[n].copy_(value)


def _text_states(model: Any, prompts: Sequence[str]) -> torch.Tensor:
    """The cross-attention context for `prompts` as the pipeline conditions on them (N, tokens,
    width; SDXL: both encoders' states, concatenated), in float32."""
    with torch.no_grad():
        return encode(model, prompts).states.float()


def _cross_attention_kv(unet: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {f"{n}.weight": m for n, m in unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))}


class UCE(WeightEdit):
    """Unified Concept Editing of every cross-attention K/V projection, in closed form:
    W = (lam W0 + erase * sum W0 c* c^T + preserve * sum W0 p p^T) (lam I + erase * sum c c^T
    + preserve * sum p p^T)^-1, with c the targets' text states, c* the sources' and p the
    non-target prompts' (`pairs.non_target`, or the sources when there are none)."""

    name = "uce"

    def __init__(self, lam: float = 0.1, erase_scale: float = 1.0, preserve_scale: float | None = None) -> None:
        self.lam, self.erase_scale, self.preserve_scale = lam, erase_scale, preserve_scale

    def _fit(self, model: Any, pairs: PromptPairs) -> None:
        super()._fit(model, pairs)
        states = _text_states(model, pairs.targets)
        width = states.shape[-1]
        c = states.reshape(-1, width).double()
        c_star = _text_states(model, pairs.sources).reshape(-1, width).double()
        keep = _text_states(model, pairs.non_target).reshape(-1, width).double() if pairs.non_target else c_star
        # UCE's default: the preserved prompts together weigh about as much as one erased one
        preserve = self.preserve_scale if self.preserve_scale is not None else max(0.1, 1 / max(1, len(pairs.non_target)))
        eye = torch.eye(width, dtype=torch.float64, device=c.device)
        right = self.lam * eye + self.erase_scale * c.T @ c + preserve * keep.T @ keep
        self.edits_ = {}
        for name, layer in _cross_attention_kv(unet_of(model)).items():
            w0 = layer.weight.detach().double()
            left = self.lam * w0 + self.erase_scale * (c_star @ w0.T).T @ c + preserve * (keep @ w0.T).T @ keep
            # right is symmetric: W right = left  <=>  right W^T = left^T
            self.edits_[name] = torch.linalg.solve(right, left.T).T.to(layer.weight.dtype)
        self.preserve_scale_used_ = preserve


class ConceptPrune(WeightEdit):
    """ConceptPrune's skilled neurons, zeroed: per FFN block and denoising step, the hidden units in
    the top `top_fraction` by Wanda score on the targets and not on the sources; a unit is pruned
    when it is such at `min_step_fraction` of the steps or more."""

    name = "concept_prune"

    def __init__(self, top_fraction: float = 0.01, min_step_fraction: float = 0.5, num_inference_steps: int | None = None,
                 seed: int = 0) -> None:  # fmt: skip
        if not 0 < top_fraction <= 1 or not 0 < min_step_fraction <= 1:
            raise ValueError(f"top_fraction and min_step_fraction must be in (0, 1], got {top_fraction}, {min_step_fraction}")
        self.top_fraction, self.min_step_fraction = top_fraction, min_step_fraction
        self.num_inference_steps, self.seed = num_inference_steps, seed

    def _input_norms(self, model: Any, prompts: Sequence[str], layers: dict[str, torch.nn.Linear]) -> dict[str, torch.Tensor]:
        """Per layer, the L2 norm of each input unit over tokens and images, per step (steps, units)."""
        squares: dict[str, list[torch.Tensor]] = {n: [] for n in layers}

        def record(name: str, counter: StepCounter) -> Callable:
            def hook(module: Any, args: tuple) -> None:
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                if len(squares[name]) <= counter.step:
                    squares[name].append(torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device))
                squares[name][counter.step] += x.pow(2).sum(0).double()

            return hook

        with count_steps(unet_of(model)) as counter:
            handles = [m.register_forward_pre_hook(record(n, counter)) for n, m in layers.items()]
            try:
                seeds = image_seeds("fit", len(prompts), base=self.seed)
                generate(model, list(prompts), seeds=seeds, num_inference_steps=self.num_inference_steps,
                         batch_size=len(prompts), progress=False)  # one batch: one UNet call per step  # fmt: skip
            finally:
                for h in handles:
                    h.remove()
        return {n: torch.stack(s).sqrt() for n, s in squares.items()}

    def _fit(self, model: Any, pairs: PromptPairs) -> None:
        super()._fit(model, pairs)
        unet = unet_of(model)
        layers = {n: m for n, m in unet.named_modules() if n.endswith("ff.net.2")}
        norms = {"targets": self._input_norms(model, pairs.targets, layers),
                 "sources": self._input_norms(model, pairs.sources, layers)}  # fmt: skip
        self.edits_, self.units_ = {}, {}
        for name, layer in layers.items():
            column = layer.weight.detach().abs().sum(0).double()  # sum_i |W_ij| of unit j
            k = max(1, round(self.top_fraction * column.numel()))
            top = {w: torch.zeros_like(n[name], dtype=torch.bool) for w, n in norms.items()}
            for which, n in norms.items():
                idx = (n[name] * column).topk(k, dim=-1).indices  # (steps, k)
                top[which].scatter_(1, idx, True)
            skilled = top["targets"] & ~top["sources"]  # (steps, units)
            units = skilled.float().mean(0) >= self.min_step_fraction
            self.units_[name.removesuffix(".ff.net.2")] = units.nonzero().flatten().tolist()
            pruned = layer.weight.detach().clone()
            pruned[:, units.to(pruned.device)] = 0
            self.edits_[f"{name}.weight"] = pruned


class ESDx(WeightEdit):
    """ESD-x: `steps` Adam steps on every cross-attention weight of a UNet copy (see the module
    docstring); the original UNet serves as the frozen teacher and is never written."""

    name = "esd_x"

    def __init__(self, steps: int = 200, lr: float = 1e-4, negative_guidance: float = 1.0, batch: int = 8,
                 images_per_prompt: int = 4, num_inference_steps: int | None = None, seed: int = 0) -> None:  # fmt: skip
        if steps < 1 or batch < 1 or images_per_prompt < 1:
            raise ValueError(f"steps, batch and images_per_prompt must be at least 1, got {steps}, {batch}, {images_per_prompt}")
        self.steps, self.lr, self.negative_guidance, self.batch = steps, lr, negative_guidance, batch
        self.images_per_prompt, self.num_inference_steps, self.seed = images_per_prompt, num_inference_steps, seed

    def _fit(self, model: Any, pairs: PromptPairs) -> None:
        super()._fit(model, pairs)
        pipe = pipeline_of(model)
        frozen = pipe.unet
        prompts = [p for p in pairs.targets for _ in range(self.images_per_prompt)]
        seeds = image_seeds("fit", len(prompts), base=self.seed)
        z0 = _pipeline_output(model, prompts, seeds, self.num_inference_steps, None, output_type="latent")
        with torch.no_grad():
            cond = encode(model, prompts).to(z0.dtype)
            empty = encode_for_guidance(model, [""])[1].to(z0.dtype)  # the pipeline's unconditional (SDXL: zeros)
        student = copy.deepcopy(frozen).train()
        student.requires_grad_(False)
        trained = {n: p for n, p in student.named_parameters() if ".attn2." in n}
        for p in trained.values():
            p.requires_grad_(True)
        opt = torch.optim.Adam(trained.values(), lr=self.lr)
        noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
        gen = torch.Generator().manual_seed(self.seed)
        self.losses_ = []
        for step in range(self.steps):
            idx = torch.randint(len(z0), (min(self.batch, len(z0)),), generator=gen)
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=gen)
            noise = torch.randn(z0[idx].shape, generator=gen).to(z0.device)
            x_t = noise_sched.add_noise(z0[idx], noise, t)
            t = t.to(z0.device)
            c = cond[idx].unet_kwargs()
            with torch.no_grad():
                e_c = frozen(x_t, t, **c).sample
                e_0 = frozen(x_t, t, **empty.expand(len(idx)).unet_kwargs()).sample
                goal = e_0 - self.negative_guidance * (e_c - e_0)
            loss = torch.nn.functional.mse_loss(student(x_t, t, **c).sample, goal)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 25 == 0 or step + 1 == self.steps:
                self.losses_.append({"step": step, "loss": loss.item()})
        self.edits_ = {n: p.detach().clone() for n, p in trained.items()}
        del student


METHODS: dict[str, Callable[..., Method]] = {
    "unerased": Unerased, "acterase": ActErase, "negative_prompt": NegativePrompt, "sld": SLD, "uce": UCE,
    "concept_prune": ConceptPrune, "esd_x": ESDx,
}  # fmt: skip
"""Method name -> class, as `acterase evaluate --methods` names them."""


__all__ = ["METHODS", "SLD", "UCE", "ActErase", "ConceptPrune", "ESDx", "Method", "NegativePrompt", "SLDConfig",
           "Unerased", "WeightEdit", "sld_sample"]  # fmt: skip
