"""Blocks in and out of a stored array: through its chunk files, or through zarr.

:func:`describe_stored` decides once per array how its chunks are handled
(:class:`StoredArray`): where :mod:`relu_dask.chunkfiles` says relu_dask can do the byte
work itself, its chunk files are read and written directly (:mod:`relu_dask.chunkio`),
else through zarr's public ``Array[...]``. :func:`read_block` and :func:`write_block` move
one block in or out. With :mod:`relu_dask.storage`, the only modules that import zarr.
"""

from __future__ import annotations

import itertools
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

import numpy as np
import zarr
import zarr.errors

from relu_dask import chunkio, objectstores, writebehind
from relu_dask.chunkfiles import (
    ChunkFiles,
    NotDirect,
    chunk_key_encoding,
    describe_chunk_files,
    format_chunk_key,
    parse_metadata,
)
from relu_dask.errors import DamagedSourceError
from relu_dask.locations import Location

__all__ = [
    "StoredArray",
    "describe_stored",
    "drop_stored_objects",
    "fetch_block",
    "read_block",
    "read_metadata",
    "read_metadata_bytes",
    "write_block",
]


@dataclass(frozen=True)
class StoredArray:
    """One array as the tasks read and write it: zarr's Array, and its chunk files where
    relu_dask does the byte work itself (:mod:`relu_dask.chunkfiles` decides, once per array).

    :func:`read_block` and :func:`write_block` take the path this decision gives; nothing
    else asks which one it is.
    """

    array: zarr.Array
    """The zarr Array (read-only for a source)."""
    files: ChunkFiles | None
    """Its chunk files, read and written by :mod:`relu_dask.chunkio`; None: through zarr."""
    why_not_direct: str = ""
    """Why ``files`` is None, in words."""
    where: str = ""
    """Where the array is (its URL), for messages."""
    keys: tuple[str, str] | None = None
    """Its chunk key encoding (prefix, separator), for messages; None if not one of the spec's."""
    bucket: objectstores.Bucket | None = None
    """Where ``files`` are objects in an S3 bucket (their paths its keys), reached through
    obstore; None for chunk files on the local file system."""

    def describe_chunk(self, coords: tuple[int, ...]) -> str:
        """The stored object at ``coords`` in words: its file where the key encoding is known."""
        if self.files is not None and self.bucket is not None:
            return f"chunk {self.bucket.url(str(self.files.path(coords)))}"
        if self.files is not None:
            return f"chunk file {self.files.path(coords)}"
        if self.keys is not None:
            return f"chunk {format_chunk_key(coords, *self.keys)} of {self.where}"
        return f"chunk {coords} of {self.where}"

    @property
    def io_path(self) -> str:
        """``"direct"`` (chunk files by chunkio) or ``"zarr"`` (zarr's public API)."""
        return "direct" if self.files is not None else "zarr"

    @property
    def stored_unit(self) -> tuple[int, ...]:
        """The shape of one stored object: the shard if sharded, else the chunk."""
        shards = getattr(self.array, "shards", None)
        return tuple(shards) if shards else tuple(self.array.chunks)


def read_metadata(location: Location) -> dict[str, Any] | None:
    """The metadata document of the array at ``location`` (``zarr.json`` or ``.zarray``), if readable."""
    return read_metadata_bytes(location)[0]


def read_metadata_bytes(location: Location) -> tuple[dict[str, Any] | None, bytes | None]:
    """:func:`read_metadata`, with the bytes it was parsed from (None: no document readable)."""
    for name in ("zarr.json", ".zarray"):  # one read where it is v3: a request each on object stores
        try:
            raw = location.child(name).read_bytes()
        except (OSError, ValueError):
            continue
        try:
            return parse_metadata(raw), raw
        except ValueError:  # not JSON: zarr will have said so when it opened the array
            return None, raw
    return None, None


def describe_stored(array: zarr.Array, location: Location | None, metadata: dict[str, Any] | None) -> StoredArray:
    """Decide how the tasks read and write ``array`` (stored at ``location``)."""
    where = str(location) if location is not None else "the array"
    keys = chunk_key_encoding(metadata) if metadata is not None else None
    if location is None:
        return StoredArray(array, None, "not on the local file system", where, keys)
    bucket: objectstores.Bucket | None = None
    folder: PurePath
    if location.is_local:
        folder = location.path
    elif (direct := location.object_store) is not None:
        bucket, folder = direct[0], PurePosixPath(direct[1])
    else:
        return StoredArray(array, None, f"not on the local file system ({location.why_not_object_store})", where, keys)
    if metadata is None:
        return StoredArray(array, None, "no metadata document readable", where, keys)
    described = describe_chunk_files(folder, metadata)
    if isinstance(described, NotDirect):
        return StoredArray(array, None, described.reason, where, keys)
    if not _agrees(described, array):
        reason = "its metadata document differs from what zarr opened (consolidated metadata out of date?)"
        return StoredArray(array, None, reason, where, keys)
    return StoredArray(array, described, "", where, keys, bucket)


def _agrees(files: ChunkFiles, array: zarr.Array) -> bool:
    """Whether the array's own metadata document says what zarr's Array says (shape, chunks,
    dtype, fill value): a group's consolidated metadata, which zarr reads instead, may be stale."""
    native = files.format.dtype.newbyteorder("=")
    try:
        fill = np.asarray(0 if array.fill_value is None else array.fill_value, dtype=native)
    except (TypeError, ValueError):
        return False
    return (
        tuple(array.shape) == files.shape
        and not getattr(array, "shards", None)
        and tuple(array.chunks) == files.format.chunk_shape
        and np.dtype(array.dtype).newbyteorder("=") == native
        and fill.tobytes() == np.asarray(files.fill_value, dtype=native).tobytes()
    )


def fetch_block(stored: StoredArray, selection: tuple[slice, ...]) -> dict[tuple[int, ...], Any]:
    """The stored bytes of the block's chunks, where they are in a bucket (else nothing): for
    :func:`read_block`'s ``fetched``, taken before the task holds its decoding buffers."""
    cells, _grid = _cells(stored, selection)
    return _fetch(stored, cells) if cells else {}


def _cells(stored: StoredArray, selection: tuple[slice, ...]) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
    grid = stored.files.format.chunk_shape if stored.files is not None else stored.stored_unit
    ranges = [
        range(a // c, max(a // c, (b - 1) // c) + 1) for (a, b), c in zip(((s.start, s.stop) for s in selection), grid)
    ]
    shape = tuple(s.stop - s.start for s in selection)
    return ([] if 0 in shape else list(itertools.product(*ranges))), grid


def read_block(
    stored: StoredArray,
    selection: tuple[slice, ...],
    into: chunkio.Scratch | None = None,
    fetched: dict[tuple[int, ...], Any] | None = None,
) -> np.ndarray:
    """Read ``array[selection]`` a stored object (chunk or shard) at a time.

    zarr's own read of a whole block fetches every chunk of the selection, decodes them
    all, then copies each into a new output: about three times the block in memory at
    once. Here each stored object is read and copied into the output before the next one
    (unless it is the whole selection: then it is returned as is), so a task holds the
    block plus one object's compressed and decoded bytes. Chunk files that
    :mod:`relu_dask.chunkfiles` describes are decoded by :mod:`relu_dask.chunkio` straight
    into the buffers of ``into``, which a task reuses from block to block; an unstored one
    reads as the fill value. Anything else, and a chunk file chunkio declines (one of
    another size), is read with zarr's ``array[...]``. Either way the values are the same bits.

    With ``into``, the result may be a view of its buffers: valid until ``into`` reads again.
    ``fetched``: what :func:`fetch_block` gave for this selection (taken out as it is decoded);
    else the chunks in a bucket are fetched here.
    """
    into = into if into is not None else chunkio.Scratch()
    starts = tuple(s.start for s in selection)
    shape = tuple(s.stop - s.start for s in selection)
    cells, grid = _cells(stored, selection)
    if not cells:
        return np.asarray(stored.array[selection])
    fetched = fetched if fetched is not None else _fetch(stored, cells)
    out: np.ndarray | None = None
    for coords in cells:
        lo = tuple(i * c for i, c in zip(coords, grid))
        inner = tuple(slice(max(a, b) - b, min(a + n, b + c) - b) for a, n, b, c in zip(starts, shape, lo, grid))
        at = tuple(slice(max(a, b) - a, min(a + n, b + c) - a) for a, n, b, c in zip(starts, shape, lo, grid))
        part = _read_cell(stored, coords, lo, inner, into, fetched.pop(coords, None))
        if len(cells) == 1 and isinstance(part, np.ndarray):
            return part  # the whole selection is one stored object's region: no copy
        if out is None:
            out = into.take(chunkio.BLOCK, shape, part.dtype if isinstance(part, np.ndarray) else stored.array.dtype)
        out[at] = part
        del part
    assert out is not None
    return out


def _fetch(stored: StoredArray, cells: list[tuple[int, ...]]) -> dict[tuple[int, ...], Any]:
    """The stored bytes of every chunk of a block in a bucket, fetched at once (else nothing).

    A chunk that is not stored reads as :data:`_UNSTORED`. All of a block's compressed
    chunks are held at once: a block on an object store is a few MiB (options.REMOTE_BLOCK_BYTES).
    """
    files, bucket = stored.files, stored.bucket
    if files is None or bucket is None:
        return {}
    found = objectstores.get_many(bucket, [str(files.path(c)) for c in cells])
    return {c: _UNSTORED if raw is None else raw for c, raw in zip(cells, found)}


#: What :func:`_fetch` gives for a chunk its bucket does not hold.
_UNSTORED = memoryview(b"")


def _read_cell(
    stored: StoredArray,
    coords: tuple[int, ...],
    lo: tuple[int, ...],
    inner: tuple[slice, ...],
    into: chunkio.Scratch,
    fetched: Any = None,
) -> Any:
    """The part ``inner`` of the stored object at ``coords``: an array, or the fill value (a scalar).

    ``fetched``: the object's bytes where :func:`_fetch` read them from a bucket.
    """
    files = stored.files
    if files is not None:
        try:
            if fetched is _UNSTORED:
                raise FileNotFoundError(str(files.path(coords)))
            if fetched is not None:
                chunk = chunkio.decode_chunk(fetched, files.format, into)
            else:
                chunk = chunkio.read_chunk(files.path(coords), files.format, into)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return files.fill_value  # not stored: the fill value, as the spec says
        except OSError as exc:
            raise OSError(exc.errno, f"cannot read {stored.describe_chunk(coords)}: {exc.strerror}") from exc
        except _DECODE_ERRORS as exc:
            raise _damaged(stored, coords, exc) from exc
        if chunk is not None:
            return chunk[inner]
    # zarr reads it (and raises its own error for a chunk file it cannot decode either)
    region = tuple(slice(b + s.start, b + s.stop) for b, s in zip(lo, inner))
    try:
        return np.asarray(stored.array[region])
    except zarr.errors.BaseZarrError:
        raise  # zarr's own (metadata, store): not a damaged chunk
    except _DECODE_ERRORS as exc:
        raise _damaged(stored, coords, exc) from exc


#: What a codec raises for bytes it cannot decode (numcodecs: RuntimeError; zarr: ValueError, TypeError).
_DECODE_ERRORS = (RuntimeError, ValueError, TypeError)


def _damaged(stored: StoredArray, coords: tuple[int, ...], exc: Exception) -> DamagedSourceError:
    return DamagedSourceError(
        f"cannot decode {stored.describe_chunk(coords)} ({type(exc).__name__}: {exc}): the source is damaged; "
        "restore or rewrite that chunk (rerunning will not help)"
    )


def write_block(
    stored: StoredArray, selection: tuple[slice, ...], block: np.ndarray, into: chunkio.Scratch, *, later: str = ""
) -> Future[None] | None:
    """Write ``block`` to ``array[selection]``, a selection of whole chunks (or up to the edge).

    Where :mod:`relu_dask.chunkfiles` describes the array's chunk files, each chunk is
    encoded and written by :func:`chunkio.write_chunk` (atomically, the same bytes zarr
    writes), straight from the block where it is one contiguous piece of it, else padded
    with the fill value in ``into``. Any other array, or a selection that cuts a chunk, is
    written by zarr. As zarr does by default, a chunk equal to the fill value is not
    stored, and one stored before is removed.

    ``later``, in a bucket: the run (its id) whose chunks the store's pool writes while the
    caller goes on (:func:`relu_dask.writebehind.write_later`); the future says when they are
    written. None where they are written already.
    """
    files = stored.files
    if files is None or block.dtype != files.format.dtype.newbyteorder("="):
        _write_by_zarr(stored, selection, block, later)
        return None
    grid, shape = files.format.chunk_shape, files.shape
    whole = all(s.start % c == 0 and (s.stop % c == 0 or s.stop == n) for s, c, n in zip(selection, grid, shape))
    if not whole or files.format.dtype.byteorder == ">" or files.format.order != "C":
        _write_by_zarr(stored, selection, block, later)  # a cut chunk needs zarr's read-modify-write
        return None
    ranges = [range(s.start // c, -(-s.stop // c)) for s, c in zip(selection, grid)]
    puts: list[tuple[str, Any]] = []
    deletes: list[str] = []
    for coords in itertools.product(*ranges):
        lo = tuple(i * c for i, c in zip(coords, grid))
        part = block[
            tuple(slice(a - s.start, min(a + c, n) - s.start) for a, c, n, s in zip(lo, grid, shape, selection))
        ]
        path = files.path(coords)
        if _all_fill(part, files.fill_value):
            if stored.bucket is not None:
                deletes.append(str(path))
            else:
                Path(path).unlink(missing_ok=True)
            continue
        if part.shape != grid or not part.flags.c_contiguous:
            if stored.bucket is None:
                padded = into.take(chunkio.PADDED, grid, files.format.dtype)
            else:  # kept until the block's PUTs, one for each such chunk
                padded = np.empty(grid, files.format.dtype)
            padded[...] = files.fill_value
            padded[tuple(slice(0, k) for k in part.shape)] = part
            part = padded
        if stored.bucket is not None:
            data = chunkio.encode_chunk(part, files.format)
            # raw bytes are the block's own memory, which the task reuses before a later write
            puts.append((str(path), bytes(data) if later and files.format.codec is None else data))
        else:
            chunkio.write_chunk(path, part, files.format)
    if stored.bucket is None:
        return None
    if later:
        return writebehind.write_later(stored.bucket, puts, deletes, run=later)
    objectstores.put_many(stored.bucket, puts)  # all of the block's chunks at once
    objectstores.delete_many(stored.bucket, deletes)
    return None


def _write_by_zarr(stored: StoredArray, selection: tuple[slice, ...], block: np.ndarray, later: str) -> None:
    if later:  # not before DEST is ready (writebehind.before_writes)
        writebehind.wait_before_writes(later)
    stored.array[selection] = block


def drop_stored_objects(stored: StoredArray, folder: Location, selection: tuple[slice, ...]) -> int:
    """Delete the stored objects (chunks, or shards where sharded) of ``stored``, kept in
    ``folder``, that lie wholly inside ``selection``; return how many there were.

    Before a block found damaged is written again: zarr reads a shard it writes into, and a
    damaged one would stop it. (Objects only partly inside are left: zarr merges into them.)
    """
    if stored.keys is None:
        return 0
    shape, unit = stored.array.shape, stored.stored_unit
    ranges = [
        range(-(-s.start // u), s.stop // u + (s.stop == n and n % u != 0)) for s, u, n in zip(selection, unit, shape)
    ]
    removed = 0
    for coords in itertools.product(*ranges):
        key = format_chunk_key(coords, *stored.keys)
        removed += folder.child(*key.split("/")).stat() is not None
        folder.child(*key.split("/")).remove()
    return removed


def _all_fill(part: np.ndarray, fill_value: Any) -> bool:
    """Whether ``part`` holds only the fill value (a count, no temporary, for fill 0)."""
    if part.dtype.kind in "iub" and fill_value == 0:
        return not np.count_nonzero(part)
    if part.dtype.kind == "f" and np.isnan(fill_value):
        return bool(np.isnan(part).all())
    return bool((part == fill_value).all())
