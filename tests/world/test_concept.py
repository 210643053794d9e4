"""The typed ConceptWorld concept: built once from a name, then read instead of looked up again."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from acterase_interp.metrics import concept_rate_from_predictions
from acterase_interp.world.captions import WORDS
from acterase_interp.world.concept import Concept, as_concept, with_values
from acterase_interp.world.factors import NATURAL, Scene
from acterase_interp.world.pairs import conceptworld_pairs

PACKAGE = Path(__file__).resolve().parents[2] / "acterase_interp"
RECORDS = [{"concept": "moon", "blocks": ["mid.0"]}, {"concept": "heart", "blocks": ["up.0.0", "up.0.1"]}]
"""Shaped like a model's `planted` records (planted.json)."""


def test_built_from_a_name():
    heart, red = as_concept("heart"), as_concept("red")
    assert (heart.value, heart.factor, heart.words, heart.natural, heart.planted) == (
        "heart", "shape", WORDS["heart"], False, None)  # fmt: skip
    assert (red.factor, red.natural) == ("color", True)
    assert [o.value for o in heart.others] == list(NATURAL["shape"])  # a plantable value has every natural one
    assert [o.value for o in as_concept("triangle").others] == ["circle", "square", "star", "cross"]
    assert as_concept("red").replace_in(Scene("circle", "blue", "dots")) == Scene("circle", "red", "dots")


def test_a_concept_passes_through():
    heart = as_concept("heart")
    assert as_concept(heart) is heart
    assert as_concept(heart) == Concept("heart", "shape")


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown ConceptWorld concept 'hexagon'"):
        as_concept("hexagon")
    with pytest.raises(ValueError, match="unknown ConceptWorld concept 'crimson'"):  # a synonym is no value
        as_concept("crimson")
    with pytest.raises(ValueError, match="'red' is not a ConceptWorld shape"):
        Concept("red", "shape")


def test_planting_record_attached_when_the_model_has_one():
    assert as_concept("heart", RECORDS).planted is RECORDS[1]
    assert as_concept(as_concept("moon"), RECORDS).planted is RECORDS[0]
    assert as_concept("triangle", RECORDS).planted is None and as_concept("cyan", []).planted is None
    assert as_concept("heart", RECORDS) == as_concept("heart")  # the record is carried, not compared
    assert len({as_concept("heart", RECORDS), as_concept("heart")}) == 1


def test_str_is_the_value():
    heart = as_concept("heart", RECORDS)
    assert str(heart) == f"{heart}" == "heart"
    assert json.dumps({str(heart): heart.value}) == '{"heart": "heart"}'


def test_names_and_concepts_give_the_same_results():
    assert conceptworld_pairs(as_concept("cyan"), n=4, seed=2) == conceptworld_pairs("cyan", n=4, seed=2)
    predictions = {"shape": ["heart", "moon", "heart"]}
    assert concept_rate_from_predictions(predictions, as_concept("heart")) == concept_rate_from_predictions(
        predictions, "heart")  # fmt: skip
    assert with_values([as_concept("moon"), "cyan"]) == with_values(["moon", "cyan"])
    with pytest.raises(ValueError, match="unknown ConceptWorld concept"):
        with_values(["hexagon"])


def _calls_and_definitions(name: str) -> tuple[set[str], set[str]]:
    """Package files (relative paths) that call `name`, and those that define it."""
    calls, defs = set(), set()
    for path in PACKAGE.rglob("*.py"):
        where = str(path.relative_to(PACKAGE))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                if (func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)) == name:
                    calls.add(where)
            elif isinstance(node, ast.FunctionDef) and node.name == name:
                defs.add(where)
    return calls, defs


def test_factor_of_is_called_only_where_a_concept_is_built():
    calls, defs = _calls_and_definitions("factor_of")
    assert defs == {"world/factors.py"}
    assert calls == {"world/concept.py"}, "build a Concept (world.concept.as_concept) and read its .factor"
