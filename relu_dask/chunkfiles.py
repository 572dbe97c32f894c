"""The Zarr specification's view of one array's chunk files, decided once per array.

Use :func:`describe_chunk_files` when you need to know whether relu_dask can read and
write an array's chunk files itself (:mod:`relu_dask.chunkio`), without zarr-python: it
reads the array's metadata document (``zarr.json`` for Zarr v3, ``.zarray`` for v2) as the
published specifications define it, and returns either a :class:`ChunkFiles` (where the
files are, how their keys are spelt, how they are encoded, what an unstored chunk holds)
or the reason it cannot (:class:`NotDirect`).

Why the specifications and not zarr-python's objects: zarr-python's ``zarr.core`` modules
and codec attributes change in every minor release (3.2 removed ``get_chunk_spec``, 3.3
moved ``fill_value_or_default``, 3.4 turned codec enums into strings), while the Zarr v2
and v3 formats are versioned documents. This module imports the standard library, numpy,
numcodecs and :mod:`relu_dask.chunkio` only; anything it does not understand is left to
zarr's public API by the caller (:mod:`relu_dask.storage`).

Specifications: https://zarr-specs.readthedocs.io/en/latest/v2/v2.0.html and
https://zarr-specs.readthedocs.io/en/latest/v3/core/index.html (core, ``bytes``,
``zstd`` and ``blosc`` codecs, ``default`` and ``v2`` chunk key encodings).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

import numpy as np

from relu_dask import chunkio

__all__ = [
    "ChunkFiles",
    "NotDirect",
    "chunk_key_encoding",
    "describe_chunk_files",
    "format_chunk_key",
    "listing_cuts",
    "parse_metadata",
]


@dataclass(frozen=True)
class ChunkFiles:
    """Where one array's chunk files (or objects) are and how to read and write them."""

    folder: PurePath
    """The array's folder (holding its metadata document): a local path, or the key prefix
    of its objects in a bucket (a PurePosixPath)."""
    shape: tuple[int, ...]
    """The array's shape."""
    format: chunkio.ChunkFormat
    """Chunk shape, stored dtype (byte order included), memory order and codec."""
    fill_value: Any
    """What an unstored chunk holds (a numpy scalar of the array's dtype)."""
    key_prefix: str
    """``"c"`` for Zarr v3's default key encoding, ``""`` otherwise."""
    separator: str
    """Between the parts of a chunk key: ``"/"`` or ``"."``."""

    def key(self, coords: tuple[int, ...]) -> str:
        """The chunk key of the chunk at grid position ``coords``, as the spec spells it.

        Examples
        --------
        >>> files = ChunkFiles(PurePath("a"), (4, 4), chunkio.ChunkFormat((2, 2), "f4"), 0.0, "c", "/")
        >>> files.key((1, 0))
        'c/1/0'
        """
        return format_chunk_key(coords, self.key_prefix, self.separator)

    def path(self, coords: tuple[int, ...]) -> PurePath:
        """The file of the chunk at ``coords`` (its key in a bucket)."""
        return self.folder.joinpath(*self.key(coords).split("/"))


@dataclass(frozen=True)
class NotDirect:
    """Why an array's chunk files are left to zarr: a reason a user can read."""

    reason: str


def describe_chunk_files(folder: PurePath, document: dict[str, Any]) -> ChunkFiles | NotDirect:
    """Decide, from a local array's metadata document, whether chunkio can do its byte work.

    ``document`` is the parsed ``zarr.json`` (v3) or ``.zarray`` (v2) of the array in
    ``folder`` (see :func:`parse_metadata`). Returns :class:`NotDirect` with the reason for
    anything beyond a regular chunk grid of real numbers, stored raw or with one zstd or
    blosc compressor, without filters, transposition, sharding or storage transformers.
    """
    try:
        if document.get("zarr_format") == 3:
            return _describe_v3(folder, document)
        if document.get("zarr_format") == 2:
            return _describe_v2(folder, document)
    except (KeyError, TypeError, ValueError) as exc:  # a document this module misreads: zarr decides
        return NotDirect(f"metadata not understood ({type(exc).__name__}: {exc})")
    return NotDirect(f"zarr_format {document.get('zarr_format')!r} is not 2 or 3")


def parse_metadata(raw: bytes) -> dict[str, Any]:
    """The array metadata document from the bytes of its ``zarr.json`` or ``.zarray``.

    JSON as the Zarr specs write it: ``NaN`` and ``Infinity`` may appear as bare words in
    documents written by older v2 libraries, which Python's json reads as floats. Raises
    ValueError for what is not a JSON object.
    """
    document = json.loads(raw)
    if not isinstance(document, dict):
        raise ValueError("a metadata document is a JSON object")
    return document


def _describe_v3(folder: PurePath, doc: dict[str, Any]) -> ChunkFiles | NotDirect:
    if doc.get("node_type") != "array":
        return NotDirect("not an array")
    if doc.get("storage_transformers"):
        return NotDirect("storage transformers")
    grid = doc["chunk_grid"]
    if grid.get("name") != "regular":
        return NotDirect(f"chunk grid {grid.get('name')!r}")
    chunk_shape = tuple(int(n) for n in grid["configuration"]["chunk_shape"])
    data_type = doc["data_type"]
    if not isinstance(data_type, str) or _V3_DTYPES.get(data_type) is None:
        return NotDirect(f"data type {data_type!r}")
    dtype = np.dtype(_V3_DTYPES[data_type])
    codecs = [_codec_entry(c) for c in doc["codecs"]]
    names = [name for name, _ in codecs]
    if not names or names[0] != "bytes" or len(names) > 2:
        return NotDirect(f"codecs {' -> '.join(names) or 'none'} (direct: bytes, then at most one zstd or blosc)")
    endian = codecs[0][1].get("endian")
    if dtype.itemsize > 1:
        if endian not in ("little", "big"):
            return NotDirect(f"bytes codec endian {endian!r}")
        dtype = dtype.newbyteorder("<" if endian == "little" else ">")
    codec = None
    if len(codecs) == 2:
        codec = _numcodecs_v3(*codecs[1], itemsize=dtype.itemsize)
        if codec is None:
            return NotDirect(f"codec {codecs[1][0]!r} (direct: zstd or blosc)")
    keys = chunk_key_encoding(doc)
    if keys is None:
        return NotDirect(f"chunk key encoding {doc.get('chunk_key_encoding')!r}")
    fmt = chunkio.ChunkFormat(chunk_shape, dtype, "C", codec)
    return _files(folder, doc["shape"], fmt, _fill_v3(doc["fill_value"], dtype), keys)


def _describe_v2(folder: PurePath, doc: dict[str, Any]) -> ChunkFiles | NotDirect:
    if not isinstance(doc["dtype"], str):
        return NotDirect("structured data type")
    dtype = np.dtype(doc["dtype"])
    if dtype.kind not in "iuf":
        return NotDirect(f"data type {doc['dtype']!r}")
    if doc.get("filters"):
        return NotDirect(f"filters {', '.join(str(f.get('id')) for f in doc['filters'])}")
    codec = None
    if doc.get("compressor") is not None:
        codec = _numcodecs_v2(doc["compressor"])
        if codec is None:
            return NotDirect(f"compressor {doc['compressor'].get('id')!r} (direct: zstd or blosc)")
    order = doc.get("order", "C")
    if order not in ("C", "F"):
        return NotDirect(f"order {order!r}")
    keys = chunk_key_encoding(doc)
    if keys is None:
        return NotDirect(f"dimension separator {doc.get('dimension_separator')!r}")
    chunk_shape = tuple(int(n) for n in doc["chunks"])
    fmt = chunkio.ChunkFormat(chunk_shape, dtype, order, codec)
    return _files(folder, doc["shape"], fmt, _fill_v2(doc.get("fill_value"), dtype), keys)


def chunk_key_encoding(document: dict[str, Any]) -> tuple[str, str] | None:
    """The (prefix, separator) of an array's chunk keys, or None for an encoding not in the specs.

    Zarr v3: ``default`` (``c/1/0``, or ``c.1.0`` with separator ``.``) or ``v2``
    (``1.0``); Zarr v2: ``dimension_separator`` ``.`` (the default) or ``/``.
    """
    if document.get("zarr_format") == 2:
        prefix, separator = "", document.get("dimension_separator") or "."
    else:
        encoding = document.get("chunk_key_encoding") or {"name": "default"}
        separator = (encoding.get("configuration") or {}).get("separator")
        if encoding.get("name") == "default":
            prefix, separator = "c", separator or "/"
        elif encoding.get("name") == "v2":
            prefix, separator = "", separator or "."
        else:
            return None
    return (prefix, separator) if separator in ("/", ".") else None


def format_chunk_key(coords: tuple[int, ...], prefix: str, separator: str) -> str:
    """The key of the chunk at ``coords`` under an encoding of :func:`chunk_key_encoding`.

    Examples
    --------
    >>> format_chunk_key((1, 0), "c", "/"), format_chunk_key((1, 0), "", "."), format_chunk_key((), "", ".")
    ('c/1/0', '1.0', '0')
    """
    parts = [prefix] if prefix else []
    parts.extend(str(i) for i in coords)
    return separator.join(parts) if parts else "0"  # a 0-d array's only chunk, in v2 spelling


def listing_cuts(shape: Sequence[int], object_shape: Sequence[int], per_range: int = 900) -> list[str]:
    """Keys that cut the listing of an array's objects (chunks or shards, Zarr v3's default
    key encoding) into ranges of whole rows of its grid, about ``per_range`` objects each, in
    the order a bucket lists them (:func:`relu_dask.objectstores.list_prefix`; none where one
    page holds them all). Any cuts list every object; these make the ranges even, and short
    enough that the page of a range (S3 lists 1000 keys a page) holds the next range's first
    key too: each range is one request.

    Examples
    --------
    >>> listing_cuts((30, 8), (1, 4), per_range=20)  # rows in the order a bucket lists them
    ['c/18/', 'c/27/']
    """
    if not shape:
        return []
    rows = -(-shape[0] // object_shape[0])
    per_row = math.prod(-(-n // c) for n, c in zip(shape[1:], object_shape[1:], strict=True))
    if rows * per_row <= per_range:  # (an empty grid too: per_row is at least 1 past here)
        return []
    step = max(1, per_range // per_row, rows // 4096)  # at most some 4096 ranges
    # a row's objects are listed after "c/12/" (1-d: from "c/12" itself) and before the next
    separator = "/" if len(shape) > 1 else ""
    stride = max(1, rows // 100_000)  # past 100,000 rows: cut among some of them
    heads = sorted(f"c/{row}{separator}" for row in range(0, rows, stride))
    every = max(1, step // stride)
    return heads[every::every]


def _files(
    folder: PurePath, shape: list[int], fmt: chunkio.ChunkFormat, fill_value: Any, keys: tuple[str, str]
) -> ChunkFiles | NotDirect:
    chunk_shape, dtype = fmt.chunk_shape, fmt.dtype
    shape_t = tuple(int(n) for n in shape)
    if len(chunk_shape) != len(shape_t) or any(c < 1 for c in chunk_shape):
        return NotDirect(f"chunk shape {list(chunk_shape)} does not fit shape {list(shape_t)}")
    if math.prod(chunk_shape) * dtype.itemsize >= 2**31:
        return NotDirect("chunks of 2 GiB or more")  # past what a blosc frame can hold
    return ChunkFiles(folder, shape_t, fmt, fill_value, *keys)


#: Zarr v3 core data types of real numbers, and their numpy names (native byte order).
_V3_DTYPES: dict[str, str] = {
    "int8": "i1",
    "int16": "i2",
    "int32": "i4",
    "int64": "i8",
    "uint8": "u1",
    "uint16": "u2",
    "uint32": "u4",
    "uint64": "u8",
    "float16": "f2",
    "float32": "f4",
    "float64": "f8",
}


def _codec_entry(entry: Any) -> tuple[str, dict[str, Any]]:
    """A v3 codec as (name, configuration): the spec allows a bare name for no configuration."""
    if isinstance(entry, str):
        return entry, {}
    return str(entry["name"]), dict(entry.get("configuration") or {})


_BLOSC_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


def _numcodecs_v3(name: str, config: dict[str, Any], *, itemsize: int) -> Any:
    """The numcodecs codec that encodes and decodes as the v3 codec ``name`` (zstd or blosc)."""
    import numcodecs

    if name == "zstd":
        return numcodecs.Zstd(level=int(config.get("level", 0)), checksum=bool(config.get("checksum", False)))
    if name == "blosc":
        shuffle = config.get("shuffle", "noshuffle")
        if shuffle not in _BLOSC_SHUFFLE:
            return None
        return _blosc(
            cname=str(config.get("cname", "zstd")),
            clevel=int(config.get("clevel", 5)),
            shuffle=_BLOSC_SHUFFLE[shuffle],
            blocksize=int(config.get("blocksize", 0)),
            typesize=int(config.get("typesize") or itemsize),
        )
    return None


def _numcodecs_v2(config: dict[str, Any]) -> Any:
    """The numcodecs codec of a v2 ``compressor`` document, if it is zstd or blosc."""
    import numcodecs

    if config.get("id") not in chunkio.CODEC_IDS:
        return None
    return numcodecs.get_codec(dict(config))


def _blosc(*, cname: str, clevel: int, shuffle: int, blocksize: int, typesize: int) -> Any:
    """A numcodecs Blosc with the v3 codec's ``typesize`` where numcodecs takes one (0.16+).

    The type size steers shuffling when encoding; decoding reads it from the frame.
    """
    import numcodecs

    try:
        return numcodecs.Blosc(cname=cname, clevel=clevel, shuffle=shuffle, blocksize=blocksize, typesize=typesize)
    except TypeError:  # numcodecs before 0.16 takes the type size from the data
        return numcodecs.Blosc(cname=cname, clevel=clevel, shuffle=shuffle, blocksize=blocksize)


def _fill_v3(value: Any, dtype: np.dtype) -> Any:
    """A v3 ``fill_value`` as a numpy scalar: numbers, ``"NaN"``, ``"Infinity"``, ``"-Infinity"``
    or a ``"0x..."`` string holding the value's bytes (big-endian) for floats."""
    native = dtype.newbyteorder("=")
    if isinstance(value, str):
        if value.startswith("0x") and native.kind == "f":
            raw = int(value, 16).to_bytes(native.itemsize, "big")
            return np.frombuffer(raw, dtype=native.newbyteorder(">"))[0].astype(native)
        return _named_float(value, native)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"fill_value {value!r}")
    return native.type(value)


def _fill_v2(value: Any, dtype: np.dtype) -> Any:
    """A v2 ``fill_value`` as a numpy scalar; null (no fill value) reads as 0, as zarr-python reads it."""
    native = dtype.newbyteorder("=")
    if value is None:
        return native.type(0)
    if isinstance(value, str):
        return _named_float(value, native)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"fill_value {value!r}")
    return native.type(value)


def _named_float(value: str, native: np.dtype) -> Any:
    named = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
    if native.kind != "f" or value not in named:
        raise ValueError(f"fill_value {value!r} for {native}")
    return native.type(named[value])
