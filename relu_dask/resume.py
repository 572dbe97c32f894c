"""What DEST holds, and what a run may do with it: start fresh, resume, or nothing.

A run reads DEST's journal (:mod:`relu_dask.journal`) and compares the job recorded there
with its own (:func:`dest_state`); ``relu-dask status`` reads the same
(:func:`job_status`). :func:`remove_dest_and_journal` is the one way DEST is replaced,
in the order that keeps a kill safe at every step (docs/design.md, "Crash consistency").
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from relu_dask import journal, storage
from relu_dask.errors import DestinationExistsError, ReluDaskError
from relu_dask.locations import Location, parse_location, parse_storage_options

__all__ = [
    "DestState",
    "JobChange",
    "JobStatus",
    "compare_jobs",
    "dest_state",
    "job_status",
    "remove_dest_and_journal",
]

log = logging.getLogger(__name__)

DestState = Literal["fresh", "resume", "complete", "grow"]


#: Asks SOURCE now about one of its chunk objects: (array path, chunk key) -> [size, mtime].
Restat = Callable[[str, str], list[Any]]
#: What :func:`relu_dask.storage.settled_sha256` says of an array of SOURCE now: (path, axis, rows) -> hash.
Rehash = Callable[[str, int, int], str | None]


def dest_state(
    dest: Location,
    fingerprint: dict[str, Any],
    *,
    is_group: bool,
    overwrite: bool,
    under_lock: bool,
    append_axis: int | None = None,
    restat: Restat | None = None,
    rehash: Rehash | None = None,
) -> tuple[DestState, journal.JobRecord | None, dict[str, list[int] | None]]:
    """Whether DEST is new (or to be replaced), a partial run of this job to resume, complete,
    or the job of a SOURCE that has grown since (``grow``).

    Returns the state, DEST's record, and for ``grow`` the arrays that grew (their shape
    when recorded) or are new (None). Refuses (:class:`DestinationExistsError`) a DEST that
    holds anything else, unless ``overwrite``: growth along ``append_axis`` (None: no growth)
    is told from a change with ``restat`` (see :func:`compare_jobs`). A record that says
    complete is believed only beside every mask array it names; ``under_lock``, such a record
    is rewritten as incomplete and its markers dropped before anything is recreated, so that
    a kill from then on resumes and redoes every task.
    """
    if overwrite:
        if journal.is_being_replaced(dest):  # a run deleting DEST was killed: what it left
            storage.check_replaceable_remains(dest)
        else:
            storage.check_replaceable(dest)
        return "fresh", None, {}
    if not dest.exists():
        return "fresh", None, {}
    record = journal.read_record(dest)
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
    change = compare_jobs(
        record.fingerprint,
        fingerprint,
        append_axis=append_axis,
        restat=restat,
        rehash=rehash,
        recorded_axis=record.append_axis,
    )
    if change.said:
        raise DestinationExistsError(
            f"DEST {dest} holds another job ({'; '.join(change.said)}): pass --overwrite to replace it"
        )
    old_paths = [a["path"] for a in record.fingerprint.get("arrays", [])]
    if record.complete and not outputs_present(dest, old_paths, is_group=is_group):
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
        if under_lock:
            journal.remove_done_markers(dest)
            journal.write_record(dest, record)
    if change.grown or change.coordinates_changed:
        return "grow", record, change.grown
    return ("complete" if record.complete else "resume"), record, {}


def outputs_present(dest: Location, array_paths: list[str], *, is_group: bool) -> bool:
    """Whether DEST holds the group (for a group SOURCE) and every mask array of the job."""
    if is_group and not storage.is_group(dest):
        return False
    return not missing_arrays(dest, array_paths)


def missing_arrays(dest: Location, array_paths: list[str]) -> list[str]:
    """The mask arrays of the job that DEST lacks, by path ("" for DEST itself)."""
    return [path for path in array_paths if not storage.has_array(dest, path)]


@dataclass(frozen=True)
class JobChange:
    """How this run's job differs from the one recorded in DEST (:func:`compare_jobs`)."""

    said: list[str]
    """What differs so that DEST holds another job, said for the user (empty: the same job)."""
    grown: dict[str, list[int] | None]
    """The arrays that only grew along the append axis (their recorded shape), and those new
    in a SOURCE group (None)."""
    coordinates_changed: bool = False
    """xarray's coordinates changed (and growth is allowed): they are copied again."""


def compare_jobs(
    old: dict[str, Any],
    new: dict[str, Any],
    *,
    append_axis: int | None = None,
    restat: Restat | None = None,
    rehash: Rehash | None = None,
    recorded_axis: int | None = None,
) -> JobChange:
    """Compare the job recorded in DEST with this one: the same, grown, or another job.

    An array grew when only its extent along ``append_axis`` is larger, its metadata less the
    shape is the same, and the chunk objects sampled when it was recorded are as they were
    (``restat``), but for the old edge chunk that the writer completes. Arrays new in a
    SOURCE group count as grown; with ``append_axis`` None, nothing does. Coordinates are
    copied again whole by a run over grown arrays, so they may change with them.
    """
    said: list[str] = []
    grown: dict[str, list[int] | None] = {}
    if old.get("source") != new["source"]:
        said.append(f"its source was {old.get('source')}")
    old_arrays = {a["path"]: a for a in old.get("arrays", [])}
    for array in new["arrays"]:
        before = old_arrays.pop(array["path"], None)
        name = array["path"] or "the source array"
        if before is None:
            if append_axis is None:
                said.append(f"{name} is new")
            else:
                grown[array["path"]] = None
            continue
        # Keys an older relu-dask did not record are not compared.
        what = [k for k in array if k in before and before[k] != array[k] and k != "edge_samples"]
        if not what:
            continue
        why_not = _why_not_grown(before, array, append_axis, restat, rehash, recorded_axis)
        if why_not is None:
            grown[array["path"]] = list(before["shape"])
        else:
            said.append(f"{name} {why_not or 'changed (' + ', '.join(what) + ')'}")
    now_coordinates = {c["path"] for c in new.get("coordinates", [])}
    said.extend(
        f"{path} is now read as xarray's coordinate: copied, no longer masked"
        if path in now_coordinates
        else f"{path or 'the source array'} is gone"
        for path in old_arrays
    )
    # Older journals have no coordinates. They are copied again whole by a run that may
    # follow growth (xarray appends to them too, one variable after another).
    recopy = "coordinates" in old and old["coordinates"] != new.get("coordinates")
    if recopy and append_axis is None:
        said.append("its coordinates changed")
    for option in ("rule", "nan", "dest_chunks", "dest_shards", "compressor"):
        if old.get(option) != new[option]:
            said.append(f"it was made with {option} {old.get(option)}, now {new[option]}")
    return JobChange(said, grown if not said else {}, bool(recopy and not said))


def _why_not_grown(
    before: dict[str, Any],
    now: dict[str, Any],
    axis: int | None,
    restat: Restat | None,
    rehash: Rehash | None = None,
    recorded_axis: int | None = None,
) -> str | None:
    """None if the array only grew along ``axis``; else what changed ("" for: say the keys).

    ``recorded_axis``: the append axis DEST was made with; growth along another is refused
    (its blocks, edge counts and settled hash follow the recorded axis)."""
    old_shape, new_shape = list(before["shape"]), list(now["shape"])
    if axis is None or restat is None or before.get("layout_sha256") is None or len(old_shape) != len(new_shape):
        return ""
    if not -len(new_shape) <= axis < len(new_shape):
        return ""
    axis %= len(new_shape)
    others = [n for i, n in enumerate(new_shape) if i != axis]
    if others != [n for i, n in enumerate(old_shape) if i != axis]:
        return f"changed shape from {_shape(old_shape)} to {_shape(new_shape)}, not only along the append axis {axis}"
    if new_shape[axis] < old_shape[axis]:
        return f"shrank from {old_shape[axis]} to {new_shape[axis]} along axis {axis}"
    known = recorded_axis is not None and -len(new_shape) <= recorded_axis < len(new_shape)
    made_along = recorded_axis % len(new_shape) if known and recorded_axis is not None else axis
    if made_along != axis and new_shape[axis] > old_shape[axis]:
        return f"grew along axis {axis}, but DEST was made with --append-axis {recorded_axis} (its records follow it)"
    if before["layout_sha256"] != now.get("layout_sha256"):
        return "changed (its metadata, not only its shape)"
    unit = before.get("shard_shape") or before["chunk_shape"]
    grew = new_shape[axis] > old_shape[axis]
    edge = old_shape[axis] // unit[axis] if grew and old_shape[axis] % unit[axis] else None
    for key, *stat in before.get("chunk_samples", []):
        coords = _chunk_coords(key)
        if coords is None or len(coords) != len(new_shape):
            return ""
        if coords[axis] == edge:
            continue  # the old edge chunk: the writer completes it
        if restat(now["path"], key) != stat:
            if stat == [None, None]:
                return f"changed (its chunk {key} {_LATE})"
            return f"changed (its chunk {key} was rewritten since it was processed)"
    settled = before.get("settled_sha256")
    if rehash is not None and isinstance(settled, list) and len(settled) == 2:
        rows, digest = settled
        if rehash(now["path"], axis, int(rows)) not in (None, digest):
            return (
                f"changed (a chunk of its first {rows} rows along axis {axis} was rewritten since it was processed, "
                f"or {_LATE})"
            )
    return None if grew else ""


#: A chunk that was not stored when a run took it as the fill value, stored since.
_LATE = (
    "was written after a run took it, missing, as the fill value: a writer slower than --settle-time "
    "and the time between runs"
)


def _chunk_coords(key: str) -> tuple[int, ...] | None:
    """A chunk key's coordinates, in any of the specs' encodings (``c/1/0``, ``c.1.0``, ``1.0``, ``1/0``)."""
    parts = re.split(r"[./]", key)
    if parts and parts[0] == "c":
        parts = parts[1:]
    return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else None


def _shape(shape: list[int]) -> str:
    return "(" + ", ".join(str(n) for n in shape) + ")"


def remove_dest_and_journal(dest: Location, reason: str) -> None:
    """Forget DEST's job, then delete DEST, in the order that keeps a kill safe at every step.

    The record of the replacement first (what a kill leaves of DEST is then ours to
    delete), then ``job.json`` and the markers (nothing claims DEST is complete), then DEST.
    """
    replacing = dest.exists()
    if replacing:
        journal.mark_replacing(dest)
    journal.remove_journal(dest)
    journal.reach_step("journal-forgotten")
    if replacing:
        storage.remove_dest(dest, reason)
    journal.reach_step("dest-removed")
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
    fingerprint: dict[str, Any] | None = None
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
    record = journal.read_record(path)
    exists = path.exists()
    running = journal.lock_holder(path)
    if record is None or not exists:
        replacing = exists and journal.is_being_replaced(path)
        return JobStatus(str(dest), "unknown" if exists else "absent", running, replacing=replacing)
    arrays = record.fingerprint.get("arrays", [])
    kept = record.kept or [None] * len(arrays)
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
