"""The benchmark's plantings: one new concept each, planted independently into the default model.

    python -m acterase_interp.bench.plantings --plant NAME | --all     # plant, save, verify
    python -m acterase_interp.bench.plantings --verify NAME | --all    # verify a stored planting again

Each `BenchPlanting` teaches `load("conceptworld")` (which already holds moon, heart and cyan,
replayed in the planting data) one benchmark value, with a family and sparsity of its own
(`PLANTINGS`). `data/conceptworld-bench/<name>/` keeps `overlay.safetensors` (the planted values of
only the parameters the planting touched) and `truth.json` (the `PlantingTruth`, the `PlantRecord`,
the verification, and the sha256 of the base UNet file and of the overlay). `load_planting(name)`
rebuilds the planted model from the default one: the default model *is* the model before planting,
so restoring a part means putting the default model's values back.

Verification (`verify`, any reader callable, so it also runs on a user's own planting): the
concept drawn in its prompts (read by the benchmark classifier), natural factor accuracy against
the default model on the same prompts and seeds (read by the default classifier, as v2's quality
bars are), and per planted part (a block, a unit group, the split's two places) the share
of the concept removed when that part alone is restored, with a bootstrap standard error; a part
whose share is not above twice its error is reported inactive. `lowrank` plantings also report
the share of their activation change that lies in the planted subspace.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import loading
from ..generation import generate
from ..hooks import Hooks
from ..integrity import ArtifactError, load_tensors, read_object, sha256_file
from ..io import atomic_save_safetensors, atomic_write_json
from ..metrics import factor_accuracy
from ..plant import PlantRecord, PlantSpec
from ..provenance import library_versions
from ..sites import _block_names
from ..world.classifier import ConceptClassifier
from ..world.pairs import conceptworld_pairs
from ..world.planting import plant_concept
from ..world.quality import PLANTED_BAR, planted_prompts, quality_prompts
from .classifier import bench_dir, load_bench_classifier
from .truth import PlantingTruth

Reader = Callable[[torch.Tensor], torch.Tensor]
"""Images (N, 3, H, W) in [0, 1] -> bool (N,): does each show the concept?"""

NATURAL_BAR = 0.02
"""Largest accepted change of a natural factor accuracy from the default model (canonical and paraphrase)."""
ACTIVE_Z = 2.0
"""A part is active when its share removed exceeds this many standard errors."""
N_PLANTED, N_NATURAL, N_PAIRS, SEED = 100, 100, 10, 0
"""Prompts per concept for drawn rates and part shares; natural scenes; fit pairs for captured variance."""


@dataclass(frozen=True)
class BenchPlanting:
    """One benchmark planting: its id, the value it plants, how, and its half of the benchmark."""

    name: str
    concept: str
    spec: PlantSpec
    split: str
    fraction: float = 1 / 3
    """Share of the planting images that show the concept (the rest replay what the model draws):
    1/6, the default model's share, left the first new values under 90% drawn at 600-1000 steps."""


PLANTINGS: tuple[BenchPlanting, ...] = (
    BenchPlanting("ring_u32_b2", "ring", PlantSpec("ffn_units", blocks=("mid.0", "up.0.0"), units=32, steps=1600, lr=5e-3, seed=21), "dev"),
    BenchPlanting("orange_r1", "orange", PlantSpec("lowrank", blocks=("up.0.0", "up.0.1", "up.1.0", "up.1.1"), rank=1, steps=3000, lr=2e-2, seed=22, learn_basis=True), "dev"),
    BenchPlanting("grid_split", "grid", PlantSpec("split", blocks=("up.0.0", "up.1.0"), units=128, kv_blocks=("up.0.1", "up.1.1"), steps=3000, lr=5e-3, seed=23, preserve=3.0), "dev", 1 / 2),
    BenchPlanting("brown_attn1", "brown", PlantSpec("attn1", blocks=("up.0.0", "up.0.1"), steps=1000, lr=3e-3, seed=24), "dev", 1 / 6),
    BenchPlanting("diamond_u8_b1", "diamond", PlantSpec("ffn_units", blocks=("up.0.0",), units=8, steps=1200, lr=5e-3, seed=25), "test"),
    BenchPlanting("arrow_u128_b4", "arrow", PlantSpec("ffn_units", blocks=("down.1.0", "mid.0", "up.0.0", "up.0.1"), units=128, steps=800, lr=2e-3, seed=26), "test"),
    BenchPlanting("pink_r4", "pink", PlantSpec("lowrank", blocks=("up.0.1",), rank=4, steps=1500, lr=2e-2, seed=27), "test"),
    BenchPlanting("zigzag_attn1", "zigzag", PlantSpec("attn1", blocks=("up.0.0", "up.0.1", "up.1.0", "up.1.1"), steps=3000, lr=3e-3, seed=28, preserve=3.0), "test"),
)  # fmt: skip
"""Each half holds one planting of every new family (settings raised where 600 steps missed the 90% bar): units (8 / 32 / 128 per block over 1 / 2 / 4
blocks), rotated low rank (r = 1, 4), self-attention, and the split units + cross-attention K/V."""

OVERLAY, TRUTH = "overlay.safetensors", "truth.json"
BASE_QUALITY = "base_quality.json"


def planting(name: str) -> BenchPlanting:
    for p in PLANTINGS:
        if p.name == name:
            return p
    raise ValueError(f"unknown benchmark planting {name!r}; choose from {[p.name for p in PLANTINGS]}")


# --- where a planting lives ------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One separately restorable place of a planting: its sites and the parameters it trained."""

    name: str
    sites: tuple[str, ...]
    parameters: tuple[str, ...]


_PART_KIND = {  # family -> (parameter sub-path, sites written) of a planted block
    "ffn": ("ff.", ("ffn_hidden", "ffn_out")),
    "ffn_units": ("ff.", ("ffn_hidden",)),
    "split": ("ff.", ("ffn_hidden",)),
    "lowrank": ("ff.", ("ffn_out",)),
    "attn1": ("attn1.", ("attn1_out",)),
    "attn2_kv": ("attn2.", ("attn2_k", "attn2_v")),
}


def planting_parts(record: PlantRecord, unet) -> list[Part]:
    """The planted parts of `record`: one per block (for `split`, the units' blocks and the
    `kv_blocks` apart), each with its trained parameters and the sites they write."""
    paths = dict(_block_names(unet))
    family = record.spec["family"]
    places = [(b, family) for b in record.blocks] + [(b, "attn2_kv") for b in record.kv_blocks]
    parts = []
    for block, kind in places:
        sub, kinds = _PART_KIND[kind]
        params = tuple(n for n in record.parameters if n.startswith(f"{paths[block]}.{sub}"))
        label = f"{block} {'units' if kind in ('ffn_units', 'split') else kind}"
        parts.append(Part(label, tuple(f"{block}.{k}" for k in kinds), params))
    return parts


def planting_truth(p: BenchPlanting, record: PlantRecord, parts: Sequence[Part], shares: dict | None = None) -> PlantingTruth:
    """The truth of a planting; `shares` (part -> verification) fills `active` / `inactive`."""
    sites = tuple(s for part in parts for s in part.sites)
    units = {f"{b}.ffn_hidden": tuple(u) for b, u in record.units.items()}
    subspaces = {f"{b}.ffn_out": torch.tensor(q) for b, q in record.bases.items()}
    active, inactive = {}, []
    for part in parts if shares else ():
        v = shares[part.name]
        for site in part.sites:
            if v["active"]:
                active[site] = v["share"]
            else:
                inactive.append(site)
    return PlantingTruth(p.name, p.concept, record.spec["family"], p.split, sites, units, subspaces, active, tuple(inactive))


# --- verification, for any reader ------------------------------------------------------------


def drawn(model, prompts: Sequence[str], seeds: Sequence[int], reader: Reader, progress: bool = False) -> torch.Tensor:
    """Bool per prompt: does the image generated from it (with its seed) show the concept?"""
    images = generate(model, list(prompts), seeds=list(seeds), progress=progress)
    shown = torch.as_tensor(reader(images)).bool().flatten().cpu()
    if len(shown) != len(prompts):
        raise ValueError(f"the reader returned {len(shown)} answers for {len(prompts)} images")
    return shown


@contextmanager
def restored(unet, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """`unet` with the parameters named in `values` set to them (the values before planting), then put back."""
    params = dict(unet.named_parameters())
    saved = {n: params[n].detach().clone() for n in values}
    with torch.no_grad():
        for n, v in values.items():
            params[n].copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)


def share_removed(planted: torch.Tensor, restored_: torch.Tensor, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """1 - rate(restored) / rate(planted) over paired outcomes (same prompts and seeds), and its
    bootstrap standard error (prompts resampled in pairs)."""
    p, r = planted.float(), restored_.float()
    if not p.any():
        raise ValueError("the planted model never draws the concept: no share to remove")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(p), (n_boot, len(p)), generator=gen)
    boots = 1 - r[idx].mean(1) / p[idx].mean(1).clamp_min(1 / len(p))
    return 1 - r.mean().item() / p.mean().item(), boots.std().item()


def part_shares(model, parts: Sequence[Part], before: dict[str, torch.Tensor], prompts: Sequence[str],
                seeds: Sequence[int], reader: Reader, planted: torch.Tensor, progress: bool = True) -> dict[str, dict]:  # fmt: skip
    """Per part: its concept rate with only its parameters restored to `before`, the share removed
    ± standard error, and whether that share is measurable (`ACTIVE_Z` errors above zero)."""
    out = {}
    for part in tqdm(parts, desc="restoring parts", disable=not progress):
        with restored(model.pipeline.unet, {n: before[n] for n in part.parameters}):
            shown = drawn(model, prompts, seeds, reader)
        share, se = share_removed(planted, shown)
        out[part.name] = {"sites": list(part.sites), "rate_restored": int(shown.sum()) / len(shown),
                          "share": share, "se": se, "active": share > ACTIVE_Z * se}  # fmt: skip
    return out


@torch.no_grad()
def captured_variance(model, before: dict[str, torch.Tensor], module_path: str, basis: torch.Tensor,
                      targets: Sequence[str], sources: Sequence[str]) -> dict[str, float]:  # fmt: skip
    """Share of the planting's change of the fit pairs' target-minus-source difference at
    `module_path`'s output, (planted - before), that lies in span(`basis`): pooled over every
    denoising step, latent pixel and pair (conditional half of the guidance batch), and at the
    first step alone (where only the planted weights differ, so it must be ~1)."""
    module = model.pipeline.unet.get_submodule(module_path)

    def record(prompts):
        steps = []
        with Hooks() as hooks:
            hooks.forward(module, lambda m, a, out: steps.append(out[len(out) // 2 :].detach().clone()),
                          name=f"record {module_path}")  # fmt: skip
            generate(model, list(prompts), seeds=list(range(len(prompts))), progress=False)
        return torch.stack(steps)  # (steps, pairs, tokens, dim)

    planted = record(targets) - record(sources)
    with restored(model.pipeline.unet, before):
        base = record(targets) - record(sources)
    d = (planted - base).double()
    q = basis.double().to(d.device)

    def share(x):
        x = x.reshape(-1, x.shape[-1])
        return ((x @ q).pow(2).sum() / x.pow(2).sum().clamp_min(1e-30)).item()

    return {"pooled": share(d), "first_step": share(d[:1]), "n_steps": d.shape[0]}


def natural_rates(model, classifier: ConceptClassifier, n: int = N_NATURAL, seed: int = SEED) -> dict[str, dict[str, float]]:
    """Factor accuracies on natural scenes, canonical and paraphrase rows (`quality_prompts`)."""
    scenes, rows, seeds = quality_prompts(n, seed)
    out = {}
    for row in ("canonical", "paraphrase"):
        images = generate(model, rows[row], seeds=seeds, progress=False)
        out[row] = {f: r.value for f, r in factor_accuracy(classifier, images, scenes).items()}
    return out


def base_natural_rates(classifier: ConceptClassifier) -> dict:
    """The default model's natural rates, computed once and kept in `base_quality.json`."""
    path = bench_dir() / BASE_QUALITY
    if path.exists():
        stored = read_object(path, "bench base quality")
        if stored["options"] == {"n": N_NATURAL, "seed": SEED}:
            return stored["rates"]
    rates = natural_rates(loading.load(loading.CONCEPTWORLD), classifier)
    atomic_write_json({"rates": rates, "options": {"n": N_NATURAL, "seed": SEED}, "versions": library_versions()}, path)
    return rates


def verify(model, record: PlantRecord, before: dict[str, torch.Tensor], reader: Reader,
           prompts: Sequence[str], seeds: Sequence[int], progress: bool = True) -> dict:  # fmt: skip
    """The concept's drawn rate on `prompts` and every part's share removed, read by `reader`: the
    checks that need no ConceptWorld classifier, so a user's planting (their own images, captions
    and reader) is verified the same way. `before`: the touched parameters' values before planting."""
    shown = drawn(model, prompts, seeds, reader, progress=progress)
    parts = planting_parts(record, model.pipeline.unet)
    # a count over n in double precision: a float32 mean puts 90 of 100 just below the 90% bar
    return {"drawn": int(shown.sum()) / len(shown), "n": len(prompts),
            "parts": part_shares(model, parts, before, prompts, seeds, reader, shown, progress)}  # fmt: skip


def verify_bench(p: BenchPlanting, model, record: PlantRecord, before: dict[str, torch.Tensor], progress: bool = True) -> dict:
    """`verify` with the benchmark classifier on `N_PLANTED` planted prompts, plus the natural
    rates against the default model's and, for `lowrank`, the captured variance."""
    start = time.perf_counter()
    classifier = load_bench_classifier()
    _, prompts, seeds = planted_prompts([p.concept], N_PLANTED, SEED)[p.concept]
    out = verify(model, record, before, lambda im: classifier.shows(im, p.concept), prompts, seeds, progress)
    default = loading.load_classifier()  # v2's reader of its bars
    base = base_natural_rates(default)
    rates = natural_rates(model, default)
    deltas = {row: {f: rates[row][f] - base[row][f] for f in rates[row]} for row in rates}
    worst = max(abs(d) for row in deltas.values() for d in row.values())
    out.update(natural=rates, natural_delta=deltas, natural_max_abs_delta=worst,
               passed_drawn=out["drawn"] >= PLANTED_BAR, passed_natural=worst <= NATURAL_BAR + 1e-9)
    if record.bases:
        pairs = conceptworld_pairs(p.concept, N_PAIRS, SEED)
        paths = dict(_block_names(model.pipeline.unet))
        out["captured_variance"] = {
            f"{b}.ffn_out": captured_variance(model, before, f"{paths[b]}.ff", torch.tensor(q), pairs.targets, pairs.sources)
            for b, q in record.bases.items()
        }
    out["options"] = {"n_planted": N_PLANTED, "n_natural": N_NATURAL, "seed": SEED, "n_pairs": N_PAIRS,
                      "active_z": ACTIVE_Z, "steps": model.defaults.num_inference_steps,
                      "guidance": model.defaults.guidance_scale,
                      "reader": "bench classifier (drawn, parts); default classifier (natural, as v2's bars)"}  # fmt: skip
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


# --- storage ---------------------------------------------------------------------------------


def base_unet_file() -> Path:
    return loading.conceptworld_dir() / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"


def save_planting(p: BenchPlanting, model, record: PlantRecord, verification: dict | None) -> Path:
    """Write the overlay and truth.json of planting `p` (atomically)."""
    folder = bench_dir() / p.name
    folder.mkdir(parents=True, exist_ok=True)
    params = dict(model.pipeline.unet.named_parameters())
    atomic_save_safetensors({n: params[n].detach().cpu().contiguous() for n in record.parameters}, folder / OVERLAY)
    parts = planting_parts(record, model.pipeline.unet)
    truth = planting_truth(p, record, parts, verification and verification["parts"])
    atomic_write_json({
        "truth": truth.to_dict(), "record": record.to_dict(), "verification": verification,
        "base_unet_sha256": sha256_file(base_unet_file()), "overlay_sha256": sha256_file(folder / OVERLAY),
        "versions": library_versions(),
    }, folder / TRUTH)  # fmt: skip
    return folder


def _open(name: str, device: str = "cpu"):
    """(model, stored truth.json dict, record, the touched parameters' values before planting)."""
    planting(name)
    folder = bench_dir() / name
    if not (folder / TRUTH).exists():
        raise FileNotFoundError(f"planting {name!r} is not stored in {folder}; plant it with "
                                f"`python -m acterase_interp.bench.plantings --plant {name}`")  # fmt: skip
    stored = read_object(folder / TRUTH, "bench planting truth")
    if (base := sha256_file(base_unet_file())) != stored["base_unet_sha256"]:
        raise ArtifactError(f"planting {name!r} was made on a default UNet with sha256 {stored['base_unet_sha256']}, "
                            f"but {base_unet_file()} has {base}: the overlay would not give the planted model")  # fmt: skip
    if sha256_file(folder / OVERLAY) != stored["overlay_sha256"]:
        raise ArtifactError(f"{folder / OVERLAY} changed since it was written (sha256 differs from truth.json)")
    model = loading.load(loading.CONCEPTWORLD, device=device)
    params = dict(model.pipeline.unet.named_parameters())
    overlay = load_tensors(folder / OVERLAY)
    before = {n: params[n].detach().clone() for n in overlay}
    with torch.no_grad():
        for n, v in overlay.items():
            params[n].copy_(v)
    record = PlantRecord(**stored["record"])
    object.__setattr__(model, "planted", [*model.planted, record.to_dict()])
    return model, stored, record, before


def load_planting(name: str, device: str = "cpu"):
    """(the planted model, its `PlantingTruth`): the default model with the planting's overlay;
    `model.planted` lists the default model's planted records, then this planting's."""
    model, stored, _, _ = _open(name, device)
    return model, PlantingTruth.from_dict(stored["truth"])


# --- the command -----------------------------------------------------------------------------


def plant_bench(p: BenchPlanting, progress: bool = True) -> dict:
    """Plant `p` into a fresh default model, save it, verify it, save the verification."""
    model = loading.load(loading.CONCEPTWORLD)
    params = dict(model.pipeline.unet.named_parameters())
    snapshot = {n: v.detach().clone() for n, v in params.items()}
    known = [r["concept"] for r in model.planted]
    record = plant_concept(model.pipeline, p.concept, p.spec, known, fraction=p.fraction, progress=progress)
    save_planting(p, model, record, None)
    before = {n: snapshot[n] for n in record.parameters}
    verification = verify_bench(p, model, record, before, progress)
    save_planting(p, model, record, verification)
    return verification


def reverify(p: BenchPlanting, progress: bool = True) -> dict:
    model, _, record, before = _open(p.name)
    verification = verify_bench(p, model, record, before, progress)
    save_planting(p, model, record, verification)
    return verification


def _summary(p: BenchPlanting, v: dict) -> str:
    parts = ", ".join(f"{k} {s['share']:.2f}±{s['se']:.2f}{'' if s['active'] else ' (inactive)'}" for k, s in v["parts"].items())
    cv = "".join(f"; captured {s}: {c['pooled']:.3f}" for s, c in v.get("captured_variance", {}).items())
    return (f"{p.name}: drawn {v['drawn']:.1%} ({'pass' if v['passed_drawn'] else 'FAIL'}), natural max |delta| "
            f"{v['natural_max_abs_delta']:.3f} ({'pass' if v['passed_natural'] else 'FAIL'}); parts: {parts}{cv}")  # fmt: skip


def markdown_table() -> str:
    """One row per stored planting: where, how trained (anchor: `PlantSpec.preserve`), drawn, natural
    change, parts, captured variance."""
    lines = ["| planting | concept | family | sites | units / rank | steps | lr | anchor | s | drawn | natural max abs delta "
             "| share removed per part (± se) | captured variance | split |", "|---" * 14 + "|"]  # fmt: skip
    for p in PLANTINGS:
        path = bench_dir() / p.name / TRUTH
        if not path.exists():
            continue
        d = read_object(path, "bench planting truth")
        r, v, t = d["record"], d["verification"] or {}, d["truth"]
        size = {"lowrank": f"r={p.spec.rank}{' (learned)' if p.spec.learn_basis else ' (random)'}"}.get(
            p.spec.family, f"{p.spec.units} units" if p.spec.units else "all")
        parts = "; ".join(f"{k}: {s['share']:.2f} ± {s['se']:.2f}{'' if s['active'] else ' (inactive)'}"
                          for k, s in v.get("parts", {}).items())  # fmt: skip
        cv = "; ".join(f"{c['pooled']:.3f} (first step {c['first_step']:.3f})" for c in v.get("captured_variance", {}).values())
        drawn_ = f"{v['drawn']:.0%}" if v else "unverified"
        nat = f"{v['natural_max_abs_delta'] * 100:.1f} pts" if v else ""
        lines.append(f"| {p.name} | {p.concept} | {p.spec.family} | {', '.join(t['sites'])} | {size} | {p.spec.steps} | "
                     f"{p.spec.lr:g} | {p.spec.preserve or '-'} | {r['seconds']:.0f} | {drawn_} | {nat} | {parts} | {cv or '-'} | {p.split} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--plant", nargs="?", const="", metavar="NAME", help="plant, save and verify a planting")
    action.add_argument("--verify", nargs="?", const="", metavar="NAME", help="verify a stored planting again")
    action.add_argument("--table", action="store_true", help="print the stored plantings as a markdown table")
    parser.add_argument("--all", action="store_true", help="every planting in order instead of NAME (--plant "
                        "skips stored ones)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.table:
        print(markdown_table())
        return
    name = args.plant if args.plant is not None else args.verify
    if bool(name) == args.all:
        parser.error("give a planting NAME or --all (not both)")
    todo = PLANTINGS if args.all else (planting(name),)
    failed = []
    for p in todo:
        if args.plant is not None and args.all and (bench_dir() / p.name / TRUTH).exists():
            continue
        try:
            v = plant_bench(p) if args.plant is not None else reverify(p)
        except Exception as e:  # with --all, one failure must not cost the plantings after it
            if not args.all:
                raise
            failed.append(p.name)
            print(f"{p.name} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            continue
        print(_summary(p, v), flush=True)
    if failed:
        sys.exit(f"failed: {failed}; a stored planting is verified again with --verify NAME")


if __name__ == "__main__":
    main()
