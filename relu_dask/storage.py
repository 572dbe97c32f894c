"""Zarr arrays opened: SOURCE's to read, DEST's to write into; zarr's public API only.

Use :func:`open_source` to find the arrays to process (one array, or every real-numbered
array of a group, recursively, with xarray's coordinates to copy and what is skipped), and
:func:`open_mask_array` for a mask array the tasks write. DEST is created, consolidated and
replaced by :mod:`relu_dask.outputs`; blocks move in and out through :mod:`relu_dask.blocks`.
SOURCE and DEST are :class:`~relu_dask.locations.Location` s: local paths, or fsspec URLs
(``s3://...``) opened through zarr's fsspec store with their storage options.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import zarr
import zarr.errors
import zarr.storage

from relu_dask import conventions, objectstores
from relu_dask.blocks import StoredArray, describe_stored, read_metadata, read_metadata_bytes
from relu_dask.chunkfiles import parse_metadata
from relu_dask.errors import InputError, UnsupportedDtypeError
from relu_dask.kernel import check_dtype
from relu_dask.locations import Location, at_once

__all__ = [
    "METADATA_NAMES",
    "Skipped",
    "SourceArray",
    "SourceContents",
    "array_at",
    "array_location",
    "has_array",
    "open_array",
    "open_mask_array",
    "open_source",
    "zarr_kwargs",
]

log = logging.getLogger(__name__)

METADATA_NAMES = ("zarr.json", ".zarray", ".zgroup")


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
    def name(self) -> str:
        """The array's own name: the last part of its path ("" for SOURCE itself)."""
        return self.path.rpartition("/")[2]

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


def zarr_kwargs(location: Location) -> dict[str, Any]:
    """How zarr opens ``location``: a local path, zarr's ObjectStore over obstore where
    :mod:`relu_dask.objectstores` reaches it, or a URL with its fsspec storage options."""
    if location.is_local:
        return {"store": location.url}
    if (direct := location.object_store) is not None:
        return {"store": objectstores.zarr_store(*direct)}
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
        node, documents = _open_node(source), _Documents()
    else:
        node, documents = _open_remote(source)
    with documents:
        if isinstance(node, zarr.Array):
            src = _source_array("", node, source, documents.get(""))
            check_dtype(src.dtype, where=f"SOURCE {source}")
            return SourceContents([src])
        contents = SourceContents([], attributes=dict(node.attrs))
        documents.read_members(source)
        try:
            with warnings.catch_warnings():  # a relu-dask DEST given as SOURCE: its journal is no Zarr node
                warnings.filterwarnings("ignore", message=r"Object at \.relu-dask is not recognized")
                members = documents.arrays(node) or sorted(node.members(max_depth=None), key=lambda m: m[0])
        except (PermissionError, OSError) as exc:
            raise InputError(f"SOURCE {source} could not be read: {exc}") from exc
        arrays = [(name, member) for name, member in members if isinstance(member, zarr.Array)]
        found = at_once(lambda item: _source_array(item[0], item[1], source, documents.get(item[0])), arrays)
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


class _Documents:
    """The raw metadata documents of SOURCE's nodes, read beside zarr on an object store.

    zarr parses the documents it reads and keeps no bytes, and relu-dask needs them (the
    direct path, the fingerprint's digest): read after zarr, each is one more round trip
    one after another. Here the root's document is read while zarr opens SOURCE, and those
    of the names directly under it (listed meanwhile) right after; where they are all v3
    arrays, the members are opened from them (:meth:`arrays`). Locally, nothing is read ahead.
    """

    def __init__(self, pool: ThreadPoolExecutor | None = None, root: Any = None, names: Any = None) -> None:
        self.pool, self.names = pool, names
        self.read: dict[str, Future[tuple[dict[str, Any] | None, bytes | None]]] = {"": root} if root else {}
        self.members: list[str] = []  # the names under SOURCE that may be members (read_members)

    def read_members(self, source: Location) -> None:
        if self.pool is None or self.names is None:
            return
        with contextlib.suppress(Exception):  # a listing that failed: zarr's own reads will say why
            self.members = sorted(n for n in self.names.result() if n not in _NOT_NODES)
            for name in self.members[:64]:
                self.read[name] = self.pool.submit(read_metadata_bytes, array_location(source, name))

    def arrays(self, group: zarr.Group) -> list[tuple[str, zarr.Array | zarr.Group]]:
        """The group's members opened from the documents read ahead (``zarr.Array.from_dict``:
        zarr's own listing and reads, a round trip, saved) where every name under it is a
        Zarr v3 array whose document was read; else [] (zarr lists and opens them)."""
        try:
            found: list[tuple[str, zarr.Array | zarr.Group]] = []
            for name in self.members if len(self.members) <= 64 else []:
                metadata = (self.get(name) or (None, None))[0]
                if metadata is None or metadata.get("zarr_format") != 3 or metadata.get("node_type") != "array":
                    return []  # a group, Zarr v2, or a document not read: zarr's way
                where = zarr.storage.StorePath(group.store, f"{group.path}/{name}" if group.path else name)
                found.append((name, zarr.Array.from_dict(where, metadata)))
        except Exception:  # noqa: BLE001 - anything odd: zarr's way, and its own errors
            return []
        return found

    def get(self, path: str) -> tuple[dict[str, Any] | None, bytes | None] | None:
        """The document at ``path`` and its bytes, where read ahead and found (else None: read it now)."""
        read = self.read.get(path)
        found = read.result() if read is not None else None
        return found if found is not None and found[1] is not None else None

    def __enter__(self) -> _Documents:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


#: Names directly under a Zarr group that are not its members: its documents, a relu-dask record.
_NOT_NODES = frozenset({"zarr.json", ".zgroup", ".zattrs", ".zarray", ".zmetadata", ".relu-dask"})


def _open_remote(source: Location) -> tuple[zarr.Array | zarr.Group, _Documents]:
    """Open SOURCE on a remote store, asking meanwhile whether it exists (for the message if
    it cannot be opened), what is directly under it, and its root document."""
    pool = ThreadPoolExecutor(8, thread_name_prefix="relu-dask-source")
    exists = pool.submit(_exists, source)
    documents = _Documents(pool, pool.submit(read_metadata_bytes, source), pool.submit(source.list_names))
    try:
        return _open_node(source), documents
    except Exception:  # "cannot reach" (from exists) before "does not exist", before what zarr said
        with documents:
            if not exists.result():
                raise InputError(f"SOURCE {source} does not exist (or its storage cannot be reached)") from None
            raise


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
            try:  # members as they are, not as consolidated metadata last saw them
                return zarr.open_group(mode="r", use_consolidated=False, **zarr_kwargs(source))
            except zarr.errors.ContainsArrayError:  # a v3 array: its document is read again
                return zarr.open_array(mode="r", zarr_format=3, **zarr_kwargs(source))
            except zarr.errors.NodeNotFoundError:  # a v2 array, or nothing: zarr says which
                return zarr.open(mode="r", **zarr_kwargs(source))
    except PermissionError as exc:
        raise InputError(f"SOURCE {source} is not readable (permission denied: {exc.filename})") from exc
    except (zarr.errors.NodeNotFoundError, FileNotFoundError, NotADirectoryError):
        raise InputError(
            f"SOURCE {source} is not a Zarr array or group (no zarr.json, .zarray or .zgroup found)"
        ) from None
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise InputError(f"SOURCE {source} could not be opened as Zarr: {exc}") from exc


def _source_array(
    path: str, array: zarr.Array, root: Location, read: tuple[dict[str, Any] | None, bytes | None] | None = None
) -> SourceArray:
    """The array zarr opened at ``path``, described from its own document (``read``: read already)."""
    location = array_location(root, path)
    metadata, raw = read if read is not None else read_metadata_bytes(location)
    for _attempt in range(10):  # a writer growing the array now: its shape as zarr and the document say it
        if metadata is None or list(metadata.get("shape", [])) == list(array.shape):
            break
        array = array_at(root, path, mode="r")
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
            return zarr.open(mode=mode, path=path, **zarr_kwargs(where))
        return zarr.open(mode=mode, **zarr_kwargs(where))
    except (zarr.errors.NodeNotFoundError, FileNotFoundError) as exc:
        if path:  # missing, as a group says of a member it lacks (a lone array has none)
            raise KeyError(path) from exc
        raise


def array_at(where: Location, path: str, *, mode: Literal["r", "r+"]) -> zarr.Array:
    """Open the array at ``path`` inside ``where``; :class:`InputError` where a group is there instead."""
    found = _node_at(where, path, mode=mode)
    if not isinstance(found, zarr.Array):
        raise InputError(f"{array_location(where, path)} is a Zarr group, not an array")
    return found


def open_mask_array(dest: Location, path: str, *, writable: bool = True, document: bytes | None = None) -> StoredArray:
    """Open a mask array of DEST (for writing, unless not ``writable``), with how its chunks are written and read.

    DEST is Zarr v3 (relu-dask made it): zarr reads one document, and relu-dask reads it
    meanwhile for the direct path (on an object store, one round trip for both).
    ``document``: its metadata document as the run just wrote it to an object store: zarr
    opens the array from it (``zarr.Array.from_dict``), nothing is read.
    """
    location = array_location(dest, path)
    mode: Literal["r", "r+"] = "r+" if writable else "r"
    if document is not None and (direct := location.object_store) is not None:
        written = parse_metadata(document)
        store = zarr.storage.StorePath(objectstores.zarr_store(*direct))
        return describe_stored(zarr.Array.from_dict(store, written), location, written)
    with ThreadPoolExecutor(1) as pool:
        metadata = pool.submit(read_metadata, location)
        try:
            array = zarr.open_array(mode=mode, zarr_format=3, path=path, **zarr_kwargs(dest))
        except (zarr.errors.NodeNotFoundError, FileNotFoundError, ValueError):  # not a v3 array: say what it is
            array = array_at(dest, path, mode=mode)
        return describe_stored(array, location, metadata.result())


def open_array(location: Location | str | os.PathLike[str], array_path: str = "") -> zarr.Array:
    """Open one array read-only (``array_path`` inside a group, if given)."""
    where = location if isinstance(location, Location) else Location(os.fspath(location))
    return array_at(where, array_path, mode="r")
