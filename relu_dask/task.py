"""The body of one block task: read the block, compute its mask, count, write, mark it done.

Use :func:`process_block` through :mod:`relu_dask.graph`, which makes one task of it per
block (dask calls it with the block's index). Everything a task needs travels in its
:class:`ArrayTasks`: the source and mask arrays with how their chunks are read and written
(:class:`relu_dask.blocks.StoredArray`), the plan, the rule, and where to mark itself
done (:mod:`relu_dask.journal`). It returns only a few counts, never the block.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numexpr
import numpy as np

from relu_dask import blocks, chunkio, journal, livepage
from relu_dask.chunking import ChunkPlan
from relu_dask.computing import pool_task
from relu_dask.counts import BlockCounts, TaskRow
from relu_dask.errors import NaNFoundError, TaskNotStarted
from relu_dask.kernel import Engine, relu_derivative, set_numexpr_threads
from relu_dask.locations import Location
from relu_dask.schedulers import count_cores

__all__ = [
    "ArrayTasks",
    "allow_tasks",
    "mask_digest",
    "process_block",
    "stop_tasks_on_worker",
    "wait_for_running_tasks",
]


@dataclass(frozen=True)
class ArrayTasks:
    """The tasks of one array: where to read, where to write, how to cut, which rule."""

    source: blocks.StoredArray
    """The source array (read-only) and how its chunks are read."""
    dest: blocks.StoredArray
    """The int8 mask array, created beforehand, and how its chunks are written."""
    plan: ChunkPlan
    at_zero: int = 1
    engine: Engine = "numpy"
    numexpr_threads: int = 1
    """numexpr threads for these tasks (set in whichever process runs them)."""
    nan_policy: str = "zero"
    """``zero``: NaN gives 0; ``error``: a block holding NaN stops the run."""
    name: str = ""
    """The array's name for messages."""
    done_dir: Location | None = None
    """Where tasks mark themselves done (see :mod:`relu_dask.journal`); None for nowhere."""
    may_be_done: bool = True
    """Whether a task may find its block marked done already (a resumed or grown DEST); a
    fresh run's tasks do not look (on an object store, a round trip each saved)."""
    defer_writes: bool = False
    """Whether a task leaves writing its chunks, then its done marker, to the object store's
    pool rather than waiting for them: for tasks run in this process (threads, synchronous),
    whose writes the run waits for before it counts the markers or records the job
    (:func:`relu_dask.writebehind.finish_writes`)."""
    unit_axis: int | None = None
    """With ``--stats``: the axis of the units, whose ones each task also counts per unit."""
    run: str = ""
    """The run the tasks belong to (an id of its own), for stopping them: see :func:`wait_for_running_tasks`."""

    @property
    def row_width(self) -> int:
        """Length of a task's result row: the counts, then the per-unit ones (with stats)."""
        if self.unit_axis is None:
            return TaskRow.width(0)
        return TaskRow.width(min(self.plan.block_shape[self.unit_axis], self.plan.shape[self.unit_axis]))

    token: str = ""
    """A stable identity of the tasks (source, dest, plan, rule) for the task names."""
    live: bool = False
    """Whether each task, on a distributed worker, logs its row for the live page
    (:func:`relu_dask.livepage.announce`)."""

    @property
    def marker_kind(self) -> str:
        """What a done marker of these tasks holds: the counts, and per-unit ones along which axis."""
        return f"units={'-' if self.unit_axis is None else self.unit_axis}"


def process_block(tasks: ArrayTasks, block_id: tuple[int, ...] | None = None) -> np.ndarray:
    """Read one block, write its mask, return its counts (a :class:`BlockCounts` row).

    A block already marked done in ``tasks.done_dir`` is not read again: its recorded counts
    come back with ``resumed`` set. A block is marked done only after its mask is written.
    The result has shape ``(1,) * ndim + (tasks.row_width,)`` so that dask assembles the
    counts of all blocks into one small array.
    """
    assert block_id is not None, "dask passes block_id"
    with _running(tasks.run), pool_task():
        row = _process_block(tasks, block_id)
    if tasks.live:
        livepage.announce(tasks.run, tasks.name, block_id[: len(tasks.plan.shape)], row.reshape(-1))
    return row


#: Per run (its id): tasks running in this process, and whether the run was told to stop.
_RUNNING: dict[str, int] = {}
_STOPPED: set[str] = set()
_RUNNING_CHANGED = threading.Condition()


def allow_tasks(run: str) -> None:
    """Let the tasks of ``run`` start in this process: at the start of its computation."""
    with _RUNNING_CHANGED:
        _STOPPED.discard(run)


@contextlib.contextmanager
def _running(run: str) -> Iterator[None]:
    with _RUNNING_CHANGED:
        if run in _STOPPED:  # handed to a pool thread just before the stop: it must not write now
            raise TaskNotStarted("the run was stopped")
        _RUNNING[run] = _RUNNING.get(run, 0) + 1
    try:
        yield
    finally:
        with _RUNNING_CHANGED:
            _RUNNING[run] -= 1
            if not _RUNNING[run]:
                del _RUNNING[run]
            _RUNNING_CHANGED.notify_all()


def wait_for_running_tasks(run: str, timeout_s: float) -> int:
    """Stop the tasks of ``run`` from starting in this process, and wait until none of them
    runs (at most ``timeout_s``); return how many still run.

    A run told to stop (SIGTERM, Ctrl-C), or one of whose tasks failed, lets the tasks that
    have started finish, so that they write their masks and mark themselves done, before it
    removes DEST or lets go of its lock. Other runs in the same process go on.
    """
    end = time.monotonic() + timeout_s
    with _RUNNING_CHANGED:
        _STOPPED.add(run)  # from now on no task of this run starts in this process
        while _RUNNING.get(run) and (left := end - time.monotonic()) > 0:
            _RUNNING_CHANGED.wait(left)
        return _RUNNING.get(run, 0)


async def stop_tasks_on_worker(run: str, timeout_s: float) -> int:
    """:func:`wait_for_running_tasks` on a distributed worker (``Client.run``, on its event
    loop, which it does not block): no task of ``run`` starts there now; wait for those
    running (at most ``timeout_s``); return how many still run."""
    end = time.monotonic() + timeout_s
    with _RUNNING_CHANGED:
        _STOPPED.add(run)
    while _RUNNING.get(run) and time.monotonic() < end:
        await asyncio.sleep(0.05)
    return _RUNNING.get(run, 0)


def _process_block(tasks: ArrayTasks, block_id: tuple[int, ...]) -> np.ndarray:
    ndim = len(tasks.plan.shape)
    index = block_id[:ndim]
    width = tasks.row_width
    if tasks.done_dir is not None and tasks.may_be_done:
        done = journal.read_done(tasks.done_dir, index, tasks.marker_kind, tasks.run)
        if done is not None and TaskRow.width(len(done[1])) == width:
            return _row(*done, width, ndim)
    slices = tasks.plan.block_slices(index)
    if tasks.engine != "numpy" and numexpr.get_num_threads() != tasks.numexpr_threads:
        set_numexpr_threads(tasks.numexpr_threads)
    fetched = blocks.fetch_block(tasks.source, slices)  # from a bucket: before the buffers are taken
    with _decoding(bool(fetched)), chunkio.scratch() as into:  # buffers reused from block to block
        block = blocks.read_block(tasks.source, slices, into, fetched)
        nans, zeros = _count_nans_and_zeros(block, into.take(chunkio.FLAGS, (min(block.size, _SLAB),), np.bool_))
        if nans and tasks.nan_policy == "error":
            raise NaNFoundError(_describe_nan(tasks, block, slices))
        # The mask takes the buffer of the compressed bytes, free once the block is read.
        mask = into.take(chunkio.STORED, block.shape, np.int8)
        relu_derivative(block, mask, at_zero=tasks.at_zero, engine=tasks.engine)
        counts = BlockCounts(
            block.size, int(np.count_nonzero(mask)), nans, zeros, elements_read=block.size, digest=mask_digest(mask)
        )
        later = tasks.run if tasks.defer_writes else ""  # the run whose writes the store's pool makes
        written = blocks.write_block(tasks.dest, slices, mask, into, later=later)
        per_unit: list[int] = []
        if tasks.unit_axis is not None:
            others = tuple(a for a in range(ndim) if a != tasks.unit_axis)
            per_unit = _sum_ones(mask, others).tolist()
    if tasks.done_dir is not None:
        journal.record_done(
            tasks.done_dir,
            index,
            counts,
            per_unit,
            tasks.marker_kind,
            defer=later,
            after=written,
        )
    return _row(counts, per_unit, width, ndim)


#: Tasks of a process that decode and compute fetched blocks at once, beyond its cores: the
#: others wait with their bytes fetched, holding no decoding buffers (memory stays flat with
#: many requests in flight), and the cores are not shared among more tasks than they can run.
DECODING_BEYOND_CORES = 2


@functools.cache
def _decoders() -> threading.BoundedSemaphore:
    return threading.BoundedSemaphore(count_cores() + DECODING_BEYOND_CORES)


@contextlib.contextmanager
def _decoding(fetched: bool) -> Iterator[None]:
    """Wait for a turn to decode a block fetched from a bucket (a local one reads as it decodes)."""
    if not fetched:
        yield
        return
    with _decoders():
        yield


def mask_digest(mask: np.ndarray) -> int:
    """The digest of a block's masks (:attr:`BlockCounts.digest`): the CRC-32 of its int8
    values in C order, whatever their chunks and codecs (about 6 GB/s: a few ms a block)."""
    return zlib.crc32(np.ascontiguousarray(mask, dtype=np.int8).data)


def _sum_ones(mask: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """The ones of a 0/1 mask summed over ``axes``, in the narrowest exact integer type.

    Summing into int16 where at most 32767 values meet is 3x faster than into int64.
    """
    count = int(np.prod([mask.shape[a] for a in axes], dtype=np.int64))
    dtype = next(d for d in (np.int16, np.int32, np.int64) if count <= np.iinfo(d).max)
    return mask.sum(axis=axes, dtype=dtype)


#: Elements per slab of the counting passes: their bool temporaries stay this small.
_SLAB = 1 << 22


def _count_nans_and_zeros(block: np.ndarray, scratch: np.ndarray) -> tuple[int, int]:
    """NaNs and exact zeros of ``block``, a slab at a time (no block-sized temporary).

    ``scratch``: a bool buffer of at least ``min(block.size, _SLAB)`` elements to reuse.
    """
    flat = block.reshape(-1)  # a view for the C-ordered blocks zarr returns; a copy otherwise
    nans = zeros = 0
    for start in range(0, flat.size, _SLAB):
        part = flat[start : start + _SLAB]
        flags = scratch[: part.size]
        if block.dtype.kind == "f":
            nans += int(np.count_nonzero(np.isnan(part, out=flags)))
        zeros += int(np.count_nonzero(np.equal(part, 0, out=flags)))
    return nans, zeros


def _row(counts: BlockCounts, per_unit: list[int], width: int, ndim: int) -> np.ndarray:
    """One task's result: its counts, then its per-unit ones padded to the full block width."""
    return TaskRow.encode(counts, per_unit, width).reshape((1,) * ndim + (width,))


def _describe_nan(tasks: ArrayTasks, block: np.ndarray, slices: tuple[slice, ...]) -> str:
    """Name the array, the source chunk and the element of the first NaN in ``block``."""
    first = np.unravel_index(int(np.argmax(np.isnan(block))), block.shape)
    where = tuple(int(s.start + i) for s, i in zip(slices, first))
    chunk = tuple(w // c for w, c in zip(where, tasks.plan.source_chunk_shape))
    name = tasks.name or "the source"
    return (
        f"{name} holds NaN in chunk {chunk} (first at element {where}); "
        "--nan error stops on NaN: fix the data upstream, or use --nan zero to map NaN to 0"
    )
