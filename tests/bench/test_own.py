"""A concept of one's own: the reader adapter, planting with verification by the reader, and the
localizer scoring of a user's planted model with a reader instead of the benchmark classifier."""

from __future__ import annotations


import pytest
import torch

import acterase_interp.bench.localizers as localizers
from acterase_interp.bench import own
from acterase_interp.bench import plantings as bp
from acterase_interp.bench.attribution import attribution_patching, concept_logit
from acterase_interp.bench.leaderboard import BenchOptions, markdown_table
from acterase_interp.bench.localizers import LocalizationContext, concept_probability
from acterase_interp.bench.own import ReaderClassifier, localizers_for, plant_own, score_own
from acterase_interp.bench.truth import PlantingTruth
from acterase_interp.erase.pairs import PromptPairs
from acterase_interp.evaluation.core import image_seeds
from acterase_interp.generation import generate
from acterase_interp.loading import load
from acterase_interp.plant import PlantSpec, plant, trainable_masks
from tests.bench.test_attribution import PAIRS, SETTINGS, SITE, _Classifier, _Pipe

TARGETS = ("a red blob on a plain background", "a blue blob on dots")
SOURCES = ("a red circle on a plain background", "a blue circle on dots")
OTHERS = ("a green square on stripes", "a yellow star on a plain background")
SPEC = PlantSpec("ffn_units", blocks=("mid.0", "up.0.0"), units=3, steps=2, batch=4, lr=1e-2, seed=1)


def bright(images: torch.Tensor) -> torch.Tensor:
    """A reader without a logit: is the image brighter than mid-grey?"""
    return images.mean(dim=(1, 2, 3)) > 0.5


class Redness:
    """A reader with a differentiable logit: how much redder than blue the image is."""

    def logit(self, images: torch.Tensor) -> torch.Tensor:
        return 20 * (images[:, 0] - images[:, 2]).mean(dim=(1, 2))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.logit(images) > 0


class Detached(Redness):
    """A reader whose logit carries no gradient."""

    def logit(self, images: torch.Tensor) -> torch.Tensor:
        return super().logit(images).detach()


class ClassifierReader:
    """A reader whose logit is a ConceptWorld classifier's concept logit for "heart"."""

    def __init__(self, classifier: torch.nn.Module) -> None:
        self.classifier = classifier

    def logit(self, images: torch.Tensor) -> torch.Tensor:
        return concept_logit(self.classifier, images, "heart")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.logit(images) > 0


@pytest.fixture(scope="module")
def world():
    """A private default model (the session's shared one stays untouched)."""
    return load("conceptworld")


@pytest.fixture
def model(world):
    """The private model, its weights and planted records put back after the test."""
    snap = {n: p.detach().clone() for n, p in world.pipeline.unet.named_parameters()}
    planted = world.planted
    yield world
    with torch.no_grad():
        for n, p in world.pipeline.unet.named_parameters():
            p.copy_(snap[n])
    object.__setattr__(world, "planted", planted)


def _own_images(n: int = 8) -> tuple[torch.Tensor, list[str]]:
    """Images of a concept ConceptWorld never drew (blobs of noise), in [-1, 1], with captions."""
    images = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return images, [TARGETS[i % 2] for i in range(n)]


# -- the reader adapter ---------------------------------------------------------------------------


def test_the_adapter_answers_as_the_reader_does():
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    plain, red = ReaderClassifier(bright), ReaderClassifier(Redness())
    assert plain.shows(images).tolist() == bright(images).tolist() and plain.predict(images).dtype == torch.bool
    torch.testing.assert_close(plain.probability(images), bright(images).float())
    assert 0 < int(bright(images).sum()) < 6  # a rate strictly between 0 and 1: the comparisons can fail
    torch.testing.assert_close(red.probability(images), torch.sigmoid(Redness().logit(images)))
    torch.testing.assert_close(concept_logit(red, images, "blob"), Redness().logit(images))
    assert not plain.differentiable and red.differentiable


def test_the_adapter_rejects_readers_of_the_wrong_shape():
    images = torch.rand(4, 3, 8, 8)
    with pytest.raises(ValueError, match=r"shape \(4, 1\) for 4 images"):
        ReaderClassifier(lambda im: torch.ones(len(im), 1, dtype=torch.bool)).shows(images)
    with pytest.raises(ValueError, match="one answer per image"):
        ReaderClassifier(lambda im: True).shows(images)
    with pytest.raises(TypeError, match="must be callable"):
        ReaderClassifier("blob")


def test_concept_probability_reads_the_reader(monkeypatch):
    """Causal ablation's concept probability: the reader's rate, or its mean sigmoid(logit)."""
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(localizers, "generate", lambda *a, **k: images)
    pairs = PromptPairs("blob", TARGETS, SOURCES)
    for reader, expected in ((bright, bright(images).float().mean()), (Redness(), torch.sigmoid(Redness().logit(images)).mean())):
        context = LocalizationContext(torch.nn.Identity(), ReaderClassifier(reader), "blob", pairs, {},
                                      num_inference_steps=2, progress=False)  # fmt: skip
        assert concept_probability(context, None, 0) == pytest.approx(float(expected))


# -- attribution patching needs a logit -------------------------------------------------------------


def test_attribution_patching_is_refused_without_a_logit():
    images = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="differentiable `logit"):
        concept_logit(ReaderClassifier(bright), images, "blob")
    with pytest.raises(ValueError, match="not differentiable"):
        ReaderClassifier(Detached()).logit(images.clone().requires_grad_())
    assert "attribution_patching" not in localizers_for(bright) and "zscore" in localizers_for(bright)
    assert "attribution_patching" in localizers_for(Redness())
    truth = PlantingTruth("own:blob", "blob", "ffn_units", "test", ("mid.0.ffn_hidden",))
    with pytest.raises(ValueError, match="attribution_patching needs a reader with a differentiable"):
        score_own(None, truth, bright, PromptPairs("blob", TARGETS, SOURCES), BenchOptions())  # refused before any work


def test_attribution_patching_with_a_reader_logit_equals_the_classifiers():
    """On the linear toy pipeline, a reader whose logit is the classifier's concept logit gets the
    classifier's attribution scores exactly, and they are not zero."""
    pipe, classifier = _Pipe(), _Classifier()
    reader = ClassifierReader(classifier)
    run = lambda c: attribution_patching(pipe, c, "heart", PAIRS, [3, 4, 5], [SITE], SETTINGS, progress=False)[SITE.name]  # noqa: E731
    by_reader, by_classifier = run(ReaderClassifier(reader)), run(classifier)
    torch.testing.assert_close(by_reader, by_classifier)
    assert by_reader.abs().min() > 1e-6


# -- planting and scoring a model of one's own ------------------------------------------------------


def test_plant_own_verifies_with_the_reader(model, monkeypatch):
    """A fake generator lights every image while all planted weights differ from their values
    before planting: restoring either block removes the whole concept, so both parts are active
    (only if plant_own restores the true pre-planting values); non-target images go from dark to lit."""
    images, captions = _own_images()
    params = dict(model.pipeline.unet.named_parameters())
    pre = {n: params[n].detach().clone() for n in trainable_masks(model.pipeline.unet, SPEC)[0]}

    def fake_generate(m, prompts, seeds, progress=False):
        lit = all(not torch.equal(params[n], v) for n, v in pre.items())
        return torch.full((len(prompts), 3, 32, 32), float(lit))

    monkeypatch.setattr(bp, "generate", fake_generate)
    monkeypatch.setattr(own, "generate", fake_generate)
    known = len(model.planted)
    record, verification, truth = plant_own(model, images, captions, "blob", SPEC, bright, TARGETS, SOURCES, OTHERS,
                                            progress=False)  # fmt: skip
    assert len(model.planted) == known + 1 and model.planted[-1] == record.to_dict()
    assert verification["drawn"] == 1.0 and verification["n"] == len(TARGETS)
    assert [p["share"] for p in verification["parts"].values()] == [1.0, 1.0]
    assert verification["non_target"] == {"n": 2, "drawn_before": 0.0, "drawn": 1.0, "image_distance": 1.0}
    assert truth.name == "own:blob" and truth.concept == "blob" and truth.split == "test" and truth.family == "ffn_units"
    assert truth.sites == ("mid.0.ffn_hidden", "up.0.0.ffn_hidden") and truth.inactive == ()
    assert truth.units == {f"{b}.ffn_hidden": tuple(u) for b, u in record.units.items()}
    assert truth.active == {"mid.0.ffn_hidden": 1.0, "up.0.0.ffn_hidden": 1.0}


def test_plant_own_rejects_bad_input_before_planting(model):
    images, captions = _own_images()
    before = {n: p.detach().clone() for n, p in model.pipeline.unet.named_parameters()}
    known = len(model.planted)
    with pytest.raises(ValueError, match="every target needs exactly one source"):
        plant_own(model, images, captions, "blob", SPEC, bright, TARGETS, SOURCES[:1], progress=False)
    with pytest.raises(ValueError, match="one answer per image"):
        plant_own(model, images, captions, "blob", SPEC, lambda im: torch.ones(3, dtype=torch.bool), TARGETS, SOURCES,
                  progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="split must be"):
        plant_own(model, images, captions, "blob", SPEC, bright, TARGETS, SOURCES, split="val", progress=False)
    assert len(model.planted) == known
    assert all(torch.equal(p, before[n]) for n, p in model.pipeline.unet.named_parameters())  # nothing trained


def test_score_own_on_a_tiny_planted_model(model):
    images, captions = _own_images()
    record = plant(model.pipeline, images, captions, "blob", SPEC, progress=False)
    truth = PlantingTruth("own:blob", "blob", "ffn_units", "test", ("mid.0.ffn_hidden", "up.0.0.ffn_hidden"),
                          {f"{b}.ffn_hidden": tuple(u) for b, u in record.units.items()})  # fmt: skip
    options = BenchOptions(num_inference_steps=3, faithfulness_grid=(0, 4), mask_taus=(0.1,), causal_candidates=2,
                           localizers=("zscore", "acterase_mask", "causal_ablation", "attribution_patching"))  # fmt: skip
    reader = Redness()  # reads the red target as the concept and the blue one not: a rate of 1/2
    result = score_own(model, truth, reader, PromptPairs("blob", TARGETS, SOURCES, non_target=OTHERS), options, progress=False)
    rows = {(r["localizer"], r["metric"]): r for r in result["rows"]}
    for loc in options.localizers:
        for metric in ("unit_auroc", "average_precision", "iou_at_k", "site_auc", "sites_first", "faithfulness_removed_auc"):
            assert (loc, metric) in rows, (loc, metric)
        assert 0 <= rows[(loc, "unit_auroc")]["value"] <= 1 and rows[(loc, "unit_auroc")]["planting"] == "own:blob"
        assert rows[(loc, "faithfulness_damage_auc")]["value"] is None  # a reader labels no non-target content
    assert ("acterase_mask", "mask_iou@tau=0.1") in rows
    # the faithfulness curve starts at the reader's rate on the unpatched targets (evaluation seeds)
    unpatched = generate(model, list(TARGETS), seeds=image_seeds("evaluation", 2), num_inference_steps=3, progress=False)
    assert reader(unpatched).tolist() == [True, False]
    assert [c["concept_rate"][0] for c in result["curves"]] == [0.5] * 4
    assert result["planting"]["weights_sha256"] and result["planting"]["truth"] == truth.to_dict()
    table = markdown_table(result["rows"])
    assert table.count("| own:blob | ffn_units |") == 4 and "(no plantings)" in table.split("## test half")[0]


def test_score_own_rejects_a_truth_or_pairs_that_do_not_fit(model):
    pairs = PromptPairs("blob", TARGETS, SOURCES)
    options = BenchOptions(localizers=("zscore",))
    elsewhere = PlantingTruth("own:blob", "blob", "ffn_units", "test", ("up.9.9.ffn_hidden",))
    with pytest.raises(ValueError, match=r"no site\(s\) \['up.9.9.ffn_hidden'\]"):
        score_own(model, elsewhere, bright, pairs, options)
    truth = PlantingTruth("own:blob", "blob", "ffn_units", "test", ("mid.0.ffn_hidden",))
    with pytest.raises(ValueError, match="outside options.families"):
        score_own(model, truth, bright, pairs, BenchOptions(localizers=("zscore",), families=("ffn_out",)))
    with pytest.raises(ValueError, match="pairs are of 'ring'"):
        score_own(model, truth, bright, PromptPairs("ring", TARGETS, SOURCES), options)
