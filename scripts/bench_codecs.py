"""The masks' codec: encode and decode time and stored size of candidate codecs, one thread.

The masks are those of the 1 GiB benchmark array of ``scripts/bench_pipeline.py`` (made
there, under ``data/bench/``, if it is not there yet): 16 chunks of 4096 x 4096 int8, one
per source chunk, computed with numpy. Every codec is a numcodecs codec that a Zarr v3
array can name (``zstd`` and ``blosc`` are core v3 codecs); each round encodes then decodes
all chunks, and the first round checks that decoding gives the masks back exactly. Blosc's
own threads are off, so the figures are one thread's work, as in one task of a run.

Usage::

    python scripts/bench_codecs.py              # 5 rounds (about 2 minutes: zstd 9 is slow)
    python scripts/bench_codecs.py --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import numcodecs.blosc
import numpy as np
import zarr
from _bench_util import GIB, markdown_table, print_facts
from bench_pipeline import ensure_source, source_path
from numcodecs import Blosc, Zstd

ROOT = Path(__file__).resolve().parents[1]
UNITS = 4096

CODECS = {
    "zstd level 0 (zarr's v3 default)": Zstd(level=0),
    "zstd level 1": Zstd(level=1),
    "zstd level 9": Zstd(level=9),
    "blosc zstd clevel 1 bitshuffle (--dest-compressor blosc-zstd)": Blosc("zstd", 1, Blosc.BITSHUFFLE),
    "blosc lz4 clevel 5 bitshuffle (default)": Blosc("lz4", 5, Blosc.BITSHUFFLE),
    "blosc lz4 clevel 5 noshuffle": Blosc("lz4", 5, Blosc.NOSHUFFLE),
}


def masks_of(path: Path) -> list[np.ndarray]:
    src = zarr.open_array(str(path), mode="r")
    step = src.chunks[0]
    out = []
    for start in range(0, src.shape[0], step):
        x = src[start : start + step]
        mask = np.empty(x.shape, np.int8)
        np.greater_equal(x, 0, out=mask.view(np.bool_))
        out.append(mask)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data" / "bench")
    args = parser.parse_args(argv)
    print_facts("Codec benchmark")
    src = source_path(args.data_dir, 1.0)
    ensure_source(src, GIB // (UNITS * 4))
    masks = masks_of(src)
    raw = sum(m.nbytes for m in masks)
    numcodecs.blosc.use_threads = False
    enc: dict[str, list[float]] = {k: [] for k in CODECS}
    dec: dict[str, list[float]] = {k: [] for k in CODECS}
    size: dict[str, int] = {}
    for rnd in range(args.rounds):
        for name, codec in CODECS.items():
            start = time.perf_counter()
            encoded = [codec.encode(m) for m in masks]
            enc[name].append(time.perf_counter() - start)
            size[name] = sum(len(e) for e in encoded)
            start = time.perf_counter()
            decoded = [codec.decode(e) for e in encoded]
            dec[name].append(time.perf_counter() - start)
            if rnd == 0:
                for d, m in zip(decoded, masks, strict=True):
                    assert np.array_equal(np.frombuffer(d, np.int8).reshape(m.shape), m), name
    base = statistics.median(enc[next(iter(CODECS))])
    rows = []
    for name in CODECS:
        e, d = statistics.median(enc[name]), statistics.median(dec[name])
        rows.append([name, f"{size[name]:,}", f"{raw / size[name]:.1f}", f"{e:.3f}", f"{e / base:.2f}", f"{d:.3f}"])
    ones = sum(int(np.count_nonzero(m)) for m in masks) / raw
    print(
        f"\n{len(masks)} mask chunks of 4096 x 4096 int8, {raw:,} bytes, {ones:.1%} ones; "
        f"medians of {args.rounds} rounds, one thread\n"
    )
    print(markdown_table(["codec", "bytes", "ratio", "encode s", "encode / default", "decode s"], rows))


if __name__ == "__main__":
    main()
