"""Where a re-threshold's time goes at SD 1.5 size, and what a cheaper threshold cut would cost.

    python -m benchmarks.profile_rethreshold --out benchmarks/results/profile-rethreshold.txt

Scores are random (a re-threshold's cost depends on shapes only) with SD 1.5's 16 `ffn_hidden`
sites and unit counts, 10 pairs x 30 steps. Prints the torch profiler's table for one
`FitStatistics.eraser(tau=...)` (the fit's mask levels already computed, as after its first call),
then the median time of the per-(pair, step) cut computed three ways: `topk` (the cut before mask
levels), `kthvalue`, and one `sort` kept for every later tau (what `mask_levels` builds on).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch.profiler import ProfilerActivity, profile

from acterase_interp.erase import EraseOptions, FitStatistics, PromptPairs
from acterase_interp.io import atomic_write_text
from acterase_interp.random_sd import config_dir
from acterase_interp.sites import discover_sites, select_sites

PAIRS, STEPS, REPS = 10, 30, 7
TAUS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)


def sd15_statistics() -> FitStatistics:
    config = json.loads((config_dir("1.5") / "unet" / "config.json").read_text())
    unet = UNet2DConditionModel.from_config({**config, "sample_size": 8})
    sites = tuple(select_sites(discover_sites(unet, sample_size=8), "ffn_hidden"))
    g = torch.Generator().manual_seed(0)
    scores = lambda: {s.name: torch.rand(PAIRS, STEPS, s.shape[-1], generator=g) for s in sites}  # noqa: E731
    return FitStatistics(
        sites=sites, options=EraseOptions(), pairs=PromptPairs("benchmark", ("a",) * PAIRS, ("b",) * PAIRS),
        seeds=tuple(range(PAIRS)), importance_source=scores(), importance_target=scores(), token_importance_source={},
        token_importance_target={}, values={s.name: torch.zeros(1, *s.shape) for s in sites}, mean_source={},
        mean_target={}, architecture_hash="benchmark", num_inference_steps=STEPS, guidance_scale=7.5, height=64,
        width=64, timesteps=tuple(float(t) for t in range(STEPS)), scheduler="benchmark", versions={},
    )  # fmt: skip


def _median_ms(fn) -> float:
    fn(TAUS[0])
    samples = []
    for i in range(REPS):
        start = time.perf_counter()
        fn(TAUS[i % len(TAUS)])
        samples.append(1000 * (time.perf_counter() - start))
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_rethreshold", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the report here")
    args = parser.parse_args()
    stats = sd15_statistics()
    flat = [t.flatten(2) for t in stats.importance_source.values()]
    stats.eraser(tau=0.005)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        stats.eraser(tau=0.05)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10)

    def by_topk(tau: float) -> None:
        for t in flat:
            k = max(1, math.ceil(tau * t.shape[-1] - 1e-9))
            t.topk(k, dim=-1).values[..., -1:]

    def by_kthvalue(tau: float) -> None:
        for t in flat:
            k = max(1, math.ceil(tau * t.shape[-1] - 1e-9))
            t.kthvalue(t.shape[-1] - k + 1, dim=-1, keepdim=True)

    ordered = [t.sort(dim=-1, descending=True).values for t in flat]  # once per fit

    def by_sorted(tau: float) -> None:
        for t in ordered:
            k = max(1, math.ceil(tau * t.shape[-1] - 1e-9))
            t[..., k - 1 : k]

    units = sum(s.shape[-1] for s in stats.sites)
    lines = [f"SD 1.5 ffn_hidden: {len(stats.sites)} sites, {units} units, {PAIRS} pairs x {STEPS} steps, "
             f"{torch.get_num_threads()} torch threads", "",
             f"FitStatistics.eraser(tau=new): {_median_ms(lambda tau: stats.eraser(tau=tau)):.1f} ms (median of {REPS})",
             f"  the cut alone, topk (before):     {_median_ms(by_topk):.1f} ms",
             f"  the cut alone, kthvalue:          {_median_ms(by_kthvalue):.1f} ms",
             f"  the cut alone, sorted once:       {_median_ms(by_sorted):.3f} ms", "",
             "torch profiler, one FitStatistics.eraser(tau=0.05):", table]  # fmt: skip
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        atomic_write_text(report, Path(args.out))


if __name__ == "__main__":
    main()
