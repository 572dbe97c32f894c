"""SOURCE's identity, as a run records it: what tells growth from change on the next run.

:func:`fingerprint_array` is what ``job.json`` keeps of each source array (shape, dtype,
chunking, metadata hashes, the size and time of sampled chunk objects, and along the append
axis the last chunk row's objects and a hash of every settled chunk row); :func:`stat_chunk`
and :func:`settled_sha256` read the same figures again, for :func:`relu_dask.growth.compare_jobs`
to compare. Reading never changes them; rewriting a chunk or the metadata does.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from relu_dask.chunkfiles import chunk_key_encoding, format_chunk_key
from relu_dask.locations import Location, at_once
from relu_dask.records import ArrayFingerprint, JobFingerprint
from relu_dask.storage import SourceArray

__all__ = ["STAT_CONCURRENCY", "fingerprint_array", "fingerprint_job", "settled_sha256", "stat_chunk", "stat_chunks"]


def fingerprint_job(
    source: Location,
    arrays: Sequence[SourceArray],
    coordinates: Sequence[SourceArray],
    append_axes: Sequence[int | None],
    recorded: dict[str, ArrayFingerprint],
    settings: JobFingerprint,
) -> JobFingerprint:
    """What ``job.json`` keeps of a run's job: ``settings`` (SOURCE's URL, the options that
    change the result) with SOURCE's arrays and coordinates (:func:`fingerprint_array`). An array held
    back at the shape DEST recorded (``recorded``, by path) keeps DEST's fingerprint of it
    (the array as DEST last saw it). On an object store the arrays are looked at together."""

    def one(a: SourceArray, axis: int | None) -> ArrayFingerprint:
        if a.held_shape is not None and a.path in recorded and list(a.held_shape) == recorded[a.path]["shape"]:
            return recorded[a.path]
        return fingerprint_array(a, append_axis=axis)

    pairs = list(zip(arrays, append_axes))
    found = [one(*pair) for pair in pairs] if source.is_local else at_once(lambda pair: one(*pair), pairs)
    return {**settings, "arrays": found, "coordinates": [fingerprint_array(c) for c in coordinates]}


def fingerprint_array(src: SourceArray, num_samples: int = 16, append_axis: int | None = None) -> ArrayFingerprint:
    """A cheap identity of one source array, to tell whether it changed between runs.

    Its path, shape, dtype and chunking; a hash of its metadata document (and one of it
    less the shape); and the size and modification time of up to ``num_samples`` stored
    chunk (or shard) objects spread evenly over the chunk grid. Rewriting those chunks, or
    the array's metadata, changes it; reading never does. With an ``append_axis``, also
    those of every chunk object of the last chunk row along it (``edge_samples``): a writer
    that appends rewrites them, which tells a run whether it has.
    """
    unit = src.shard_shape or src.chunk_shape
    grid = tuple(-(-n // c) for n, c in zip(src.shape, unit))
    total = math.prod(grid)
    names: list[str] = []
    keys = chunk_key_encoding(src.metadata) if src.metadata else None
    if total and keys is not None:
        linears = sorted({round(i * (total - 1) / max(1, num_samples - 1)) for i in range(num_samples)})
        names = [format_chunk_key(tuple(int(c) for c in np.unravel_index(i, grid)), *keys) for i in linears]
    # the samples and the edge chunks looked at together (each once: on a small grid the samples
    # are among the edge's): on an object store, requests that go out at once
    edge = _edge_keys(src, append_axis) if append_axis is not None and not src.held_shape else None
    wanted = [*names, *(edge or [])]
    found = {stat[0]: stat for stat in stat_chunks(src, list(dict.fromkeys(wanted)))}
    stats = [list(found[key]) for key in wanted]
    samples = stats[: len(names)]
    layout = {k: v for k, v in (src.metadata or {}).items() if k != "shape"}
    fingerprint: ArrayFingerprint = {
        "path": src.path,
        "shape": list(src.shape),
        "dtype": str(src.dtype),
        "chunk_shape": list(src.chunk_shape),
        "shard_shape": list(src.shard_shape) if src.shard_shape else None,
        "metadata_sha256": src.metadata_sha256,
        # The metadata less the shape: equal when the array only grew (or shrank).
        "layout_sha256": hashlib.sha256(json.dumps(layout, sort_keys=True).encode()).hexdigest() if layout else None,
        "chunk_samples": samples,
    }
    if append_axis is not None:
        # Every chunk object of the whole chunk rows along the append axis, locally: a growth
        # never rewrites them, so a change there is a change.
        fingerprint["settled_sha256"] = _settled(src, append_axis)
        if not src.held_shape:  # where the run holds rows back, the last row may be written further already
            fingerprint["edge_samples"] = None if edge is None else stats[len(names) :]
    return fingerprint


#: The most chunk objects :func:`settled_sha256` looks at (one stat each).
_MAX_SETTLED_KEYS = 100_000


def _settled(src: SourceArray, axis: int) -> list[Any] | None:
    """``[rows, hash]``: the whole chunk rows of ``src`` along ``axis`` and their
    :func:`settled_sha256` (None where it is not looked at)."""
    if not -len(src.shape) <= axis < len(src.shape):
        return None
    axis %= len(src.shape)
    rows = (src.held_shape or src.shape)[axis]
    unit = (src.shard_shape or src.chunk_shape)[axis]
    rows -= rows % unit
    digest = settled_sha256(src, axis, rows)
    return None if digest is None else [rows, digest]


def settled_sha256(src: SourceArray, axis: int, rows: int) -> str | None:
    """A hash of the key, size and modification time of every stored chunk (or shard)
    object of ``src`` in its first ``rows`` rows along ``axis`` (whole chunk rows), read
    from a local store; None elsewhere, or where there are too many to look at. Rewriting
    any of them changes it; appending rows after them does not."""
    keys = chunk_key_encoding(src.metadata) if src.metadata else None
    folder = src.location
    if keys is None or folder is None or not folder.is_local or not math.prod(src.shape):
        return None
    unit = src.shard_shape or src.chunk_shape
    grid = [-(-n // c) if a != axis else rows // c for a, (n, c) in enumerate(zip(src.shape, unit))]
    if math.prod(grid) > _MAX_SETTLED_KEYS:
        return None
    digest = hashlib.sha256()
    for coords in itertools.product(*map(range, grid)):
        key = format_chunk_key(coords, *keys)
        digest.update(f"{key} {stat_chunk(src, key)}\n".encode())
    return digest.hexdigest()


def _edge_keys(src: SourceArray, axis: int) -> list[str] | None:
    """The keys of the chunk objects of the last chunk row of ``src`` along ``axis`` (None:
    not known, or too many to look at)."""
    keys = chunk_key_encoding(src.metadata) if src.metadata else None
    unit = src.shard_shape or src.chunk_shape
    grid = [-(-n // c) for n, c in zip(src.shape, unit)]
    if keys is None or not math.prod(grid) or math.prod(grid) // grid[axis] > _MAX_EDGE_SAMPLES:
        return None
    others = [range(n) if a != axis else [n - 1] for a, n in enumerate(grid)]
    return [format_chunk_key(tuple(c), *keys) for c in itertools.product(*others)]


#: Requests in flight at once when chunk objects of an object store are looked at.
STAT_CONCURRENCY = 32


def stat_chunks(src: SourceArray, keys: Sequence[str]) -> list[list[Any]]:
    """``[key, size, mtime]`` of each chunk object (:func:`stat_chunk`); on an object store
    the requests go out together (a round trip each, one after another, made a run's fixed
    cost grow with the samples)."""
    folder = src.location
    if folder is None or folder.is_local or len(keys) < 2:
        return [[key, *stat_chunk(src, key)] for key in keys]
    with ThreadPoolExecutor(min(STAT_CONCURRENCY, len(keys))) as pool:
        return [[key, *stat] for key, stat in zip(keys, pool.map(lambda key: stat_chunk(src, key), keys))]


def stat_chunk(src: SourceArray, key: str) -> list[Any]:
    """The size and modification time of a stored chunk (or shard) object of ``src``, as
    :func:`fingerprint_array` samples them (``[None, None]``: not stored)."""
    folder = src.location
    assert folder is not None, "a SourceArray from open_source knows where it is"
    stat = folder.child(*key.split("/")).stat()
    return [stat[0], stat[1]] if stat else [None, None]


_MAX_EDGE_SAMPLES = 1024
