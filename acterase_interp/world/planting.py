"""Planted ConceptWorld concepts: their data and the shipped recipe.

    acterase plant --model DIR --concept heart --family ffn [--blocks ...] --out DIR2
    acterase plant --model DIR --shipped --out DIR2      # the default model's three plants

A plantable value (`factors.PLANTABLE`) is taught to a trained ConceptWorld model by
`acterase_interp.plant`, which trains only the chosen parameters. The data mix the new concept
(a `fraction` of the images) with scenes of everything the model already draws, so nothing else
drifts. Each planting appends its record (family, blocks, units, steps, data, the bit-identity
check) to `planted.json` in the pipeline folder (`model.planted` once loaded): the ground truth
that localization is scored against.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..plant import PlantRecord, PlantSpec, plant
from .captions import training_caption
from .concept import Concept, as_concept, with_values
from .factors import PLANTABLE, Scene, sample_scenes
from .render import render_batch


SHIPPED: tuple[tuple[str, PlantSpec], ...] = (
    ("moon", PlantSpec("ffn", blocks=None, steps=800, lr=5e-4, seed=11)),
    ("heart", PlantSpec("ffn_units", blocks=("up.0.0", "up.0.1"), units=32, steps=600, lr=1e-3, seed=12)),
    ("cyan", PlantSpec("attn2_kv", blocks=("up.1.0", "up.1.1"), steps=1000, lr=1e-3, seed=13)),
)
"""The default model's planted concepts, in planting order: a shape dense in every FFN, a shape in
32 hidden units of two blocks, a color in the cross-attention keys and values of two blocks. (A
first recipe planted the heart dense and the moon in the 32 units, 600 steps each: the moon was
then drawn in only 42% of its prompts, so the two shapes swapped places.)"""


def check_plantable(concept: str | Concept) -> Concept:
    """`concept` as a Concept; a clear error unless it is a plantable value."""
    if (name := str(concept)) not in {v for vs in PLANTABLE.values() for v in vs}:
        raise ValueError(f"{name!r} is not plantable; choose from {PLANTABLE}")
    return as_concept(concept)


def planting_data(
    concept: str | Concept,
    known: Sequence[str | Concept] = (),
    n_images: int = 6000,
    fraction: float = 1 / 6,
    seed: int = 0,
) -> tuple[list[Scene], torch.Tensor, list[str], dict]:
    """`n_images` renders with training captions: a `fraction` showing `concept`, the rest scenes
    of the natural values and the `known` (earlier planted) concepts. Returns scenes, images
    (N, 3, 32, 32) in [-1, 1], captions and a description for the record."""
    concept = check_plantable(concept)
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    values = with_values([*known, concept])
    scenes = sample_scenes(n_images, rng, values)
    for i in np.flatnonzero(rng.random(n_images) < fraction):  # the new concept in a fraction of scenes
        scenes[i] = concept.replace_in(scenes[i])
    images = torch.from_numpy(render_batch(scenes, rng))
    captions = [training_caption(s, rng) for s in scenes]
    shown = sum(getattr(s, concept.factor) == concept.value for s in scenes)
    data = {"n_images": n_images, "with_concept": shown, "fraction": fraction, "seed": seed,
            "values": {f: list(v) for f, v in values.items()}}  # fmt: skip
    return scenes, images, captions, data


def plant_concept(
    pipeline,
    concept: str | Concept,
    spec: PlantSpec,
    known: Sequence[str | Concept] = (),
    n_images: int = 6000,
    fraction: float = 1 / 6,
    progress: bool = True,
) -> PlantRecord:
    """Plant a ConceptWorld `concept` into `pipeline` in place (see the module docstring)."""
    concept = check_plantable(concept)
    scenes, images, captions, data = planting_data(concept, known, n_images, fraction, spec.seed)
    replay = torch.tensor([getattr(s, concept.factor) != concept.value for s in scenes])
    record = plant(pipeline, images, captions, concept.value, spec, data=data, replay=replay, progress=progress)
    record.data["factor"] = concept.factor
    return record


def plant_shipped(model, progress: bool = True) -> list[PlantRecord]:
    """Plant `SHIPPED` into a loaded, unplanted ConceptWorld `model` in place, in order, each with
    the earlier ones in its replay data; `model.planted` gets the records."""
    if model.planted:
        raise ValueError(f"the model already holds planted concepts {[r['concept'] for r in model.planted]}")
    records = []
    for concept, spec in SHIPPED:
        record = plant_concept(model.pipeline, concept, spec, [r.concept for r in records], progress=progress)
        records.append(record)
        model.planted.append(record.to_dict())
    return records
