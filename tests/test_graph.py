"""graph: building the tasks computes nothing; the names are stable; computing them writes the masks."""

from __future__ import annotations

import zlib
from pathlib import Path

import dask
import numpy as np
from _support import activations, oracle, read_mask, write_zarr

from relu_dask import chunking, outputs, storage
from relu_dask.counts import BlockCounts
from relu_dask.graph import TASK_PREFIX, build_mask_tasks, derivative_mask
from relu_dask.locations import parse_location
from relu_dask.task import ArrayTasks


def _job(tmp_path: Path, x: np.ndarray) -> ArrayTasks:
    write_zarr(tmp_path / "src.zarr", x, (8, 8))
    (src,) = storage.open_source(parse_location(tmp_path / "src.zarr")).arrays
    plan = chunking.plan_chunks(src.shape, src.dtype.itemsize, src.chunk_shape, src.chunk_shape, None, chunks=(8, 8))
    dest = parse_location(tmp_path / "out.zarr")
    outputs.create_mask_array(
        dest, "", shape=src.shape, chunk_shape=(8, 8), shard_shape=None, dimension_names=None, attributes={}
    )
    assert src.stored is not None
    return ArrayTasks(src.stored, storage.open_mask_array(dest, ""), plan, token="t")


def test_building_the_tasks_computes_nothing_and_computing_them_writes_every_mask(tmp_path: Path) -> None:
    x = activations((20, 17), seed=4)
    job = _job(tmp_path, x)
    tasks = build_mask_tasks(job)
    assert tasks is not None
    keys = tasks.__dask_keys__()
    assert len(keys) == job.plan.num_tasks == 9
    assert all(k[0] == "relu_mask-t" for k in keys)  # SOURCE itself: no path after the prefix
    assert not any((tmp_path / "out.zarr").rglob("c/*/*"))  # built, not run: no chunk written
    (counts,) = dask.compute(tasks, scheduler="synchronous")
    assert counts.shape == (3, 3, len(BlockCounts.FIELDS))
    assert int(counts[..., 0].sum()) == x.size and int(counts[..., 1].sum()) == int(oracle(x).sum())
    digest = BlockCounts.FIELDS.index("digest")  # each block's: the CRC-32 of its masks in C order
    for index in np.ndindex(3, 3):
        block = oracle(x)[tuple(job.plan.block_slices(index))]
        assert counts[(*index, digest)] == zlib.crc32(np.ascontiguousarray(block).tobytes())
    assert np.array_equal(read_mask(tmp_path / "out.zarr"), oracle(x))


def test_derivative_masks_name_is_stable_and_follows_the_rule() -> None:
    import dask.array as da

    x = da.from_array(np.arange(-3.0, 3.0), chunks=2)
    assert derivative_mask(x).name == derivative_mask(x).name
    assert derivative_mask(x).name != derivative_mask(x, at_zero=0).name
    assert derivative_mask(x).name.startswith(TASK_PREFIX)
    assert derivative_mask(x, at_zero=0).compute().tolist() == [0, 0, 0, 0, 1, 1]
