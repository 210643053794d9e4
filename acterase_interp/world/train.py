"""Train ConceptWorld from scratch on a CPU: VAE, concept classifier, then text encoder + UNet.

    python -m acterase_interp.world.train --out data/conceptworld

Seeded and reproducible; writes the pipeline (`save_pretrained`, safetensors), the classifier and
`train_log.json` (per-stage times, losses, options, library versions) under `--out`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel
from tqdm.auto import tqdm

from ..io import atomic_write_json
from ..plant import CaptionCache, denoising_loss
from ..metrics import factor_accuracy
from ..provenance import library_versions
from . import architecture as arch
from .captions import training_caption
from .classifier import ConceptClassifier
from .factors import FACTORS, NATURAL, Scene, sample_scenes
from .render import render_batch
from .text_encoder import load_minilm
from .tokenizer import build_tokenizer


STAGES: tuple[str, ...] = ("vae", "classifier", "unet")


@dataclass
class TrainOptions:
    seed: int = 0
    n_images: int = 40_000
    batch: int = 128
    vae_batch: int = 64
    vae_steps: int = 1_000
    classifier_steps: int = 800
    unet_steps: int = 2_400
    unet_lr: float = 1e-3
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    checkpoint_every: int = 400
    init_from: str = ""
    """A pipeline directory whose UNet and text encoder continue training ("" = from scratch)."""
    text_encoder: str = "minilm"
    """"minilm": v2's frozen pretrained all-MiniLM-L6-v2 (its token states cached per caption);
    "clip": v1's small CLIP text encoder, trained with the UNet unless frozen."""
    freeze_text_encoder: bool = False
    """With "clip": keep the text encoder at its initial weights, as SD keeps CLIP: the UNet must then
    decode text features that were not shaped for it (0 / 1 on the command line)."""


def _scene_labels(scenes: list[Scene]) -> torch.Tensor:
    return torch.tensor([s.labels() for s in scenes])


def make_data(opts: TrainOptions, values: dict[str, tuple[str, ...]] = NATURAL) -> tuple[list[Scene], torch.Tensor]:
    rng = np.random.default_rng(opts.seed)
    scenes = sample_scenes(opts.n_images, rng, values)
    images = torch.from_numpy(render_batch(scenes, rng))
    return scenes, images


def _cosine(step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(images: torch.Tensor, opts: TrainOptions, log: dict) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(opts.seed + 1)
    vae = arch.build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, opts.vae_steps))
    losses = []
    for step in (bar := tqdm(range(opts.vae_steps), desc="VAE")):
        x = images[torch.randint(len(images), (opts.vae_batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample(generator=gen)).sample
        mse = F.mse_loss(recon, x)
        loss = mse + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            psnr = 10 * math.log10(4.0 / mse.item())  # range [-1, 1] has peak-to-peak 2
            losses.append({"step": step, "mse": mse.item(), "psnr_db": psnr})
            bar.set_postfix(psnr=f"{psnr:.1f}")
    vae.eval()
    with torch.no_grad():
        x = images[:1024]
        latents = torch.cat([vae.encode(c).latent_dist.mean for c in x.split(256)])
        recon = torch.cat([vae.decode(z).sample for z in latents.split(256)])
        mse = F.mse_loss(recon, x).item()
    scaling = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scaling)
    log["vae"] = {"losses": losses, "psnr_db_first_1024": 10 * math.log10(4.0 / mse), "scaling_factor": scaling}
    return vae


@torch.no_grad()
def vae_roundtrip(vae: torch.nn.Module, images: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """`images` (N, 3, 32, 32) in [-1, 1] encoded and decoded by `vae` (a posterior sample when `gen`
    is given, else the mean): what a perfect latent model would hand to the decoder."""
    out = []
    for chunk in images.split(512):
        dist = vae.encode(chunk).latent_dist
        out.append(vae.decode(dist.sample(generator=gen) if gen is not None else dist.mean).sample.clamp(-1, 1))
    return torch.cat(out)


def _heldout_accuracy(model: ConceptClassifier, scenes: list[Scene], images: torch.Tensor) -> dict[str, float]:
    return {f: rate.value for f, rate in factor_accuracy(model, (images + 1) / 2, scenes).items() if f in FACTORS}


def train_classifier(
    images: torch.Tensor, labels: torch.Tensor, vae: torch.nn.Module, opts: TrainOptions, log: dict
) -> ConceptClassifier:
    """The concept classifier, trained on clean renders and on their VAE round trips in equal parts:
    generated images pass through the decoder, whose blur turns a thin-armed star into a blob that a
    classifier of clean renders alone misreads (74.5% shape accuracy on round trips)."""
    gen = torch.Generator().manual_seed(opts.seed + 2)
    roundtrips = vae_roundtrip(vae, images, gen)
    model = ConceptClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, opts.classifier_steps))
    model.train()
    half = opts.batch // 2
    for step in (bar := tqdm(range(opts.classifier_steps), desc="classifier")):
        idx = torch.randint(len(images), (opts.batch,), generator=gen)
        x = torch.cat([images[idx[:half]], roundtrips[idx[half:]]])
        x = x + 0.03 * torch.randn(x.shape, generator=gen)  # robust to sampler noise
        logits = model(x)
        loss = sum(F.cross_entropy(logits[f], labels[idx, i]) for i, f in enumerate(FACTORS))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    # Held-out accuracy on fresh renders (and their VAE round trips) from a seed never used for training.
    rng = np.random.default_rng(opts.seed + 1000)
    scenes = sample_scenes(2000, rng, FACTORS)
    clean = torch.from_numpy(render_batch(scenes, rng))
    acc = _heldout_accuracy(model, scenes, clean)
    acc_vae = _heldout_accuracy(model, scenes, vae_roundtrip(vae, clean))
    log["classifier"] = {"heldout_accuracy": acc, "heldout_vae_roundtrip_accuracy": acc_vae, "heldout_n": len(scenes)}
    print("classifier held-out accuracy, clean:", acc, "VAE round trip:", acc_vae)
    return model


def _text_pathway(opts: TrainOptions, tokenizer_size: int | None = None):
    """(text encoder, tokenizer, trainable, captions -> token states) for `opts.text_encoder`."""
    if opts.text_encoder == "minilm":
        encoder, tokenizer = load_minilm()
        return encoder, tokenizer, False, CaptionCache(encoder, tokenizer)
    if opts.text_encoder != "clip":
        raise ValueError(f"text_encoder must be 'minilm' or 'clip', got {opts.text_encoder!r}")
    tokenizer = build_tokenizer()
    if opts.init_from:
        encoder = CLIPTextModel.from_pretrained(Path(opts.init_from) / "text_encoder")
    else:
        encoder = arch.build_text_encoder(len(tokenizer))

    def encode(captions: list[str]) -> torch.Tensor:
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
        return encoder(ids.input_ids)[0]

    return encoder, tokenizer, not opts.freeze_text_encoder, encode


def train_unet(vae, scenes: list[Scene], images: torch.Tensor, opts: TrainOptions, log: dict, out: Path) -> None:
    gen = torch.Generator().manual_seed(opts.seed + 3)
    rng = np.random.default_rng(opts.seed + 3)
    torch.manual_seed(opts.seed + 3)
    text_encoder, tokenizer, train_text, encode = _text_pathway(opts)
    if opts.init_from:  # continue an earlier run (its EMA weights) with a fresh schedule
        unet = UNet2DConditionModel.from_pretrained(Path(opts.init_from) / "unet")
    else:
        unet = arch.build_unet(cross_attention_dim=text_encoder.config.hidden_size)
    noise_sched = arch.build_train_scheduler()
    with torch.no_grad():  # encode once; sample the posterior per step
        dists = [vae.encode(c).latent_dist for c in images.split(512)]
        lat_mean = torch.cat([d.mean for d in dists])
        lat_std = torch.cat([d.std for d in dists])
    scale = vae.config.scaling_factor
    text_encoder.requires_grad_(train_text)
    trained = [unet, text_encoder] if train_text else [unet]
    params = [p for m in trained for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=opts.unet_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, opts.unet_steps))
    emas = [copy.deepcopy(m).eval() for m in trained]
    ema_unet = emas[0]
    ema_text = emas[1] if train_text else text_encoder.eval()  # frozen: saved as initialised
    losses = []
    desc = "UNet + text encoder" if train_text else "UNet"
    for step in (bar := tqdm(range(opts.unet_steps), desc=desc)):
        idx = torch.randint(len(scenes), (opts.batch,), generator=gen)
        z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * scale
        captions = [training_caption(scenes[i], rng) for i in idx.tolist()]
        loss = denoising_loss(unet, z0, encode(captions), noise_sched, gen, opts.min_snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(opts.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in zip(emas, trained):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - decay)
        if step % 50 == 0:
            losses.append({"step": step, "loss": loss.item()})
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % opts.checkpoint_every == 0 or step + 1 == opts.unet_steps:
            arch.save_world(arch.assemble(vae, ema_text, tokenizer, ema_unet), out / "pipeline")
            log["unet"] = {"losses": losses, "steps_done": step + 1}
            atomic_write_json(log, out / "train_log.json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/conceptworld"))
    for name, default in asdict(TrainOptions()).items():
        kind = int if isinstance(default, bool) else type(default)  # bool("0") is True: take 0 / 1
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of the stages to run "
                        f"(default: {','.join(STAGES)}); the VAE is loaded from --out when its stage is skipped")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if unknown := set(stages) - set(STAGES):
        parser.error(f"unknown stage(s) {sorted(unknown)}; choose from {STAGES}")
    opts = TrainOptions(**{k: type(v)(getattr(args, k)) for k, v in asdict(TrainOptions()).items()})
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(opts.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "train_log.json"
    log: dict = json.loads(log_path.read_text()) if log_path.exists() else {"seconds": {}}
    log.update(options=asdict(opts), versions=library_versions())

    def timed(name, fn, *a):
        t0 = time.perf_counter()
        result = fn(*a)
        log["seconds"][name] = round(time.perf_counter() - t0, 1)
        atomic_write_json(log, args.out / "train_log.json")
        return result

    if {"vae", "unet"} & set(stages):
        scenes, images = timed("data", make_data, opts)  # the base model learns the natural values only
    # Finished stages are kept under --out, so an interrupted run resumes after them.
    vae_dir = args.out / "stage_vae"
    if (vae_dir / "config.json").exists():
        vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    elif "vae" not in stages and (args.out / "pipeline" / "vae" / "config.json").exists():
        vae = AutoencoderKL.from_pretrained(args.out / "pipeline" / "vae").eval()
    elif "vae" not in stages:
        parser.error(f"--stages skips the VAE but {args.out} holds no trained VAE (stage_vae/ or pipeline/vae/)")
    else:
        vae = timed("vae", train_vae, images, opts, log)
        vae.save_pretrained(vae_dir)
    if "classifier" in stages and not (args.out / "classifier" / "classifier.safetensors").exists():
        # The classifier reads every value, plantable ones included, so it can score planted concepts.
        all_scenes, all_images = timed("classifier_data", make_data, opts, FACTORS)
        classifier = timed("classifier", train_classifier, all_images, _scene_labels(all_scenes), vae, opts, log)
        classifier.save(args.out / "classifier")
    if "unet" in stages:
        timed("unet", train_unet, vae, scenes, images, opts, log, args.out)
    print(f"done: {args.out} ({log['seconds']})")


if __name__ == "__main__":
    main()
