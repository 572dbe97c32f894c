"""Growth: what grew in SOURCE since DEST's record, what DEST keeps, which blocks run again.

Pure functions over the recorded job (:class:`relu_dask.journal.JobRecord`) and the one
found now, no I/O of their own (what they must know of SOURCE now comes in as callbacks):

* :func:`compare_jobs` tells growth along the append axis from any other change (which a
  run refuses without ``--overwrite``);
* :func:`plan_growth` plans one array of a grown SOURCE: its tasks (those of the new rows,
  and of the old edge block row that the old extent cut short), the blocks it keeps
  (:class:`relu_dask.counts.KeptCounts`) and the done markers to drop.

Where growth is detected for a writer still appending, see :mod:`relu_dask.livewriter`;
the follow loop is :mod:`relu_dask.follow`; docs/design.md, "Growth", tells the states.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, cast

import numpy as np

from relu_dask import chunking, journal
from relu_dask.counts import BlockCounts, KeptCounts, TaskRow
from relu_dask.records import ArrayFingerprint, JobFingerprint

__all__ = [
    "JobChange",
    "Rehash",
    "Restat",
    "compare_jobs",
    "kept_of_partial_run",
    "num_kept",
    "plan_growth",
    "starting_at",
]


#: Asks SOURCE now about one of its chunk objects: (array path, chunk key) -> [size, mtime].
Restat = Callable[[str, str], list[Any]]
#: What :func:`relu_dask.fingerprint.settled_sha256` says of an array of SOURCE now: (path, axis, rows) -> hash.
Rehash = Callable[[str, int, int], str | None]


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
    old: JobFingerprint,
    new: JobFingerprint,
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
        old_keys, new_keys = cast(dict[str, Any], before), cast(dict[str, Any], array)  # every key, as recorded
        what = [k for k in new_keys if k in old_keys and old_keys[k] != new_keys[k] and k != "edge_samples"]
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
    before: ArrayFingerprint,
    now: ArrayFingerprint,
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


def kept_of_partial_run(record: journal.JobRecord | None, index: int) -> KeptCounts | None:
    """The kept blocks an interrupted incremental run recorded for array ``index``."""
    data = None if record is None or record.complete else record.array(index).kept
    return None if data is None else KeptCounts.from_dict(data)


def starting_at(plan: chunking.ChunkPlan, kept: KeptCounts | None) -> chunking.ChunkPlan:
    return plan if kept is None else plan.starting_at(kept.axis, kept.first_block)


def num_kept(plan: chunking.ChunkPlan, kept: KeptCounts | None) -> int:
    if kept is None or not math.prod(plan.shape):
        return 0
    return kept.first_block * math.prod(n for a, n in enumerate(plan.numblocks) if a != kept.axis)


def plan_growth(
    record: journal.JobRecord,
    array_paths: list[str],
    path: str,
    axis: int | None,
    grown: dict[str, list[int] | None],
    plan_array: Callable[[list[int] | None], chunking.ChunkPlan],
    present: Callable[[], bool],
) -> tuple[chunking.ChunkPlan, KeptCounts | None, int | None]:
    """Plan the array at ``path`` (of ``array_paths``, SOURCE's now) of a SOURCE that grew
    since DEST's ``record``: its tasks, the blocks it keeps, and the done markers to drop
    from this block index on along ``axis`` (0: all; None: none; see
    :attr:`relu_dask.planning.ArrayPlan.drop_markers_from`).

    ``grown``: :attr:`JobChange.grown`. ``plan_array(block_shape)`` cuts the array into
    tasks (None: afresh, as a first run would); ``present()`` says whether DEST still has
    its mask array (if not, nothing is kept).
    """
    old_paths = [a["path"] for a in record.fingerprint["arrays"]]
    # Markers are kept per array index: if the arrays moved, none can be trusted. A complete
    # record's markers (a kill came before they were dropped) count for nothing either.
    drop_all = 0 if old_paths != array_paths or record.complete else None
    if path not in old_paths:  # new in the SOURCE group: every block has a task
        return plan_array(None), None, 0
    old = old_paths.index(path)
    block = record.block_shapes[old]
    recorded = _kept_whole(record, old, block, axis) if record.complete else kept_of_partial_run(record, old)
    if recorded is not None and not present():  # DEST lost the mask array: every block is redone
        recorded = None
    if path not in grown:  # unchanged: what DEST holds stays (a partial run resumes)
        return starting_at(plan_array(block), recorded), recorded, drop_all
    old_rows = grown[path]
    assert old_rows is not None and axis is not None, "a grown array has its old shape and an append axis"
    if block[axis] >= old_rows[axis]:
        # One block row covered the old extent: it is all redone, once, in block rows no
        # longer than that extent, so that the next growth keeps them (not afresh: a small
        # array's one block would cover the new extent too, and be read whole every time).
        return _rows_within(plan_array, old_rows[axis], axis), None, 0
    plan = plan_array(block)
    if recorded is not None and recorded.axis != axis:  # grown along another axis than recorded
        return plan, None, 0
    first = old_rows[axis] // block[axis]  # the first block not whole at the old extent
    if record.complete:
        kept = _without_edge(record, old, recorded, old_rows, block, axis, first)
        return starting_at(plan, kept), kept, drop_all
    if recorded is None:
        return plan, None, 0 if drop_all == 0 else first
    return starting_at(plan, recorded), recorded, 0 if drop_all == 0 else first


def _rows_within(
    plan_array: Callable[[list[int] | None], chunking.ChunkPlan], rows: int, axis: int
) -> chunking.ChunkPlan:
    """The plan of a fresh run, but with blocks of at most ``rows`` along ``axis`` (whole
    units of writing and of the source's chunks; one such unit where ``rows`` is less)."""
    fresh = plan_array(None)
    unit = math.lcm(fresh.write_unit[axis], fresh.source_chunk_shape[axis])
    along = max(unit, rows // unit * unit)
    if along >= fresh.block_shape[axis]:
        return fresh
    block = list(fresh.block_shape)
    block[axis] = along
    return plan_array(block)


def _kept_whole(record: journal.JobRecord, index: int, block: list[int], axis: int | None) -> KeptCounts | None:
    """Every block of array ``index`` of a complete record, as kept blocks along ``axis``."""
    recorded = record.array(index)
    if axis is None or recorded.block_ones is None:
        return None
    shape = record.fingerprint["arrays"][index]["shape"]
    if not math.prod(shape):
        return None
    unit_ones = recorded.unit_ones
    recorded_axis = None if record.append_axis is None else record.append_axis % len(shape)
    digests = recorded.block_digests
    return KeptCounts(
        axis=axis,
        first_block=-(-shape[axis] // block[axis]),
        counts=BlockCounts.from_row(recorded.counts.recorded()),
        block_ones=tuple(recorded.block_ones),
        block_digests=None if digests is None else tuple(int(v) for v in digests),
        unit_axis=recorded.unit_axis if unit_ones is not None else None,
        unit_ones=tuple(unit_ones) if unit_ones is not None else None,
        edge=recorded.edge_blocks if recorded_axis == axis else None,
    )


def _without_edge(
    record: journal.JobRecord,
    index: int,
    whole: KeptCounts | None,
    old_shape: list[int],
    block: list[int],
    axis: int,
    first: int,
) -> KeptCounts | None:
    """The kept blocks of a complete array once grown: all but the old edge block row along
    ``axis`` (whose blocks were cut short by the old extent), or None if that row's counts
    were not recorded (then every block is redone)."""
    if whole is None:
        return None
    numblocks = [-(-n // b) for n, b in zip(old_shape, block)]
    ones = np.asarray(whole.block_ones, dtype=np.int64).reshape(numblocks)
    kept_ones = np.take(ones, range(first), axis=axis).reshape(-1)
    kept_digests = None
    if whole.block_digests is not None:
        digests = np.asarray(whole.block_digests, dtype=np.int64).reshape(numblocks)
        kept_digests = tuple(int(v) for v in np.take(digests, range(first), axis=axis).reshape(-1))
    counts, unit_ones = whole.counts, None if whole.unit_ones is None else list(whole.unit_ones)
    if first < numblocks[axis]:  # the old edge row is redone: take its counts out
        edge = whole.edge or {}
        if len(edge) != math.prod(n for a, n in enumerate(numblocks) if a != axis):
            return None
        for name, values in edge.items():
            at = [int(i) for i in name.split(".")]
            if len(at) != len(old_shape) or at[axis] != first:
                return None
            row_counts, row_units = TaskRow.decode_recorded(values)
            counts = counts - row_counts
            if unit_ones is not None and whole.unit_axis is not None:
                start = at[whole.unit_axis] * block[whole.unit_axis]
                for k, v in enumerate(row_units):
                    unit_ones[start + k] -= int(v)
        if unit_ones is not None and whole.unit_axis == axis:
            unit_ones = unit_ones[: first * block[axis]]
    return replace(
        whole,
        first_block=first,
        counts=counts,
        block_ones=tuple(int(v) for v in kept_ones),
        block_digests=kept_digests,
        unit_ones=None if unit_ones is None else tuple(unit_ones),
        edge=None,
    )
