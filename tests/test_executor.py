"""Sweeps on many workers: a local two-worker Dask cluster on ConceptWorld gives exactly the rows of
the serial run, each worker loading the model once; and the executor plumbing on its own."""

import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch

import acterase_interp
from acterase_interp.analysis import Evaluator, causal_map, eraser_measure, fit_seeds, tau_sweep
from acterase_interp.erase import EraseOptions
from acterase_interp.executor import Spec, require_spec, run_cells, worker_local
from acterase_interp.loading import conceptworld_dir, load
from acterase_interp.world.classifier import ConceptClassifier
from acterase_interp.world.pairs import conceptworld_pairs

STEPS = 2
BUILDS = []


def _count_build(x):
    BUILDS.append(x)
    return [x]


def test_a_spec_is_built_once_per_process_and_compares_by_value():
    spec = Spec.of(_count_build, "a")
    assert spec == Spec.of(_count_build, "a") and spec.build() is Spec.of(_count_build, "a").build()
    assert BUILDS.count("a") == 1 and spec.build() == ["a"]
    assert worker_local("some key", lambda: 1) == 1 and worker_local("some key", lambda: 2) == 1
    with pytest.raises(TypeError, match="Spec"):
        require_spec(object(), "model")


def test_run_cells_keeps_order_and_refuses_threads():
    assert run_cells(pow, [(2, 3), (3, 2)], progress=False) == [8, 9]
    with ThreadPoolExecutor(2) as threads, pytest.raises(TypeError, match="processes"):
        run_cells(pow, [(2, 3)], threads, progress=False)


def test_an_evaluator_on_a_loaded_model_refuses_to_travel(conceptworld):
    evaluator = Evaluator(conceptworld, object(), "red", ["a red circle on a plain background"])
    with pytest.raises(TypeError, match="Spec"):
        evaluator.require_specs()
    with pytest.raises(TypeError, match="Spec"):
        tau_sweep({0: None}, evaluator, [0.1], executor=object(), progress=False)


@contextmanager
def _threads(n: int):
    """CPU kernels reduce in an order that depends on the thread count: the serial reference runs
    with as many threads as a worker (one), so that "identical" can mean bitwise."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _same(a, b) -> bool:
    """Equal rows, NaN equal to NaN (json writes both as NaN)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _worker_state() -> dict:
    from acterase_interp import executor

    return {"package": acterase_interp.__file__, "threads": torch.get_num_threads(),
            "models": sum(key[0] == "spec" and key[1].factory is load for key in executor._LOCAL)}  # fmt: skip


@pytest.mark.slow
def test_a_two_worker_cluster_gives_the_serial_rows():
    distributed = pytest.importorskip("distributed")
    pairs = conceptworld_pairs("red", n=2)
    model = Spec.of(load, "conceptworld")
    classifier = Spec.of(ConceptClassifier.load, str(conceptworld_dir() / "classifier"))
    evaluator = Evaluator(model, classifier, "red", pairs.targets, pairs.non_target[:2], num_inference_steps=STEPS)
    options = EraseOptions(num_inference_steps=STEPS)
    taus, seeds = [0.05, 0.5], (0, 1)
    with _threads(1):
        fits = fit_seeds(model, pairs, options, seeds, progress=False)
        serial = tau_sweep(fits, evaluator, taus, progress=False)
        measure = eraser_measure(fits[0], evaluator, tau=1.0, seeds=(0,))
        serial_causal = causal_map(measure, ["up.0.0", "up.0.1"], [(0, STEPS)], progress=False)
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with cluster, distributed.Client(cluster) as client:
        remote_fits = fit_seeds(model, pairs, options, seeds, executor=client, progress=False)
        rows = tau_sweep(remote_fits, evaluator, taus, executor=client, progress=False)
        causal = causal_map(measure, ["up.0.0", "up.0.1"], [(0, STEPS)], executor=client, progress=False)
        state = client.run(_worker_state)
    assert len(state) == 2 and len(rows) == len(taus) * len(seeds)
    assert sum(w["models"] for w in state.values()) >= 1
    for worker in state.values():  # our package, one thread, the model loaded at most once for its many cells
        assert worker["package"] == acterase_interp.__file__ and worker["threads"] == 1 and worker["models"] <= 1
    for s in seeds:
        for field in ("importance_source", "importance_target", "values"):
            theirs, ours = getattr(remote_fits[s], field), getattr(fits[s], field)
            assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert _same(rows, serial) and _same(causal, serial_causal)
    assert len({r["concept_rate"] for r in rows} | {r["image_distance"] for r in rows}) > 1  # not all alike


def test_worker_local_keeps_at_most_keep_objects_of_a_kind_least_recently_used_out():
    from acterase_interp import executor

    built = []
    for i in range(6):
        worker_local(("test-kind", i), lambda i=i: built.append(i) or i, keep=4)
    worker_local(("test-kind", 2), lambda: built.append("again"), keep=4)  # used: now the most recent
    worker_local(("test-kind", 6), lambda: built.append(6) or 6, keep=4)
    kept = [k[1] for k in executor._LOCAL if k[:1] == ("test-kind",)]
    assert kept == [4, 5, 2, 6] and built == [0, 1, 2, 3, 4, 5, 6]
    assert worker_local(("other-kind",), lambda: "x") == "x"  # other kinds are not counted
    for k in [k for k in executor._LOCAL if k[:1] in (("test-kind",), ("other-kind",))]:
        del executor._LOCAL[k]


def test_equal_evaluators_share_one_worker_cache_and_a_worker_keeps_few():
    from acterase_interp import executor
    from acterase_interp.analysis.evaluation import EVALUATORS_KEPT

    model = Spec.of(load, "conceptworld")  # never built: evaluators resolve the model on first use
    classifier = Spec.of(ConceptClassifier.load, str(conceptworld_dir() / "classifier"))
    make = lambda prompts: Evaluator(model, classifier, "red", prompts, images_per_prompt=2)  # noqa: E731
    def travel(evaluator):  # what unpickling on a worker runs: the evaluator's own __reduce__ recipe
        rebuild, args = evaluator.__reduce__()
        return rebuild(*args)

    a, b = travel(make(["a red circle"])), travel(make(["a red circle"]))
    assert a is b  # same content, one worker-side copy with one baseline cache
    assert travel(make(["a red square"])) is not a
    for i in range(EVALUATORS_KEPT + 2):
        travel(make([f"a red star {i}"]))
    assert sum(k[0] == "evaluator" for k in executor._LOCAL if isinstance(k, tuple)) == EVALUATORS_KEPT
