"""The built-in demo job: synthetic activations in ``data/``, their masks, a spot check.

Use :func:`run_demo` (``relu-dask demo``) for a first try on a new machine: it creates a
seeded synthetic float32 array (1 GiB by default) if it is not there yet, computes its
masks with :func:`relu_dask.run`, and checks a sample of blocks against numpy bit for bit.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from relu_dask import storage
from relu_dask.chunking import format_bytes
from relu_dask.errors import InputError, ProcessingError
from relu_dask.execution import run
from relu_dask.report import RunReport

__all__ = ["DEMO_SEED", "DEMO_UNITS", "check_sample", "demo_paths", "ensure_demo_source", "run_demo"]

log = logging.getLogger(__name__)

DEMO_SEED = 20261128
#: Units (columns) of the demo array; rows grow with the size asked for.
DEMO_UNITS = 4096
#: Rows per storage chunk: 2048 x 4096 float32 is 32 MiB, compressed with zarr's default.
DEMO_CHUNK_ROWS = 2048


def demo_paths(data_dir: Path, size_bytes: int) -> tuple[Path, Path, tuple[int, int]]:
    """The demo's source path, mask path and shape for ``size_bytes`` of float32."""
    rows = max(1, size_bytes // (DEMO_UNITS * 4))
    tag = format_bytes(rows * DEMO_UNITS * 4).replace(" ", "").replace(".0", "")
    return data_dir / f"demo-activations-{tag}.zarr", data_dir / f"demo-masks-{tag}.zarr", (rows, DEMO_UNITS)


def ensure_demo_source(path: Path, shape: tuple[int, int]) -> bool:
    """Create the synthetic source at ``path`` unless it is there; return whether created."""
    if path.exists():
        existing = storage.open_array(path)
        if tuple(existing.shape) != shape or existing.attrs.get("seed") != DEMO_SEED:
            raise InputError(f"{path} exists but is not this demo's data: move it away or use --data-dir")
        return False
    log.info("creating the demo source %s (%s float32, seed %d)", path, "x".join(map(str, shape)), DEMO_SEED)
    write_synthetic_activations(
        path, shape=shape, chunk_shape=(min(DEMO_CHUNK_ROWS, shape[0]), shape[1]), seed=DEMO_SEED
    )
    return True


def check_sample(source: Path, dest: Path, *, at_zero: int = 1, num_blocks: int = 4, seed: int = 0) -> int:
    """Compare ``num_blocks`` random row blocks of DEST with numpy's mask of SOURCE, exactly.

    Returns the number of elements checked; raises :class:`ProcessingError` on a mismatch.
    """
    src = storage.open_array(source)
    out = storage.open_array(dest)
    rows = src.shape[0]
    step = src.chunks[0]
    starts = (
        np.random.default_rng(seed).choice(
            math.ceil(rows / step), size=min(num_blocks, math.ceil(rows / step)), replace=False
        )
        * step
    )
    checked = 0
    for start in sorted(int(s) for s in starts):
        x = np.asarray(src[start : start + step])
        expected = (x >= 0) if at_zero == 1 else (x > 0)
        got = np.asarray(out[start : start + step])
        if got.dtype != np.int8 or not np.array_equal(got, expected.astype(np.int8)):
            bad = int(np.count_nonzero(got != expected))
            raise ProcessingError(f"demo check failed: {bad} mask values differ from numpy in rows {start}..")
        checked += x.size
    return checked


def run_demo(data_dir: Path, size_bytes: int, **options: Any) -> tuple[RunReport, int]:
    """Make (if needed) the demo source, compute its masks into ``data_dir``, check a sample.

    The demo's own mask output is replaced on every run. Returns the report and the
    number of elements checked against numpy.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    source, dest, shape = demo_paths(data_dir, size_bytes)
    ensure_demo_source(source, shape)
    report = run(source, dest, overwrite=True, **options)
    checked = check_sample(source, dest, at_zero=options.get("at_zero", 1))
    return report, checked


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
