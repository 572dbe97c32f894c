"""End-to-end benchmark: relu-dask against naive dask and two codec floors, in one run.

The data: seeded synthetic float32 activations (``relu_dask.storage``'s generator, the
demo's seed), 65536 x 4096 per GiB, chunks 4096 x 4096 (64 MiB), Zarr v3 with zarr's
default codecs (bytes + zstd level 0), made once under ``data/bench/`` and reused.

The contenders, each in its own fresh subprocess, interleaved round by round (order
rotated each round), every output deleted and ``os.sync()`` called before each start:

* **relu-dask** -- ``python -m relu_dask run SRC DST --overwrite --quiet`` with default
  options (``--report`` is added only to read the in-process compute time back);
* **naive dask** -- ``(da.from_zarr(src) >= 0).astype('i1').to_zarr(dst)``, dask's
  default threaded scheduler and zarr's default codecs (whatever relu-dask's are);
* **codec floor** -- no dask: ``ThreadPoolExecutor(2)``, one task per source chunk; each
  task reads and decodes its chunk through zarr (``src[chunk_slice]``), computes the
  real mask (``np.greater_equal(x, 0, out=mask.view(bool))`` into a fresh int8 array)
  and encodes and writes it through zarr (``dst[chunk_slice] = mask``) into an int8 v3
  array with the source's chunks, fill value 0 (empty chunks skipped, zarr's default) and
  exactly the codecs of relu-dask's output, read from the ``zarr.json`` of one untimed
  relu-dask run made before the rounds (that run's output is also the reference every
  writer's mask is compared with). What is left once dask and relu_dask are taken away:
  zarr's own I/O, codec work (done on zarr's thread pool) and the kernel;
* **read+decode floor** -- the same pool and tasks doing only ``src[chunk_slice]``.
* **baseline** -- ``python -c "import relu_dask.cli"``: interpreter and imports alone, the
  part of every wall and peak RSS that no pipeline change can remove.

Measured per child from outside (``scripts/_bench_util.py``): process wall (start to
reap, interpreter start and imports included: what a user waits for), user+sys CPU
seconds and peak RSS (``ru_maxrss`` of that child). Each child also reports its
in-process work time (after imports; relu-dask's is the report's ``wall_s``). GB/s is
uncompressed input bytes (10^9) per second of process wall. The source is read once
before the rounds so every contender finds it in the page cache. "other load" is the
cores that other processes kept busy while a child ran (from /proc/stat): on a shared
machine it says which figures to trust; ``--max-other-load`` reruns a child (up to
twice more) when it was higher. Note that ``import dask.array`` also imports xarray and
pandas when they are installed (the test extras install them): that is part of
relu-dask's and naive dask's start-up and baseline RSS here, not of a bare install.

Usage::

    python scripts/bench_pipeline.py                # 1 GiB, 3 rounds
    python scripts/bench_pipeline.py --rounds 5
    python scripts/bench_pipeline.py --quick        # 256 MiB, 1 round: a smoke test
    python scripts/bench_pipeline.py --sizes 1,4,16 # relu-dask's peak RSS as the array grows
    python scripts/bench_pipeline.py --growth       # incremental run: 1 GiB appended to 4 GiB
    python scripts/bench_pipeline.py --growth --quick  # the same, 128 MiB appended to 512 MiB, 1 round

``--growth`` measures the issue's target for incremental runs: after 1 GiB is appended to
a 4 GiB SOURCE whose complete masks DEST holds, ``relu-dask run SRC DST`` (no
``--overwrite``) takes at most 1.15x the wall of a fresh run over a 1 GiB array, and reads
at most the new rows plus one block. The grown SOURCE is a folder of hard links to the
chunk files of a seeded 5 GiB source (same bytes, size and mtime) with its own
``zarr.json``: first with the 4 GiB shape and the first 4 GiB's links, over which an
untimed run makes DEST (a copy of DEST and of its journal is kept); then the last 1 GiB's
links and the 5 GiB ``zarr.json``, as a writer's resize and write leave them. Before each
timed incremental run the 4 GiB state (shape, links, DEST and journal) is restored and the
1 GiB appended again. The contenders: **relu-dask incremental** and **relu-dask fresh
1 GiB** (``--overwrite`` over a seeded 1 GiB source), interleaved as above. Once, untimed,
before the rounds, the incremental DEST is compared with a fresh run's over the grown
source: chunk files byte for byte, metadata but for ``created_utc``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _bench_util import (
    GIB,
    MIB,
    ChildResult,
    check_parent_small,
    compile_bytecode,
    markdown_table,
    median,
    print_facts,
    run_child,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = ROOT / "data" / "bench"
UNITS = 4096
ROWS_PER_GIB = GIB // (UNITS * 4)
CHUNK_SHAPE = (4096, 4096)
FLOOR_THREADS = 2
CHILD_TIMEOUT_S = 4 * 3600.0

#: The issue's targets.
TARGET_VS_FLOOR = 1.10
TARGET_VS_NAIVE = 1.35
TARGET_RSS_BYTES = 350 * 10**6
TARGET_RSS_GROWTH = 0.10


# --------------------------------------------------------------------------- children
# Everything below runs inside a child process (``--child NAME ...``), never in the driver,
# so that the driver stays small and the children's peak RSS is their own.


def _child_generate(dest: str, rows: str) -> dict[str, float]:
    from relu_dask.demo import DEMO_SEED, write_synthetic_activations

    start = time.perf_counter()
    write_synthetic_activations(
        Path(dest), shape=(int(rows), UNITS), chunk_shape=CHUNK_SHAPE, seed=DEMO_SEED, num_threads=FLOOR_THREADS
    )
    return {"work_s": time.perf_counter() - start}


def _child_naive(src: str, dst: str) -> dict[str, float]:
    import dask.array as da

    start = time.perf_counter()
    (da.from_zarr(src) >= 0).astype("i1").to_zarr(dst)
    return {"work_s": time.perf_counter() - start}


def _chunk_slices(shape: Sequence[int], chunks: Sequence[int]) -> list[tuple[slice, ...]]:
    import itertools

    ranges = [range(0, n, c) for n, c in zip(shape, chunks)]
    return [
        tuple(slice(s, min(s + c, n)) for s, c, n in zip(starts, chunks, shape))
        for starts in itertools.product(*ranges)
    ]


def _codec_kwargs(codecs_json: str) -> dict[str, object]:
    """zarr.create_array keywords for a v3 ``codecs`` list: filters, serializer, compressors."""
    codecs = json.loads(codecs_json)
    names = [c["name"] for c in codecs]
    cut = next(i for i, n in enumerate(names) if n in ("bytes", "sharding_indexed", "vlen-bytes", "vlen-utf8"))
    return {"filters": codecs[:cut], "serializer": codecs[cut], "compressors": codecs[cut + 1 :]}


def _child_codec_floor(src_path: str, dst_path: str, codecs_json: str, pipeline: str = "") -> dict[str, float]:
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import zarr

    if pipeline:  # zarr's documented setting: which codec pipeline class reads and writes chunks
        zarr.config.set({"codec_pipeline.path": pipeline})
    start = time.perf_counter()
    src = zarr.open_array(src_path, mode="r")
    dst = zarr.create_array(
        store=dst_path,
        shape=src.shape,
        chunks=src.chunks,
        dtype="int8",
        fill_value=0,
        zarr_format=3,
        **_codec_kwargs(codecs_json),  # type: ignore[arg-type]
    )

    def task(region: tuple[slice, ...]) -> None:
        x = np.asarray(src[region])
        mask = np.empty(x.shape, dtype=np.int8)
        np.greater_equal(x, 0, out=mask.view(np.bool_))
        dst[region] = mask

    with ThreadPoolExecutor(FLOOR_THREADS) as pool:
        list(pool.map(task, _chunk_slices(src.shape, src.chunks)))
    return {"work_s": time.perf_counter() - start}


def _child_compare(path_a: str, path_b: str) -> dict[str, float]:
    """Whether two int8 arrays hold the same values, read a chunk at a time."""
    import numpy as np
    import zarr

    a, b = zarr.open_array(path_a, mode="r"), zarr.open_array(path_b, mode="r")
    equal = a.shape == b.shape and a.dtype == b.dtype
    for region in _chunk_slices(a.shape, a.chunks) if equal else []:
        if not np.array_equal(np.asarray(a[region]), np.asarray(b[region])):
            equal = False
            break
    return {"equal": float(equal)}


def _child_read_floor(src_path: str) -> dict[str, float]:
    from concurrent.futures import ThreadPoolExecutor

    import zarr

    start = time.perf_counter()
    src = zarr.open_array(src_path, mode="r")

    def task(region: tuple[slice, ...]) -> None:
        src[region]

    with ThreadPoolExecutor(FLOOR_THREADS) as pool:
        list(pool.map(task, _chunk_slices(src.shape, src.chunks)))
    return {"work_s": time.perf_counter() - start}


_CHILDREN: dict[str, Callable[..., dict[str, float]]] = {
    "generate": _child_generate,
    "naive": _child_naive,
    "codec-floor": _child_codec_floor,
    "read-floor": _child_read_floor,
    "compare": _child_compare,
}


# --------------------------------------------------------------------------- the driver


@dataclass
class Contender:
    key: str
    label: str
    writes: bool
    results: list[ChildResult] = field(default_factory=list)
    work_s: list[float] = field(default_factory=list)

    def argv(self, src: Path, dst: Path, report: Path, codecs_json: str = "") -> list[str]:
        py = sys.executable
        if self.key.startswith("relu-dask"):
            stats = ["--stats"] if self.key in ("relu-dask-stats", "relu-dask-live") else []
            if self.key == "relu-dask-live":  # the live page served, fed as blocks finish (nobody watching)
                stats += ["--dashboard-address", "127.0.0.1:0"]
            return [
                py,
                "-m",
                "relu_dask",
                "run",
                str(src),
                str(dst),
                "--overwrite",
                "--quiet",
                "--report",
                str(report),
                *stats,
            ]
        if self.key == "baseline":
            return [py, "-c", "import relu_dask.cli"]
        extra = [str(dst)] if self.writes else []
        child = self.key
        if self.key.startswith("codec-floor"):
            child = "codec-floor"
            extra += [codecs_json, PIPELINES.get(self.key, "")]
        return [py, str(Path(__file__).resolve()), "--child", child, str(src), *extra]

    def work_time(self, result: ChildResult, report: Path) -> float:
        if self.key.startswith("relu-dask"):
            return float(json.loads(report.read_text())["wall_s"])
        if self.key == "baseline":
            return 0.0
        return float(json.loads(result.stdout.strip().splitlines()[-1])["work_s"])


#: The codec floor again with another of zarr's codec pipelines, where this Python has it:
#: zarr 3.4's FusedCodecPipeline, and the zarrs package's Rust pipeline (``pip install zarrs``).
PIPELINES = {
    "codec-floor-fused": "zarr.core.codec_pipeline.FusedCodecPipeline",
    "codec-floor-zarrs": "zarrs.ZarrsCodecPipeline",
}


def _pipeline_available(path: str) -> bool:
    """Whether ``path`` names a codec pipeline class this Python can import."""
    import subprocess

    module, _, name = path.rpartition(".")
    probe = f"import importlib, sys; sys.exit(not hasattr(importlib.import_module({module!r}), {name!r}))"
    # In a child: the driver stays small (it never imports zarr).
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, check=False).returncode == 0


def make_contenders() -> list[Contender]:
    contenders = [
        Contender("relu-dask", "relu-dask run (defaults)", True),
        Contender("relu-dask-stats", "relu-dask run --stats (unit statistics in the same pass)", True),
        Contender("relu-dask-live", "relu-dask run --stats --dashboard-address (the live page)", True),
        Contender("naive", "naive dask `(from_zarr(src) >= 0).astype('i1').to_zarr(dst)`", True),
        Contender("codec-floor", f"codec floor (read+decode, mask, encode+write; {FLOOR_THREADS} threads)", True),
    ]
    for key, path in PIPELINES.items():
        if _pipeline_available(path):
            contenders.append(Contender(key, f"codec floor with `{path}`", True))
    contenders.append(Contender("read-floor", f"read+decode floor ({FLOOR_THREADS} threads)", False))
    contenders.append(Contender("baseline", "baseline: interpreter + `import relu_dask.cli`", False))
    return contenders


def size_tag(size_gib: float) -> str:
    return f"{size_gib:g}GiB"


def source_path(data_dir: Path, size_gib: float) -> Path:
    return data_dir / f"activations-{size_tag(size_gib)}-f32-c{CHUNK_SHAPE[0]}x{CHUNK_SHAPE[1]}.zarr"


def ensure_source(path: Path, rows: int) -> None:
    """Make the seeded source in a child unless a matching one is there."""
    meta_path = path / "zarr.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        chunk = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
        if meta.get("shape") == [rows, UNITS] and chunk == list(CHUNK_SHAPE) and "seed" in meta.get("attributes", {}):
            return
        raise SystemExit(f"{path} exists but is not this benchmark's array: move it away or use --data-dir")
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"generating {path.name} ({rows} x {UNITS} float32) ...", file=sys.stderr, flush=True)
    result = run_child([sys.executable, str(Path(__file__).resolve()), "--child", "generate", str(path), str(rows)])
    print(f"  done in {result.wall_s:.1f} s", file=sys.stderr, flush=True)


def warm_page_cache(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                while f.read(16 * MIB):
                    pass


def remove(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def tree_digest(path: Path) -> tuple[int, str]:
    """Bytes on disk and a digest of every chunk file (not the metadata, not relu-dask's record
    ``.relu-dask/``) under ``path``."""
    digest = hashlib.blake2b(digest_size=16)
    total = 0
    for root, dirs, files in os.walk(path):
        dirs.sort()
        if ".relu-dask" in dirs:
            dirs.remove(".relu-dask")
        for name in sorted(files):
            full = Path(root) / name
            total += full.stat().st_size
            if name in ("zarr.json", ".zarray", ".zattrs", ".zgroup"):
                continue
            digest.update(str(full.relative_to(path)).encode())
            with full.open("rb") as f:
                while block := f.read(16 * MIB):
                    digest.update(block)
    return total, digest.hexdigest()


def codecs_json_of(path: Path) -> str:
    return json.dumps(json.loads((path / "zarr.json").read_text()).get("codecs", []))


def describe_codecs(codecs_json: str) -> str:
    return " + ".join(
        c["name"] + (f"({c['configuration']})" if c.get("configuration") else "") for c in json.loads(codecs_json)
    )


def run_measured(argv: list[str], dst: Path, max_other_load: float | None) -> ChildResult:
    """Run one child on a clean slate (DEST removed, dirty pages synced); rerun if noisy."""
    return run_prepared(argv, lambda: remove(dst), max_other_load)


def run_prepared(argv: list[str], prepare: Callable[[], None], max_other_load: float | None) -> ChildResult:
    """Run one child after ``prepare()`` (untimed) and ``os.sync()``; prepare and rerun if noisy."""
    for _attempt in range(3 if max_other_load is not None else 1):
        prepare()
        os.sync()
        result = run_child(argv, timeout_s=CHILD_TIMEOUT_S)
        if max_other_load is None or result.other_load <= max_other_load:
            break
        print(f"  (rerun: other load {result.other_load:.2f} cores)", file=sys.stderr, flush=True)
    return result


@dataclass(frozen=True)
class Output:
    """What one writer wrote in its first round, next to relu-dask's reference output."""

    num_bytes: int
    digest: str
    codecs_json: str
    equal_to_reference: bool


def make_reference(src: Path, out_dir: Path) -> tuple[Path, str]:
    """One untimed relu-dask run: its output is the reference, its codecs the floor's."""
    reference = out_dir / "reference.zarr"
    remove(reference)
    argv = make_contenders()[0].argv(src, reference, out_dir / "report-reference.json")
    run_child(argv, timeout_s=CHILD_TIMEOUT_S)
    (out_dir / "report-reference.json").unlink(missing_ok=True)
    return reference, codecs_json_of(reference)


def describe_output(dst: Path, reference: Path) -> Output:
    num_bytes, digest = tree_digest(dst)
    compare = [sys.executable, str(Path(__file__).resolve()), "--child", "compare", str(dst), str(reference)]
    equal = bool(json.loads(run_child(compare).stdout.strip().splitlines()[-1])["equal"])
    return Output(num_bytes, digest, codecs_json_of(dst), equal)


def run_round(
    contenders: list[Contender],
    src: Path,
    out_dir: Path,
    rnd: int,
    outputs: dict[str, Output],
    reference: tuple[Path, str],
    max_other_load: float | None,
) -> None:
    shift = rnd % len(contenders)
    for c in contenders[shift:] + contenders[:shift]:
        dst = out_dir / f"mask-{c.key}.zarr"
        report = out_dir / f"report-{c.key}.json"
        result = run_measured(c.argv(src, dst, report, reference[1]), dst, max_other_load)
        c.results.append(result)
        c.work_s.append(c.work_time(result, report))
        if c.writes and c.key not in outputs:
            outputs[c.key] = describe_output(dst, reference[0])
        remove(dst)
        report.unlink(missing_ok=True)
        print(f"  round {rnd + 1}: {c.key:12s} {result.wall_s:7.2f} s", file=sys.stderr, flush=True)


def fmt_ratio(value: float) -> str:
    return f"{value:.3f}" if value == value else "n/a"


def print_main_table(contenders: list[Contender], input_bytes: int, rounds: int) -> dict[str, dict[str, float]]:
    stats: dict[str, dict[str, float]] = {}
    for c in contenders:
        stats[c.key] = {
            "wall": median([r.wall_s for r in c.results]),
            "work": median(c.work_s),
            "rss": median([r.peak_rss_bytes for r in c.results]),
            "rss_max": max(r.peak_rss_bytes for r in c.results),
            "cpu": median([r.cpu_s for r in c.results]),
            "busy": median([r.cpu_s / r.wall_s for r in c.results]),
            "other": median([r.other_load for r in c.results]),
        }
    floor, naive = stats["codec-floor"], stats["naive"]
    rows = []
    for c in contenders:
        s = stats[c.key]
        pipeline = c.key != "baseline"
        rows.append(
            [
                c.label,
                f"{s['wall']:.2f}",
                f"{s['work']:.2f}" if pipeline else "-",
                f"{input_bytes / s['wall'] / 1e9:.3f}" if pipeline else "-",
                fmt_ratio(s["wall"] / floor["wall"]) if pipeline else "-",
                fmt_ratio(s["work"] / floor["work"]) if pipeline else "-",
                fmt_ratio(naive["wall"] / s["wall"]) if pipeline else "-",
                f"{s['rss'] / MIB:.0f} ({s['rss_max'] / MIB:.0f})",
                f"{s['cpu'] / (input_bytes / GIB):.2f}" if pipeline else f"{s['cpu']:.2f} (total)",
                f"{s['busy']:.2f}",
                f"{s['other']:.2f}",
            ]
        )
    print(f"### Pipeline: {input_bytes / GIB:g} GiB float32, median of {rounds} interleaved round(s)\n")
    headers = [
        "contender",
        "wall s",
        "work s",
        "GB/s",
        "wall / codec floor",
        "work / codec floor",
        "naive dask wall / wall",
        "peak RSS MiB median (max)",
        "CPU s / GiB",
        "cores busy",
        "other load (cores)",
    ]
    print(markdown_table(headers, rows))
    print()
    print(
        "wall: process start to exit (interpreter and imports included); work: in-process time after imports; "
        "GB/s: uncompressed input (10^9 B) per second of wall; cores busy: (user+sys) / wall; "
        "other load: cores other processes kept busy meanwhile (the noise; 0 on a quiet machine)."
    )
    return stats


def print_outputs(outputs: dict[str, Output], reference: tuple[Path, str]) -> None:
    reference_digest = tree_digest(reference[0])[1]
    rows = []
    for key, out in outputs.items():
        same_codecs = out.codecs_json == reference[1]
        rows.append(
            [
                key,
                f"{out.num_bytes:,}",
                f"{out.num_bytes / MIB:.1f}",
                describe_codecs(out.codecs_json),
                "yes" if same_codecs else "no",
                ("yes" if out.digest == reference_digest else "NO") if same_codecs else "-",
                "yes" if out.equal_to_reference else "**NO**",
            ]
        )
    print("\n### Outputs (first round; the reference is an untimed relu-dask run made before the rounds)\n")
    headers = [
        "writer",
        "bytes on disk",
        "MiB",
        "codecs",
        "relu-dask's codecs",
        "chunk files identical to relu-dask's",
        "mask equal to relu-dask's (decoded)",
    ]
    print(markdown_table(headers, rows, align="lrrllll"))


#: Issue 7: unit statistics in the same pass cost under 10% of the run's time.
TARGET_STATS_EXTRA = 0.10


def print_targets(stats: dict[str, dict[str, float]]) -> None:
    ours, floor, naive = stats["relu-dask"], stats["codec-floor"], stats["naive"]
    vs_floor_wall = ours["wall"] / floor["wall"]
    vs_floor_work = ours["work"] / floor["work"]
    vs_naive = naive["wall"] / ours["wall"]
    checks = [
        ("relu-dask wall / codec floor wall", vs_floor_wall, f"<= {TARGET_VS_FLOOR}", vs_floor_wall <= TARGET_VS_FLOOR),
        ("relu-dask work / codec floor work", vs_floor_work, f"<= {TARGET_VS_FLOOR}", vs_floor_work <= TARGET_VS_FLOOR),
        ("naive dask wall / relu-dask wall", vs_naive, f">= {TARGET_VS_NAIVE}", vs_naive >= TARGET_VS_NAIVE),
        (
            "relu-dask peak RSS (MB = 10^6 B)",
            ours["rss"] / 1e6,
            f"<= {TARGET_RSS_BYTES / 1e6:.0f}",
            ours["rss"] <= TARGET_RSS_BYTES,
        ),
    ]
    if "relu-dask-stats" in stats:
        extra = stats["relu-dask-stats"]["work"] / ours["work"] - 1
        checks.append(
            (
                "extra in-process time of --stats (fraction)",
                extra,
                f"< {TARGET_STATS_EXTRA}",
                extra < TARGET_STATS_EXTRA,
            )
        )
    if "relu-dask-live" in stats and "relu-dask-stats" in stats:
        extra = stats["relu-dask-live"]["work"] / stats["relu-dask-stats"]["work"] - 1
        checks.append(("extra time of the live page over --stats (fraction)", extra, "< 0.02", extra < 0.02))
    for key in PIPELINES:
        if key in stats:
            # Issue 13: zarr's public API with a faster pipeline, within 10% of relu-dask's
            # direct chunk path, would make that path's hand-written code unnecessary.
            ratio = stats[key]["wall"] / ours["wall"]
            checks.append((f"{key} wall / relu-dask wall (<= 1.10: prefer zarr)", ratio, "> 1.10", ratio > 1.10))
    print("\n### Targets\n")
    rows = [[name, f"{value:.3f}", target, "yes" if ok else "**no**"] for name, value, target, ok in checks]
    print(markdown_table(["check", "measured", "target", "met"], rows, align="lrll"))


def run_main(args: argparse.Namespace, size_gib: float) -> None:
    rows = round(size_gib * ROWS_PER_GIB)
    src = source_path(args.data_dir, size_gib)
    ensure_source(src, rows)
    warm_page_cache(src)
    out_dir = args.data_dir / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    contenders = make_contenders()
    reference = make_reference(src, out_dir)
    outputs: dict[str, Output] = {}
    for rnd in range(args.rounds):
        run_round(contenders, src, out_dir, rnd, outputs, reference, args.max_other_load)
    stats = print_main_table(contenders, rows * UNITS * 4, args.rounds)
    print_outputs(outputs, reference)
    remove(reference[0])
    print_targets(stats)
    warning = check_parent_small([r for c in contenders for r in c.results])
    if warning:
        print(f"\n{warning}")


def run_sizes(args: argparse.Namespace, sizes: list[float]) -> None:
    out_dir = args.data_dir / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    for size in sizes:
        ensure_source(source_path(args.data_dir, size), round(size * ROWS_PER_GIB))
    results: dict[float, list[ChildResult]] = {s: [] for s in sizes}
    work: dict[float, list[float]] = {s: [] for s in sizes}
    relu = make_contenders()[0]
    for rnd in range(args.rounds):
        for size in sizes[rnd % len(sizes) :] + sizes[: rnd % len(sizes)]:
            src = source_path(args.data_dir, size)
            dst, report = out_dir / "mask-sizes.zarr", out_dir / "report-sizes.json"
            warm_page_cache(src)
            result = run_measured(relu.argv(src, dst, report), dst, args.max_other_load)
            results[size].append(result)
            work[size].append(relu.work_time(result, report))
            remove(dst)
            report.unlink(missing_ok=True)
            print(f"  round {rnd + 1}: {size_tag(size):8s} {result.wall_s:7.2f} s", file=sys.stderr, flush=True)
    first = median([r.peak_rss_bytes for r in results[sizes[0]]])
    rows = []
    for size in sizes:
        rs = results[size]
        rss = median([r.peak_rss_bytes for r in rs])
        nbytes = round(size * ROWS_PER_GIB) * UNITS * 4
        wall = median([r.wall_s for r in rs])
        rows.append(
            [
                size_tag(size),
                f"{wall:.2f}",
                f"{median(work[size]):.2f}",
                f"{nbytes / wall / 1e9:.3f}",
                f"{rss / MIB:.0f} ({max(r.peak_rss_bytes for r in rs) / MIB:.0f})",
                f"{(rss / first - 1) * 100:+.1f}%",
                f"{median([r.cpu_s for r in rs]) / (nbytes / GIB):.2f}",
                f"{median([r.cpu_s / r.wall_s for r in rs]):.2f}",
                f"{median([r.other_load for r in rs]):.2f}",
            ]
        )
    print(f"### relu-dask run (defaults) as the array grows: median of {args.rounds} round(s)\n")
    headers = ["size", "wall s", "work s", "GB/s", "peak RSS MiB median (max)"]
    headers += [f"RSS vs {size_tag(sizes[0])}", "CPU s / GiB", "cores busy", "other load (cores)"]
    print(markdown_table(headers, rows))
    last = median([r.peak_rss_bytes for r in results[sizes[-1]]])
    ok = last / first - 1 < TARGET_RSS_GROWTH
    print(
        f"\nTarget: peak RSS grows < {TARGET_RSS_GROWTH:.0%} from {size_tag(sizes[0])} to {size_tag(sizes[-1])}: "
        f"{(last / first - 1) * 100:+.1f}% -> {'met' if ok else '**not met**'}"
    )
    warning = check_parent_small([r for rs in results.values() for r in rs])
    if warning:
        print(f"\n{warning}")


# --------------------------------------------------------------------------- growth (--growth)
# An incremental run over a SOURCE grown along axis 0, against a fresh run over the new rows alone.

#: Issue's target: an incremental run costs at most this times a fresh run over the new rows.
TARGET_GROWTH_VS_FRESH = 1.15


@dataclass(frozen=True)
class GrowthSetup:
    """The paths and sizes of the growth benchmark (see :func:`run_growth`)."""

    big: Path
    """The seeded source of old + new rows: the grown source's chunk files are links to its."""
    fresh_src: Path
    """A seeded source of the new rows' size, for the fresh contender."""
    work: Path
    """Everything below is in here (removed at the end)."""
    grown: Path
    """The source that grows: hard links to ``big``'s chunk files, its own zarr.json."""
    dest: Path
    """The incremental contender's DEST."""
    pristine: Path
    """Copies of DEST and of its journal as the untimed run over the old rows left them."""
    old_rows: int
    new_rows: int

    @property
    def old_chunk_rows(self) -> int:
        return self.old_rows // CHUNK_SHAPE[0]

    @property
    def all_chunk_rows(self) -> int:
        return (self.old_rows + self.new_rows) // CHUNK_SHAPE[0]


def write_json_atomically(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def link_chunk_rows(src: Path, dst: Path, chunk_rows: range) -> None:
    """Hard-link ``src``'s chunk files ``c/<i>/...`` for ``i`` in ``chunk_rows`` into ``dst``.

    A hard link is the same file (same inode): same bytes, size and mtime, as relu-dask's
    growth check requires of the chunks it processed before.
    """
    for i in chunk_rows:
        for root, _dirs, files in os.walk(src / "c" / str(i)):
            target = dst / Path(root).relative_to(src)
            target.mkdir(parents=True, exist_ok=True)
            for name in files:
                os.link(Path(root) / name, target / name)


def set_grown_shape(setup: GrowthSetup, grown: bool) -> None:
    """The grown source's zarr.json: ``big``'s as it is (grown), or with only the old shape."""
    meta = json.loads((setup.big / "zarr.json").read_text())
    if not grown:
        meta["shape"] = [setup.old_rows, *meta["shape"][1:]]
    write_json_atomically(setup.grown / "zarr.json", meta)


def append_new_rows(setup: GrowthSetup) -> None:
    """Append the new rows: their chunk files first, then the grown shape (a writer's resize + write)."""
    link_chunk_rows(setup.big, setup.grown, range(setup.old_chunk_rows, setup.all_chunk_rows))
    set_grown_shape(setup, grown=True)


def restore_old_state(setup: GrowthSetup) -> None:
    """The state before the append: the old shape, no new rows' links, DEST and journal as the
    untimed run over the old rows left them."""
    set_grown_shape(setup, grown=False)
    for i in range(setup.old_chunk_rows, setup.all_chunk_rows):
        remove(setup.grown / "c" / str(i))  # unlinks the links: the big source's files stay as they are
    remove(setup.dest)  # DEST with its record inside
    shutil.copytree(setup.pristine / setup.dest.name, setup.dest)


def make_growth_setup(data_dir: Path, old_gib: float, new_gib: float) -> GrowthSetup:
    """The sources, the grown source at its old shape, and an untimed complete DEST of it."""
    old_rows, new_rows = round(old_gib * ROWS_PER_GIB), round(new_gib * ROWS_PER_GIB)
    if old_rows % CHUNK_SHAPE[0] or new_rows % CHUNK_SHAPE[0]:
        raise SystemExit(f"--growth sizes must be whole chunk rows ({CHUNK_SHAPE[0]} rows = 64 MiB)")
    big, fresh_src = source_path(data_dir, old_gib + new_gib), source_path(data_dir, new_gib)
    ensure_source(fresh_src, new_rows)
    ensure_source(big, old_rows + new_rows)
    meta = json.loads((big / "zarr.json").read_text())
    encoding = meta.get("chunk_key_encoding", {})
    if encoding.get("name") != "default" or encoding.get("configuration", {}).get("separator", "/") != "/":
        raise SystemExit(f"{big}: --growth expects chunk keys c/<i>/<j> (zarr v3's default)")
    work = data_dir / "out" / "growth"
    remove(work)
    work.mkdir(parents=True)
    setup = GrowthSetup(
        big=big,
        fresh_src=fresh_src,
        work=work,
        grown=work / f"grown-{size_tag(old_gib)}+{size_tag(new_gib)}.zarr",
        dest=work / "mask-incremental.zarr",
        pristine=work / "pristine",
        old_rows=old_rows,
        new_rows=new_rows,
    )
    setup.grown.mkdir()
    link_chunk_rows(big, setup.grown, range(setup.old_chunk_rows))
    set_grown_shape(setup, grown=False)
    print(f"untimed relu-dask run over the old {size_tag(old_gib)} ...", file=sys.stderr, flush=True)
    result = run_child(relu_dask_argv(setup.grown, setup.dest), timeout_s=CHILD_TIMEOUT_S)
    print(f"  done in {result.wall_s:.1f} s", file=sys.stderr, flush=True)
    setup.pristine.mkdir()
    shutil.copytree(setup.dest, setup.pristine / setup.dest.name)  # with its record inside
    return setup


def relu_dask_argv(src: Path, dst: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "relu_dask", "run", str(src), str(dst), "--quiet", *extra]


def _without_created(meta: object) -> object:
    """Metadata with every ``created_utc`` left out (the one thing two runs may differ in)."""
    if isinstance(meta, dict):
        return {k: _without_created(v) for k, v in meta.items() if k != "created_utc"}
    if isinstance(meta, list):
        return [_without_created(v) for v in meta]
    return meta


def metadata_of(path: Path) -> dict[str, object]:
    """Every zarr.json under ``path``, by relative path, less ``created_utc``."""
    return {
        str(meta.relative_to(path)): _without_created(json.loads(meta.read_text()))
        for meta in sorted(path.rglob("zarr.json"))
    }


@dataclass(frozen=True)
class GrowthCheck:
    """The untimed incremental run made before the rounds, against a fresh run over the grown source."""

    report: dict[str, Any]
    same_chunk_files: bool
    same_metadata: bool
    num_bytes: int


def check_growth_output(setup: GrowthSetup) -> GrowthCheck:
    """Once, untimed: grow, run incrementally, and compare DEST with a fresh run's over the
    grown source (the same chunk files as the big source; the same SOURCE path, so the
    provenance attributes match but for ``created_utc``)."""
    append_new_rows(setup)
    report_path = setup.work / "report-check.json"
    print("untimed incremental run (checked against a fresh run) ...", file=sys.stderr, flush=True)
    run_child(relu_dask_argv(setup.grown, setup.dest, "--report", str(report_path)), timeout_s=CHILD_TIMEOUT_S)
    report = json.loads(report_path.read_text())
    reference = setup.work / "reference.zarr"
    print("untimed fresh run over the grown source (the reference) ...", file=sys.stderr, flush=True)
    run_child(relu_dask_argv(setup.grown, reference, "--overwrite"), timeout_s=CHILD_TIMEOUT_S)
    num_bytes, digest = tree_digest(setup.dest)
    check = GrowthCheck(
        report=report,
        same_chunk_files=digest == tree_digest(reference)[1],
        same_metadata=metadata_of(setup.dest) == metadata_of(reference),
        num_bytes=num_bytes,
    )
    remove(reference)
    return check


@dataclass
class GrowthContender:
    key: str
    label: str
    argv: list[str]
    prepare: Callable[[], None]
    results: list[ChildResult] = field(default_factory=list)
    reports: list[dict[str, Any]] = field(default_factory=list)


def warm_chunk_rows(path: Path, chunk_rows: range) -> None:
    for i in chunk_rows:
        warm_page_cache(path / "c" / str(i))


def run_growth(args: argparse.Namespace, old_gib: float, new_gib: float) -> None:
    """An incremental run after ``new_gib`` was appended to ``old_gib``, against a fresh run
    over a ``new_gib`` source: the issue's target is at most 1.15x its wall, and reading at
    most the new rows plus one block."""
    setup = make_growth_setup(args.data_dir, old_gib, new_gib)
    check = check_growth_output(setup)
    warm_page_cache(setup.fresh_src)
    warm_chunk_rows(setup.big, range(setup.old_chunk_rows, setup.all_chunk_rows))
    report_path = setup.work / "report.json"
    fresh_dst = setup.work / "mask-fresh.zarr"

    def prepare_incremental() -> None:
        restore_old_state(setup)
        append_new_rows(setup)

    contenders = [
        GrowthContender(
            "incremental",
            f"relu-dask incremental: {size_tag(old_gib)} + {size_tag(new_gib)} appended, run again",
            relu_dask_argv(setup.grown, setup.dest, "--report", str(report_path)),
            prepare_incremental,
        ),
        GrowthContender(
            "fresh",
            f"relu-dask fresh {size_tag(new_gib)} (--overwrite)",
            relu_dask_argv(setup.fresh_src, fresh_dst, "--overwrite", "--report", str(report_path)),
            lambda: remove(fresh_dst),
        ),
    ]
    for rnd in range(args.rounds):
        shift = rnd % len(contenders)
        for c in contenders[shift:] + contenders[:shift]:
            report_path.unlink(missing_ok=True)
            result = run_prepared(c.argv, c.prepare, args.max_other_load)
            c.results.append(result)
            c.reports.append(json.loads(report_path.read_text()))
            print(f"  round {rnd + 1}: {c.key:12s} {result.wall_s:7.2f} s", file=sys.stderr, flush=True)
    new_bytes = setup.new_rows * UNITS * 4
    print_growth(contenders, check, setup, new_bytes, args.rounds)
    warning = check_parent_small([r for c in contenders for r in c.results])
    remove(setup.work)
    if warning:
        print(f"\n{warning}")


def _array_report(report: dict[str, Any]) -> dict[str, Any]:
    arrays = report["arrays"]
    assert len(arrays) == 1, "the benchmark's sources are single arrays"
    return dict(arrays[0])


def read_bound(report: dict[str, Any], new_bytes: int) -> int:
    """The issue's bound on an incremental run's reads: the new rows plus one block (float32)."""
    return new_bytes + math.prod(int(n) for n in _array_report(report)["block_shape"]) * 4


def print_growth(
    contenders: list[GrowthContender], check: GrowthCheck, setup: GrowthSetup, new_bytes: int, rounds: int
) -> None:
    old_gib, new_gib = setup.old_rows * UNITS * 4 / GIB, new_bytes / GIB
    stats: dict[str, dict[str, float]] = {}
    rows = []
    for c in contenders:
        walls = [r.wall_s for r in c.results]
        rss = [r.peak_rss_bytes for r in c.results]
        reads = [float(rep["bytes_read"]) for rep in c.reports]
        stats[c.key] = {"wall": median(walls), "work": median([float(rep["wall_s"]) for rep in c.reports])}
        rows.append(
            [
                c.label,
                f"{stats[c.key]['wall']:.2f}",
                f"{stats[c.key]['work']:.2f}",
                f"{new_bytes / stats[c.key]['wall'] / 1e9:.3f}",
                f"{median(rss) / MIB:.0f} ({max(rss) / MIB:.0f})",
                f"{median(reads):,.0f}",
                f"{median([r.cpu_s for r in c.results]):.2f}",
                f"{median([r.other_load for r in c.results]):.2f}",
            ]
        )
    print(
        f"### Growth: {size_tag(new_gib)} appended to {size_tag(old_gib)} float32, "
        f"median of {rounds} interleaved round(s)\n"
    )
    headers = ["contender", "wall s", "work s", "GB/s of new rows", "peak RSS MiB median (max)", "bytes read"]
    headers += ["CPU s", "other load (cores)"]
    print(markdown_table(headers, rows))
    print(
        "\nwall: process start to exit; work: the run report's wall_s; GB/s: the new rows' uncompressed bytes "
        f"({new_bytes:,} B) per second of wall, for both contenders; bytes read: the report's bytes_read."
    )

    print("\n### The incremental run's report (the untimed checked run, then each round)\n")
    rep_rows = []
    expected = [setup.old_rows, UNITS]
    reads_ok = grown_ok = True
    incremental = contenders[0]
    for name, rep in [("check", check.report)] + [(f"round {i + 1}", r) for i, r in enumerate(incremental.reports)]:
        entry = _array_report(rep)
        bound = read_bound(rep, new_bytes)
        read = int(rep["bytes_read"])
        grown_ok &= entry["grown_from"] == expected
        reads_ok &= read <= bound
        rep_rows.append(
            [
                name,
                entry["grown_from"],
                ",".join(str(b) for b in entry["block_shape"]),
                entry["blocks_kept"],
                entry["tasks_done_now"],
                f"{read:,}",
                f"{bound:,}",
                "yes" if read <= bound else "**no**",
                f"{float(rep['wall_s']):.2f}",
            ]
        )
    headers = ["run", "grown_from", "block_shape", "blocks_kept", "tasks_done_now", "bytes_read"]
    headers += ["bound (new rows + one block)", "within", "wall_s"]
    print(markdown_table(headers, rep_rows, align="llllrrrlr"))
    same = check.same_chunk_files and check.same_metadata
    print(
        f"\nIncremental DEST vs a fresh run over the grown {size_tag(old_gib + new_gib)} source "
        f"({check.num_bytes:,} B on disk): chunk files {'identical' if check.same_chunk_files else '**DIFFERENT**'}, "
        f"metadata less created_utc {'identical' if check.same_metadata else '**DIFFERENT**'} -> "
        f"{'same' if same else '**not the same**'}"
    )

    ratio = stats["incremental"]["wall"] / stats["fresh"]["wall"]
    work_ratio = stats["incremental"]["work"] / stats["fresh"]["work"]
    print(f"\nIncremental work / fresh work (in-process, for information): {fmt_ratio(work_ratio)}")
    print(
        f"Target: incremental wall <= {TARGET_GROWTH_VS_FRESH}x a fresh run over {size_tag(new_gib)}: "
        f"{fmt_ratio(ratio)}x -> {'met' if ratio <= TARGET_GROWTH_VS_FRESH else '**not met**'}"
    )
    print(
        f"Target: incremental reads <= the new rows + one block, grown_from == {expected}: "
        f"{'met' if reads_ok and grown_ok else '**not met**'}"
        + ("" if grown_ok else " (grown_from differs)")
        + ("" if reads_ok else " (read more than the bound)")
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--quick", action="store_true", help="a 256 MiB array, 1 round: a smoke test")
    parser.add_argument("--sizes", help="GiB of float32, comma-separated (e.g. 1,4,16): relu-dask's RSS and wall")
    parser.add_argument(
        "--growth",
        action="store_true",
        help="an incremental run after 1 GiB is appended to 4 GiB, against a fresh 1 GiB run "
        "(with --quick: 128 MiB appended to 512 MiB)",
    )
    parser.add_argument(
        "--max-other-load",
        type=float,
        help="rerun a child (twice at most) when other processes kept more than this many cores busy",
    )
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help=f"default: {DEFAULT_DATA_DIR}")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        name, *params = args.child
        print(json.dumps(_CHILDREN[name](*params)))
        return
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    print_facts(extra=[("bytecode", compile_bytecode())])
    if args.growth:
        if args.quick:
            args.rounds = 1
            run_growth(args, 0.5, 0.125)
        else:
            run_growth(args, 4.0, 1.0)
    elif args.sizes:
        run_sizes(args, [float(s) for s in args.sizes.split(",")])
    elif args.quick:
        args.rounds = 1
        run_main(args, 0.25)
    else:
        run_main(args, 1.0)


if __name__ == "__main__":
    main()
