"""What DEST holds, and what a run may do with it: start fresh, resume, or nothing.

A run reads DEST's journal (:mod:`relu_dask.journal`) and compares the job recorded there
with its own (:func:`dest_state`); ``relu-dask status`` reads the same
(:func:`job_status`). :func:`remove_dest_and_journal` is the one way DEST is replaced,
in the order that keeps a kill safe at every step (docs/design.md, "Crash consistency").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from relu_dask import journal, outputs, storage
from relu_dask.errors import DestinationExistsError, ReluDaskError
from relu_dask.growth import Rehash, Restat, compare_jobs
from relu_dask.locations import Location, at_once, in_background, parse_location, parse_storage_options
from relu_dask.lock import adopt_if_idle, lock_holder
from relu_dask.records import JobFingerprint

__all__ = [
    "DestFound",
    "DestListing",
    "DestState",
    "JobStatus",
    "dest_state",
    "job_status",
    "list_dest",
    "remove_dest_and_journal",
]

log = logging.getLogger(__name__)

DestState = Literal["fresh", "resume", "complete", "grow"]


@dataclass(frozen=True)
class DestFound:
    """What DEST holds, as a run finds it (:func:`dest_state`): nothing is written to find it."""

    state: DestState
    """``fresh`` (new, or to be replaced), ``resume``, ``complete`` or ``grow``."""
    record: journal.JobRecord | None = None
    """The job DEST's journal holds (None when fresh)."""
    grown: dict[str, list[int] | None] = field(default_factory=dict)
    """``grow``: the arrays that grew (their shape when recorded) or are new (None)."""
    forget_completion: bool = False
    """The journal said complete, but DEST lacks masks it names: ``record`` is made
    incomplete here, and the run's first step writes it and drops the done markers
    (:func:`relu_dask.prepare.prepare_dest`), so a kill from then on redoes every task."""
    clean: bool = False
    """``fresh``: DEST holds nothing to remove first, neither masks nor a record (its lock and
    ``held.json`` aside), so replacing it is nothing to do (on an object store, no request)."""


@dataclass(frozen=True)
class DestListing:
    """What DEST holds at a glance (:func:`list_dest`): read under its lock, before a run writes."""

    holds_data: bool
    """Whether DEST holds anything but its record (:func:`relu_dask.outputs.holds_data`)."""
    recorded: list[str]
    """The files of its record (:func:`relu_dask.journal.journal_dir`), relative to it."""
    record: journal.JobRecord | None
    """Its ``job.json``, read beside the listings (:func:`relu_dask.journal.read_record`)."""


def list_dest(dest: Location) -> DestListing:
    """DEST and its record listed, and ``job.json`` read (on an object store, all at once)."""
    with ThreadPoolExecutor(2) as pool:
        recorded = pool.submit(journal.journal_dir(dest).files)
        record = pool.submit(journal.read_record, dest)
        holds_data = outputs.holds_data(dest)
        return DestListing(holds_data, recorded.result(), record.result())


def dest_state(
    dest: Location,
    fingerprint: Callable[[], JobFingerprint],
    *,
    is_group: bool,
    overwrite: bool,
    append_axis: int | None = None,
    restat: Restat | None = None,
    rehash: Rehash | None = None,
    listed: DestListing | None = None,
) -> DestFound:
    """Whether DEST is new (or to be replaced), a partial run of this job to resume, complete,
    or the job of a SOURCE that has grown since (``grow``). ``fingerprint``: this run's job,
    asked for only where DEST holds a record to compare it with.

    Refuses (:class:`DestinationExistsError`) a DEST that holds anything else, unless
    ``overwrite``: growth along ``append_axis`` (None: no growth) is told from a change with
    ``restat`` and ``rehash`` (see :func:`relu_dask.growth.compare_jobs`). A record that says
    complete is believed only beside every mask array it names (see
    :attr:`DestFound.forget_completion`). Reads only. ``listed``: DEST listed already, under
    the lock the caller holds (:func:`list_dest`).
    """
    if overwrite:
        if journal.is_being_replaced(dest):  # a run deleting DEST was killed: what it left
            outputs.check_replaceable_remains(dest)
        else:
            outputs.check_replaceable(dest)
        return DestFound("fresh")
    listed = listed if listed is not None else list_dest(dest)
    if not listed.holds_data:  # nothing, or its record alone (a run stopped before it made DEST)
        left = [name for name in listed.recorded if name != "held.json" and name.split(".", 1)[0] != "lock"]
        return DestFound("fresh", clean=not left)
    record = listed.record
    if record is None and journal.is_being_replaced(dest):
        raise DestinationExistsError(
            f"DEST {dest} was being replaced when a run was stopped: pass --overwrite to finish replacing it"
        )
    if record is None and dest.is_local and dest.path.is_file():
        raise DestinationExistsError(
            f"DEST {dest} is a file, not a Zarr store; relu-dask will not delete it: choose another DEST"
        )
    if record is None:
        raise DestinationExistsError(f"DEST {dest} already exists: pass --overwrite to replace it")
    old_paths = [a["path"] for a in record.fingerprint.get("arrays", [])]
    # where complete, whether its masks are there is looked at while SOURCE's fingerprint is
    # waited for (on an object store: the same round trip)
    present = (
        in_background(partial(outputs_present, dest, old_paths, is_group=is_group), daemon=True)
        if record.complete
        else None
    )
    change = compare_jobs(
        record.fingerprint,
        fingerprint(),
        append_axis=append_axis,
        restat=restat,
        rehash=rehash,
        recorded_axis=record.append_axis,
    )
    if change.said:
        raise DestinationExistsError(
            f"DEST {dest} holds another job ({'; '.join(change.said)}): pass --overwrite to replace it"
        )
    forget = present is not None and not present.result()
    if forget:
        log.warning("DEST %s lacks masks its journal says are complete: computing them again", dest)
        record = dataclasses.replace(
            record,
            complete=False,
            counts=None,
            unit_ones=None,
            unit_axes=None,
            block_ones=None,
            verified_utc=None,
            edge_blocks=None,
        )
    if change.grown or change.coordinates_changed:
        return DestFound("grow", record, change.grown, forget)
    return DestFound("complete" if record.complete else "resume", record, {}, forget)


def outputs_present(dest: Location, array_paths: list[str], *, is_group: bool) -> bool:
    """Whether DEST holds the group (for a group SOURCE) and every mask array of the job.

    On an object store every node's own document is read at once (zarr opens a group, then
    each array, trying Zarr v3 then v2: round trips one after another); relu-dask writes
    DEST as Zarr v3."""
    if dest.object_store is not None:
        wanted = [("", "group")] * is_group + [(path, "array") for path in array_paths]
        found = at_once(lambda node: _node_type(dest, node[0]), wanted, limit=16)
        return all(kind == node[1] for kind, node in zip(found, wanted))
    if is_group and not outputs.is_group(dest):
        return False
    return not missing_arrays(dest, array_paths)


def _node_type(dest: Location, path: str) -> str | None:
    """``group`` or ``array``: the Zarr v3 node at ``path`` in DEST, by its own document (None: none)."""
    try:
        document = json.loads(storage.array_location(dest, path).child("zarr.json").read_bytes())
    except (FileNotFoundError, ValueError):  # a store that fails says so: not taken for a missing node
        return None
    if not isinstance(document, dict) or document.get("zarr_format") != 3:
        return None
    kind = document.get("node_type")
    return kind if isinstance(kind, str) else None


def missing_arrays(dest: Location, array_paths: list[str]) -> list[str]:
    """The mask arrays of the job that DEST lacks, by path ("" for DEST itself)."""
    return [path for path in array_paths if not storage.has_array(dest, path)]


def remove_dest_and_journal(dest: Location, reason: str) -> None:
    """Forget DEST's job, then delete DEST, in the order that keeps a kill safe at every step.

    The record of the replacement first (what a kill leaves of DEST is then ours to
    delete), then ``job.json`` and the markers (nothing claims DEST is complete), then DEST.
    One listing says what is there; only that is deleted (a new DEST: nothing, no request).
    """
    with ThreadPoolExecutor(1) as pool:  # DEST a level deep, its record whole: on an object store, at once
        recorded = pool.submit(journal.journal_dir(dest).files)
        replacing = outputs.holds_data(dest)
        files = set(recorded.result())
    if replacing:
        journal.mark_replacing(dest)
    if "job.json" in files or any(name.startswith("done/") for name in files):
        journal.remove_journal(dest)
    journal.reach_step("journal-forgotten")
    if replacing:
        outputs.remove_dest(dest, reason)
    journal.reach_step("dest-removed")
    if replacing or "replacing" in files:
        journal.unmark_replacing(dest)


JobState = Literal["absent", "unknown", "partial", "complete"]


@dataclass(frozen=True)
class JobStatus:
    """What :func:`job_status` found in DEST."""

    dest: str
    state: JobState
    running: str | None = None
    """The process holding DEST's lock (``pid N on HOST (since ...)``), if any."""
    replacing: bool = False
    """``unknown``: a run deleting DEST to replace it was stopped part way."""
    tasks_done: int = 0
    num_tasks: int = 0
    missing: list[str] = field(default_factory=list)
    """``partial``: the arrays the journal says are complete but DEST lacks."""
    verified_utc: str | None = None
    """``complete``: when ``relu-dask verify`` last found DEST whole."""
    damaged: int = 0
    """``complete``: the blocks ``relu-dask verify`` last found wrong (the next run recomputes them)."""
    fingerprint: JobFingerprint | None = None
    """The job recorded in DEST: its source, rule, NaN policy and arrays."""
    rows: dict[str, int] = field(default_factory=dict)
    """Per array, its extent along the append axis in DEST's job."""
    rows_waiting: dict[str, int] = field(default_factory=dict)
    """Per array, the rows SOURCE has now beyond :attr:`rows` (a rerun processes them)."""

    def rows_text(self) -> str:
        """``N rows`` (or per array, where they differ)."""
        counts = set(self.rows.values())
        if len(counts) == 1:
            return f"{counts.pop()} rows"
        return "rows: " + ", ".join(f"{p or '(array)'} {n}" for p, n in self.rows.items())

    def waiting_text(self) -> str:
        """How many rows wait in SOURCE (empty if none): rows along the append axis, which the
        arrays of a Dataset share, so the most of any array (each array's where they differ)."""
        waiting = {p: n for p, n in self.rows_waiting.items() if n}
        if not waiting:
            return ""
        counts = set(waiting.values())
        rows = (
            str(counts.pop())
            if len(counts) == 1
            else ", ".join(f"{n} ({p or '(array)'})" for p, n in sorted(waiting.items()))
        )
        return f"SOURCE has grown: {rows} more rows wait; rerun the same command to process them"

    def to_dict(self) -> dict[str, Any]:
        """The JSON object ``relu-dask status --json`` prints (keys that do not apply left out)."""
        out: dict[str, Any] = {"dest": self.dest, "running": self.running, "state": self.state}
        if self.replacing:
            out["replacing"] = True
        if self.missing:
            out["missing"] = list(self.missing)
        if self.verified_utc:
            out["verified_utc"] = self.verified_utc
        if self.damaged:
            out["damaged_blocks"] = self.damaged
        if self.fingerprint is not None:
            out.update(tasks_done=self.tasks_done, num_tasks=self.num_tasks, fingerprint=self.fingerprint)
            out.update(rows=self.rows, rows_waiting=self.rows_waiting)
        return out


def job_status(dest: str | os.PathLike[str], storage_options: str | dict[str, Any] | None = None) -> JobStatus:
    """What DEST holds: ``absent``, ``partial`` (n of m tasks done), ``complete`` or ``unknown``.

    ``complete`` only where the journal says so and DEST holds every mask array it names
    (else ``partial``, with ``missing`` naming the arrays that are not there). ``unknown``
    is a DEST that exists without a relu-dask journal (made by another tool or another
    version). ``running`` names the process holding DEST's lock, if any.
    """
    path = parse_location(dest, parse_storage_options(storage_options))
    adopt_if_idle(path)  # an older relu-dask's record beside DEST
    record = journal.read_record(path)
    exists = outputs.holds_data(path)
    running = lock_holder(path)
    if record is None or not exists:
        replacing = exists and journal.is_being_replaced(path)
        return JobStatus(str(dest), "unknown" if exists else "absent", running, replacing=replacing)
    arrays = record.fingerprint.get("arrays", [])
    kept = [record.array(i).kept for i in range(len(arrays))]
    total = 0
    for array, block, base in zip(arrays, record.block_shapes, kept):
        if math.prod(array["shape"]) != 0:
            numblocks = [-(-n // max(1, b)) for n, b in zip(array["shape"], block)]
            if base is not None and not record.complete:  # an incremental run: tasks for the new rows only
                numblocks[base["axis"]] -= base["first_block"]
            total += math.prod(numblocks)
    axis = 0 if record.append_axis is None else record.append_axis
    rows = {a["path"]: a["shape"][axis] for a in arrays if -len(a["shape"]) <= axis < len(a["shape"])}
    missing = [p or "(array)" for p in missing_arrays(path, [a["path"] for a in arrays])]
    complete = record.complete and not missing
    done = total if complete else sum(journal.count_done(path, i) for i in range(len(arrays)))
    return JobStatus(
        str(dest),
        "complete" if complete else "partial",
        running,
        tasks_done=done,
        num_tasks=total,
        # The journal says complete, DEST says otherwise: believe DEST.
        missing=missing if record.complete else [],
        verified_utc=record.verified_utc if complete else None,
        damaged=sum(map(len, (record.damaged or {}).values())) if complete else 0,
        fingerprint=record.fingerprint,
        rows=rows,
        rows_waiting=_rows_waiting(record.fingerprint.get("source"), path, rows, axis),
    )


def _rows_waiting(source: str | None, dest: Location, rows: dict[str, int], axis: int) -> dict[str, int]:
    """The rows SOURCE holds now beyond those of DEST's job, per array (empty if SOURCE
    cannot be read: ``status`` answers about DEST whatever SOURCE's state)."""
    if source is None:
        return {}
    try:
        contents = storage.open_source(parse_location(source, dest.storage_options))
    except (ReluDaskError, OSError) as exc:  # SOURCE gone, moved or unreadable
        log.debug("status: SOURCE %s not read: %s", source, exc)
        return {}
    waiting = {}
    for src in contents.arrays:
        if -len(src.shape) <= axis < len(src.shape) and src.shape[axis] > rows.get(src.path, 0):
            waiting[src.path] = src.shape[axis] - rows.get(src.path, 0)
    return waiting
