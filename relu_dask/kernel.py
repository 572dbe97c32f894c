"""The block kernel: one numpy block in, its int8 ReLU derivative mask out.

Use this module when you hold a block in memory. It depends on numpy and numexpr only
(and on :mod:`relu_dask.errors`, a leaf module with no logic), so it can be imported and
tested without dask or zarr.

Two engines compute the same bits:

* ``"numpy"``  -- ``np.greater_equal(x, 0, out=mask.view(bool))``
* ``"numexpr"`` -- ``numexpr.evaluate("X >= 0", out=mask.view(bool))``

Both write straight into the int8 mask viewed as bool: no temporary, no copy. numexpr
only handles float32, float64, int32 and int64 natively (it would upcast float16 and
silently wrap uint64), so every other dtype goes through numpy, which is exact for all.
``"auto"`` picks numexpr only where it has at least :data:`NUMEXPR_MIN_THREADS` threads
per task: on fewer, single-threaded numpy is faster (see ``scripts/bench_kernel.py``).
"""

from __future__ import annotations

from typing import Literal

import numexpr
import numpy as np

from relu_dask.errors import InputError, UnsupportedDtypeError

__all__ = [
    "ENGINES",
    "NAN_POLICIES",
    "NUMEXPR_MIN_THREADS",
    "Engine",
    "check_dtype",
    "choose_engine",
    "numexpr_threads_for",
    "parse_at_zero",
    "parse_nan_policy",
    "relu_derivative",
    "rule_for",
    "set_numexpr_threads",
]

Engine = Literal["auto", "numpy", "numexpr"]
ENGINES: tuple[str, ...] = ("auto", "numpy", "numexpr")

#: numexpr pays only with this many threads of its own per block. Measured on 2 cores
#: (``scripts/bench_kernel.py``): numexpr with 1 thread is 1.6-3x slower than numpy, with 2
#: threads 1.03x (float64) to 1.6x (float32) slower; on 16 cores it matched a pool of numpy.
NUMEXPR_MIN_THREADS = 4

_NUMEXPR_DTYPES = frozenset(np.dtype(t) for t in ("float32", "float64", "int32", "int64"))
_RULES = {1: "x >= 0", 0: "x > 0"}


def check_dtype(dtype: np.dtype | str | type, *, where: str = "the source") -> np.dtype:
    """Return ``dtype`` as a numpy dtype if it is a real number type, else raise.

    Raises
    ------
    UnsupportedDtypeError
        For bool, complex, strings, bytes, objects, dates and structured dtypes.
    """
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise UnsupportedDtypeError(
            f"{where} has dtype {dtype!r}, which numpy does not know; "
            "relu_dask handles real numbers only (float16/32/64, signed and unsigned integers)"
        ) from exc
    if dt.kind not in "iuf" or dt.fields is not None or dt.subdtype is not None:
        raise UnsupportedDtypeError(
            f"{where} has dtype {dt} ({_describe_kind(dt)}), which has no ReLU derivative; "
            "relu_dask handles real numbers only (float16/32/64, signed and unsigned integers)"
        )
    return dt


def _describe_kind(dt: np.dtype) -> str:
    names = {
        "b": "boolean",
        "c": "complex",
        "U": "string",
        "S": "bytes",
        "O": "object",
        "V": "structured or raw bytes",
        "M": "datetime",
        "m": "timedelta",
        "T": "string",
    }
    return names.get(dt.kind, f"kind {dt.kind!r}")


def parse_at_zero(at_zero: int | str) -> int:
    """Validate the value the mask takes where ``x == 0`` (1: ``x >= 0``, 0: ``x > 0``)."""
    text = str(at_zero).strip()
    if isinstance(at_zero, bool) or text not in ("0", "1"):
        raise InputError(f"at_zero must be 1 (rule x >= 0) or 0 (rule x > 0), got {at_zero!r}")
    return int(text)


NAN_POLICIES: tuple[str, ...] = ("zero", "error")


def parse_nan_policy(policy: str) -> str:
    """Validate the NaN policy: ``"zero"`` (NaN gives 0) or ``"error"`` (stop on NaN)."""
    if policy not in NAN_POLICIES:
        raise InputError(f"nan must be zero (NaN gives 0) or error (stop on NaN), got {policy!r}")
    return policy


def rule_for(at_zero: int) -> str:
    """The rule as text, for reports and attributes: ``"x >= 0"`` or ``"x > 0"``."""
    return _RULES[parse_at_zero(at_zero)]


def relu_derivative(
    x: np.ndarray,
    out: np.ndarray | None = None,
    *,
    at_zero: int = 1,
    engine: Engine = "numpy",
) -> np.ndarray:
    """Compute the ReLU derivative mask of one block: int8, 1 where ``x >= 0``, else 0.

    Parameters
    ----------
    x
        A real-numbered block of any shape, memory order or strides.
    out
        Optional int8 array of ``x.shape`` to write into (returned).
    at_zero
        The mask's value where ``x == 0`` (also ``-0.0``): 1 for the rule ``x >= 0``
        (default), 0 for ``x > 0`` (PyTorch's ReLU backward). NaN always gives 0.
    engine
        ``"numpy"`` (default), ``"numexpr"`` or ``"auto"`` (numexpr where it has at least
        :data:`NUMEXPR_MIN_THREADS` threads). Both give the same bits.

    Examples
    --------
    >>> relu_derivative(np.array([-1.0, -0.0, 0.0, 2.0, np.nan]))
    array([0, 1, 1, 1, 0], dtype=int8)
    >>> relu_derivative(np.array([-1.0, 0.0, 2.0]), at_zero=0)
    array([0, 0, 1], dtype=int8)
    """
    x = np.asarray(x)
    check_dtype(x.dtype, where="the block")
    rule = parse_at_zero(at_zero)
    if out is None:
        out = np.empty(x.shape, dtype=np.int8)
    elif out.dtype != np.int8 or out.shape != x.shape:
        raise InputError(f"out must be int8 with shape {x.shape}, got {out.dtype} with shape {out.shape}")
    flags = out.view(np.bool_)
    if _use_numexpr(engine, x.dtype):
        expr = "X >= 0" if rule == 1 else "X > 0"
        numexpr.evaluate(expr, local_dict={"X": x}, out=flags, casting="unsafe")
    elif rule == 1:
        np.greater_equal(x, 0, out=flags)
    else:
        np.greater(x, 0, out=flags)
    return out


def _use_numexpr(engine: Engine, dtype: np.dtype) -> bool:
    if engine == "numpy":
        return False
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    native = dtype.isnative and dtype in _NUMEXPR_DTYPES
    if engine == "numexpr":
        return native
    return native and numexpr.get_num_threads() >= NUMEXPR_MIN_THREADS


def choose_engine(engine: Engine, numexpr_threads: int) -> Literal["numpy", "numexpr"]:
    """Resolve ``"auto"`` for a run whose tasks each get ``numexpr_threads`` threads."""
    if engine == "auto":
        return "numexpr" if numexpr_threads >= NUMEXPR_MIN_THREADS else "numpy"
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    return engine


def numexpr_threads_for(task_threads: int, cores: int) -> int:
    """numexpr threads per task so that ``task_threads * result <= cores`` (at least 1)."""
    return max(1, cores // max(1, task_threads))


def set_numexpr_threads(num_threads: int) -> int:
    """Set numexpr's thread count in this process; return the previous one."""
    return int(numexpr.set_num_threads(max(1, int(num_threads))))
