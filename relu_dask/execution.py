"""Schedulers and running a job: the one place that computes.

Use :func:`run` to compute the masks of SOURCE into DEST (the CLI's ``run`` and ``plan``
call it), :func:`parse_scheduler` to turn ``--scheduler`` into a :class:`SchedulerSpec`
and :func:`open_session` to get a scheduler ready for :func:`compute`.

Schedulers, picked by name and imported lazily (distributed only when asked for):

* ``synchronous`` -- one task at a time in this thread (for debugging);
* ``threads`` -- dask's thread pool, one thread per core (the default);
* ``processes`` -- dask's process pool, one process per core;
* ``local`` -- a ``dask.distributed`` LocalCluster started for the run, dashboard on
  127.0.0.1;
* ``tcp://HOST:PORT`` -- an existing ``dask.distributed`` scheduler.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import dask
import numpy as np
from dask.base import tokenize
from dask.callbacks import Callback

from relu_dask import chunking, storage
from relu_dask.errors import InputError, NaNFoundError, ProcessingError, ReluDaskError
from relu_dask.graph import COUNT_FIELDS, TASK_PREFIX, MaskJob, build_mask_tasks
from relu_dask.kernel import Engine, choose_engine, count_cores, parse_at_zero, parse_nan_policy, rule_for
from relu_dask.report import ArrayReport, RunReport, collect_versions, write_report

__all__ = [
    "LOCAL_SCHEDULERS",
    "Progress",
    "SchedulerSpec",
    "Session",
    "compute",
    "open_session",
    "parse_scheduler",
    "run",
]

log = logging.getLogger(__name__)

LOCAL_SCHEDULERS = ("synchronous", "threads", "processes")
_SCHEDULERS = (*LOCAL_SCHEDULERS, "local")
Progress = Literal["auto", "bar", "log", "none"]

#: Seconds between progress lines when the output is not a terminal.
PROGRESS_INTERVAL_S = 10.0
#: Seconds to wait for an existing scheduler to answer before giving up.
CONNECT_TIMEOUT_S = 10.0
#: Seconds to wait for a LocalCluster and its client to close.
CLOSE_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class SchedulerSpec:
    """Which scheduler to run on, and how to size it."""

    name: str
    """synchronous, threads, processes, local or address."""
    address: str | None = None
    """The scheduler's address, for ``name == "address"``."""
    num_workers: int | None = None
    """Workers (local) or pool size (threads, processes); default: fitted to the machine."""
    threads_per_worker: int | None = None
    """Threads per LocalCluster worker; default: fitted to the machine."""
    memory_limit_bytes: int | None = None
    """Memory limit per LocalCluster worker; default: the machine's memory shared out."""
    dashboard_address: str = "127.0.0.1:8787"
    """Where a LocalCluster serves its dashboard."""
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    """Seconds to wait for an existing scheduler before giving up."""

    @property
    def label(self) -> str:
        return self.address if self.name == "address" and self.address else self.name


def parse_scheduler(
    text: str,
    *,
    num_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | int | None = None,
    dashboard_address: str = "127.0.0.1:8787",
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
) -> SchedulerSpec:
    """Parse ``--scheduler`` and its sizing options.

    >>> parse_scheduler("tcp://127.0.0.1:8786").name
    'address'
    """
    value = str(text).strip()
    for what, number in (("workers", num_workers), ("threads per worker", threads_per_worker)):
        if number is not None and number < 1:
            raise InputError(f"the number of {what} must be at least 1, got {number}")
    limit = None if memory_limit in (None, "auto") else chunking.parse_bytes(memory_limit, what="memory limit")
    if "://" in value:
        if not value.startswith(("tcp://", "tls://", "inproc://", "ws://", "wss://")):
            raise InputError(f"scheduler address {value!r} must start with tcp:// (or tls://)")
        if not connect_timeout_s > 0:
            raise InputError(f"the connect timeout must be positive seconds, got {connect_timeout_s}")
        return SchedulerSpec("address", value, connect_timeout_s=float(connect_timeout_s))
    if value not in _SCHEDULERS:
        raise InputError(f"scheduler must be one of {', '.join(_SCHEDULERS)} or tcp://HOST:PORT, got {value!r}")
    return SchedulerSpec(value, None, num_workers, threads_per_worker, limit, dashboard_address)


@dataclass
class Session:
    """A scheduler ready to compute on."""

    spec: SchedulerSpec
    num_threads: int
    """Tasks that run at once."""
    cores_per_thread: int
    """Cores each task may use (numexpr threads are sized from it)."""
    memory_per_thread_bytes: int | None
    """Memory one task may use, for the planner's check."""
    client: Any = None
    """The ``distributed.Client``, for distributed schedulers."""
    dashboard_link: str | None = None


def plan_session(spec: SchedulerSpec) -> Session:
    """A session's sizing, without starting anything (what a dry run shows)."""
    cores = count_cores()
    memory = _total_memory_bytes()
    if spec.name == "synchronous":
        return Session(spec, 1, cores, memory)
    if spec.name in ("threads", "processes"):
        workers = spec.num_workers or cores
        return Session(spec, workers, max(1, cores // workers), memory // workers)
    if spec.name == "local":
        workers, threads = _local_sizes(spec, cores)
        limit = spec.memory_limit_bytes or memory // workers
        return Session(spec, workers * threads, max(1, cores // (workers * threads)), limit // threads)
    return Session(spec, 0, 1, None)  # an existing cluster: known once connected


def _local_sizes(spec: SchedulerSpec, cores: int) -> tuple[int, int]:
    if spec.num_workers and spec.threads_per_worker:
        return spec.num_workers, spec.threads_per_worker
    if spec.num_workers:
        return spec.num_workers, max(1, cores // spec.num_workers)
    if spec.threads_per_worker:
        return max(1, cores // spec.threads_per_worker), spec.threads_per_worker
    from distributed.deploy.utils import nprocesses_nthreads

    workers, threads = nprocesses_nthreads(cores)
    return int(workers), int(threads)


def _total_memory_bytes() -> int:
    import psutil  # a dependency of distributed

    return int(psutil.virtual_memory().total)


@contextlib.contextmanager
def open_session(spec: SchedulerSpec) -> Iterator[Session]:
    """Start (or connect to) the scheduler; close what was started on the way out."""
    session = plan_session(spec)
    if spec.name in LOCAL_SCHEDULERS:
        yield session
        return
    if spec.name == "local":
        with _local_cluster(spec, session) as started:
            yield started
        return
    with _connect(spec) as connected:
        yield connected


@contextlib.contextmanager
def _local_cluster(spec: SchedulerSpec, session: Session) -> Iterator[Session]:
    from distributed import Client, LocalCluster

    workers, threads = _local_sizes(spec, count_cores())
    limit: int | str = spec.memory_limit_bytes or "auto"
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=threads,
        memory_limit=limit,
        host="127.0.0.1",
        dashboard_address=spec.dashboard_address,
        processes=True,
        # A failed task is reported once, as one line, by relu-dask; the workers' own
        # tracebacks are for --debug.
        silence_logs=logging.WARNING if log.isEnabledFor(logging.DEBUG) else logging.CRITICAL,
    )
    try:
        client = Client(cluster)
        try:
            session.client = client
            session.dashboard_link = client.dashboard_link
            log.info(
                "started a LocalCluster: %d worker(s) x %d thread(s), dashboard %s",
                workers,
                threads,
                client.dashboard_link,
            )
            yield session
        finally:
            client.close(timeout=CLOSE_TIMEOUT_S)
    finally:
        cluster.close(timeout=CLOSE_TIMEOUT_S)


@contextlib.contextmanager
def _connect(spec: SchedulerSpec) -> Iterator[Session]:
    from distributed import Client

    try:
        client = Client(spec.address, timeout=f"{spec.connect_timeout_s}s")
    except (OSError, TimeoutError) as exc:
        raise InputError(
            f"cannot reach the dask scheduler at {spec.address} within {spec.connect_timeout_s:g} s: "
            f"is it running? ({exc})"
        ) from None
    try:
        info = _scheduler_workers(client)
        if not info:
            raise InputError(
                f"the dask scheduler at {spec.address} has no workers: start some with `dask worker {spec.address}`"
            )
        threads = sum(int(w["nthreads"]) for w in info.values())
        per_thread = min(int(w["memory_limit"]) // max(1, int(w["nthreads"])) or 2**62 for w in info.values())
        yield Session(spec, threads, 1, per_thread, client, client.dashboard_link)
    finally:
        client.close(timeout=CLOSE_TIMEOUT_S)


def _scheduler_workers(client: Any) -> dict[str, Any]:
    """Every worker's info (recent distributed lists only the first few unless asked)."""
    try:
        return dict(client.scheduler_info(n_workers=-1)["workers"])
    except TypeError:  # distributed before 2025.4 has no n_workers and lists all
        return dict(client.scheduler_info()["workers"])


def compute(
    session: Session,
    collections: Sequence[Any],
    progress: Progress = "auto",
    progress_interval_s: float = PROGRESS_INTERVAL_S,
) -> list[Any]:
    """Compute dask ``collections`` on ``session`` with a progress display; return the results."""
    if not collections:
        return []
    mode = _progress_mode(progress)
    if session.client is not None:
        return _compute_distributed(session.client, collections, mode, progress_interval_s)
    num_tasks = sum(len(_block_keys(c)) for c in collections)
    with contextlib.ExitStack() as stack:
        if mode == "bar":
            from dask.diagnostics import ProgressBar

            stack.enter_context(ProgressBar(out=sys.stderr))
        elif mode == "log":
            stack.enter_context(_LogProgress(num_tasks, progress_interval_s))
        kwargs: dict[str, Any] = {"scheduler": session.spec.name}
        if session.spec.name != "synchronous":
            kwargs["num_workers"] = session.num_threads
        return list(dask.compute(*collections, **kwargs))


def _progress_mode(progress: Progress) -> str:
    if progress == "auto":
        return "bar" if sys.stderr.isatty() else "log"
    if progress not in ("bar", "log", "none"):
        raise InputError(f"progress must be auto, bar, log or none, got {progress!r}")
    return progress


def _is_block_key(key: Any) -> bool:
    name = key[0] if isinstance(key, tuple) else key
    return isinstance(name, str) and name.startswith(TASK_PREFIX)


def _block_keys(collection: Any) -> list[Any]:
    return [k for k in collection.__dask_graph__() if _is_block_key(k)]


class _LogProgress(Callback):
    """Plain progress lines at a steady interval, for logs that are not a terminal."""

    def __init__(self, num_tasks: int, interval_s: float = PROGRESS_INTERVAL_S) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.interval_s = interval_s
        self.done = 0
        self.last = time.monotonic()

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, id: Any) -> None:
        if not _is_block_key(key):
            return  # dask's own bookkeeping tasks (finalize, concatenate) are not blocks
        self.done += 1
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.last = now
            log.info(
                "progress: %d/%d tasks (%.0f%%)", self.done, self.num_tasks, 100 * self.done / max(1, self.num_tasks)
            )


def _compute_distributed(client: Any, collections: Sequence[Any], mode: str, interval_s: float) -> list[Any]:
    from distributed import futures_of, progress, wait

    persisted = client.persist(list(collections))
    futures = futures_of(persisted)
    if mode == "bar":
        progress(futures, notebook=False)
    elif mode == "log":
        last = time.monotonic()
        while True:
            try:
                wait(futures, timeout=1.0)
                break
            except TimeoutError:
                if time.monotonic() - last >= interval_s:
                    last = time.monotonic()
                    done = sum(f.done() for f in futures)
                    log.info("progress: %d/%d tasks (%.0f%%)", done, len(futures), 100 * done / max(1, len(futures)))
    else:
        wait(futures)
    return list(client.gather(client.compute(persisted)))


def run(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    chunks: chunking.ChunksSpec = "auto",
    dest_chunks: str | Sequence[int] | None = None,
    dest_shards: str | Sequence[int] | None = None,
    at_zero: int = 1,
    nan: str = "zero",
    engine: Engine = "auto",
    scheduler: str | SchedulerSpec = "threads",
    overwrite: bool = False,
    progress: Progress = "none",
    progress_interval_s: float = PROGRESS_INTERVAL_S,
    report_path: str | os.PathLike[str] | None = None,
    dry_run: bool = False,
) -> RunReport:
    """Compute the ReLU derivative masks of SOURCE into DEST and return the run report.

    Parameters
    ----------
    source
        A Zarr array or group (format 2 or 3). For a group, every real-numbered array is
        processed to the same path under DEST.
    dest
        Where to write the int8 masks (Zarr v3). Must not exist unless ``overwrite``.
    chunks
        The processing block: ``"auto"``, a byte size (``"256MiB"``) or a shape.
    dest_chunks, dest_shards
        The masks' chunk and shard shape (default: the source's).
    at_zero
        The mask at ``x == 0``: 1 (rule ``x >= 0``, default) or 0 (rule ``x > 0``).
    nan
        ``"zero"`` (NaN gives 0, default) or ``"error"`` (stop with :class:`NaNFoundError`,
        exit 2, naming the array and chunk; the partial DEST is removed).
    engine
        ``"auto"``, ``"numpy"`` or ``"numexpr"``; all give the same bits.
    scheduler
        A name (synchronous, threads, processes, local), a ``tcp://`` address, or a
        :class:`SchedulerSpec` from :func:`parse_scheduler`.
    overwrite
        Replace an existing DEST (only once the inputs have been validated).
    progress
        ``"auto"`` (a bar on a terminal, log lines otherwise), ``"bar"``, ``"log"``, ``"none"``.
    progress_interval_s
        Seconds between progress log lines (``"log"`` mode).
    report_path
        Also write the report there as JSON.
    dry_run
        Plan only: validate, print the plan, write nothing.
    """
    spec = scheduler if isinstance(scheduler, SchedulerSpec) else parse_scheduler(scheduler)
    rule = parse_at_zero(at_zero)
    nan_policy = parse_nan_policy(nan)
    chunks_spec = chunking.parse_chunks(chunks)
    arrays, skipped = storage.open_source(source)
    dest_path = storage.prepare_dest(source, dest, overwrite=overwrite)
    planned = plan_session(spec)
    plans = _plan_arrays(arrays, chunks_spec, dest_chunks, dest_shards, planned.memory_per_thread_bytes)
    report = _new_report(source, dest, rule, spec, planned, engine, chunks, arrays, plans, skipped)
    report.nan_policy = nan_policy
    if dry_run:
        report.outcome = "planned"
        return _finish(report, report_path)
    with open_session(spec) as session:
        if session.client is not None and spec.name == "address":
            plans = _plan_arrays(arrays, chunks_spec, dest_chunks, dest_shards, session.memory_per_thread_bytes)
        _describe_session(report, session, engine)
        if dest_path.exists():
            storage.remove_dest(dest_path, "--overwrite")
        jobs = _create_outputs(source, dest_path, arrays, plans, rule, report)
        tasks = [build_mask_tasks(job) for job in jobs]
        start = time.perf_counter()
        try:
            results = compute(session, [t for t in tasks if t is not None], progress, progress_interval_s)
        except NaNFoundError:
            storage.remove_dest(dest_path, "the source holds NaN and --nan is error")
            raise
        except ReluDaskError:
            raise
        except OSError as exc:
            raise ProcessingError(_describe_os_error(exc, dest_path)) from exc
        except Exception as exc:
            raise ProcessingError(f"failed while processing: {type(exc).__name__}: {exc}") from exc
        report.wall_s = time.perf_counter() - start
    _record_counts(report, arrays, tasks, iter(results), dest_path)
    return _finish(report, report_path)


def _describe_os_error(exc: OSError, dest: Path) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full while writing DEST {dest} ({exc.strerror}): free space, then rerun with --overwrite"
    return f"failed while reading SOURCE or writing DEST {dest}: {exc}; rerun with --overwrite once fixed"


def _plan_arrays(
    arrays: list[storage.SourceArray],
    chunks_spec: str | int | tuple[int, ...],
    dest_chunks: str | Sequence[int] | None,
    dest_shards: str | Sequence[int] | None,
    memory_limit: int | None,
) -> list[chunking.ChunkPlan]:
    plans = []
    for src in arrays:
        where = f" of {src.path}" if src.path else ""
        ndim = len(src.shape)
        chunk_shape = (
            chunking.parse_shape(dest_chunks, what=f"dest chunks{where}", ndim=ndim)
            if dest_chunks is not None
            else src.chunk_shape
        )
        shard_shape = (
            chunking.parse_shape(dest_shards, what=f"dest shards{where}", ndim=ndim)
            if dest_shards is not None
            else (src.shard_shape if dest_chunks is None else None)
        )
        try:
            plans.append(
                chunking.plan_chunks(
                    src.shape,
                    src.dtype.itemsize,
                    src.chunk_shape,
                    chunk_shape,
                    shard_shape,
                    chunks=chunks_spec,
                    memory_limit_bytes=memory_limit,
                )
            )
        except InputError as exc:
            raise InputError(f"{src.path}: {exc}" if src.path else str(exc)) from None
    return plans


def _new_report(
    source: Any,
    dest: Any,
    rule: int,
    spec: SchedulerSpec,
    session: Session,
    engine: Engine,
    chunks: Any,
    arrays: list[storage.SourceArray],
    plans: list[chunking.ChunkPlan],
    skipped: list[storage.Skipped],
) -> RunReport:
    report = RunReport(
        source=str(source),
        dest=str(dest),
        rule=rule_for(rule),
        scheduler=spec.label,
        engine="",
        num_threads=0,
        numexpr_threads=0,
        chunks=str(chunks),
        skipped=[{"path": s.path, "reason": s.reason} for s in skipped],
        versions=collect_versions(),
    )
    _describe_session(report, session, engine)
    for src, plan in zip(arrays, plans):
        report.arrays.append(
            ArrayReport(
                path=src.path,
                shape=list(src.shape),
                dtype=str(src.dtype),
                source_chunk_shape=list(src.chunk_shape),
                dest_chunk_shape=list(plan.dest_chunk_shape),
                dest_shard_shape=list(plan.dest_shard_shape) if plan.dest_shard_shape else None,
                block_shape=list(plan.block_shape),
                num_tasks=plan.num_tasks,
                read_aligned=plan.read_aligned,
                memory_per_task_bytes=plan.memory_per_task_bytes,
            )
        )
        report.warnings.extend(f"{src.path}: {n}" if src.path else n for n in plan.notes)
    return report


def _describe_session(report: RunReport, session: Session, engine: Engine) -> None:
    report.num_threads = session.num_threads
    report.numexpr_threads = session.cores_per_thread
    report.engine = choose_engine(engine, session.cores_per_thread)
    report.dashboard_link = session.dashboard_link


def _provenance(source: Any, src: storage.SourceArray | None, rule: int, nan_policy: str) -> dict[str, Any]:
    from relu_dask import __version__

    info: dict[str, Any] = {
        "source": str(Path(source).resolve()),
        "rule": rule_for(rule),
        "at_zero": rule,
        "nan": nan_policy,
        "version": __version__,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if src is not None:
        info.update(source_path=src.path, source_dtype=str(src.dtype), source_zarr_format=src.zarr_format)
    return {storage.PROVENANCE_KEY: info}


def _create_outputs(
    source: Any,
    dest: Path,
    arrays: list[storage.SourceArray],
    plans: list[chunking.ChunkPlan],
    rule: int,
    report: RunReport,
) -> list[MaskJob]:
    is_group = not (len(arrays) == 1 and arrays[0].path == "")
    if is_group:
        storage.create_dest_group(dest, _provenance(source, None, rule, report.nan_policy))
    jobs = []
    for src, plan in zip(arrays, plans):
        out = storage.create_mask_array(
            dest,
            src.path,
            shape=src.shape,
            chunk_shape=plan.dest_chunk_shape,
            shard_shape=plan.dest_shard_shape,
            dimension_names=src.dimension_names,
            attributes=_provenance(source, src, rule, report.nan_policy),
        )
        token = tokenize(str(Path(source).resolve()), src.path, str(dest), plan, rule, report.engine)
        jobs.append(
            MaskJob(
                src.array,
                out,
                plan,
                rule,
                report.engine,  # type: ignore[arg-type]
                numexpr_threads=report.numexpr_threads,
                nan_policy=report.nan_policy,
                name=src.path,
                token=token,
            )
        )
    return jobs


def _record_counts(
    report: RunReport,
    arrays: list[storage.SourceArray],
    tasks: list[Any],
    results: Iterator[Any],
    dest: Path,
) -> None:
    for entry, src, task in zip(report.arrays, arrays, tasks):
        counts = dict.fromkeys(COUNT_FIELDS, 0)
        if task is not None:
            totals = np.asarray(next(results)).reshape(-1, len(COUNT_FIELDS)).sum(axis=0)
            counts = dict(zip(COUNT_FIELDS, (int(v) for v in totals)))
        entry.num_elements = counts["elements"]
        entry.num_ones = counts["ones"]
        entry.num_nans = counts["nans"]
        entry.num_zeros = counts["zeros"]
        entry.bytes_read = math.prod(src.shape) * src.dtype.itemsize
        entry.bytes_written = _disk_bytes(dest / src.path if src.path else dest)
        _warn_if_relu_outputs(report, entry)


def _warn_if_relu_outputs(report: RunReport, entry: ArrayReport) -> None:
    if report.rule == "x >= 0":
        negatives = entry.num_elements - entry.num_ones - entry.num_nans
        if entry.num_elements and negatives == 0 and entry.num_zeros >= 0.1 * entry.num_elements:
            name = entry.path or "the source"
            report.warnings.append(
                f"{name} has no negative values and {entry.num_zeros / entry.num_elements:.0%} exact zeros: "
                "it looks like ReLU outputs, not inputs; with the rule x >= 0 every value gives 1. "
                "If these are ReLU outputs, use --at-zero 0 (rule x > 0)"
            )


def _disk_bytes(path: Path) -> int:
    """Bytes stored under ``path`` (an array's folder, or a lone array's whole store)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, name))
    return total


def _finish(report: RunReport, report_path: str | os.PathLike[str] | None) -> RunReport:
    if report_path is not None:
        write_report(report, report_path)
    return report
