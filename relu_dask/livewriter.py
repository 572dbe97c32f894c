"""A writer appending to SOURCE while a run reads it: which appended rows look written.

zarr's ``Array.append`` and xarray's ``to_zarr(append_dim=...)`` grow the shape first, then
write the new chunks (xarray one variable after the other). :func:`settle` reads SOURCE
again for up to the settle time until what was appended since DEST's record looks written
(:func:`written_rows`), and holds back what still does not for the next run, recording what
it held (:class:`relu_dask.journal.Held`): chunks missing then and still missing at the next
run are the fill value they are. Only local stores are looked at.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Any

from relu_dask import journal, storage
from relu_dask.chunkfiles import chunk_key_encoding, format_chunk_key
from relu_dask.errors import InputError
from relu_dask.fingerprint import stat_chunk
from relu_dask.locations import Location
from relu_dask.records import ArrayFingerprint
from relu_dask.storage import SourceArray

__all__ = ["SETTLE_S", "Settled", "settle", "unwritten_keys", "written_rows"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settled:
    """SOURCE as a run takes it, once what a writer appended looks written or the settle
    time is up."""

    contents: storage.SourceContents
    """SOURCE as last opened."""
    arrays: tuple[SourceArray, ...]
    """Its arrays; those with rows that still look half-written held at the rows that do
    (:attr:`relu_dask.storage.SourceArray.held_shape`)."""
    coordinates: tuple[SourceArray, ...]
    """Its coordinates, held as the arrays along their dimension are."""
    append_axes: tuple[int | None, ...]
    """Per array, the axis it may grow along (None: growth refused, or a scalar)."""
    held: journal.Held | None
    """What to record of the rows held back (:class:`relu_dask.journal.Held`); empty: an
    earlier run's hold is done with; None: nothing to record."""


def settle(
    source: Location,
    contents: storage.SourceContents,
    dest: Location,
    append_axis: int | None,
    recorded: dict[str, ArrayFingerprint],
    settle_s: float,
    held_before: journal.Held | None = None,
) -> Settled:
    """Read SOURCE again for up to ``settle_s`` seconds until the rows appended since DEST's
    record (``recorded``: its fingerprint per array path) look written; hold back what still
    does not, unless SOURCE's shapes are those a run already held rows back at (then the
    chunks still missing are all fill value). ``held_before``: DEST's ``held.json`` where
    the caller read it already."""
    held_before = journal.read_held(dest) if held_before is None else held_before
    stale = {path: frozenset(keys) for path, keys in held_before.missing.items()}
    end = time.monotonic() + settle_s
    while True:
        append_axes = _append_axes(append_axis, contents.arrays)
        shapes = {a.path: list(a.array.shape) for a in (*contents.arrays, *contents.coordinates)}
        rows, coordinate_rows = _written(contents, append_axes, recorded, stale)
        whole = all(rows[a.path] == a.shape[axis] for a, axis in zip(contents.arrays, append_axes) if axis is not None)
        whole = whole and all(
            coordinate_rows[c.path] == c.shape[0] for c in contents.coordinates if c.path in coordinate_rows
        )
        if whole or shapes == held_before.shapes:
            held = journal.Held() if held_before.shapes else None
            return Settled(contents, tuple(contents.arrays), tuple(contents.coordinates), append_axes, held)
        if time.monotonic() >= end:
            arrays, coordinates = _hold_back(contents, append_axes, rows, coordinate_rows, settle_s)
            held = journal.Held(shapes, _missing(contents, append_axes, rows, recorded))
            return Settled(contents, tuple(arrays), tuple(coordinates), append_axes, held)
        time.sleep(0.05)
        contents = storage.open_source(source)


#: How long a run waits by default for the rows a writer appears to be appending to a SOURCE
#: array (its shape already grown, its chunk objects not all written yet) before it leaves them
#: for the next run: ``--settle-time``, ``RunOptions.settle_s``, ``$RELU_DASK_SETTLE_TIME``.
SETTLE_S = 2.0


_MAX_SETTLE_KEYS = 65536


def written_rows(
    src: SourceArray,
    axis: int,
    from_row: int | None,
    edge_samples: list[list[Any]] | None,
    stale: frozenset[str] = frozenset(),
) -> int:
    """How many rows of ``src`` along ``axis`` look written, of those a writer appended.

    zarr's ``Array.append`` and xarray's ``to_zarr(append_dim=...)`` grow the shape first,
    then write the new chunks, in any order. A run that read the new shape in between would
    take the chunks not yet there for the fill value. ``from_row``: the extent DEST recorded;
    the rows from there on look written up to the first chunk row with a chunk object
    missing, and none do while a chunk of the old last chunk row (which the new rows
    complete) is as ``edge_samples`` recorded it. Without ``from_row`` (a first run), only the
    last chunk row is looked at: it looks half-written when some of its chunk objects exist
    and some do not, or when none does while the row before is whole. A chunk that is all
    fill value is never stored, so it looks unwritten too: ``stale`` are the keys of chunk
    objects taken as written all the same (missing, or not rewritten, at the last run's hold
    and still so: all fill value; see :class:`relu_dask.journal.Held`). Only local stores are
    looked at.
    """
    rows = src.shape[axis]
    keys = chunk_key_encoding(src.metadata) if src.metadata else None
    folder = src.location
    if keys is None or folder is None or not folder.is_local:
        return rows
    unit = (src.shard_shape or src.chunk_shape)[axis]
    grid = [-(-n // c) for n, c in zip(src.shape, src.shard_shape or src.chunk_shape)]
    if not math.prod(grid) or math.prod(grid) // grid[axis] > _MAX_SETTLE_KEYS:
        return rows

    def row(index: int) -> list[bool]:
        others = [range(n) if a != axis else [index] for a, n in enumerate(grid)]
        names = (format_chunk_key(tuple(c), *keys) for c in itertools.product(*others))
        return [name in stale or stat_chunk(src, name)[0] is not None for name in names]

    if from_row is None:
        last = row(grid[axis] - 1)
        if all(last) or (not any(last) and (grid[axis] == 1 or not all(row(grid[axis] - 2)))):
            return rows
        return (grid[axis] - 1) * unit
    if rows <= from_row:
        return rows
    if from_row % unit and any(key not in stale and stat_chunk(src, key) == stat for key, *stat in edge_samples or []):
        return from_row  # the old last chunk row is not completed yet
    if (grid[axis] - from_row // unit) * (math.prod(grid) // grid[axis]) > _MAX_SETTLE_KEYS:
        return rows  # too many chunk objects to look at each time
    for index in range(from_row // unit, grid[axis]):
        if not all(row(index)):
            return max(from_row, index * unit)
    return rows


def unwritten_keys(src: SourceArray, axis: int, from_row: int, edge_samples: list[list[Any]] | None) -> list[str]:
    """The keys of the chunk objects of ``src`` that look unwritten in its rows from
    ``from_row`` on (see :func:`written_rows`): those not stored, and those of an old last
    chunk row as ``edge_samples`` recorded them (not rewritten). Empty where they are not
    looked at (not local, or too many)."""
    keys = chunk_key_encoding(src.metadata) if src.metadata else None
    folder = src.location
    if keys is None or folder is None or not folder.is_local:
        return []
    unit = (src.shard_shape or src.chunk_shape)[axis]
    grid = [-(-n // c) for n, c in zip(src.shape, src.shard_shape or src.chunk_shape)]
    if not math.prod(grid) or (grid[axis] - from_row // unit) * (math.prod(grid) // grid[axis]) > _MAX_SETTLE_KEYS:
        return []
    ranges = [range(from_row // unit, n) if a == axis else range(n) for a, n in enumerate(grid)]
    names = [format_chunk_key(tuple(c), *keys) for c in itertools.product(*ranges)]
    missing = [name for name in names if stat_chunk(src, name)[0] is None]
    unchanged = [key for key, *stat in edge_samples or [] if stat[0] is not None and stat_chunk(src, key) == stat]
    return sorted({*missing, *unchanged})


def _append_axes(append_axis: int | None, arrays: list[storage.SourceArray]) -> tuple[int | None, ...]:
    """Each array's append axis (None where it has fewer axes, or is a scalar: it cannot
    grow); refused only if no array has it."""
    if append_axis is None:
        return (None,) * len(arrays)
    axes = tuple(append_axis % len(a.shape) if -len(a.shape) <= append_axis < len(a.shape) else None for a in arrays)
    if all(axis is None for axis in axes) and any(a.shape for a in arrays):
        ndim = max(len(a.shape) for a in arrays)
        raise InputError(f"--append-axis {append_axis} is out of range: the arrays of SOURCE have at most {ndim} axes")
    return axes


def _missing(
    contents: storage.SourceContents,
    append_axes: tuple[int | None, ...],
    rows: dict[str, int],
    recorded: dict[str, ArrayFingerprint],
) -> dict[str, list[str]]:
    """Per array held back, the keys of its objects not stored (or, of the old edge chunk
    row, not rewritten yet) in the rows held back (:func:`unwritten_keys`)."""
    out = {}
    for src, axis in zip(contents.arrays, append_axes):
        if axis is not None and rows[src.path] < src.shape[axis]:
            before = recorded.get(src.path)
            keys = unwritten_keys(src, axis, rows[src.path], before.get("edge_samples") if before else None)
            if keys:
                out[src.path] = keys
    return out


def _written(
    contents: storage.SourceContents,
    append_axes: tuple[int | None, ...],
    recorded: dict[str, ArrayFingerprint],
    stale: dict[str, frozenset[str]] | None = None,
) -> tuple[dict[str, int], dict[str, int]]:
    """Per array, the rows along its append axis that look written (:func:`written_rows`,
    the keys in ``stale`` taken as written) and agree with the rest of its Dataset: every array
    and 1-D coordinate along one dimension of one group as long as the shortest of them (xarray
    appends one variable after the other), never less than DEST recorded. Then per such
    coordinate, its rows."""
    rows: dict[str, int] = {}
    floors: dict[str, int] = {}
    extents: dict[tuple[str, str], int] = {}
    for src, axis in zip(contents.arrays, append_axes):
        if axis is None:
            continue
        before = recorded.get(src.path)
        old = before["shape"] if before else None
        from_row = int(old[axis]) if isinstance(old, list) and len(old) == len(src.shape) else None
        if from_row is not None and from_row > src.shape[axis]:
            from_row = None  # shrunk: refused later, as a change
        rows[src.path] = written_rows(
            src,
            axis,
            from_row,
            before.get("edge_samples") if before else None,
            (stale or {}).get(src.path, frozenset()),
        )
        floors[src.path] = from_row or 0
        key = _dimension(src, src.dimension_names[axis] if src.dimension_names else f"#{src.path}")
        extents[key] = min(extents.get(key, rows[src.path]), rows[src.path])
    coordinate_rows = {}
    for c in contents.coordinates:
        key = _dimension(c, c.dimension_names[0]) if c.dimension_names and len(c.shape) == 1 else ("", "")
        if key in extents:
            extents[key] = min(extents[key], c.shape[0])
            coordinate_rows[c.path] = key
    for src, axis in zip(contents.arrays, append_axes):
        if axis is not None:
            key = _dimension(src, src.dimension_names[axis] if src.dimension_names else f"#{src.path}")
            rows[src.path] = max(min(rows[src.path], extents[key]), floors[src.path])
    return rows, {path: extents[key] for path, key in coordinate_rows.items()}


def _hold_back(
    contents: storage.SourceContents,
    append_axes: tuple[int | None, ...],
    rows: dict[str, int],
    coordinate_rows: dict[str, int],
    settle_s: float,
) -> tuple[list[storage.SourceArray], list[storage.SourceArray]]:
    """SOURCE's arrays and coordinates, those with rows that still look half-written held at
    the rows that do (:attr:`storage.SourceArray.held_shape`): the rest waits for the next run."""
    arrays = []
    for src, axis in zip(contents.arrays, append_axes):
        if axis is None or rows[src.path] >= src.shape[axis]:
            arrays.append(src)
            continue
        log.warning(
            "%s: rows %d to %d still look half-written after %g s: they wait for the next run",
            src.path or "SOURCE",
            rows[src.path],
            src.shape[axis],
            settle_s,
        )
        arrays.append(
            replace(src, held_shape=tuple(rows[src.path] if a == axis else n for a, n in enumerate(src.shape)))
        )
    coordinates = [
        replace(c, held_shape=(coordinate_rows[c.path],)) if coordinate_rows.get(c.path, c.shape[0]) < c.shape[0] else c
        for c in contents.coordinates
    ]
    return arrays, coordinates


def _dimension(src: storage.SourceArray, name: str) -> tuple[str, str]:
    """A dimension, by its group (each group of a SOURCE is a Dataset of its own) and name."""
    return (src.path.rpartition("/")[0], name)
