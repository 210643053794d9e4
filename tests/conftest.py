"""Shared fixtures: heavy models are built once per session; and the split into two tiers.

The README's test command runs the fast tier (`-m "not slow"`); the second command (`-m slow`)
runs the rest, and CI runs both. Slow by construction: every test on a real-size SD architecture
(the `random_sd` fixture, SDXL), and the modules in `SLOW_MODULES`; other tests opt in with
`@pytest.mark.slow`.

The random-weight SD pipelines (about 4-5 GB each) are one parametrized session fixture, so pytest
groups the tests of each version together and frees one pipeline before building the next.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from diffusers import StableDiffusionPipeline
from nnsight import DiffusionModel

from acterase_interp.loading import load, load_classifier
from acterase_interp.patching import patch_in_trace
from acterase_interp.random_sd import build_random_sd
from acterase_interp.sites import Site, discover_sites

# Tiny models gain nothing from many threads; respect OMP_NUM_THREADS where the caller set it.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(min(4, os.cpu_count() or 1))

SLOW_FIXTURES = frozenset({"random_sd"})
"""Random-weight SD 1.5 / 2.1 at full parameter count: gigabytes of memory and seconds per call."""
SLOW_MODULES = frozenset({"tests.test_sdxl", "tests.test_sdxl_evaluation", "tests.test_notebooks", "tests.test_browser",
                          "tests.benchmarks.test_run", "tests.benchmarks.test_gpu"})
"""SDXL (real size and tiny), executed notebooks, the real browser, the benchmark commands."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__ if item.module else ""
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or module in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seeded_torch() -> None:
    """Seed torch's global generator before every test, so a test's unseeded draws are the same
    in every run and order: a rounding tolerance that holds here holds in CI."""
    torch.manual_seed(0)


SD_LATENT = 16
"""Latent side of the random SD pipelines in tests (128-pixel images): every weight is real size,
only the activations are small."""


@pytest.fixture(scope="session")
def conceptworld() -> DiffusionModel:
    """The bundled ConceptWorld model."""
    return load("conceptworld")


@pytest.fixture(scope="session")
def classifier():
    """The default ConceptWorld model's classifier, loaded once per session."""
    return load_classifier("conceptworld")


@pytest.fixture(scope="session")
def conceptworld_sites(conceptworld: DiffusionModel) -> list[Site]:
    pipe = conceptworld.pipeline
    return discover_sites(pipe.unet, text_tokens=pipe.tokenizer.model_max_length)  # 24 tokens, not CLIP's 77


@dataclass(frozen=True)
class RandomSD:
    """A random-weight SD pipeline, wrapped, with its sites."""

    version: str
    """"1.5" or "2.1"."""
    model: DiffusionModel
    """`load(pipeline)`."""
    pipeline: StableDiffusionPipeline
    """The raw pipeline that `build_random_sd` returned."""
    sites: list[Site]
    """`discover_sites` at `SD_LATENT` latent pixels."""


@pytest.fixture(scope="session", params=["1.5", "2.1"], ids=["sd15", "sd21"])
def random_sd(request: pytest.FixtureRequest) -> RandomSD:
    pipe = build_random_sd(request.param, seed=0, sample_size=SD_LATENT)
    return RandomSD(request.param, load(pipe), pipe, discover_sites(pipe.unet))


def fired_order(unet, sites: list[Site], run: Callable[[], object]) -> list[str]:
    """Names of `sites` in the order their activations appear while `run()` calls `unet` once,
    from pre-hooks (inputs) and forward hooks (outputs)."""
    fired: list[str] = []
    handles = []
    for s in sites:
        module = unet.get_submodule(s.module_path) if s.module_path else unet
        if s.io == "input":
            handles.append(module.register_forward_pre_hook(lambda m, a, name=s.name: fired.append(name)))
        else:
            handles.append(module.register_forward_hook(lambda m, a, o, name=s.name: fired.append(name)))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return fired


def traced_images(model: DiffusionModel, patch, prompts: list[str], steps: int) -> torch.Tensor:
    """Images with `patch` applied inside an nnsight trace, step by step (seed i for prompt i)."""
    d = model.defaults
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    with model.generate(prompts, num_inference_steps=steps, guidance_scale=d.guidance_scale, height=d.height,
                        width=d.width, generator=generators, output_type="pt") as tracer:  # fmt: skip
        for step in tracer.iter[:steps]:
            patch_in_trace(model, patch, step)  # what Eraser.apply does
        images = model.output.images.save()
    return images.float().cpu()


def hook_count(model: DiffusionModel) -> int:
    """Forward hooks and pre-hooks on the UNet's modules (0 when nothing is patched)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.pipeline.unet.modules())
