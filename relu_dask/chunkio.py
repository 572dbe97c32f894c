"""Stored chunks read straight into buffers that are reused from task to task, and written.

Use this module to decode one chunk file of a local Zarr array whose codecs are simple --
raw bytes, or bytes with one zstd or blosc compressor (zarr's defaults for v3 and v2) --
without zarr's codec pipeline and without fresh memory for every chunk, or to encode and
write one (:func:`write_chunk`). It imports numpy and numcodecs only:
:mod:`relu_dask.chunkfiles` describes the array from its metadata document
(:class:`ChunkFormat`), and :mod:`relu_dask.storage` falls back to zarr's public API
wherever this module does not apply.

Why: a fresh buffer of tens of MiB is page-faulted in and zeroed by the kernel every
time, which costs more CPU than decoding it. For one 4096 x 4096 float32 chunk (64 MiB,
zstd) on this project's 2-core machine: reading the file and decoding it into fresh
buffers took 115 ms of CPU, into reused buffers 62 ms (a one-off measurement;
``scripts/bench_scaling.py`` measures the whole run). Writing each mask chunk here rather than through zarr's
asynchronous write path, which kept each task waiting on its event loop, took the same
script's 1 GiB run from 1.36 s to 1.29 s and 2.33 to 2.23 CPU-s per GiB. The
codecs are the very numcodecs objects zarr builds, so the values and the chunk files are
the same bits; :func:`read_chunk` checks the decoded size from the frame's own
header before it decodes, as a buffer larger than the frame would otherwise hide a short
chunk.

A :class:`Scratch` holds one task's buffers. :func:`scratch` lends one from a per-process
pool (one per task running at once, at most) and takes it back; :func:`release_buffers`
frees the pool at the end of a run.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BLOCK",
    "CHUNK",
    "CODEC_IDS",
    "FLAGS",
    "PADDED",
    "STORED",
    "ChunkFormat",
    "Scratch",
    "blosc_content_size",
    "decode_chunk",
    "encode_chunk",
    "frame_is_whole",
    "read_chunk",
    "release_buffers",
    "scratch",
    "write_chunk",
    "zstd_content_size",
]

#: The numcodecs ``codec_id`` of the compressors this module handles (None: the raw bytes).
CODEC_IDS: tuple[str, ...] = ("zstd", "blosc")

#: The role of a chunk file's compressed bytes: free again once :func:`read_chunk` returns,
#: so a task may take it for something else (the mask).
STORED = "stored"
#: The role of the decoded chunk :func:`read_chunk` returns.
CHUNK = "chunk"
#: The role of a block assembled from several chunks (:func:`relu_dask.blocks.read_block`).
BLOCK = "block"
#: The role of a chunk padded to its full shape before it is written.
PADDED = "padded"
#: The role of the bool slab the counting passes of a task reuse.
FLAGS = "flags"

_ZSTD_MAGIC = 0xFD2FB528


@dataclass(frozen=True)
class ChunkFormat:
    """How one array's chunk files are stored: shape, dtype, memory order and codec."""

    chunk_shape: tuple[int, ...]
    dtype: np.dtype
    """The dtype as stored, byte order included."""
    order: str = "C"
    """Memory order of the decoded bytes: ``"C"``, or ``"F"`` (Zarr v2's ``order``)."""
    codec: Any = None
    """The numcodecs codec of the chunk files (its ``codec_id`` one of :data:`CODEC_IDS`),
    configured as zarr configures it; None for raw bytes."""

    def __post_init__(self) -> None:
        if self.codec is not None and getattr(self.codec, "codec_id", None) not in CODEC_IDS:
            raise ValueError(f"codec must be None or a numcodecs {' or '.join(CODEC_IDS)} codec, got {self.codec!r}")
        if self.order not in ("C", "F"):
            raise ValueError(f"order must be C or F, got {self.order!r}")
        object.__setattr__(self, "dtype", np.dtype(self.dtype))

    @property
    def nbytes(self) -> int:
        """Bytes of one decoded chunk."""
        return math.prod(self.chunk_shape) * self.dtype.itemsize


class Scratch:
    """The reusable buffers of one task, one per role (:data:`STORED`, :data:`CHUNK`, ...).

    :meth:`take` hands out a view of the role's buffer, grown when too small: the view is
    valid until the same role is taken again, so each role holds one thing at a time.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def take(self, role: str, shape: tuple[int, ...], dtype: np.dtype | type, order: str = "C") -> np.ndarray:
        """An uninitialised array of ``shape`` and ``dtype`` in ``role``'s buffer."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        buffer = self._buffers.get(role)
        if buffer is None or buffer.size < nbytes:
            # With headroom, as compressed chunks differ a little in size from file to file;
            # pages never written cost no memory.
            self._buffers.pop(role, None)
            buffer = self._buffers[role] = small_page_buffer(nbytes + nbytes // 16)
        return buffer[:nbytes].view(dtype).reshape(shape, order=order)  # type: ignore[call-overload]

    @property
    def nbytes(self) -> int:
        """Bytes held by all roles."""
        return sum(b.size for b in self._buffers.values())


def small_page_buffer(nbytes: int) -> np.ndarray:
    """``nbytes`` of fresh memory (zeros), a mapping of its own kept out of huge pages.

    numpy asks the kernel for transparent huge pages on every large array. Fresh huge pages
    cost more to fault in than small ones (2 MiB zeroed at once, and memory compacted to
    find them when it is fragmented, as on a busy shared machine), and reading, decoding
    and comparing chunks front to back gains nothing from them. Measured on this project's
    2-core machine (``relu-dask run`` on the 1 GiB benchmark array, single runs), kernel
    CPU seconds with numpy's allocation, then with this: 1 thread 0.63 / 0.32, 2 threads
    0.79 / 0.37, 8 threads 2.36 / 0.71, 16 threads 2.84 / 1.2-1.9; user CPU and results
    unchanged (``scripts/bench_scaling.py`` measures the whole run). Turning the advice off
    for all of numpy (``NUMPY_MADVISE_HUGEPAGE=0``) would do the same, but for every array
    of a process that may be the user's. Where ``mmap`` lacks these flags (not Linux), a
    plain numpy array; where the kernel refuses the advice (built without huge pages), the
    mapping as it is.
    """
    if not hasattr(mmap, "MAP_PRIVATE") or not hasattr(mmap, "MADV_NOHUGEPAGE"):
        return np.zeros(nbytes, dtype=np.uint8)
    region = mmap.mmap(-1, max(1, nbytes), flags=mmap.MAP_PRIVATE)  # anonymous, private to the process
    with contextlib.suppress(OSError):  # EINVAL from a kernel built without huge pages: none to avoid
        region.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(region, dtype=np.uint8)[:nbytes]


_FREE: list[Scratch] = []
_LOCK = threading.Lock()
_GENERATION = [0]  # bumped by release_buffers: a Scratch lent before it is not taken back


@contextlib.contextmanager
def scratch() -> Iterator[Scratch]:
    """Lend a :class:`Scratch` from this process's pool for the ``with`` block."""
    with _LOCK:
        lent = _FREE.pop() if _FREE else Scratch()
        generation = _GENERATION[0]
    try:
        yield lent
    finally:
        with _LOCK:
            if generation == _GENERATION[0]:
                _FREE.append(lent)


def release_buffers() -> int:
    """Free the pool's buffers; return how many bytes that was.

    A Scratch lent out now (a task still running after its run failed) is not taken back
    into the pool when it returns: its buffers go when the task lets go of them.
    """
    with _LOCK:
        freed = sum(s.nbytes for s in _FREE)
        _FREE.clear()
        _GENERATION[0] += 1
    return freed


def read_chunk(path: str | os.PathLike[str], fmt: ChunkFormat, into: Scratch) -> np.ndarray | None:
    """Decode the chunk file at ``path`` into ``into``'s :data:`CHUNK` buffer.

    Returns the chunk (a view of the scratch buffer, shape ``fmt.chunk_shape``), or None
    where only zarr can tell what the file holds: a frame that does not state its decoded
    size, or states another size than the chunk's (zarr's read then decodes it, or raises
    its own error). Raises :class:`FileNotFoundError` (or another OSError) as ``open`` does.
    """
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if fmt.codec is None:
            chunk = into.take(CHUNK, (fmt.nbytes,), np.uint8)
            if size != fmt.nbytes or not _read_exactly(f, chunk):
                return None
            return _shaped(chunk, fmt)
        stored = into.take(STORED, (size,), np.uint8)
        if not _read_exactly(f, stored):
            return None
    return decode_chunk(stored, fmt, into)


def decode_chunk(stored: Any, fmt: ChunkFormat, into: Scratch) -> np.ndarray | None:
    """Decode one stored chunk's bytes (an object read from a store) into ``into``'s
    :data:`CHUNK` buffer; None where only zarr can tell what they hold (see :func:`read_chunk`)."""
    raw = np.frombuffer(stored, dtype=np.uint8) if not isinstance(stored, np.ndarray) else stored
    chunk = into.take(CHUNK, (fmt.nbytes,), np.uint8)
    if fmt.codec is None:
        if raw.size != fmt.nbytes:
            return None
        chunk[...] = raw
        return _shaped(chunk, fmt)
    if _decoded_size(fmt.codec.codec_id, raw) != fmt.nbytes:
        return None
    decoded = fmt.codec.decode(raw, out=chunk)
    if not np.may_share_memory(decoded, chunk):  # a numcodecs that did not decode into out
        return None
    return _shaped(chunk, fmt)


def _shaped(chunk: np.ndarray, fmt: ChunkFormat) -> np.ndarray:
    return chunk.view(fmt.dtype).reshape(fmt.chunk_shape, order=fmt.order)  # type: ignore[call-overload]


def encode_chunk(chunk: np.ndarray, fmt: ChunkFormat) -> Any:
    """The stored bytes of ``chunk`` (the whole chunk, C-ordered, ``fmt.dtype``): what
    zarr stores for it (a buffer: the chunk's own memory where there is no codec)."""
    if chunk.shape != fmt.chunk_shape or chunk.dtype != fmt.dtype or not chunk.flags.c_contiguous:
        raise ValueError(
            f"a chunk of {fmt.chunk_shape} {fmt.dtype}, C-ordered, is needed, got {chunk.shape} {chunk.dtype}"
        )
    # The codec gets the chunk's bytes, as zarr hands them to it: a blosc that is not told
    # the type size (numcodecs before 0.16) then shuffles as zarr's does.
    flat = chunk.reshape(-1).view(np.uint8)
    return flat.data if fmt.codec is None else fmt.codec.encode(flat)


def write_chunk(path: str | os.PathLike[str], chunk: np.ndarray, fmt: ChunkFormat) -> None:
    """Encode ``chunk`` (see :func:`encode_chunk`) and write it to ``path``.

    Atomically, as zarr's LocalStore writes: into a temporary ``*.partial`` file beside it,
    then renamed over ``path``; a killed write leaves at most that temporary file.
    """
    data = encode_chunk(chunk, fmt)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{uuid.uuid4().hex}.partial")
    try:
        with open(partial, "wb") as f:
            f.write(data)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def frame_is_whole(path: str | os.PathLike[str], fmt: ChunkFormat) -> bool:
    """Whether the chunk file at ``path`` is exactly one encoded frame, no byte after it.

    A blosc decoder ignores bytes after the frame its header delimits, so a file with
    bytes appended still decodes; this finds them. zstd's decoder refuses trailing bytes
    and raw chunks must be exactly :attr:`ChunkFormat.nbytes`, so those are whole here
    and left to the decoder. A file that is not there is whole: an unstored chunk is the
    fill value.
    """
    if fmt.codec is None or fmt.codec.codec_id != "blosc":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return True
    return _blosc_frame_bytes(head) == size


def _read_exactly(f: Any, buffer: np.ndarray) -> bool:
    """Fill ``buffer`` from ``f``; False if the file ends first (it changed meanwhile)."""
    view = buffer.data.cast("B")
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            return False
        done += n
    return not f.read(1)  # and nothing after it


def _decoded_size(codec_id: str, stored: np.ndarray) -> int | None:
    return zstd_content_size(stored) if codec_id == "zstd" else blosc_content_size(stored)


def blosc_content_size(frame: np.ndarray | bytes) -> int | None:
    """The decoded size a blosc (1) frame's header states, or None if it is not one whole frame.

    The 16-byte header holds version, flags and type size, then three little-endian
    32-bit sizes: decoded bytes, block size and the frame's own compressed bytes, which
    must be the whole of ``frame``.

    Examples
    --------
    >>> from numcodecs import Blosc
    >>> blosc_content_size(Blosc().encode(bytes(1000)))
    1000
    """
    view = _as_bytes(frame)
    head = view[:16].tobytes()
    if _blosc_frame_bytes(head) != view.size:
        return None
    return int.from_bytes(head[4:8], "little")


def _blosc_frame_bytes(head: bytes) -> int | None:
    """The length a blosc (1) frame's 16-byte header states for the whole frame (None: no header)."""
    return int.from_bytes(head[12:16], "little") if len(head) >= 16 else None


def zstd_content_size(frame: np.ndarray | bytes) -> int | None:
    """The decoded size a zstd frame's header states, or None if it states none.

    From the frame header of RFC 8878, section 3.1.1.1: magic number, frame header
    descriptor, optional window descriptor and dictionary ID, then the content size field.

    Examples
    --------
    >>> from numcodecs import Zstd
    >>> zstd_content_size(Zstd().encode(bytes(1000)))
    1000
    """
    head = _as_bytes(frame)[:18].tobytes()
    if len(head) < 5 or int.from_bytes(head[:4], "little") != _ZSTD_MAGIC:
        return None
    descriptor = head[4]
    size_flag, single_segment, dict_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    start = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    width = (1 if single_segment else 0, 2, 4, 8)[size_flag]
    if width == 0 or len(head) < start + width:
        return None
    value = int.from_bytes(head[start : start + width], "little")
    return value + 256 if width == 2 else value


def _as_bytes(frame: np.ndarray | bytes) -> np.ndarray:
    """``frame`` as a flat uint8 array, without a copy."""
    return np.frombuffer(frame, dtype=np.uint8) if isinstance(frame, bytes) else frame.reshape(-1).view(np.uint8)
