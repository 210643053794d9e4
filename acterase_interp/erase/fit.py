"""Collecting ActErase statistics with nnsight, one prompt pair at a time.

For a pair (target c_t, source c_s) the sampler follows the source trajectory, and at every step
the UNet sees the same latent with both prompts in one batched call: the prompts go in as
[source, target] with one initial noise for both rows, and after the sites are read the target
rows of the UNet's output are overwritten with the source rows, so the scheduler moves both rows
identically (checked at every step). Per site the fitter streams importance scores, the running
sum of source activations (and of target activations for a `restorable` fit) and per-pair first
and second moments; nothing else is kept.

Text-token sites (`attn2_k`, `attn2_v`) depend on the prompt only, so their statistics repeat at
every step; they are stored per step all the same, like every other site. So are the text-encoder
layer sites (`text_layer`): the encoder runs once for the prompts [source, target] before the
denoising loop (and again for the negative prompt under CFG, a call that is not read: it is the
same for both rows, so `cfg_rows` does not apply there), and that one reading is stored at every
step, so masks, time masks, re-thresholding, merging and artifacts treat them like any other site.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from nnsight import DiffusionModel
from tqdm.auto import tqdm

from ..generation import seed_list
from ..flow import denoiser_timesteps, text_tokens
from ..loading import architecture_hash, denoiser
from ..patching import call_sample, call_timestep, component_envoy, denoiser_envoy, read_in_trace, rewrap, to_tokens, unwrap
from ..provenance import library_versions
from ..sites import TEXT_LAYER, TEXT_TOKEN_KINDS, UNET_OUT, Site, dit_kinds, is_dit, reader_weight_norm, select_sites
from ._util import model_sites
from .eraser import Eraser
from .options import EraseOptions
from .pairs import PromptPairs
from .statistics import FitStatistics

_GB = 2**30
_SCORES = ("I_s", "I_t", "tI_s", "tI_t", "m_s", "m_t", "q_s", "q_t")
_MOMENTS = ("m_s", "m_t", "q_s", "q_t")  # first and second moments, (units,) per pair


def follow_source(output: torch.Tensor) -> torch.Tensor:
    """The UNet output with every target row replaced by its source row (rows come in
    [source, target] pairs, within each CFG half)."""
    pairs = output.unflatten(0, (-1, 2))
    return pairs[:, :1].expand_as(pairs).reshape(output.shape)


class EraserFitter:
    """Streams the statistics of an ActErase fit (LEACE-style): `update` adds one prompt pair,
    `fit` adds many and returns an eraser, `statistics` holds everything needed to re-threshold.

    Statistics memory: 8 bytes per (pair, step, unit) per site, and with `granularity="token_unit"`
    8 bytes per (pair, step, token, unit) as well; a fit that would need more than
    `max_statistics_gb` is refused before it runs."""

    def __init__(
        self,
        model: DiffusionModel,
        options: EraseOptions | None = None,
        *,
        max_statistics_gb: float = 4.0,
        restorable: bool = False,
        progress: bool = True,
    ) -> None:
        self.model = model
        # target means too (FitStatistics.target_values) for restoring erasers: twice the value memory
        self.restorable = restorable
        self.options = options = options or EraseOptions()
        self.max_statistics_gb = max_statistics_gb
        self.progress = progress
        pipe = model.pipeline
        unet = denoiser(pipe)  # a UNet, or a DiT's transformer
        self._dit = is_dit(unet)
        defaults = model.defaults
        self.num_inference_steps = options.num_inference_steps or defaults.num_inference_steps
        self.guidance_scale = defaults.guidance_scale if options.guidance_scale is None else options.guidance_scale
        pixels = (pipe.default_sample_size if self._dit else unet.config.sample_size) * pipe.vae_scale_factor
        self.height, self.width = defaults.height or pixels, defaults.width or pixels
        kinds = dit_kinds(options.site_kind) if self._dit else options.site_kind
        self.sites: tuple[Site, ...] = tuple(select_sites(model_sites(pipe), kinds, options.blocks))
        if not self.sites:
            raise ValueError(f"this model has no sites of kind {options.site_kind!r}"
                             + (f" in blocks {list(options.blocks)}" if options.blocks else ""))  # fmt: skip
        device = unet.device
        self._norms = {s.name: n.to(device) for s in self.sites if (n := reader_weight_norm(unet, s)) is not None}
        self.timesteps: tuple[float, ...] = self._schedule(pipe)
        self._tokens = self._token_counts(unet)
        self._units = {s.name: s.shape[-1] if s.kind != UNET_OUT else s.shape[0] for s in self.sites}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._pairs: list[tuple[str, str, int]] = []  # (target, source, seed)
        self._info: PromptPairs | None = None
        self._scores: dict[str, dict[str, list[torch.Tensor]]] = {
            k: {s.name: [] for s in self.sites} for k in _SCORES
        }
        self._value_sum: dict[str, torch.Tensor] = {}
        self._target_value_sum: dict[str, torch.Tensor] = {}
        self._bar: Any = None

    # -- public -------------------------------------------------------------

    def _schedule(self, pipe: Any) -> tuple[float, ...]:
        """The timestep of every denoiser call, as the denoiser receives it (a DiT: flow sigmas)."""
        if self._dit:
            return denoiser_timesteps(pipe, self.num_inference_steps, self.height, self.width)
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(self.num_inference_steps)
        return tuple(float(t) for t in scheduler.timesteps)

    @property
    def num_steps(self) -> int:
        """UNet calls per collection run (the "steps" axis of the statistics)."""
        return len(self.timesteps)

    def update(self, target: str, source: str, seed: int | None = None) -> None:
        """Add one pair: run the source trajectory from `seed` (default: `options.seed` plus the
        number of pairs so far) and accumulate the statistics of every site at every step."""
        for name, prompt in (("target", target), ("source", source)):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"the {name} prompt must be a non-empty string, got {prompt!r}")
        seed = self.options.seed + len(self._pairs) if seed is None else int(seed)
        self._check_budget(len(self._pairs) + 1)
        record: dict[str, dict[str, torch.Tensor]] = {k: {} for k in (*_SCORES, "v", "v_t")}
        bar = self._bar if self._bar is not None else tqdm(total=self.num_steps, desc="erase fit", disable=not self.progress)
        try:
            self._run(target, source, seed, record, bar)
        finally:
            if bar is not self._bar:
                bar.close()
        self._commit(record)
        self._pairs.append((target, source, seed))

    def fit(self, pairs: PromptPairs, seeds: int | Sequence[int] | None = None) -> Eraser:
        """`update` with every pair (pair i seeded `options.seed + i` unless `seeds` are given),
        then the eraser of the fit's options. Pairs add to any already seen."""
        if not isinstance(pairs, PromptPairs):
            raise TypeError(f"fit takes PromptPairs (see PromptPairs.load), got {type(pairs).__name__}")
        seeds = seed_list(self.options.seed + len(self._pairs) if seeds is None else seeds, len(pairs))
        self._check_budget(len(self._pairs) + len(pairs))
        total = len(pairs) * self.num_steps
        self._bar = tqdm(total=total, desc=f"erase fit: {pairs.concept}", disable=not self.progress)
        try:
            for (target, source), seed in zip(pairs, seeds):
                self.update(target, source, seed)
        finally:
            self._bar.close()
            self._bar = None
        self._info = pairs
        return self.eraser()

    def eraser(self, **overrides: Any) -> Eraser:
        """The eraser of the statistics so far; `overrides` as in `Eraser.from_statistics`."""
        return Eraser.from_statistics(self.statistics, **overrides)

    @property
    def statistics(self) -> FitStatistics:
        """Everything collected so far, as frozen CPU tensors."""
        if not self._pairs:
            raise ValueError("no pairs yet: call update() or fit() first")
        n_pairs = len(self._pairs)
        targets, sources, seeds = zip(*self._pairs)
        info = self._info
        pairs = PromptPairs(
            concept=info.concept if info else "unnamed",
            targets=targets,
            sources=sources,
            heldout=info.heldout if info else (),
            non_target=info.non_target if info else (),
            meta=dict(info.meta) if info else {},
        )
        count = n_pairs * (self.num_steps if self.options.value_mode == "mean" else 1)
        stack = {k: {name: torch.stack(v) for name, v in d.items() if v} for k, d in self._scores.items()}
        return FitStatistics(
            sites=tuple(replace(s, shape=self._shapes[s.name]) for s in self.sites),
            options=self.options,
            pairs=pairs,
            seeds=tuple(seeds),
            importance_source=stack["I_s"],
            importance_target=stack["I_t"],
            token_importance_source=stack["tI_s"],
            token_importance_target=stack["tI_t"],
            values={name: (v / count).float() for name, v in self._value_sum.items()},
            target_values={name: (v / count).float() for name, v in self._target_value_sum.items()},
            mean_source=stack["m_s"],
            mean_target=stack["m_t"],
            square_mean_source=stack["q_s"],
            square_mean_target=stack["q_t"],
            architecture_hash=architecture_hash(self.model.pipeline),
            num_inference_steps=self.num_inference_steps,
            guidance_scale=float(self.guidance_scale),
            height=int(self.height),
            width=int(self.width),
            timesteps=self.timesteps,
            scheduler=type(self.model.pipeline.scheduler).__name__,
            versions=library_versions(),
        )

    # -- collection -----------------------------------------------------------

    def _run(self, target: str, source: str, seed: int, record: dict, bar: Any) -> None:
        model = self.model
        device = model.pipeline.device
        text = [s for s in self.sites if s.kind == TEXT_LAYER]
        inner = [s for s in self.sites if s.kind not in (UNET_OUT, TEXT_LAYER)]
        out_site = next((s for s in self.sites if s.kind == UNET_OUT), None)
        n = self.num_steps
        # One generator per row, both seeded alike: the two rows start from the same noise.
        generators = [torch.Generator(device).manual_seed(seed) for _ in range(2)]
        done: list[int] = []
        net = denoiser_envoy(model)
        with model.generate(
            [source, target],
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            height=self.height,
            width=self.width,
            generator=generators,
            output_type="latent",  # no image is needed: skip the VAE decoder
        ) as tracer:
            for site in text:  # before the loop: the encoders' first calls, the prompts [source, target]
                x = read_in_trace(component_envoy(model, site), site)
                for step in range(n):
                    self._record(record, site, step, x)
            for step in tracer.iter[:n]:
                args, kwargs = net.inputs
                self._check_step(step, call_sample(args, kwargs), call_timestep(args, kwargs))
                for site in inner:  # execution order, as nnsight requires
                    self._record(record, site, step, read_in_trace(net, site))
                output = net.output
                if out_site is not None:
                    self._record(record, out_site, step, unwrap(output))
                net.output = rewrap(output, follow_source(unwrap(output)))  # whole-output assignment
                done.append(step)
                bar.update(1)
        if done != list(range(n)):
            raise RuntimeError(f"the collection run covered steps {done}, expected all {n} UNet calls")

    def _check_step(self, step: int, sample: torch.Tensor, timestep: float) -> None:
        if timestep != self.timesteps[step]:
            raise RuntimeError(
                f"UNet call {step} ran at timestep {timestep}, expected {self.timesteps[step]}: "
                "the scheduler did not follow its own timestep schedule"
            )
        if not torch.equal(sample[0::2], sample[1::2]):
            raise RuntimeError(
                f"at step {step} the target latent differs from the source latent: this scheduler "
                f"({type(self.model.pipeline.scheduler).__name__}) does not keep both rows on the source trajectory"
            )

    def _record(self, record: dict, site: Site, step: int, x: torch.Tensor) -> None:
        """Accumulate one site's activation at one step (called from inside the trace)."""
        # Any NaN or inf in x makes its sum non-finite (so would finite values summing past float32's
        # range, which no sane activation does; fp16 sums in float32): one reduction, 30x cheaper
        # than isfinite(x).all().
        if not torch.isfinite(x.sum(dtype=torch.promote_types(x.dtype, torch.float32))):
            raise FloatingPointError(f"non-finite activations (NaN or inf) at site {site.name}, denoising step {step}")
        self._shapes.setdefault(site.name, tuple(x.shape[1:]))
        halves = to_tokens(x).float().unflatten(0, (-1, 2))  # (CFG halves, [source, target], tokens, units)
        if self.options.cfg_rows == "cond":
            halves = halves[-1:]
        source, target = halves[:, 0], halves[:, 1]
        name = site.name
        norm = self._norms.get(name)
        token_source, token_target = source.abs().mean(0), target.abs().mean(0)  # (tokens, units)
        if norm is not None:  # Eq. 4: I_j = |x_j| * sum_i |W_ij|
            token_source, token_target = token_source * norm, token_target * norm
        if name not in record["I_s"]:
            self._start(record, name, source)
        record["I_s"][name][step] = token_source.mean(0)
        record["I_t"][name][step] = token_target.mean(0)
        if self.options.granularity == "token_unit":
            record["tI_s"][name][step] = token_source
            record["tI_t"][name][step] = token_target
        value_step = step if self.options.value_mode == "per_step" else 0
        record["v"][name][value_step] += source.mean(0).double()
        if self.restorable:
            record["v_t"][name][value_step] += target.mean(0).double()
        record["m_s"][name] += source.mean(dim=(0, 1)).double()
        record["m_t"][name] += target.mean(dim=(0, 1)).double()
        record["q_s"][name] += source.square().mean(dim=(0, 1)).double()
        record["q_t"][name] += target.square().mean(dim=(0, 1)).double()

    def _start(self, record: dict, name: str, x: torch.Tensor) -> None:
        steps, (tokens, units) = self.num_steps, x.shape[1:]
        new = dict(device=x.device)
        record["I_s"][name] = torch.zeros(steps, units, **new)
        record["I_t"][name] = torch.zeros(steps, units, **new)
        if self.options.granularity == "token_unit":
            record["tI_s"][name] = torch.zeros(steps, tokens, units, **new)
            record["tI_t"][name] = torch.zeros(steps, tokens, units, **new)
        value_steps = steps if self.options.value_mode == "per_step" else 1
        record["v"][name] = torch.zeros(value_steps, tokens, units, dtype=torch.float64, **new)
        if self.restorable:
            record["v_t"][name] = torch.zeros(value_steps, tokens, units, dtype=torch.float64, **new)
        for key in _MOMENTS:
            record[key][name] = torch.zeros(units, dtype=torch.float64, **new)

    def _commit(self, record: dict) -> None:
        """Add a finished pair (a run that failed half-way adds nothing)."""
        for key in ("I_s", "I_t", "tI_s", "tI_t"):
            for name, t in record[key].items():
                self._scores[key][name].append(t.cpu())
        for key in _MOMENTS:
            for name, t in record[key].items():
                self._scores[key][name].append((t / self.num_steps).float().cpu())
        for key, sums in (("v", self._value_sum), ("v_t", self._target_value_sum)):
            for name, v in record[key].items():
                sums[name] = sums[name] + v if name in sums else v

    # -- memory ---------------------------------------------------------------

    def _token_counts(self, unet: Any) -> dict[str, int]:
        """Tokens of every site at the fitting resolution, scaled from the small probe pass of
        `site_table` (tokens scale with the latent's area; text tokens are the tokenizer's length,
        which a text-encoder site's shape has already)."""
        pipe = self.model.pipeline
        if self._dit:
            return self._dit_token_counts(pipe)
        probe = 2 ** (len(unet.config.block_out_channels) - 1)
        area = (self.height // pipe.vae_scale_factor) * (self.width // pipe.vae_scale_factor) / probe**2
        text = pipe.tokenizer.model_max_length

        def tokens(s: Site) -> int:
            if s.kind == TEXT_LAYER:
                return s.shape[0]
            if s.kind in TEXT_TOKEN_KINDS:
                return text
            return int((s.shape[0] if s.kind != UNET_OUT else s.shape[1] * s.shape[2]) * area)

        return {s.name: tokens(s) for s in self.sites}

    def _dit_token_counts(self, pipe: Any) -> dict[str, int]:
        """Tokens of every DiT site at the fitting resolution: image tokens (2x2 latent patches),
        the pipeline's text tokens (`flow.text_tokens`), or both for a single-stream block's MLP."""
        image = (self.height // pipe.vae_scale_factor // 2) * (self.width // pipe.vae_scale_factor // 2)
        text = text_tokens(pipe)
        return {s.name: text if s.kind in TEXT_TOKEN_KINDS else image + text * (s.kind == "mlp_hidden") for s in self.sites}

    def statistics_bytes(self, n_pairs: int) -> int:
        """Estimated bytes of the statistics of `n_pairs` pairs (scores, plus value sums)."""
        steps, token = self.num_steps, self.options.granularity == "token_unit"
        # per pair: source + target float32 scores per (step, unit) [and (step, token, unit)], four moment vectors;
        # then the source value sums (and the target's, for a restorable fit)
        units, tokens = self._units, self._tokens
        per_pair = sum(8 * units[n] * (steps * (1 + (tokens[n] if token else 0)) + 2) for n in units)
        value_steps = steps if self.options.value_mode == "per_step" else 1
        values = sum((2 if self.restorable else 1) * 8 * value_steps * self._tokens[n] * self._units[n] for n in self._units)
        return n_pairs * per_pair + values

    def _check_budget(self, n_pairs: int) -> None:
        need = self.statistics_bytes(n_pairs)
        if need > self.max_statistics_gb * _GB:
            raise MemoryError(
                f"statistics for {n_pairs} pairs x {self.num_steps} steps over {len(self.sites)} sites "
                f"(granularity={self.options.granularity!r}, value_mode={self.options.value_mode!r}) need about "
                f"{need / _GB:.2f} GB, above max_statistics_gb={self.max_statistics_gb}: use fewer pairs, steps or "
                "blocks, granularity='unit', or raise max_statistics_gb"
            )
