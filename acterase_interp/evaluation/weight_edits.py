"""Baselines that edit the UNet's weights from the text side: UCE (closed form) and ESD-x
(fine-tuning), both on every cross-attention layer; see `evaluation.baselines` for the table's
interface and each method's departures from its reference implementation."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import DDPMScheduler

from ..erase.pairs import PromptPairs
from ..patching import unet_of
from ..sites import is_dit
from .conditioning import encode, encode_for_guidance, pipeline_of
from .core import image_seeds
from .method import WeightEdit, _pipeline_output, dit_block_sites, per_image, read_sites


def _text_states(model: Any, prompts: Sequence[str]) -> torch.Tensor:
    """The cross-attention context for `prompts` as the pipeline conditions on them (N, tokens,
    width; SDXL: both encoders' states, concatenated), in float32."""
    with torch.no_grad():
        return encode(model, prompts).states.float()


def _cross_attention_kv(unet: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {f"{n}.weight": m for n, m in unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))}


def _step_mean_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """The conditional half's rows (n, tokens, width) of a batched activation, in float32."""
    return per_image(x.float(), n)[-1]


def dit_text_inputs(model: Any, prompts: Sequence[str], seed: int, num_inference_steps: int | None) -> dict[str, torch.Tensor]:
    """Per joint block of a DiT (`double.<i>`), the input of its text-stream K/V projections
    (`attn.add_k_proj`, `add_v_proj`: one input) for `prompts` sampled on the fit seeds of `seed`:
    the conditional rows averaged over the denoising steps, (prompts * tokens, width) in float64."""
    sites = dit_block_sites(model, "attn.add_k_proj", "txt_kv_in", io="input")
    read = read_sites(model, prompts, sites, _step_mean_rows, seed, num_inference_steps)
    return {s.block: read[s.name].mean(0).reshape(-1, read[s.name].shape[-1]).double() for s in sites}


def closed_form(w0: torch.Tensor, c: torch.Tensor, c_star: torch.Tensor, keep: torch.Tensor, lam: float,
                erase: float, preserve: float) -> torch.Tensor:  # fmt: skip
    """UCE's edit of one weight `w0` (out, width) in float64: W = (lam W0 + erase W0 c*^T c +
    preserve W0 p^T p) (lam I + erase c^T c + preserve p^T p)^-1 (rows of c, c*, p: inputs)."""
    w0 = w0.double()
    eye = torch.eye(w0.shape[1], dtype=torch.float64, device=w0.device)
    right = lam * eye + erase * c.T @ c + preserve * keep.T @ keep
    left = lam * w0 + erase * (c_star @ w0.T).T @ c + preserve * (keep @ w0.T).T @ keep
    return torch.linalg.solve(right, left.T).T  # right is symmetric: W right = left  <=>  right W^T = left^T


class UCE(WeightEdit):
    """Unified Concept Editing (Gandikota et al. 2024) of every cross-attention K/V projection, in
    closed form: W = (lam W0 + erase * sum W0 c* c^T + preserve * sum W0 p p^T) (lam I + erase *
    sum c c^T + preserve * sum p p^T)^-1, with c the targets' text states, c* the sources' and p
    the non-target prompts' (`pairs.non_target`, or the sources when there are none).

    Reference: `rohitgandikota/unified-concept-editing`, `trainscripts/uce_sd_erase.py` at 28c81ed
    (the same equation; `lamb` 0.5, `erase_scale` 1, `preserve_scale` 1) and the earlier
    `train-scripts/train_erase.py` at bd5fb51 (`edit_model(lamb=0.1)`, but its script calls it
    with lamb=0.5; `preserve_scale` max(0.1, 1 / #preserved)). `lam` is 0.5, as both scripts run
    it (this class had 0.1, `edit_model`'s unused default, until issue 21). Departures:
    - every token position of each prompt (the reference: the last word token, 28c81ed; from the
      last word token to the end of the padding, bd5fb51): ConceptWorld's encoders are
      contextual, so every position carries the concept;
    - the guide c* is each target's paired source prompt (same scene without the concept) rather
      than one guide word, and sources are preserved when no non-target prompts are given (the
      reference preserves nothing then);
    - `preserve_scale` defaults to bd5fb51's max(0.1, 1 / #non-target) (28c81ed: 1), so the
      preserved prompts together weigh about as much as one erased one;
    - float64 and `linalg.solve` instead of float32 and an explicit inverse (same solution).

    On a DiT (FLUX, SD3), a UCE-style edit of every joint block's text-stream K/V projections
    (`attn.add_k_proj`, `attn.add_v_proj`; their biases are kept): the same closed form, with c, c*
    and p the projections' own inputs at that block (the text stream after the block's
    modulation), which, unlike SD's encoder states, depend on the block, the step and the image:
    each prompt's token rows averaged over a sampling run's steps (`dit_text_inputs`; fit seeds
    `seed`, `num_inference_steps` or the model's), paired targets and sources on the same seeds."""

    name = "uce"
    runs_on_dit = True

    def __init__(self, lam: float = 0.5, erase_scale: float = 1.0, preserve_scale: float | None = None, seed: int = 0,
                 num_inference_steps: int | None = None) -> None:  # fmt: skip
        self.lam, self.erase_scale, self.preserve_scale = lam, erase_scale, preserve_scale
        self.seed, self.num_inference_steps = seed, num_inference_steps

    def describe(self) -> dict:  # seed and steps are read on DiTs only: SD manifests stay as they were
        return {k: v for k, v in super().describe().items() if k not in ("seed", "num_inference_steps")}

    def _fit(self, model: Any, pairs: PromptPairs) -> None:
        super()._fit(model, pairs)
        if is_dit(unet_of(model)):
            self._fit_dit(model, pairs)
            return
        states = _text_states(model, pairs.targets)
        width = states.shape[-1]
        c = states.reshape(-1, width).double()
        c_star = _text_states(model, pairs.sources).reshape(-1, width).double()
        keep = _text_states(model, pairs.non_target).reshape(-1, width).double() if pairs.non_target else c_star
        # bd5fb51's default: the preserved prompts together weigh about as much as one erased one
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

    def _preserve(self, pairs: PromptPairs) -> float:
        # bd5fb51's default: the preserved prompts together weigh about as much as one erased one
        return self.preserve_scale if self.preserve_scale is not None else max(0.1, 1 / max(1, len(pairs.non_target)))

    def _fit_dit(self, model: Any, pairs: PromptPairs) -> None:
        read = lambda prompts: dit_text_inputs(model, prompts, self.seed, self.num_inference_steps)  # noqa: E731
        c, c_star = read(pairs.targets), read(pairs.sources)
        keep = read(pairs.non_target) if pairs.non_target else c_star
        preserve = self._preserve(pairs)
        self.edits_ = {}
        for i, block in enumerate(unet_of(model).transformer_blocks):
            for proj in ("add_k_proj", "add_v_proj"):
                weight = getattr(block.attn, proj).weight
                edit = closed_form(weight.detach(), c[f"double.{i}"], c_star[f"double.{i}"], keep[f"double.{i}"], self.lam,
                                   self.erase_scale, preserve)  # fmt: skip
                self.edits_[f"transformer_blocks.{i}.attn.{proj}.weight"] = edit.to(weight.dtype)
        self.preserve_scale_used_ = preserve


class ESDx(WeightEdit):
    """ESD-x, Erased Stable Diffusion's cross-attention variant (Gandikota et al. 2023): `steps`
    Adam steps on every `attn2` weight of a UNet copy so its conditional prediction on a target
    prompt matches the frozen model's negatively guided one, eps(x_t, empty) - eta * (eps(x_t, c)
    - eps(x_t, empty)); the original UNet is the frozen teacher and is never written.

    Reference: `rohitgandikota/erasing`, `esd_sd.py` at 25613d2 (`train_method="esd-x"`: every
    `attn2` parameter; 200 iterations, Adam at lr 5e-5, batch 1). Its goal eps_c - 2 (eps_c -
    eps_empty) (`negative_guidance` 2) is the paper's eps_empty - eta (eps_c - eps_empty) at eta = 1,
    this class's default. Departures: x_t is the frozen model's own full sample of a target prompt
    (one of `images_per_prompt` per prompt, drawn once) noised forward to a random training
    timestep, where the reference denoises a fresh sample with the frozen model (guidance 3) to a
    random step of a 50-step schedule at every iteration: a CPU cannot afford a pipeline run per
    step; lr 1e-4 and batches of `batch` for the shorter runs the table affords."""

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


__all__ = ["ESDx", "UCE"]
