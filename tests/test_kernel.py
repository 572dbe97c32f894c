"""Tests of :mod:`relu_dask.kernel`: the block kernel, its dtype gate and its thread control.

The oracle is numpy, ``(x >= 0)`` or ``(x > 0)`` as int8, compared bit for bit. Edge values
carry their expected mask written out in the table as well, so a wrong oracle cannot hide a
wrong kernel. Every engine is run: ``"numpy"``, ``"numexpr"`` and ``"auto"`` both below and at
:data:`~relu_dask.kernel.NUMEXPR_MIN_THREADS` threads (where it resolves to numexpr).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import hypothesis.extra.numpy as hnp
import numexpr
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relu_dask import kernel
from relu_dask.errors import InputError, UnsupportedDtypeError
from relu_dask.kernel import (
    NUMEXPR_MIN_THREADS,
    check_dtype,
    choose_engine,
    numexpr_threads_for,
    parse_at_zero,
    relu_derivative,
    rule_for,
    set_numexpr_threads,
)


def oracle(x: np.ndarray, at_zero: int) -> np.ndarray:
    """The mask every result is compared with, bit for bit."""
    return ((x >= 0) if at_zero == 1 else (x > 0)).astype(np.int8)


@contextmanager
def numexpr_threads(num_threads: int | None) -> Iterator[None]:
    """Run the body with numexpr at ``num_threads`` threads (None: unchanged), then restore."""
    if num_threads is None:
        yield
        return
    previous = set_numexpr_threads(num_threads)
    try:
        yield
    finally:
        set_numexpr_threads(previous)


# (engine, numexpr threads while running); "auto" is run on both sides of the threshold.
ENGINE_CASES = [
    pytest.param("numpy", None, id="numpy"),
    pytest.param("numexpr", None, id="numexpr"),
    pytest.param("auto", 1, id="auto-1thread"),
    pytest.param("auto", NUMEXPR_MIN_THREADS, id=f"auto-{NUMEXPR_MIN_THREADS}threads"),
]
ENGINE_PAIRS = [("numpy", None), ("numexpr", None), ("auto", 1), ("auto", NUMEXPR_MIN_THREADS)]
AT_ZERO = [pytest.param(1, id="ge"), pytest.param(0, id="gt")]


def run_kernel(x: np.ndarray, at_zero: int, engine: str, threads: int | None, **kwargs: Any) -> np.ndarray:
    with numexpr_threads(threads):
        return relu_derivative(x, at_zero=at_zero, engine=engine, **kwargs)  # type: ignore[arg-type]


def assert_mask(result: np.ndarray, expected: np.ndarray, context: str = "") -> None:
    assert isinstance(result, np.ndarray), context
    assert result.dtype == np.int8, context
    assert result.shape == expected.shape, context
    assert np.array_equal(result, expected), f"{context}: got {result!r}, expected {expected!r}"


# --------------------------------------------------------------------------------------
# Edge values of float16/32/64, expected masks written out
# --------------------------------------------------------------------------------------

FLOATS = [np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)]
_UINT_OF = {2: np.uint16, 4: np.uint32, 8: np.uint64}

# NaN bit patterns: a quiet NaN with a payload (both signs) and a signalling NaN.
_QNAN_PAYLOAD = {2: 0x7E2A, 4: 0x7FC0_0ABC, 8: 0x7FF8_0000_0000_0ABC}
_NEG_QNAN_PAYLOAD = {2: 0xFE2A, 4: 0xFFC0_0ABC, 8: 0xFFF8_0000_0000_0ABC}
_SNAN = {2: 0x7C01, 4: 0x7F80_0001, 8: 0x7FF0_0000_0000_0001}


def _from_bits(bits: dict[int, int]) -> Callable[[np.dtype], np.ndarray]:
    def make(dt: np.dtype) -> np.ndarray:
        x = np.array([bits[dt.itemsize]], dtype=_UINT_OF[dt.itemsize]).view(dt)
        assert np.isnan(x[0]) and int(x.view(_UINT_OF[dt.itemsize])[0]) == bits[dt.itemsize]
        return x

    return make


def _value(f: Callable[[np.finfo], Any]) -> Callable[[np.dtype], np.ndarray]:
    return lambda dt: np.array([f(np.finfo(dt))], dtype=dt)


# id, make(dtype) -> 1-element array, mask with at_zero=1 (x >= 0), mask with at_zero=0 (x > 0)
EDGE_VALUES: list[tuple[str, Callable[[np.dtype], np.ndarray], int, int]] = [
    ("nan", _value(lambda fi: np.nan), 0, 0),
    ("-nan", _value(lambda fi: np.copysign(np.nan, -1.0)), 0, 0),
    ("nan-payload", _from_bits(_QNAN_PAYLOAD), 0, 0),
    ("-nan-payload", _from_bits(_NEG_QNAN_PAYLOAD), 0, 0),
    ("signalling-nan", _from_bits(_SNAN), 0, 0),
    ("-0.0", _value(lambda fi: -0.0), 1, 0),
    ("+0.0", _value(lambda fi: 0.0), 1, 0),
    ("+inf", _value(lambda fi: np.inf), 1, 1),
    ("-inf", _value(lambda fi: -np.inf), 0, 0),
    ("max", _value(lambda fi: fi.max), 1, 1),
    ("-max", _value(lambda fi: -fi.max), 0, 0),
    ("smallest-subnormal", _value(lambda fi: fi.smallest_subnormal), 1, 1),
    ("-smallest-subnormal", _value(lambda fi: -fi.smallest_subnormal), 0, 0),
    ("largest-subnormal", _value(lambda fi: fi.smallest_normal - fi.smallest_subnormal), 1, 1),
    ("-largest-subnormal", _value(lambda fi: -(fi.smallest_normal - fi.smallest_subnormal)), 0, 0),
    ("smallest-normal", _value(lambda fi: fi.smallest_normal), 1, 1),
    ("-smallest-normal", _value(lambda fi: -fi.smallest_normal), 0, 0),
    ("epsneg-below-1", _value(lambda fi: 1 - fi.epsneg), 1, 1),
    ("-1", _value(lambda fi: -1.0), 0, 0),
    ("1", _value(lambda fi: 1.0), 1, 1),
]


@pytest.mark.parametrize(("engine", "threads"), ENGINE_CASES)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize(("make", "ge", "gt"), [e[1:] for e in EDGE_VALUES], ids=[e[0] for e in EDGE_VALUES])
def test_edge_value(
    make: Callable[[np.dtype], np.ndarray], ge: int, gt: int, dtype: np.dtype, engine: str, threads: int | None
) -> None:
    x = make(dtype)
    assert x.dtype == dtype and x.shape == (1,)
    for at_zero, expected in ((1, ge), (0, gt)):
        want = np.array([expected], dtype=np.int8)
        assert np.array_equal(oracle(x, at_zero), want), "the table disagrees with numpy"
        assert_mask(run_kernel(x, at_zero, engine, threads), want)


def _edge_vector(dtype: np.dtype, repeat: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.concatenate([make(dtype) for _, make, _, _ in EDGE_VALUES])
    ge = np.array([e[2] for e in EDGE_VALUES], dtype=np.int8)
    gt = np.array([e[3] for e in EDGE_VALUES], dtype=np.int8)
    return np.tile(x, repeat), np.tile(ge, repeat), np.tile(gt, repeat)


@pytest.mark.parametrize(("engine", "threads"), ENGINE_CASES)
@pytest.mark.parametrize("dtype", [*FLOATS, np.dtype(">f8"), np.dtype(">f4")], ids=str)
def test_edge_values_in_long_blocks(dtype: np.dtype, engine: str, threads: int | None) -> None:
    """Edge values spread over blocks long enough for the vectorised loops, in several layouts."""
    x, ge, gt = _edge_vector(np.dtype(dtype.newbyteorder("=")), repeat=31)
    x = x.astype(dtype)
    n = len(EDGE_VALUES)
    layouts = {
        "1-d": (x, ge, gt),
        "2-d": (x.reshape(31, n), ge.reshape(31, n), gt.reshape(31, n)),
        "f-order": (np.asfortranarray(x.reshape(31, n)), ge.reshape(31, n), gt.reshape(31, n)),
        "reversed": (x[::-1], ge[::-1], gt[::-1]),
        "strided": (x[::3], ge[::3], gt[::3]),
    }
    for name, (block, want_ge, want_gt) in layouts.items():
        assert_mask(run_kernel(block, 1, engine, threads), want_ge, name)
        assert_mask(run_kernel(block, 0, engine, threads), want_gt, name)


# --------------------------------------------------------------------------------------
# Every real dtype
# --------------------------------------------------------------------------------------


def _int_case(dtype: Any) -> tuple[np.ndarray, list[int], list[int]]:
    info = np.iinfo(dtype)
    if info.min < 0:
        return (
            np.array([info.min, info.min + 1, -1, 0, 1, info.max], dtype=dtype),
            [0, 0, 0, 1, 1, 1],
            [0, 0, 0, 0, 1, 1],
        )
    above_signed = (info.max >> 1) + 1  # 2**(bits-1): would be negative if read as signed
    values = [0, 1, above_signed, above_signed + 1, info.max]
    return np.array(values, dtype=dtype), [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]


REAL_DTYPE_CASES = (
    [
        pytest.param(*_int_case(t), id=np.dtype(t).name)
        for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)
    ]
    + [
        pytest.param(
            np.array([-np.inf, -1.5, -0.0, 0.0, 0.25, np.inf, np.nan], dtype=t),
            [0, 0, 1, 1, 1, 1, 0],
            [0, 0, 0, 0, 1, 1, 0],
            id=str(np.dtype(t)),
        )
        for t in ("float16", "float32", "float64", ">f8", ">f4", "<f8", np.longdouble)
    ]
    + [
        pytest.param(np.array([-(2**62), -1, 0, 7], dtype=">i8"), [0, 0, 1, 1], [0, 0, 0, 1], id=">i8"),
        pytest.param(np.array([0, 2**63, 2**64 - 1], dtype=">u8"), [1, 1, 1], [0, 1, 1], id=">u8"),
    ]
)


@pytest.mark.parametrize(("engine", "threads"), ENGINE_CASES)
@pytest.mark.parametrize(("x", "ge", "gt"), REAL_DTYPE_CASES)
def test_every_real_dtype(x: np.ndarray, ge: list[int], gt: list[int], engine: str, threads: int | None) -> None:
    assert check_dtype(x.dtype) == x.dtype
    for at_zero, expected in ((1, ge), (0, gt)):
        want = np.array(expected, dtype=np.int8)
        assert np.array_equal(oracle(x, at_zero), want), "the table disagrees with numpy"
        assert_mask(run_kernel(x, at_zero, engine, threads), want)
        # and in a block long enough for the vectorised loops
        assert_mask(run_kernel(np.tile(x, 40), at_zero, engine, threads), np.tile(want, 40))


@pytest.mark.parametrize(("engine", "threads"), ENGINE_CASES)
def test_uint64_above_int64_max_is_positive(engine: str, threads: int | None) -> None:
    """numexpr would wrap these to negative int64; the kernel must not."""
    x = np.array([2**63, 2**63 + 1, 2**64 - 1, 3 * 2**62], dtype=np.uint64).reshape(2, 2)
    for at_zero in (0, 1):
        assert_mask(run_kernel(x, at_zero, engine, threads), np.ones((2, 2), dtype=np.int8))


# engine, dtype, numexpr threads, whether numexpr.evaluate may be called
ROUTING = [
    ("numexpr", "float64", None, True),
    ("numexpr", "float32", None, True),
    ("numexpr", "int32", None, True),
    ("numexpr", "int64", None, True),
    ("numexpr", "float16", None, False),
    ("numexpr", "uint64", None, False),
    ("numexpr", "uint32", None, False),
    ("numexpr", "int8", None, False),
    ("numexpr", ">f8", None, False),
    ("numpy", "float64", None, False),
    ("auto", "float64", 1, False),
    ("auto", "float64", NUMEXPR_MIN_THREADS - 1, False),
    ("auto", "float64", NUMEXPR_MIN_THREADS, True),
    ("auto", "float16", NUMEXPR_MIN_THREADS, False),
    ("auto", "uint64", NUMEXPR_MIN_THREADS, False),
]


@pytest.mark.parametrize(
    ("engine", "dtype", "threads", "uses_numexpr"), ROUTING, ids=[f"{e}-{d}-{t}" for e, d, t, _ in ROUTING]
)
def test_engine_routing(
    engine: str, dtype: str, threads: int | None, uses_numexpr: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """numexpr sees only the dtypes it handles natively, and "auto" only at enough threads."""
    calls: list[np.dtype] = []
    real_evaluate = numexpr.evaluate

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["local_dict"]["X"].dtype)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(numexpr, "evaluate", spy)
    x = np.array([-2, -1, 0, 1, 2], dtype=np.int64).astype(dtype)  # unsigned: -2, -1 wrap to huge
    expected = oracle(x, 1)
    assert_mask(run_kernel(x, 1, engine, threads), expected)
    assert bool(calls) == uses_numexpr


# --------------------------------------------------------------------------------------
# Refused dtypes
# --------------------------------------------------------------------------------------

REFUSED = [
    pytest.param(np.dtype(bool), id="bool"),
    pytest.param(np.dtype(np.complex64), id="complex64"),
    pytest.param(np.dtype(np.complex128), id="complex128"),
    pytest.param(np.dtype("U5"), id="str"),
    pytest.param(np.dtype("S5"), id="bytes"),
    pytest.param(np.dtype(object), id="object"),
    pytest.param(np.dtype("datetime64[ns]"), id="datetime64"),
    pytest.param(np.dtype("timedelta64[s]"), id="timedelta64"),
    pytest.param(np.dtype([("a", "f4"), ("b", "i4")]), id="structured"),
    pytest.param(np.dtype([("a", "f8")]), id="structured-one-float-field"),
    pytest.param(np.dtype("V8"), id="void"),
]


@pytest.mark.parametrize("dtype", REFUSED)
def test_refused_dtype_check_dtype(dtype: np.dtype) -> None:
    with pytest.raises(UnsupportedDtypeError, match="real numbers only") as info:
        check_dtype(dtype)
    assert str(dtype) in str(info.value)
    assert isinstance(info.value, InputError)


@pytest.mark.parametrize("dtype", REFUSED)
@pytest.mark.parametrize(("engine", "threads"), ENGINE_CASES)
def test_refused_dtype_relu_derivative(dtype: np.dtype, engine: str, threads: int | None) -> None:
    x = np.zeros(3, dtype=dtype)
    with pytest.raises(UnsupportedDtypeError) as info:
        run_kernel(x, 1, engine, threads)
    assert str(dtype) in str(info.value)
    assert "the block" in str(info.value)


@pytest.mark.parametrize(
    "spec",
    [bool, complex, str, bytes, object, "complex64", "U3", "M8[D]", np.dtype(("f4", (2,)))],
    ids=["bool-type", "complex-type", "str-type", "bytes-type", "object-type", "complex64-str", "U3", "M8", "subarray"],
)
def test_check_dtype_refuses_specs(spec: Any) -> None:
    with pytest.raises(UnsupportedDtypeError) as info:
        check_dtype(spec, where="array 'activations'")
    message = str(info.value)
    assert message.startswith("array 'activations' has dtype ")
    assert str(np.dtype(spec)) in message


def test_check_dtype_unknown_name_is_quoted() -> None:
    with pytest.raises(UnsupportedDtypeError, match="'not-a-dtype'"):
        check_dtype("not-a-dtype")


@pytest.mark.parametrize(
    "spec", ["float16", "float32", np.float64, "int8", np.uint64, ">f8", "<i2", np.longdouble], ids=str
)
def test_check_dtype_accepts_real_numbers(spec: Any) -> None:
    assert check_dtype(spec) == np.dtype(spec)


# --------------------------------------------------------------------------------------
# Layouts and out=
# --------------------------------------------------------------------------------------


def _planted(shape: tuple[int, ...], dtype: str = "float64", seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    flat = x.reshape(-1)  # a view: shape is C-contiguous here
    edges = np.array([np.nan, -0.0, 0.0, np.inf, -np.inf, -np.nan, 5e-324, -5e-324], dtype=dtype)
    flat[: min(flat.size, edges.size)] = edges[: flat.size]
    flat[8::7] = 0.0
    flat[9::11] = -0.0
    return x


def _unaligned(dtype: str) -> np.ndarray:
    x = _planted((40,), dtype)
    view = np.frombuffer(b"\0" + x.tobytes(), dtype=dtype, offset=1)
    assert not view.flags.aligned and not view.flags.writeable
    return view


LAYOUTS: list[tuple[str, Callable[[str], np.ndarray]]] = [
    ("c-order-2d", lambda dt: _planted((37, 45), dt)),
    ("f-order-2d", lambda dt: np.asfortranarray(_planted((37, 45), dt))),
    ("strided-2d", lambda dt: _planted((40, 60), dt)[::2, ::3]),
    ("negative-strides", lambda dt: _planted((20, 30), dt)[::-1, ::-2]),
    ("transposed-3d", lambda dt: _planted((5, 6, 7), dt).transpose(2, 0, 1)),
    ("strided-last-axis-4d", lambda dt: _planted((2, 3, 4, 10), dt)[..., ::2]),
    ("0-d-negative", lambda dt: np.array(-0.5, dtype=dt)),
    ("0-d-minus-zero", lambda dt: np.array(-0.0, dtype=dt)),
    ("0-d-nan", lambda dt: np.array(np.nan, dtype=dt)),
    ("empty-1d", lambda dt: np.empty((0,), dtype=dt)),
    ("empty-2d", lambda dt: np.empty((3, 0), dtype=dt)),
    ("empty-f-order", lambda dt: np.empty((0, 4), dtype=dt, order="F")),
    ("1-d", lambda dt: _planted((1000,), dt)),
    ("1-d-length-1", lambda dt: np.array([-0.0], dtype=dt)),
    ("2-d", lambda dt: _planted((13, 17), dt)),
    ("4-d", lambda dt: _planted((3, 4, 5, 6), dt)),
    ("unaligned-read-only", _unaligned),
]


@pytest.mark.parametrize(("engine", "threads"), ENGINE_CASES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("make", [m for _, m in LAYOUTS], ids=[name for name, _ in LAYOUTS])
@pytest.mark.parametrize("at_zero", AT_ZERO)
def test_layouts(make: Callable[[str], np.ndarray], dtype: str, at_zero: int, engine: str, threads: int | None) -> None:
    x = make(dtype)
    x.flags.writeable = False  # the kernel must not need to write its input
    before = x.copy()
    assert_mask(run_kernel(x, at_zero, engine, threads), oracle(x, at_zero))
    assert np.array_equal(x, before, equal_nan=True)


@pytest.mark.parametrize(("engine", "threads"), ENGINE_CASES)
@pytest.mark.parametrize("at_zero", AT_ZERO)
@pytest.mark.parametrize(
    "make_out",
    [
        lambda shape: np.full(shape, 7, dtype=np.int8),
        lambda shape: np.full(shape[::-1], 7, dtype=np.int8).T,
        lambda shape: np.full((shape[0] * 2, shape[1] * 3), 7, dtype=np.int8)[::2, ::3],
    ],
    ids=["c-order", "f-order", "strided"],
)
def test_out_is_filled_and_returned(
    make_out: Callable[[tuple[int, ...]], np.ndarray], at_zero: int, engine: str, threads: int | None
) -> None:
    x = _planted((23, 31))
    out = make_out(x.shape)
    result = run_kernel(x, at_zero, engine, threads, out=out)
    assert result is out
    assert_mask(out, oracle(x, at_zero))


def test_out_zero_d_and_empty() -> None:
    out0 = np.full((), 7, dtype=np.int8)
    assert relu_derivative(np.array(-0.0), out0) is out0
    assert int(out0) == 1
    out_empty = np.empty((3, 0), dtype=np.int8)
    assert relu_derivative(np.empty((3, 0)), out_empty) is out_empty


@pytest.mark.parametrize(
    "out",
    [
        np.empty((4, 6), dtype=np.int16),
        np.empty((4, 6), dtype=np.uint8),
        np.empty((4, 6), dtype=bool),
        np.empty((4, 6), dtype=np.float32),
        np.empty((6, 4), dtype=np.int8),
        np.empty((24,), dtype=np.int8),
        np.empty((4, 6, 1), dtype=np.int8),
        np.empty((), dtype=np.int8),
    ],
    ids=["int16", "uint8", "bool", "float32", "transposed-shape", "same-size-1d", "extra-axis", "0-d"],
)
@pytest.mark.parametrize(("engine", "threads"), ENGINE_CASES)
def test_out_of_wrong_dtype_or_shape(out: np.ndarray, engine: str, threads: int | None) -> None:
    x = np.zeros((4, 6))
    out[...] = 5
    before = out.copy()
    with pytest.raises(InputError, match=r"out must be int8 with shape \(4, 6\)"):
        run_kernel(x, 1, engine, threads, out=out)
    assert np.array_equal(out, before), "nothing may be written into a refused out"


@pytest.mark.parametrize("engine", ["cuda", "", "NUMPY", None])
def test_unknown_engine_is_refused(engine: Any) -> None:
    with pytest.raises(InputError, match="engine must be one of auto, numpy, numexpr"):
        relu_derivative(np.zeros(3), engine=engine)


@pytest.mark.parametrize("at_zero", [2, -1, True, "yes", 0.5])
def test_relu_derivative_refuses_bad_at_zero(at_zero: Any) -> None:
    with pytest.raises(InputError, match="at_zero"):
        relu_derivative(np.zeros(3), at_zero=at_zero)


def test_string_at_zero_is_accepted() -> None:
    x = np.array([-1.0, 0.0, 1.0])
    assert_mask(relu_derivative(x, at_zero="0"), np.array([0, 0, 1], dtype=np.int8))  # type: ignore[arg-type]
    assert_mask(relu_derivative(x, at_zero="1"), np.array([0, 1, 1], dtype=np.int8))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# hypothesis: every engine against the oracle
# --------------------------------------------------------------------------------------

HYPOTHESIS_DTYPES = [
    np.dtype(t)
    for t in ("float16", "float32", "float64", ">f8", "int8", "int16", "int32", "int64", "uint8", "uint32", "uint64")
]


@st.composite
def blocks(draw: st.DrawFn) -> np.ndarray:
    dtype = draw(st.sampled_from(HYPOTHESIS_DTYPES))
    if dtype.kind == "f":
        elements = hnp.from_dtype(dtype, allow_nan=True, allow_infinity=True, allow_subnormal=True)
    else:
        elements = hnp.from_dtype(dtype)
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6))
    x = draw(hnp.arrays(dtype, shape, elements=elements))
    layout = draw(st.sampled_from(["c", "f", "reversed", "strided"]))
    if layout == "f":
        x = np.asfortranarray(x)
    elif layout == "reversed":
        x = x[(slice(None, None, -1),) * x.ndim]
    elif layout == "strided":
        x = x[(slice(None, None, 2),) * x.ndim]
    return x


@given(x=blocks(), use_out=st.booleans())
def test_engines_match_oracle(x: np.ndarray, use_out: bool) -> None:
    for engine, threads in ENGINE_PAIRS:
        for at_zero in (0, 1):
            out = np.full(x.shape, 7, dtype=np.int8) if use_out else None
            result = run_kernel(x, at_zero, engine, threads, out=out)
            if out is not None:
                assert result is out
            assert_mask(result, oracle(x, at_zero))


@given(x=hnp.arrays(np.float32, hnp.array_shapes(max_dims=2, max_side=40), elements=st.floats(width=32)))
def test_engines_match_oracle_on_longer_float32_blocks(x: np.ndarray) -> None:
    for engine, threads in ENGINE_PAIRS:
        for at_zero in (0, 1):
            assert_mask(run_kernel(x, at_zero, engine, threads), oracle(x, at_zero))


# --------------------------------------------------------------------------------------
# parse_at_zero, rule_for
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [(0, 0), (1, 1), ("0", 0), ("1", 1), (" 1 ", 1)], ids=repr)
def test_parse_at_zero_accepts(value: Any, expected: int) -> None:
    assert parse_at_zero(value) == expected
    assert type(parse_at_zero(value)) is int


@pytest.mark.parametrize("value", [2, -1, True, False, "yes", "", "01", "1.0", 1.0, None], ids=repr)
def test_parse_at_zero_refuses(value: Any) -> None:
    with pytest.raises(InputError, match="at_zero must be 1") as info:
        parse_at_zero(value)
    assert repr(value) in str(info.value)


def test_rule_for() -> None:
    assert rule_for(1) == "x >= 0"
    assert rule_for(0) == "x > 0"
    with pytest.raises(InputError):
        rule_for(2)


# --------------------------------------------------------------------------------------
# Engines and threads
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("engine", "threads", "expected"),
    [
        ("auto", 1, "numpy"),
        ("auto", NUMEXPR_MIN_THREADS - 1, "numpy"),
        ("auto", NUMEXPR_MIN_THREADS, "numexpr"),
        ("auto", 64, "numexpr"),
        ("numpy", 64, "numpy"),
        ("numexpr", 1, "numexpr"),
    ],
    ids=lambda v: str(v),
)
def test_choose_engine(engine: Any, threads: int, expected: str) -> None:
    assert choose_engine(engine, threads) == expected


def test_numexpr_min_threads_is_more_than_one() -> None:
    assert NUMEXPR_MIN_THREADS > 1
    assert choose_engine("auto", 0) == "numpy"


@pytest.mark.parametrize("engine", ["cuda", "", "Auto"])
def test_choose_engine_refuses_unknown(engine: Any) -> None:
    with pytest.raises(InputError, match=repr(engine)):
        choose_engine(engine, 8)


@pytest.mark.parametrize(
    ("task_threads", "cores", "expected"),
    [(1, 8, 8), (2, 8, 4), (3, 8, 2), (8, 8, 1), (16, 8, 1), (1, 1, 1), (0, 8, 8), (4, 2, 1), (5, 64, 12)],
    ids=lambda v: str(v),
)
def test_numexpr_threads_for_table(task_threads: int, cores: int, expected: int) -> None:
    assert numexpr_threads_for(task_threads, cores) == expected


@given(task_threads=st.integers(1, 128), cores=st.integers(1, 512))
def test_numexpr_threads_for_never_oversubscribes(task_threads: int, cores: int) -> None:
    result = numexpr_threads_for(task_threads, cores)
    assert result >= 1
    if task_threads <= cores:
        assert task_threads * result <= cores < task_threads * (result + 1)
    else:
        assert result == 1


def test_numexpr_threads_for_one_task_is_every_core() -> None:
    assert numexpr_threads_for(1, 7) == 7


def test_set_numexpr_threads_returns_previous() -> None:
    original = numexpr.get_num_threads()
    try:
        assert set_numexpr_threads(3) == original
        assert numexpr.get_num_threads() == 3
        assert set_numexpr_threads(1) == 3
        assert numexpr.get_num_threads() == 1
        assert set_numexpr_threads(0) == 1  # clamped to at least one thread
        assert numexpr.get_num_threads() == 1
        assert set_numexpr_threads(2) == 1
    finally:
        numexpr.set_num_threads(original)
    assert numexpr.get_num_threads() == original


def test_module_surface() -> None:
    assert set(kernel.__all__) <= set(dir(kernel))
    assert kernel.ENGINES == ("auto", "numpy", "numexpr")
