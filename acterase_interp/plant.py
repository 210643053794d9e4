"""Planting: teach a pipeline a concept by fine-tuning only chosen UNet parameters.

Everything else stays bit-identical (checked after training), so the concept's location is known:
a ground truth against which localization methods are scored, as planted circuits are in language
models. Works on any SD 1.x/2.x pipeline given images of the concept with captions (DreamBooth
style); `world.planting` builds ConceptWorld's data and manifest on top of it.

Families of trainable parameters, per chosen transformer block:

- `ffn`: the whole feed-forward module `ff`;
- `ffn_units`: only `units` hidden units of it: their rows of the GEGLU projection `ff.net.0.proj`
  (value and gate halves) and their columns of `ff.net.2`;
- `attn2_kv`: the cross-attention key and value projections `attn2.to_k` / `attn2.to_v`;
- `attn1`: the self-attention projections `attn1.to_q/to_k/to_v/to_out.0`;
- `lowrank`: a rank-`rank` update of the FFN output projection `ff.net.2`, W <- W + Q A (bias
  b <- b + Q c), whose output directions Q are a fixed random orthonormal basis drawn from `seed`:
  only A and c train, so the concept's write to the block's `ffn_out` lies in span(Q), a subspace
  not aligned with units (the record keeps Q);
- `split`: `units` hidden units of the `blocks` (as `ffn_units`) and `attn2_kv` of the `kv_blocks`,
  trained together, so one concept lives in two places.

`PlantSpec.preserve` anchors the images of what the model already draws to the unplanted model's
predictions, so that a planting with much capacity (self-attention, many units) does not drift.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tqdm.auto import tqdm

from .hooks import Hooks
from .sites import _block_names

PLANT_FAMILIES: tuple[str, ...] = ("ffn", "ffn_units", "attn2_kv", "attn1", "lowrank", "split")
_UNIT_FAMILIES = ("ffn_units", "split")


@dataclass(frozen=True)
class PlantSpec:
    """Where a concept is planted and how it is trained."""

    family: str = "ffn"
    """One of `PLANT_FAMILIES`."""
    blocks: tuple[str, ...] | None = None
    """Transformer blocks (`down.1.0`, `mid.0`, `up.0.1`, ...); None: every block."""
    units: int | None = None
    """`ffn_units` and `split` only: hidden units trained per block, drawn at random from `seed`."""
    steps: int = 600
    lr: float = 5e-4
    batch: int = 64
    seed: int = 0
    p_uncond: float = 0.1
    """Fraction of captions replaced by "" so classifier-free guidance keeps working."""
    min_snr_gamma: float = 5.0
    # the later families' fields come last, so positional specs keep their meaning
    rank: int | None = None
    """`lowrank` only: the dimension r of the subspace each block's update writes."""
    kv_blocks: tuple[str, ...] | None = None
    """`split` only: the blocks whose cross-attention keys and values train with the units."""
    learn_basis: bool = False
    """`lowrank` only: train the output directions too (from the random basis), so a rank-1 update
    need not reach the concept through a direction drawn at random; the truth is the trained span."""
    preserve: float = 0.0
    """Weight of an anchor on the replay images (`plant(..., replay=)`): the squared distance of the
    noise prediction there to the prediction of the UNet before planting, so that what the model
    already draws does not drift while the concept is learned (0: no anchor, the v2 recipe). Holds a
    frozen copy of the UNet while training."""

    def __post_init__(self) -> None:
        if self.family not in PLANT_FAMILIES:
            raise ValueError(f"unknown plant family {self.family!r}; choose from {PLANT_FAMILIES}")
        if (self.family in _UNIT_FAMILIES) != (self.units is not None):
            raise ValueError("units is required for families 'ffn_units' and 'split' and only allowed there")
        if self.units is not None and self.units < 1:
            raise ValueError(f"units must be at least 1, got {self.units}")
        if (self.family == "lowrank") != (self.rank is not None):
            raise ValueError("rank is required for family 'lowrank' and only allowed there")
        if self.learn_basis and self.family != "lowrank":
            raise ValueError("learn_basis is only allowed for family 'lowrank'")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")
        if (self.family == "split") != bool(self.kv_blocks):
            raise ValueError("kv_blocks is required for family 'split' and only allowed there")
        if self.steps < 1 or self.batch < 1 or self.lr <= 0:
            raise ValueError(f"steps, batch and lr must be positive, got {self.steps}, {self.batch}, {self.lr}")
        if self.preserve < 0:
            raise ValueError(f"preserve must be 0 or more, got {self.preserve}")
        if not 0 <= self.p_uncond < 1:
            raise ValueError(f"p_uncond must be in [0, 1), got {self.p_uncond}")

    def to_dict(self) -> dict:
        """The spec as `PlantRecord.spec` keeps it (JSON: block tuples as lists)."""
        return {**asdict(self), "blocks": list(self.blocks) if self.blocks else None,
                "kv_blocks": list(self.kv_blocks) if self.kv_blocks else None}  # fmt: skip


@dataclass
class PlantRecord:
    """The ground truth of one planting: what was trained, where, on what, and the check."""

    concept: str
    spec: dict
    blocks: list[str]
    units: dict[str, list[int]]
    """`ffn_units`, `split`: block -> the trained hidden-unit indices (the `ffn_hidden` site's channels)."""
    parameters: list[str]
    """UNet parameter names that were trained (all of them, or the unit slices of them)."""
    trained_values: int
    """Number of scalar weights that were free to change."""
    frozen_identical: bool
    """Every other UNet weight, and the text encoder and VAE, equal their values before, bit for bit."""
    seconds: float
    losses: list[dict] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    bases: dict[str, list[list[float]]] = field(default_factory=dict)
    """`lowrank`: block -> its fixed (dim, rank) orthonormal basis Q, the directions of `ffn_out` the
    update writes."""
    kv_blocks: list[str] = field(default_factory=list)
    """`split`: the blocks whose `attn2.to_k` / `to_v` trained (the units' blocks are in `blocks`)."""

    def to_dict(self) -> dict:
        return asdict(self)


class CaptionCache:
    """Text-encoder states per caption, computed once: fine-tuning draws the same captions again and
    again, and a frozen encoder never changes."""

    def __init__(self, encoder: torch.nn.Module, tokenizer) -> None:
        self.encoder, self.tokenizer = encoder, tokenizer
        self._states: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        if new := sorted(set(captions) - self._states.keys()):
            length = self.tokenizer.model_max_length
            ids = self.tokenizer(new, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
            device = next(self.encoder.parameters()).device
            self._states.update(zip(new, self.encoder(ids.input_ids.to(device))[0]))
        return torch.stack([self._states[c] for c in captions])

    def __len__(self) -> int:
        return len(self._states)


def denoising_loss(
    unet: UNet2DConditionModel,
    z0: torch.Tensor,
    cond: torch.Tensor,
    noise_sched: DDPMScheduler,
    gen: torch.Generator,
    min_snr_gamma: float,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    anchor: tuple[UNet2DConditionModel, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """The epsilon-prediction loss with min-SNR weighting at random timesteps (`added_cond_kwargs`:
    an SDXL UNet's pooled embeddings and time ids). `anchor` = (frozen UNet, bool per item, weight)
    adds, for the chosen items, the weighted distance of the prediction to the frozen UNet's."""
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(z0),), generator=gen)
    noise = torch.randn(z0.shape, generator=gen).to(z0.device)
    x_t = noise_sched.add_noise(z0, noise, t)
    pred = unet(x_t, t.to(z0.device), encoder_hidden_states=cond, added_cond_kwargs=added_cond_kwargs).sample
    snr = noise_sched.alphas_cumprod[t] / (1 - noise_sched.alphas_cumprod[t])
    weight = (torch.clamp(snr, max=min_snr_gamma) / snr).to(z0.device)
    loss = (weight * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
    if anchor is not None and (keep := anchor[1].to(z0.device)).any():
        with torch.no_grad():
            added = {k: v[keep] for k, v in added_cond_kwargs.items()} if added_cond_kwargs else None
            target = anchor[0](x_t[keep], t[keep].to(z0.device), encoder_hidden_states=cond[keep],
                               added_cond_kwargs=added).sample  # fmt: skip
        loss = loss + anchor[2] * (weight[keep] * ((pred[keep] - target) ** 2).mean(dim=(1, 2, 3))).sum() / len(z0)
    return loss


def _blocks(unet: UNet2DConditionModel, wanted: tuple[str, ...] | None) -> list[tuple[str, str]]:
    blocks = _block_names(unet)
    if wanted is None:
        return blocks
    known = [name for name, _ in blocks]
    if missing := [b for b in wanted if b not in known]:
        raise ValueError(f"unknown block(s) {missing}; this UNet has {known}")
    return [(name, path) for name, path in blocks if name in wanted]


def trainable_masks(
    unet: UNet2DConditionModel, spec: PlantSpec
) -> tuple[dict[str, torch.Tensor | None], dict[str, list[int]]]:
    """(parameter name -> mask of its trainable entries, or None for all of it; block -> units)."""
    masks: dict[str, torch.Tensor | None] = {}
    units: dict[str, list[int]] = {}
    gen = torch.Generator().manual_seed(spec.seed)
    params = dict(unet.named_parameters())
    for name, path in _blocks(unet, spec.blocks):
        if spec.family == "attn2_kv":
            masks.update(_kv_masks(path))
        elif spec.family == "ffn":
            masks.update({n: None for n in params if n.startswith(f"{path}.ff.")})
        elif spec.family == "attn1":
            masks.update({n: None for n in params if n.startswith(f"{path}.attn1.")})
        elif spec.family == "lowrank":  # wholly rewritten, but only by Q A (see `LowRankUpdate`)
            masks.update({f"{path}.ff.net.2.{p}": None for p in ("weight", "bias")})
        else:
            proj, out = params[f"{path}.ff.net.0.proj.weight"], params[f"{path}.ff.net.2.weight"]
            inner = out.shape[1]
            if spec.units > inner:
                raise ValueError(f"units {spec.units} exceeds the {inner} hidden units of {name}")
            chosen = torch.randperm(inner, generator=gen)[: spec.units].sort().values
            units[name] = chosen.tolist()
            rows = torch.zeros(proj.shape[0], dtype=torch.bool)
            rows[chosen] = rows[chosen + inner] = True  # GEGLU: value half, then gate half
            masks[f"{path}.ff.net.0.proj.weight"] = rows[:, None].expand_as(proj).clone()
            masks[f"{path}.ff.net.0.proj.bias"] = rows
            cols = torch.zeros(out.shape[1], dtype=torch.bool)
            cols[chosen] = True
            masks[f"{path}.ff.net.2.weight"] = cols[None, :].expand_as(out).clone()
    if spec.family == "split":
        for _, path in _blocks(unet, spec.kv_blocks):
            masks.update(_kv_masks(path))
    return masks, units


def _kv_masks(path: str) -> dict[str, None]:
    return {f"{path}.attn2.{p}.weight": None for p in ("to_k", "to_v")}


def lowrank_basis(dim: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    """A random (dim, rank) orthonormal basis: almost surely aligned with no unit."""
    if rank > dim:
        raise ValueError(f"rank {rank} exceeds the {dim} output channels")
    return torch.linalg.qr(torch.randn(dim, rank, generator=gen, dtype=torch.float64))[0].float()


class LowRankUpdate(torch.nn.Module):
    """Adds (A x + c) mapped through a basis Q to a Linear's output, i.e. W + Q A, b + Q c, while
    training (Q fixed, or trained from its start with `learn_basis`); `fold` writes it into the
    Linear's weights with Q made orthonormal (the same product) and removes the hook."""

    def __init__(self, linear: torch.nn.Linear, basis: torch.Tensor, learn_basis: bool = False) -> None:
        super().__init__()
        p = linear.weight
        basis = basis.to(p.device, p.dtype)
        if learn_basis:
            self.basis = torch.nn.Parameter(basis)
        else:
            self.register_buffer("basis", basis)
        self.coef = torch.nn.Parameter(torch.zeros(basis.shape[1], linear.in_features, device=p.device, dtype=p.dtype))
        self.bias_coef = torch.nn.Parameter(torch.zeros(basis.shape[1], device=p.device, dtype=p.dtype))
        self._linear = (linear,)  # a tuple, so its weights are not this module's parameters
        self._hooks = Hooks()  # held until `fold`, not for a `with` block
        self._hooks.forward(linear, lambda m, args, out: out + (args[0] @ self.coef.T + self.bias_coef) @ self.basis.T,
                            name="low-rank update")  # fmt: skip

    @torch.no_grad()
    def fold(self) -> None:
        self._hooks.close()
        basis, coef, bias_coef = self.basis.detach(), self.coef, self.bias_coef
        if isinstance(self.basis, torch.nn.Parameter):  # trained: Q R = basis, and Q (R A) is the same update
            q, r = torch.linalg.qr(basis.double())
            basis, coef, bias_coef = (q.to(coef.dtype), (r @ coef.double()).to(coef.dtype),
                                      (r @ bias_coef.double()).to(coef.dtype))  # fmt: skip
            del self.basis
            self.register_buffer("basis", basis)
        linear = self._linear[0]
        linear.weight += basis @ coef
        linear.bias += basis @ bias_coef


def _lowrank_updates(unet: UNet2DConditionModel, spec: PlantSpec) -> dict[str, LowRankUpdate]:
    """block -> its update; the bases are drawn from `spec.seed` in block order."""
    gen = torch.Generator().manual_seed(spec.seed)
    updates = {}
    for name, path in _blocks(unet, spec.blocks):
        linear = unet.get_submodule(f"{path}.ff.net.2")
        updates[name] = LowRankUpdate(linear, lowrank_basis(linear.out_features, spec.rank, gen), spec.learn_basis)
    return updates


def _snapshot(*modules: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]


def _frozen_identical(modules, before, masks: dict[str, torch.Tensor | None]) -> bool:
    """True when every weight outside the trainable entries equals its snapshot bit for bit."""
    for module, snap in zip(modules, before):
        for name, value in module.state_dict().items():
            mask = masks.get(name, False) if module is modules[0] else False
            if mask is None:
                continue  # wholly trainable
            keep = ~mask if isinstance(mask, torch.Tensor) else torch.ones_like(value, dtype=torch.bool)
            if not torch.equal(value[keep.to(value.device)], snap[name][keep.to(value.device)]):
                return False
    return True


def plant(
    pipeline: StableDiffusionPipeline,
    images: torch.Tensor,
    captions: list[str],
    concept: str,
    spec: PlantSpec = PlantSpec(),
    *,
    data: dict | None = None,
    replay: torch.Tensor | None = None,
    progress: bool = True,
) -> PlantRecord:
    """Fine-tune `pipeline.unet` in place on `images` (N, 3, H, W) in [-1, 1] with their `captions`,
    training only the parameters `spec` names; the text encoder and VAE stay frozen. Mix images of
    the new concept with images of what the model already draws, or the rest drifts. Raises if
    anything outside the trained entries changed. `data` describes the images for the record;
    `replay` (bool per image: it shows what the model already draws) is required by `spec.preserve`."""
    if len(images) != len(captions) or not len(images):
        raise ValueError(f"need as many captions as images (at least one), got {len(captions)} and {len(images)}")
    if spec.preserve and (replay is None or len(replay) != len(images)):
        raise ValueError(f"spec.preserve needs replay: one bool per image ({len(images)}), got "
                         f"{None if replay is None else len(replay)}")  # fmt: skip
    start = time.perf_counter()
    unet, vae, text_encoder = pipeline.unet, pipeline.vae, pipeline.text_encoder
    device = next(unet.parameters()).device
    masks, units = trainable_masks(unet, spec)
    teacher = copy.deepcopy(unet).eval().requires_grad_(False) if spec.preserve else None  # before any hook
    updates = _lowrank_updates(unet, spec) if spec.family == "lowrank" else {}
    modules = (unet, text_encoder, vae)
    before = _snapshot(*modules)
    gen = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():  # encode once; sample the posterior per step
        dists = [vae.encode(c.to(device, vae.dtype)).latent_dist for c in images.split(256)]
        lat_mean, lat_std = torch.cat([d.mean for d in dists]).cpu(), torch.cat([d.std for d in dists]).cpu()
    encode = CaptionCache(text_encoder, pipeline.tokenizer)
    noise_sched = DDPMScheduler.from_config(pipeline.scheduler.config)
    params = dict(unet.named_parameters())
    for module in modules:
        module.requires_grad_(False)
    trained = [p for u in updates.values() for p in u.parameters()] if updates else [params[n] for n in masks]
    for p in trained:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trained, lr=spec.lr, weight_decay=0.0)  # decay would move frozen entries
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, spec.steps)
    unet.train()
    losses = []
    for step in (bar := tqdm(range(spec.steps), desc=f"planting {concept!r} ({spec.family})", disable=not progress)):
        idx = torch.randint(len(images), (spec.batch,), generator=gen)
        z0 = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)
        z0 = z0 * vae.config.scaling_factor
        drop = (torch.rand(spec.batch, generator=gen) < spec.p_uncond).tolist()
        cond = encode(["" if d else captions[i] for i, d in zip(idx.tolist(), drop)])
        anchor = (teacher, torch.as_tensor(replay)[idx].bool(), spec.preserve) if teacher is not None else None
        loss = denoising_loss(unet, z0.to(device), cond, noise_sched, gen, spec.min_snr_gamma, anchor=anchor)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for name, mask in masks.items():
            if mask is not None:
                params[name].grad.mul_(mask.to(device))
        opt.step()
        sched.step()
        if step % 50 == 0 or step + 1 == spec.steps:
            losses.append({"step": step, "loss": loss.item()})
            bar.set_postfix(loss=f"{loss.item():.4f}")
    unet.eval().requires_grad_(False)
    for update in updates.values():
        update.fold()
    identical = _frozen_identical(modules, before, masks)
    if not identical:
        raise RuntimeError("planting changed weights outside the trained entries; the ground truth would be wrong")
    n_trained = sum(int(m.sum()) if m is not None else params[n].numel() for n, m in masks.items())
    if updates:
        n_trained = sum(p.numel() for p in trained)
    return PlantRecord(
        concept=concept,
        spec=spec.to_dict(),
        blocks=[name for name, _ in _blocks(unet, spec.blocks)],
        units=units,
        parameters=list(masks),
        trained_values=n_trained,
        frozen_identical=identical,
        seconds=round(time.perf_counter() - start, 1),
        losses=losses,
        data=data or {"n_images": len(images)},
        bases={b: u.basis.cpu().tolist() for b, u in updates.items()},
        kv_blocks=[name for name, _ in _blocks(unet, spec.kv_blocks)] if spec.kv_blocks else [],
    )
