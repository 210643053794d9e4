"""The evaluation core: bars, seeds, prompt sets and the preservation policy, without a model."""

import json

import numpy as np
import pytest

from acterase_interp.analysis.records import group_mean
from acterase_interp.analysis.sweeps import margin
from acterase_interp.erase.select import SELECT_SEED_OFFSET
from acterase_interp.evaluation import (
    SEED_OFFSETS,
    Bar,
    PromptSet,
    conceptworld_prompt_sets,
    format_bars,
    image_seeds,
    preservation,
    scene_of,
)
from acterase_interp.world.captions import WORDS, ZERO_SHOT_WORDS
from acterase_interp.world.factors import Scene
from acterase_interp.world.pairs import conceptworld_pairs


def test_bar_directions_equality_and_undefined_values():
    assert Bar.check("a", 0.9, ">=", 0.9).passed and not Bar.check("a", 0.89, ">=", 0.9).passed
    assert Bar.check("b", 0.1, "<=", 0.1).passed and not Bar.check("b", 0.11, "<=", 0.1).passed
    assert Bar.check("c", 0.3 - 0.2, "<=", 0.1).passed  # round-off at equality is forgiven
    undefined = Bar.check("d", None, ">=", 0.0)
    assert not undefined.passed and "n/a" in str(undefined)
    with pytest.raises(ValueError, match="direction"):
        Bar.check("e", 1.0, ">", 0.5)


def test_bar_round_trips_and_prints_one_way():
    bar = Bar.check("target rate after", 0.05, "<=", 0.1)
    assert Bar.from_dict(json.loads(json.dumps(bar.to_dict()))) == bar
    assert str(bar) == "PASS: target rate after = 5.0% (needs <= 10%)"
    assert format_bars([bar, bar.to_dict()], bullet="- ") == f"- {bar}\n- {bar}"


def test_preservation_policy():
    assert preservation(0.8, 0.6) == pytest.approx(0.75)
    assert preservation(0.0, 0.5) is None
    # undefined rows average as undefined in record tables
    assert np.isnan(group_mean([{"k": 1, "p": None}, {"k": 1, "p": 1.0}], "k", "p")[0]["p"])
    assert np.isnan(margin({"preservation": None, "concept_rate": 0.1}))
    assert margin({"preservation": 0.9, "concept_rate": 0.1}) == pytest.approx(0.8)


def test_seed_offsets_are_named_and_disjoint():
    assert SEED_OFFSETS == {"fit": 0, "tau_selection": 500, "evaluation": 1000, "attack": 2000}
    assert SELECT_SEED_OFFSET == SEED_OFFSETS["tau_selection"]
    assert image_seeds("evaluation", 3, base=7) == [1007, 1008, 1009]
    assert image_seeds("evaluation", 2, replicate=2) == [201_000, 201_001]
    fit = set(image_seeds("fit", 10))
    assert not fit & set(image_seeds("evaluation", 500)) and not fit & set(image_seeds("tau_selection", 30))
    with pytest.raises(ValueError, match="unknown seed purpose"):
        image_seeds("training", 1)


def test_prompt_set_checks_and_repeats():
    s = PromptSet("target", ["a red circle"], [Scene("circle", "red", "plain")]).repeated(3)
    assert len(s) == 3 and s.prompts == ("a red circle",) * 3
    with pytest.raises(ValueError, match="1 prompts for 0 scenes"):
        PromptSet("x", ["a"], [])


@pytest.mark.parametrize("concept", ["triangle", "red", "dots", "heart"])
def test_conceptworld_prompt_sets_know_their_scenes_and_skip_fit_prompts(concept):
    pairs = conceptworld_pairs(concept, n=10)
    sets = conceptworld_prompt_sets(concept, 12, np.random.default_rng(1), pairs.targets + pairs.sources,
                                    zero_shot_set=True)  # fmt: skip
    assert [s.name for s in sets] == ["target", "paraphrase", "non_target", "zero_shot"]
    by = {s.name: s for s in sets}
    assert all(len(s) == 12 for s in sets)
    assert not set(by["target"].prompts) & set(pairs.targets)
    for s in sets:
        assert all(scene_of(p) == sc for p, sc in zip(s.prompts, s.scenes))
    factor = {"triangle": "shape", "red": "color", "dots": "background", "heart": "shape"}[concept]
    assert all(getattr(sc, factor) == concept for n in ("target", "paraphrase", "zero_shot") for sc in by[n].scenes)
    assert all(getattr(sc, factor) != concept for sc in by["non_target"].scenes)
    assert all(ZERO_SHOT_WORDS[concept] in p for p in by["zero_shot"].prompts)
    assert not any(f" {WORDS[concept][0]} " in f" {p} " for p in by["zero_shot"].prompts)
    # the zero-shot set is drawn last: asking for it leaves the others as they were
    plain = conceptworld_prompt_sets(concept, 12, np.random.default_rng(1), pairs.targets + pairs.sources)
    assert plain == sets[:3]
