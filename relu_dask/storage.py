"""Zarr in and out: the only module that imports zarr.

Use :func:`open_source` to find the arrays to process (one array, or every real-numbered
array of a group, recursively), :func:`prepare_dest` to check and clear the way for DEST,
and :func:`create_mask_array` to create each output array before any task writes to it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.errors

from relu_dask.errors import DestinationExistsError, InputError, UnsupportedDtypeError
from relu_dask.kernel import check_dtype

__all__ = [
    "PROVENANCE_KEY",
    "Skipped",
    "SourceArray",
    "check_replaceable",
    "create_dest_group",
    "create_mask_array",
    "describe_store",
    "fingerprint_array",
    "has_array",
    "is_group",
    "open_array",
    "open_mask_array",
    "open_source",
    "prepare_dest",
    "remove_dest",
    "remove_partial_writes",
    "write_synthetic_activations",
]

log = logging.getLogger(__name__)

#: The attribute under which DEST records where it came from.
PROVENANCE_KEY = "relu_dask"


@dataclass(frozen=True)
class SourceArray:
    """One array of SOURCE to process."""

    path: str
    """Path inside SOURCE ("" when SOURCE is the array itself)."""
    array: Any
    """The zarr Array, opened read-only."""
    dimension_names: tuple[str, ...] | None
    """Dimension names (v3 metadata or xarray's ``_ARRAY_DIMENSIONS``), if any."""

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

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
        return int(self.array.metadata.zarr_format)


@dataclass(frozen=True)
class Skipped:
    """An array of a SOURCE group that was not processed, and why."""

    path: str
    reason: str


def open_source(source: str | os.PathLike[str]) -> tuple[list[SourceArray], list[Skipped]]:
    """Open SOURCE read-only and list the arrays to process and those skipped.

    For a group, every real-numbered array (recursively) is processed; xarray
    dimension-coordinate arrays (1-D, named after their own dimension) and arrays of other
    dtypes are skipped. Raises :class:`InputError` if SOURCE is missing, not Zarr,
    unreadable, or has nothing to process; :class:`UnsupportedDtypeError` for a single
    array of a dtype without a ReLU derivative.
    """
    path = Path(source)
    if not path.exists():
        raise InputError(f"SOURCE {source} does not exist")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise InputError(f"SOURCE {source} is not readable (permission denied)")
    node = _open_node(path, source)
    if isinstance(node, zarr.Array):
        src = _source_array("", node)
        check_dtype(src.dtype, where=f"SOURCE {source}")
        return [src], []
    arrays: list[SourceArray] = []
    skipped: list[Skipped] = []
    try:
        members = sorted(node.members(max_depth=None), key=lambda m: m[0])
    except (PermissionError, OSError) as exc:
        raise InputError(f"SOURCE {source} could not be read: {exc}") from exc
    for name, member in members:
        if not isinstance(member, zarr.Array):
            continue
        src = _source_array(name, member)
        reason = _skip_reason(src)
        if reason:
            skipped.append(Skipped(name, reason))
        else:
            arrays.append(src)
    if not arrays:
        said = "; ".join(f"{s.path}: {s.reason}" for s in skipped) or "it holds no arrays"
        raise InputError(f"SOURCE {source} is a Zarr group with nothing to process ({said})")
    return arrays, skipped


def _open_node(path: Path, source: str | os.PathLike[str]) -> Any:
    try:
        with warnings.catch_warnings():
            # Opening is read-only: warnings about how other dtypes *would* be written
            # are not the user's concern here.
            warnings.simplefilter("ignore")
            return zarr.open(store=str(path), mode="r")
    except PermissionError as exc:
        raise InputError(f"SOURCE {source} is not readable (permission denied: {exc.filename})") from exc
    except (zarr.errors.NodeNotFoundError, FileNotFoundError, NotADirectoryError):
        raise InputError(
            f"SOURCE {source} is not a Zarr array or group (no zarr.json, .zarray or .zgroup found)"
        ) from None
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise InputError(f"SOURCE {source} could not be opened as Zarr: {exc}") from exc


def _source_array(path: str, array: Any) -> SourceArray:
    names = getattr(array.metadata, "dimension_names", None)
    if names is None:
        names = array.attrs.get("_ARRAY_DIMENSIONS")
    dims = tuple(str(n) for n in names) if names and all(n is not None for n in names) else None
    return SourceArray(path, array, dims)


def _skip_reason(src: SourceArray) -> str:
    leaf = src.path.rsplit("/", 1)[-1]
    if len(src.shape) == 1 and src.dimension_names == (leaf,):
        return "dimension coordinate"
    try:
        check_dtype(src.dtype)
    except UnsupportedDtypeError:
        return f"dtype {src.dtype} is not a real number type"
    except Exception:  # noqa: BLE001 - zarr dtypes numpy cannot name
        return f"dtype {src.array.dtype} is not a real number type"
    return ""


def prepare_dest(source: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Check where DEST goes against SOURCE; return its absolute path. Nothing is changed.

    Raises :class:`InputError` when DEST is SOURCE, inside it, or contains it, or when its
    folder is missing or not writable. Whether an existing DEST may be replaced or resumed
    is decided later, under DEST's lock.
    """
    src = Path(source).resolve()
    dst = Path(dest).resolve()
    if dst == src:
        raise InputError(f"DEST {dest} is SOURCE itself: choose another DEST")
    if src in dst.parents:
        raise InputError(f"DEST {dest} is inside SOURCE {source}: choose a DEST outside it")
    if dst in src.parents:
        raise InputError(f"SOURCE {source} is inside DEST {dest}: writing DEST would destroy SOURCE")
    parent = dst.parent
    if not parent.is_dir():
        raise InputError(f"the folder {parent} for DEST does not exist: create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write DEST {dest}: permission denied in {parent}")
    return dst


def check_replaceable(dest: Path) -> None:
    """Raise unless DEST is absent or a Zarr store (relu_dask never deletes anything else)."""
    if (dest.exists() or dest.is_symlink()) and not _is_zarr_store(dest):
        raise DestinationExistsError(
            f"DEST {dest} exists and is not a Zarr store; relu-dask will not delete it: choose another DEST"
        )


def _is_zarr_store(path: Path) -> bool:
    if path.is_file() or path.is_symlink():
        return False
    return any((path / name).is_file() for name in ("zarr.json", ".zarray", ".zgroup"))


def remove_dest(dest: Path, reason: str) -> None:
    """Delete DEST: one that :func:`prepare_dest` allowed to replace, or this run's own."""
    if dest.exists():
        log.info("removing DEST %s (%s)", dest, reason)
        shutil.rmtree(dest)


def create_dest_group(dest: Path, attributes: dict[str, Any]) -> Any:
    """Create DEST as a Zarr v3 group with ``attributes``."""
    return zarr.open_group(store=str(dest), mode="w-", zarr_format=3, attributes=attributes)


def create_mask_array(
    dest: Path,
    path: str,
    *,
    shape: tuple[int, ...],
    chunk_shape: tuple[int, ...],
    shard_shape: tuple[int, ...] | None,
    dimension_names: tuple[str, ...] | None,
    attributes: dict[str, Any],
) -> Any:
    """Create the int8 mask array at ``path`` under DEST (Zarr v3, fill value 0).

    Chunks equal to the fill value are not written (zarr's default), so all-negative
    blocks cost no disk.
    """
    if path:
        root = zarr.open_group(store=str(dest), mode="a", zarr_format=3)
        parent, _, name = path.rpartition("/")
        group = root.require_group(parent) if parent else root
        return group.create_array(
            name,
            shape=shape,
            dtype="int8",
            chunks=chunk_shape,
            shards=shard_shape,
            fill_value=0,
            dimension_names=dimension_names,
            attributes=attributes,
        )
    return zarr.create_array(
        store=str(dest),
        shape=shape,
        dtype="int8",
        chunks=chunk_shape,
        shards=shard_shape,
        fill_value=0,
        dimension_names=dimension_names,
        attributes=attributes,
        zarr_format=3,
    )


def is_group(path: Path) -> bool:
    """Whether ``path`` holds a Zarr v3 group at its root."""
    try:
        return bool(zarr.open_group(store=str(path), mode="r", zarr_format=3) is not None)
    except (zarr.errors.NodeNotFoundError, FileNotFoundError, ValueError):
        return False


def has_array(dest: Path, path: str) -> bool:
    """Whether DEST holds an array at ``path`` ("" for DEST itself)."""
    try:
        node: Any = zarr.open(store=str(dest), mode="r")
        return isinstance(node[path] if path else node, zarr.Array)
    except (KeyError, zarr.errors.NodeNotFoundError, FileNotFoundError, ValueError):
        return False


def open_mask_array(dest: Path, path: str) -> Any:
    """Open a mask array of DEST for writing."""
    node: Any = zarr.open(store=str(dest), mode="r+")
    return node[path] if path else node


def describe_store(array: Any) -> dict[str, Any]:
    """A JSON-ready description of an array's storage: format, chunks, shards, codecs."""
    return {
        "zarr_format": int(array.metadata.zarr_format),
        "chunk_shape": list(array.chunks),
        "shard_shape": list(array.shards) if getattr(array, "shards", None) else None,
        "compressors": [str(c) for c in getattr(array, "compressors", ())],
    }


def open_array(path: str | os.PathLike[str], array_path: str = "") -> Any:
    """Open one array read-only (``array_path`` inside a group, if given)."""
    node: Any = zarr.open(store=str(path), mode="r")
    return node[array_path] if array_path else node


def write_synthetic_activations(
    path: Path, *, shape: tuple[int, int], chunk_shape: tuple[int, int], seed: int, num_threads: int = 2
) -> None:
    """Write seeded synthetic float32 ReLU inputs to a new Zarr v3 array at ``path``.

    Each unit (column) has its own mean and spread, some far below zero (dead units) and
    some far above (always on); a few exact zeros and NaNs are planted. Rows are written a
    chunk at a time, each from its own seeded generator, so memory stays one chunk per
    thread and the data does not depend on the thread count. The array is written under a
    temporary name and renamed into place, so a killed run never leaves half an array.
    """
    from concurrent.futures import ThreadPoolExecutor

    rows, units = shape
    rng = np.random.default_rng(seed)
    mean = rng.normal(0.0, 1.0, units).astype(np.float32)
    mean[rng.choice(units, max(1, units // 50), replace=False)] = -8.0  # dead units
    mean[rng.choice(units, max(1, units // 50), replace=False)] = 8.0  # always on
    spread = rng.uniform(0.5, 2.0, units).astype(np.float32)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    array = zarr.create_array(
        store=str(tmp),
        shape=shape,
        chunks=chunk_shape,
        dtype="float32",
        fill_value=0.0,
        dimension_names=("sample", "unit"),
        zarr_format=3,
        attributes={"description": "synthetic ReLU inputs (relu-dask demo)", "seed": seed},
    )

    def write_rows(start: int) -> None:
        stop = min(start + chunk_shape[0], rows)
        local = np.random.default_rng([seed, start])
        block = local.standard_normal((stop - start, units), dtype=np.float32)
        block *= spread
        block += mean
        block[local.random(block.shape, dtype=np.float32) < 1e-4] = 0.0
        if start == 0:
            block[0, :3] = np.nan
        array[start:stop] = block

    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        list(pool.map(write_rows, range(0, rows, chunk_shape[0])))
    if path.exists():  # another demo made it meanwhile: keep theirs
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, path)


def fingerprint_array(src: SourceArray, num_samples: int = 16) -> dict[str, Any]:
    """A cheap identity of one source array, to tell whether it changed between runs.

    Its path, shape, dtype and chunking; a hash of its metadata document; and the size and
    modification time of up to ``num_samples`` stored chunk (or shard) files spread evenly
    over the chunk grid. Rewriting those chunks, or the array's metadata, changes it;
    reading never does.
    """
    import hashlib

    array = src.array
    folder = Path(str(array.store.root)) / array.store_path.path
    meta_name = "zarr.json" if src.zarr_format == 3 else ".zarray"
    try:
        meta_hash = hashlib.sha256((folder / meta_name).read_bytes()).hexdigest()
    except OSError:
        meta_hash = None
    unit = src.shard_shape or src.chunk_shape
    grid = tuple(-(-n // c) for n, c in zip(src.shape, unit))
    total = math.prod(grid)
    samples = []
    if total:
        for linear in sorted({round(i * (total - 1) / max(1, num_samples - 1)) for i in range(num_samples)}):
            coords = tuple(int(c) for c in np.unravel_index(linear, grid))
            key = array.metadata.encode_chunk_key(coords)
            try:
                stat = (folder / key).stat()
                samples.append([key, stat.st_size, stat.st_mtime_ns])
            except OSError:
                samples.append([key, None, None])
    return {
        "path": src.path,
        "shape": list(src.shape),
        "dtype": str(src.dtype),
        "chunk_shape": list(src.chunk_shape),
        "shard_shape": list(src.shard_shape) if src.shard_shape else None,
        "metadata_sha256": meta_hash,
        "chunk_samples": samples,
    }


def remove_partial_writes(dest: Path) -> int:
    """Delete the temporary files a killed write left in DEST; return how many."""
    removed = 0
    for path in dest.rglob("*.partial"):
        with contextlib.suppress(OSError):
            path.unlink()
            removed += 1
    return removed
