"""Sources written by other tools, Zarr v2 and v3 groups, and what is skipped."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr
import zarr.errors
from _support import activations, oracle, read_mask, write_zarr
from numcodecs import Delta

import relu_dask
from relu_dask import blocks, outputs, storage
from relu_dask.errors import DamagedSourceError, InputError, UnsupportedDtypeError
from relu_dask.locations import parse_location


def _stored(path: Path) -> blocks.StoredArray:
    """The one array at ``path`` as a run's tasks read it."""
    (src,) = storage.open_source(parse_location(path)).arrays
    assert src.stored is not None
    return src.stored


def _ts_write(path: Path, data: np.ndarray, chunks: list[int], driver: str) -> None:
    ts = pytest.importorskip("tensorstore")
    dtype = np.dtype(data.dtype).name
    if driver == "zarr":
        spec = {
            "driver": "zarr",
            "kvstore": {"driver": "file", "path": str(path)},
            "metadata": {"shape": list(data.shape), "chunks": chunks, "dtype": np.dtype(data.dtype).str},
        }
    else:
        spec = {
            "driver": "zarr3",
            "kvstore": {"driver": "file", "path": str(path)},
            "metadata": {
                "shape": list(data.shape),
                "data_type": dtype,
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}},
            },
        }
    store = ts.open(spec, create=True).result()
    store.write(data).result()


@pytest.mark.parametrize("driver", ["zarr", "zarr3"], ids=["tensorstore-v2", "tensorstore-v3"])
def test_arrays_written_by_tensorstore(tmp_path: Path, driver: str) -> None:
    x = activations((40, 30), "float64")
    _ts_write(tmp_path / "ts.zarr", x, [16, 16], driver)
    relu_dask.run(tmp_path / "ts.zarr", tmp_path / "out.zarr")
    assert np.array_equal(read_mask(tmp_path / "out.zarr"), oracle(x))


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_dataset_written_by_xarray(tmp_path: Path, zarr_format: int) -> None:
    xr = pytest.importorskip("xarray")
    acts = activations((20, 12, 5), "float32")
    ds = xr.Dataset(
        {"layer1": (("sample", "unit"), acts[:, :, 0]), "conv": (("sample", "unit", "channel"), acts)},
        coords={"sample": np.arange(20), "unit": [f"u{i}" for i in range(12)], "channel": np.arange(5.0)},
    ).chunk({"sample": 8})
    with warnings.catch_warnings():
        # Writing the string coordinate in v3 warns that its dtype has no stable spec:
        # that is xarray's and zarr's business while making the test data, not ours.
        warnings.simplefilter("ignore", zarr.errors.UnstableSpecificationWarning)
        ds.to_zarr(tmp_path / "xr.zarr", zarr_format=zarr_format, consolidated=False)
    report = relu_dask.run(tmp_path / "xr.zarr", tmp_path / "out.zarr")
    assert np.array_equal(read_mask(tmp_path / "out.zarr", "layer1"), oracle(acts[:, :, 0]))
    assert np.array_equal(read_mask(tmp_path / "out.zarr", "conv"), oracle(acts))
    assert sorted(report.coordinates) == ["channel", "sample", "unit"] and report.skipped == []
    masks = xr.open_zarr(tmp_path / "out.zarr")
    assert masks["conv"].dims == ("sample", "unit", "channel")
    assert masks["unit"].values.tolist() == [f"u{i}" for i in range(12)]


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_nested_groups_map_to_the_same_paths(tmp_path: Path, zarr_format: int) -> None:
    a, b = activations((9, 4), seed=1), activations((3, 3, 3), "float64", seed=2)
    write_zarr(tmp_path / "g.zarr", a, (4, 4), zarr_format=zarr_format, name="block1/relu")
    write_zarr(tmp_path / "g.zarr", b, (2, 2, 2), zarr_format=zarr_format, name="block2/deep/relu")
    relu_dask.run(tmp_path / "g.zarr", tmp_path / "out.zarr")
    root = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    assert root.attrs["relu_dask_rule"] == "x >= 0"
    assert np.array_equal(read_mask(tmp_path / "out.zarr", "block1/relu"), oracle(a))
    assert np.array_equal(read_mask(tmp_path / "out.zarr", "block2/deep/relu"), oracle(b))


def test_big_endian_v2_source(tmp_path: Path) -> None:
    x = activations((17, 5), "float64").astype(">f8")
    write_zarr(tmp_path / "be.zarr", x, (4, 5), zarr_format=2)
    relu_dask.run(tmp_path / "be.zarr", tmp_path / "out.zarr", engine="numexpr")
    assert np.array_equal(read_mask(tmp_path / "out.zarr"), oracle(x))


def test_group_skips_what_has_no_relu_derivative(tmp_path: Path) -> None:
    write_zarr(tmp_path / "g.zarr", activations((6,)), (3,), name="acts")
    write_zarr(tmp_path / "g.zarr", np.array([True, False]), (2,), name="flags")
    write_zarr(tmp_path / "g.zarr", np.array([1 + 1j]), (1,), name="phase")
    contents = storage.open_source(parse_location(tmp_path / "g.zarr"))
    assert [a.path for a in contents.arrays] == ["acts"] and contents.coordinates == []
    assert {s.path: s.reason for s in contents.skipped} == {
        "flags": "dtype bool is not a real number type",
        "phase": "dtype complex128 is not a real number type",
    }


def test_single_array_of_unsupported_dtype_is_refused(tmp_path: Path) -> None:
    write_zarr(tmp_path / "b.zarr", np.array([True, False]), (2,))
    with pytest.raises(UnsupportedDtypeError, match="bool"):
        storage.open_source(parse_location(tmp_path / "b.zarr"))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "not a Zarr array or group"),
        (lambda p: p.write_text("not zarr"), "not a Zarr array or group"),
    ],
    ids=["missing", "empty-folder", "plain-file"],
)
def test_sources_that_are_not_zarr(tmp_path: Path, make, match: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "src"
    make(path)
    with pytest.raises(InputError, match=match):
        storage.open_source(parse_location(path))


_GZIP = {"name": "gzip", "configuration": {"level": 1}}
_BLOSC = {"name": "blosc", "configuration": {"cname": "lz4", "clevel": 5, "shuffle": "shuffle", "typesize": 8}}


@pytest.mark.parametrize(
    ("zarr_format", "extra", "direct"),
    [
        (3, {}, True),
        (3, {"compressors": None}, True),
        (3, {"compressors": [_BLOSC]}, True),
        (3, {"serializer": {"name": "bytes", "configuration": {"endian": "big"}}}, True),
        (3, {"compressors": [_GZIP]}, False),
        (3, {"shards": (8, 12)}, False),
        (2, {}, True),
        (2, {"order": "F"}, True),
        (2, {"compressors": None}, True),
        (2, {"compressors": {"id": "blosc", "cname": "zstd", "shuffle": 2}}, True),
        (2, {"filters": [Delta(dtype=">f8")]}, False),
    ],
    ids=[
        "v3-zstd",
        "v3-raw",
        "v3-blosc",
        "v3-big-endian",
        "v3-gzip",
        "v3-sharded",
        "v2-zstd",
        "v2-F-order",
        "v2-raw",
        "v2-blosc",
        "v2-filters",
    ],
)
def test_read_block_gives_zarrs_bits_for_any_selection(tmp_path: Path, zarr_format: int, extra, direct: bool) -> None:  # type: ignore[no-untyped-def]
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from relu_dask import chunkio

    x = activations((29, 35), "float64", seed=6)
    x[8:16, 12:24] = 0.0  # whole chunks of zeros: with fill value 0 they are not stored
    kwargs = {
        "shape": x.shape,
        "dtype": ">f8" if zarr_format == 2 else "f8",
        "chunks": (4, 6),
        "zarr_format": zarr_format,
        "fill_value": 0.0,
        **extra,
    }
    array = zarr.create_array(store=str(tmp_path / "a.zarr"), **kwargs)
    array[...] = x
    array = _stored(tmp_path / "a.zarr")
    # The case is read by the path it is meant to test: chunkio's, or zarr's public API.
    assert array.io_path == ("direct" if direct else "zarr"), array.why_not_direct
    reused = chunkio.Scratch()  # one task's buffers, reused by every read below

    @settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])  # a few per case
    @given(st.integers(0, 28), st.integers(1, 29), st.integers(0, 34), st.integers(1, 35), st.booleans())
    def check(r0: int, nr: int, c0: int, nc: int, reuse: bool) -> None:
        sel = (slice(r0, min(29, r0 + nr)), slice(c0, min(35, c0 + nc)))
        got = blocks.read_block(array, sel, reused if reuse else None)
        want = array.array[sel]
        assert got.shape == want.shape
        native = want.dtype.newbyteorder("=")
        assert got.dtype.newbyteorder("=") == native  # the byte order may be the stored one
        assert got.astype(native).tobytes() == np.ascontiguousarray(want, dtype=native).tobytes()

    check()
    aligned = blocks.read_block(array, (slice(4, 8), slice(6, 12)), reused)  # exactly one stored chunk
    assert np.array_equal(aligned, array.array[4:8, 6:12], equal_nan=True)


@pytest.mark.parametrize("compressor", outputs.COMPRESSORS)
@pytest.mark.parametrize("dtype", ["int8", "float32"])
def test_write_block_writes_the_chunk_files_zarr_writes(tmp_path: Path, compressor: str, dtype: str) -> None:
    """Block by block, edges and multi-chunk blocks included: the same files, byte for byte."""
    from relu_dask import chunkio

    x = np.random.default_rng(4).integers(-3, 4, (10, 7)).astype(dtype)
    x[:4, :3] = 0  # a chunk that is all fill value: not stored, as zarr does not
    arrays = []
    for name in ("by-zarr.zarr", "by-relu-dask.zarr"):
        created = zarr.create_array(
            store=str(tmp_path / name),
            shape=x.shape,
            chunks=(4, 3),
            dtype=dtype,
            fill_value=0,
            compressors=outputs._compressors(compressor),
        )
        arrays.append(created)
    arrays[0][...] = x
    mine = storage.open_mask_array(parse_location(tmp_path / "by-relu-dask.zarr"), "")
    assert mine.io_path == "direct", mine.why_not_direct
    scratch = chunkio.Scratch()
    for sel in [(slice(0, 8), slice(0, 6)), (slice(8, 10), slice(0, 7)), (slice(0, 8), slice(6, 7))]:
        blocks.write_block(mine, sel, x[sel], scratch)
    files = [
        sorted(p.relative_to(tmp_path / n) for p in (tmp_path / n / "c").rglob("*") if p.is_file())
        for n in ("by-zarr.zarr", "by-relu-dask.zarr")
    ]
    assert files[0] == files[1] and len(files[0]) == 8
    for f in files[0]:
        assert (tmp_path / "by-zarr.zarr" / f).read_bytes() == (tmp_path / "by-relu-dask.zarr" / f).read_bytes()
    # A chunk rewritten as all fill value is removed, as zarr removes it (a resumed block).
    blocks.write_block(mine, (slice(0, 8), slice(0, 6)), np.zeros((8, 6), dtype), scratch)
    assert not (tmp_path / "by-relu-dask.zarr" / "c" / "1" / "1").exists()
    assert np.array_equal(zarr.open_array(str(tmp_path / "by-relu-dask.zarr"))[:8, :6], np.zeros((8, 6), dtype))


def test_write_block_leaves_a_cut_chunk_and_a_sharded_array_to_zarr(tmp_path: Path) -> None:
    from relu_dask import chunkio

    x = np.arange(64, dtype=np.int8).reshape(8, 8)
    plain = zarr.create_array(store=str(tmp_path / "plain.zarr"), shape=(8, 8), chunks=(4, 4), dtype="i1")
    plain[...] = x
    stored = storage.open_mask_array(parse_location(tmp_path / "plain.zarr"), "")
    blocks.write_block(stored, (slice(2, 6), slice(0, 8)), -x[2:6], chunkio.Scratch())  # cuts chunks: zarr merges
    want = x.copy()
    want[2:6] = -x[2:6]
    assert np.array_equal(plain[...], want)
    sharded = zarr.create_array(store=str(tmp_path / "s.zarr"), shape=(8, 8), chunks=(2, 2), shards=(4, 4), dtype="i1")
    stored = storage.open_mask_array(parse_location(tmp_path / "s.zarr"), "")
    assert stored.io_path == "zarr" and "sharding_indexed" in stored.why_not_direct
    blocks.write_block(stored, (slice(0, 8), slice(0, 8)), x, chunkio.Scratch())
    assert np.array_equal(sharded[...], x)


@pytest.mark.parametrize("compressors", [None, "auto", [_BLOSC]], ids=["raw", "zstd", "blosc"])
def test_read_block_refuses_a_chunk_file_of_the_wrong_size_as_zarr_does(tmp_path: Path, compressors) -> None:  # type: ignore[no-untyped-def]
    """A chunk file holding fewer bytes than a chunk is an error, never a half-filled block."""
    store = str(tmp_path / "a.zarr")
    array = zarr.create_array(store=store, shape=(8, 8), chunks=(4, 4), dtype="f8", compressors=compressors)
    array[...] = np.arange(64.0).reshape(8, 8)
    short = np.arange(8.0)  # half a chunk, encoded as the array encodes
    chunk_file = tmp_path / "a.zarr" / "c" / "1" / "0"
    if compressors is None:
        chunk_file.write_bytes(short.tobytes())
    elif compressors == "auto":
        from numcodecs import Zstd

        chunk_file.write_bytes(Zstd().encode(short))
    else:
        from numcodecs import Blosc

        chunk_file.write_bytes(Blosc("lz4", 5, Blosc.SHUFFLE).encode(short))
    array = _stored(tmp_path / "a.zarr")
    assert array.io_path == "direct", array.why_not_direct
    with pytest.raises(Exception) as zarrs_error:
        array.array[4:8, 0:4]
    with pytest.raises(DamagedSourceError, match="restore or rewrite that chunk") as ours:
        blocks.read_block(array, (slice(4, 8), slice(0, 4)))
    assert str(chunk_file) in str(ours.value)  # named, with zarr's own error as the cause
    assert isinstance(ours.value.__cause__, type(zarrs_error.value))
    assert np.array_equal(blocks.read_block(array, (slice(0, 4), slice(0, 8))), np.arange(32.0).reshape(4, 8))


def test_opening_an_array_where_there_is_a_group_or_nothing(tmp_path: Path) -> None:
    """zarr.open gives an Array or a Group: only an Array is opened as one; a group says so."""
    x = activations((6, 5))
    write_zarr(tmp_path / "g.zarr", x, (3, 5), name="inner/fc1")
    write_zarr(tmp_path / "a.zarr", x, (3, 5))
    group, single = parse_location(tmp_path / "g.zarr"), parse_location(tmp_path / "a.zarr")
    opened = storage.open_array(group, "inner/fc1")
    assert isinstance(opened, zarr.Array) and np.array_equal(opened[...], x, equal_nan=True)
    assert isinstance(storage.open_mask_array(group, "inner/fc1", writable=False).array, zarr.Array)
    assert storage.has_array(group, "inner/fc1") and storage.has_array(single, "")
    assert not storage.has_array(group, "inner") and not storage.has_array(group, "")
    assert not storage.has_array(group, "missing") and not storage.has_array(single, "fc1")
    for open_one in (storage.open_array, storage.open_mask_array):
        with pytest.raises(InputError, match="inner is a Zarr group, not an array"):
            open_one(group, "inner")
        with pytest.raises(KeyError):
            open_one(single, "fc1")  # an array has no members
    assert isinstance(outputs.create_dest_group(parse_location(tmp_path / "d.zarr"), {"k": 1}), zarr.Group)


def test_a_fingerprint_looks_at_each_chunk_object_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a small grid the evenly spread samples are among the last row's chunks (the edge
    that tells a growth): each object is looked at once (on an object store, a HEAD each),
    and both lists say what is stored."""
    from relu_dask import fingerprint

    path = tmp_path / "acts.zarr"
    z = zarr.create_array(path, shape=(16, 32), chunks=(8, 8), dtype="float32")  # a 2 x 4 grid
    z[...] = activations((16, 32), "float32", seed=5)
    (src,) = storage.open_source(parse_location(path)).arrays
    asked: list[str] = []
    stat_chunks = fingerprint.stat_chunks

    def counted(src: storage.SourceArray, keys: list[str]) -> list[list[object]]:
        asked.extend(keys)
        return stat_chunks(src, keys)

    monkeypatch.setattr(fingerprint, "stat_chunks", counted)
    found = fingerprint.fingerprint_array(src, append_axis=0)
    assert sorted(asked) == sorted(set(asked)) == [f"c/{i}/{j}" for i in range(2) for j in range(4)], asked
    samples, edge = found["chunk_samples"], found.get("edge_samples")
    assert [key for key, *_ in edge or []] == ["c/1/0", "c/1/1", "c/1/2", "c/1/3"]
    assert len(samples) == 8
    for key, size, mtime in [*samples, *(edge or [])]:
        st = (path / key).stat()
        assert (size, mtime) == (st.st_size, st.st_mtime), key
