"""The `acterase` command: fit an eraser, generate with it, run the ConceptWorld demo, plant a concept,
or score the localizers on a planted concept with one's own reader.

    acterase fit --model conceptworld --pairs conceptworld_triangle --out runs/triangle
    acterase generate --model conceptworld --prompt "a red triangle" --eraser runs/triangle --compare --out grid.png
    acterase demo --concept heart --out runs/demo
    acterase plant --model DIR --concept heart --family ffn_units --blocks up.0.0 --units 32 --out DIR2
    acterase evaluate --concepts triangle red dots --seeds 0 1 2 --out runs/evaluation
    acterase score --model DIR --concept heart --reader my_reader:reader [--pairs PAIRS.json] --out results/own-heart

Bad input (an unknown concept, site or option, a missing file, an artifact whose files differ from
the sha256 its manifest recorded) prints one line and exits with 2; `acterase demo --strict` exits
with 1 when an erasure bar fails; a run stopped by a dead worker process exits with 3 (run it again
to resume). `--no-verify` loads artifacts without checking their recorded hashes. An option that
several verbs take (--model, --steps, --n-pairs, --seeds, --out, ...) parses the same in each (`SHARED`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .erase.eraser import Eraser
from .erase.fit import EraserFitter
from .erase.options import CFG_ROWS, GRANULARITIES, PAIR_COMBINES, TAU_MODES, TIME_MASKS, VALUE_MODES, EraseOptions
from .erase.pairs import PromptPairs
from .evaluation.baselines import METHODS
from .evaluation.table import TableSpec
from .executor import WorkerLostError
from .generation import generate
from .integrity import UnverifiedArtifactWarning
from .loading import load
from .report import labelled_grid_png
from .plant import PLANT_FAMILIES, PlantSpec
from .sites import SITE_KINDS
from .world.factors import PLANTABLE

USAGE_ERROR = 2
BARS_FAILED = 1
RUN_FAILED = 3
_OPTION_FLAGS = (
    "site_kind", "tau", "tau_mode", "granularity", "time_mask", "cfg_rows", "blocks", "pair_combine", "value_mode",
)  # fmt: skip


def _tau(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"tau must be a number or 'auto', got {text!r}") from None


SHARED: dict[str, dict[str, Any]] = {
    "--model": {"default": "conceptworld",
                "help": "'conceptworld', a local diffusers pipeline folder, or a hub id (default: conceptworld)"},
    "--device": {"default": "cpu", "help": "torch device (default: cpu)"},
    "--steps": {"type": int, "help": "denoising steps (default: the model's)"},
    "--guidance": {"type": float, "help": "classifier-free guidance scale (default: the model's)"},
    "--n-pairs": {"type": int, "help": "prompt pairs to fit on"},
    "--n-images": {"type": int, "help": "images per group"},
    "--seed": {"type": int, "default": 0, "help": "random seed (default: 0)"},
    "--seeds": {"type": int, "nargs": "+", "help": "seeds"},
    "--concept": {"help": "a ConceptWorld shape, color or background"},
    "--tau": {"type": _tau, "help": "importance threshold: a number, or 'auto'"},
    "--blocks": {"nargs": "+", "help": "transformer blocks, by name or prefix (down mid up.1)"},
    "--out": {"help": "where to write the results"},
    "--no-verify": {"action": "store_true", "help": "load erasers, evaluation cells and planted models without "
                    "checking the sha256 their manifests recorded (for files changed on purpose)"},
}  # fmt: skip
"""The one definition (type, meaning, default) of each option that several verbs take; a verb may
set its own default, make it required or say more in its help, never change what it parses."""


def _shared(p: argparse.ArgumentParser, flag: str, *aliases: str, **overrides: Any) -> None:
    """Add the shared option `flag` (also spelled `aliases`) to a verb, with the verb's overrides."""
    p.add_argument(flag, *aliases, **{**SHARED[flag], **overrides})


def _add_model(p: argparse.ArgumentParser) -> None:
    for flag in ("--model", "--device", "--steps", "--guidance", "--no-verify"):
        _shared(p, flag)


def _add_erase_options(p: argparse.ArgumentParser) -> None:
    _shared(p, "--tau", help="importance threshold (fit default: 0.01; demo default: auto, the smallest tau "
            "that erases the concept from the fit pairs' own targets)")  # fmt: skip
    p.add_argument("--tau-mode", choices=TAU_MODES)
    p.add_argument("--site-kind", choices=SITE_KINDS, help="where to patch (default: ffn_hidden)")
    p.add_argument("--granularity", choices=GRANULARITIES)
    p.add_argument("--time-mask", choices=TIME_MASKS)
    p.add_argument("--cfg-rows", choices=CFG_ROWS)
    _shared(p, "--blocks", help="transformer blocks to patch, by name or prefix (down mid up.1)")
    p.add_argument("--pair-combine", choices=PAIR_COMBINES)
    p.add_argument("--value-mode", choices=VALUE_MODES)
    _shared(p, "--seed", help="seed of the first pair's noise (default: 0)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="acterase", description="Training-free concept erasure (ActErase).")
    sub = parser.add_subparsers(dest="command", required=True)
    _fit_parser(sub.add_parser("fit", help="fit an eraser from prompt pairs and save it"))
    _generate_parser(sub.add_parser("generate", help="generate a grid of images, optionally with an eraser"))
    _demo_parser(sub.add_parser("demo", help="erase a ConceptWorld concept and report how well it worked"))
    _evaluate_parser(sub.add_parser("evaluate", help="ActErase beside the baselines on ConceptWorld, with attacks: "
                                    "JSON + markdown"))  # fmt: skip
    _plant_parser(sub.add_parser("plant", help="teach a ConceptWorld model a plantable concept in chosen weights only"))
    _score_parser(sub.add_parser("score", help="score the localizers on a planted concept with your own reader: "
                                 "JSON + markdown"))  # fmt: skip
    return parser


def _fit_parser(fit: argparse.ArgumentParser) -> None:
    _add_model(fit)
    fit.add_argument("--pairs", required=True, help="a name in data/prompts (e.g. nudity) or a JSON file")
    _shared(fit, "--n-pairs", "--max-pairs", help="fit on the first N pairs only (default: all)")
    _add_erase_options(fit)
    _shared(fit, "--out", required=True, help="folder to write the eraser to")


def _generate_parser(gen: argparse.ArgumentParser) -> None:
    _add_model(gen)
    gen.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    _shared(gen, "--seeds", default=[0], help="seeds, one grid column each (default: 0)")
    gen.add_argument("--eraser", help="an eraser folder written by `acterase fit`")
    gen.add_argument("--compare", action="store_true", help="with --eraser: also show the images without it")
    _shared(gen, "--out", required=True, help="PNG file to write")


def _demo_parser(demo: argparse.ArgumentParser) -> None:
    _shared(demo, "--concept", help="a ConceptWorld shape, color or background "
            "(default: heart, planted in 32 FFN units of two blocks)")  # fmt: skip
    demo.add_argument("--beside", help="a natural concept reported beside it under the same recipe and the FFN "
                      "and cross-attention ceilings (default: triangle; none: skip)")
    _shared(demo, "--out", default="runs/demo", help="output folder (default: runs/demo)")
    _shared(demo, "--n-pairs", default=10, help="prompt pairs to fit on (default: 10)")
    demo.add_argument("--anchor", help="one value of the concept's factor that every source prompt uses instead "
                      "(default: cycle through the others)")
    _shared(demo, "--n-images", default=32, help="images per evaluation group (default: 32)")
    _shared(demo, "--model", help="'conceptworld' or a pipeline folder trained by acterase_interp.world.train "
            "(default: conceptworld)")  # fmt: skip
    _shared(demo, "--steps")
    demo.add_argument("--all-units", action="store_true",
                      help="patch every unit of the chosen sites: the ceiling of any --tau")
    demo.add_argument("--strict", action="store_true", help="exit with 1 when a bar fails")
    demo.add_argument("--eraser", choices=("acterase", "gated_kv"), default="acterase",
                      help="acterase (the paper's, default) or gated_kv (the gated subspace eraser at the "
                           "cross-attention keys and values, beyond the paper)")  # fmt: skip
    _add_erase_options(demo)


def _evaluate_parser(ev: argparse.ArgumentParser) -> None:
    _shared(ev, "--model", help="'conceptworld' or a ConceptWorld pipeline folder")
    ev.add_argument("--concepts", nargs="+", default=list(TableSpec.concepts), help="default: triangle red dots")
    ev.add_argument("--methods", nargs="+", default=list(TableSpec.methods), choices=list(METHODS))
    _shared(ev, "--seeds", default=list(TableSpec.seeds), help="default: 0 1 2")
    _shared(ev, "--out", default="runs/evaluation", help="folder for results.json, table.md and cells/ (finished "
            "cells, read back when the same command runs again)")  # fmt: skip
    _shared(ev, "--steps")
    _shared(ev, "--tau", default="auto", help="ActErase's tau (default: auto)")
    _shared(ev, "--n-pairs", default=TableSpec.n_pairs, help=f"default: {TableSpec.n_pairs}")
    _shared(ev, "--n-images", default=TableSpec.n_images, help=f"default: {TableSpec.n_images}")
    for name in ("search_prompts", "search_tokens", "search_iterations", "search_candidates",
                 "inversion_steps", "inversion_batch", "inversion_eval", "esd_steps"):  # fmt: skip
        ev.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(TableSpec, name),
                        help=f"default: {getattr(TableSpec, name)}")
    ev.add_argument("--prune-top-fraction", type=float, default=TableSpec.prune_top_fraction)
    ev.add_argument("--workers", type=int, default=0,
                    help="run (concept, seed) cells on this many one-thread worker processes (default: 0, here)")
    _shared(ev, "--no-verify")


def _plant_parser(plant: argparse.ArgumentParser) -> None:
    _shared(plant, "--model", required=True, help="a ConceptWorld pipeline folder (or conceptworld)")
    _shared(plant, "--out", required=True, help="folder to write the planted pipeline to")
    _shared(plant, "--concept", help=f"a plantable value: {', '.join(v for vs in PLANTABLE.values() for v in vs)}")
    plant.add_argument("--shipped", action="store_true", help="plant the default model's three concepts instead")
    plant.add_argument("--family", choices=PLANT_FAMILIES, default="ffn", help="which weights train (default: ffn)")
    _shared(plant, "--blocks", help="transformer blocks (default: all)")
    plant.add_argument("--units", type=int, help="ffn_units and split: hidden units per block")
    plant.add_argument("--rank", type=int, help="lowrank: dimension of the rotated subspace each block's update writes")
    plant.add_argument("--kv-blocks", nargs="+", help="split: blocks whose cross-attention K/V train with the units")
    plant.add_argument("--learn-basis", action="store_true", help="lowrank: train the subspace's directions too "
                       "(from a random basis; the truth is the trained span)")  # fmt: skip
    plant.add_argument("--preserve", type=float, default=0.0, help="weight of an anchor keeping the replay images' "
                       "predictions at the unplanted model's, against drift (default: 0, none)")  # fmt: skip
    plant.add_argument("--steps", type=int, default=600, help="training steps (default: 600), not denoising steps")
    plant.add_argument("--lr", type=float, default=5e-4)
    plant.add_argument("--batch", type=int, default=64)
    _shared(plant, "--n-images", default=6000, help="training images (default: 6000, 1/6 of them new)")
    _shared(plant, "--seed")
    _shared(plant, "--no-verify")


def _score_parser(score: argparse.ArgumentParser) -> None:
    _shared(score, "--model", required=True, help="a planted pipeline folder (`acterase plant`), or conceptworld")
    _shared(score, "--concept", required=True, help="the planted concept to score (one of the model's planted.json)")
    score.add_argument("--reader", required=True, metavar="MODULE:ATTR",
                       help="your reader: the attribute ATTR of the module MODULE (a dotted path, importable from "
                            "the current folder), a callable images (N, 3, H, W) in [0, 1] -> bool (N,), optionally "
                            "with a differentiable .logit(images) -> (N,) (needed by attribution_patching); or "
                            "conceptworld / bench: that ConceptWorld classifier read as a reader of the "
                            "concept")  # fmt: skip
    score.add_argument("--pairs", help='a JSON file {"targets": [...], "sources": [...], "non_target": [...]} '
                       "(default, for a ConceptWorld value only: conceptworld_pairs of the concept)")  # fmt: skip
    _shared(score, "--n-pairs", help="prompt pairs to fit and score on (default: 10 ConceptWorld pairs, or every "
            "pair of --pairs)")  # fmt: skip
    score.add_argument("--localizers", nargs="+", help="localizers to score (default: every one the reader supports)")
    _shared(score, "--seeds", default=[0], help="evaluation replicates (default: 0)")
    _shared(score, "--steps")
    score.add_argument("--grid", type=int, nargs="+", help="faithfulness curve: numbers of top units patched, "
                       "increasing from 0 (default: 0 1 2 4 ... 256)")  # fmt: skip
    _shared(score, "--out", help="folder for results.json and table.md (default: results/own-<concept>)")
    _shared(score, "--device")
    _shared(score, "--no-verify")


def _given_options(args: argparse.Namespace) -> dict:
    """The `EraseOptions` fields set on the command line."""
    return {k: getattr(args, k) for k in _OPTION_FLAGS if getattr(args, k) is not None}


def _options(args: argparse.Namespace) -> EraseOptions:
    if args.tau == "auto":
        raise ValueError("--tau auto needs a concept classifier to judge the fit targets: use it with `acterase demo`")
    return EraseOptions(num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                        **_given_options(args))  # fmt: skip


def _fit(args: argparse.Namespace) -> None:
    options = _options(args)  # bad input fails before the model loads
    pairs = PromptPairs.load(args.pairs)
    if args.n_pairs is not None:
        if args.n_pairs < 1:
            raise ValueError(f"--n-pairs must be at least 1, got {args.n_pairs}")
        pairs = replace(pairs, targets=pairs.targets[: args.n_pairs], sources=pairs.sources[: args.n_pairs])
    model = load(args.model, device=args.device, verify=not args.no_verify)
    start = time.perf_counter()
    fitter = EraserFitter(model, options)
    eraser = fitter.fit(pairs)
    fit_s = time.perf_counter() - start
    eraser.save(args.out, statistics=fitter.statistics)
    for site, density in eraser.mask_density().items():
        print(f"{site}\t{density:.4f}")
    print(f"fitted {len(pairs)} pairs of {pairs.concept!r} in {fit_s:.1f} s; eraser written to {args.out}")


def _generate(args: argparse.Namespace) -> None:
    if args.compare and not args.eraser:
        raise ValueError("--compare needs --eraser")
    verify = not args.no_verify
    eraser = Eraser.load(args.eraser, verify=verify) if args.eraser else None  # bad input fails before the model loads
    model = load(args.model, device=args.device, verify=verify)
    if eraser is not None:
        eraser.check_model(model)
        eraser = eraser.to(model.pipeline.device)
    prompts = [p for p in args.prompt for _ in args.seeds]
    seeds = [s for _ in args.prompt for s in args.seeds]

    def run() -> torch.Tensor:
        return generate(model, prompts, seeds=seeds, num_inference_steps=args.steps, guidance_scale=args.guidance)

    rows, labels = [], []
    if eraser is None or args.compare:
        rows.append(run())
        labels += [f"{p} (seed {s})" for p, s in zip(prompts, seeds)]
    if eraser is not None:
        with eraser.applied(model):
            rows.append(run())
        labels += [f"erased: {p} (seed {s})" for p, s in zip(prompts, seeds)]
    images = torch.cat(rows)
    path = labelled_grid_png(images, labels, args.out, rows=len(images) // len(args.seeds))
    print(f"wrote {len(images)} images to {path}")


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo  # the demo pulls in the classifier and report code only when asked for

    chosen = {"concept": args.concept} if args.concept else {}
    if args.beside:
        chosen["beside"] = None if args.beside.lower() == "none" else args.beside
    result = run_demo(**chosen, out_dir=args.out, model=args.model, n_pairs=args.n_pairs,
                      anchor=args.anchor, all_units=args.all_units, n_images=args.n_images, seed=args.seed,
                      num_inference_steps=args.steps, eraser=args.eraser, **_given_options(args))  # fmt: skip
    print("all bars passed" if result["passed"] else "some bars failed")
    return BARS_FAILED if args.strict and not result["passed"] else 0


def _evaluate(args: argparse.Namespace) -> None:
    from .evaluation.table import command_line, markdown, run_table
    from .executor import Spec, one_thread_processes
    from .io import atomic_write_json, atomic_write_text
    from .loading import CONCEPTWORLD, load_classifier

    names = ("n_pairs", "n_images", "search_prompts", "search_tokens", "search_iterations", "search_candidates",
             "inversion_steps", "inversion_batch", "inversion_eval", "esd_steps", "prune_top_fraction")
    spec = TableSpec(concepts=tuple(args.concepts), methods=tuple(args.methods), seeds=tuple(args.seeds),
                     num_inference_steps=args.steps, tau=args.tau, **{n: getattr(args, n) for n in names})  # fmt: skip
    if args.workers < 0:
        raise ValueError(f"--workers must be 0 or more, got {args.workers}")
    model = Spec.of(load, args.model, **({"verify": False} if args.no_verify else {}))
    classifier = Spec.of(load_classifier, CONCEPTWORLD)
    out = Path(args.out)
    checkpoints = out / "cells"  # each finished (concept, seed) lands here: a stopped run resumes
    verify = not args.no_verify
    if args.workers:
        with one_thread_processes(args.workers) as pool:
            result = run_table(model, classifier, spec, executor=pool, checkpoints=checkpoints, verify=verify)
    else:
        result = run_table(model, classifier, spec, checkpoints=checkpoints, verify=verify)
    result["manifest"]["command"] = command_line(spec, args.model) + (f" --workers {args.workers}" if args.workers else "")
    atomic_write_json(result, out / "results.json")
    table = markdown(result)
    atomic_write_text(table, out / "table.md")
    print(table)
    print(f"wrote {out / 'results.json'} and {out / 'table.md'}")


def _plant(args: argparse.Namespace) -> None:
    from .world.architecture import save_world
    from .world.planting import check_plantable, plant_concept, plant_shipped

    if args.shipped == bool(args.concept):
        raise ValueError("give either --concept or --shipped")
    if args.concept:
        check_plantable(args.concept)  # before the model loads
    spec = None if args.shipped else PlantSpec(args.family, tuple(args.blocks) if args.blocks else None, args.units,
                                                args.steps, args.lr, args.batch, args.seed, rank=args.rank,
                                                kv_blocks=tuple(args.kv_blocks) if args.kv_blocks else None,
                                                learn_basis=args.learn_basis, preserve=args.preserve)  # fmt: skip
    model = load(args.model, verify=not args.no_verify)
    if spec is None:
        records = plant_shipped(model)
    else:
        known = [r["concept"] for r in model.planted]
        records = [plant_concept(model.pipeline, args.concept, spec, known, args.n_images)]
        model.planted.append(records[0].to_dict())
    save_world(model.pipeline, args.out, model.planted)
    for r in records:
        print(f"planted {r.concept!r} in {r.spec['family']} of {', '.join(r.blocks)}: {r.trained_values} weights "
              f"trained, all others bit-identical, {r.seconds:.0f} s")
    print(f"wrote {args.out}")


CLASSIFIER_READERS = ("conceptworld", "bench")
"""`--reader` values that read the concept with a ConceptWorld classifier instead of a user's module."""


def _import_reader(spec: str) -> Any:
    """The reader named `spec`, MODULE:ATTR (ATTR may be dotted), imported with the current folder
    first on sys.path; a clear ValueError for a bad spec or a missing module or attribute, a
    TypeError for an attribute that is not a reader."""
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name.strip() or not attr.strip():
        raise ValueError(f"--reader must be MODULE:ATTR (e.g. my_reader:reader) or one of {CLASSIFIER_READERS}, "
                         f"got {spec!r}")  # fmt: skip
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()  # a module written since the last import is found
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise ValueError(f"--reader {spec}: no module named {module_name!r} importable from {cwd} or the "
                             f"installed packages") from None  # fmt: skip
        raise ValueError(f"--reader {spec}: importing {module_name!r} failed: {err}") from err
    except Exception as err:  # the user's module raised while importing: one line, not a traceback
        raise ValueError(f"--reader {spec}: importing {module_name!r} failed: {type(err).__name__}: {err}") from err
    finally:
        if added:
            sys.path.remove(cwd)
    reader = module
    for part in attr.split("."):
        if not hasattr(reader, part):
            raise ValueError(f"--reader {spec}: module {module_name!r} ({getattr(module, '__file__', None)}) has no "
                             f"attribute {attr!r}")  # fmt: skip
        reader = getattr(reader, part)
    if isinstance(reader, type):
        raise TypeError(f"--reader {spec} is a class; name an instance of it (e.g. `reader = {reader.__name__}()` in "
                        f"{module_name})")  # fmt: skip
    if not callable(reader):
        raise TypeError(f"--reader {spec} is a {type(reader).__name__}, not a reader: it must be callable, "
                        "images (N, 3, H, W) in [0, 1] -> bool (N,)")  # fmt: skip
    return reader


def _score_reader(spec: str, concept: str, device: str) -> Any:
    """The reader of `--reader`: a user's module attribute, or a ConceptWorld classifier of the concept."""
    if spec not in CLASSIFIER_READERS:
        return _import_reader(spec)
    from .bench.own import ConceptReader
    from .loading import BENCH, CONCEPTWORLD, load_classifier

    return ConceptReader(load_classifier(CONCEPTWORLD if spec == "conceptworld" else BENCH, device=device), concept)


def _score_pairs(args: argparse.Namespace) -> PromptPairs:
    """The pairs of `--pairs` (a JSON file), else ConceptWorld pairs of the concept; `--n-pairs` of them."""
    from .integrity import ArtifactError, read_object
    from .world.concept import as_concept
    from .world.pairs import conceptworld_pairs

    if args.n_pairs is not None and args.n_pairs < 1:
        raise ValueError(f"--n-pairs must be at least 1, got {args.n_pairs}")
    if args.pairs is None:
        try:
            as_concept(args.concept)
        except ValueError:
            raise ValueError(f"{args.concept!r} is not a ConceptWorld value, so there are no default prompt pairs: "
                             'give --pairs PAIRS.json, {"targets": [...], "sources": [...], '
                             '"non_target": [...]}') from None  # fmt: skip
        return conceptworld_pairs(args.concept, n=args.n_pairs or 10, seed=0)
    path = Path(args.pairs).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no prompt pairs file at {path}")
    data = read_object(path, 'prompt pairs: {"targets": [...], "sources": [...], "non_target": [...]}')
    if data.setdefault("concept", args.concept) != args.concept:
        raise ValueError(f"{path} holds pairs of {data['concept']!r}, not of --concept {args.concept!r}")
    try:
        pairs = PromptPairs.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ArtifactError(f"{path}: {err}") from err
    if args.n_pairs is not None:
        if args.n_pairs > len(pairs):
            raise ValueError(f"--n-pairs {args.n_pairs}, but {path} holds only {len(pairs)} pairs")
        pairs = replace(pairs, targets=pairs.targets[: args.n_pairs], sources=pairs.sources[: args.n_pairs])
    return pairs


def _score_command(args: argparse.Namespace, out: Path) -> str:
    """The command line that runs this score again (every option spelled out)."""
    parts = ["acterase", "score", "--model", args.model, "--concept", args.concept, "--reader", args.reader]
    if args.pairs:
        parts += ["--pairs", args.pairs]
    if args.n_pairs is not None:
        parts += ["--n-pairs", str(args.n_pairs)]
    if args.localizers:
        parts += ["--localizers", *args.localizers]
    parts += ["--seeds", *map(str, args.seeds)]
    if args.steps is not None:
        parts += ["--steps", str(args.steps)]
    if args.grid:
        parts += ["--grid", *map(str, args.grid)]
    parts += ["--out", str(out)]
    if args.device != SHARED["--device"]["default"]:
        parts += ["--device", args.device]
    return shlex.join(parts + (["--no-verify"] if args.no_verify else []))


def _reader_source(spec: str) -> dict[str, Any] | None:
    """The file and sha256 of a `--reader` module (None for a classifier reader or a module without a file)."""
    from .integrity import sha256_file

    module = sys.modules.get(spec.partition(":")[0]) if spec not in CLASSIFIER_READERS else None
    file = getattr(module, "__file__", None)
    return {"file": str(Path(file).resolve()), "sha256": sha256_file(file)} if file and Path(file).is_file() else None


def _score(args: argparse.Namespace) -> None:
    from .bench.leaderboard import BenchOptions, manifest, markdown_table
    from .bench.own import check_localizers, localizers_for, record_truth, score_own
    from .io import atomic_write_json, atomic_write_text

    # bad input fails before the model loads: the reader, the pairs, the options
    reader = _score_reader(args.reader, args.concept, args.device)
    supported = localizers_for(reader)
    pairs = _score_pairs(args)
    if args.grid and (len(args.grid) < 2 or args.grid[0] != 0 or any(b <= a for a, b in zip(args.grid, args.grid[1:]))):
        raise ValueError(f"--grid must increase from 0 with at least two points (e.g. 0 1 4 16), got {args.grid}")
    grid = {"faithfulness_grid": tuple(args.grid)} if args.grid else {}
    options = BenchOptions(n_pairs=len(pairs), seeds=tuple(args.seeds), num_inference_steps=args.steps,
                           localizers=tuple(args.localizers or supported), **grid)  # fmt: skip
    check_localizers(options.localizers, reader)
    out = Path(args.out) if args.out else Path("results") / f"own-{args.concept.replace('/', '_').replace(os.sep, '_')}"
    model = load(args.model, device=args.device, verify=not args.no_verify)
    truth = record_truth(model, args.concept)
    result = score_own(model, truth, reader, pairs, options)
    result["manifest"] = manifest(options, _score_command(args, out), model=args.model, concept=args.concept,
                                  reader=args.reader, reader_source=_reader_source(args.reader), pairs=pairs.to_dict())  # fmt: skip
    table = markdown_table(result["rows"])
    atomic_write_json(result, out / "results.json")
    atomic_write_text(table, out / "table.md")
    print(table)
    print(f"wrote {out / 'results.json'} and {out / 'table.md'}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 on success, 1 when `demo --strict` fails a
    bar, 2 on bad input, 3 when a worker process died)."""
    args = _parser().parse_args(argv)
    try:
        commands = {"fit": _fit, "generate": _generate, "demo": _demo, "evaluate": _evaluate, "plant": _plant,
                    "score": _score}  # fmt: skip
        with warnings.catch_warnings():
            warnings.showwarning = _notice(args.command, warnings.showwarning)
            status = commands[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError) as err:
        print(f"acterase {args.command}: error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except WorkerLostError as err:
        print(f"acterase {args.command}: error: {err}", file=sys.stderr)
        return RUN_FAILED
    return status or 0


def _notice(command: str, show: Any) -> Any:
    """`warnings.showwarning` that prints an unverified artifact's notice as one line."""

    def notice(message: Warning | str, category: type[Warning], *rest: Any, **kwargs: Any) -> None:
        if issubclass(category, UnverifiedArtifactWarning):
            print(f"acterase {command}: notice: {message}", file=sys.stderr)
        else:
            show(message, category, *rest, **kwargs)

    return notice


if __name__ == "__main__":
    sys.exit(main())
