"""A job's record on disk: its fingerprint, which tasks are done, and who holds it.

Use this module to make a run resumable and exclusive. It lives inside DEST (a local folder
or an object-store prefix, see :mod:`relu_dask.locations`), in the hidden folder
``DEST/.relu-dask/`` (:data:`JOURNAL_NAME`), so that DEST is moved, copied or deleted with
its record as one thing. zarr, xarray and tensorstore open DEST and its arrays without a
word about it; only a listing of a group without consolidated metadata (DEST while a run is
under way) meets it, and zarr then warns of an object it does not know (docs/design.md, "The
journal"). Older relu-dask kept it beside DEST (``.<DEST name>.relu-dask/``): such a record
is moved in by the first command that meets it (:func:`adopt_legacy_journal`).

* ``job.json`` -- the job's fingerprint (what SOURCE was, the options that change the
  result, the block shape) and, once every task is done, ``"complete": true`` with the
  run's counts;
* ``done/<array>/<block index>`` -- one small file per finished task, written by the task
  itself right after its mask block was written (zarr >= 3.1.3 writes each chunk file
  atomically, through a temporary file and a rename), holding the task's counts (on an
  object store, lines of batches: :mod:`relu_dask.markerbatches`);
* ``lock`` -- who runs the job now (:mod:`relu_dask.lock`).

Completion is never inferred from chunk keys: zarr does not store chunks equal to the fill
value, so an all-negative block leaves no key at all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from relu_dask import markerbatches, objectstores, writebehind
from relu_dask.counts import BlockCounts, TaskRow
from relu_dask.locations import Location
from relu_dask.records import JobFingerprint

__all__ = [
    "JOURNAL_NAME",
    "STEPS",
    "ArrayRecord",
    "Held",
    "JobRecord",
    "adopt_legacy_journal",
    "count_done",
    "done_dir",
    "is_being_replaced",
    "journal_dir",
    "legacy_files",
    "legacy_journal_dir",
    "mark_replacing",
    "marker_name",
    "reach_step",
    "read_done",
    "read_held",
    "read_record",
    "record_done",
    "remove_done_markers",
    "remove_done_markers_from",
    "remove_journal",
    "unmark_replacing",
    "write_held",
    "write_record",
]

log = logging.getLogger(__name__)

_FORMAT = 1


#: The steps of a run, in order, as docs/design.md's crash-consistency table names them.
STEPS = ("locked", "journal-forgotten", "dest-removed", "job-recorded", "outputs-created", "tasks-done", "complete")


def reach_step(step: str) -> None:
    """Mark that a run reached ``step`` (one of :data:`STEPS`).

    For the tests of what a kill at each step leaves behind: with ``RELU_DASK_STOP_AT`` set
    to ``step``, the process stops itself there (SIGSTOP), so that a test can kill it at
    exactly that point (a SIGSTOP to this thread, which may not be the main one: the process
    stops before it goes on). Unset, this does nothing.
    """
    assert step in STEPS, step
    if os.environ.get("RELU_DASK_STOP_AT") == step:
        log.warning("stopping at step %s (RELU_DASK_STOP_AT)", step)
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)


#: The name of the hidden folder inside DEST that records its job.
JOURNAL_NAME = ".relu-dask"


def journal_dir(dest: Location) -> Location:
    """The hidden folder inside DEST that records the job: ``DEST/.relu-dask``."""
    return dest.child(JOURNAL_NAME)


def legacy_journal_dir(dest: Location) -> Location:
    """Where an older relu-dask kept DEST's record: beside it, ``.<name>.relu-dask``."""
    return dest.sibling(f".{dest.name}.relu-dask")


def legacy_files(dest: Location) -> list[str]:
    """The files of an older relu-dask's record beside DEST ([] if none, or if DEST has no
    place beside it, as a bucket's root)."""
    if "/" not in dest.url.split("://", 1)[-1].strip("/"):
        return []
    try:
        return legacy_journal_dir(dest).files()
    except (OSError, ValueError) as exc:
        log.debug("DEST %s: no older record beside it (%s)", dest, exc)
        return []


def adopt_legacy_journal(dest: Location) -> bool:
    """Move an older relu-dask's record of DEST (:func:`legacy_journal_dir`) into DEST; return
    whether there was one.

    The caller makes sure nobody holds either lock. File by file, each one written inside
    before it is removed outside, so a kill part way leaves both halves readable and the next
    call finishes; a file already inside is newer and kept. The old lock is not moved.
    """
    legacy = legacy_journal_dir(dest)
    files = legacy_files(dest)
    if not files:
        if legacy.is_local:  # an empty folder
            with contextlib.suppress(OSError):
                legacy.path.rmdir()
        return False
    names = [name for name in files if name != "lock" and not name.startswith("lock.")]
    inside = journal_dir(dest)
    for name in names:
        source, target = legacy.child(*name.split("/")), inside.child(*name.split("/"))
        if target.stat() is None:
            target.write_bytes(source.read_bytes())
        source.remove()
    legacy.remove_tree()
    log.info("moved DEST's record from %s into %s", legacy, inside)
    return bool(names)


def mark_replacing(dest: Location) -> None:
    """Record that relu-dask is about to delete DEST to replace it (``replacing`` in the journal).

    A run killed while it deletes DEST leaves part of it, perhaps without its metadata, which
    would otherwise no longer look like a Zarr store relu-dask may delete: this record says it is.
    """
    journal_dir(dest).child("replacing").write_text(str(dest))


def unmark_replacing(dest: Location) -> None:
    """DEST is deleted: forget :func:`mark_replacing`."""
    journal_dir(dest).child("replacing").remove()


def is_being_replaced(dest: Location) -> bool:
    """Whether a run was deleting DEST to replace it and did not finish."""
    return journal_dir(dest).child("replacing").stat() is not None


def remove_done_markers(dest: Location, every: Sequence[Location] | None = None) -> None:
    """Drop the per-task markers of a complete job (``job.json`` keeps its counts).

    ``every``: all the markers of their own there are, where the caller knows them (a fresh
    run's): on an object store they and the batches this process wrote there are deleted
    without listing them first (a round trip saved).
    """
    folder = journal_dir(dest).child("done")
    direct = folder.object_store
    batches = writebehind.take_appended(direct[0], f"{direct[1]}/") if direct is not None else []
    if every is None or direct is None:
        folder.remove_tree()
        return
    keys = [where[1] for m in every if (where := m.object_store) is not None]
    objectstores.delete_many(direct[0], keys + batches)


def remove_journal(dest: Location) -> None:
    """Forget the job of DEST (all but the lock, which its holder removes).

    ``job.json`` first: once it is gone nothing claims DEST is complete, whatever a kill
    leaves of the markers.
    """
    journal_dir(dest).child("job.json").remove()
    remove_done_markers(dest)


@dataclass(frozen=True)
class ArrayRecord:
    """What ``job.json`` records of one array (:meth:`JobRecord.array`): the per-array lists
    of the file read at one index, each None where it is not recorded (an older relu-dask, a
    run not complete, or no statistics)."""

    counts: BlockCounts
    """Its summed counts (all zero where none are recorded)."""
    unit_axis: int | None = None
    unit_ones: list[int] | None = None
    """Per-unit ones along :attr:`unit_axis`, once complete with statistics."""
    block_ones: list[int] | None = None
    """The ones of each block (C order), once complete."""
    block_digests: list[int] | None = None
    """The digest of each block, as many as :attr:`block_ones` (else None: an older relu-dask's)."""
    edge_blocks: dict[str, list[int]] | None = None
    """The last block row's counts along the append axis (see :attr:`JobRecord.edge_blocks`)."""
    kept: dict[str, Any] | None = None
    """While an incremental run is under way: the blocks kept from before."""


@dataclass
class JobRecord:
    """What ``job.json`` holds."""

    fingerprint: JobFingerprint
    """Source identity and the options that change the result."""
    block_shapes: list[list[int]]
    """The block shape of each array, so that a resumed run cuts the same tasks."""
    complete: bool = False
    counts: list[list[int]] | None = None
    """Per array, the summed task counts (:meth:`BlockCounts.as_row`), once complete."""
    unit_ones: list[list[int] | None] | None = None
    """Per array, the per-unit ones of a ``--stats`` run, once complete."""
    unit_axes: list[int | None] | None = None
    """Per array, the unit axis those per-unit ones are along."""
    block_ones: list[list[int]] | None = None
    """Per array, the ones each task counted in its block (blocks in C order), once complete:
    what ``relu-dask verify`` checks the masks against."""
    block_digests: list[list[int]] | None = None
    """Per array, the digest of each block's masks as its task wrote them
    (:attr:`BlockCounts.digest`, -1: none recorded), in the same order: ``relu-dask verify``
    compares the masks it reads back with them value for value. None: an older relu-dask."""
    damaged: dict[str, list[str]] | None = None
    """What ``relu-dask verify`` last found wrong: per array (its index, as text), the blocks
    (:func:`marker_name`) whose masks are not what their tasks wrote. The next run recomputes
    exactly those; None: nothing found."""
    verified_utc: str | None = None
    """When ``relu-dask verify`` last found DEST whole (None: not since the run)."""
    append_axis: int | None = None
    """The append axis the run was made with (None: growth refused)."""
    edge_blocks: list[dict[str, list[int]] | None] | None = None
    """Per array, once complete: when its extent along ``append_axis`` is not a whole number
    of blocks, the last block row's done markers (block index -> counts and per-unit ones), so
    that the next run over the grown array can take that row out of the sums and redo it."""
    kept: list[dict[str, Any] | None] | None = None
    """Per array, while an incremental run is under way: the blocks DEST already held when it
    started (:meth:`relu_dask.counts.KeptCounts.to_dict`; None: every block has a task)."""

    def counts_of(self, index: int) -> BlockCounts:
        """The summed counts of array ``index`` (all zero where none are recorded)."""
        rows = self.counts or []
        return BlockCounts.from_row(rows[index]) if index < len(rows) else BlockCounts()

    def array(self, index: int) -> ArrayRecord:
        """What this record holds of array ``index``: the one place its per-array lists are indexed."""

        def at(values: list[Any] | None) -> Any:
            return values[index] if values is not None and index < len(values) else None

        ones, digests = at(self.block_ones), at(self.block_digests)
        return ArrayRecord(
            counts=self.counts_of(index),
            unit_axis=at(self.unit_axes),
            unit_ones=at(self.unit_ones),
            block_ones=ones,
            block_digests=digests if digests is not None and ones is not None and len(digests) == len(ones) else None,
            edge_blocks=at(self.edge_blocks),
            kept=at(self.kept),
        )

    def to_json(self) -> str:
        return json.dumps({"format": _FORMAT, **self.__dict__}, indent=1, sort_keys=True)


def read_record(dest: Location) -> JobRecord | None:
    """The job recorded for DEST, or None (none, unreadable or from another format)."""
    try:
        data = json.loads(journal_dir(dest).child("job.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.pop("format", None) != _FORMAT:
        return None
    try:
        return JobRecord(**data)
    except TypeError:
        return None


def write_record(dest: Location, record: JobRecord) -> None:
    """Write ``job.json`` whole (locally: a temporary file and a rename)."""
    journal_dir(dest).child("job.json").write_text(record.to_json())


def done_dir(dest: Location, array_index: int) -> Location:
    """Where the tasks of array ``array_index`` mark themselves done."""
    return journal_dir(dest).child("done", str(array_index))


def marker_name(block_index: Sequence[int]) -> str:
    return ".".join(str(i) for i in block_index) or "0"


def record_done(
    folder: Location,
    block_index: Sequence[int],
    counts: BlockCounts,
    per_unit: Sequence[int],
    what: str,
    *,
    defer: str = "",
    after: Future[None] | None = None,
) -> None:
    """Mark one task done, with its counts (called by the task, after its write).

    The marker keeps ``counts.recorded()``, the block's digest (``crc32:N``, where it has
    one) and the per-unit ones. ``what`` says what they are (for instance ``units=1``:
    per-unit ones along axis 1 follow the counts); :func:`read_done` gives them back only to
    a task that expects the same. ``defer`` (a run's id), on an object store: the marker is a
    line of a batch the store's pool writes for that run (:mod:`relu_dask.markerbatches`) while
    the task goes on, once ``after`` (its chunks' writes left to the pool) is done, not if they failed.
    """
    if not what or any(c.isspace() for c in what):
        raise ValueError(f"a marker's description is one word, got {what!r}")
    digest = [f"crc32:{counts.digest}"] if counts.digest >= 0 else []
    values = [str(c) for c in TaskRow.encode_recorded(counts, per_unit)]
    name, text = marker_name(block_index), " ".join([what, *digest, *values])
    direct = folder.object_store if defer else None
    if direct is None:
        if after is not None:
            after.result()
        folder.child(name).write_text(text)
        return
    if after is None:  # its chunks are written already
        after = Future()
        after.set_result(None)
    writebehind.append_later(*direct, f"{name} {text}", run=defer, after=after, name=markerbatches.batch_name)


def read_done(
    folder: Location, block_index: Sequence[int], what: str, run: str = ""
) -> tuple[BlockCounts, list[int]] | None:
    """The counts (``resumed`` set) and per-unit ones of a task marked done as ``what``, or
    None: not done, or done as something else (a marker of another run's options is redone,
    never reused).

    On an object store a marker may be a line of a batch: the folder's are read once per
    ``run`` and process (:func:`relu_dask.markerbatches.listed`), not one request each.
    """
    name = marker_name(block_index)
    try:
        listed = markerbatches.listed(folder, run) if run and folder.object_store is not None else None
        text = folder.child(name).read_text() if listed is None or name in listed.singles else listed.lines.get(name)
        if text is None:
            return None
        head, *values = text.split()
        digest = int(values.pop(0).removeprefix("crc32:")) if values and values[0].startswith("crc32:") else -1
        numbers = [int(v) for v in values]
    except (OSError, ValueError):
        return None
    if head != what or len(numbers) < BlockCounts.NUM_RECORDED:
        return None
    return BlockCounts.resumed_from(numbers, digest), TaskRow.decode_recorded(numbers)[1]


def remove_done_markers_from(dest: Location, array_index: int, axis: int, first_block: int) -> None:
    """Drop the done markers of array ``array_index`` whose block index along ``axis`` is
    ``first_block`` or more (0: all of them), out of batches too (:func:`markerbatches.drop_lines`)."""
    folder = done_dir(dest, array_index)
    if first_block <= 0:
        folder.remove_tree()
        return

    def dropped(name: str) -> bool:
        parts = name.split(".")
        return len(parts) > axis and parts[axis].isdigit() and int(parts[axis]) >= first_block

    for name in folder.list_names():
        if markerbatches.lines_in(name) is not None:
            markerbatches.drop_lines(folder, name, dropped)
        elif not name.startswith(".") and dropped(name):
            folder.child(name).remove()


@dataclass(frozen=True)
class Held:
    """What the last run held back for a writer that seemed to be still appending (``held.json``).

    zarr does not store a chunk that is all fill value, and nothing tells one from a chunk
    not written yet. A next run takes as they are the rows of SOURCE's shapes as they were
    here, and, array by array, the chunks that were missing here and still are (a writer
    writes a chunk row in far less than the time between two runs): so an all-fill chunk
    holds rows back once, never forever.
    """

    shapes: dict[str, list[int]] = field(default_factory=dict)
    """SOURCE's stored shapes then, per array and coordinate (empty: nothing held)."""
    missing: dict[str, list[str]] = field(default_factory=dict)
    """Per array, the keys of the chunk (or shard) objects of the rows held back that were
    not stored then."""

    def to_json(self) -> str:
        return json.dumps({"shapes": self.shapes, "missing": self.missing}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Held:
        """Read :meth:`to_json`'s text, or an older relu-dask's (shapes only); empty if unreadable."""
        try:
            data = json.loads(text)
        except ValueError:
            return cls()
        if not isinstance(data, dict):
            return cls()
        if not isinstance(data.get("shapes"), dict):  # an older relu-dask's: path -> shape
            return cls({k: v for k, v in data.items() if isinstance(v, list)})
        missing = data.get("missing")
        missing = missing if isinstance(missing, dict) else {}
        return cls(
            {k: v for k, v in data["shapes"].items() if isinstance(v, list)},
            {k: [str(key) for key in v] for k, v in missing.items() if isinstance(v, list)},
        )


def read_held(dest: Location) -> Held:
    """What the last run held back (see :class:`Held`); empty if none did."""
    try:
        return Held.from_json(journal_dir(dest).child("held.json").read_text())
    except OSError:
        return Held()


def write_held(dest: Location, held: Held | None) -> None:
    """Record (None: forget) what a run held back for a writer still appending: see :class:`Held`."""
    path = journal_dir(dest).child("held.json")
    with contextlib.suppress(OSError):
        if held is None:
            path.remove()
        else:
            path.write_text(held.to_json())


def count_done(dest: Location, array_index: int) -> int:
    """How many tasks of array ``array_index`` are marked done (markers of their own, and lines of batches)."""
    names = done_dir(dest, array_index).list_names()
    return sum(markerbatches.lines_in(n) or (0 if n.startswith(".") else 1) for n in names)


# -- the lock ---------------------------------------------------------------------------
