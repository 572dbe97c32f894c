"""Zarr stores in and out: SOURCE opened, DEST created, checked, replaced; zarr's public API only.

Use :func:`open_source` to find the arrays to process (one array, or every real-numbered
array of a group, recursively), :func:`prepare_dest` to check where DEST goes, and
:func:`create_mask_array` to create each output array before any task writes to it.
Blocks move in and out of those arrays through :mod:`relu_dask.blocks`; with it, the only
modules that import zarr.
SOURCE and DEST are :class:`~relu_dask.locations.Location` s: local paths, or fsspec URLs
(``s3://...``) opened through zarr's fsspec store with their storage options.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import zarr
import zarr.errors

from relu_dask import conventions
from relu_dask.blocks import StoredArray, describe_stored, read_metadata, read_metadata_bytes
from relu_dask.errors import DestinationExistsError, InputError, NotWritableError, UnsupportedDtypeError
from relu_dask.kernel import check_dtype
from relu_dask.locations import Location

__all__ = [
    "COMPRESSORS",
    "DEFAULT_COMPRESSOR",
    "PROVENANCE_KEY",
    "Skipped",
    "SourceArray",
    "SourceContents",
    "array_location",
    "check_replaceable",
    "check_replaceable_remains",
    "consolidate",
    "copy_array",
    "create_dest_group",
    "create_mask_array",
    "create_subgroup",
    "has_array",
    "is_consolidated",
    "is_group",
    "open_array",
    "open_mask_array",
    "open_source",
    "parse_compressor",
    "prepare_dest",
    "remove_dest",
    "remove_partial_writes",
    "unconsolidate",
]

log = logging.getLogger(__name__)

#: The attribute under which DEST records where it came from.
PROVENANCE_KEY = "relu_dask"
_METADATA = ("zarr.json", ".zarray", ".zgroup")

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


@dataclass(frozen=True)
class SourceArray:
    """One array of SOURCE to process."""

    path: str
    """Path inside SOURCE ("" when SOURCE is the array itself)."""
    array: zarr.Array
    """The zarr Array, opened read-only."""
    dimension_names: tuple[str, ...] | None
    """Dimension names (v3 metadata or xarray's ``_ARRAY_DIMENSIONS``), if any."""
    root: Location | None = None
    """SOURCE itself (the array, or the group holding it)."""
    metadata: dict[str, Any] | None = None
    """The array's metadata document (``zarr.json`` or ``.zarray``), as the Zarr spec defines it."""
    stored: StoredArray | None = None
    """How the tasks read it: its chunk files directly, or through zarr (and why)."""
    metadata_sha256: str | None = None
    """The SHA-256 of the bytes ``metadata`` was parsed from (one read: its shape is the array's)."""
    held_shape: tuple[int, ...] | None = None
    """A shape smaller than the stored one, to process instead: rows a writer is still
    appending are left for the next run."""

    @property
    def shape(self) -> tuple[int, ...]:
        return self.held_shape if self.held_shape is not None else tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        """The read unit: the (inner) chunk shape."""
        return tuple(self.array.chunks)

    @property
    def shard_shape(self) -> tuple[int, ...] | None:
        shards = getattr(self.array, "shards", None)
        return tuple(shards) if shards else None

    @property
    def zarr_format(self) -> int:
        if self.metadata:
            return int(self.metadata["zarr_format"])
        return int(self.array.metadata.zarr_format)

    @property
    def location(self) -> Location | None:
        """Where the array itself is stored."""
        return None if self.root is None else array_location(self.root, self.path)


@dataclass(frozen=True)
class Skipped:
    """An array of a SOURCE group that was not processed, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class SourceContents:
    """What SOURCE holds: the arrays to mask, the coordinates to copy, what is skipped."""

    arrays: list[SourceArray]
    """The real-numbered arrays whose masks are computed (SOURCE itself, for an array)."""
    skipped: list[Skipped] = field(default_factory=list)
    """Arrays of a group neither masked nor copied: other dtypes."""
    coordinates: list[SourceArray] = field(default_factory=list)
    """xarray's coordinates in a group: copied into DEST unchanged, never masked."""
    attributes: dict[str, Any] = field(default_factory=dict)
    """The group's attributes (empty for a lone array)."""
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Each subgroup's attributes, by path (DEST's subgroups keep them)."""


def _zarr_kwargs(location: Location) -> dict[str, Any]:
    """How zarr opens ``location``: a local path, or a URL with its storage options."""
    if location.is_local:
        return {"store": location.url}
    return {"store": location.url, "storage_options": location.storage_options}


def open_source(source: Location) -> SourceContents:
    """Open SOURCE read-only: the arrays to mask, the coordinates to copy, those skipped.

    For a group, every real-numbered array (recursively) is masked, but for xarray's
    coordinates (:func:`coordinate_paths`), which are copied, and arrays of other dtypes,
    which are skipped. Raises :class:`InputError` if SOURCE is missing, not Zarr,
    unreadable, or has nothing to process; :class:`UnsupportedDtypeError` for a single
    array of a dtype without a ReLU derivative.
    """
    if source.is_local:
        path = source.path
        if not path.exists():
            raise InputError(f"SOURCE {source} does not exist")
        if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
            raise InputError(f"SOURCE {source} is not readable (permission denied)")
    elif not _exists(source):
        raise InputError(f"SOURCE {source} does not exist (or its storage cannot be reached)")
    node = _open_node(source)
    if isinstance(node, zarr.Array):
        src = _source_array("", node, source)
        check_dtype(src.dtype, where=f"SOURCE {source}")
        return SourceContents([src])
    contents = SourceContents([], attributes=dict(node.attrs))
    try:
        members = sorted(node.members(max_depth=None), key=lambda m: m[0])
    except (PermissionError, OSError) as exc:
        raise InputError(f"SOURCE {source} could not be read: {exc}") from exc
    found = [_source_array(name, member, source) for name, member in members if isinstance(member, zarr.Array)]
    contents.groups.update({name: dict(g.attrs) for name, g in members if isinstance(g, zarr.Group)})
    coordinates = conventions.coordinate_paths(found, {"": contents.attributes, **contents.groups})
    for src in found:
        if src.path in coordinates and not (reason := conventions.why_not_copied(src)):
            contents.coordinates.append(src)
        elif src.path in coordinates or (reason := conventions.why_not_masked(src) or _skip_reason(src)):
            contents.skipped.append(Skipped(src.path, reason))
        else:
            contents.arrays.append(src)
    if not contents.arrays:
        said = "; ".join(f"{s.path}: {s.reason}" for s in contents.skipped) or "it holds no arrays"
        if contents.coordinates:
            said += f"; coordinates {', '.join(c.path for c in contents.coordinates)}"
        raise InputError(f"SOURCE {source} is a Zarr group with nothing to process ({said.lstrip('; ')})")
    return contents


def _exists(location: Location) -> bool:
    try:
        return location.exists()
    except Exception as exc:  # noqa: BLE001 - any client error (credentials, endpoint) is the user's to fix
        raise InputError(f"cannot reach {location}: {type(exc).__name__}: {exc}") from None


def _open_node(source: Location) -> zarr.Array | zarr.Group:
    try:
        with warnings.catch_warnings():
            # Opening is read-only: warnings about how other dtypes *would* be written
            # are not the user's concern here.
            warnings.simplefilter("ignore")
            node = zarr.open(mode="r", **_zarr_kwargs(source))
            if isinstance(node, zarr.Group):  # members as they are, not as consolidated metadata last saw them
                node = zarr.open_group(mode="r", use_consolidated=False, **_zarr_kwargs(source))
            return node
    except PermissionError as exc:
        raise InputError(f"SOURCE {source} is not readable (permission denied: {exc.filename})") from exc
    except (zarr.errors.NodeNotFoundError, FileNotFoundError, NotADirectoryError):
        raise InputError(
            f"SOURCE {source} is not a Zarr array or group (no zarr.json, .zarray or .zgroup found)"
        ) from None
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise InputError(f"SOURCE {source} could not be opened as Zarr: {exc}") from exc


def _source_array(path: str, array: zarr.Array, root: Location) -> SourceArray:
    location = array_location(root, path)
    metadata, raw = read_metadata_bytes(location)
    for _attempt in range(10):  # a writer growing the array now: its shape as zarr and the document say it
        if metadata is None or list(metadata.get("shape", [])) == list(array.shape):
            break
        array = _array_at(root, path, mode="r")
        metadata, raw = read_metadata_bytes(location)
    names: Any = (metadata or {}).get("dimension_names")  # JSON, as the writer left it
    if names is None:
        names = array.attrs.get("_ARRAY_DIMENSIONS")
    dims = tuple(str(n) for n in names) if names and all(n is not None for n in names) else None
    stored = describe_stored(array, location, metadata)
    digest = hashlib.sha256(raw).hexdigest() if raw is not None else None
    return SourceArray(path, array, dims, root, metadata, stored, digest)


def array_location(root: Location, path: str) -> Location:
    """Where the array at ``path`` inside ``root`` is stored (``root`` itself for "")."""
    return root.child(*path.split("/")) if path else root


def _skip_reason(src: SourceArray) -> str:
    try:
        check_dtype(src.dtype)
    except UnsupportedDtypeError:
        return f"dtype {src.dtype} is not a real number type"
    except Exception:  # noqa: BLE001 - zarr dtypes numpy cannot name
        return f"dtype {src.array.dtype} is not a real number type"
    return ""


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
        parent = dest.path.parent
        if not parent.is_dir():
            raise InputError(f"the folder {parent} for DEST does not exist: create it first")
        if not os.access(parent, os.W_OK | os.X_OK):
            why = "a read-only file system" if os.statvfs(parent).f_flag & os.ST_RDONLY else "permission denied"
            raise NotWritableError(f"cannot write DEST {dest}: {why} in {parent}")
    return dest


def check_replaceable(dest: Location) -> None:
    """Raise unless DEST is absent or a Zarr store (relu_dask never deletes anything else)."""
    if dest.exists() and not _is_zarr_store(dest):
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
    if not dest.exists() or _is_zarr_store(dest):
        return
    local_folder = dest.is_local and dest.path.is_dir() and not dest.path.is_symlink()
    if local_folder and all(_ZARR_FILE.fullmatch(p.name) for p in dest.path.rglob("*") if not p.is_dir()):
        return
    check_replaceable(dest)


#: The names of the files a Zarr store holds: metadata, chunk keys (v3 ``c/1/0``, ``c`` for
#: 0-d; v2 ``1.0`` or ``1/0``), and zarr's and chunkio's temporary ``*.partial`` writes.
_ZARR_FILE = re.compile(r"zarr\.json|\.zarray|\.zattrs|\.zgroup|\.zmetadata|c|[0-9.]+|.*\.partial|\..*\.tmp-[0-9-]+")


def _is_zarr_store(dest: Location) -> bool:
    if dest.is_local and (dest.path.is_file() or dest.path.is_symlink()):
        return False
    return any(dest.child(name).stat() is not None for name in _METADATA)


def remove_dest(dest: Location, reason: str) -> None:
    """Delete DEST: one that :func:`check_replaceable` allowed to replace, or this run's own."""
    if dest.exists():
        log.info("removing DEST %s (%s)", dest, reason)
        dest.remove_tree()


def create_dest_group(dest: Location, attributes: dict[str, Any]) -> zarr.Group:
    """Create DEST as a Zarr v3 group with ``attributes``."""
    return zarr.open_group(mode="w-", zarr_format=3, attributes=attributes, **_zarr_kwargs(dest))


def create_subgroup(dest: Location, path: str, attributes: dict[str, Any]) -> None:
    """Create (or keep) the group at ``path`` under DEST, with ``attributes``."""
    root = zarr.open_group(mode="a", zarr_format=3, **_zarr_kwargs(dest))
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
        root = zarr.open_group(mode="a", zarr_format=3, **_zarr_kwargs(dest))
        parent, _, name = path.rpartition("/")
        group = root.require_group(parent) if parent else root
        return group.create_array(name, **options)
    return zarr.create_array(zarr_format=3, **_zarr_kwargs(dest), **options)


def copy_array(dest: Location, src: SourceArray) -> zarr.Array:
    """Copy ``src`` (a coordinate) to the same path under DEST, as a Zarr v3 array.

    Same dtype, shape, chunks, fill value, dimension names and attributes (xarray's v2
    ``_ARRAY_DIMENSIONS`` become v3 ``dimension_names``); a v3 source's codecs too, so that
    its chunk files come out byte for byte the same. Fixed-width text (numpy ``<U``) is
    stored as Zarr's variable-length ``string``: the same values, where zarr-python warns on
    every open of fixed-width text in v3 that its format may change. Whatever was at that
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
        "dtype": str if text else a.dtype,
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
        root = zarr.open_group(mode="a", zarr_format=3, **_zarr_kwargs(dest))
        parent, _, name = src.path.rpartition("/")
        out = (root.require_group(parent) if parent else root).create_array(name, **options)
        step = a.shards or a.chunks
        for index in np.ndindex(*(-(-n // c) for n, c in zip(src.shape, step))):
            region = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, step, src.shape))
            out[region] = a[region]
    return out


def consolidate(dest: Location) -> None:
    """Write DEST's consolidated metadata (one read for ``xarray.open_zarr``): at the end of
    a complete run only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not part of the Zarr v3 spec yet": we know, and xarray reads it
        root = zarr.open_group(mode="r+", zarr_format=3, **_zarr_kwargs(dest))
        zarr.consolidate_metadata(root.store)


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
        return zarr.open_group(mode="r", zarr_format=3, **_zarr_kwargs(dest)) is not None
    except (zarr.errors.NodeNotFoundError, FileNotFoundError, ValueError):
        return False


def has_array(dest: Location, path: str) -> bool:
    """Whether DEST holds an array at ``path`` ("" for DEST itself)."""
    try:
        return isinstance(_node_at(dest, path, mode="r"), zarr.Array)
    except (KeyError, zarr.errors.NodeNotFoundError, FileNotFoundError, ValueError):
        return False


def _node_at(where: Location, path: str, *, mode: Literal["r", "r+"]) -> zarr.Array | zarr.Group:
    """The node at ``path`` inside ``where`` (``where`` itself for ""); KeyError if there is none.

    Read from the node's own metadata document, never from a group's consolidated metadata:
    that lists what DEST held when it was last complete, and a mask array deleted since
    must be seen as missing.
    """
    try:
        if path:
            return zarr.open(mode=mode, path=path, **_zarr_kwargs(where))
        return zarr.open(mode=mode, **_zarr_kwargs(where))
    except (zarr.errors.NodeNotFoundError, FileNotFoundError) as exc:
        if path:  # missing, as a group says of a member it lacks (a lone array has none)
            raise KeyError(path) from exc
        raise


def _array_at(where: Location, path: str, *, mode: Literal["r", "r+"]) -> zarr.Array:
    """Open the array at ``path`` inside ``where``; :class:`InputError` where a group is there instead."""
    found = _node_at(where, path, mode=mode)
    if not isinstance(found, zarr.Array):
        raise InputError(f"{array_location(where, path)} is a Zarr group, not an array")
    return found


def open_mask_array(dest: Location, path: str, *, writable: bool = True) -> StoredArray:
    """Open a mask array of DEST (for writing, unless not ``writable``), with how its chunks are written and read."""
    array = _array_at(dest, path, mode="r+" if writable else "r")
    location = array_location(dest, path)
    return describe_stored(array, location, read_metadata(location))


def open_array(location: Location | str | os.PathLike[str], array_path: str = "") -> zarr.Array:
    """Open one array read-only (``array_path`` inside a group, if given)."""
    where = location if isinstance(location, Location) else Location(os.fspath(location))
    return _array_at(where, array_path, mode="r")


def resize_mask_array(dest: Location, path: str, shape: tuple[int, ...]) -> None:
    """Grow a mask array of DEST to ``shape`` (its metadata only: the new blocks are written
    by their tasks)."""
    mask = _array_at(dest, path, mode="r+")
    if tuple(mask.shape) != tuple(shape):
        mask.resize(shape)


def remove_partial_writes(dest: Location) -> int:
    """Delete the temporary files a killed write left in a local DEST; return how many.

    (Object stores write each object whole: they have none.)
    """
    if not dest.is_local:
        return 0
    removed = 0
    for path in dest.path.rglob("*.partial"):
        with contextlib.suppress(OSError):
            path.unlink()
            removed += 1
    return removed
