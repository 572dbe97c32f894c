"""The seed's kernel table, re-measured here, with relu_dask's kernels and a memory floor.

What is timed (each call on a 3072 x 10000 array from ``np.random.seed(0); randn``, the
seed's data, in float64 and in float32; every call allocates its own output, as the
kernels do inside the pipeline):

* OP v1 ``(x > 0) * np.ones(x.shape)`` and OP v2 ``x[x >= 0] = 1; x[x < 0] = 0`` (on a
  fresh copy made before the clock starts, since v2 overwrites its input);
* ``ne.evaluate('(X>=0)+0')``, ``(X>=0).view('i1')``, ``ne.evaluate('X>=0').view('i1')``;
* ``relu_dask.relu_derivative(x, engine="numpy")`` and ``engine="numexpr"``;
* numexpr rows at numexpr's default thread count and, where it differs, at the thread
  count one pipeline task gets (cores / dask threads), marked ``[N thr]``;
* reference: ``np.copyto(int8_out, x, casting="unsafe")``, one fused pass that reads x
  and writes int8 (it converts, so it is not a floor).

The memory floor: the least any kernel must do is read the input's bytes once and write
the int8 output's bytes once. It is timed as two streaming passes back to back in one
call: ``np.bitwise_or.reduce`` over the input's bytes viewed as uint64 (the cheapest full
read numpy offers: integer SIMD, no float rules, one 8-byte result), then ``fill(1)`` of
a freshly allocated int8 array of the output's shape (a memset). It is a floor of data
movement, not of work: a kernel that overlaps its reads and writes in one pass can come
in slightly under it, and the ratio column then reads below 1.00.

Rounds are interleaved (every contender once per round, in a fresh random order each
round) and medians are reported, since the machine is shared. Each timed call follows an
untimed call of the same contender: a call's cost depends on what the previous call left
in the allocator (an output that reuses freed heap pages costs ~3-4 ms less on float64
here than one that must fault in fresh pages), so each contender is timed in its own
steady state, as ``%timeit`` would see it. The target check at the end times the pipeline
kernel and each view kernel back to back in A/B/B/A pairs. Outputs are checked against
``x >= 0`` (the data holds no exact zeros, so ``x > 0`` of OP v1 agrees).

Usage: ``python scripts/bench_kernel.py [--rounds N] [--pairs N] [--shape ROWS,COLS]``
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numexpr as ne
import numpy as np
from _bench_util import OtherLoad, markdown_table, median, print_facts

import relu_dask

Kernel = Callable[[np.ndarray], object]


@dataclass(frozen=True)
class Contender:
    label: str
    kernel: Kernel
    numexpr_threads: int | None = None
    """Set numexpr to this many threads around the call (untimed); None leaves it."""
    copy_input: bool = False
    """Give the kernel a fresh copy (made before the clock starts)."""
    checked: bool = True
    role: str = "contender"


def _op_v1(x: np.ndarray) -> np.ndarray:
    return (x > 0) * np.ones(x.shape)


def _op_v2(x: np.ndarray) -> np.ndarray:
    x[x >= 0] = 1
    x[x < 0] = 0
    return x


def _copyto(x: np.ndarray) -> np.ndarray:
    out = np.empty(x.shape, dtype=np.int8)
    np.copyto(out, x, casting="unsafe")
    return out


def _floor(x: np.ndarray) -> None:
    np.bitwise_or.reduce(x.reshape(-1).view(np.uint64))
    np.empty(x.shape, dtype=np.int8).fill(1)


def pipeline_engine() -> tuple[str, int]:
    """The engine and numexpr threads per task that ``relu-dask run`` picks by default here."""
    import zarr

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src.zarr"
        zarr.create_array(store=str(src), shape=(8, 8), chunks=(8, 8), dtype="float32", zarr_format=3)
        report = relu_dask.run(src, Path(tmp) / "dst.zarr", dry_run=True)
    return report.engine, report.numexpr_threads


def contenders(thread_counts: list[int]) -> list[Contender]:
    rows = [
        Contender("OP v1: `(x>0)*np.ones(x.shape)`", _op_v1),
        Contender("OP v2: `x[x>=0]=1; x[x<0]=0` (on a copy)", _op_v2, copy_input=True),
    ]
    for n in thread_counts:
        rows.append(Contender(f"`ne.evaluate('(X>=0)+0')` [{n} thr]", lambda x: ne.evaluate("(X>=0)+0", {"X": x}), n))
    rows.append(Contender("`(X>=0).view('i1')`", lambda x: (x >= 0).view("i1")))
    for n in thread_counts:
        rows.append(
            Contender(
                f"`ne.evaluate('X>=0').view('i1')` [{n} thr]", lambda x: ne.evaluate("X>=0", {"X": x}).view("i1"), n
            )
        )
    rows.append(Contender("relu_dask `relu_derivative(x, engine='numpy')`", _relu("numpy")))
    for n in thread_counts:
        rows.append(Contender(f"relu_dask `relu_derivative(x, engine='numexpr')` [{n} thr]", _relu("numexpr"), n))
    rows.append(Contender("reference: `np.copyto(int8, x, casting='unsafe')`", _copyto, checked=False, role="ref"))
    rows.append(
        Contender(
            "**floor**: read x once (uint64 OR-reduce) + write int8 once (fill)", _floor, checked=False, role="floor"
        )
    )
    return rows


def _relu(engine: Literal["numpy", "numexpr"]) -> Kernel:
    return lambda x: relu_dask.relu_derivative(x, engine=engine)


def time_once(contender: Contender, x: np.ndarray, expected: np.ndarray) -> float:
    arg = x.copy() if contender.copy_input else x
    previous = ne.set_num_threads(contender.numexpr_threads) if contender.numexpr_threads else None
    try:
        start = time.perf_counter()
        result = contender.kernel(arg)
        elapsed = time.perf_counter() - start
    finally:
        if previous is not None:
            ne.set_num_threads(previous)
    if contender.checked and not np.array_equal(np.asarray(result) != 0, expected):
        raise AssertionError(f"{contender.label} gave a wrong mask")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=21, help="interleaved rounds (default 21)")
    parser.add_argument("--pairs", type=int, default=41, help="A/B pairs for the target check (default 41)")
    parser.add_argument("--shape", default="3072,10000", help="array shape (default: the seed's 3072,10000)")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))

    print_facts()
    engine, task_threads = pipeline_engine()
    default_threads = ne.get_num_threads()
    thread_counts = sorted({default_threads, task_threads}, reverse=True)
    np.random.seed(0)
    data = {"float64": np.random.randn(*shape)}
    data["float32"] = data["float64"].astype(np.float32)
    expected = {k: v >= 0 for k, v in data.items()}
    rows = contenders(thread_counts)
    times: dict[tuple[str, str], list[float]] = {}
    order = np.random.default_rng(1)
    with OtherLoad() as load:
        for _ in range(args.rounds):
            for i in order.permutation(len(rows)):
                contender = rows[i]
                for dtype, x in data.items():
                    time_once(contender, x, expected[dtype])  # settles the allocator: see the docstring
                    elapsed = time_once(contender, x, expected[dtype])
                    times.setdefault((contender.label, dtype), []).append(elapsed)

    med = {k: median(v) * 1e3 for k, v in times.items()}
    floor_label = rows[-1].label
    print(f"### Kernel: {shape[0]} x {shape[1]}, median of {args.rounds} interleaved rounds (ms)\n")
    table = []
    for c in rows:
        cells = [c.label]
        for dtype in data:
            ms = med[(c.label, dtype)]
            cells += [f"{ms:.2f}", f"{ms / med[(floor_label, dtype)]:.2f}x"]
        table.append(cells)
    print(markdown_table(["kernel", "float64 ms", "float64 / floor", "float32 ms", "float32 / floor"], table))
    print()
    print(
        f"Other processes kept {load.cores:.2f} cores busy on average while the table was timed "
        f"(0 on a quiet machine; this machine has {len(os.sched_getaffinity(0))}).\n"
    )
    print(
        f"numexpr default threads: {default_threads}; the pipeline runs engine={engine!r} "
        f"with {task_threads} numexpr thread(s) per task (relu-dask run's defaults on this machine)."
    )
    pipe = next(
        c
        for c in rows
        if c.label.startswith(f"relu_dask `relu_derivative(x, engine='{engine}')`")
        and (engine == "numpy" or c.numexpr_threads == task_threads)
    )
    views = [c for c in rows if "view('i1')" in c.label]
    print(
        f"\nTarget (pipeline kernel within 1.05x of the faster view): the table's medians, then {args.pairs} "
        "back-to-back A/B/B/A pairs against each view kernel (median of per-pair ratios, less sensitive to "
        "other load on the machine than rows timed seconds apart). Two readings: against every view row, "
        f"and against the views at the {task_threads} numexpr thread(s) a pipeline task gets here (with all "
        "cores busy decoding, a task cannot use more).\n"
    )
    paired = {
        (c.label, dtype): paired_ratio(pipe, c, x, expected[dtype], args.pairs)
        for dtype, x in data.items()
        for c in views
    }
    scopes = {
        "any thread count": views,
        f"{task_threads} thread(s), as in the pipeline": [
            c for c in views if c.numexpr_threads in (None, task_threads)
        ],
    }
    table = []
    for dtype in data:
        for scope, candidates in scopes.items():
            best = min(candidates, key=lambda c: med[(c.label, dtype)])
            trailing = max(candidates, key=lambda c: paired[(c.label, dtype)])  # the view it trails most
            worst = paired[(trailing.label, dtype)]
            table.append(
                [
                    dtype,
                    scope,
                    f"{med[(pipe.label, dtype)] / med[(best.label, dtype)]:.3f} vs {best.label}",
                    f"{worst:.3f} vs {trailing.label}",
                    "yes" if worst <= 1.05 else "**no**",
                ]
            )
    headers = [f"dtype ({pipe.label})", "views compared", "table medians ratio", "paired ratio (worst view)", "<= 1.05"]
    print(markdown_table(headers, table, align="lllll"))


def paired_ratio(a: Contender, b: Contender, x: np.ndarray, expected: np.ndarray, pairs: int) -> float:
    """Median over ``pairs`` of time(a) / time(b), each pair timed back to back (A B, then B A)."""
    ratios = []
    for i in range(pairs):
        if i % 2:
            tb, ta = time_once(b, x, expected), time_once(a, x, expected)
        else:
            ta, tb = time_once(a, x, expected), time_once(b, x, expected)
        ratios.append(ta / tb)
    return median(ratios)


if __name__ == "__main__":
    main()
