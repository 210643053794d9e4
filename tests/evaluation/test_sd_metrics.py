"""Real-SD metrics on synthetic inputs: the math and the plumbing, not the numbers."""

import numpy as np
import pytest
import torch

from acterase_interp.evaluation.sd_metrics import NUDE_CLASSES, SWEEP_THRESHOLDS, LocalCLIP, NudityDetector, frechet_distance


def test_frechet_distance_known_answers():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 8))
    assert frechet_distance(a, a.copy()) == pytest.approx(0.0, abs=1e-6)
    # a shift of the mean by d adds |d|^2; the covariances are the same
    assert frechet_distance(a, a + 2.0) == pytest.approx(4.0 * 8, rel=1e-6)
    # doubling: |2 mu - mu|^2 + tr(S + 4S - 2 (4 S^2)^1/2) = |mu|^2 + tr(S)
    want = (a.mean(0) ** 2).sum() + np.trace(np.cov(a, rowvar=False))
    assert frechet_distance(a, 2 * a) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(a, a[:, :3])


@pytest.fixture(scope="module")
def detector():
    pytest.importorskip("nudenet", reason="NudeNet is the `eval` extra: pip install 'acterase-interp[eval]'")
    return NudityDetector()


def test_nudenet_wrapper_runs_on_synthetic_images(detector):
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    detections = detector.detect(images)
    assert len(detections) == 2 and all(isinstance(d, list) for d in detections)
    assert all(d["score"] >= 0.2 and isinstance(d["class"], str) for ds in detections for d in ds)
    rows = detector.sweep(detections)
    assert [r["threshold"] for r in rows] == list(SWEEP_THRESHOLDS) and all(r["n"] == 2 for r in rows)
    assert detector.rate(images, 0.6).n == 2


def test_nudenet_flags_follow_the_class_set_and_threshold(detector):
    found = [[{"class": "FEMALE_BREAST_EXPOSED", "score": 0.5}], [{"class": "FACE_FEMALE", "score": 0.9}], []]
    assert detector.flags(found, 0.45) == [True, False, False]
    assert detector.flags(found, 0.55) == [False, False, False]
    rates = [r["value"] for r in detector.sweep(found)]
    assert rates == sorted(rates, reverse=True)  # a higher threshold never flags more
    with pytest.raises(ValueError, match="threshold"):
        detector.flags(found, 0.1)
    with pytest.raises(ValueError, match="unknown NudeNet classes"):
        NudityDetector(classes=("NUDITY",))
    assert NudityDetector(classes=NUDE_CLASSES[:1]).flags(found, 0.3) == [True, False, False]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A random-weight CLIP saved like a real one, with ConceptWorld's offline CLIP tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    from acterase_interp.world.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 24, "eos_token_id": tokenizer.eos_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_local_clip_scores_classifies_and_embeds(clip_folder):
    clip = LocalCLIP(clip_folder)
    images = torch.rand(3, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    scores = clip.score(images, ["a red circle", "a blue square", "a star"])
    assert scores.shape == (3,) and ((scores >= 0) & (scores <= 100)).all()
    labels = ["circle", "square", "star"]
    assert set(clip.classify(images, labels)) <= set(labels)
    features = clip.image_features(images)
    assert torch.allclose(features.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.equal(clip.image_features(images), features)  # deterministic: identical sets, distance 0
    with pytest.raises(ValueError, match="images for"):
        clip.score(images, ["one prompt"])


def test_local_clip_needs_a_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no CLIP model"):
        LocalCLIP(tmp_path)
