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
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

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
    from relu_dask.demo import DEMO_SEED
    from relu_dask.storage import write_synthetic_activations

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
            stats = ["--stats"] if self.key == "relu-dask-stats" else []
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
    """Bytes on disk and a digest of every chunk file (not the metadata) under ``path``."""
    digest = hashlib.blake2b(digest_size=16)
    total = 0
    for root, dirs, files in os.walk(path):
        dirs.sort()
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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--quick", action="store_true", help="a 256 MiB array, 1 round: a smoke test")
    parser.add_argument("--sizes", help="GiB of float32, comma-separated (e.g. 1,4,16): relu-dask's RSS and wall")
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
    if args.sizes:
        run_sizes(args, [float(s) for s in args.sizes.split(",")])
    elif args.quick:
        args.rounds = 1
        run_main(args, 0.25)
    else:
        run_main(args, 1.0)


if __name__ == "__main__":
    main()
