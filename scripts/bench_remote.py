"""Object-store benchmark: relu-dask against naive dask and a zarr thread-pool loop, on S3.

An S3 endpoint is started on 127.0.0.1 in a process of its own: moto's S3 WSGI application
(moto is a test dependency) served by werkzeug's threaded server behind a fixed delay per
request (``--latency-ms``, a first-byte latency; each request sleeps in its own thread, so
concurrent requests overlap as they would against a real store). The data: seeded float32
activations, ``--size-mib`` of them (default 256: 16384 x 4096), chunks 1024 x 1024, Zarr v3
with zarr's default codecs, the array ``acts`` (dimensions ``sample``, ``unit``) of a group
that xarray opens as a Dataset, uploaded once per latency.

The contenders, each a whole fresh process, interleaved round by round (order rotated), every
output deleted before each start:

* **relu-dask** -- ``python -m relu_dask run s3://... s3://... --storage-options JSON``,
  default options;
* **naive dask** -- ``(da.from_zarr(src) >= 0).astype('i1').to_zarr(dst)`` over s3fs;
* **xarray** -- ``(xr.open_zarr(src) >= 0).astype('i1').to_zarr(dst)`` over s3fs, dask's
  default scheduler;
* **zarr loop** -- zarr's public API, 32 threads, one chunk each (read, mask, write), over
  ``zarr.storage.ObjectStore`` with obstore where obstore is installed, else over s3fs;
* **tensorstore** -- its ``s3`` kvstore and ``zarr3`` driver, slabs of 1024 rows read, masked
  and written with 8 slabs in flight (where tensorstore is installed);
* **store floor** -- not a contender: only the requests any tool must make, all at once
  (every source chunk read, an object of one bit per value written for each), no zarr, no
  decoding, no masks; on this endpoint no tool finishes sooner. Its output is not checked.

Every contender's output is compared with numpy's masks of the source, value for value.
Printed: the machine, then per latency a table of medians (wall, GB/s, peak RSS, CPU seconds
of the contender and of the server meanwhile: where both share a few cores, what they ask of
them) with each contender's ratio to relu-dask. With ``--trace`` the server logs every
request, and a second table says, per contender, how many requests it made and when (after
its process was started) the first came, the first source chunk was asked for, the last was
read back, the last chunk was written and the last request answered: where a run's time goes
between start-up, round trips and chunks. Usage::

    python scripts/bench_remote.py --latency-ms 0,30,100 --rounds 3
    python scripts/bench_remote.py --quick     # 32 MiB, 1 round: a smoke test
    python scripts/bench_remote.py --size-mib 4096 --latency-ms 30 --rounds 1 --contenders relu-dask
    python scripts/bench_remote.py --contenders "zarr loop" --relu-dask-args "--workers 64"
    python scripts/bench_remote.py --latency-ms 100 --contenders "zarr loop,store floor" --trace
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from _bench_util import MIB, ChildResult, markdown_table, median, print_facts, run_child

BUCKET = "bench"
UNITS = 4096
CHUNKS = (1024, 1024)
LOOP_THREADS = 32
CHILD_TIMEOUT_S = 3600.0
KEYS = {"key": "testing", "secret": "testing"}
FLOOR = "store floor"


# --------------------------------------------------------------------------- children


def _child_serve(port: str, latency_ms: str, trace: str = "") -> None:
    """The S3 endpoint: moto's S3 application behind a delay per request, until killed.

    moto's S3 application itself, not its router of every AWS service
    (``DomainDispatcherApplication``, which works out the service of each request under a
    lock, looking at moto's modules on disk), and no log line per request: the server shares
    the machine's cores with the run it serves, and its CPU per request is not what a real
    store costs its client (about a third of its CPU went to both; docs/performance.md).
    ``trace``: a file that gets a line per request once its response is sent (``--trace``).
    """
    import logging
    import threading

    from moto.moto_server.werkzeug_app import MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    app = create_backend_app("s3")
    delay_s = float(latency_ms) / 1000
    log = open(trace, "a", buffering=1) if trace else None  # noqa: SIM115 - open until killed
    lock = threading.Lock()

    def delayed(environ: dict, start_response: object) -> object:
        began = time.time()
        time.sleep(delay_s)
        body = app(environ, start_response)  # type: ignore[arg-type]
        return body if log is None else _sent(body, began, environ, log, lock)

    make_server("127.0.0.1", int(port), delayed, threaded=True, request_handler=MotoRequestHandler).serve_forever()


def _sent(body: Any, began: float, environ: dict, log: Any, lock: Any) -> Iterator[bytes]:
    """``body`` as sent, then a line in ``log``: when the request came, when its response was
    sent (``time.time()``), its method and path (``?`` and the query's first key: ``list-type``,
    ``delete``)."""
    try:
        yield from body
    finally:
        if hasattr(body, "close"):
            body.close()
        query = environ.get("QUERY_STRING", "").split("=", 1)[0].split("&", 1)[0]
        with lock:
            log.write(f"{began:.6f} {time.time():.6f} {environ['REQUEST_METHOD']} {environ['PATH_INFO']}?{query}\n")


def _options(endpoint: str) -> dict[str, str]:
    return {"endpoint_url": endpoint, **KEYS}


def _child_generate(endpoint: str, rows: str) -> dict[str, float]:
    import numpy as np
    import s3fs
    import zarr

    s3fs.S3FileSystem(**_options(endpoint)).mkdir(BUCKET)
    shape = (int(rows), UNITS)
    group = zarr.open_group(store=f"s3://{BUCKET}/src.zarr", mode="w", storage_options=_options(endpoint))
    src = group.create_array("acts", shape=shape, chunks=CHUNKS, dtype="float32", dimension_names=("sample", "unit"))
    rng = np.random.default_rng(20261203)
    for start in range(0, shape[0], CHUNKS[0]):
        stop = min(start + CHUNKS[0], shape[0])
        src[start:stop] = rng.standard_normal((stop - start, UNITS), dtype=np.float32)
    return {}


def _child_naive(endpoint: str, dst: str) -> dict[str, float]:
    import dask.array as da

    options = _options(endpoint)
    (da.from_zarr(f"s3://{BUCKET}/src.zarr", component="acts", storage_options=options) >= 0).astype("i1").to_zarr(
        dst, component="acts", storage_options=options
    )
    return {}


def _child_xarray(endpoint: str, dst: str) -> dict[str, float]:
    import xarray as xr

    options = _options(endpoint)
    source = xr.open_zarr(f"s3://{BUCKET}/src.zarr", consolidated=False, storage_options=options)
    (source >= 0).astype("i1").to_zarr(dst, storage_options=options)
    return {}


def _child_tensorstore(endpoint: str, dst: str) -> dict[str, float]:
    import os

    import numpy as np
    import tensorstore as ts

    os.environ.update(AWS_ACCESS_KEY_ID=KEYS["key"], AWS_SECRET_ACCESS_KEY=KEYS["secret"])

    def kvstore(path: str) -> dict[str, str]:
        return {"driver": "s3", "bucket": BUCKET, "path": path, "endpoint": endpoint, "aws_region": "us-east-1"}

    src = ts.open({"driver": "zarr3", "kvstore": kvstore("src.zarr/acts/")}).result()
    out = ts.open(
        {"driver": "zarr3", "kvstore": kvstore(dst.removeprefix(f"s3://{BUCKET}/") + "/acts/")},
        create=True,
        dtype=ts.int8,
        shape=src.shape,
        chunk_layout=ts.ChunkLayout(chunk_shape=CHUNKS),
    ).result()
    pending: list[object] = []
    for start in range(0, src.shape[0], CHUNKS[0]):
        rows = slice(start, min(start + CHUNKS[0], src.shape[0]))
        values = src[rows].read().result()
        pending.append(out[rows].write((values >= 0).astype(np.int8)))
        if len(pending) >= 8:
            pending.pop(0).result()  # type: ignore[attr-defined]
    for write in pending:
        write.result()  # type: ignore[attr-defined]
    return {}


def _loop_store(endpoint: str, prefix: str) -> object:
    """obstore's S3 store through zarr's ObjectStore, or zarr's fsspec store where obstore is missing."""
    import zarr

    try:
        import obstore  # noqa: F401
    except ImportError:
        return zarr.storage.FsspecStore.from_url(f"s3://{BUCKET}/{prefix}", storage_options=_options(endpoint))
    return zarr.storage.ObjectStore(_s3_store(endpoint, prefix))


def _s3_store(endpoint: str, prefix: str | None = None) -> object:
    """obstore's S3 store of the bucket (under ``prefix``) at the endpoint."""
    from obstore.store import S3Store

    return S3Store(
        BUCKET,
        prefix=prefix,
        endpoint=endpoint,
        access_key_id=KEYS["key"],
        secret_access_key=KEYS["secret"],
        region="us-east-1",
        virtual_hosted_style_request=False,
        client_options={"allow_http": True},
    )


def _child_loop(endpoint: str, dst: str) -> dict[str, float]:
    import itertools
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import zarr

    src = zarr.open_array(_loop_store(endpoint, "src.zarr/acts"), mode="r")
    out = zarr.create_array(
        _loop_store(endpoint, dst.removeprefix(f"s3://{BUCKET}/") + "/acts"),
        shape=src.shape,
        chunks=src.chunks,
        dtype="int8",
        fill_value=0,
    )
    starts = itertools.product(*(range(0, n, c) for n, c in zip(src.shape, src.chunks)))

    def task(start: tuple[int, ...]) -> None:
        region = tuple(slice(s, min(s + c, n)) for s, c, n in zip(start, src.chunks, src.shape))
        out[region] = (np.asarray(src[region]) >= 0).astype(np.int8)

    with ThreadPoolExecutor(LOOP_THREADS) as pool:
        list(pool.map(task, starts))
    return {}


def _child_floor(endpoint: str, dst: str) -> dict[str, float]:
    """The store's floor, not a contender: the requests any tool must make, and nothing else.

    obstore alone (no zarr, numpy or codecs): the source's ``zarr.json`` read, then every
    source chunk object read and an object of one bit per value (a mask of random signs
    cannot be stored in fewer bytes) written, all at once, each write after its read. What
    it writes is not a mask; no tool that writes real masks can finish before it.
    """
    from concurrent.futures import ThreadPoolExecutor

    import obstore

    store = _s3_store(endpoint)
    out = dst.removeprefix(f"s3://{BUCKET}/") + "/acts"
    payload = bytes(CHUNKS[0] * CHUNKS[1] // 8)

    def one(key: str) -> None:
        obstore.get(store, f"src.zarr/acts/{key}").bytes()
        obstore.put(store, f"{out}/{key}", payload)

    meta = obstore.get(store, "src.zarr/acts/zarr.json").bytes()
    shape = json.loads(bytes(meta))["shape"]
    keys = [f"c/{i}/{j}" for i in range(-(-shape[0] // CHUNKS[0])) for j in range(-(-shape[1] // CHUNKS[1]))]
    with ThreadPoolExecutor(len(keys) + 1) as pool:  # obstore's calls release the GIL
        list(pool.map(one, keys))
        obstore.put(store, f"{out}/zarr.json", meta)
    return {}


def _child_check(endpoint: str, dst: str) -> dict[str, float]:
    """Whether ``dst`` holds numpy's masks of the source, value for value."""
    import numpy as np
    import zarr

    options = _options(endpoint)
    src = zarr.open_array(f"s3://{BUCKET}/src.zarr/acts", mode="r", storage_options=options)
    out = zarr.open_array(f"{dst}/acts", mode="r", storage_options=options)
    equal = out.shape == src.shape and out.dtype == np.int8
    for start in range(0, src.shape[0], 4 * CHUNKS[0]) if equal else []:
        rows = slice(start, start + 4 * CHUNKS[0])
        equal = equal and np.array_equal(np.asarray(out[rows]), (np.asarray(src[rows]) >= 0).astype(np.int8))
    return {"equal": float(equal)}


def _child_remove(endpoint: str, dst: str) -> dict[str, float]:
    import s3fs

    fs = s3fs.S3FileSystem(**_options(endpoint))
    if fs.exists(dst):  # DEST and its record inside it
        fs.rm(dst, recursive=True)
    return {}


_CHILDREN = {
    "generate": _child_generate,
    "naive dask": _child_naive,
    "xarray": _child_xarray,
    "zarr loop": _child_loop,
    "tensorstore": _child_tensorstore,
    FLOOR: _child_floor,
    "check": _child_check,
    "remove": _child_remove,
}
CONTENDERS = ("relu-dask", "naive dask", "xarray", "zarr loop", "tensorstore", FLOOR)


# --------------------------------------------------------------------------- driver


def _child(*params: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", *params]


def _contender(name: str, endpoint: str, dst: str, extra: Sequence[str] = ()) -> list[str]:
    """The command of a contender: relu-dask as a user runs it (``python -m relu_dask``, which
    sets up its process and exits quickly after; ``extra``: more of its options), the others
    as this script's children."""
    if name != "relu-dask":
        return _child(name, endpoint, dst)
    options = ["--storage-options", json.dumps(_options(endpoint)), "--quiet", *extra]
    return [sys.executable, "-m", "relu_dask", "run", f"s3://{BUCKET}/src.zarr", dst, *options]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_endpoint(latency_ms: float, trace: str = "") -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    server = subprocess.Popen(_child("serve", str(port), str(latency_ms), trace), stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(400):
        try:
            urllib.request.urlopen(endpoint, timeout=2).close()
            return server, endpoint
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise RuntimeError("the S3 endpoint did not start")


def contenders() -> tuple[str, ...]:
    """The contenders this machine can run (tensorstore where it is installed)."""
    try:
        import tensorstore  # noqa: F401
    except ImportError:
        return tuple(name for name in CONTENDERS if name != "tensorstore")
    return CONTENDERS


def run_latency(
    latency_ms: float,
    rows: int,
    rounds: int,
    only: Sequence[str] = (),
    extra: Sequence[str] = (),
    timelines: list[list[object]] | None = None,
) -> list[list[object]]:
    """The table's rows for one latency; ``timelines``: where to add the rows of the requests'
    timeline table (``--trace``), else the server logs no request."""
    import psutil  # distributed's dependency

    names = tuple(name for name in contenders() if not only or name in only)
    trace = Path(f"/tmp/.bench-remote-{os.getpid()}.trace")
    trace.unlink(missing_ok=True)
    server, endpoint = start_endpoint(latency_ms, str(trace) if timelines is not None else "")
    try:
        run_child(_child("generate", endpoint, str(rows)), timeout_s=CHILD_TIMEOUT_S)
        results: dict[str, list[ChildResult]] = {name: [] for name in (*names, RERUN, STARTUP)}
        served: dict[str, list[float]] = {name: [] for name in results}  # the server's CPU s meanwhile
        traced: dict[str, list[dict[str, float]]] = {name: [] for name in results}

        def measure(name: str, argv: list[str]) -> ChildResult:
            before = psutil.Process(server.pid).cpu_times()
            spawned, seen = time.time(), trace.stat().st_size if trace.exists() else 0
            result = run_child(argv, timeout_s=CHILD_TIMEOUT_S)
            after = psutil.Process(server.pid).cpu_times()
            results[name].append(result)
            served[name].append(after.user + after.system - before.user - before.system)
            if timelines is not None:
                time.sleep(0.05)  # the server logs a request once its response is sent: the last one too
                traced[name].append(_timeline(trace, seen, spawned, result.wall_s))
            return result

        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                dst = _dst(name)
                run_child(_child("remove", endpoint, dst), timeout_s=CHILD_TIMEOUT_S)
                result = measure(name, _contender(name, endpoint, dst, extra))
                print(f"  {latency_ms:g} ms, round {r + 1}: {name:12s} {result.wall_s:6.2f} s", flush=True)
            # relu-dask again on the complete DEST it left, and the start-up it cannot go below
            measure(RERUN, _contender("relu-dask", endpoint, _dst("relu-dask"), extra))
            measure(STARTUP, [sys.executable, "-m", "relu_dask", "--help"])
        checks = {
            name: json.loads(run_child(_child("check", endpoint, _dst(name))).stdout)["equal"]
            for name in names
            if name != FLOOR
        }
    finally:
        server.kill()
        server.wait()
        trace.unlink(missing_ok=True)
    if timelines is not None:
        timelines.extend(_timeline_rows(latency_ms, traced))
    size = rows * UNITS * 4
    relu_wall = median([r.wall_s for r in results["relu-dask"]])
    rows_out: list[list[object]] = []
    for name in (*names, RERUN, STARTUP):
        wall = median([r.wall_s for r in results[name]])
        rss = median([r.peak_rss_bytes for r in results[name]]) / MIB
        cpu = median([r.user_s + r.sys_s for r in results[name]])
        moved = name not in (RERUN, STARTUP)
        exact = checks.get(name if moved else "relu-dask" if name == RERUN else "", "-")
        exact = {1.0: "yes", 0.0: "**NO**"}.get(exact, exact)
        rows_out.append(
            [
                f"{latency_ms:g}",
                name,
                f"{wall:.2f}",
                f"{size / wall / 1e9:.3f}" if moved else "-",
                f"{wall / relu_wall:.2f}",
                f"{rss:.0f}",
                f"{cpu:.2f}",
                f"{median(served[name]):.2f}",
                exact,
            ]
        )
    return rows_out


#: The columns of the timeline table (``--trace``): seconds after the process was started.
TIMELINE = {
    "requests": "requests",
    "first": "first request s",
    "first_read": "first chunk read sent s",
    "last_read": "last chunk read back s",
    "last_write": "last chunk written s",
    "last": "last request answered s",
    "wall": "exit s",
}


def _timeline(trace: Path, offset: int, spawned: float, wall_s: float) -> dict[str, float]:
    """One run's requests, from the server's log (what it logged past ``offset``, of requests
    that came after ``spawned``): how many, and when (seconds after ``spawned``) the first
    came, the first source chunk was asked for, the last was sent back, the last chunk of a
    DEST was written, the last request was answered."""
    with trace.open() as log:
        log.seek(offset)
        lines = [line.split() for line in log.read().splitlines()]
    requests = [(float(a) - spawned, float(b) - spawned, method, path) for a, b, method, path in lines]
    requests = [r for r in requests if r[0] >= 0]
    reads = [r for r in requests if r[2] == "GET" and "/src.zarr/acts/c/" in r[3]]
    writes = [r for r in requests if r[2] == "PUT" and "/c/" in r[3]]
    nan = float("nan")
    return {
        "requests": len(requests),
        "first": min((r[0] for r in requests), default=nan),
        "first_read": min((r[0] for r in reads), default=nan),
        "last_read": max((r[1] for r in reads), default=nan),
        "last_write": max((r[1] for r in writes), default=nan),
        "last": max((r[1] for r in requests), default=nan),
        "wall": wall_s,
    }


def _timeline_rows(latency_ms: float, traced: dict[str, list[dict[str, float]]]) -> list[list[object]]:
    rows: list[list[object]] = []
    for name, runs in traced.items():
        cells: list[object] = [f"{latency_ms:g}", name]
        for key in TIMELINE:
            value = median([run[key] for run in runs])
            cells.append("-" if value != value else f"{value:.0f}" if key == "requests" else f"{value:.2f}")
        rows.append(cells)
    return rows


RERUN = "relu-dask rerun (DEST complete)"
STARTUP = "relu-dask --help (start-up)"


def _dst(name: str) -> str:
    return f"s3://{BUCKET}/out-{name.replace(' ', '-')}.zarr"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-ms", default="0,30,100", help="per-request delays in ms (default 0,30,100)")
    parser.add_argument("--size-mib", type=int, default=256, help="float32 MiB of source (default 256)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--quick", action="store_true", help="32 MiB, 1 round: a smoke test")
    parser.add_argument(
        "--contenders",
        default="",
        help=f"a comma-separated subset of {', '.join(CONTENDERS)} (default all; relu-dask always runs)",
    )
    parser.add_argument("--relu-dask-args", default="", help="more options for relu-dask's runs, e.g. '--workers 64'")
    parser.add_argument(
        "--trace",
        action="store_true",
        help="the server logs every request; print when each run's requests came (a second table)",
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        name, *params = args.child
        if name == "serve":
            _child_serve(*params)
            return
        print(json.dumps(_CHILDREN[name](*params)))
        return
    if args.quick:
        args.size_mib, args.rounds = 32, 1
    rows = args.size_mib * MIB // (UNITS * 4)
    try:
        import obstore  # noqa: F401

        loop = "zarr.storage.ObjectStore over obstore"
    except ImportError:
        loop = "zarr's FsspecStore over s3fs (obstore is not installed)"
    print_facts(
        extra=[
            ("zarr loop", f"{LOOP_THREADS} threads, {loop}"),
            ("relu-dask options", args.relu_dask_args or "defaults"),
        ]
    )
    print(f"\nsource: {rows} x {UNITS} float32 ({args.size_mib} MiB), chunks {CHUNKS[0]} x {CHUNKS[1]}")
    table: list[list[object]] = []
    only = {"relu-dask", *(n.strip() for n in args.contenders.split(",") if n.strip())} if args.contenders else set()
    if unknown := only - set(CONTENDERS):
        parser.error(f"--contenders: unknown {', '.join(sorted(unknown))}")
    timelines: list[list[object]] | None = [] if args.trace else None
    for latency in (float(v) for v in args.latency_ms.split(",")):
        table.extend(run_latency(latency, rows, args.rounds, tuple(only), shlex.split(args.relu_dask_args), timelines))
    print()
    headers = [
        "latency ms",
        "contender",
        "wall s",
        "GB/s",
        "wall / relu-dask wall",
        "peak RSS MiB",
        "CPU s",
        "server CPU s",
        "exact",
    ]
    print(markdown_table(headers, table))
    if timelines is not None:
        print("\nRequests as the server saw them (medians; seconds after the process was started):\n")
        print(markdown_table(["latency ms", "contender", *TIMELINE.values()], timelines))


if __name__ == "__main__":
    main()
