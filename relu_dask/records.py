"""The shapes of what ``job.json`` records of a job's SOURCE: typed, so that every key read
anywhere is checked (mypy) against one declaration.

``job.json`` is JSON: these are :class:`typing.TypedDict` s, encoded and decoded as they are
(:mod:`relu_dask.journal` reads and writes the file; :mod:`relu_dask.fingerprint` makes
them). Keys an older relu-dask did not record are ``NotRequired``: a reader uses ``.get``.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

__all__ = ["ArrayFingerprint", "JobFingerprint"]


class ArrayFingerprint(TypedDict):
    """One source array (or coordinate) as a run found it (:func:`relu_dask.fingerprint.fingerprint_array`)."""

    path: str
    """Its path in SOURCE ("" for SOURCE itself)."""
    shape: list[int]
    dtype: str
    chunk_shape: list[int]
    shard_shape: list[int] | None
    metadata_sha256: NotRequired[str | None]
    """A hash of its metadata document."""
    layout_sha256: NotRequired[str | None]
    """A hash of its metadata document less the shape: equal when the array only grew."""
    chunk_samples: NotRequired[list[list[Any]]]
    """``[key, size, mtime]`` of up to 16 chunk objects spread over the grid."""
    settled_sha256: NotRequired[list[Any] | None]
    """``[rows, hash]``: the whole chunk rows along the append axis and a hash of every chunk
    object's key, size and time there (local stores; None elsewhere)."""
    edge_samples: NotRequired[list[list[Any]] | None]
    """``[key, size, mtime]`` of every chunk object of the last chunk row along the append axis."""


class JobFingerprint(TypedDict):
    """A job: SOURCE's identity and the options that change the result."""

    source: str
    """SOURCE's URL."""
    arrays: list[ArrayFingerprint]
    """The arrays masked, in order (the journal's array indices)."""
    coordinates: NotRequired[list[ArrayFingerprint]]
    """xarray's coordinates, copied as they are."""
    rule: str
    """``x >= 0`` or ``x > 0``."""
    nan: str
    dest_chunks: NotRequired[list[int] | None]
    dest_shards: NotRequired[list[int] | None]
    compressor: NotRequired[str]
