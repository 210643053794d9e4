"""The quickstart's control panel: one collection run per concept, every mask after that from the
stored statistics, and images that match what the eraser itself generates."""

from __future__ import annotations

import pytest
import torch

from acterase_interp import EraseOptions, generate, load_classifier
from acterase_interp.analysis import layers_of
from acterase_interp.panel import ErasurePanel

STEPS = 2


@pytest.fixture(scope="module")
def panel(conceptworld) -> ErasurePanel:
    options = EraseOptions(num_inference_steps=STEPS, seed=0)
    return ErasurePanel(conceptworld, load_classifier(), options, n_pairs=1, n_images=1, seed=1000,
                        num_inference_steps=STEPS)  # fmt: skip


def test_view_shows_before_and_after_on_the_same_seeds(panel, conceptworld):
    stats = panel.statistics("heart")
    assert panel.statistics("heart") is stats  # fitted once
    blocks = tuple(layers_of(stats))
    view = panel.view("heart", 0.05, blocks)
    prompts = panel.prompts("heart")
    assert len(prompts) == 2 and view.images.shape[0] == 4 and len(view.labels) == 4
    before = generate(conceptworld, prompts, seeds=1000, num_inference_steps=STEPS, progress=False)
    with stats.eraser(tau=0.05, blocks=blocks).applied(conceptworld):
        after = generate(conceptworld, prompts, seeds=1000, num_inference_steps=STEPS, progress=False)
    assert torch.equal(view.images, torch.cat([before, after]))
    assert [label.split(":")[0] for label in view.labels] == ["before", "before", "after", "after"]
    assert view.density == stats.eraser(tau=0.05, blocks=blocks).mask_density()
    assert panel.last is view and view.summary().startswith("heart: tau=0.0500, layers ")


def test_masks_follow_tau_and_blocks_without_a_new_fit(panel):
    stats = panel.statistics("heart")
    first = layers_of(stats)[0]
    views = {tau: panel.view("heart", tau, (first,)) for tau in (0.01, 0.5)}
    assert panel.statistics("heart") is stats
    for tau, view in views.items():
        assert {s.rsplit(".", 1)[0] for s in view.density} == {first}
        assert view.density == stats.eraser(tau=tau, blocks=(first,)).mask_density()
    assert views[0.01].density != views[0.5].density


def test_seeded_fits_are_used_and_bad_input_is_refused(conceptworld, panel):
    stats = panel.statistics("heart")
    seeded = ErasurePanel(conceptworld, panel.classifier, panel.options, n_pairs=1, n_images=1, fits={"heart": stats})
    assert seeded.statistics("heart") is stats
    with pytest.raises(ValueError, match="at least one block"):
        seeded.view("heart", 0.05, ())
    with pytest.raises(ValueError, match="n_pairs and n_images must be at least 1"):
        ErasurePanel(conceptworld, panel.classifier, panel.options, n_pairs=0, n_images=1)
