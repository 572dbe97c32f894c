"""chunkfiles: the Zarr specs' view of an array's chunk files, and the path each array takes.

The fast path must not turn off without a test failing: every array below is written by the
libraries installed now (whatever zarr, xarray and tensorstore pip gave this Python), and the
ones the direct path is meant to handle must be read directly, with zarr's bits.
"""

from __future__ import annotations

import ast
import json
import subprocess
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from _support import PYTHON, activations, cli_env, oracle, read_mask, write_zarr

import relu_dask
from relu_dask import blocks, chunkio, storage
from relu_dask.chunkfiles import (
    ChunkFiles,
    NotDirect,
    chunk_key_encoding,
    describe_chunk_files,
    format_chunk_key,
    listing_cuts,
)
from relu_dask.locations import parse_location


def _stored(path: Path, name: str = "") -> blocks.StoredArray:
    arrays = storage.open_source(parse_location(path)).arrays
    (src,) = [a for a in arrays if a.path == name]
    assert src.stored is not None
    return src.stored


def _same_bits(got: np.ndarray, want: np.ndarray) -> bool:
    native = want.dtype.newbyteorder("=")
    return got.shape == want.shape and got.astype(native).tobytes() == np.ascontiguousarray(want, native).tobytes()


_GZIP = {"name": "gzip", "configuration": {"level": 1}}
_BLOSC = {"name": "blosc", "configuration": {"cname": "zstd", "clevel": 3, "shuffle": "bitshuffle", "typesize": 4}}

# (id, create_array keywords, the path the array must take, a word of the reason when zarr)
ZARR_WRITTEN = [
    ("v3-default", {}, "direct", ""),
    ("v3-raw", {"compressors": None}, "direct", ""),
    ("v3-blosc", {"compressors": [_BLOSC]}, "direct", ""),
    ("v3-big-endian", {"serializer": {"name": "bytes", "configuration": {"endian": "big"}}}, "direct", ""),
    ("v3-dot-keys", {"chunk_key_encoding": {"name": "default", "separator": "."}}, "direct", ""),
    ("v3-v2-keys", {"chunk_key_encoding": {"name": "v2", "separator": "."}}, "direct", ""),
    ("v3-nan-fill", {"fill_value": float("nan")}, "direct", ""),
    ("v3-gzip", {"compressors": [_GZIP]}, "zarr", "gzip"),
    ("v3-sharded", {"shards": (8, 12)}, "zarr", "sharding_indexed"),
    ("v3-crc32c", {"compressors": [{"name": "crc32c"}]}, "zarr", "crc32c"),
    ("v2-default", {"zarr_format": 2}, "direct", ""),
    ("v2-F-order", {"zarr_format": 2, "order": "F"}, "direct", ""),
    ("v2-raw", {"zarr_format": 2, "compressors": None}, "direct", ""),
    ("v2-blosc", {"zarr_format": 2, "compressors": {"id": "blosc", "cname": "lz4", "shuffle": 1}}, "direct", ""),
    ("v2-slash-keys", {"zarr_format": 2, "chunk_key_encoding": {"name": "v2", "separator": "/"}}, "direct", ""),
    ("v2-nan-fill", {"zarr_format": 2, "fill_value": float("nan")}, "direct", ""),
    ("v2-gzip", {"zarr_format": 2, "compressors": {"id": "gzip", "level": 1}}, "zarr", "gzip"),
]


@pytest.mark.parametrize(("kwargs", "path", "why"), [c[1:] for c in ZARR_WRITTEN], ids=[c[0] for c in ZARR_WRITTEN])
@pytest.mark.parametrize("dtype", ["float32", ">f8", "int16"])
def test_arrays_zarr_writes_take_the_path_they_should_with_zarrs_bits(
    tmp_path: Path, kwargs: dict[str, Any], path: str, why: str, dtype: str
) -> None:
    x = activations((29, 35), "float64", seed=3)
    x[8:16, 12:24] = 0.0  # whole chunks equal to the default fill value: not stored
    data = np.nan_to_num(x * 100, posinf=0, neginf=0).astype(dtype) if dtype == "int16" else x.astype(dtype)
    if dtype == "int16" and "fill_value" in kwargs:
        pytest.skip("a NaN fill value needs a float dtype")
    if dtype == ">f8" and kwargs.get("zarr_format") != 2:
        data = data.astype("f8")  # v3 keeps the byte order in the bytes codec, not in the dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr's warnings about v2 and unstable specs, while making test data
        array = zarr.create_array(
            store=str(tmp_path / "a.zarr"), shape=x.shape, dtype=data.dtype, chunks=(4, 6), **kwargs
        )
    array[...] = data
    stored = _stored(tmp_path / "a.zarr")
    assert stored.io_path == path, stored.why_not_direct
    assert why in stored.why_not_direct
    got = blocks.read_block(stored, (slice(0, 29), slice(0, 35)), chunkio.Scratch())
    assert _same_bits(got, np.asarray(zarr.open_array(str(tmp_path / "a.zarr"), mode="r")[...]))


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_xarray_datasets_are_read_directly(tmp_path: Path, zarr_format: int) -> None:
    xr = pytest.importorskip("xarray")
    acts = activations((20, 12), "float32")
    ds = xr.Dataset({"fc1": (("step", "unit"), acts)}, coords={"step": np.arange(20)}).chunk({"step": 8})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.to_zarr(tmp_path / "xr.zarr", zarr_format=zarr_format, consolidated=True)
    stored = _stored(tmp_path / "xr.zarr", "fc1")
    assert stored.io_path == "direct", stored.why_not_direct
    assert _same_bits(blocks.read_block(stored, (slice(0, 20), slice(0, 12))), acts)


@pytest.mark.parametrize(
    ("driver", "sharded", "path"),
    [("zarr", False, "direct"), ("zarr3", False, "direct"), ("zarr3", True, "zarr")],
    ids=["v2", "v3", "v3-sharded"],
)
def test_tensorstore_arrays_take_the_path_they_should(tmp_path: Path, driver: str, sharded: bool, path: str) -> None:
    ts = pytest.importorskip("tensorstore")
    x = activations((40, 30), "float64")
    metadata: dict[str, Any] = {"shape": [40, 30]}
    if driver == "zarr":
        metadata.update(chunks=[16, 16], dtype="<f8")
    else:
        metadata.update(data_type="float64")
        if sharded:
            metadata["chunk_grid"] = {"name": "regular", "configuration": {"chunk_shape": [32, 32]}}
            metadata["codecs"] = [
                {"name": "sharding_indexed", "configuration": {"chunk_shape": [8, 8], "codecs": [{"name": "bytes"}]}}
            ]
        else:
            metadata["chunk_grid"] = {"name": "regular", "configuration": {"chunk_shape": [16, 16]}}
    spec = {"driver": driver, "kvstore": {"driver": "file", "path": str(tmp_path / "ts.zarr")}, "metadata": metadata}
    ts.open(spec, create=True).result().write(x).result()
    stored = _stored(tmp_path / "ts.zarr")
    assert stored.io_path == path, stored.why_not_direct
    assert _same_bits(blocks.read_block(stored, (slice(3, 40), slice(0, 29)), chunkio.Scratch()), x[3:40, :29])


@pytest.mark.parametrize("fill", [0.0, float("nan"), 2.5, -1.0, float("inf")], ids=["0", "nan", "2.5", "-1", "inf"])
@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("codec", ["direct", "zarr"])
def test_unstored_chunks_read_as_the_fill_value_on_both_paths(
    tmp_path: Path, fill: float, zarr_format: int, codec: str
) -> None:
    compressors: Any = None
    if codec == "zarr":
        compressors = {"id": "gzip", "level": 1} if zarr_format == 2 else [_GZIP]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        array = zarr.create_array(
            store=str(tmp_path / "a.zarr"),
            shape=(10, 9),
            chunks=(4, 4),
            dtype="float32",
            fill_value=fill,
            zarr_format=zarr_format,
            compressors=compressors,
        )
    array[0:4, 0:4] = 1.5  # one chunk stored; the others never written
    stored = _stored(tmp_path / "a.zarr")
    assert stored.io_path == codec, stored.why_not_direct
    want = np.full((10, 9), fill, dtype="float32")
    want[0:4, 0:4] = 1.5
    for sel in [(slice(0, 10), slice(0, 9)), (slice(4, 8), slice(4, 8)), (slice(5, 10), slice(2, 9))]:
        assert _same_bits(blocks.read_block(stored, sel, chunkio.Scratch()), want[sel])


def _v3(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [10, 9],
        "data_type": "float32",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [4, 4]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0.0,
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
    }
    doc.update(overrides)
    return doc


def _v2(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "zarr_format": 2,
        "shape": [10, 9],
        "chunks": [4, 4],
        "dtype": "<f4",
        "compressor": None,
        "fill_value": 0.0,
        "order": "C",
        "filters": None,
    }
    doc.update(overrides)
    return doc


@pytest.mark.parametrize(
    ("doc", "fill_bits"),
    [
        (_v3(fill_value="NaN"), np.float32(np.nan).tobytes()),
        (_v3(fill_value="Infinity"), np.float32(np.inf).tobytes()),
        (_v3(fill_value="-Infinity"), np.float32(-np.inf).tobytes()),
        (_v3(fill_value="0x7fc00001"), bytes.fromhex("0100c07f")),  # a NaN payload, kept bit for bit
        (_v3(fill_value="0xbf800000"), np.float32(-1.0).tobytes()),
        (_v3(fill_value=-0.0), np.float32(-0.0).tobytes()),
        (_v3(fill_value=3), np.float32(3.0).tobytes()),
        (_v3(data_type="float16", fill_value="0x7e00"), np.float32(np.float16(np.nan)).tobytes()),
        (_v3(data_type="float16", fill_value="0x3c00"), np.float32(1.0).tobytes()),
        (_v3(data_type="float64", fill_value="0x3ff0000000000000"), np.float32(1.0).tobytes()),
        (_v2(fill_value="NaN"), np.float32(np.nan).tobytes()),
        (_v2(fill_value=None), np.float32(0.0).tobytes()),
        (_v2(fill_value=-2.5), np.float32(-2.5).tobytes()),
    ],
    ids=[
        *("nan", "inf", "-inf", "hex-nan", "hex-neg-one", "neg-zero", "int"),
        *("f16-hex-nan", "f16-hex-one", "f64-hex-one", "v2-nan", "v2-null", "v2-number"),
    ],
)
def test_fill_values_as_the_specs_spell_them(doc: dict[str, Any], fill_bits: bytes) -> None:
    files = describe_chunk_files(Path("a"), doc)
    assert isinstance(files, ChunkFiles)
    assert np.asarray(files.fill_value, dtype=np.float32).tobytes() == fill_bits


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        (_v3(data_type="bool"), "data type 'bool'"),
        (_v3(data_type={"name": "numpy.datetime64", "configuration": {}}), "data type"),
        (_v3(chunk_grid={"name": "rectilinear", "configuration": {}}), "chunk grid 'rectilinear'"),
        (_v3(codecs=[{"name": "transpose", "configuration": {"order": [1, 0]}}, {"name": "bytes"}]), "transpose"),
        (_v3(codecs=[{"name": "bytes"}]), "endian None"),
        (_v3(storage_transformers=[{"name": "x"}]), "storage transformers"),
        (_v3(chunk_key_encoding={"name": "custom"}), "chunk key encoding"),
        (_v3(node_type="group"), "not an array"),
        (_v3(fill_value=[1, 2]), "metadata not understood"),
        (_v2(dtype="|b1"), "data type '|b1'"),
        (_v2(dtype=[["a", "<f4"]]), "structured"),
        (_v2(filters=[{"id": "delta", "dtype": "<f4"}]), "filters delta"),
        (_v2(compressor={"id": "lz4"}), "compressor 'lz4'"),
        (_v2(dimension_separator="-"), "dimension separator '-'"),
        ({"zarr_format": 4}, "zarr_format 4"),
    ],
)
def test_what_is_left_to_zarr_says_why(doc: dict[str, Any], reason: str) -> None:
    described = describe_chunk_files(Path("a"), doc)
    assert isinstance(described, NotDirect)
    assert reason in described.reason


def test_a_single_byte_type_needs_no_endian() -> None:
    files = describe_chunk_files(Path("a"), _v3(data_type="int8", fill_value=0, codecs=["bytes"]))
    assert isinstance(files, ChunkFiles) and files.format.dtype == np.int8


@pytest.mark.parametrize(
    ("doc", "coords", "key"),
    [
        (_v3(), (1, 2), "c/1/2"),
        (_v3(chunk_key_encoding={"name": "default", "configuration": {"separator": "."}}), (1, 2), "c.1.2"),
        (_v3(chunk_key_encoding={"name": "v2", "configuration": {"separator": "."}}), (1, 2), "1.2"),
        (_v3(chunk_key_encoding={"name": "v2", "configuration": {"separator": "/"}}), (1, 2), "1/2"),
        (_v3(chunk_key_encoding={"name": "default"}), (), "c"),
        (_v2(), (1, 2), "1.2"),
        (_v2(dimension_separator="/"), (1, 2), "1/2"),
        (_v2(), (), "0"),
    ],
)
def test_chunk_keys_as_the_specs_spell_them(doc: dict[str, Any], coords: tuple[int, ...], key: str) -> None:
    keys = chunk_key_encoding(doc)
    assert keys is not None
    assert format_chunk_key(coords, *keys) == key


def test_the_described_files_are_where_zarr_put_them(tmp_path: Path) -> None:
    array = zarr.create_array(store=str(tmp_path / "a.zarr"), shape=(8, 8), chunks=(4, 4), dtype="f4")
    array[...] = 1.0
    doc = json.loads((tmp_path / "a.zarr" / "zarr.json").read_text())
    files = describe_chunk_files(tmp_path / "a.zarr", doc)
    assert isinstance(files, ChunkFiles)
    assert all(files.path((i, j)).is_file() for i in range(2) for j in range(2))


def _dotted(node: ast.AST) -> list[str]:
    """``zarr.core.sync`` as ["zarr", "core", "sync"]; [] for anything but names and attributes."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.insert(0, node.attr)
        node = node.value
    return [node.id, *parts] if isinstance(node, ast.Name) else []


def _private_zarr(parts: list[str]) -> bool:
    """Whether a dotted name reaches into zarr's private parts: ``zarr.core`` or an underscore name."""
    return parts[:1] == ["zarr"] and any(p == "core" or (p.startswith("_") and not p.startswith("__")) for p in parts)


def _internals_reached(tree: ast.AST, ours: set[str], where: str) -> list[str]:
    """Every place in ``tree`` that reaches zarr's internals: an import of ``zarr.core`` or a
    private zarr module, a ``zarr.core.x`` chain, an underscore attribute that is not one of
    ``ours`` (by name or by ``getattr``/``hasattr``)."""
    found = []
    for node in ast.walk(tree):
        modules = []
        if isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        found += [f"{where}:{node.lineno}: imports {m}" for m in modules if _private_zarr(m.split("."))]
        if isinstance(node, ast.Attribute):
            if _private_zarr(_dotted(node)):
                found.append(f"{where}:{node.lineno}: {'.'.join(_dotted(node))}")
            elif node.attr.startswith("_") and not node.attr.startswith("__") and node.attr not in ours:
                found.append(f"{where}:{node.lineno}: .{node.attr}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
            literal = node.args[1] if len(node.args) > 1 else None
            if isinstance(literal, ast.Constant) and str(literal.value).startswith("_"):
                found.append(f"{where}:{node.lineno}: {node.func.id}(..., {literal.value!r})")
    return found


def test_relu_dask_stands_on_no_zarr_internals() -> None:
    """No module of relu_dask reaches zarr's internals (see :func:`_internals_reached`)."""
    package = Path(relu_dask.__file__).parent
    trees = {path.name: ast.parse(path.read_text()) for path in sorted(package.glob("*.py"))}
    ours: set[str] = set()  # every private name relu_dask defines: its own, free to use
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                ours.add(node.name)
            elif isinstance(node, ast.Name | ast.arg):
                ours.add(node.id if isinstance(node, ast.Name) else node.arg)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                ours.add(node.attr)
    found = [hit for name, tree in trees.items() for hit in _internals_reached(tree, ours, name)]
    assert not found, found


@pytest.mark.parametrize(
    ("source", "caught"),
    [
        ("from zarr.core.sync import sync", True),
        ("import zarr.storage._local", True),
        ("from zarr.codecs import _v2", True),
        ("x = zarr.core.buffer.default_buffer_prototype()", True),
        ("x = array._async_array", True),
        ("x = getattr(array, '_async_array')", True),
        ("x = hasattr(array, '_async_array')", True),
        ("x = self._buffers", False),  # relu_dask's own private attribute
        ("x = zarr.open_array(path).fill_value", False),
        ("from zarr.codecs import BloscCodec", False),
    ],
)
def test_the_internals_check_catches_each_form(source: str, caught: bool) -> None:
    """The very check above, on one line each: it fails on every way of reaching zarr's internals."""
    assert bool(_internals_reached(ast.parse(source), {"_buffers"}, "x.py")) == caught


_DEBUG_RUN = ("--scheduler", "synchronous", "--debug", "--report")


def test_the_path_each_array_took_is_in_the_report_the_summary_and_the_debug_log(tmp_path: Path) -> None:
    x = activations((40, 30), "float32", seed=7)
    write_zarr(tmp_path / "g.zarr", x, (8, 10), name="plain")
    write_zarr(tmp_path / "g.zarr", x, (4, 5), shards=(8, 10), name="sharded")
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "relu_dask",
            "run",
            str(tmp_path / "g.zarr"),
            str(tmp_path / "out.zarr"),
            *_DEBUG_RUN,
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    arrays = {a["path"]: a for a in json.loads((tmp_path / "r.json").read_text())["arrays"]}
    assert (arrays["plain"]["read_path"], arrays["plain"]["read_path_reason"]) == ("direct", "")
    assert arrays["sharded"]["read_path"] == "zarr" and "sharding_indexed" in arrays["sharded"]["read_path_reason"]
    # DEST keeps the source's shards: written through zarr too, and the report says so
    assert arrays["sharded"]["write_path"] == "zarr" and arrays["plain"]["write_path"] == "direct"
    assert "plain: read direct, written direct" in proc.stderr
    assert "sharded: read zarr (codecs sharding_indexed" in proc.stderr
    assert "    read through zarr, not directly: codecs sharding_indexed" in proc.stdout
    for name in ("plain", "sharded"):
        assert np.array_equal(read_mask(tmp_path / "out.zarr", name), oracle(x))


def test_xarray_consolidated_v2_and_tensorstore_sharded_v3_give_numpys_masks(tmp_path: Path) -> None:
    xr = pytest.importorskip("xarray")
    ts = pytest.importorskip("tensorstore")
    acts = activations((30, 20), "float64", seed=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        xr.Dataset({"fc1": (("step", "unit"), acts)}).chunk({"step": 8}).to_zarr(
            tmp_path / "xr.zarr", zarr_format=2, consolidated=True
        )
    relu_dask.run(tmp_path / "xr.zarr", tmp_path / "xr-masks.zarr")
    assert np.array_equal(read_mask(tmp_path / "xr-masks.zarr", "fc1"), oracle(acts))
    metadata = {
        "shape": [30, 20],
        "data_type": "float64",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [16, 16]}},
        "codecs": [
            {"name": "sharding_indexed", "configuration": {"chunk_shape": [4, 8], "codecs": [{"name": "bytes"}]}}
        ],
    }
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "ts.zarr")}, "metadata": metadata}
    ts.open(spec, create=True).result().write(acts).result()
    relu_dask.run(tmp_path / "ts.zarr", tmp_path / "ts-masks.zarr")
    assert np.array_equal(read_mask(tmp_path / "ts-masks.zarr"), oracle(acts))


@pytest.mark.parametrize(
    ("shape", "objects"), [((300, 5), (1, 1)), ((2500,), (2,)), ((64, 64, 3), (1, 4, 3)), ((5, 5), (1, 1))]
)
def test_listing_cuts_split_a_grid_into_even_ranges_of_whole_rows(
    shape: tuple[int, ...], objects: tuple[int, ...]
) -> None:
    """Each range between two cuts holds whole rows of the grid, at most about ``per_range``
    objects, in the order a bucket lists keys; a grid one page lists is not cut."""
    import bisect
    import itertools

    grid = [range(-(-n // c)) for n, c in zip(shape, objects)]
    keys = sorted(format_chunk_key(coords, "c", "/") for coords in itertools.product(*grid))
    cuts = listing_cuts(shape, objects, per_range=50)
    if len(keys) <= 50:
        assert cuts == []
        return
    assert cuts == sorted(cuts) and len(cuts) >= len(keys) // 50 - 1
    ranges = [bisect.bisect_left(cuts, key) for key in keys]  # the range of each key: after cut i-1, up to cut i
    sizes = [ranges.count(r) for r in range(len(cuts) + 1)]
    per_row = len(keys) // len(grid[0])
    assert all(0 < size <= 50 + per_row for size in sizes), sizes
    rows = {key.split("/")[1]: ranges[i] for i, key in enumerate(keys)}
    assert all(ranges[i] == rows[key.split("/")[1]] for i, key in enumerate(keys))  # no row split
