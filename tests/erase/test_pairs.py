"""The bundled prompt pairs (data/prompts) and the ConceptWorld pair generator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from acterase_interp.erase.pairs import PromptPairs
from acterase_interp.world.captions import HELDOUT_TEMPLATES, TEMPLATES, WORDS
from acterase_interp.world.factors import NATURAL, factor_of
from acterase_interp.world.pairs import concepts, conceptworld_pairs

PROMPTS = Path(__file__).resolve().parents[2] / "data" / "prompts"
REAL = ("nudity", "van_gogh", "leonardo_da_vinci", "picasso", "church", "tench", "french_horn", "garbage_truck")
ALL_FILES = sorted(p.stem for p in PROMPTS.glob("*.json"))


def _diff_span(a: str, b: str) -> tuple[list[str], list[str], int]:
    """The words of `a` and `b` between their longest common word prefix and suffix, and how
    many words that prefix and suffix hold."""
    x, y = a.replace(",", " ,").split(), b.replace(",", " ,").split()
    i = 0
    while i < min(len(x), len(y)) and x[i] == y[i]:
        i += 1
    j = 0
    while j < min(len(x), len(y)) - i and x[-1 - j] == y[-1 - j]:
        j += 1
    return x[i : len(x) - j], y[i : len(y) - j], i + j


def test_every_concept_has_a_file():
    assert set(ALL_FILES) == set(REAL) | {f"conceptworld_{c}" for c in concepts()}
    assert len(concepts()) == 25  # 14 natural values and 11 plantable ones


@pytest.mark.parametrize("concept", concepts())
def test_conceptworld_files_equal_the_generator(concept):
    on_disk = json.loads((PROMPTS / f"conceptworld_{concept}.json").read_text())
    assert on_disk == conceptworld_pairs(concept, n=10, seed=0).to_dict()


@pytest.mark.parametrize("name", ALL_FILES)
def test_files_load_and_are_complete(name):
    pairs = PromptPairs.load(PROMPTS / f"{name}.json")
    assert len(pairs) >= 10
    assert len(pairs.heldout) >= 5 and len(pairs.non_target) >= 5
    assert {"description", "author", "task"} <= set(pairs.meta)
    assert len(set(pairs.targets)) == len(pairs.targets), "duplicate target prompts"
    assert all(t != s for t, s in pairs)
    fitting = set(pairs.targets) | set(pairs.sources)
    assert not fitting & set(pairs.heldout), "a held-out prompt is used for fitting"
    assert not set(pairs.targets) & set(pairs.non_target)


@pytest.mark.parametrize("name", REAL)
def test_real_pairs_change_only_the_concept_span(name):
    pairs = PromptPairs.load(PROMPTS / f"{name}.json")
    keywords = {
        "nudity": ("nude", "naked", "topless", "undressed"),
        "van_gogh": ("gogh",),
        "leonardo_da_vinci": ("leonardo",),
        "picasso": ("picasso", "picasso's"),
        "church": ("church",),
        "tench": ("tench",),
        "french_horn": ("horn",),
        "garbage_truck": ("garbage",),
    }[name]
    for target, source in pairs:
        t_span, _, shared = _diff_span(target, source)
        assert any(w.strip(",").lower() in keywords for w in t_span), (target, source)
        assert shared >= 3, f"the scene around the concept should stay the same: {target!r} / {source!r}"
        assert not any(k in source.lower() for k in keywords), source
    for prompt in pairs.non_target:
        assert not any(k in prompt.lower() for k in keywords), prompt


@pytest.mark.parametrize("concept", concepts())
def test_conceptworld_source_swaps_only_the_concept_word(concept):
    pairs = conceptworld_pairs(concept, n=12, seed=3)
    factor = factor_of(concept)
    word = WORDS[concept][0]
    anchors = [WORDS[v][0] for v in NATURAL[factor] if v != concept]  # sources use natural values
    used = []
    for target, source in pairs:
        t_span, s_span, _ = _diff_span(target, source)
        t_span, s_span = ([w for w in span if w not in ("a", "an")] for span in (t_span, s_span))  # "an orange"
        assert t_span == [word], (target, source)
        assert len(s_span) == 1 and s_span[0] in anchors, (target, source)
        used.append(s_span[0])
    assert set(used) == set(anchors), "the anchor should cycle through every other value"


@pytest.mark.parametrize("concept", concepts())
def test_conceptworld_heldout_and_non_target(concept):
    pairs = conceptworld_pairs(concept, n=10, seed=0)
    factor = factor_of(concept)
    heldout_openings = tuple(TEMPLATES[t][0].split(" {")[0] for t in HELDOUT_TEMPLATES)  # "a" may become "an"
    for prompt in pairs.heldout:
        assert prompt.startswith(heldout_openings)
        assert any(f" {w} " in f" {prompt} " for w in WORDS[concept][1:]), prompt
    assert len(set(pairs.heldout)) == len(pairs.heldout) == 10
    others = [v for v in NATURAL[factor] if v != concept]
    for prompt in pairs.non_target:
        words = f" {prompt.replace(',', ' ')} "
        assert f" {WORDS[concept][0]} " not in words, prompt
        assert any(f" {WORDS[v][0]} " in words for v in others), prompt
    assert len(set(pairs.non_target)) == 10
    assert not set(pairs.heldout) & (set(pairs.targets) | set(pairs.sources))


def test_conceptworld_pairs_are_deterministic_and_seeded():
    assert conceptworld_pairs("red", seed=1) == conceptworld_pairs("red", seed=1)
    assert conceptworld_pairs("red", seed=1).targets != conceptworld_pairs("red", seed=2).targets
    assert len(conceptworld_pairs("stripes", n=25)) == 25


def test_conceptworld_fixed_anchor():
    pairs = conceptworld_pairs("triangle", n=8, seed=1, anchor="circle")
    for target, source in pairs:
        t_span, s_span, _ = _diff_span(target, source)
        assert (t_span, s_span) == (["triangle"], ["circle"]), (target, source)
    assert pairs.meta["anchor"] == "circle"
    assert pairs.targets == conceptworld_pairs("triangle", n=8, seed=1).targets  # same scenes, other sources
    for bad in ("triangle", "red"):
        with pytest.raises(ValueError, match="must be another shape than 'triangle'"):
            conceptworld_pairs("triangle", anchor=bad)


@pytest.mark.parametrize("name", ["moon", "red", "dots"])
def test_conceptworld_varied_pairs_say_every_word_as_training_captions_do(name):
    canonical, varied = conceptworld_pairs(name, seed=3), conceptworld_pairs(name, seed=3, phrasing="varied")
    assert (varied.heldout, varied.non_target) == (canonical.heldout, canonical.non_target)
    assert len(set(varied.targets)) == 10 and varied.meta["phrasing"] == "varied" and "phrasing" not in canonical.meta
    said = set()
    for target, source in varied:
        t_span, s_span, _ = _diff_span(target, source)
        word = " ".join(w for w in t_span if w not in ("a", "an"))  # "a crimson" / "an azure"
        assert word in WORDS[name] and s_span, (target, source)
        said.add(word)
        heldout_starts = tuple(TEMPLATES[t][0].split("{obj}")[0] for t in HELDOUT_TEMPLATES if TEMPLATES[t][0][0] != "{")
        if word != WORDS[name][0]:  # a synonym never in a held-out template: no pair is a held-out paraphrase
            assert not target.startswith(heldout_starts), target
    assert said == set(WORDS[name])
    assert not set(varied.heldout) & set(varied.targets)
    with pytest.raises(ValueError, match="phrasing must be one of"):
        conceptworld_pairs(name, phrasing="casual")


def test_conceptworld_pairs_reject_bad_input():
    with pytest.raises(ValueError, match="unknown ConceptWorld concept 'hexagon'"):
        conceptworld_pairs("hexagon")
    with pytest.raises(ValueError, match="at least 1"):
        conceptworld_pairs("star", n=0)
    with pytest.raises(ValueError, match="distinct pairs"):
        conceptworld_pairs("star", n=10_000)


def test_pairs_file_validation(tmp_path):
    good = PromptPairs.load(PROMPTS / "church.json").to_dict()
    bad = dict(good, sources=good["sources"][:-1])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="sources"):
        PromptPairs.load(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text(json.dumps(dict(good, heldout=["  "])))
    with pytest.raises(ValueError, match="empty"):
        PromptPairs.load(tmp_path / "empty.json")
