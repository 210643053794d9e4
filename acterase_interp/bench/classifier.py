"""The benchmark's concept classifier: reads every ConceptWorld value, the benchmark's new ones too.

    python -m acterase_interp.bench.classifier [--steps 1500] [--n-images 40000] [--threads 2]

Trained by `world.train.train_classifier` (clean renders and VAE round trips of every value, the
default model's VAE) into `data/conceptworld-bench/classifier`; the shipped default classifier
(`data/conceptworld/classifier`), with which committed results were measured, stays as it is.
Writes `train_log.json` beside it with the held-out accuracy per factor and per value.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .. import loading
from ..io import atomic_write_json
from ..provenance import library_versions
from ..world.classifier import ConceptClassifier
from ..world.factors import FACTORS, Scene, sample_scenes
from ..world.render import render_batch
from ..world.train import TrainOptions, _scene_labels, make_data, train_classifier, vae_roundtrip

def bench_dir() -> Path:
    """The benchmark's data folder (`$ACTERASE_DATA` overrides it, as every shipped folder)."""
    return loading.data_path(loading.BENCH)


def per_value_accuracy(model: ConceptClassifier, scenes: list[Scene], images: torch.Tensor) -> dict[str, float]:
    """value -> share of the held-out images showing it whose factor the classifier reads as it;
    `images` in [-1, 1]."""
    pred = model.predict((images + 1) / 2)
    out = {}
    for factor, values in FACTORS.items():
        truth = [getattr(s, factor) for s in scenes]
        for value in values:
            hits = [p == t for p, t in zip(pred[factor], truth) if t == value]
            out[value] = sum(hits) / len(hits)
    return out


def load_bench_classifier(device: str = "cpu") -> ConceptClassifier:
    """The benchmark classifier, `load_classifier("conceptworld-bench")` (raises with the command to
    train it when absent)."""
    return loading.load_classifier(loading.BENCH, device=device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--n-images", type=int, default=40_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="default: data/conceptworld-bench/classifier")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    opts = TrainOptions(seed=args.seed, classifier_steps=args.steps, n_images=args.n_images)
    vae = loading.load(loading.CONCEPTWORLD).pipeline.vae.eval()
    start = time.perf_counter()
    scenes, images = make_data(opts, FACTORS)
    log: dict = {"options": asdict(opts), "versions": library_versions()}
    model = train_classifier(images, _scene_labels(scenes), vae, opts, log)
    rng = np.random.default_rng(opts.seed + 2000)  # a held-out seed of its own for the per-value table
    held = sample_scenes(4000, rng, FACTORS)
    clean = torch.from_numpy(render_batch(held, rng))
    log["classifier"]["per_value"] = {"n": len(held), "clean": per_value_accuracy(model, held, clean),
                                      "vae_roundtrip": per_value_accuracy(model, held, vae_roundtrip(vae, clean))}
    log["seconds"] = round(time.perf_counter() - start, 1)
    out = args.out or bench_dir() / "classifier"
    model.save(out)
    atomic_write_json(log, out / "train_log.json")
    print(log["classifier"])
    return log


if __name__ == "__main__":
    main()
