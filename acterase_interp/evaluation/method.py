"""The interface every erasure method of the comparison table implements (`Method`, `WeightEdit`),
and `read_sites`, the one way a baseline reads activations while it fits: through
`patching.patched`, the project's single hook mechanism, with its step counter."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..erase.pairs import PromptPairs
from ..generation import generate
from ..patching import patched, unet_of
from ..sites import TRANSFORMER, Site, is_dit, list_sites
from .conditioning import pipeline_of
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

    runs_on_dit: bool = False
    """Whether the method has a diffusion-transformer (FLUX, SD3) form; the others refuse one."""

    def fit(self, model: Any, pairs: PromptPairs) -> Method:
        """Learn what the method needs from `pairs` (`pairs.concept` names the concept); returns self."""
        if is_dit(unet_of(model)) and not self.runs_on_dit:
            raise ValueError(f"{self.name} has no form for diffusion transformers (FLUX, SD3); the methods that do: "
                             "unerased, acterase, negative_prompt, uce, casteer")  # fmt: skip
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


class WeightEdit(Method):
    """A method that replaces some parameters of the pipeline: `edits_` maps a parameter's name
    (under `pipeline.unet`, or a DiT's `pipeline.transformer`) to its erased value. `applied` copies them in and the originals back."""

    edits_: dict[str, torch.Tensor]

    @contextmanager
    def _erased(self, model: Any) -> Iterator[None]:
        params = dict(unet_of(model).named_parameters())
        if missing := sorted(set(self.edits_) - set(params)):
            raise ValueError(f"{self.name}: this denoiser has no parameters {missing[:3]}: fitted on another model?")
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


def sites_of_kind(model: Any, kind: str) -> list[Site]:
    """Every UNet site of `kind` (`ffn_hidden`, `attn2_out`, ...), in module order."""
    return [s for s in list_sites(unet_of(model)) if s.kind == kind]


def dit_block_sites(model: Any, module: str, kind: str, output_index: int = 0, io: str = "output") -> list[Site]:
    """One site per double (joint) block of a DiT at `transformer_blocks.<i>.<module>`, named
    `double.<i>.<kind>`: sites the site table does not list (a baseline's own reading points)."""
    blocks = unet_of(model).transformer_blocks
    return [Site(f"double.{i}.{kind}", kind, f"double.{i}", f"transformer_blocks.{i}.{module}", io, None, (), TRANSFORMER,
                 output_index) for i in range(len(blocks))]  # fmt: skip


class _Reader:
    """A patch that changes nothing: it hands each site's activation, per step, to `reduce`."""

    def __init__(self, sites: Sequence[Site], reduce: Callable[[torch.Tensor], torch.Tensor], steps: int | None) -> None:
        self.sites, self.reduce, self.steps = tuple(sites), reduce, steps
        self.values: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}

    def __call__(self, site_name: str, x: torch.Tensor, step: int | None = None) -> torch.Tensor:
        if self.steps is None or step < self.steps:
            self.values[site_name].append(self.reduce(x.detach()))
        return x


@torch.no_grad()
def read_sites(model: Any, prompts: Sequence[str], sites: Sequence[Site], reduce: Callable[[torch.Tensor, int], torch.Tensor],
               seed: int, num_inference_steps: int | None, steps: int | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Per site, `reduce(x, n)` of its activation x at each of the first `steps` denoising steps
    (all if None), stacked (steps, ...), while the model samples `prompts` (n of them, in one batch,
    so one UNet call per step holds both guidance halves: (halves * n, tokens, units), the
    unconditional half first) on the fit seeds of `seed`."""
    n = len(prompts)
    reader = _Reader(sites, lambda x: reduce(x, n), steps)
    with patched(model, reader):
        generate(model, list(prompts), seeds=image_seeds("fit", n, base=seed), num_inference_steps=num_inference_steps,
                 batch_size=n, progress=False)  # fmt: skip
    return {name: torch.stack(v) for name, v in reader.values.items()}


def per_image(x: torch.Tensor, n: int) -> torch.Tensor:
    """(halves, n, tokens, units) view of a batched activation of n images (halves: 2 under
    classifier-free guidance, unconditional first, else 1)."""
    if x.shape[0] % n:
        raise ValueError(f"an activation of batch {x.shape[0]} does not hold {n} images")
    return x.reshape(x.shape[0] // n, n, -1, x.shape[-1])


__all__ = ["Method", "Sampler", "WeightEdit", "dit_block_sites", "per_image", "read_sites", "sites_of_kind"]
