"""Scoring a patch (an eraser, a merged eraser, a subspace patch) on fixed prompts and seeds:
the concept rate on prompts that ask for the concept, and what is preserved on prompts that do
not (factor accuracy relative to the unpatched model, and the same-seed image distance).

Replicates: evaluation seed s generates image j of a prompt set with seed
`image_seeds("evaluation", n, replicate=s)[j]` = `1000 + s * 100_000 + j` in both the patched and
the unpatched run (`evaluation.core`: disjoint from the fit's seeds, which start at 0, and from the
tau selection's), so every comparison is same-seed and every replicate uses fresh noise. Unpatched
results are cached per seed: a sweep generates them once (per worker, when it runs on an executor:
see `acterase_interp.executor`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch

from ..evaluation.core import image_seeds, preservation
from ..evaluation.prompts import prompts_without, scene_of
from ..executor import Executor, require_spec, resolve, run_cells, worker_local
from ..generation import generate
from ..metrics import Classifier, Rate, concept_rate_from_predictions, factor_accuracy_from_predictions, image_distance
from ..patching import Patch, Window, patched
from ..provenance import library_versions
from ..world.factors import FACTORS, Scene
from .records import Record

DISTANCES = ("mae", "rmse")

__all__ = ["Evaluator", "evaluate_eraser", "patch_info", "prompts_without", "scene_of"]


def _rate_fields(prefix: str, rate: Rate) -> Record:
    return {prefix: rate.value, f"{prefix}_low": rate.ci_low, f"{prefix}_high": rate.ci_high, f"{prefix}_n": rate.n}


def patch_info(patch: Any) -> Record:
    """Provenance of a patch for result rows: its options, fitting seeds and concept(s)."""
    if patch is None:
        return {"options": None, "fit_seeds": None}
    manifest = getattr(patch, "manifest", None) or getattr(patch, "meta", None) or {}
    if "merged_from" in manifest:
        parts = manifest["merged_from"]
        return {"options": [m.get("options") for m in parts], "fit_seeds": [m.get("seeds") for m in parts],
                "concepts": manifest.get("concepts")}  # fmt: skip
    return {"options": manifest.get("options"), "fit_seeds": manifest.get("seeds")}


class Evaluator:
    """Scores patches on one concept's prompts, caching the unpatched run per seed.

    `target_prompts` ask for the concept (the concept rate is the share of their images the
    classifier reads as the concept; lower is better after erasure); `heldout_prompts` are
    paraphrases scored the same way; `non_target_prompts` must keep their content (ConceptWorld
    captions, parsed with `scene_of` unless `non_target_scenes` are given). Either set may be empty.

    `model` and `classifier` may be `Spec`s (built on first use): such an evaluator pickles small
    and runs on an executor's workers, where each process builds one copy with its own cache."""

    def __init__(
        self,
        model: Any,
        classifier: Classifier,
        concept: str | None,
        target_prompts: Sequence[str] = (),
        non_target_prompts: Sequence[str] = (),
        *,
        heldout_prompts: Sequence[str] = (),
        non_target_scenes: Sequence[Scene] | None = None,
        images_per_prompt: int = 1,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        batch_size: int = 64,
        distance: str = "mae",
    ) -> None:
        self._config = {k: v for k, v in locals().items() if k != "self"}  # how a worker rebuilds it
        self._token: str | None = None  # what workers keep it under: set when it first travels
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance {distance!r}; choose from {DISTANCES}")
        if images_per_prompt < 1:
            raise ValueError(f"images_per_prompt must be at least 1, got {images_per_prompt}")
        if (target_prompts or heldout_prompts) and concept is None:
            raise ValueError("target prompts need the concept whose rate they measure")
        if not (target_prompts or heldout_prompts or non_target_prompts):
            raise ValueError("nothing to evaluate: give target, held-out or non-target prompts")
        self._model, self._classifier, self.concept = model, classifier, concept
        self.sets = {
            name: [p for p in prompts for _ in range(images_per_prompt)]
            for name, prompts in (("target", target_prompts), ("heldout", heldout_prompts), ("non_target", non_target_prompts))
        }
        scenes = non_target_scenes if non_target_scenes is not None else [scene_of(p) for p in non_target_prompts]
        if len(scenes) != len(non_target_prompts):
            raise ValueError(f"{len(scenes)} scenes for {len(non_target_prompts)} non-target prompts")
        self.scenes = [s for s in scenes for _ in range(images_per_prompt)]
        self.options = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                        "images_per_prompt": images_per_prompt, "distance": distance}  # fmt: skip
        self.batch_size, self.distance = batch_size, distance
        self._baseline: dict[int, dict[str, Any]] = {}

    @property
    def model(self) -> Any:
        return resolve(self._model)

    @property
    def classifier(self) -> Classifier:
        return resolve(self._classifier)

    @property
    def model_source(self) -> Any:
        """The model as given: a loaded model, or the `Spec` that workers build it from."""
        return self._model

    def require_specs(self) -> None:
        """Clear error unless this evaluator can run on an executor (model and classifier as specs)."""
        require_spec(self._model, "evaluator's model")
        require_spec(self._classifier, "evaluator's classifier")

    def __reduce__(self) -> tuple:
        self.require_specs()
        self._token = self._token or _content_key(self._config)  # equal evaluators share one worker-side cache
        return _worker_evaluator, (self._token, self._config)

    @classmethod
    def from_pairs(cls, model: Any, classifier: Classifier, pairs: Any, **kwargs: Any) -> Evaluator:
        """An evaluator on a `PromptPairs`' targets, held-out paraphrases and non-target prompts."""
        return cls(model, classifier, pairs.concept, pairs.targets, pairs.non_target, heldout_prompts=pairs.heldout, **kwargs)

    def images(
        self, prompts: Sequence[str], seed: int, patch: Patch | None = None, steps: Window | None = None, inject: Any = None
    ) -> torch.Tensor:
        """Images of `prompts` for evaluation seed `seed`, with `patch` on (during `steps`) and
        `inject` (a `generation.TextInjection` or `TextLayerInjection`, one injected prompt per
        prompt) passed to `generate`."""
        extra = {} if inject is None else {"inject": inject}  # generate takes `inject` only with an injection
        with patched(self.model, patch, steps):
            return generate(self.model, list(prompts), seeds=image_seeds("evaluation", len(prompts), replicate=seed),
                            num_inference_steps=self.options["num_inference_steps"],
                            guidance_scale=self.options["guidance_scale"], batch_size=self.batch_size, progress=False,
                            **extra)  # fmt: skip

    def _run(self, seed: int, patch: Patch | None, steps: Window | None, inject: Any = None) -> dict[str, Any]:
        if inject is not None and sum(bool(p) for p in self.sets.values()) != 1:
            raise ValueError("an injection pairs one injected prompt with each prompt: evaluate one prompt set")
        out: dict[str, Any] = {}
        for name, prompts in self.sets.items():
            if prompts:
                images = self.images(prompts, seed, patch, steps, inject)
                out[name] = (images, self.classifier.predict(images))
        return out

    def baseline(self, seed: int) -> dict[str, Any]:
        """The unpatched run of `seed` (images and predictions per prompt set), cached."""
        if seed not in self._baseline:
            self._baseline[seed] = self._run(seed, None, None)
        return self._baseline[seed]

    def evaluate(
        self, patch: Patch | None, seed: int = 0, steps: Window | None = None, *, inject: Any = None, **meta: Any
    ) -> Record:
        """One row (`inject`: see `images`; only for an evaluator of one prompt set): concept rates (`concept_rate`, `heldout_concept_rate`, each with Wilson
        `_low`/`_high`, and the unpatched `baseline_*`), `concept_drop` (baseline minus patched),
        non-target factor accuracies (`non_target_accuracy` = all factors right, and per factor),
        `preservation` (accuracy kept relative to the unpatched run; None when it was 0), `image_distance` (mean
        same-seed distance on non-target images), the seed, window, options and `meta`."""
        base, run = self.baseline(seed), self._run(seed, patch, steps, inject)
        row: Record = {"concept": self.concept, "seed": seed, "steps": list(steps) if steps else None, **meta}
        for name in ("target", "heldout"):
            if name in run:
                prefix = "concept_rate" if name == "target" else "heldout_concept_rate"
                before = concept_rate_from_predictions(base[name][1], self.concept)
                after = concept_rate_from_predictions(run[name][1], self.concept)
                row.update(_rate_fields(prefix, after), **_rate_fields(f"baseline_{prefix}", before))
                row[f"{prefix.replace('rate', 'drop')}"] = before.value - after.value
        if "non_target" in run:
            before = factor_accuracy_from_predictions(base["non_target"][1], self.scenes)
            after = factor_accuracy_from_predictions(run["non_target"][1], self.scenes)
            row.update(_rate_fields("non_target_accuracy", after["all"]))
            row["baseline_non_target_accuracy"] = before["all"].value
            row.update({f"accuracy_{f}": after[f].value for f in FACTORS})
            row["preservation"] = preservation(before["all"], after["all"])  # None when nothing was right before
            dist = image_distance(run["non_target"][0], base["non_target"][0], self.distance)
            row["image_distance"] = float(dist.mean())
        row.update(patch_info(patch), eval_options=dict(self.options), versions=library_versions())
        return row

    __call__ = evaluate


EVALUATORS_KEPT = 4
"""Evaluators (each with its cache of unpatched images) a worker process keeps, most recently used."""


def _content_key(config: dict) -> str:
    """What an evaluator is (prompts, seeds' options, model and classifier specs), as a short hash."""
    text = json.dumps(config, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _worker_evaluator(token: str, config: dict) -> Evaluator:
    """The evaluator `token` as this process keeps it: unpickling it again (or an equal one)
    reuses its baseline cache; at most `EVALUATORS_KEPT` stay per process."""
    return worker_local(("evaluator", token), lambda: Evaluator(**config), keep=EVALUATORS_KEPT)


def evaluate_eraser(
    model: Any,
    eraser: Patch | None,
    classifier: Classifier,
    concept: str,
    target_prompts: Sequence[str],
    non_target_prompts: Sequence[str] = (),
    seeds: Sequence[int] = (0, 1, 2),
    *,
    executor: Executor | None = None,
    progress: bool = True,
    **options: Any,
) -> list[Record]:
    """`Evaluator(...).evaluate(eraser, seed)` for every seed: one row per seed (see `Evaluator`),
    on `executor`'s workers if given (then `model` and `classifier` are `Spec`s)."""
    evaluator = Evaluator(model, classifier, concept, target_prompts, non_target_prompts, **options)
    if executor is not None:
        evaluator.require_specs()
    return run_cells(evaluator, [(eraser, s) for s in seeds], executor, desc="evaluate", progress=progress)
