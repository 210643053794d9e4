"""One conformance check that every erasure method and every eraser kind passes (in the spirit of
scikit-learn's `check_estimator`), on ConceptWorld at a tiny budget (2 pairs, 2 steps, 32 px).

Methods are parametrized from the registry `evaluation.baselines.METHODS` (plus variants such as
ConceptPrune's unit rule): a method registered later without an entry in `METHOD_BUILDERS` fails
here, and so does a `Method` subclass that is not registered. For each one:

1. it fits on the tiny setup (fit returns self, times itself, describes itself as JSON, and fitting
   leaves the model as it was);
2. inside `applied` the target prompt's image changes (Unerased: it is exactly the plain image), the
   images are well formed, weight edits are in place, and a second entry gives the same images;
3. after `applied`, also when the block raises, the model's images equal the unerased ones bit for
   bit, no forward hook or pre-hook is left on any module of any pipeline component (nor a global
   one), and every parameter and buffer is restored exactly, with its grad, requires_grad and
   train/eval mode;
4. what saves round-trips: ActErase's fitted eraser, and a method that gains save/load.

Erasers (`ERASER_BUILDERS`: every way the package makes one: fitted under each mask option,
per-step masks and values, token masks, z-score, restore values, saturated, merged, hand-made over
input/output/UNet-output sites, text-encoder sites, the analysis `SubspacePatch` and the gated eraser) pass 2-3 under
`applied` and under the nnsight trace path (`patch_in_trace`), and 4 by save / load to tmp_path.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.modules import module as torch_module

from tests.conftest import traced_images

from acterase_interp.analysis.subspace import SubspacePatch
from acterase_interp.erase import EraseOptions, Eraser, EraserFitter, FitStatistics, GatedEraser, fit_gated, merge
from acterase_interp.evaluation.baselines import (
    FIA,
    METHODS,
    GatedKV,
    SLD,
    UCE,
    ActErase,
    CASteer,
    ConceptPrune,
    ESDx,
    NegativePrompt,
    Unerased,
)
from acterase_interp.evaluation.method import Method, WeightEdit
from acterase_interp.generation import generate
from acterase_interp.world.pairs import conceptworld_pairs

STEPS = 2
SEED = 0
"""Seeds of the checked images (prompt i: SEED + i), as conftest's `traced_images` seeds them."""

# -- the conformance tables --------------------------------------------------------------------

METHOD_BUILDERS: dict[str, tuple[str, Callable[[], Method]]] = {
    "unerased": ("unerased", lambda: Unerased()),
    "acterase": ("acterase", lambda: ActErase(EraseOptions(num_inference_steps=STEPS), tau=0.5)),
    "negative_prompt": ("negative_prompt", lambda: NegativePrompt()),
    "sld": ("sld", lambda: SLD()),
    "uce": ("uce", lambda: UCE()),
    "concept_prune": ("concept_prune", lambda: ConceptPrune(top_fraction=0.2, num_inference_steps=STEPS)),
    "concept_prune_unit": ("concept_prune", lambda: ConceptPrune(top_fraction=0.2, rule="unit", num_inference_steps=STEPS)),
    # the smallest budget ESD-x accepts: one Adam step on one image (lr raised so one step shows)
    "esd_x": ("esd_x", lambda: ESDx(steps=1, batch=1, images_per_prompt=1, num_inference_steps=STEPS, lr=1e-2)),
    "fia": ("fia", lambda: FIA(r2=0.05, num_inference_steps=STEPS)),
    "casteer": ("casteer", lambda: CASteer(num_inference_steps=STEPS)),
    "gated_kv": ("gated_kv", lambda: GatedKV(scope="token")),
    "gated_kv_prompt": ("gated_kv", lambda: GatedKV(scope="prompt")),
}  # fmt: skip
"""Case id -> (registry name, a method at the tiny budget). Every registry name needs one."""

METHOD_CASES = sorted(set(METHODS) | set(METHOD_BUILDERS))
"""Registered names without a builder are cases too: they fail, naming what is missing."""

UNCHANGED = {"unerased"}
"""Cases that legitimately leave the images as they are: Unerased is the reference row."""


@dataclass(frozen=True)
class World:
    model: Any
    pairs: Any
    prompts: list[str]
    """A held-out target prompt (the concept, paraphrased) first, then a non-target prompt."""
    plain: torch.Tensor
    """The unerased model's images of `prompts`."""
    state: dict


def _components(model) -> dict[str, nn.Module]:
    return {k: v for k, v in model.pipeline.components.items() if isinstance(v, nn.Module)}


def _tensors(comp: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from comp.named_parameters()
    yield from (("buffer:" + k, b) for k, b in comp.named_buffers())


def _flags(comp: nn.Module) -> dict:
    return {"grad_is_none": [p.grad is None for p in comp.parameters()],
            "requires_grad": [p.requires_grad for p in comp.parameters()],
            "training": [m.training for m in comp.modules()]}  # fmt: skip


def _state(model) -> dict:
    """Everything `applied` must give back, per pipeline component: every parameter and buffer
    (cloned), whether it has a grad, its requires_grad, and every module's train/eval mode."""
    return {cname: ({k: v.detach().clone() for k, v in _tensors(comp)}, _flags(comp))
            for cname, comp in _components(model).items()}  # fmt: skip


def _assert_state(model, want: dict) -> None:
    comps = _components(model)
    assert comps.keys() == want.keys()
    for cname, comp in comps.items():
        tensors, flags = want[cname]
        live = dict(_tensors(comp))
        assert live.keys() == tensors.keys(), cname
        changed = [k for k, v in tensors.items() if not (live[k].dtype == v.dtype and torch.equal(live[k].detach(), v))]
        assert not changed, f"{cname}: {len(changed)} tensors not restored bit for bit, e.g. {changed[:3]}"
        assert _flags(comp) == flags, f"{cname}: a grad, requires_grad or train/eval mode changed"


def _hooks(model) -> list[str]:
    """Every forward hook or pre-hook on any module of any pipeline component, and global ones."""
    found = [f"{cname}.{name or '<root>'}"
             for cname, comp in _components(model).items() for name, m in comp.named_modules()
             if m._forward_hooks or m._forward_pre_hooks]  # fmt: skip
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        found.append("<global>")
    return found


def _images(model, prompts) -> torch.Tensor:
    return generate(model, prompts, seeds=SEED, num_inference_steps=STEPS, progress=False)


def _assert_left_clean(world: World, images: bool = True) -> None:
    """No hook anywhere, every tensor and flag as it was, and (with `images`) the plain images."""
    assert _hooks(world.model) == []
    _assert_state(world.model, world.state)
    if images:
        assert torch.equal(_images(world.model, world.prompts), world.plain)


def _assert_target_changed(erased: torch.Tensor, plain: torch.Tensor) -> None:
    assert erased.shape == plain.shape and erased.dtype == plain.dtype
    assert torch.isfinite(erased).all() and erased.min() >= 0 and erased.max() <= 1
    assert (erased[0] - plain[0]).abs().max() > 1e-3, "the target prompt's image did not change"


@pytest.fixture(scope="module")
def world(conceptworld) -> World:
    assert _hooks(conceptworld) == [], "another test left hooks on the session model"
    pairs = conceptworld_pairs("triangle", n=2)
    prompts = [pairs.heldout[0], pairs.non_target[0]]
    return World(conceptworld, pairs, prompts, _images(conceptworld, prompts), _state(conceptworld))


@pytest.fixture(scope="module")
def fitted(world) -> dict[str, Method]:
    """Case id -> its method fitted on the world, by `test_method_conforms` or on first use."""
    return {}


def _fitted(world: World, cache: dict[str, Method], case: str) -> Method:
    _builder(case)
    if case not in cache:
        cache[case] = METHOD_BUILDERS[case][1]().fit(world.model, world.pairs)
    return cache[case]


def _saves(obj: Any) -> bool:
    """Whether `obj`'s class defines save and load (not `hasattr`: nnsight puts a `save` on `object`)."""
    own = [vars(c) for c in type(obj).__mro__ if c is not object]
    return any("save" in v for v in own) and any("load" in v for v in own)


def _builder(case: str) -> tuple[str, Callable[[], Method]]:
    if case not in METHOD_BUILDERS:
        pytest.fail(f"registered method {case!r} has no conformance entry: add it to METHOD_BUILDERS in {__name__}")
    registered, make = METHOD_BUILDERS[case]
    if registered not in METHODS:
        pytest.fail(f"conformance entry {case!r} names {registered!r}, which the registry no longer has")
    return registered, make


# -- methods ------------------------------------------------------------------------------------


def test_the_conformance_table_covers_the_registry_and_every_method_class():
    assert {registered for registered, _ in METHOD_BUILDERS.values()} == set(METHODS)

    def subclasses(cls: type) -> Iterator[type]:
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    # a concrete method class of the package (one that names itself) must be registered to be checked
    named = {c for c in subclasses(Method) if c.__module__.startswith("acterase_interp") and "name" in vars(c)}
    assert named and named <= set(METHODS.values()), sorted(c.__name__ for c in named - set(METHODS.values()))


@pytest.mark.parametrize("case", METHOD_CASES)
def test_method_conforms(world, fitted, case):
    registered, make = _builder(case)
    model = world.model
    method = make()
    assert type(method) is METHODS[registered] and method.name == registered
    # (1) it fits on the tiny setup, and fitting changes nothing
    assert method.fit(model, world.pairs) is method
    fitted[case] = method
    assert isinstance(method.fit_seconds_, float) and method.fit_seconds_ >= 0
    description = json.loads(json.dumps(method.describe()))
    assert description["name"] == registered
    assert _hooks(model) == []
    _assert_state(model, world.state)
    # (2) inside `applied` it erases
    params = dict(model.pipeline.unet.named_parameters())
    with method.applied(model) as sample:
        erased = sample(world.prompts, SEED, num_inference_steps=STEPS)
        if isinstance(method, WeightEdit):
            assert method.edits_, "a weight edit that edits nothing"
            for n, value in method.edits_.items():
                assert torch.equal(params[n].detach(), value.to(params[n].dtype)), f"{n} is not the edited value"
            original = world.state["unet"][0]
            assert any(not torch.equal(value, original[n]) for n, value in method.edits_.items())
    if case in UNCHANGED:  # the reference row: it must be the plain pipeline, bit for bit
        assert torch.equal(erased, world.plain)
    else:
        _assert_target_changed(erased, world.plain)
    # (3) bit-identical outside
    _assert_left_clean(world)
    # entering again gives the same images: nothing leaked from the first entry into the method or the model
    with method.applied(model) as sample:
        assert torch.equal(sample(world.prompts, SEED, num_inference_steps=STEPS), erased)
    _assert_left_clean(world)


@pytest.mark.parametrize("case", METHOD_CASES)
def test_method_restores_the_model_when_the_block_raises(world, fitted, case):
    model, method = world.model, _fitted(world, fitted, case)
    with pytest.raises(RuntimeError, match="boom"):
        with method.applied(model) as sample:
            sample(world.prompts[:1], SEED, num_inference_steps=STEPS)
            raise RuntimeError("boom")
    _assert_left_clean(world)
    with method.applied(model):  # and entering right after works, leaving nothing either
        pass
    _assert_left_clean(world, images=False)


@pytest.mark.parametrize("case", METHOD_CASES)
def test_method_artifacts_round_trip(world, fitted, tmp_path, case):
    """(4) Methods have no artifact format of their own; what saves is ActErase's eraser, whose
    loaded copy must give the method's images bit for bit. A method that gains save/load is
    round-tripped here the same way; the others have nothing to check."""
    method = _fitted(world, fitted, case)
    if not (_saves(method) or isinstance(method, ActErase)):
        pytest.skip(f"{type(method).__name__} has no save/load")
    with method.applied(world.model) as sample:
        erased = sample(world.prompts, SEED, num_inference_steps=STEPS)
    if _saves(method):
        method.save(tmp_path / "method")
        with type(method).load(tmp_path / "method").applied(world.model) as sample:
            assert torch.equal(sample(world.prompts, SEED, num_inference_steps=STEPS), erased)
    else:
        method.eraser_.save(tmp_path / "eraser")
        with Eraser.load(tmp_path / "eraser", model=world.model).applied(world.model):
            assert torch.equal(_images(world.model, world.prompts), erased)
    _assert_left_clean(world, images=False)


# -- erasers and patches -------------------------------------------------------------------------


class _Fits:
    """The fit statistics the erasers are cut from, each fitted once, when first asked for."""

    def __init__(self, model, pairs) -> None:
        self.model, self.pairs = model, pairs

    def _fit(self, pairs=None, **options) -> FitStatistics:
        options = EraseOptions(**{"num_inference_steps": STEPS, "tau": 0.05, **options})
        fitter = EraserFitter(self.model, options, restorable=True, progress=False)
        fitter.fit(pairs or self.pairs)
        return fitter.statistics

    @functools.cached_property
    def base(self) -> FitStatistics:
        return self._fit()

    @functools.cached_property
    def circle(self) -> FitStatistics:
        return self._fit(conceptworld_pairs("circle", n=2))

    @functools.cached_property
    def per_step_values(self) -> FitStatistics:
        return self._fit(value_mode="per_step", time_mask="per_step", tau=0.2)

    @functools.cached_property
    def token_unit(self) -> FitStatistics:
        return self._fit(granularity="token_unit", tau=0.2)

    @functools.cached_property
    def text(self) -> FitStatistics:
        return self._fit(site_kind=("text_layer", "attn2_out"), tau=0.2)


def _hand_made(fits: _Fits) -> Eraser:
    """Per-step random masks and values over an input site, an output site and the UNet output."""
    g = torch.Generator().manual_seed(0)
    shapes = {"down.0.0.ffn_hidden": (64, 256), "mid.0.attn2_out": (16, 128), "unet_out": (64, 4)}
    masks = {n: torch.rand(STEPS, *s, generator=g) < 0.3 for n, s in shapes.items()}
    values = {n: torch.randn(STEPS, *s, generator=g) for n, s in shapes.items()}
    return Eraser.from_tensors(fits.model, masks, values, timesteps=fits.base.eraser().manifest["timesteps"])


@dataclass(frozen=True)
class _Windowed:
    """A `SubspacePatch` switched on for its first denoising step only (`applied(model, steps)`)."""

    patch: SubspacePatch
    steps: tuple[int, int] = (0, 1)

    @contextmanager
    def applied(self, model):
        with self.patch.applied(model, self.steps):
            yield self


ERASER_BUILDERS: dict[str, Callable[[_Fits], Any]] = {
    "fitted": lambda f: f.base.eraser(),
    "absolute": lambda f: f.base.eraser(tau=0.3, tau_mode="absolute"),  # (the other mask options: the same tensors)
    "per_step_masks": lambda f: f.base.eraser(time_mask="per_step", tau=0.2),
    "per_step_values": lambda f: f.per_step_values.eraser(),
    "token_unit": lambda f: f.token_unit.eraser(),
    "zscore": lambda f: f.base.eraser(ranking="zscore", top_k=16),
    "restore_values": lambda f: f.base.eraser(tau=0.2, values="target"),
    "saturated": lambda f: f.base.eraser().saturated(),
    "merged_two_concepts": lambda f: merge([f.base.eraser(tau=0.2), f.circle.eraser(tau=0.2)]),
    "merged_per_step": lambda f: merge([f.base.eraser(), f.base.eraser(time_mask="per_step", tau=0.2)]),
    "hand_made_per_step": _hand_made,
    "text_layer_and_attn2": lambda f: f.text.eraser(),
    "subspace_directions": lambda f: SubspacePatch.from_statistics(f.base, k=2, kind="directions"),
    "subspace_units": lambda f: SubspacePatch.from_statistics(f.base, k=16, kind="units"),
    "subspace_first_step": lambda f: _Windowed(SubspacePatch.from_statistics(f.base, k=2, kind="directions")),
    "gated_kv": lambda f: fit_gated(f.model, f.pairs),
}  # fmt: skip
"""Every kind of eraser or erasing patch the package makes, at the tiny budget."""


@pytest.fixture(scope="module")
def fits(world) -> _Fits:
    return _Fits(world.model, world.pairs)


@pytest.fixture(scope="module")
def erasers(fits) -> Callable[[str], Any]:
    return functools.cache(lambda kind: ERASER_BUILDERS[kind](fits))


@pytest.fixture(scope="module")
def erased_images() -> dict[str, torch.Tensor]:
    """Kind -> the world's images under `applied`, as `test_eraser_conforms` found them."""
    return {}


@pytest.mark.parametrize("kind", list(ERASER_BUILDERS))
def test_eraser_conforms(world, erasers, erased_images, kind):
    model = world.model
    patch = erasers(kind)  # (1) built on the tiny setup; building touched nothing
    assert _hooks(model) == []
    _assert_state(model, world.state)
    if isinstance(patch, Eraser):
        assert patch.check_model(model) is None and any(d > 0 for d in patch.mask_density().values())
        assert math.isfinite(sum(patch.mask_density().values()))
    with patch.applied(model):  # (2) it erases
        assert _hooks(model), "switched on, yet no hook is registered"
        erased = erased_images[kind] = _images(model, world.prompts)
    _assert_target_changed(erased, world.plain)
    _assert_left_clean(world, images=False)  # (3) bit-identical outside (the images: at the end)
    with patch.applied(model):  # again: the same images (no state kept between entries)
        assert torch.equal(_images(model, world.prompts), erased)
    with pytest.raises(RuntimeError, match="boom"):  # and left clean when the block raises
        with patch.applied(model):
            _images(model, world.prompts[:1])
            raise RuntimeError("boom")
    _assert_left_clean(world)


@pytest.mark.parametrize("kind", [k for k in ERASER_BUILDERS if k != "subspace_first_step"])  # no step window there
def test_eraser_trace_path_conforms(world, erasers, erased_images, kind):
    """The other way to switch a patch on, inside a user's nnsight trace (`Eraser.apply`, i.e.
    `patch_in_trace`), gives the hooks path's images bit for bit and leaves nothing behind."""
    model, patch = world.model, erasers(kind)
    if kind not in erased_images:  # this test run alone
        with patch.applied(model):
            erased_images[kind] = _images(model, world.prompts)
    assert torch.equal(traced_images(model, patch, world.prompts, STEPS), erased_images[kind])
    _assert_left_clean(world)


@pytest.mark.parametrize("kind", list(ERASER_BUILDERS))
def test_eraser_save_load_round_trip(world, erasers, erased_images, tmp_path, kind):
    """(4) Every `Eraser` and `GatedEraser` saves to a folder and loads back to the same images bit for bit. The
    analysis `SubspacePatch` has no artifact format (it is rebuilt from saved fit statistics)."""
    model, patch = world.model, erasers(kind)
    if not isinstance(patch, (Eraser, GatedEraser)):
        assert not _saves(patch), "a patch that now saves: round-trip it here"
        pytest.skip(f"{type(patch).__name__} has no artifact format")
    patch.save(tmp_path / "eraser")
    back = type(patch).load(tmp_path / "eraser", model=model)
    assert back.sites == patch.sites and back.manifest == patch.manifest
    for part in ("masks", "values") if isinstance(patch, Eraser) else ("basis", "benign", "direction", "threshold"):
        mine, theirs = getattr(patch, part), getattr(back, part)
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[n], theirs[n]) for n in mine)
    with back.applied(model):
        loaded = _images(model, world.prompts)
    if kind not in erased_images:  # this test run alone
        with patch.applied(model):
            erased_images[kind] = _images(model, world.prompts)
    assert torch.equal(loaded, erased_images[kind])
    _assert_left_clean(world, images=False)
