"""relu_dask.run end to end on real Zarr stores (every scheduler: tests/test_scheduler_contract.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import zarr
from _support import activations, chunk_files, oracle, read_mask, snapshot, write_zarr

import relu_dask
from relu_dask.errors import DestinationExistsError, InputError, UnsupportedDtypeError


def make_group(path: Path, zarr_format: int = 3) -> dict[str, np.ndarray]:
    """A group of 1-D, 2-D (ragged) and 4-D arrays, one nested, plus a coordinate and a string array."""
    arrays = {
        "dense/w1": activations((101,), "float64", seed=1),
        "dense/w2": activations((33, 21), "float32", seed=2),
        "conv/c1": activations((3, 4, 9, 7), "float32", seed=3),
        "quantized": np.arange(-40, 40, dtype=np.int16).reshape(8, 10),
    }
    chunks = {"dense/w1": (16,), "dense/w2": (8, 8), "conv/c1": (2, 4, 4, 4), "quantized": (3, 4)}
    for name, data in arrays.items():
        write_zarr(path, data, chunks[name], zarr_format=zarr_format, name=name)
    write_zarr(
        path, np.arange(5, dtype=np.int64), (5,), zarr_format=zarr_format, name="unit", dimension_names=("unit",)
    )
    if zarr_format == 2:
        zarr.open_group(str(path), mode="a")["unit"].attrs["_ARRAY_DIMENSIONS"] = ["unit"]
    return arrays


def test_group_of_every_rank_and_dtype_gives_numpys_masks_and_the_same_bytes(tmp_path: Path) -> None:
    """1-D, 2-D, 4-D, float and int arrays, one nested, a coordinate skipped; the same chunk files
    whatever the processing blocks. (Every scheduler: tests/test_scheduler_contract.py.)"""
    source = tmp_path / "acts.zarr"
    arrays = make_group(source)
    reference = tmp_path / "reference.zarr"
    relu_dask.run(source, reference, scheduler="synchronous", chunks="1KiB")
    dest = tmp_path / "masks.zarr"
    report = relu_dask.run(source, dest)
    for name, data in arrays.items():
        assert np.array_equal(read_mask(dest, name), oracle(data)), name
    assert chunk_files(dest) == chunk_files(reference)
    assert report.outcome == "done"
    assert {a.path for a in report.arrays} == set(arrays)
    assert report.skipped == [] and report.coordinates == ["unit"]


@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("chunks", ["auto", "1KiB", (8, 16)], ids=["auto", "bytes", "shape"])
def test_single_array_with_ragged_edges(tmp_path: Path, zarr_format: int, chunks: object) -> None:
    x = activations((45, 37), "float64")
    source = tmp_path / "src.zarr"
    write_zarr(source, x, (8, 16), zarr_format=zarr_format)
    report = relu_dask.run(source, tmp_path / "out.zarr", chunks=chunks)  # type: ignore[arg-type]
    assert np.array_equal(read_mask(tmp_path / "out.zarr"), oracle(x))
    (entry,) = report.arrays
    assert entry.num_elements == x.size
    assert entry.num_ones == int(oracle(x).sum())
    assert entry.num_nans == int(np.isnan(x).sum())
    assert entry.num_zeros == int((x == 0).sum())


@pytest.mark.parametrize("at_zero", [0, 1])
@pytest.mark.parametrize("engine", ["numpy", "numexpr", "auto"])
def test_rule_and_engine(small_source: tuple[Path, np.ndarray], tmp_path: Path, at_zero: int, engine: str) -> None:
    source, x = small_source
    report = relu_dask.run(source, tmp_path / "out.zarr", at_zero=at_zero, engine=engine)  # type: ignore[arg-type]
    assert np.array_equal(read_mask(tmp_path / "out.zarr"), oracle(x, at_zero))
    assert report.rule == ("x >= 0" if at_zero else "x > 0")


def test_dest_records_provenance_and_dimension_names(tmp_path: Path) -> None:
    source = tmp_path / "src.zarr"
    write_zarr(source, activations((10, 6)), (5, 3), dimension_names=("token", "unit"))
    relu_dask.run(source, tmp_path / "out.zarr", at_zero=0)
    out = zarr.open_array(str(tmp_path / "out.zarr"), mode="r")
    info = {k.removeprefix("relu_dask_"): v for k, v in out.attrs.items() if k.startswith("relu_dask_")}
    assert info["source"] == str(source.resolve())
    assert info["rule"] == "x > 0"
    assert info["version"] == relu_dask.__version__
    assert info["source_dtype"] == "float32"
    assert out.metadata.dimension_names == ("token", "unit")
    assert out.metadata.zarr_format == 3
    assert out.fill_value == 0


def test_dest_chunks_and_shards(small_source: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    source, x = small_source
    report = relu_dask.run(source, tmp_path / "out.zarr", dest_chunks="8,8", dest_shards="16,32")
    out = zarr.open_array(str(tmp_path / "out.zarr"), mode="r")
    assert out.chunks == (8, 8)
    assert out.shards == (16, 32)
    assert np.array_equal(out[...], oracle(x))
    block = report.arrays[0].block_shape
    assert all(b % s == 0 or b >= n for b, s, n in zip(block, (16, 32), x.shape))


def test_all_zero_mask_chunks_are_not_stored_and_read_as_zeros(tmp_path: Path) -> None:
    """As zarr does by default: a chunk equal to the fill value (0) is not stored."""
    x = activations((16, 8), "float32", seed=9)
    x[:8] = -1.0  # the first block (rows 0-7): all negative
    x[8:12] = -2.0  # the first dest chunk of the second block: all negative too
    x[12, 0] = 0.5
    write_zarr(tmp_path / "src.zarr", x, (8, 8))
    relu_dask.run(tmp_path / "src.zarr", tmp_path / "out.zarr", chunks="8,8", dest_chunks="4,8")
    out = zarr.open_array(str(tmp_path / "out.zarr"), mode="r")
    assert np.array_equal(out[...], oracle(x))
    stored = sorted(p.relative_to(tmp_path / "out.zarr").as_posix() for p in (tmp_path / "out.zarr" / "c").rglob("*"))
    assert [k for k in stored if k.count("/") == 2] == ["c/3/0"]


def test_sharded_source_keeps_its_sharding(tmp_path: Path) -> None:
    x = activations((64, 48))
    source = tmp_path / "src.zarr"
    write_zarr(source, x, (8, 8), shards=(32, 24))
    relu_dask.run(source, tmp_path / "out.zarr")
    out = zarr.open_array(str(tmp_path / "out.zarr"), mode="r")
    assert (out.chunks, out.shards) == ((8, 8), (32, 24))
    assert np.array_equal(out[...], oracle(x))


@pytest.mark.parametrize("shape", [(0,), (0, 5), ()], ids=["empty-1d", "empty-2d", "scalar"])
def test_empty_and_scalar_arrays(tmp_path: Path, shape: tuple[int, ...]) -> None:
    x = np.full(shape, -2.5, dtype=np.float32)
    source = tmp_path / "src.zarr"
    write_zarr(source, x, tuple(max(1, n) for n in shape))
    report = relu_dask.run(source, tmp_path / "out.zarr")
    got = read_mask(tmp_path / "out.zarr")
    assert got.shape == shape
    assert np.array_equal(got, oracle(x))
    assert report.num_tasks == (0 if 0 in shape else 1)


def test_dry_run_writes_nothing(small_source: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    source, _ = small_source
    before = snapshot(tmp_path)
    report = relu_dask.run(source, tmp_path / "out.zarr", dry_run=True, report_path=None)
    assert report.outcome == "planned"
    assert report.num_tasks == report.arrays[0].num_tasks > 0
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "out.zarr").exists()


def test_report_json(small_source: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    source, x = small_source
    relu_dask.run(source, tmp_path / "out.zarr", report_path=tmp_path / "report.json")
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["outcome"] == "done"
    assert data["bytes_read"] == x.nbytes
    assert data["bytes_written"] > 0
    assert data["num_tasks"] == data["arrays"][0]["num_tasks"]
    assert data["arrays"][0]["shape"] == list(x.shape)
    assert data["arrays"][0]["dtype"] == "float32"
    assert data["versions"]["zarr"] == zarr.__version__
    assert data["wall_s"] > 0
    # The threads scheduler's work is this process's: CPU time, at most all its cores busy.
    assert 0 < data["cpu_s"] <= data["wall_s"] * len(os.sched_getaffinity(0)) + 0.05
    assert data["throughput_bytes_per_s"] > 0


def test_existing_dest_is_refused_and_untouched(small_source: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    source, x = small_source
    dest = tmp_path / "out.zarr"
    write_zarr(dest, np.ones((3, 3), np.int8), (3, 3))
    before, source_before = snapshot(dest), snapshot(source)
    with pytest.raises(DestinationExistsError, match="--overwrite"):
        relu_dask.run(source, dest)
    assert snapshot(dest) == before
    relu_dask.run(source, dest, overwrite=True)
    assert np.array_equal(read_mask(dest), oracle(x))
    assert snapshot(source) == source_before


def test_overwrite_refuses_a_dest_that_is_not_zarr(small_source: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    source, _ = small_source
    dest = tmp_path / "thesis"
    dest.mkdir()
    (dest / "chapter1.tex").write_text("precious")
    with pytest.raises(DestinationExistsError, match="not a Zarr store"):
        relu_dask.run(source, dest, overwrite=True)
    assert (dest / "chapter1.tex").read_text() == "precious"


def test_overwrite_validates_inputs_before_removing_dest(tmp_path: Path) -> None:
    source = tmp_path / "src.zarr"
    write_zarr(source, np.array([1 + 2j, 3j]), (2,))
    dest = tmp_path / "out.zarr"
    write_zarr(dest, np.ones(4, np.int8), (2,))
    before = snapshot(dest)
    with pytest.raises(UnsupportedDtypeError, match="complex"):
        relu_dask.run(source, dest, overwrite=True)
    assert snapshot(dest) == before


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_dest_and_source_must_not_overlap(small_source: tuple[Path, np.ndarray], tmp_path: Path, where: str) -> None:
    source, _ = small_source
    dest = {"same": source, "inside": source / "masks", "contains": tmp_path}[where]
    before = snapshot(source)
    with pytest.raises(InputError, match="SOURCE"):
        relu_dask.run(source, dest, overwrite=True)
    assert snapshot(source) == before


def test_group_with_nothing_to_process_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "src.zarr"
    write_zarr(source, np.arange(4), (4,), name="x", dimension_names=("x",))
    with pytest.raises(InputError, match="nothing to process"):
        relu_dask.run(source, tmp_path / "out.zarr")
    assert not (tmp_path / "out.zarr").exists()


def test_memory_limit_refuses_an_oversized_plan(small_source: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    source, _ = small_source
    spec = relu_dask.parse_scheduler("local", num_workers=1, threads_per_worker=1, memory_limit="1KiB")
    with pytest.raises(InputError, match="--chunks"):
        relu_dask.run(source, tmp_path / "out.zarr", scheduler=spec)
    assert not (tmp_path / "out.zarr").exists()


def test_derivative_mask_is_lazy_and_exact() -> None:
    import dask.array as da

    x = activations((50, 30), "float64")
    darr = da.from_array(x, chunks=(7, 11))
    mask = relu_dask.derivative_mask(darr)
    assert mask.dtype == np.int8
    assert mask.chunks == darr.chunks
    assert mask.name.startswith("relu-mask-")
    assert mask.name == relu_dask.derivative_mask(darr).name
    assert mask.name != relu_dask.derivative_mask(darr, at_zero=0).name
    assert np.array_equal(mask.compute(scheduler="threads"), oracle(x))
    with pytest.raises(UnsupportedDtypeError):
        relu_dask.derivative_mask(da.from_array(np.array([True, False])))


@pytest.mark.parametrize("compressor", ["blosc-lz4", "blosc-zstd", "zstd", "none"])
def test_dest_compressor_is_a_standard_v3_codec(
    small_source: tuple[Path, np.ndarray], tmp_path: Path, compressor: str
) -> None:
    source, x = small_source
    relu_dask.run(source, tmp_path / "out.zarr", dest_compressor=compressor)
    meta = json.loads((tmp_path / "out.zarr" / "zarr.json").read_text())
    names = [c["name"] for c in meta["codecs"]]
    expected = {
        "blosc-lz4": ["bytes", "blosc"],
        "blosc-zstd": ["bytes", "blosc"],
        "zstd": ["bytes", "zstd"],
        "none": ["bytes"],
    }[compressor]
    assert names == expected
    if compressor == "blosc-lz4":
        config = meta["codecs"][1]["configuration"]
        assert (config["cname"], config["shuffle"], config["typesize"]) == ("lz4", "bitshuffle", 1)
    tensorstore = pytest.importorskip("tensorstore")  # another Zarr v3 reader reads it
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "out.zarr")}}
    assert np.array_equal(tensorstore.open(spec).result().read().result(), oracle(x))
