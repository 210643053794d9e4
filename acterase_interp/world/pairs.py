"""Prompt pairs for erasing a ConceptWorld concept: the same scene with and without the concept.

ConceptWorld has no "neutral" value for a factor: every image shows some shape, in some color, on
some background. So the source of a pair is the target scene with the concept replaced by *another
value of the same factor* (erasing "triangle" maps it to other shapes), said in the same template.
By default the anchor cycles through the other values; a fixed `anchor` maps the concept onto
one value, like the paper's pairs, whose sources all say the same benign thing (a dress for
nudity), so that the mean source activation is that thing rather than a blend. Held-out
paraphrases (synonyms in templates never seen in training) test whether the erasure generalises
beyond the fitting words; non-target prompts test what must be preserved.

Pairs say the concept in its canonical word by default. `phrasing="varied"` says it in each of its
words in turn, as the paper's LLM-written pairs vary their wording, but only as training captions
do (a synonym only in a `TRAIN_SYNONYM_TEMPLATES` template), so no pair is a held-out paraphrase.
The paraphrase set's words are then no longer unseen by the fit, only its templates; the zero-shot
set's words still are.
"""

from __future__ import annotations

import itertools

import numpy as np

from ..erase.pairs import PromptPairs
from .captions import TEMPLATES, TRAIN_SYNONYM_TEMPLATES, WORDS, canonical, describe, paraphrase
from .concept import Concept, as_concept
from .factors import FACTORS, NATURAL, Scene

PHRASINGS = ("canonical", "varied")


def concepts() -> tuple[str, ...]:
    """Every ConceptWorld concept that can be erased: each shape, color and background, the
    plantable ones included (a model draws those only once they are planted)."""
    return tuple(v for values in FACTORS.values() for v in values)


def concept_scenes(concept: Concept, rng: np.random.Generator) -> list[tuple[Scene, int]]:
    """Every (scene showing `concept`, template index) combination once, in a random order; the
    other factors take natural values, which every ConceptWorld model knows."""
    rest = [f for f in FACTORS if f != concept.factor]
    combos = list(itertools.product(*(NATURAL[f] for f in rest), range(len(TEMPLATES))))
    return [
        (Scene(**{concept.factor: concept.value, **dict(zip(rest, combos[i][:-1]))}), combos[i][-1])
        for i in rng.permutation(len(combos))
    ]


def paraphrase_prompts(concept: Concept, n: int, rng: np.random.Generator) -> list[str]:
    """`n` distinct held-out paraphrases of scenes showing `concept` (synonyms in held-out templates)."""
    out: list[str] = []
    for scene, _ in itertools.islice(itertools.cycle(concept_scenes(concept, rng)), 50 * n):
        prompt = paraphrase(scene, rng)
        if prompt not in out:
            out.append(prompt)
        if len(out) == n:
            return out
    raise ValueError(f"could not draw {n} distinct paraphrases of {concept.value!r}")


def other_value_scenes(concept: Concept, n: int, rng: np.random.Generator) -> list[tuple[Scene, int]]:
    """`n` distinct (scene, template) combinations with another value of `concept`'s factor,
    cycling through the other natural values, with random other factors: what erasure must preserve."""
    pools = [concept_scenes(other, rng) for other in concept.others]
    available = sum(map(len, pools))
    if n > available:
        raise ValueError(f"at most {available} distinct non-target prompts exist for {concept.value!r}; asked for {n}")
    return [pools[i % len(pools)][i // len(pools)] for i in range(n)]


def _said(scene: Scene, template: int, value: str, k: int) -> str:
    """`scene` with `value` said in its k-th word (cycling through its words; 0 is the canonical one)."""
    return describe(scene.shape, scene.color, scene.background, template, synonym={value: k % len(WORDS[value])})


def conceptworld_pairs(concept: str | Concept, n: int = 10, seed: int = 0, anchor: str | None = None,
                       phrasing: str = "canonical") -> PromptPairs:  # fmt: skip
    """`n` prompt pairs that erase a ConceptWorld `concept` (a shape, color or background), plus
    `n` held-out paraphrases and `n` non-target prompts. Sources replace the concept with `anchor`
    (another value of its factor), or with every other value in turn when None. `phrasing`
    "varied" says pair i's concept (and its source's value) in word i of each (see the module
    docstring); the paraphrases and non-target prompts do not change. Deterministic in `seed`."""
    concept = as_concept(concept)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if phrasing not in PHRASINGS:
        raise ValueError(f"phrasing must be one of {PHRASINGS}, got {phrasing!r}")
    factor = concept.factor
    anchors = [other for other in concept.others if anchor in (None, other.value)]
    if not anchors:
        allowed = [other.value for other in concept.others]
        raise ValueError(f"anchor {anchor!r} must be another {factor} than {concept.value!r}: one of {allowed}")
    rng = np.random.default_rng(seed)
    scenes = concept_scenes(concept, rng)
    if n > len(scenes):
        raise ValueError(f"at most {len(scenes)} distinct pairs exist for {concept.value!r}; asked for {n}")
    targets: list[str] = []
    sources: list[str] = []
    for scene, template in scenes:  # canonical: the first n; varied: the first n distinct after remapping
        i = len(targets)
        other = anchors[i % len(anchors)]
        k = i % len(WORDS[concept.value]) if phrasing == "varied" else 0
        if k:  # a synonym only in a template that training captions use with synonyms
            template = TRAIN_SYNONYM_TEMPLATES[template % len(TRAIN_SYNONYM_TEMPLATES)]
        if (target := _said(scene, template, concept.value, k)) not in targets:
            targets.append(target)
            sources.append(_said(other.replace_in(scene), template, other.value, k))
        if len(targets) == n:
            break
    if len(targets) < n:
        raise ValueError(f"only {len(targets)} distinct {phrasing} pairs exist for {concept.value!r}; asked for {n}")
    return PromptPairs(
        concept=concept.value,
        targets=tuple(targets),
        sources=tuple(sources),
        heldout=tuple(paraphrase_prompts(concept, n, rng)),
        non_target=tuple(canonical(*st) for st in other_value_scenes(concept, n, rng)),
        meta={
            "description": f"ConceptWorld {factor} {concept.value!r}; each source is the target scene with another "
            f"{factor} ({'cycling through' if anchor is None else 'always'} {', '.join(map(str, anchors))}), in the "
            "same template" + (", each said in its words in turn." if phrasing == "varied" else "."),
            "author": "acterase_interp.world.pairs.conceptworld_pairs",
            "task": "conceptworld",
            "factor": factor,
            "n": n,
            "seed": seed,
            **({"phrasing": phrasing} if phrasing != "canonical" else {}),
            **({"anchor": anchor} if anchor is not None else {}),
        },
    )
