"""One contract, every scheduler: synchronous, threads, processes, a LocalCluster relu-dask
starts itself and an existing dask.distributed cluster (conftest's ``scheduler`` fixture).

Each test of :class:`TestSchedulerContract` runs once per scheduler, on real Zarr stores on
disk, and checks against numpy: exact masks, the same chunk files as the synchronous
scheduler, the run report, a rerun that does nothing, resume after a real SIGKILL, ``--nan
error`` leaving nothing behind, and unit statistics.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from _support import (
    PYTHON,
    SchedulerCase,
    activations,
    chunk_files,
    cli,
    cli_env,
    dest_files,
    journal_folder,
    oracle,
    read_mask,
    snapshot,
    write_zarr,
)

import relu_dask
from relu_dask.errors import NaNFoundError
from relu_dask.report import RunReport

#: The source's storage chunks, and the processing block of every run here: one task per chunk.
CHUNKS = (8, 16)
CHUNKS_OPTION = ",".join(map(str, CHUNKS))


@dataclass(frozen=True)
class Layer:
    """One array of the source group, with the units planted dead (never 1) and always on."""

    shape: tuple[int, int]
    dtype: str
    seed: int
    dead: tuple[int, ...]
    always_on: tuple[int, ...]
    extra_nans: tuple[tuple[int, int], ...] = ()


#: Two arrays with ragged edges on both axes (45 = 5 x 8 + 5, 37 = 2 x 16 + 5, ...), each with
#: NaN, signed zeros, infinities and subnormals (from ``activations``), dead and always-on units.
LAYERS = {
    "layer1/relu": Layer((45, 37), "float32", 1, dead=(2, 17, 30), always_on=(0, 11)),
    "layer2/relu": Layer((29, 21), "float64", 2, dead=(3,), always_on=(20,), extra_nans=((27, 13),)),
}
NUM_TASKS = sum(math.prod(-(-n // c) for n, c in zip(layer.shape, CHUNKS)) for layer in LAYERS.values())


def _values(layer: Layer) -> np.ndarray:
    x = activations(layer.shape, layer.dtype, seed=layer.seed)
    x[:, list(layer.dead)] = -np.abs(x[:, list(layer.dead)]) - 1
    x[:, list(layer.always_on)] = np.abs(np.nan_to_num(x[:, list(layer.always_on)])) + 1
    for where in layer.extra_nans:
        x[where] = np.nan
    return x


@dataclass(frozen=True)
class Source:
    path: Path
    arrays: dict[str, np.ndarray]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    path = tmp_path_factory.mktemp("contract") / "acts.zarr"
    arrays = {name: _values(layer) for name, layer in LAYERS.items()}
    for name, x in arrays.items():
        write_zarr(path, x, CHUNKS, name=name)
    assert all(np.isnan(x).any() for x in arrays.values())  # NaN -> 0 is part of every check
    return Source(path, arrays)


@pytest.fixture(scope="module")
def reference(source: Source, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The files of an uninterrupted run on the synchronous scheduler."""
    dest = tmp_path_factory.mktemp("reference") / "masks.zarr"
    relu_dask.run(source.path, dest, chunks=CHUNKS, scheduler="synchronous")
    files = dest_files(dest)
    assert len(chunk_files(dest)) > NUM_TASKS // 2  # chunk files, not only metadata (all-0 chunks are not stored)
    assert {"zarr.json", "layer1/relu/zarr.json", "layer2/relu/zarr.json"} <= set(files)
    return files


#: A bug of relu_dask (found by this contract, not fixed yet): on the threads scheduler, the
#: first task to meet a NaN makes the run remove DEST and its journal while the pool's other
#: threads still run tasks; those then write their done markers (and chunk files) into what
#: was just removed. DEST's journal folder is left behind, or the removal itself fails with
#: ``OSError: Directory not empty`` instead of NaNFoundError (exit 1, not 2). It races, so
#: the test fails on most runs, not all: ``strict=False``. Remove the mark once it is fixed.
@dataclass(frozen=True)
class Finished:
    dest: Path
    report: RunReport


def _done_markers(dest: Path) -> int:
    """Tasks marked done in DEST's journal (``done/<array>/<block>``), temporary files aside."""
    count = 0
    for index in range(len(LAYERS)):
        try:
            count += sum(1 for e in os.scandir(journal_folder(dest) / "done" / str(index)) if e.name[0] != ".")
        except FileNotFoundError:
            continue
    return count


def _kill_once_a_task_is_done(args: tuple[str, ...], dest: Path) -> int:
    """Start ``relu-dask ARGS``, SIGKILL it as soon as a task is marked done, and return how many
    were marked done by then. A run that ends before the kill (or whose every task was already done)
    is cleared and started again: the point is a run killed part way."""
    tries = []
    for _attempt in range(5):
        with open(dest.parent / "killed-run.stderr", "w+") as stderr:
            proc = subprocess.Popen(
                [PYTHON, "-m", "relu_dask", *args], stdout=subprocess.DEVNULL, stderr=stderr, env=cli_env()
            )
            while proc.poll() is None and _done_markers(dest) == 0:
                time.sleep(0.0005)
            proc.send_signal(signal.SIGKILL)  # a no-op if it already ended
            proc.wait(timeout=60)
            done = _done_markers(dest)
            if proc.returncode == -signal.SIGKILL and 0 < done < NUM_TASKS:
                return done
            stderr.seek(0)
            tries.append(f"exit {proc.returncode}, {done} task(s) marked done: {stderr.read()[-2000:]}")
        if proc.returncode not in (0, -signal.SIGKILL):
            break  # it failed on its own: no use trying again
        shutil.rmtree(dest, ignore_errors=True)
        shutil.rmtree(journal_folder(dest), ignore_errors=True)
    pytest.fail("never killed the run part way:\n" + "\n".join(tries))


def _check_counts(arrays: list[dict[str, object]], source: Source) -> None:
    """Per array, the counts of the run report against numpy's."""
    assert [a["path"] for a in arrays] == list(source.arrays)
    for entry, x in zip(arrays, source.arrays.values()):
        assert entry["num_elements"] == x.size, entry["path"]
        assert entry["num_ones"] == int(oracle(x).sum()), entry["path"]
        assert entry["num_nans"] == int(np.isnan(x).sum()), entry["path"]
        assert entry["num_zeros"] == int((x == 0).sum()), entry["path"]


@pytest.fixture(scope="module")
def finished(scheduler: SchedulerCase, source: Source, tmp_path_factory: pytest.TempPathFactory) -> Finished:
    """One complete run on each scheduler, with unit statistics, that several tests read."""
    dest = tmp_path_factory.mktemp(f"run-{scheduler.id}") / "masks.zarr"
    report = relu_dask.run(source.path, dest, chunks=CHUNKS, scheduler=scheduler.api, stats=True, unit_axis=-1)
    return Finished(dest, report)


class TestSchedulerContract:
    """What every scheduler must give; each test runs once per scheduler."""

    def test_masks_equal_numpys_bit_for_bit(self, finished: Finished, source: Source) -> None:
        for name, x in source.arrays.items():
            mask = read_mask(finished.dest, name)
            assert mask.shape == x.shape
            assert np.array_equal(mask, oracle(x)), name
            assert mask[np.isnan(x)].tolist() == [0] * int(np.isnan(x).sum())

    def test_files_equal_the_synchronous_schedulers(self, finished: Finished, reference: dict[str, bytes]) -> None:
        assert dest_files(finished.dest) == reference

    def test_report_fields(self, finished: Finished, source: Source, scheduler: SchedulerCase) -> None:
        report = finished.report
        assert report.outcome == "done"
        assert report.scheduler == scheduler.label
        assert report.num_threads == scheduler.num_threads
        assert report.num_tasks == NUM_TASKS
        assert report.tasks_done_now == NUM_TASKS
        assert report.tasks_skipped == 0
        assert report.bytes_read == sum(x.nbytes for x in source.arrays.values())
        assert report.bytes_written > 0
        _check_counts(report.to_dict()["arrays"], source)
        if scheduler.distributed:
            assert report.dashboard_link is not None
            assert report.dashboard_link.startswith("http://127.0.0.1:")
        else:
            assert report.dashboard_link is None

    def test_stats_equal_numpys(self, finished: Finished, source: Source) -> None:
        for entry, (name, x) in zip(finished.report.arrays, source.arrays.items()):
            stats = entry.stats
            assert stats is not None
            ones = oracle(x).sum(axis=0, dtype=np.int64)  # the unit axis is the last: sum over the others
            assert stats.unit_ones == ones.tolist(), name
            assert stats.dead_units == np.flatnonzero(ones == 0).tolist() == list(LAYERS[name].dead), name
            always_on = np.flatnonzero(ones == x.shape[0]).tolist()
            assert stats.always_on_units == always_on == list(LAYERS[name].always_on), name
            assert (stats.num_units, stats.samples_per_unit) == (x.shape[1], x.shape[0])

    def test_second_run_is_already_complete_and_does_nothing(
        self, finished: Finished, source: Source, scheduler: SchedulerCase
    ) -> None:
        before = snapshot(finished.dest)
        again = relu_dask.run(
            source.path, finished.dest, chunks=CHUNKS, scheduler=scheduler.api, stats=True, unit_axis=-1
        )
        assert again.outcome == "already complete"
        assert again.tasks_done_now == 0
        assert again.tasks_skipped == again.num_tasks == NUM_TASKS
        assert again.bytes_read == 0
        _check_counts(again.to_dict()["arrays"], source)  # from the journal: the same counts
        assert [a.stats.unit_ones for a in again.arrays if a.stats] == [
            a.stats.unit_ones for a in finished.report.arrays if a.stats
        ]
        assert snapshot(finished.dest) == before

    def test_resume_after_a_kill_gives_the_same_files(
        self, scheduler: SchedulerCase, source: Source, reference: dict[str, bytes], tmp_path: Path
    ) -> None:
        dest = tmp_path / "masks.zarr"
        args = ("run", str(source.path), str(dest), "--chunks", CHUNKS_OPTION, "--progress", "none", *scheduler.cli)
        done_at_kill = _kill_once_a_task_is_done(args, dest)
        assert (journal_folder(dest) / "lock").exists()  # the killed run's, left behind
        assert relu_dask.job_status(dest).state == "partial"

        again = cli(*args, "--report", str(tmp_path / "report.json"))
        assert again.returncode == 0, again.stderr
        report = json.loads((tmp_path / "report.json").read_text())
        assert report["outcome"] == "done"
        assert report["scheduler"] == scheduler.label
        assert report["num_tasks"] == NUM_TASKS
        # Tasks running when the run was killed may have finished after the count (pool
        # processes, cluster workers): at least those counted are skipped, the rest redone.
        assert report["tasks_skipped"] >= done_at_kill
        assert report["tasks_done_now"] >= 1
        assert report["tasks_skipped"] + report["tasks_done_now"] == NUM_TASKS
        _check_counts(report["arrays"], source)  # counts cover the tasks done before the kill too

        for name, x in source.arrays.items():
            assert np.array_equal(read_mask(dest, name), oracle(x)), name
        assert dest_files(dest) == reference  # no half-written (``*.partial``) file either
        assert not (journal_folder(dest) / "lock").exists()
        assert relu_dask.job_status(dest).state == "complete"

    def test_a_grown_source_is_extended_to_a_fresh_runs_files(
        self, source: Source, scheduler: SchedulerCase, tmp_path: Path
    ) -> None:
        growing = tmp_path / "growing.zarr"
        arrays = {}
        for name, x in source.arrays.items():  # a prefix with a ragged edge (not a multiple of 8 rows)
            arrays[name] = write_zarr(growing, x[: x.shape[0] // 2 + 3], CHUNKS, name=name)
        dest = tmp_path / "masks.zarr"
        options = {"chunks": CHUNKS, "scheduler": scheduler.api, "stats": True, "unit_axis": -1}
        relu_dask.run(growing, dest, **options)
        for name, x in source.arrays.items():
            old = arrays[name].shape[0]
            arrays[name].resize(x.shape)
            arrays[name][old:] = x[old:]
        grown = relu_dask.run(growing, dest, **options)
        assert [a.grown_from for a in grown.arrays] == [
            [x.shape[0] // 2 + 3, x.shape[1]] for x in source.arrays.values()
        ]
        fresh = relu_dask.run(growing, tmp_path / "fresh.zarr", chunks=CHUNKS, scheduler="synchronous", stats=True)
        assert dest_files(dest) == dest_files(tmp_path / "fresh.zarr")
        assert [a.stats for a in grown.arrays] == [a.stats for a in fresh.arrays]
        _check_counts(grown.to_dict()["arrays"], source)

    def test_nan_error_stops_and_leaves_nothing_behind(
        self, scheduler: SchedulerCase, source: Source, tmp_path: Path
    ) -> None:
        before = snapshot(source.path)
        dest = tmp_path / "masks.zarr"
        with pytest.raises(NaNFoundError) as caught:
            relu_dask.run(source.path, dest, chunks=CHUNKS, scheduler=scheduler.api, nan="error")
        assert caught.value.exit_code == 2  # what the command exits with
        # Whichever NaN a task meets first (tasks run in any order): each message names it exactly.
        expected = []
        for name, x in source.arrays.items():
            for where in map(tuple, np.argwhere(np.isnan(x))):
                chunk = tuple(int(w) // c for w, c in zip(where, CHUNKS))
                block = x[tuple(slice(i * c, (i + 1) * c) for i, c in zip(chunk, CHUNKS))]
                first = tuple(int(i * c + j) for i, c, j in zip(chunk, CHUNKS, np.argwhere(np.isnan(block))[0]))
                expected.append(f"{name} holds NaN in chunk {chunk} (first at element {first})")
        assert any(e in str(caught.value) for e in expected), str(caught.value)
        assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither DEST, nor its journal, nor a lock
        assert snapshot(source.path) == before
