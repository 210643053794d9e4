"""What ActErase costs, measured at two scales in one process: ConceptWorld, and SD 1.5's UNet
architecture with random weights (`random_sd`; on a CPU at 64x64 pixels and 4 steps, with
`--device cuda` at 512x512 and 30 steps).

    python -m benchmarks.run --out benchmarks/results                 # CPU: a few minutes on 2 cores
    python -m benchmarks.run --device cuda --out benchmarks/results   # beside it, on a GPU
    python -m benchmarks.gpu                                          # SD 1.5 at 512 px, 30 steps, fp16 on CUDA

`--size` picks the sizes: `default` (above), `sd15-real` (SD 1.5 alone at 512 px and 30 steps, on
any device) or `tiny` (every code path, nothing worth timing); `--dtype float16` loads the models
in half precision; `--name` names the output files (default: the device).

Every figure compares two sides, A and B, run interleaved (A B A B ...) after a warm-up of each, so
that drift hits both; each side reports the median, min and max of `--reps` runs, and the figure
the ratio of medians B / A. Before every run the process collects garbage and hands freed memory
back to the system, then the run is timed and its peak memory taken (see `peak_memory`).
Writes `<out>/<device>.json` (figures, samples, provenance) and `<out>/<device>.md` (the table).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from acterase_interp.erase import EraseOptions, EraserFitter, FitStatistics, PromptPairs
from acterase_interp.io import atomic_write_json, atomic_write_text
from acterase_interp.loading import load
from acterase_interp.provenance import git_commit, library_versions
from acterase_interp.random_sd import build_random_sd
from acterase_interp.world.pairs import conceptworld_pairs

SEED = 0
TAUS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
"""Re-threshold: each timed run asks for the next of these taus (none is cached)."""
PAPER_PAIRS, PAPER_STEPS = 10, 30
"""Size of the stored statistics the re-threshold is timed on: the paper's ~10 pairs, 30 steps."""
RETHRESHOLD_GOAL = 0.001
"""Seconds per new tau at SD 1.5 size, the mask levels of the fit already computed."""
_GB = 2**30


@dataclass(frozen=True)
class Scale:
    """A model and the sizes it is benchmarked at."""

    name: str
    build: Callable[[str], Any]
    steps: int
    prompts: int
    """Images per generation call (one batch)."""
    pairs: int
    """Prompt pairs per fit."""


SIZES = ("default", "sd15-real", "tiny")
DTYPES = {"float32": torch.float32, "float16": torch.float16}


def _sd15(sample_size: int, dtype: torch.dtype) -> Callable[[str], Any]:
    return lambda device: load(build_random_sd("1.5", seed=SEED, sample_size=sample_size).to(device, dtype))


def _conceptworld(dtype: torch.dtype) -> Callable[[str], Any]:
    return lambda device: load("conceptworld", device=device, dtype=dtype)


def scales(device: str, size: str, dtype: torch.dtype = torch.float32) -> list[Scale]:
    """The scales of a `size` (one of `SIZES`) on `device`."""
    real = Scale("sd15", _sd15(64, dtype), 30, 1, 2)  # SD 1.5's own 512 px (latent 64) and 30 steps
    if size == "sd15-real":
        return [real]
    if size == "tiny":  # the smoke test: every code path, nothing worth timing
        return [Scale("conceptworld", _conceptworld(dtype), 2, 2, 1), Scale("sd15", _sd15(8, dtype), 1, 1, 1)]
    sd = real if device == "cuda" else Scale("sd15", _sd15(8, dtype), 4, 1, 2)
    return [Scale("conceptworld", _conceptworld(dtype), 20, 8, 4), sd]


# -- measuring ---------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _settle(device: str) -> None:
    """Free what the last run left: garbage, glibc's free lists (malloc_trim), the CUDA cache."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    elif sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_memory(fn: Callable[[], Any], device: str) -> tuple[Any, float, float]:
    """(fn(), seconds, peak bytes above the memory in use before the call).

    CPU: the process's resident-set high-water mark (VmHWM, reset by writing 5 to
    /proc/self/clear_refs) minus its resident set before the call, so every allocation counts,
    torch's included (tracemalloc sees only Python's). CUDA: torch's peak allocated bytes."""
    _settle(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _status_kb("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _status_kb("VmHWM") * 1024
    return out, seconds, float(peak - base)


def _summary(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


def interleaved(a: Callable[[], Any], b: Callable[[], Any], device: str, reps: int, warmup: int) -> dict:
    """Time and peak memory of `a` and `b`, run A B A B ... after `warmup` runs of each."""
    for _ in range(warmup):
        a(), b()
    runs: dict[str, list] = {"a": [], "b": []}
    for _ in range(reps):
        for side, fn in (("a", a), ("b", b)):
            runs[side].append(peak_memory(fn, device)[1:])
    return {side: {"seconds": _summary([r[0] for r in rs]), "peak_bytes": _summary([r[1] for r in rs])}
            for side, rs in runs.items()}  # fmt: skip


def figure(name: str, a: str, b: str, runs: dict, quantity: str, goal: float | None, note: str) -> dict:
    """One row of the table: B against A on `quantity` ("seconds" or "peak_bytes"). A memory goal
    must hold in every repetition: the worst ratio of B's run to the A run just before it counts."""
    ratio = runs["b"][quantity]["median"] / runs["a"][quantity]["median"]
    pairs = zip(runs["a"][quantity]["samples"], runs["b"][quantity]["samples"])
    worst = max(bv / av for av, bv in pairs) if quantity == "peak_bytes" else None
    if worst is not None:
        note += f"; worst repetition {worst:.2f}x"
    met = None if goal is None else ratio <= goal and (worst is None or worst <= goal)
    return {"figure": name, "a": a, "b": b, "quantity": quantity, "a_stats": runs["a"][quantity],
            "b_stats": runs["b"][quantity], "ratio": ratio, "worst_ratio": worst, "goal": goal, "met": met,
            "note": note}  # fmt: skip


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def fix_mmap_threshold(nbytes: int) -> None:
    """Serve every allocation of `nbytes` or more by mmap, returned to the system when freed. glibc
    otherwise raises its threshold to the largest block freed so far, after which big transient
    tensors come from the heap, which fragments and keeps what it grew (see the README)."""
    if not ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, int(nbytes)):
        raise RuntimeError(f"glibc refused M_MMAP_THRESHOLD={nbytes}")


# -- what is measured ---------------------------------------------------------------------------


def _generators(model: Any, seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator(model.pipeline.device).manual_seed(s) for s in seeds]


def _latents(model: Any, prompts: list[str], seeds: list[int], steps: int) -> torch.Tensor:
    """Plain generation, stopped before the VAE (identical on both sides, it would only dilute a ratio)."""
    d = model.defaults
    return model.pipeline(prompts, num_inference_steps=steps, guidance_scale=d.guidance_scale, height=d.height,
                          width=d.width, generator=_generators(model, seeds), output_type="latent").images  # fmt: skip


def _traced_latents(model: Any, eraser: Any, prompts: list[str], seeds: list[int], steps: int) -> torch.Tensor:
    """The same generation with the eraser applied step by step inside an nnsight trace."""
    d = model.defaults
    with model.generate(prompts, num_inference_steps=steps, guidance_scale=d.guidance_scale, height=d.height,
                        width=d.width, generator=_generators(model, seeds), output_type="latent") as tracer:  # fmt: skip
        for step in tracer.iter[:steps]:
            eraser.apply(model, step)
        images = model.output.images.save()
    return images


def _fit_floor(model: Any, pairs: PromptPairs, steps: int) -> None:
    """What a fit cannot avoid: per pair, plain generation of [source, target] in one batch from
    one noise (the fit's own UNet batch, steps and guidance), no statistics, no tracing."""
    for i, (target, source) in enumerate(pairs):
        _latents(model, [source, target], [SEED + i] * 2, steps)


def _paper_size(stats: FitStatistics) -> FitStatistics:
    """The fit's statistics tiled to `PAPER_PAIRS` pairs x `PAPER_STEPS` steps, every unit axis
    as measured: the arrays a re-threshold reads on a paper-sized fit of this architecture."""

    def tile(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in scores.items():
            reps = (math.ceil(PAPER_PAIRS / t.shape[0]), math.ceil(PAPER_STEPS / t.shape[1]), *([1] * (t.ndim - 2)))
            out[name] = t.repeat(reps)[:PAPER_PAIRS, :PAPER_STEPS].contiguous()
        return out

    n = PAPER_PAIRS
    pairs = PromptPairs(stats.pairs.concept, (stats.pairs.targets[0],) * n, (stats.pairs.sources[0],) * n)
    timesteps = tuple(float(t) for t in torch.linspace(999, 0, PAPER_STEPS))
    return replace(stats, pairs=pairs, seeds=tuple(range(n)), importance_source=tile(stats.importance_source),
                   importance_target=tile(stats.importance_target), mean_source=tile_pairs(stats.mean_source, n),
                   mean_target=tile_pairs(stats.mean_target, n), timesteps=timesteps,
                   num_inference_steps=PAPER_STEPS)  # fmt: skip


def tile_pairs(means: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    return {k: v.repeat(math.ceil(n / v.shape[0]), 1)[:n] for k, v in means.items()}


def run_scale(scale: Scale, device: str, reps: int, warmup: int, log: Callable[[str], None]) -> tuple[list, dict]:
    """Every figure of one scale."""
    start = time.perf_counter()
    model = scale.build(device)
    log(f"{scale.name}: built in {time.perf_counter() - start:.1f} s")
    if scale.name == "conceptworld":
        pairs = conceptworld_pairs("heart", n=scale.pairs, seed=SEED)
    else:
        pairs = PromptPairs.load("nudity")
        pairs = replace(pairs, targets=pairs.targets[: scale.pairs], sources=pairs.sources[: scale.pairs])
    options = EraseOptions(num_inference_steps=scale.steps, tau=0.02, seed=SEED)
    fit = lambda: EraserFitter(model, options, progress=False).fit(pairs)  # noqa: E731
    fitter = EraserFitter(model, options, progress=False)
    eraser = fitter.fit(pairs)
    prompts = list(pairs.targets) * math.ceil(scale.prompts / len(pairs))
    prompts, seeds = prompts[: scale.prompts], list(range(SEED, SEED + scale.prompts))
    plain = lambda: _latents(model, prompts, seeds, scale.steps)  # noqa: E731

    def hooked() -> torch.Tensor:
        with eraser.applied(model):
            return plain()

    traced = lambda: _traced_latents(model, eraser, prompts, seeds, scale.steps)  # noqa: E731
    same = hooked()
    diff = (traced().float() - same.float()).abs().max().item()
    info = {"steps": scale.steps, "images_per_generation": len(prompts), "pairs_per_fit": len(pairs),
            "resolution": [model.defaults.height or model.pipeline.unet.config.sample_size * model.pipeline.vae_scale_factor] * 2,
            "tau": options.tau, "mask_density": sum(eraser.mask_density().values()) / len(eraser.sites),
            "sites": len(eraser.sites), "traced_minus_hooked_max_abs": diff,
            "patch_changes_output": not torch.equal(plain(), same)}  # fmt: skip
    figures = []
    runs = interleaved(plain, hooked, device, reps, warmup)
    log(f"{scale.name}: generation done")
    figures.append(figure("patched generation", "unpatched", "patched (torch hooks)", runs, "seconds", 1.03,
                          f"{len(prompts)} images x {scale.steps} steps, latents (no VAE decode)"))
    runs = interleaved(lambda: _fit_floor(model, pairs, scale.steps), fit, device, reps, warmup)
    log(f"{scale.name}: fit done")
    figures.append(figure("fit time vs its floor", "floor: plain [source, target] generation", "fit", runs, "seconds",
                          1.2, f"{len(pairs)} pairs x {scale.steps} steps"))  # fmt: skip
    kept = fitter.statistics.nbytes / 2**20
    figures.append(figure("fit peak memory", "plain generation of the same batch", "fit", runs, "peak_bytes", 1.3,
                          "peak above the memory in use before the call (model weights excluded); the fit keeps "
                          f"{kept:.1f} MiB of statistics for re-thresholding"))  # fmt: skip
    runs = interleaved(hooked, traced, device, reps, warmup)
    log(f"{scale.name}: nnsight done")
    figures.append(figure("nnsight-traced patching", "torch hooks (Eraser.applied)", "nnsight trace (Eraser.apply)",
                          runs, "seconds", None, f"same patch; outputs differ by at most {diff:.1e}"))
    if scale.name == "sd15":
        figures.append(rethreshold(_paper_size(fitter.statistics), reps, warmup))
        log(f"{scale.name}: re-threshold done")
    return figures, info


def rethreshold(stats: FitStatistics, reps: int, warmup: int) -> dict:
    """A new eraser for a new tau from stored statistics: `FitStatistics.eraser(tau=...)`. The first
    call computes the mask levels, once per fit (reported in the note, not timed as a re-threshold)."""
    start = time.perf_counter()
    stats.eraser(tau=0.005)
    first = time.perf_counter() - start
    for _ in range(warmup):
        stats.eraser(tau=0.005)
    samples = []
    for i in range(reps):
        start = time.perf_counter()
        stats.eraser(tau=TAUS[i % len(TAUS)])
        samples.append(time.perf_counter() - start)
    units = sum(s.shape[-1] for s in stats.sites)
    return {"figure": "re-threshold", "a": None, "b": "FitStatistics.eraser(tau=new)", "quantity": "seconds",
            "a_stats": None, "b_stats": _summary(samples), "ratio": None, "goal_seconds": RETHRESHOLD_GOAL,
            "met": statistics.median(samples) <= RETHRESHOLD_GOAL,
            "note": f"{len(stats.sites)} sites, {units} units, {stats.num_pairs} pairs x {stats.num_steps} steps; "
                    f"mask levels once per fit: {1000 * first:.0f} ms"}  # fmt: skip


# -- reporting ----------------------------------------------------------------------------------


def provenance(args: argparse.Namespace, prog: str) -> dict:
    commit = git_commit()
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": __import__("os").cpu_count(), "torch_threads": torch.get_num_threads()}  # fmt: skip
    if args.device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name()
    return {"command": " ".join([prog, *args.argv]), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "git_commit": commit, "versions": library_versions(), "machine": machine, "seed": SEED,
            "options": {k: v for k, v in vars(args).items() if k not in ("out", "argv")}}  # fmt: skip


def rows(result: dict) -> list[dict]:
    """The table as flat records, one per (scale, figure): `to_dataframe(rows(result))` is its
    DataFrame (median, min and max of each side; the samples stay in the JSON)."""
    out = []
    for scale, body in result["scales"].items():
        for f in body["figures"]:
            row = {"device": result["device"], "scale": scale, **{k: f[k] for k in ("figure", "a", "b", "quantity")}}
            for side in ("a", "b"):
                stats = f[f"{side}_stats"] or {}
                row.update({f"{side}_{k}": stats.get(k) for k in ("median", "min", "max")})
            out.append(row | {"ratio": f["ratio"], "goal_ratio": f.get("goal"), "goal_seconds": f.get("goal_seconds"),
                              "met": f["met"], "note": f["note"]})  # fmt: skip
    return out


def _cell(stats: dict | None, quantity: str) -> str:
    if stats is None:
        return ""
    if quantity == "peak_bytes":
        f = lambda v: f"{v / 2**20:.1f}"  # noqa: E731
        unit = " MiB"
    else:
        f = (lambda v: f"{1000 * v:.1f}") if stats["median"] < 1 else (lambda v: f"{v:.2f}")  # noqa: E731
        unit = " ms" if stats["median"] < 1 else " s"
    return f"{f(stats['median'])}{unit} [{f(stats['min'])}-{f(stats['max'])}]"


def markdown(result: dict) -> str:
    p = result["provenance"]
    lines = [f"# Benchmarks on {result['device']}", "",
             f"`{p['command']}` at commit {p['git_commit'] or 'unknown'}, {p['date']}; "
             f"{p['machine']['processor']}, {p['machine']['cpu_count']} CPUs, {p['machine']['torch_threads']} torch "
             f"threads{', ' + p['machine']['gpu'] if 'gpu' in p['machine'] else ''}; "
             f"{p['options'].get('dtype', 'float32')} weights; torch {p['versions']['torch']}, "
             f"diffusers {p['versions']['diffusers']}, nnsight {p['versions']['nnsight']}.", "",
             "Median [min-max] of " + str(p["options"]["reps"]) + " runs per side after "
             + str(p["options"]["warmup"]) + " warm-up, sides interleaved A B A B; ratio = median B / median A.", "",
             "| scale | figure | A | B | A: median [min-max] | B: median [min-max] | ratio B/A | goal | met |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for scale, body in result["scales"].items():
        for f in body["figures"]:
            goal = f"<= {f['goal']}x" if f.get("goal") else (f"<= {1000 * f['goal_seconds']:.0f} ms" if "goal_seconds" in f else "report")
            met = "" if f["met"] is None else ("yes" if f["met"] else "**no**")
            ratio = "" if f["ratio"] is None else f"{f['ratio']:.3f}"
            lines.append(f"| {scale} | {f['figure']} ({f['note']}) | {f['a'] or ''} | {f['b']} | "
                         f"{_cell(f['a_stats'], f['quantity'])} | {_cell(f['b_stats'], f['quantity'])} | {ratio} | {goal} | {met} |")  # fmt: skip
    lines += ["", "Sizes: " + "; ".join(f"{s}: {b['info']['resolution'][0]} px, {b['info']['steps']} steps, "
                                        f"{b['info']['images_per_generation']} images per generation, "
                                        f"{b['info']['pairs_per_fit']} pairs per fit, {b['info']['sites']} sites"
                                        for s, b in result["scales"].items()) + ".", "",  # fmt: skip
              "Method. Time: `time.perf_counter` around one call (CUDA synchronised). Memory: before each run the "
              "process collects garbage and returns freed heap to the system (`malloc_trim`); on a CPU the peak is "
              "the resident-set high-water mark (VmHWM, reset through `/proc/self/clear_refs`) minus the resident "
              "set just before the call, so it counts torch's allocations, which tracemalloc does not see; on CUDA "
              "it is `torch.cuda.max_memory_allocated` minus the bytes allocated before. Both exclude the model "
              "weights. Generation stops at the latents: the VAE decode is the same on both sides and would only "
              "dilute a ratio. The fit's floor is plain generation of each pair's [source, target] in one batch "
              "from one noise: the UNet batch, steps and guidance of the fit, without tracing or statistics. "
              "The re-threshold runs on the SD 1.5 fit's statistics tiled to "
              f"{PAPER_PAIRS} pairs x {PAPER_STEPS} steps (every unit axis as fitted)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, prog: str = "python -m benchmarks.run") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for <name>.json and <name>.md")
    parser.add_argument("--name", help="file name of the results, without suffix (default: the device)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="model weights and activations")
    parser.add_argument("--size", default="default", choices=SIZES, help="model sizes (see the module's doc)")
    parser.add_argument("--reps", type=int, default=7, help="timed runs per side (default 7)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per side first (default 1)")
    parser.add_argument("--scales", nargs="+", choices=("conceptworld", "sd15"), default=["conceptworld", "sd15"])
    parser.add_argument("--tiny", action="store_true", help="the same as --size tiny")
    parser.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="CPU on glibc: fix malloc's mmap threshold (default: glibc's dynamic one)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.size = "tiny" if args.tiny else args.size
    args.name = args.name or args.device
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "benchmarks: error: --device cuda, but torch sees no CUDA device\n")
    if not re.fullmatch(r"[\w.-]+", args.name):
        parser.exit(2, f"benchmarks: error: --name {args.name!r} must be a plain file name (letters, digits, . _ -)\n")
    if not any(s.name in args.scales for s in scales(args.device, args.size)):
        parser.exit(2, f"benchmarks: error: --size {args.size} has none of the scales {args.scales}\n")
    if args.reps < 1 or args.warmup < 0:
        parser.exit(2, "benchmarks: error: --reps must be >= 1 and --warmup >= 0\n")
    if args.device == "cpu" and not Path("/proc/self/clear_refs").exists():
        parser.exit(2, "benchmarks: error: CPU peak memory needs Linux's /proc/self/clear_refs\n")
    if args.mmap_threshold is not None:
        if args.device != "cpu" or not sys.platform.startswith("linux") or args.mmap_threshold < 0:
            parser.exit(2, "benchmarks: error: --mmap-threshold needs --device cpu on Linux (glibc) and BYTES >= 0\n")
        fix_mmap_threshold(args.mmap_threshold)
    torch.manual_seed(SEED)
    start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - start:6.1f} s] {msg}", flush=True)  # noqa: E731
    result: dict = {"device": args.device, "scales": {}}
    for scale in scales(args.device, args.size, DTYPES[args.dtype]):
        if scale.name in args.scales:
            with torch.no_grad():
                figures, info = run_scale(scale, args.device, args.reps, args.warmup, log)
            result["scales"][scale.name] = {"figures": figures, "info": info}
            gc.collect()
    result["seconds"] = time.perf_counter() - start
    result["provenance"] = provenance(args, prog)
    out = Path(args.out)
    atomic_write_json(result, out / f"{args.name}.json")
    table = markdown(result)
    atomic_write_text(table, out / f"{args.name}.md")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
