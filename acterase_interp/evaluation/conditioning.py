"""What a pipeline conditions its UNet on, for methods that call the UNet themselves (SLD's
sampler, ESD-x's loss, concept inversion): computed by the pipeline's own `encode_prompt`, so
those calls see exactly what the pipeline's would.

On SD 1.x/2.x the conditioning is the text encoder's states. On SDXL it is both encoders'
penultimate states, concatenated (the cross-attention context), plus what the UNet takes as
`added_cond_kwargs`: the second encoder's pooled embedding (`text_embeds`) and six time ids
(original size, crop corner, target size; `time_ids`), here uncropped at the image size. The
unconditional half of classifier-free guidance is the pipeline's too: on SDXL base
(`force_zeros_for_empty_prompt`) it is zeros, not the empty prompt's states.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline


def pipeline_of(model: Any) -> Any:
    """The diffusers pipeline of an acterase / nnsight model (`model.pipeline`), or the pipeline itself."""
    return getattr(model, "pipeline", model)


def is_xl(model: Any) -> bool:
    """Whether `model` is an SDXL pipeline (two text encoders, pooled embeddings, time ids)."""
    return isinstance(pipeline_of(model), StableDiffusionXLPipeline)


def image_size(model: Any) -> tuple[int, int]:
    """(height, width) in pixels that `model` samples at: its defaults, else the pipeline's own."""
    pipe, d = pipeline_of(model), model.defaults
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return d.height or side, d.width or side


@dataclass(frozen=True)
class Conditioning:
    """The UNet's conditioning for a batch of images: `unet(x, t, **c.unet_kwargs())`."""

    states: torch.Tensor
    """(N, tokens, width): the cross-attention context."""
    added: dict[str, torch.Tensor] | None = None
    """SDXL: {"text_embeds": (N, pooled width), "time_ids": (N, 6)}; None on SD 1.x/2.x."""

    def __len__(self) -> int:
        return len(self.states)

    def _map(self, fn: Any) -> Conditioning:
        return Conditioning(fn(self.states), None if self.added is None else {k: fn(v) for k, v in self.added.items()})

    def __getitem__(self, rows: Any) -> Conditioning:
        return self._map(lambda x: x[rows])

    def expand(self, n: int) -> Conditioning:
        """A one-row conditioning as `n` rows (a view)."""
        if len(self) != 1:
            raise ValueError(f"only a one-row conditioning expands, this one has {len(self)} rows")
        return self._map(lambda x: x.expand(n, *x.shape[1:]))

    def to(self, dtype: torch.dtype) -> Conditioning:
        return self._map(lambda x: x.to(dtype))

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """The rows of `parts`, in order."""
        added = None if parts[0].added is None else {k: torch.cat([p.added[k] for p in parts]) for k in parts[0].added}
        return Conditioning(torch.cat([p.states for p in parts]), added)

    def unet_kwargs(self) -> dict[str, Any]:
        return {"encoder_hidden_states": self.states, "added_cond_kwargs": self.added}


def _time_ids(pipe: StableDiffusionXLPipeline, size: tuple[int, int], n: int, like: torch.Tensor) -> torch.Tensor:
    width = pipe.text_encoder_2.config.projection_dim  # the pipeline's check: it must fit the UNet's embedding
    ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=like.dtype, text_encoder_projection_dim=width)
    return ids.to(like.device).repeat(n, 1)


def _encode(model: Any, prompts: Sequence[str], guidance: bool, size: tuple[int, int] | None) -> list[Conditioning]:
    pipe = pipeline_of(model)
    out = pipe.encode_prompt(prompt=list(prompts), device=pipe.device, num_images_per_prompt=1,
                             do_classifier_free_guidance=guidance)  # fmt: skip
    if not is_xl(model):  # (cond, uncond)
        return [Conditioning(s) for s in out[: 1 + guidance]]
    states, uncond, pooled, pooled_uncond = out
    ids = _time_ids(pipe, size or image_size(model), len(prompts), states)
    pairs = [(states, pooled), (uncond, pooled_uncond)][: 1 + guidance]
    return [Conditioning(s, {"text_embeds": p, "time_ids": ids}) for s, p in pairs]


def encode(model: Any, prompts: Sequence[str], size: tuple[int, int] | None = None) -> Conditioning:
    """The conditioning of `prompts` (one row each) for images of `size` (height, width; default
    `image_size(model)`, SDXL's time ids depend on it). Differentiable: wrap in `torch.no_grad()`
    unless gradients must reach the text encoders."""
    return _encode(model, prompts, False, size)[0]


def encode_for_guidance(model: Any, prompts: Sequence[str],
                        size: tuple[int, int] | None = None) -> tuple[Conditioning, Conditioning]:  # fmt: skip
    """(conditional, unconditional) as the pipeline's classifier-free guidance computes them."""
    cond, uncond = _encode(model, prompts, True, size)
    return cond, uncond


__all__ = ["Conditioning", "encode", "encode_for_guidance", "image_size", "is_xl", "pipeline_of"]
