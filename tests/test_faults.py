"""Faults: a save killed (SIGKILL) at each of its steps or at random moments, a Dask or process-pool
worker killed in the middle of a run, two processes saving into one folder at once. Children are
forked from the test process, so they start in milliseconds with the package already imported."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch

from acterase_interp import cli
from acterase_interp import io as aio
from acterase_interp.erase import eraser as eraser_module
from acterase_interp.erase.eraser import MANIFEST, MASKS, Eraser
from acterase_interp.evaluation import table
from acterase_interp.evaluation.table import TableSpec, read_cell, write_cell
from acterase_interp.executor import Spec, WorkerLostError, run_cells, worker_local
from acterase_interp.io import interrupted_save
from acterase_interp.loading import load
from acterase_interp.sites import Site

FORK = multiprocessing.get_context("fork")
SITE = Site("down.0.0.ffn_hidden", "ffn_hidden", "down.0.0", "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
            "input", "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2", (2, 64))  # fmt: skip


def _eraser(fill: float) -> Eraser:
    """A one-site eraser whose values are all `fill`, which tells erasers apart."""
    mask = torch.arange(64) % 2 == 0
    return Eraser((SITE,), {SITE.name: mask}, {SITE.name: torch.full((2, 64), fill)}, {"architecture_hash": "0" * 16})


def _fill(path: Path) -> float:
    """The fill of the eraser at `path`, loaded with its hashes checked: whole, and one eraser's."""
    values = Eraser.load(path).values[SITE.name]
    assert bool((values == values.flatten()[0]).all())
    return float(values.flatten()[0])


def _stop(conn, point: str) -> None:
    conn.send(point)
    time.sleep(60)  # the parent kills us here


def _save_stopping_at(point: str, path: Path, conn) -> None:
    """In a child: save the eraser of fill 2 over `path`, stopping at `point` for the parent to kill."""
    if point == "inside a tensor file":
        real_save = aio.save_file

        def half_written(tensors, tmp, metadata=None):
            real_save(tensors, tmp, metadata=metadata)
            data = Path(tmp).read_bytes()
            Path(tmp).write_bytes(data[: len(data) // 2])
            _stop(conn, point)

        aio.save_file = half_written
    elif point == "after the masks":
        real_tensors = eraser_module.atomic_save_safetensors

        def then_stop(tensors, file):
            real_tensors(tensors, file)
            if Path(file).name == MASKS:
                _stop(conn, point)

        eraser_module.atomic_save_safetensors = then_stop
    elif point == "before the swap":
        real_swap = aio._swap_in
        aio._swap_in = lambda tmp, target: (_stop(conn, point), real_swap(tmp, target))
    elif point == "between the renames":
        real_rename = Path.rename

        def rename(self, target):
            out = real_rename(self, target)
            if str(target).endswith(".old"):
                _stop(conn, point)
            return out

        Path.rename = rename
    elif point == "before removing the old one":
        real_rmtree = aio.shutil.rmtree

        def rmtree(folder, *args, **kwargs):
            if str(folder).endswith(".old"):
                _stop(conn, point)
            real_rmtree(folder, *args, **kwargs)

        aio.shutil.rmtree = rmtree
    _eraser(2.0).save(path)
    conn.send("finished without stopping")


def _kill_when_told(target, *args, delay: float = 0.0) -> str:
    """Run `target(*args, conn)` in a forked child, SIGKILL it `delay` seconds after it sends a
    message, and return that message."""
    receive, send = FORK.Pipe(duplex=False)
    child = FORK.Process(target=target, args=(*args, send))
    child.start()
    try:
        assert receive.poll(30), "the child sent nothing"
        message = receive.recv()
        time.sleep(delay)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
    assert child.exitcode == -signal.SIGKILL
    return message


@pytest.mark.parametrize(
    ("point", "after"),
    [("inside a tensor file", 1.0), ("after the masks", 1.0), ("before the swap", 1.0),
     ("between the renames", None), ("before removing the old one", 2.0)],  # fmt: skip
)
def test_a_save_killed_at_each_step_leaves_the_previous_eraser_or_none(tmp_path, point, after):
    path = tmp_path / "er"
    _eraser(1.0).save(path)
    assert _kill_when_told(_save_stopping_at, point, path) == point
    if after is None:  # the one moment with no folder at `path`: the load error says where the old one is
        with pytest.raises(FileNotFoundError, match="a save into it was interrupted") as err:
            Eraser.load(path)
        left = interrupted_save(path, MANIFEST)
        assert left is not None and str(left) in str(err.value) and _fill(left) == 1.0
    else:
        assert _fill(path) == after
    _eraser(3.0).save(path)  # what a killed save left behind does not stop the next one
    assert _fill(path) == 3.0


def test_a_first_save_killed_leaves_nothing_that_loads(tmp_path):
    path = tmp_path / "er"
    assert _kill_when_told(_save_stopping_at, "after the masks", path) == "after the masks"
    with pytest.raises(FileNotFoundError, match="no eraser in"):
        Eraser.load(path)


def _save_forever(path: Path, conn) -> None:
    """In a child: save the erasers of fill 1 and 2 in turn until killed."""
    conn.send("started")
    for i in range(10**6):
        _eraser(float(i % 2 + 1)).save(path)


def test_saves_killed_at_arbitrary_moments_leave_a_whole_eraser(tmp_path):
    path = tmp_path / "er"
    _eraser(1.0).save(path)
    for delay in (0.0, 0.003, 0.011, 0.017, 0.029, 0.043, 0.067, 0.101):
        _kill_when_told(_save_forever, path, delay=delay)
        if not (path / MANIFEST).is_file():  # killed between the two renames
            left = interrupted_save(path, MANIFEST)
            assert left is not None
            left.rename(path)  # what the load error tells the user to do
        assert _fill(path) in (1.0, 2.0)


def _save_many(fill: float, path: Path, start, conn) -> None:
    """In a child: save the eraser of `fill` to `path` 20 times; send the errors it met."""
    start.wait(10)
    errors = []
    for _ in range(20):
        try:
            _eraser(fill).save(path)
        except FileExistsError as err:
            errors.append(str(err))
    conn.send(errors)


def _write_cells(fill: float, path: Path, start, conn) -> None:
    start.wait(10)
    for _ in range(50):
        write_cell(path, "k", [{"concept": "red", "seed": 0, "value": fill}], {"seed": 0})
    conn.send([])


@pytest.mark.parametrize("writer", [_save_many, _write_cells], ids=["eraser", "evaluation cell"])
def test_two_processes_saving_to_one_place_leave_one_whole_artifact(tmp_path, writer):
    path = tmp_path / ("er" if writer is _save_many else "red-seed0.json")
    start = FORK.Event()
    pipes = [FORK.Pipe(duplex=False) for _ in range(2)]
    children = [FORK.Process(target=writer, args=(fill, path, start, send))
                for fill, (_, send) in zip((1.0, 2.0), pipes)]  # fmt: skip
    for child in children:
        child.start()
    start.set()
    errors = [receive.recv() if receive.poll(60) else ["no answer"] for receive, _ in pipes]
    for child in children:
        child.join(10)
    assert [child.exitcode for child in children] == [0, 0]
    assert all("other processes kept saving" in e for e in errors[0] + errors[1])  # the one clear error allowed
    if writer is _save_many:
        assert _fill(path) in (1.0, 2.0)
    else:
        rows, _ = read_cell(path, "k")
        assert rows[0]["value"] in (1.0, 2.0)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # nothing half-written or set aside is left


def test_a_dask_worker_killed_mid_sweep_still_gives_the_serial_results(tmp_path):
    distributed = pytest.importorskip("distributed")
    import dask

    parent, marker = os.getpid(), str(tmp_path / "killed-once")

    def cell(x: int, marker: str, parent: int) -> int:  # local: Dask ships it by value, workers import no tests
        import os
        import signal

        if x == 3 and os.getpid() != parent and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)  # the first try of cell 3 kills its worker
        return x * x + 1

    def always_killed(x: int, parent: int) -> int:
        import os
        import signal

        if os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return x

    cells = [(x, marker, parent) for x in range(6)]
    serial = run_cells(cell, cells, progress=False)
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with cluster, distributed.Client(cluster) as client:
        assert run_cells(cell, cells, client, progress=False) == serial == [x * x + 1 for x in range(6)]
        assert os.path.exists(marker)  # a worker did die, and its cell ran again elsewhere
        with pytest.raises(WorkerLostError, match="a worker process died while running causal sweep cells") as err:
            run_cells(always_killed, [(0, parent)], client, desc="causal sweep", progress=False)
    assert "KilledWorker" in str(err.value) and "\n" not in str(err.value)  # one clear line


def _fake_seed(model, classifier, concept, seed, spec, steps):
    """Stands in for a cell's measurement: known rows; seed 1 kills its worker process once seed 0's
    cell is on disk."""
    if seed == 1 and os.getpid() != _FAKE["parent"]:
        first = _FAKE["cells"] / f"{concept}-seed0.json"
        deadline = time.monotonic() + 20
        while not first.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)
    row = {"concept": concept, "method": "unerased", "seed": seed, "fit_s": 0.0, "target_rate": {"value": seed / 4}}
    return [row], {"concept": concept, "seed": seed}


_FAKE: dict = {}
"""The test process's id and the checkpoint folder, for `_fake_seed` in forked workers."""


def test_an_evaluation_whose_worker_dies_stops_clearly_and_resumes_from_finished_cells(conceptworld, tmp_path,
                                                                                       monkeypatch):  # fmt: skip
    cells = tmp_path / "cells"
    monkeypatch.setattr(table, "_run_seed", _fake_seed)  # forked workers inherit it
    monkeypatch.setitem(_FAKE, "parent", os.getpid())
    monkeypatch.setitem(_FAKE, "cells", cells)
    model, classifier = Spec.of(load, "conceptworld"), Spec.of(torch.nn.Identity)
    worker_local(("spec", model), lambda: conceptworld)  # the session's model, not a second load
    spec = TableSpec(concepts=("red",), methods=("unerased",), seeds=(0, 1, 2), num_inference_steps=2)
    with ProcessPoolExecutor(2, mp_context=FORK) as pool, pytest.raises(WorkerLostError, match="finished cells"):
        table.run_table(model, classifier, spec, executor=pool, checkpoints=cells, progress=False)
    assert (cells / "red-seed0.json").is_file() and not (cells / "red-seed1.json").exists()
    resumed = table.run_table(model, classifier, spec, checkpoints=cells, progress=False)
    assert {"concept": "red", "seed": 0} in resumed["manifest"]["resumed"]
    assert {"concept": "red", "seed": 1} not in resumed["manifest"]["resumed"]
    serial = table.run_table(model, classifier, spec, progress=False)
    assert resumed["rows"] == serial["rows"] and resumed["summary"] == serial["summary"]
    assert [r["target_rate"]["value"] for r in serial["rows"]] == [0.0, 0.25, 0.5]


def test_a_lost_worker_exits_the_cli_with_3_and_one_line(monkeypatch, capsys):
    def lost(args):
        raise WorkerLostError("a worker process died while running evaluate cells; run it again")

    monkeypatch.setattr(cli, "_evaluate", lost)
    assert cli.main(["evaluate", "--concepts", "red"]) == cli.RUN_FAILED == 3
    err = capsys.readouterr().err
    assert err.startswith("acterase evaluate: error: a worker process died") and len(err.strip().splitlines()) == 1
