"""DEST as relu-dask writes it: checked, created, grown, consolidated, replaced; zarr's public API.

:func:`prepare_dest` checks where DEST goes before anything is written; the run's first
step (:mod:`relu_dask.prepare`) then creates DEST's group, subgroups and one int8 mask array
per source array (:func:`create_mask_array`: the masks' codecs, chunks and shards, the
source's dimension names), copies xarray's coordinates as they are (:func:`copy_array`)
and, once every task is done, consolidates the group's metadata (:func:`consolidate`).
Opening arrays (SOURCE's and DEST's) is :mod:`relu_dask.storage`'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.errors

from relu_dask import conventions, objectstores
from relu_dask.errors import DestinationExistsError, InputError, NotWritableError
from relu_dask.journal import JOURNAL_NAME
from relu_dask.locations import Location
from relu_dask.storage import METADATA_NAMES, SourceArray, array_at, zarr_kwargs

__all__ = [
    "COMPRESSORS",
    "DEFAULT_COMPRESSOR",
    "PROVENANCE_KEY",
    "PROVENANCE_PREFIX",
    "check_replaceable",
    "check_replaceable_remains",
    "consolidate",
    "copy_array",
    "create_dest_group",
    "create_mask_array",
    "create_subgroup",
    "holds_data",
    "is_consolidated",
    "is_group",
    "parse_compressor",
    "prepare_dest",
    "remove_dest",
    "remove_partial_writes",
    "resize_mask_array",
    "unconsolidate",
]

log = logging.getLogger(__name__)


#: DEST records where it came from in flat, netCDF-safe attributes (strings and numbers) named
#: with this prefix: ``relu_dask_source``, ``relu_dask_rule``, ``relu_dask_version``, ...
PROVENANCE_PREFIX = "relu_dask_"
#: The one nested attribute under which relu-dask before 0.2 recorded the same (read, never written).
PROVENANCE_KEY = "relu_dask"


#: The masks' compressor: a name of :data:`COMPRESSORS`.
#:
#: blosc with lz4 and bit shuffling is a core Zarr v3 codec (any v3 reader decodes it).
#: On the 1 GiB benchmark's masks (0/1 int8, 50% ones; ``scripts/bench_codecs.py``) it
#: encodes 5.5x faster than zarr's default zstd (0.11 s vs 0.63 s for 256 MiB on one
#: thread) and stores 31% fewer bytes (34.7 MB vs 50.2 MB): bit shuffling turns a byte per
#: 0/1 value into runs of bits.
DEFAULT_COMPRESSOR = "blosc-lz4"


COMPRESSORS: tuple[str, ...] = ("blosc-lz4", "blosc-zstd", "zstd", "none")


def parse_compressor(name: str) -> str:
    """Validate ``--dest-compressor``."""
    if name not in COMPRESSORS:
        raise InputError(f"--dest-compressor must be one of {', '.join(COMPRESSORS)}, got {name!r}")
    return name


def _compressors(name: str) -> Any:
    from zarr.codecs import BloscCodec, ZstdCodec

    choices: dict[str, Any] = {
        "blosc-lz4": BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=1),
        "blosc-zstd": BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle", typesize=1),
        "zstd": ZstdCodec(level=0),  # zarr's own default
        "none": None,
    }
    return choices[parse_compressor(name)]


def prepare_dest(source: Location, dest: Location) -> Location:
    """Check where DEST goes against SOURCE; return it. Nothing is changed.

    Raises :class:`InputError` when DEST is SOURCE, inside it, or contains it, or when its
    local folder is missing or not writable. Whether an existing DEST may be replaced or
    resumed is decided later, under DEST's lock.
    """
    src, dst = source.url.rstrip("/"), dest.url.rstrip("/")
    if dst == src:
        raise InputError(f"DEST {dest} is SOURCE itself: choose another DEST")
    if dst.startswith(src + "/"):
        raise InputError(f"DEST {dest} is inside SOURCE {source}: choose a DEST outside it")
    if src.startswith(dst + "/"):
        raise InputError(f"SOURCE {source} is inside DEST {dest}: writing DEST would destroy SOURCE")
    if dest.is_local:
        if dest.path.exists() and not dest.path.is_dir():  # its record would go inside: refuse it first
            raise DestinationExistsError(
                f"DEST {dest} is a file, not a Zarr store; relu-dask will not delete it: choose another DEST"
            )
        parent = dest.path.parent
        if not parent.is_dir():
            raise InputError(f"the folder {parent} for DEST does not exist: create it first")
        if not os.access(parent, os.W_OK | os.X_OK):
            why = "a read-only file system" if os.statvfs(parent).f_flag & os.ST_RDONLY else "permission denied"
            raise NotWritableError(f"cannot write DEST {dest}: {why} in {parent}")
    return dest


def holds_data(dest: Location) -> bool:
    """Whether DEST holds anything but its journal (:data:`relu_dask.journal.JOURNAL_NAME`)."""
    if dest.is_local and not dest.path.is_dir():
        return dest.path.exists() or dest.path.is_symlink()
    return any(name != JOURNAL_NAME for name in dest.list_names())


def check_replaceable(dest: Location) -> None:
    """Raise unless DEST is absent or a Zarr store (relu_dask never deletes anything else)."""
    if holds_data(dest) and not _is_zarr_store(dest):
        raise DestinationExistsError(
            f"DEST {dest} exists and is not a Zarr store; relu-dask will not delete it: choose another DEST"
        )


def check_replaceable_remains(dest: Location) -> None:
    """Raise unless DEST is absent, a Zarr store, or what a deletion of one left behind.

    For a DEST that relu-dask was deleting when it was killed (see
    :func:`relu_dask.journal.mark_replacing`): its metadata may be gone already, but every
    file left is still one of a Zarr store's (metadata, chunk keys, ``*.partial`` writes).
    Anything else found there is the user's, and is never deleted.
    """
    if not holds_data(dest) or _is_zarr_store(dest):
        return
    local_folder = dest.is_local and dest.path.is_dir() and not dest.path.is_symlink()
    if local_folder and all(_ZARR_FILE.fullmatch(name.rsplit("/", 1)[-1]) for name in _data_files(dest)):
        return
    check_replaceable(dest)


#: The names of the files a Zarr store holds: metadata, chunk keys (v3 ``c/1/0``, ``c`` for
#: 0-d; v2 ``1.0`` or ``1/0``), and zarr's and chunkio's temporary ``*.partial`` writes.
_ZARR_FILE = re.compile(r"zarr\.json|\.zarray|\.zattrs|\.zgroup|\.zmetadata|c|[0-9.]+|.*\.partial|\..*\.tmp-[0-9-]+")


def _is_zarr_store(dest: Location) -> bool:
    if dest.is_local and (dest.path.is_file() or dest.path.is_symlink()):
        return False
    return any(dest.child(name).stat() is not None for name in METADATA_NAMES)


def _data_files(dest: Location) -> list[str]:
    return [name for name in dest.files() if name.split("/", 1)[0] != JOURNAL_NAME]


def remove_dest(dest: Location, reason: str) -> None:
    """Delete DEST: one that :func:`check_replaceable` allowed to replace, or this run's own.
    Its journal, inside, stays (:func:`relu_dask.resume.remove_dest_and_journal` says when
    which goes)."""
    log.info("removing DEST %s (%s)", dest, reason)
    dest.remove_tree(keep=JOURNAL_NAME)


def create_dest_group(dest: Location, attributes: dict[str, Any]) -> zarr.Group:
    """Create DEST as a Zarr v3 group with ``attributes`` (its journal may be there already;
    a group or array is not)."""
    store = zarr_kwargs(dest)
    return zarr.create_group(store.pop("store"), zarr_format=3, attributes=attributes, **store)


def create_subgroup(dest: Location, path: str, attributes: dict[str, Any]) -> None:
    """Create (or keep) the group at ``path`` under DEST, with ``attributes``."""
    root = zarr.open_group(mode="a", zarr_format=3, **zarr_kwargs(dest))
    group = root.require_group(path)
    if dict(group.attrs) != attributes:
        group.attrs.update(attributes)


def create_mask_array(
    dest: Location,
    path: str,
    *,
    shape: tuple[int, ...],
    chunk_shape: tuple[int, ...],
    shard_shape: tuple[int, ...] | None,
    dimension_names: tuple[str, ...] | None,
    attributes: dict[str, Any],
    compressor: str = DEFAULT_COMPRESSOR,
) -> zarr.Array:
    """Create the int8 mask array at ``path`` under DEST (Zarr v3, fill value 0).

    Chunks equal to the fill value are not stored (zarr's default, which
    :func:`write_block` keeps), so all-negative blocks cost no disk. ``compressor`` is one
    of :data:`COMPRESSORS`.
    """
    options: dict[str, Any] = {
        "shape": shape,
        "dtype": "int8",
        "chunks": chunk_shape,
        "shards": shard_shape,
        "fill_value": 0,
        "dimension_names": dimension_names,
        "attributes": attributes,
        "compressors": _compressors(compressor),
    }
    if path:
        root = zarr.open_group(mode="a", zarr_format=3, **zarr_kwargs(dest))
        parent, _, name = path.rpartition("/")
        group = root.require_group(parent) if parent else root
        return group.create_array(name, **options)
    return zarr.create_array(zarr_format=3, **zarr_kwargs(dest), **options)


def copy_array(dest: Location, src: SourceArray) -> zarr.Array:
    """Copy ``src`` (a coordinate) to the same path under DEST, as a Zarr v3 array.

    Same dtype, shape, chunks, fill value, dimension names and attributes (xarray's v2
    ``_ARRAY_DIMENSIONS`` become v3 ``dimension_names``); a v3 source's codecs too, so that
    its chunk files come out byte for byte the same. Text keeps its kind: fixed-width (numpy
    ``<U9``) stays fixed-width (zarr's ``fixed_length_utf32``, what xarray writes for it; zarr
    warns when it writes that data type, not when it reads it), and variable-length text stays
    Zarr's ``string``, so xarray reads back the dtype it read from SOURCE. Whatever was at that
    path is replaced (a copy a kill cut short is made again whole). Read and written a shard
    (or chunk) at a time.
    """
    a = src.array
    text = conventions.is_text(src)
    attributes = {k: v for k, v in a.attrs.items() if k != "_ARRAY_DIMENSIONS"}
    if src.zarr_format == 2 and a.fill_value is not None and not text and "_FillValue" not in attributes:
        # xarray reads a v2 array's missing values from its fill value, a v3 one's from this attribute
        attributes["_FillValue"] = conventions.fill_value_attribute(a.fill_value, np.dtype(a.dtype))
    options: dict[str, Any] = {
        "shape": src.shape,
        "dtype": str if text and np.dtype(a.dtype).kind != "U" else a.dtype,
        "chunks": a.chunks,
        "fill_value": "" if text else a.fill_value,
        "dimension_names": src.dimension_names,
        "attributes": attributes,
        "overwrite": True,
    }
    if src.zarr_format == 3 and not text:
        options.update(shards=a.shards, filters=a.filters, compressors=a.compressors, serializer=a.serializer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr's notes on dtypes and codecs not yet in the v3 spec
        root = zarr.open_group(mode="a", zarr_format=3, **zarr_kwargs(dest))
        parent, _, name = src.path.rpartition("/")
        out = (root.require_group(parent) if parent else root).create_array(name, **options)
        step = a.shards or a.chunks
        for index in np.ndindex(*(-(-n // c) for n, c in zip(src.shape, step))):
            region = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, step, src.shape))
            out[region] = a[region]
    return out


def consolidate(dest: Location, nodes: Sequence[str] = (), documents: dict[str, bytes] | None = None) -> None:
    """Write DEST's consolidated metadata (one read for ``xarray.open_zarr``): at the end of
    a complete run only.

    ``nodes``: the paths of DEST's arrays and groups, where the run knows them. On an object
    store their metadata documents are then read at once and consolidated by zarr in a local
    folder, and the group's document written back: two round trips, where zarr's own
    consolidation lists DEST and reads node by node. ``documents``: those documents by path
    ("" for DEST's group) where the run made them (then none is read: one round trip).
    """
    if nodes and (direct := dest.object_store) is not None:
        bucket, key = direct
        paths = sorted({""} | {"/".join(p.split("/")[:i]) for p in nodes for i in range(1, p.count("/") + 2)})
        known = documents or {}
        found = (
            [known[p] for p in paths]
            if all(p in known for p in paths)
            else objectstores.get_many(bucket, [f"{key}/{p}/zarr.json" if p else f"{key}/zarr.json" for p in paths])
        )
        if all(d is not None for d in found):
            with tempfile.TemporaryDirectory(prefix="relu-dask-meta-") as folder:
                for path, document in zip(paths, found, strict=True):
                    target = Path(folder, path, "zarr.json")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(bytes(document))  # type: ignore[arg-type]
                _consolidate_with_zarr(folder)
                dest.child("zarr.json").write_bytes(Path(folder, "zarr.json").read_bytes())
            return
    _consolidate_with_zarr(dest)


def _consolidate_with_zarr(where: str | Location) -> None:
    """zarr's consolidation of the group at ``where`` (a local folder, or DEST)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not part of the Zarr v3 spec yet": we know, and xarray reads it
        store = (
            where if isinstance(where, str) else zarr.open_group(mode="r+", zarr_format=3, **zarr_kwargs(where)).store
        )
        zarr.consolidate_metadata(store)


def is_consolidated(dest: Location) -> bool:
    """Whether DEST's group holds consolidated metadata."""
    try:
        document = json.loads(dest.child("zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and document.get("consolidated_metadata") is not None


def unconsolidate(dest: Location) -> bool:
    """Drop DEST's consolidated metadata, if any, before a run changes DEST (a partial DEST
    is never consolidated); return whether there was some.

    zarr-python keeps it under ``consolidated_metadata`` in the group's ``zarr.json``; the
    document is otherwise left as it is.
    """
    node = dest.child("zarr.json")
    try:
        document = json.loads(node.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(document, dict) or document.get("consolidated_metadata") is None:
        return False
    document.pop("consolidated_metadata")
    node.write_text(json.dumps(document, indent=2))
    return True


def is_group(dest: Location) -> bool:
    """Whether ``dest`` holds a Zarr v3 group at its root."""
    try:
        return zarr.open_group(mode="r", zarr_format=3, **zarr_kwargs(dest)) is not None
    except (zarr.errors.NodeNotFoundError, FileNotFoundError, ValueError):
        return False


def resize_mask_array(dest: Location, path: str, shape: tuple[int, ...]) -> None:
    """Grow a mask array of DEST to ``shape`` (its metadata only: the new blocks are written
    by their tasks)."""
    mask = array_at(dest, path, mode="r+")
    if tuple(mask.shape) != tuple(shape):
        mask.resize(shape)


def remove_partial_writes(dest: Location) -> int:
    """Delete the temporary files a killed write left in a local DEST; return how many.

    (Object stores write each object whole: they have none.)
    """
    if not dest.is_local:
        return 0
    removed = 0
    for path in dest.path.rglob("*.partial"):  # (the journal writes none)
        with contextlib.suppress(OSError):
            path.unlink()
            removed += 1
    return removed
