"""The ConceptWorld quality bar: does the model draw what its captions say?

    python -m acterase_interp.world.quality [--n 200] [--seed 0] [--steps 20] [--guidance 3.0]

Draws `n` random scenes, generates each from its canonical caption and from a held-out
paraphrase with the same image seed, reads the images with the bundled concept classifier, and
checks the accuracies against the bars below. Erasure results on ConceptWorld only mean something
on a model that passes them. Writes the result as JSON (default: data/conceptworld/quality.json;
`--model DIR`: DIR/quality.json).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from nnsight import DiffusionModel

from .. import loading
from ..generation import generate
from ..io import atomic_write_json
from ..evaluation.core import Bar, format_bars
from ..metrics import Classifier, Rate, factor_accuracy
from ..provenance import library_versions
from ..report import labelled_grid_png
from .captions import TEMPLATES, canonical, paraphrase, zero_shot
from .concept import Concept, as_concept
from .factors import Scene, sample_scenes

BARS: dict[str, float] = {"shape": 0.95, "color": 0.95, "background": 0.90, "all": 0.85}
"""Lowest accepted accuracy per column, on canonical captions (point estimates)."""
PLANTED_BAR = 0.90
"""Lowest accepted rate at which a planted concept's prompts show it."""
PARAPHRASE_GAP = 0.05
"""Largest accepted drop of "all three" accuracy from canonical captions to held-out paraphrases."""
COLUMNS: tuple[str, ...] = ("shape", "color", "background", "all")
_TITLES = {"shape": "shape", "color": "color", "background": "background", "all": "all three"}


def quality_prompts(
    n: int, seed: int, all_templates: bool = False
) -> tuple[list[Scene], dict[str, list[str]], list[int]]:
    """The evaluation set: `n` scenes drawn with `numpy.random.default_rng(seed)`, the prompts of
    each row ("canonical" = template 0, "paraphrase" = held-out paraphrase, "zero-shot" = words and
    templates never trained on (reported, no bar), and with
    `all_templates` "template k" for the other canonical templates), and one image seed per scene,
    shared by every row so rows differ only in their wording."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(n, rng)
    rows = {"canonical": [canonical(s) for s in scenes], "paraphrase": [paraphrase(s, rng) for s in scenes]}
    zero_rng = np.random.default_rng([seed, 1])  # its own stream: the image seeds stay as they were
    rows["zero-shot"] = [zero_shot(s, zero_rng) for s in scenes]
    if all_templates:
        rows.update({f"template {t}": [canonical(s, t) for s in scenes] for t in range(1, len(TEMPLATES))})
    image_seeds = rng.integers(0, 2**31 - 1, size=n).tolist()
    return scenes, rows, image_seeds


def planted_prompts(
    concepts: Sequence[str | Concept], n: int, seed: int
) -> dict[str, tuple[list[Scene], list[str], list[int]]]:
    """Per planted concept (keyed by its value): `n` scenes showing it (other factors natural, at
    random), their canonical captions in random templates, and image seeds."""
    out = {}
    for i, concept in enumerate(map(as_concept, concepts)):
        rng = np.random.default_rng([seed, i])
        scenes = [concept.replace_in(s) for s in sample_scenes(n, rng)]
        prompts = [canonical(s, int(rng.integers(len(TEMPLATES)))) for s in scenes]
        out[concept.value] = (scenes, prompts, rng.integers(0, 2**31 - 1, size=n).tolist())
    return out


def _bars(rates: dict[str, dict[str, Rate]], planted: Sequence[Concept] = ()) -> list[Bar]:
    """One bar per check: canonical accuracies must reach their thresholds; the drop of "all
    three" accuracy from canonical captions to paraphrases must not exceed `PARAPHRASE_GAP`; each
    `planted` concept must be drawn in its row ("planted <value>")."""
    canon = rates["canonical"]
    bars = [Bar.check(f"canonical {_TITLES[c]} accuracy", canon[c].value, ">=", t) for c, t in BARS.items()]
    drop = canon["all"].value - rates["paraphrase"]["all"].value
    bars.append(Bar.check("all-three accuracy drop, canonical to paraphrase", drop, "<=", PARAPHRASE_GAP))
    for concept in dict.fromkeys(planted):  # a concept planted twice has one row
        drawn = rates[f"planted {concept}"][concept.factor].value
        bars.append(Bar.check(f"planted {concept.value!r} drawn", drawn, ">=", PLANTED_BAR))
    return bars


def _evaluate(
    model: DiffusionModel,
    classifier: Classifier,
    n: int,
    seed: int,
    steps: int | None,
    guidance: float | None,
    all_templates: bool,
    progress: bool,
    n_planted: int = 50,
) -> tuple[dict, dict[str, torch.Tensor]]:
    steps = model.defaults.num_inference_steps if steps is None else steps
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    guidance = model.defaults.guidance_scale if guidance is None else guidance
    scenes, prompts, image_seeds = quality_prompts(n, seed, all_templates)
    concepts = [as_concept(r["concept"]) for r in model.planted]
    planted = planted_prompts(concepts, n_planted, seed)
    row_scenes = {row: scenes for row in prompts}
    row_seeds = {row: image_seeds for row in prompts}
    for concept, (p_scenes, p_prompts, p_seeds) in planted.items():
        row = f"planted {concept}"
        prompts[row], row_scenes[row], row_seeds[row] = p_prompts, p_scenes, p_seeds
    start = time.perf_counter()
    images = generate(
        model,
        [p for row in prompts.values() for p in row],
        seeds=[s for row in prompts for s in row_seeds[row]],
        num_inference_steps=steps,
        guidance_scale=guidance,
        progress=progress,
    )
    seconds = time.perf_counter() - start
    by_row = dict(zip(prompts, images.split([len(p) for p in prompts.values()])))
    rates = {row: factor_accuracy(classifier, imgs, row_scenes[row]) for row, imgs in by_row.items()}
    bars = _bars(rates, concepts)
    result = {
        "rows": {row: {col: r[col].to_dict() for col in COLUMNS} for row, r in rates.items()},
        "bars": [b.to_dict() for b in bars],
        "passed": all(b.passed for b in bars),
        "options": {"n": n, "n_planted": n_planted, "seed": seed, "steps": steps, "guidance": guidance,
                    "all_templates": all_templates},
        "image_seeds": row_seeds,
        "scenes": {row: [[s.shape, s.color, s.background] for s in sc] for row, sc in row_scenes.items()},
        "planted": model.planted,
        "prompts": prompts,
        "generation_seconds": seconds,
        "model_architecture": loading.architecture_hash(model.pipeline),
        "versions": library_versions(),
    }
    return result, by_row


def evaluate_quality(
    model: DiffusionModel,
    classifier: Classifier,
    n: int = 200,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    *,
    all_templates: bool = False,
    n_planted: int = 50,
    progress: bool = True,
) -> dict:
    """Accuracy of `model`'s images as read by `classifier`, per row of prompts (see
    `quality_prompts`, plus "planted <concept>" rows of `n_planted` prompts per planted concept of
    the model) and column ("shape", "color", "background", "all"), with the bars.
    `steps` and `guidance` default to the model's own defaults.

    Returns a JSON-ready dict: "rows" (row -> column -> Rate fields), "bars" (`Bar` dicts: name, value,
    threshold, direction, passed), "passed", "options", "image_seeds", "scenes", "prompts", "generation_seconds",
    "model_architecture", "versions"."""
    return _evaluate(model, classifier, n, seed, steps, guidance, all_templates, progress, n_planted)[0]


def markdown_table(result: dict) -> str:
    """The rates of an `evaluate_quality` result as a markdown table, then the bars."""
    lines = ["| prompts | " + " | ".join(_TITLES[c] for c in COLUMNS) + " |"]
    lines.append("|---" * (len(COLUMNS) + 1) + "|")
    for row, cols in result["rows"].items():
        lines.append(f"| {row} | " + " | ".join(str(Rate(**cols[c])) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n\n" + format_bars(result["bars"], bullet="- ")


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="number of random scenes (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scenes, paraphrases and image seeds")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's, 20)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's, 3.0)")
    parser.add_argument("--all-templates", action="store_true", help="also evaluate canonical templates 1-3")
    parser.add_argument("--n-planted", type=int, default=50, help="prompts per planted concept (default 50)")
    parser.add_argument("--model", default="conceptworld", help="'conceptworld' or a pipeline folder trained by "
                        "acterase_interp.world.train (default: conceptworld)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: quality.json in "
                        "data/conceptworld, or in the --model folder)")
    parser.add_argument("--grid", type=Path, default=None, help="also write a PNG of the first 16 images per row")
    args = parser.parse_args(argv)

    model = loading.load(args.model, device=args.device)
    world = args.model if args.model in loading.WORLDS else loading.CONCEPTWORLD  # v2's classifier reads every value
    classifier = loading.load_classifier(world, device=args.device)
    options = (args.n, args.seed, args.steps, args.guidance, args.all_templates)
    result, images = _evaluate(model, classifier, *options, progress=True, n_planted=args.n_planted)
    print(markdown_table(result))
    print(f"\n{'PASS' if result['passed'] else 'FAIL'}; generation took {result['generation_seconds']:.1f} s")
    shipped = args.model in loading.WORLDS
    out = args.out or (loading.conceptworld_dir(args.model) if shipped else Path(args.model)) / "quality.json"
    atomic_write_json(result, out)
    print(f"wrote {out}")
    if args.grid:
        k = min(16, args.n)
        labels = [p for row in result["prompts"].values() for p in row[:k]]
        labelled_grid_png(torch.cat([imgs[:k] for imgs in images.values()]), labels, args.grid, rows=len(images))
        print(f"wrote {args.grid}")
    return result


if __name__ == "__main__":
    main()
