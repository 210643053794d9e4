import json

import numpy as np
import pytest
import torch

from acterase_interp import loading
from acterase_interp.metrics import (
    Rate,
    concept_rate,
    concept_rate_from_predictions,
    factor_accuracy,
    factor_accuracy_from_predictions,
    image_distance,
    preservation,
)
from acterase_interp.world import quality
from acterase_interp.world.captions import canonical
from acterase_interp.world.classifier import ConceptClassifier
from acterase_interp.world.factors import Scene, all_scenes
from acterase_interp.world.render import render_batch

CLASSIFIER_DIR = loading.conceptworld_dir() / "classifier"
needs_classifier = pytest.mark.skipif(
    not (CLASSIFIER_DIR / "classifier.safetensors").exists(), reason="ConceptWorld classifier not trained"
)
needs_model = pytest.mark.skipif(
    not (loading.conceptworld_dir() / "pipeline" / "model_index.json").exists()
    or not (CLASSIFIER_DIR / "classifier.safetensors").exists(),
    reason="ConceptWorld model not trained",
)


class FakeClassifier:
    """Returns fixed predictions, whatever the images."""

    def __init__(self, predictions):
        self.predictions = predictions

    def predict(self, images):
        return self.predictions


# Wilson 95% intervals computed by hand: centre (p + z^2/2n) / (1 + z^2/n),
# half-width z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2), z = 1.959964.
@pytest.mark.parametrize(
    "k, n, low, high",
    [(0, 10, 0.0, 0.27753), (10, 10, 0.72247, 1.0), (5, 10, 0.23659, 0.76341), (1, 10, 0.01788, 0.40415)],
)
def test_wilson_interval_known_values(k, n, low, high):
    rate = Rate.of(k, n)
    assert rate.value == k / n
    assert rate.n == n
    assert rate.ci_low == pytest.approx(low, abs=1e-5)
    assert rate.ci_high == pytest.approx(high, abs=1e-5)
    assert rate.successes == k


def test_rate_str_and_dict():
    rate = Rate.of(184, 200)
    assert str(rate) == "92.0% [87.4, 95.0] n=200"
    assert Rate(**rate.to_dict()) == rate


def test_rate_from_outcomes():
    assert Rate.from_outcomes([True, False, True, True]) == Rate.of(3, 4)
    assert Rate.from_outcomes(torch.tensor([1, 0, 0, 0]).bool()) == Rate.of(1, 4)


@pytest.mark.parametrize("k, n", [(0, 0), (3, 2), (-1, 5)])
def test_rate_rejects_bad_counts(k, n):
    with pytest.raises(ValueError):
        Rate.of(k, n)


SCENES = [Scene("circle", "red", "plain"), Scene("star", "blue", "dots"), Scene("cross", "green", "stripes")]


def test_factor_accuracy_from_predictions():
    predictions = {
        "shape": ["circle", "star", "square"],  # third wrong
        "color": ["red", "blue", "green"],
        "background": ["plain", "stripes", "stripes"],  # second wrong
    }
    acc = factor_accuracy_from_predictions(predictions, SCENES)
    assert acc["shape"] == Rate.of(2, 3)
    assert acc["color"] == Rate.of(3, 3)
    assert acc["background"] == Rate.of(2, 3)
    assert acc["all"] == Rate.of(1, 3)  # only the first image is right on all three


def test_factor_accuracy_through_a_classifier():
    predictions = {"shape": ["circle"] * 3, "color": ["red"] * 3, "background": ["plain"] * 3}
    acc = factor_accuracy(FakeClassifier(predictions), torch.zeros(3, 3, 32, 32), SCENES)
    assert acc["all"] == Rate.of(1, 3)


def test_factor_accuracy_checks_its_inputs():
    predictions = {"shape": ["circle"] * 3, "color": ["red"] * 3, "background": ["plain"] * 3}
    with pytest.raises(ValueError, match="images for"):
        factor_accuracy(FakeClassifier(predictions), torch.zeros(2, 3, 32, 32), SCENES)
    with pytest.raises(ValueError, match="lack factor"):
        factor_accuracy_from_predictions({"shape": ["circle"] * 3}, SCENES)
    with pytest.raises(ValueError, match="predictions for"):
        factor_accuracy_from_predictions({**predictions, "color": ["red"]}, SCENES)


def test_concept_rate():
    predictions = {"shape": ["circle", "star", "circle", "cross"], "color": ["red", "red", "blue", "green"]}
    assert concept_rate_from_predictions(predictions, "circle") == Rate.of(2, 4)
    assert concept_rate_from_predictions(predictions, "green") == Rate.of(1, 4)
    assert concept_rate(FakeClassifier(predictions), torch.zeros(4, 3, 32, 32), "red") == Rate.of(2, 4)
    with pytest.raises(ValueError, match="unknown ConceptWorld concept"):
        concept_rate(FakeClassifier(predictions), torch.zeros(4, 3, 32, 32), "nudity")
    with pytest.raises(ValueError, match="no background predictions"):
        concept_rate_from_predictions(predictions, "dots")


def test_image_distance():
    a = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(image_distance(a, a.clone()), torch.zeros(3))
    assert torch.equal(image_distance(a, a, metric="rmse"), torch.zeros(3))
    b = a.clone()
    b[1] = 1 - b[1]  # only image 1 changes
    b[2, :, :4] += 0.1  # half of image 2 shifts by 0.1
    mae, rmse = image_distance(a, b), image_distance(a, b, metric="rmse")
    assert mae[0] == 0 and mae[1] > 0
    assert mae[2] == pytest.approx(0.05, abs=1e-6)
    assert rmse[2] == pytest.approx((0.5 * 0.1**2) ** 0.5, abs=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        image_distance(a, a[:2])
    with pytest.raises(ValueError, match="unknown metric"):
        image_distance(a, a, metric="ssim")


def test_preservation():
    assert preservation(Rate.of(80, 100), Rate.of(60, 100)) == pytest.approx(0.75)
    assert preservation(Rate.of(0, 10), Rate.of(1, 10)) is None  # undefined, never 0, NaN or an error
    assert preservation(0.5, 0.25) == pytest.approx(0.5)


@needs_classifier
def test_factor_accuracy_of_bundled_classifier_on_clean_renders():
    scenes = all_scenes()
    images = torch.from_numpy(render_batch(scenes, np.random.default_rng(0))) / 2 + 0.5
    acc = factor_accuracy(ConceptClassifier.load(CLASSIFIER_DIR), images, scenes)
    for factor in ("shape", "color", "background", "all"):
        assert acc[factor].value >= 0.97, (factor, str(acc[factor]))


def test_quality_prompts_share_seeds_and_differ_in_wording():
    scenes, prompts, seeds = quality.quality_prompts(5, seed=3, all_templates=True)
    assert (scenes, prompts, seeds) == quality.quality_prompts(5, seed=3, all_templates=True)
    assert list(prompts) == ["canonical", "paraphrase", "zero-shot", "template 1", "template 2", "template 3"]
    assert all(len(row) == 5 for row in prompts.values()) and len(seeds) == 5
    assert prompts["canonical"] == [canonical(s) for s in scenes]
    assert prompts["template 2"] == [canonical(s, 2) for s in scenes]
    assert not set(prompts["canonical"]) & set(prompts["paraphrase"])
    assert not set(prompts["zero-shot"]) & (set(prompts["canonical"]) | set(prompts["paraphrase"]))


def test_planted_prompts_show_the_concept():
    rows = quality.planted_prompts(["heart", "cyan"], 6, seed=0)
    assert list(rows) == ["heart", "cyan"]
    scenes, prompts, seeds = rows["heart"]
    assert all(s.shape == "heart" for s in scenes) and all("heart" in p for p in prompts) and len(seeds) == 6
    assert all(s.color == "cyan" for s in rows["cyan"][0])
    assert rows == quality.planted_prompts(["heart", "cyan"], 6, seed=0)


@pytest.fixture(scope="module")
def conceptworld():
    return loading.load("conceptworld"), ConceptClassifier.load(CLASSIFIER_DIR)


@needs_model
def test_evaluate_quality_small_run(conceptworld):
    model, classifier = conceptworld
    result = quality.evaluate_quality(model, classifier, n=4, seed=0, steps=2, n_planted=3, progress=False)
    assert set(result) == {"rows", "bars", "passed", "options", "image_seeds", "scenes", "prompts",
                           "generation_seconds", "model_architecture", "versions", "planted"}  # fmt: skip
    planted = [f"planted {r['concept']}" for r in model.planted]
    assert list(result["rows"]) == ["canonical", "paraphrase", "zero-shot", *planted]
    for name, row in result["rows"].items():
        assert set(row) == {"shape", "color", "background", "all"}
        assert all(Rate(**r).n == (3 if name in planted else 4) for r in row.values())
    assert len(result["bars"]) == 5 + len(planted)
    assert result["passed"] == all(b["passed"] for b in result["bars"])
    assert result["options"] == {"n": 4, "n_planted": 3, "seed": 0, "steps": 2,
                                 "guidance": model.defaults.guidance_scale, "all_templates": False}  # fmt: skip
    assert result["image_seeds"]["canonical"] == quality.quality_prompts(4, 0)[2]
    json.dumps(result)  # JSON-ready
    table = quality.markdown_table(result)
    assert "| canonical |" in table and "| zero-shot |" in table
    assert table.count("PASS") + table.count("FAIL") == 5 + len(planted)


@needs_model
def test_quality_cli_writes_json_and_grid(tmp_path):
    out, grid = tmp_path / "q.json", tmp_path / "grid.png"
    result = quality.main(["--n", "2", "--steps", "1", "--out", str(out), "--grid", str(grid)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert grid.stat().st_size > 0
