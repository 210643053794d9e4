"""ConceptWorld evaluation prompts: the scene a caption asks for, and the prompt sets of one
concept (target, held-out paraphrase, zero-shot, non-target), none of them used for fitting."""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

import numpy as np

from ..world.captions import WORDS, ZERO_SHOT_WORDS, canonical, paraphrase, zero_shot
from ..world.concept import Concept, as_concept
from ..world.factors import FACTORS, Scene, all_scenes
from ..world.pairs import concept_scenes, other_value_scenes
from .core import PromptSet

SET_NAMES = ("target", "paraphrase", "non_target", "zero_shot")
"""`target`: the concept in canonical templates; `paraphrase`: held-out synonyms and templates;
`non_target`: other values of the concept's factor (what must be preserved); `zero_shot`: words
and templates never trained on."""

_PHRASES = {
    factor: [(re.compile(rf"(?<![\w-]){re.escape(w)}(?![\w-])"), v)
             for v in values for w in (*WORDS[v], ZERO_SHOT_WORDS[v])]
    for factor, values in FACTORS.items()
}  # fmt: skip


def scene_of(prompt: str) -> Scene:
    """The ConceptWorld scene a caption asks for (canonical words, synonyms or zero-shot words,
    any template); a clear error if a factor is unsaid or ambiguous."""
    found = {}
    for factor, phrases in _PHRASES.items():
        values = {v for pattern, v in phrases if pattern.search(prompt.lower())}
        if len(values) != 1:
            what = "names no" if not values else f"names several ({sorted(values)})"
            raise ValueError(f"prompt {prompt!r} {what} {factor}: non-target prompts must name every factor once")
        found[factor] = values.pop()
    return Scene(**found)


def prompts_without(concepts: Sequence[str | Concept], template: int = 0) -> tuple[list[str], list[Scene]]:
    """Canonical captions (and scenes) of every ConceptWorld scene that shows none of `concepts`:
    the non-target set on which a multi-concept eraser must preserve content."""
    banned = {str(c) for c in concepts}
    scenes = [s for s in all_scenes() if not banned & {s.shape, s.color, s.background}]
    if not scenes:
        raise ValueError(f"every ConceptWorld scene shows one of {sorted(banned)}")
    return [canonical(s, template) for s in scenes], scenes


def _cycle(items: list, n: int) -> list:
    return list(itertools.islice(itertools.cycle(items), n))


def conceptworld_prompt_sets(
    concept: str | Concept,
    n_images: int,
    rng: np.random.Generator,
    exclude: Sequence[str] = (),
    *,
    zero_shot_set: bool = False,
) -> list[PromptSet]:
    """`n_images` fresh prompts per set (`SET_NAMES`; `zero_shot` only with `zero_shot_set`);
    prompts in `exclude` (the fitting prompts) are skipped, and a set with fewer distinct prompts
    repeats them (each image has its own seed). Draws from `rng` in a fixed order, the zero-shot
    set last, so asking for it leaves the other sets as they were."""
    if n_images < 1:
        raise ValueError(f"n_images must be at least 1, got {n_images}")
    concept, excluded = as_concept(concept), set(exclude)
    scenes = concept_scenes(concept, rng)
    targets = _cycle([st for st in scenes if canonical(*st) not in excluded], n_images)
    paraphrased = _cycle(concept_scenes(concept, rng), n_images)
    every_other = len(concept.others) * len(scenes)  # as many scenes each
    others = _cycle([st for st in other_value_scenes(concept, every_other, rng)
                     if canonical(*st) not in excluded], n_images)  # fmt: skip
    sets = [
        PromptSet("target", tuple(canonical(s, t) for s, t in targets), tuple(s for s, _ in targets)),
        PromptSet("paraphrase", tuple(paraphrase(s, rng) for s, _ in paraphrased), tuple(s for s, _ in paraphrased)),
        PromptSet("non_target", tuple(canonical(s, t) for s, t in others), tuple(s for s, _ in others)),
    ]
    if zero_shot_set:
        shots = _cycle(concept_scenes(concept, rng), n_images)
        sets.append(PromptSet("zero_shot", tuple(zero_shot(s, rng) for s, _ in shots), tuple(s for s, _ in shots)))
    return sets
