"""Running the cells of a sweep on many workers through an existing engine.

A sweep (taus, choices, causal cells, seeds) is a list of independent cells; `run_cells` runs
them here one after another, or on an executor: a Dask `distributed.Client` or any
`concurrent.futures` process pool. Results come back in cell order, so they equal the serial
run's. Workers must not receive loaded models (gigabytes, and unpicklable), so what a cell needs
travels as a `Spec`, a recipe that every worker process builds once and keeps:

    from distributed import Client, LocalCluster
    from acterase_interp.executor import Spec
    client = Client(LocalCluster(n_workers=2, threads_per_worker=1))
    evaluator = Evaluator.from_pairs(Spec.of(load, "conceptworld"), Spec.of(load_classifier, "conceptworld"), pairs)
    rows = tau_sweep(statistics, evaluator, taus, executor=client)

Worker processes, not threads: patches are hooks on the one model a process holds, so two
threads patching it at once would see each other's hooks.
"""

from __future__ import annotations

import multiprocessing
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_LOCAL: OrderedDict[Hashable, Any] = OrderedDict()
"""This process's objects built from specs (and other worker-side state), by key, least recently used first."""


class Executor(Protocol):
    """What `run_cells` needs of an engine: `submit(fn, *args)` returning a future with
    `result()` (`distributed.Client`, `concurrent.futures.ProcessPoolExecutor`, ...)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Any: ...


class WorkerLostError(RuntimeError):
    """A worker process died while running cells (killed, out of memory): the run stopped."""


def _lost(err: BaseException) -> bool:
    """Whether `err` says a worker process died: a broken process pool, or Dask's `KilledWorker`
    (a task whose workers died more often than the scheduler allows)."""
    return isinstance(err, BrokenProcessPool) or type(err).__name__ == "KilledWorker"


def worker_local(key: Hashable, build: Callable[[], T], *, keep: int | None = None) -> T:
    """The object this process keeps under `key`, built by `build()` on first use. With `keep`,
    `key` is a tuple whose first item names a kind, and at most `keep` objects of that kind stay:
    the least recently used go (a worker that serves many evaluators does not grow without end)."""
    if key in _LOCAL:
        _LOCAL.move_to_end(key)
        return _LOCAL[key]
    _LOCAL[key] = value = build()
    if keep is not None:
        kind = [k for k in _LOCAL if isinstance(k, tuple) and k[:1] == key[:1]]
        for old in kind[: max(0, len(kind) - keep)]:
            del _LOCAL[old]
    return value


@dataclass(frozen=True)
class Spec:
    """A picklable recipe for a heavy object: `factory(*args, **kwargs)`, built once per process
    and then reused (`build`). The factory must be importable by name (a module-level function
    or a class's method) and the arguments plain values, so the spec pickles small."""

    factory: Callable[..., Any]
    args: tuple = ()
    kwargs: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, factory: Callable[..., Any], *args: Any, **kwargs: Any) -> Spec:
        """`Spec.of(load, "conceptworld", device="cuda")`."""
        return cls(factory, tuple(args), tuple(sorted(kwargs.items())))

    def build(self) -> Any:
        """The object, built on this process's first call and cached."""
        return worker_local(("spec", self), lambda: self.factory(*self.args, **dict(self.kwargs)))


def resolve(obj: Any) -> Any:
    """`obj.build()` for a spec, else `obj` itself."""
    return obj.build() if isinstance(obj, Spec) else obj


def require_spec(obj: Any, what: str) -> None:
    """Clear error unless `obj` can travel to a worker as a spec."""
    if not isinstance(obj, Spec):
        raise TypeError(
            f"to run on an executor, give the {what} as a Spec (e.g. Spec.of(load, 'conceptworld')), "
            f"not a loaded {type(obj).__name__}: each worker then loads it once"
        )


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def one_thread_processes(n: int) -> ProcessPoolExecutor:
    """A pool of `n` worker processes, each with one torch thread (spawned: no forked model state).
    On a small model, n one-thread processes outrun one n-thread process (intra-op threads have
    little to split)."""
    if n < 1:
        raise ValueError(f"a pool needs at least one worker, got {n}")
    return ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread)


def run_cells(
    fn: Callable[..., T],
    cells: Sequence[tuple],
    executor: Executor | None = None,
    *,
    desc: str = "cells",
    progress: bool = True,
) -> list[T]:
    """`fn(*cell)` for every cell, in order: here, or on `executor` (every cell submitted at once,
    results gathered in cell order; the first failure cancels the rest and is raised, a dead
    worker process as `WorkerLostError`). `fn` and the cells must pickle when an executor is given.
    Dask reruns the cells of a worker that died on another, up to its `allowed-failures`."""
    bar = tqdm(total=len(cells), desc=desc, disable=not progress)
    try:
        if executor is None:
            out = []
            for cell in cells:
                out.append(fn(*cell))
                bar.update(1)
            return out
        threads = executor.nthreads() if hasattr(executor, "nthreads") else {}  # a Dask client: threads per worker
        if isinstance(executor, ThreadPoolExecutor) or any(n != 1 for n in threads.values()):
            raise TypeError("run sweeps on worker processes with one thread each (Dask: threads_per_worker=1): "
                            "threads would share one model and its hooks")
        futures = [executor.submit(fn, *cell) for cell in cells]
        try:
            results = []
            for future in futures:
                results.append(future.result())
                bar.update(1)
            return results
        except BaseException as err:
            for future in futures:
                future.cancel()
            if _lost(err):
                why = " ".join(str(err).split())  # one line: Dask's message spans several
                raise WorkerLostError(
                    f"a worker process died while running {desc} cells ({type(err).__name__}: {why}); run it "
                    "again (a run with checkpoints, such as acterase evaluate's cells/ folder, then resumes from its "
                    "finished cells)"
                ) from err
            raise
    finally:
        bar.close()
