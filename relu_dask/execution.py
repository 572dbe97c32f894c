"""Running a job: SOURCE in, masks in DEST out, a :class:`RunReport` back.

Use :func:`run` (the CLI's ``run`` and ``plan`` call it). A run is resumable and
exclusive: it holds DEST's lock (:mod:`relu_dask.journal`) while it works, every task marks
itself done once its block is written, and rerunning the same command after a kill finishes
only the tasks that are missing. A rerun of a complete job is a quick no-op; a rerun whose
SOURCE or result-changing options differ from DEST's job is refused unless ``overwrite``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import logging
import math
import os
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from dask.base import tokenize

from relu_dask import chunking, chunkio, journal, storage
from relu_dask.errors import (
    DestinationExistsError,
    InputError,
    NaNFoundError,
    ProcessingError,
    ReluDaskError,
    RunStopped,
)
from relu_dask.graph import build_mask_tasks, unit_ones_of_mask
from relu_dask.kernel import Engine, choose_engine, parse_at_zero, parse_nan_policy, rule_for
from relu_dask.locations import Location, parse_location, parse_storage_options
from relu_dask.report import ArrayReport, RunReport, collect_versions, write_report
from relu_dask.schedulers import (
    PROGRESS_INTERVAL_S,
    STOP_GRACE_S,
    Progress,
    SchedulerSpec,
    Session,
    check_workers_see,
    compute,
    open_session,
    parse_scheduler,
    plan_session,
)
from relu_dask.stats import parse_unit_axis, summarize_units
from relu_dask.task import COUNT_FIELDS, MaskJob, allow_tasks, wait_for_running_tasks

__all__ = ["DestState", "job_status", "mask_unit_ones", "run", "stats_of_masks"]

log = logging.getLogger(__name__)

DestState = Literal["fresh", "resume", "complete"]


@dataclass(frozen=True)
class _Job:
    """Everything fixed about a job before it runs."""

    source: Location
    dest: Location
    arrays: list[storage.SourceArray]
    skipped: list[storage.Skipped]
    rule: int
    nan_policy: str
    chunks: Any
    dest_chunks: Any
    dest_shards: Any
    engine: Engine
    spec: SchedulerSpec
    unit_axis: int | None = None
    """With ``--stats``: the unit axis as given (-1: the last); None: no statistics."""
    compressor: str = storage.DEFAULT_COMPRESSOR
    """The masks' compressor (a name of ``storage.COMPRESSORS``)."""

    def unit_axis_of(self, src: storage.SourceArray) -> int | None:
        if self.unit_axis is None or not src.shape:
            return None
        return parse_unit_axis(self.unit_axis, len(src.shape), where=src.path or "the source")

    @functools.cached_property
    def fingerprint(self) -> dict[str, Any]:
        """Source identity and the options that change the result (as found at the start)."""
        return {
            "source": self.source.url,
            "arrays": [storage.fingerprint_array(a) for a in self.arrays],
            "rule": rule_for(self.rule),
            "nan": self.nan_policy,
            "dest_chunks": _as_list(self.dest_chunks),
            "dest_shards": _as_list(self.dest_shards),
            "compressor": self.compressor,
        }


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
    performance_report: str | os.PathLike[str] | None = None,
    stats: bool = False,
    unit_axis: int = -1,
    plot_path: str | os.PathLike[str] | None = None,
    storage_options: str | dict[str, Any] | None = None,
    dest_compressor: str = storage.DEFAULT_COMPRESSOR,
    dry_run: bool = False,
) -> RunReport:
    """Compute the ReLU derivative masks of SOURCE into DEST and return the run report.

    Parameters
    ----------
    source
        A Zarr array or group (format 2 or 3). For a group, every real-numbered array is
        processed to the same path under DEST.
    dest
        Where to write the int8 masks (Zarr v3). If DEST holds a partial run of the same
        job, only the missing tasks run; if it holds anything else, ``overwrite`` is needed.
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
        Replace an existing DEST and start over (only once the inputs have been validated).
    progress
        ``"auto"`` (a bar on a terminal, log lines otherwise), ``"bar"``, ``"log"``, ``"none"``.
    progress_interval_s
        Seconds between progress log lines (``"log"`` mode).
    report_path
        Also write the report there as JSON.
    performance_report
        Save dask's performance report of the run there (HTML; distributed schedulers only).
    stats, unit_axis
        Also count, in the same pass, the ones of every unit along ``unit_axis`` (default the
        last): dead and always-on units, per-unit active fraction (``ArrayReport.stats``).
    plot_path
        Draw the per-unit active fractions there (PNG; implies ``stats``).
    dest_compressor
        The masks' compressor: ``"blosc-lz4"`` (default: fast, small, a core Zarr v3 codec),
        ``"blosc-zstd"``, ``"zstd"`` (zarr's default) or ``"none"``.
    storage_options
        fsspec storage options (a dict or JSON text) for SOURCE and DEST URLs such as
        ``s3://bucket/acts.zarr``.
    dry_run
        Plan only: validate, print the plan, write nothing.
    """
    rule, nan_policy = parse_at_zero(at_zero), parse_nan_policy(nan)
    chunks_spec = chunking.parse_chunks(chunks)
    check_output_files(report=report_path, plot=plot_path, performance_report=performance_report)
    spec = scheduler if isinstance(scheduler, SchedulerSpec) else parse_scheduler(scheduler)
    if performance_report is not None and spec.name not in ("local", "address"):
        raise InputError(
            "--performance-report needs a distributed scheduler: --scheduler local, tcp://... or --scheduler-file"
        )
    options = parse_storage_options(storage_options)
    source_at, dest_at = parse_location(source, options), parse_location(dest, options)
    if options and source_at.is_local and dest_at.is_local:
        raise InputError("--storage-options only apply to URLs such as s3://bucket/path")
    arrays, skipped = storage.open_source(source_at)
    job = _Job(
        source_at,
        storage.prepare_dest(source_at, dest_at),
        arrays,
        skipped,
        rule,
        nan_policy,
        chunks_spec,
        dest_chunks,
        dest_shards,
        engine,
        spec,
        unit_axis if (stats or plot_path is not None) else None,
        storage.parse_compressor(dest_compressor),
    )
    for src in arrays:
        job.unit_axis_of(src)  # a bad --unit-axis is refused before anything runs
    if plot_path is not None:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise InputError("--plot needs matplotlib: pip install 'relu-dask[plot]'")
    if dry_run:
        state, record = _dest_state(job, overwrite, under_lock=False)
        report, _plans = _planned_report(job, plan_session(spec), record)
        report.outcome = "already complete" if state == "complete" else "planned"
        return _finish(report, report_path)
    with journal.hold_lock(job.dest):
        journal.reach_step("locked")
        state, record = _dest_state(job, overwrite, under_lock=True)
        performance = str(performance_report) if performance_report is not None else None
        if state == "complete" and record is not None:
            report = _complete_report(job, record)
        else:
            report = _execute(job, state, record, progress, progress_interval_s, performance)
    if plot_path is not None:
        from relu_dask.plot import plot_unit_activity

        plot_unit_activity(report, plot_path)
    return _finish(report, report_path)


def check_output_files(**paths: str | os.PathLike[str] | None) -> None:
    """Refuse, before any work, a ``--report``, ``--plot`` or ``--performance-report`` file
    that could not be written at the end: its folder missing or not writable, or a folder
    in its place."""
    for option, value in paths.items():
        if value is None:
            continue
        path, flag = Path(value), "--" + option.replace("_", "-")
        if path.is_dir():
            raise InputError(f"{flag} {path} is a folder: give a file name")
        folder = path.parent
        if not folder.is_dir():
            raise InputError(f"{flag} {path}: the folder {folder} does not exist: create it first")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise InputError(f"{flag} {path}: cannot write in {folder} (permission denied)")


def _as_list(value: Any) -> Any:
    if value is None:
        return None
    return list(chunking.parse_shape(value, what="shape")) if not isinstance(value, list) else value


def _dest_state(job: _Job, overwrite: bool, *, under_lock: bool) -> tuple[DestState, journal.JobRecord | None]:
    """Whether DEST is new (or to be replaced), a partial run to resume, or complete."""
    dest = job.dest
    if overwrite:
        if journal.is_being_replaced(dest):  # a run deleting DEST was killed: what it left
            storage.check_replaceable_remains(dest)
        else:
            storage.check_replaceable(dest)
        return "fresh", None
    if not dest.exists():
        return "fresh", None
    record = journal.read_record(dest)
    if record is None and journal.is_being_replaced(dest):
        raise DestinationExistsError(
            f"DEST {dest} was being replaced when a run was stopped: pass --overwrite to finish replacing it"
        )
    if record is None:
        raise DestinationExistsError(f"DEST {dest} already exists: pass --overwrite to replace it")
    changed = _differences(record.fingerprint, job.fingerprint)
    if changed:
        raise DestinationExistsError(
            f"DEST {dest} holds another job ({'; '.join(changed)}): pass --overwrite to replace it"
        )
    if record.complete and not _outputs_present(job):
        # A record that says complete is believed only beside every output it describes.
        log.warning("DEST %s lacks masks its journal says are complete: computing them again", dest)
        record = dataclasses.replace(
            record, complete=False, counts=None, unit_ones=None, unit_axes=None, block_ones=None, verified_utc=None
        )
        if under_lock:  # before anything is recreated: a kill from now on resumes, and redoes every task
            journal.remove_done_markers(dest)
            journal.write_record(dest, record)
    return ("complete" if record.complete else "resume"), record


def _outputs_present(job: _Job) -> bool:
    """Whether DEST holds the group (for a group SOURCE) and every mask array of the job."""
    if _is_group(job) and not storage.is_group(job.dest):
        return False
    return all(storage.has_array(job.dest, src.path) for src in job.arrays)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    said = []
    if old.get("source") != new["source"]:
        said.append(f"its source was {old.get('source')}")
    old_arrays = {a["path"]: a for a in old.get("arrays", [])}
    for array in new["arrays"]:
        before = old_arrays.pop(array["path"], None)
        name = array["path"] or "the source array"
        if before is None:
            said.append(f"{name} is new")
        elif before != array:
            what = [k for k in array if before.get(k) != array[k]]
            said.append(f"{name} changed ({', '.join(what)})")
    said.extend(f"{path or 'the source array'} is gone" for path in old_arrays)
    for option in ("rule", "nan", "dest_chunks", "dest_shards", "compressor"):
        if old.get(option) != new[option]:
            said.append(f"it was made with {option} {old.get(option)}, now {new[option]}")
    return said


def _plan_arrays(
    job: _Job, memory_limit: int | None, block_shapes: list[list[int]] | None = None
) -> list[chunking.ChunkPlan]:
    plans = []
    for index, src in enumerate(job.arrays):
        where = f" of {src.path}" if src.path else ""
        ndim = len(src.shape)
        chunk_shape = (
            chunking.parse_shape(job.dest_chunks, what=f"dest chunks{where}", ndim=ndim)
            if job.dest_chunks is not None
            else src.chunk_shape
        )
        shard_shape = (
            chunking.parse_shape(job.dest_shards, what=f"dest shards{where}", ndim=ndim)
            if job.dest_shards is not None
            else (src.shard_shape if job.dest_chunks is None else None)
        )
        # A resumed run cuts exactly the tasks of the first run, whatever --chunks says now.
        spec = tuple(block_shapes[index]) if block_shapes else job.chunks
        try:
            plans.append(
                chunking.plan_chunks(
                    src.shape,
                    src.dtype.itemsize,
                    src.chunk_shape,
                    chunk_shape,
                    shard_shape,
                    chunks=spec,
                    memory_limit_bytes=memory_limit,
                )
            )
        except ReluDaskError as exc:
            raise type(exc)(f"{src.path}: {exc}" if src.path else str(exc)) from None
    return plans


def _planned_report(
    job: _Job, session: Session, record: journal.JobRecord | None
) -> tuple[RunReport, list[chunking.ChunkPlan]]:
    plans = _plan_arrays(job, session.memory_per_thread_bytes, record.block_shapes if record else None)
    report = RunReport(
        source=str(job.source),
        dest=str(job.dest),
        rule=rule_for(job.rule),
        scheduler=job.spec.label,
        engine="",
        num_threads=0,
        numexpr_threads=0,
        chunks=str(job.chunks),
        skipped=[{"path": s.path, "reason": s.reason} for s in job.skipped],
        versions=collect_versions(),
        nan_policy=job.nan_policy,
    )
    _describe_session(report, session, job.engine)
    for index, (src, plan) in enumerate(zip(job.arrays, plans)):
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
                read_path=src.stored.io_path if src.stored else "",
                read_path_reason=src.stored.why_not_direct if src.stored else "",
            )
        )
        if record is not None:
            report.arrays[-1].tasks_already_done = journal.count_done(job.dest, index)
        report.warnings.extend(f"{src.path}: {n}" if src.path else n for n in plan.notes)
    return report, plans


def _complete_report(job: _Job, record: journal.JobRecord) -> RunReport:
    report, _plans = _planned_report(job, plan_session(job.spec), record)
    report.outcome = "already complete"
    recorded_units = record.unit_ones or [None] * len(job.arrays)
    recorded_axes = record.unit_axes or [None] * len(job.arrays)
    for index, (entry, src) in enumerate(zip(report.arrays, job.arrays)):
        _set_counts(entry, dict(zip(COUNT_FIELDS, (record.counts or [])[index])), src, job.dest)
        entry.tasks_skipped = entry.num_tasks
        axis, unit_ones = job.unit_axis_of(src), recorded_units[index]
        if axis is not None and (unit_ones is None or recorded_axes[index] != axis):
            unit_ones = mask_unit_ones(job.dest, src.path, axis, job.spec)  # the first run had no --stats
        _set_stats(entry, src, axis, unit_ones)
    log.info("DEST %s is already complete: nothing to do", job.dest)
    return report


def _execute(
    job: _Job,
    state: DestState,
    record: journal.JobRecord | None,
    progress: Progress,
    interval_s: float,
    performance_report: str | None,
) -> RunReport:
    # Refuse a plan that cannot fit before any cluster is started (a LocalCluster whose
    # workers are too small for one task would only die under it).
    _plan_arrays(job, plan_session(job.spec).memory_per_thread_bytes, record.block_shapes if record else None)
    with open_session(job.spec) as session:
        if job.source.is_local and job.dest.is_local:
            check_workers_see(session, [job.source.url], [str(job.dest.path.parent)])
        report, plans = _planned_report(job, session, record)
        if state == "fresh":
            _start_fresh(job, plans, report)
        else:
            removed = storage.remove_partial_writes(job.dest)
            done = sum(a.tasks_already_done for a in report.arrays)
            log.info(
                "resuming DEST %s: %d of %d tasks already done%s",
                job.dest,
                done,
                report.num_tasks,
                f", {removed} half-written file(s) removed" if removed else "",
            )
            _create_outputs(job, plans, report)
        journal.reach_step("outputs-created")
        jobs = _mask_jobs(job, plans, report)
        log.info(
            "start: %s -> %s, %d task(s) over %d array(s) on %s",
            job.source,
            job.dest,
            report.num_tasks,
            len(job.arrays),
            job.spec.label,
            extra={
                "event": "start",
                "fields": {
                    "source": str(job.source),
                    "dest": str(job.dest),
                    "num_tasks": report.num_tasks,
                    "scheduler": job.spec.label,
                    "tasks_already_done": sum(a.tasks_already_done for a in report.arrays),
                },
            },
        )
        tasks = [build_mask_tasks(j) for j in jobs]
        to_compute = [t for t in tasks if t is not None]
        start, start_cpu = time.perf_counter(), time.process_time()
        allow_tasks()
        with _processing_errors(job.dest), _stopping(job, report):
            try:
                results = compute(session, to_compute, progress, interval_s, performance_report)
            finally:
                _release_buffers(session)
        report.wall_s, report.cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    journal.reach_step("tasks-done")
    totals, units, block_ones = _record_counts(report, job, jobs, tasks, iter(results))
    journal.write_record(
        job.dest,
        journal.JobRecord(
            job.fingerprint,
            [list(p.block_shape) for p in plans],
            complete=True,
            counts=totals,
            unit_ones=units,
            unit_axes=[j.unit_axis for j in jobs],
            block_ones=block_ones,
        ),
    )
    journal.reach_step("complete")
    journal.remove_done_markers(job.dest)
    return report


def _release_buffers(session: Session) -> None:
    """Free the block buffers the tasks kept for reuse, here and on a cluster's workers."""
    chunkio.release_buffers()
    if session.client is not None:
        with contextlib.suppress(Exception):  # a worker that died took its buffers with it
            session.client.run(chunkio.release_buffers)


def _start_fresh(job: _Job, plans: list[chunking.ChunkPlan], report: RunReport) -> None:
    """Replace DEST (if any) and its journal, record the job, create the outputs.

    The journal goes first: a kill while DEST is being deleted then leaves no record that
    says "complete" beside a half-deleted DEST (see docs/design.md, "Crash consistency").
    """
    _remove_dest_and_journal(job.dest, "--overwrite")
    journal.write_record(job.dest, journal.JobRecord(job.fingerprint, [list(p.block_shape) for p in plans]))
    journal.reach_step("job-recorded")
    _create_outputs(job, plans, report)


def _remove_dest_and_journal(dest: Location, reason: str) -> None:
    """Forget DEST's job, then delete DEST, in the order that keeps a kill safe at every step.

    The record of the replacement first (what a kill leaves of DEST is then ours to
    delete), then ``job.json`` and the markers (nothing claims DEST is complete), then DEST.
    """
    replacing = dest.exists()
    if replacing:
        journal.mark_replacing(dest)
    journal.remove_journal(dest)
    journal.reach_step("journal-forgotten")
    if replacing:
        storage.remove_dest(dest, reason)
    journal.reach_step("dest-removed")
    journal.unmark_replacing(dest)


@contextlib.contextmanager
def _stopping(job: _Job, report: RunReport) -> Iterator[None]:
    """On SIGTERM or Ctrl-C: no new task starts; those running may finish (up to
    :data:`STOP_GRACE_S`) and mark themselves done; then one line says how far it got."""
    try:
        yield
    except KeyboardInterrupt as stop:
        signum = getattr(stop, "signum", signal.SIGINT)
        still = wait_for_running_tasks(STOP_GRACE_S)
        done = sum(journal.count_done(job.dest, i) for i in range(len(job.arrays)))
        name = signal.Signals(signum).name
        left = f"; {still} task(s) still running were let go" if still else ""
        raise RunStopped(
            f"stopped by {name}: {done} of {report.num_tasks} task(s) done{left}; "
            "rerun the same command to finish the rest",
            128 + signum,
        ) from None


@contextlib.contextmanager
def _processing_errors(dest: Location) -> Iterator[None]:
    """Turn what can go wrong while tasks run into one-line errors with their exit codes."""
    try:
        yield
    except NaNFoundError:
        _remove_dest_and_journal(dest, "the source holds NaN and --nan is error")
        raise
    except ReluDaskError:
        raise
    except OSError as exc:
        raise ProcessingError(_describe_os_error(exc, dest)) from exc
    except Exception as exc:
        raise ProcessingError(
            f"failed while processing: {type(exc).__name__}: {exc}; rerun the same command to finish the rest"
        ) from exc


def _describe_os_error(exc: OSError, dest: Location) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"the disk is full while writing DEST {dest} ({exc.strerror}): free space, then rerun the same "
            "command to finish the rest"
        )
    return f"failed while reading SOURCE or writing DEST {dest}: {exc}; rerun the same command to finish the rest"


def _describe_session(report: RunReport, session: Session, engine: Engine) -> None:
    report.num_threads = session.num_threads
    report.numexpr_threads = session.cores_per_thread
    report.engine = choose_engine(engine, session.cores_per_thread)
    report.dashboard_link = session.dashboard_link


def _provenance(job: _Job, src: storage.SourceArray | None) -> dict[str, Any]:
    from relu_dask import __version__

    info: dict[str, Any] = {
        "source": job.source.url,
        "rule": rule_for(job.rule),
        "at_zero": job.rule,
        "nan": job.nan_policy,
        "version": __version__,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if src is not None:
        info.update(source_path=src.path, source_dtype=str(src.dtype), source_zarr_format=src.zarr_format)
    return {storage.PROVENANCE_KEY: info}


def _is_group(job: _Job) -> bool:
    return not (len(job.arrays) == 1 and job.arrays[0].path == "")


def _create_outputs(job: _Job, plans: list[chunking.ChunkPlan], report: RunReport) -> None:
    """Create DEST's group (for a group SOURCE) and every mask array that is not there yet.

    On a fresh start that is all of them; on resume, those a kill stopped from being made, or
    that went missing since: an array made now holds no mask yet, so any done markers of its
    tasks are dropped first (they would otherwise be trusted, and leave it empty).
    """
    if _is_group(job) and not storage.is_group(job.dest):
        storage.create_dest_group(job.dest, _provenance(job, None))
    for index, (src, plan) in enumerate(zip(job.arrays, plans)):
        if storage.has_array(job.dest, src.path):
            continue
        journal.done_dir(job.dest, index).remove_tree()
        storage.create_mask_array(
            job.dest,
            src.path,
            shape=src.shape,
            chunk_shape=plan.dest_chunk_shape,
            shard_shape=plan.dest_shard_shape,
            dimension_names=src.dimension_names,
            attributes=_provenance(job, src),
            compressor=job.compressor,
        )


def _mask_jobs(job: _Job, plans: list[chunking.ChunkPlan], report: RunReport) -> list[MaskJob]:
    jobs = []
    for index, (src, plan) in enumerate(zip(job.arrays, plans)):
        out = storage.open_mask_array(job.dest, src.path)
        assert src.stored is not None, "open_source describes every array"
        _set_io_paths(report.arrays[index], src.stored, out)
        token = tokenize(job.source.url, src.path, job.dest.url, plan, job.rule, report.engine)
        jobs.append(
            MaskJob(
                src.stored,
                out,
                plan,
                job.rule,
                report.engine,  # type: ignore[arg-type]
                numexpr_threads=report.numexpr_threads,
                nan_policy=job.nan_policy,
                name=src.path,
                done_dir=journal.done_dir(job.dest, index),
                unit_axis=job.unit_axis_of(src),
                token=token,
            )
        )
    return jobs


def _set_io_paths(entry: ArrayReport, source: storage.StoredArray, dest: storage.StoredArray) -> None:
    """Say in the report, and in the debug log, how the tasks read and write this array."""
    entry.read_path, entry.read_path_reason = source.io_path, source.why_not_direct
    entry.write_path, entry.write_path_reason = dest.io_path, dest.why_not_direct
    log.debug(
        "%s: read %s%s, written %s%s",
        entry.path or "the source array",
        source.io_path,
        f" ({source.why_not_direct})" if source.why_not_direct else "",
        dest.io_path,
        f" ({dest.why_not_direct})" if dest.why_not_direct else "",
    )


def _record_counts(
    report: RunReport, job: _Job, jobs: list[MaskJob], tasks: list[Any], results: Iterator[Any]
) -> tuple[list[list[int]], list[list[int] | None], list[list[int]]]:
    """Sum the tasks' rows into each array's report; return the totals, per-unit ones and per-block ones."""
    totals, units, block_ones = [], [], []
    fields = len(COUNT_FIELDS)
    for entry, src, mask_job, task in zip(report.arrays, job.arrays, jobs, tasks):
        counts = dict.fromkeys(COUNT_FIELDS, 0)
        unit_ones: list[int] | None = None
        ones: list[int] = []
        if task is not None:
            result = np.asarray(next(results))
            rows = result.reshape(-1, result.shape[-1])
            counts = dict(zip(COUNT_FIELDS, (int(v) for v in rows[:, :fields].sum(axis=0))))
            ones = [int(v) for v in rows[:, COUNT_FIELDS.index("ones")]]
            if mask_job.unit_axis is not None:
                unit_ones = _per_unit(result, mask_job)
        elif mask_job.unit_axis is not None:
            unit_ones = [0] * src.shape[mask_job.unit_axis]
        _set_counts(entry, counts, src, job.dest)
        entry.bytes_read = counts["elements_read"] * src.dtype.itemsize
        entry.tasks_skipped = counts["resumed"]
        entry.tasks_done_now = entry.num_tasks - counts["resumed"]
        _set_stats(entry, src, mask_job.unit_axis, unit_ones)
        _warn_if_relu_outputs(report, entry)
        totals.append([counts[f] for f in COUNT_FIELDS])
        units.append(unit_ones)
        block_ones.append(ones)
    return totals, units, block_ones


def _set_stats(entry: ArrayReport, src: storage.SourceArray, axis: int | None, unit_ones: list[int] | None) -> None:
    if axis is not None and unit_ones is not None:
        samples = math.prod(n for a, n in enumerate(src.shape) if a != axis)
        entry.stats = summarize_units(np.asarray(unit_ones), samples, axis)


def _per_unit(result: np.ndarray, mask_job: MaskJob) -> list[int]:
    """Per-unit ones: sum over every block axis but the unit axis, then lay the blocks end to end."""
    axis = mask_job.unit_axis
    assert axis is not None
    ndim = result.ndim - 1
    by_unit_block = result.sum(axis=tuple(a for a in range(ndim) if a != axis)).reshape(-1, result.shape[-1])
    extents = mask_job.plan.chunks[axis]
    fields = len(COUNT_FIELDS)
    return [int(v) for j, n in enumerate(extents) for v in by_unit_block[j, fields : fields + n]]


def _set_counts(entry: ArrayReport, counts: dict[str, int], src: storage.SourceArray, dest: Location) -> None:
    entry.num_elements = counts["elements"]
    entry.num_ones = counts["ones"]
    entry.num_nans = counts["nans"]
    entry.num_zeros = counts["zeros"]
    entry.bytes_written = storage.array_location(dest, src.path).disk_bytes()


def _warn_if_relu_outputs(report: RunReport, entry: ArrayReport) -> None:
    if report.rule != "x >= 0" or not entry.num_elements:
        return
    negatives = entry.num_elements - entry.num_ones - entry.num_nans
    if negatives == 0 and entry.num_zeros >= 0.1 * entry.num_elements:
        name = entry.path or "the source"
        report.warnings.append(
            f"{name} has no negative values and {entry.num_zeros / entry.num_elements:.0%} exact zeros: "
            "it looks like ReLU outputs, not inputs; with the rule x >= 0 every value gives 1. "
            "If these are ReLU outputs, use --at-zero 0 (rule x > 0)"
        )


def _finish(report: RunReport, report_path: str | os.PathLike[str] | None) -> RunReport:
    if report_path is not None:
        write_report(report, report_path)
    return report


def job_status(dest: str | os.PathLike[str], storage_options: str | dict[str, Any] | None = None) -> dict[str, Any]:
    """What DEST holds: ``absent``, ``partial`` (n of m tasks done), ``complete`` or ``unknown``.

    ``complete`` only where the journal says so and DEST holds every mask array it names
    (else ``partial``, with ``missing`` naming the arrays that are not there). ``unknown``
    is a DEST that exists without a relu-dask journal (made by another tool or another
    version). ``running`` names the process holding DEST's lock, if any.
    """
    path = parse_location(dest, parse_storage_options(storage_options))
    record = journal.read_record(path)
    exists = path.exists()
    status: dict[str, Any] = {"dest": str(dest), "running": journal.lock_holder(path)}
    if record is None or not exists:
        status["state"] = "unknown" if exists else "absent"
        if exists and journal.is_being_replaced(path):
            status["replacing"] = True  # a run deleting it to replace it was stopped
        return status
    arrays = record.fingerprint.get("arrays", [])
    total = 0
    for array, block in zip(arrays, record.block_shapes):
        if math.prod(array["shape"]) != 0:
            total += math.prod(-(-n // max(1, b)) for n, b in zip(array["shape"], block))
    missing = [a["path"] or "(array)" for a in arrays if not storage.has_array(path, a["path"])]
    complete = record.complete and not missing
    done = total if complete else sum(journal.count_done(path, i) for i in range(len(arrays)))
    if record.complete and missing:
        status["missing"] = missing  # the journal says complete, DEST says otherwise: believe DEST
    if complete and record.verified_utc:
        status["verified_utc"] = record.verified_utc
    status.update(
        state="complete" if complete else "partial",
        tasks_done=done,
        num_tasks=total,
        fingerprint=record.fingerprint,
    )
    return status


def mask_unit_ones(dest: Location, path: str, axis: int, spec: SchedulerSpec) -> list[int]:
    """Per-unit ones of a mask array already in DEST, read back with dask."""
    mask = storage.open_array(dest, path)
    plan = chunking.plan_chunks(mask.shape, 1, mask.chunks, mask.chunks, getattr(mask, "shards", None))
    with open_session(spec) as session:
        (ones,) = compute(session, [unit_ones_of_mask(mask, plan, axis)], progress="none")
    return [int(v) for v in np.asarray(ones)]


def stats_of_masks(
    dest: str | os.PathLike[str],
    *,
    unit_axis: int = -1,
    scheduler: str | SchedulerSpec = "threads",
    report_path: str | os.PathLike[str] | None = None,
    plot_path: str | os.PathLike[str] | None = None,
    storage_options: str | dict[str, Any] | None = None,
) -> RunReport:
    """``relu-dask stats DEST``: the statistics of ``--stats`` from masks already written.

    NaN and exact-zero counts need the source: they are reported only by ``run --stats``.
    """
    spec = scheduler if isinstance(scheduler, SchedulerSpec) else parse_scheduler(scheduler)
    check_output_files(report=report_path, plot=plot_path)
    arrays, skipped = storage.open_source(parse_location(dest, parse_storage_options(storage_options)))
    report = RunReport(
        source=str(dest),
        dest=str(dest),
        rule="",
        scheduler=spec.label,
        engine="",
        num_threads=0,
        numexpr_threads=0,
        chunks="",
        skipped=[{"path": s.path, "reason": s.reason} for s in skipped],
        versions=collect_versions(),
        outcome="stats",
    )
    start, start_cpu = time.perf_counter(), time.process_time()
    with open_session(spec) as session:
        report.num_threads = session.num_threads
        for src in arrays:
            if src.dtype != np.int8:
                report.skipped.append({"path": src.path, "reason": f"dtype {src.dtype} is not an int8 mask"})
                continue
            axis = parse_unit_axis(unit_axis, len(src.shape), where=src.path or str(dest)) if src.shape else None
            plan = chunking.plan_chunks(src.shape, 1, src.chunk_shape, src.chunk_shape, src.shard_shape)
            entry = ArrayReport(
                path=src.path,
                shape=list(src.shape),
                dtype="int8",
                source_chunk_shape=list(src.chunk_shape),
                dest_chunk_shape=list(src.chunk_shape),
                dest_shard_shape=None,
                block_shape=list(plan.block_shape),
                num_tasks=plan.num_tasks,
                read_aligned=True,
                memory_per_task_bytes=plan.memory_per_task_bytes,
                num_elements=math.prod(src.shape),
                bytes_read=math.prod(src.shape),
            )
            if axis is not None and plan.num_tasks:
                (ones,) = compute(session, [unit_ones_of_mask(src.array, plan, axis)], progress="none")
                _set_stats(entry, src, axis, [int(v) for v in np.asarray(ones)])
                entry.num_ones = sum(entry.stats.unit_ones) if entry.stats else 0
            report.arrays.append(entry)
    report.wall_s, report.cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    report.warnings.append("NaN and exact-zero counts need the source: run `relu-dask run --stats` for them")
    if plot_path is not None:
        from relu_dask.plot import plot_unit_activity

        plot_unit_activity(report, plot_path)
    return _finish(report, report_path)
