"""A concept of one's own: plant it from one's own images and captions, then score the localizers
on that model against the planted truth, with one's own reader instead of the benchmark classifier.

    from acterase_interp.bench.leaderboard import markdown_table
    from acterase_interp.bench.own import plant_own, score_own
    from acterase_interp.erase.pairs import PromptPairs
    from acterase_interp.loading import load
    from acterase_interp.plant import PlantSpec

    model = load("conceptworld")
    reader = lambda images: images[:, 0].mean((1, 2)) > 0.6   # images (N, 3, H, W) in [0, 1] -> bool (N,)
    spec = PlantSpec("ffn_units", blocks=("up.0.0",), units=16, steps=800, lr=5e-3)
    record, verification, truth = plant_own(model, images, captions, "blob", spec, reader, targets, sources, others)
    print(markdown_table(score_own(model, truth, reader, PromptPairs("blob", targets, sources))["rows"]))

From the shell, `acterase score --model DIR --concept NAME --reader MODULE:ATTR` scores the planting
that `model.planted` records for the concept (`record_truth`) with a reader imported from a module.

A reader is any callable images -> bool (N,), "does each image show the concept?". Attribution
patching needs the gradient of a concept score, so it runs only for a reader that also has a
differentiable `logit(images) -> (N,)`; `score_own` leaves it out by default otherwise, and refuses
it when asked for. Causal ablation reads sigmoid(logit) where there is one, else the reader's
answers. A reader labels nothing but its concept, so non-target content has no labels to keep:
`preservation` is None and `faithfulness_damage_auc` is n/a; `plant_own` instead reports, on the
non-target prompts, how much the reader's rate and the same-seed images change with the planting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..analysis.evaluation import Evaluator, _rate_fields, patch_info
from ..analysis.records import Record
from ..erase.pairs import PromptPairs
from ..evaluation.core import image_seeds
from ..generation import generate
from ..metrics import Rate, image_distance
from ..patching import Patch, Window
from ..plant import PlantRecord, PlantSpec, plant, trainable_masks
from ..provenance import library_versions
from ..sites import list_sites
from .attribution import concept_logit
from .leaderboard import BenchOptions, score_planting
from .localizers import LOCALIZERS
from .metrics import family_of
from .plantings import _PART_KIND, BenchPlanting, Reader, planting_parts, planting_truth, verify
from .truth import PlantingTruth

ATP = "attribution_patching"


def _answers(out: Any, images: torch.Tensor, what: str) -> torch.Tensor:
    """`out` as a (N,) tensor, one answer per image, or a clear error."""
    out = torch.as_tensor(out)
    if out.shape != (len(images),):
        raise ValueError(f"{what} returned shape {tuple(out.shape)} for {len(images)} images; it must give one "
                         f"answer per image, shape ({len(images)},)")  # fmt: skip
    return out


@dataclass(frozen=True)
class ReaderClassifier:
    """A user's reader where the benchmark expects its classifier (`LocalizationContext`,
    `ReaderEvaluator`): answers checked to be one per image."""

    reader: Reader
    """Images (N, 3, H, W) in [0, 1] -> bool (N,); optionally with a differentiable `logit`."""

    def __post_init__(self) -> None:
        if not callable(self.reader):
            raise TypeError(f"a reader must be callable (images -> bool per image), got {type(self.reader).__name__}")

    @property
    def differentiable(self) -> bool:
        """Whether the reader has a `logit` (what attribution patching differentiates)."""
        return callable(getattr(self.reader, "logit", None))

    def shows(self, images: torch.Tensor) -> torch.Tensor:
        """Bool (N,): does each image show the concept?"""
        return _answers(self.reader(images), images, "the reader").bool().cpu()

    predict = shows  # what `Evaluator` keeps per image

    def logit(self, images: torch.Tensor) -> torch.Tensor:
        """The reader's (N,) logit, differentiable in `images` (attribution patching's score)."""
        if not self.differentiable:
            raise ValueError(f"{ATP} needs the gradient of a concept score: give the reader a differentiable "
                             f"`logit(images) -> (N,)` method, or leave {ATP} out of the localizers")  # fmt: skip
        out = _answers(self.reader.logit(images), images, "the reader's logit")
        if images.requires_grad and not out.requires_grad:
            raise ValueError("the reader's logit is not differentiable in the images (no gradient reaches it)")
        return out

    def probability(self, images: torch.Tensor) -> torch.Tensor:
        """(N,) probability of the concept: sigmoid(logit) where the reader has one, else its answers."""
        if not self.differentiable:
            return self.shows(images).float()
        with torch.no_grad():
            return torch.sigmoid(self.logit(images).float()).cpu()


def as_reader(reader: Reader | ReaderClassifier) -> ReaderClassifier:
    """`reader` wrapped in a `ReaderClassifier` (one is returned as it is)."""
    return reader if isinstance(reader, ReaderClassifier) else ReaderClassifier(reader)


class ReaderEvaluator(Evaluator):
    """`Evaluator` whose concept rate is the share of target images the reader says show the
    concept. A reader labels no other content, so non-target prompts are not generated and
    `preservation` is None (`leaderboard._faithfulness` then gives no damage curve)."""

    def __init__(self, model: Any, classifier: ReaderClassifier, concept: str, target_prompts: Sequence[str],
                 non_target_prompts: Sequence[str] = (), **options: Any) -> None:  # fmt: skip
        super().__init__(model, classifier, concept, target_prompts, **options)

    def evaluate(self, patch: Patch | None, seed: int = 0, steps: Window | None = None, *, inject: Any = None,
                 **meta: Any) -> Record:  # fmt: skip
        """One row (arguments as `Evaluator.evaluate`'s): `concept_rate` (Wilson interval), its
        unpatched `baseline_concept_rate`, `concept_drop`, `preservation` None, the patch's provenance."""
        before = Rate.from_outcomes(self.baseline(seed)["target"][1])
        after = Rate.from_outcomes(self._run(seed, patch, steps, inject)["target"][1])
        return {"concept": self.concept, "seed": seed, "steps": list(steps) if steps else None, **meta,
                **_rate_fields("concept_rate", after), **_rate_fields("baseline_concept_rate", before),
                "concept_drop": before.value - after.value, "preservation": None, **patch_info(patch),
                "eval_options": dict(self.options), "versions": library_versions()}  # fmt: skip

    __call__ = evaluate


def localizers_for(reader: Reader | ReaderClassifier) -> tuple[str, ...]:
    """Every localizer that `reader` supports: all of them, attribution patching only with a `logit`."""
    return tuple(n for n in LOCALIZERS if n != ATP or as_reader(reader).differentiable)


def check_localizers(localizers: Sequence[str], reader: Reader | ReaderClassifier) -> None:
    """A clear error when `localizers` asks for attribution patching and `reader` has no `logit`."""
    if ATP in localizers and not as_reader(reader).differentiable:
        raise ValueError(f"{ATP} needs a reader with a differentiable `logit(images) -> (N,)`; this reader has "
                         f"none: leave {ATP} out of the localizers (`localizers_for(reader)`)")  # fmt: skip


def _check_truth(model: Any, truth: PlantingTruth, families: Sequence[str]) -> None:
    known = {s.name for s in list_sites(model.pipeline.unet)}
    if missing := [s for s in truth.sites if s not in known]:
        raise ValueError(f"the model has no site(s) {missing}: the truth {truth.name!r} is of another model")
    if unfitted := [s for s in truth.sites if family_of(s) not in families]:
        raise ValueError(f"planted site(s) {unfitted} are of kinds outside options.families {tuple(families)}")


def score_own(model: Any, truth: PlantingTruth, reader: Reader | ReaderClassifier, pairs: PromptPairs,
              options: BenchOptions | None = None, progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """`leaderboard.run_planting`'s {"rows", "curves", "planting"} for a user's planted `model`, its
    `truth` (`plant_own`'s) and `reader`: one ActErase fit on all of `pairs` (`options.n_pairs` is
    not used), then every localizer of `options` (default: `localizers_for(reader)`, the others as
    `BenchOptions`' defaults). Rows work with `leaderboard.markdown_table` and `heatmap`."""
    classifier = as_reader(reader)
    options = options or BenchOptions(localizers=localizers_for(classifier))
    check_localizers(options.localizers, classifier)
    if pairs.concept != truth.concept:
        raise ValueError(f"the pairs are of {pairs.concept!r} but the truth plants {truth.concept!r}")
    _check_truth(model, truth, options.families)
    return score_planting(model, truth, classifier, pairs, options, progress, evaluator_class=ReaderEvaluator)


@dataclass(frozen=True)
class ConceptReader:
    """A ConceptWorld classifier read as a reader of one concept: `classifier.shows(images, concept)`,
    with the classifier's concept logit as its differentiable `logit` (`attribution.concept_logit`)."""

    classifier: Any
    concept: str

    def __post_init__(self) -> None:
        if not any(self.concept in values for values in self.classifier.factors.values()):
            raise ValueError(f"the classifier does not read {self.concept!r}; it knows {self.classifier.factors}")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.shows(images, self.concept)

    def logit(self, images: torch.Tensor) -> torch.Tensor:
        return concept_logit(self.classifier, images, self.concept)


def record_truth(model: Any, concept: str, name: str | None = None, split: str = "test") -> PlantingTruth:
    """The truth of the planting of `concept` recorded in `model.planted` (e.g. one `acterase plant`
    wrote), from its `PlantRecord` (`plantings.planting_parts` / `planting_truth`, every part
    counted active: no verification is recorded), named `name` (default `own:<concept>`)."""
    planted = [r.get("concept") for r in model.planted]
    found = [r for r in model.planted if r.get("concept") == concept]
    if not found:
        raise ValueError(f"the model holds no planted {concept!r}; its planted concepts are {planted or 'none'} "
                         f"(plant one with `acterase plant`)")  # fmt: skip
    if len(found) > 1:
        raise ValueError(f"the model holds {len(found)} plantings of {concept!r}; scoring needs one")
    try:
        record = PlantRecord(**found[0])
        spec = PlantSpec(**record.spec)
    except TypeError as err:
        raise ValueError(f"the planted record of {concept!r} is not a PlantRecord of this version: {err}") from None
    if spec.family not in _PART_KIND:
        raise ValueError(f"planted family {spec.family!r} has no truth to score against yet; scoreable families: "
                         f"{sorted(_PART_KIND)}")  # fmt: skip
    return planting_truth(BenchPlanting(name or f"own:{concept}", concept, spec, split), record,
                          planting_parts(record, model.pipeline.unet))  # fmt: skip


def _read(model: Any, prompts: Sequence[str], classifier: ReaderClassifier) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of `prompts` (evaluation seeds, replicate 0) and the reader's answers on them."""
    images = generate(model, list(prompts), seeds=image_seeds("evaluation", len(prompts)), progress=False)
    return images, classifier.shows(images)


def plant_own(model: Any, images: torch.Tensor, captions: list[str], concept: str, spec: PlantSpec,
              reader: Reader | ReaderClassifier, target_prompts: Sequence[str], source_prompts: Sequence[str],
              non_target_prompts: Sequence[str] = (), *, name: str | None = None, split: str = "test",
              replay: torch.Tensor | None = None, progress: bool = True) -> tuple[PlantRecord, dict, PlantingTruth]:  # fmt: skip
    """Plant `concept` into `model` in place (`plant.plant` on `images` (N, 3, H, W) in [-1, 1] and
    their `captions`), verify it with `reader` as `plantings.verify` does (the drawn rate on
    `target_prompts`, each planted part's share removed when restored alone; evaluation seeds), and
    return (record, verification, truth). With `non_target_prompts`, the verification's
    "non_target" holds the reader's rate on them before and after planting and the mean same-seed
    image change (`metrics.image_distance`). The prompts and reader are checked before planting;
    the record joins `model.planted`; the truth is named `name` (default `own:<concept>`). `replay`
    marks the images of what the model already draws (`PlantSpec.preserve` anchors them)."""
    pairs = PromptPairs(concept, target_prompts, source_prompts, non_target=non_target_prompts)  # errors before training
    if split not in ("dev", "test"):
        raise ValueError(f"split must be 'dev' or 'test', got {split!r}")
    classifier = as_reader(reader)
    classifier.shows((images[:2].float() + 1) / 2)  # a reader of the wrong shape fails now, not after planting
    unet = model.pipeline.unet
    params = dict(unet.named_parameters())
    before = {n: params[n].detach().clone() for n in trainable_masks(unet, spec)[0]}
    unplanted = _read(model, pairs.non_target, classifier) if pairs.non_target else None
    record = plant(model.pipeline, images, captions, concept, spec, replay=replay, progress=progress)
    object.__setattr__(model, "planted", [*model.planted, record.to_dict()])  # as `plantings.load_planting` does
    seeds = image_seeds("evaluation", len(pairs))
    verification = verify(model, record, before, classifier.shows, pairs.targets, seeds, progress)
    if unplanted is not None:
        images_after, shown = _read(model, pairs.non_target, classifier)
        verification["non_target"] = {"n": len(shown), "drawn_before": int(unplanted[1].sum()) / len(shown),
                                      "drawn": int(shown.sum()) / len(shown),
                                      "image_distance": float(image_distance(images_after, unplanted[0]).mean())}  # fmt: skip
    truth = planting_truth(BenchPlanting(name or f"own:{concept}", concept, spec, split), record,
                           planting_parts(record, unet), verification["parts"])  # fmt: skip
    return record, verification, truth


__all__ = ["ConceptReader", "ReaderClassifier", "ReaderEvaluator", "as_reader", "localizers_for", "plant_own",
           "record_truth", "score_own"]
