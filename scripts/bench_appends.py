"""Many small appends: how much of SOURCE each incremental run reads, against what was new.

What a training job does while ``relu-dask follow`` (or a run after each epoch) keeps DEST
up to date: a group of ``--layers`` float32 arrays (``--units`` wide, chunks of 512 rows),
``--start-rows`` rows each, then ``--appends`` appends of ``--append-rows`` rows to every
layer (resize, then write the new rows, as zarr's ``Array.append`` does), each followed by
an incremental ``relu_dask.run`` (the pass follow mode makes). Printed per pass: the new
bytes, the bytes relu-dask read (from its run report), their ratio and the wall time; then
the totals against SOURCE's size. The masks are compared with numpy's after every pass.

The figure that matters is bytes read / new bytes: at most the new rows plus one block row
per array (docs/cli.md, "Growing arrays"). Usage::

    python scripts/bench_appends.py                 # 3 layers x 1024 units, 2048 rows + 5 x 2048
    python scripts/bench_appends.py --appends 20 --append-rows 256
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from _bench_util import MIB, markdown_table, print_facts

import relu_dask

CHUNK_ROWS = 512


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--units", type=int, default=1024)
    parser.add_argument("--start-rows", type=int, default=2048)
    parser.add_argument("--appends", type=int, default=5)
    parser.add_argument("--append-rows", type=int, default=2048)
    args = parser.parse_args()
    print_facts()
    work = Path(tempfile.mkdtemp(prefix="relu-dask-appends-"))
    try:
        run_appends(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_appends(work: Path, args: argparse.Namespace) -> None:
    source, dest = work / "acts.zarr", work / "masks.zarr"
    rng = np.random.default_rng(20261203)
    group = zarr.open_group(source, mode="w")
    layers = {}
    for i in range(args.layers):
        layers[f"fc{i}"] = group.create_array(
            f"fc{i}", shape=(0, args.units), chunks=(CHUNK_ROWS, args.units), dtype="float32"
        )
    table: list[list[object]] = []
    total_new = total_read = 0
    for step in range(args.appends + 1):
        rows = args.start_rows if step == 0 else args.append_rows
        for array in layers.values():
            array.append(rng.standard_normal((rows, args.units), dtype=np.float32))
        start = time.perf_counter()
        report = relu_dask.run(source, dest, scheduler="threads")
        wall = time.perf_counter() - start
        new = rows * args.units * 4 * args.layers
        read = sum(a.bytes_read for a in report.arrays)
        exact = all(
            np.array_equal(zarr.open_array(dest / name, mode="r")[...], (array[...] >= 0).astype(np.int8))
            for name, array in layers.items()
        )
        total_new, total_read = total_new + new, total_read + read
        label = "first run" if step == 0 else f"append {step}"
        table.append([label, f"{new / MIB:.1f}", f"{read / MIB:.1f}", f"{read / new:.2f}", f"{wall:.2f}", exact])
    size = sum(a.nbytes for a in layers.values())
    table.append(["all", f"{total_new / MIB:.1f}", f"{total_read / MIB:.1f}", f"{total_read / total_new:.2f}", "", ""])
    print(
        f"\n{args.layers} layers x {args.units} units float32, {args.start_rows} rows + {args.appends} appends of "
        f"{args.append_rows} rows (chunks of {CHUNK_ROWS} rows): SOURCE {size / MIB:.1f} MiB\n"
    )
    print(markdown_table(["pass", "new MiB", "read MiB", "read / new", "wall s", "exact"], table))


if __name__ == "__main__":
    main()
