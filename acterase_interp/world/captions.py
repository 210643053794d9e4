"""Captions of ConceptWorld scenes: templates, synonyms, and the held-out paraphrases.

Training captions use every template with canonical words, but synonyms only with the
`TRAIN_SYNONYM_TEMPLATES`. The combinations of a synonym with a `HELDOUT_TEMPLATES` template are
never seen in training: they are the held-out paraphrases that evaluation and erasure tests use
(every word in them is known to the tokenizer; only the phrasing is new).
"""

from __future__ import annotations

import re

import numpy as np

from .factors import Scene

# How each factor value is said: the canonical word first, then synonyms.
WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disk", "round shape"),
    "square": ("square", "box", "four-sided shape"),
    "triangle": ("triangle", "three-sided shape", "wedge"),
    "star": ("star", "five-pointed star", "starlike shape"),
    "cross": ("cross", "plus sign", "plus shape"),
    "red": ("red", "crimson"),
    "green": ("green", "emerald"),
    "blue": ("blue", "azure"),
    "yellow": ("yellow", "golden"),
    "purple": ("purple", "violet"),
    "plain": ("plain", "blank"),
    "stripes": ("striped", "lined"),
    "dots": ("dotted", "spotted"),
    "checkerboard": ("checkered", "chequered"),
    # plantable: a model knows these words only once the concept is planted
    "heart": ("heart", "heart shape", "love heart"),
    "moon": ("moon", "crescent", "crescent moon"),
    "cyan": ("cyan", "turquoise"),
    "diamond": ("diamond", "rhombus", "diamond shape"),
    "arrow": ("arrow", "arrow shape", "dart"),
    "ring": ("ring", "hoop", "annulus"),
    "orange": ("orange", "tangerine"),
    "pink": ("pink", "rose"),
    "brown": ("brown", "chocolate"),
    "zigzag": ("zigzag", "sawtooth"),
    "grid": ("grid", "lattice"),
}

# Zero-shot phrasings: words and templates that no training caption contains. The frozen pretrained
# encoder has seen them in its own pretraining; the UNet has not.
ZERO_SHOT_WORDS: dict[str, str] = {
    "circle": "orb",
    "square": "quadrilateral",
    "triangle": "pyramid shape",
    "star": "pentagram",
    "cross": "crucifix",
    "red": "scarlet",
    "green": "lime",
    "blue": "cobalt",
    "yellow": "lemon",
    "purple": "lilac",
    "plain": "solid",
    "stripes": "banded",
    "dots": "polka dot",
    "checkerboard": "chessboard",
    "heart": "valentine",
    "moon": "half moon",
    "cyan": "aqua",
    "diamond": "lozenge",
    "arrow": "pointer",
    "ring": "donut",
    "orange": "amber",
    "pink": "fuchsia",
    "brown": "chestnut",
    "zigzag": "jagged",
    "grid": "mesh",
}
ZERO_SHOT_TEMPLATES: tuple[str, ...] = (
    "an image showing a {obj} against a {bg} background",
    "there is a {obj} over a {bg} pattern",
)

# Templates with a background clause and without it (used when the background is left unsaid).
TEMPLATES: tuple[tuple[str, str], ...] = (
    ("a {obj} on a {bg} background", "a {obj}"),
    ("{obj}, {bg} background", "{obj}"),
    ("a picture of a {obj} in front of a {bg} background", "a picture of a {obj}"),
    ("a drawing of a {obj} on a {bg} backdrop", "a drawing of a {obj}"),
)
TRAIN_SYNONYM_TEMPLATES: tuple[int, ...] = (0, 1)
HELDOUT_TEMPLATES: tuple[int, ...] = (2, 3)
GENERIC_SHAPE = "shape"
_ARTICLE = re.compile(r"(^|\s)a ([aeiou])")  # "a emerald" -> "an emerald"


def describe(
    shape: str | None,
    color: str | None,
    background: str | None,
    template: int = 0,
    synonym: dict[str, int] | None = None,
) -> str:
    """A caption; a factor given as None is left unsaid. `synonym` maps a factor value to the
    index of the word used for it in `WORDS` (0, the canonical word, by default)."""
    synonym = synonym or {}

    def word(value: str) -> str:
        return WORDS[value][synonym.get(value, 0)]

    obj = word(shape) if shape else GENERIC_SHAPE
    if color:
        obj = f"{word(color)} {obj}"
    with_bg, without_bg = TEMPLATES[template]
    caption = with_bg.format(obj=obj, bg=word(background)) if background else without_bg.format(obj=obj)
    return _ARTICLE.sub(r"\1an \2", caption)


def canonical(scene: Scene, template: int = 0) -> str:
    """The scene in canonical words."""
    return describe(scene.shape, scene.color, scene.background, template)


def zero_shot(scene: Scene, rng: np.random.Generator) -> str:
    """A zero-shot phrasing: every factor said with a word never trained on, in a template never
    trained on."""
    template = ZERO_SHOT_TEMPLATES[int(rng.integers(len(ZERO_SHOT_TEMPLATES)))]
    obj = f"{ZERO_SHOT_WORDS[scene.color]} {ZERO_SHOT_WORDS[scene.shape]}"
    return _ARTICLE.sub(r"\1an \2", template.format(obj=obj, bg=ZERO_SHOT_WORDS[scene.background]))


def paraphrase(scene: Scene, rng: np.random.Generator) -> str:
    """A held-out paraphrase: every factor said with a synonym, in a held-out template."""
    template = int(rng.choice(HELDOUT_TEMPLATES))
    values = (scene.shape, scene.color, scene.background)
    synonym = {v: int(rng.integers(1, len(WORDS[v]))) for v in values}
    return describe(*values, template=template, synonym=synonym)


def training_caption(
    scene: Scene, rng: np.random.Generator, p_empty: float = 0.1, p_drop: float = 0.1, p_synonym: float = 0.3
) -> str:
    """A caption as the model sees it in training: empty with probability `p_empty` (for
    classifier-free guidance); each factor left unsaid with `p_drop`; synonyms with `p_synonym`,
    only in the training templates."""
    if rng.random() < p_empty:
        return ""
    values = [v if rng.random() >= p_drop else None for v in (scene.shape, scene.color, scene.background)]
    synonym = {v: int(rng.integers(1, len(WORDS[v]))) for v in values if v and rng.random() < p_synonym}
    pool = TRAIN_SYNONYM_TEMPLATES if synonym else tuple(range(len(TEMPLATES)))
    return describe(*values, template=int(rng.choice(pool)), synonym=synonym)


def vocabulary() -> list[str]:
    """Every word any caption can contain, sorted."""
    words = {GENERIC_SHAPE}
    for phrase in (w for ws in WORDS.values() for w in ws):
        words.update(phrase.replace(",", " ").split())
    for pair in TEMPLATES:
        for t in pair:
            words.update(t.replace("{obj}", "").replace("{bg}", "").replace(",", " , ").split())
    return sorted(words)

