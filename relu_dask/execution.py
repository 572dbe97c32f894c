"""Running a plan: SOURCE in, masks in DEST out, a :class:`RunReport` back.

Use :func:`run` (or :func:`run_with` for options already built, as the CLI does): it
builds the :class:`~relu_dask.options.RunOptions`, plans under DEST's lock
(:func:`relu_dask.planning.plan_run`), calls :func:`execute`, then writes the report and
plot the options ask for (:func:`deliver`). A run is resumable and
exclusive: it holds DEST's lock (:mod:`relu_dask.journal`) while it works, every task marks
itself done once its block is written, and rerunning the same command after a kill finishes
only the tasks that are missing. A rerun of a complete job is a quick no-op; a rerun whose
SOURCE or result-changing options differ from DEST's job is refused unless ``overwrite``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
from dask.base import tokenize

from relu_dask import chunking, chunkio, conventions, journal, storage
from relu_dask.computing import PROGRESS_INTERVAL_S, STOP_GRACE_S, Progress, compute
from relu_dask.counts import BlockCounts, KeptCounts
from relu_dask.errors import InputError, NaNFoundError, ProcessingError, ReluDaskError, RunStopped
from relu_dask.graph import MaskTasks, build_mask_tasks
from relu_dask.kernel import Engine, rule_for
from relu_dask.locations import Location
from relu_dask.mask_stats import mask_unit_ones, unit_stats
from relu_dask.options import RunOptions
from relu_dask.planning import RunInputs, RunPlan, open_inputs, plan_run
from relu_dask.repair import repair
from relu_dask.report import ArrayReport, RunReport, write_report
from relu_dask.resume import remove_dest_and_journal
from relu_dask.schedulers import (
    SchedulerSpec,
    Session,
    check_workers_see,
    open_session,
    refuse_in_a_spawned_copy_of_main,
)
from relu_dask.task import ArrayTasks, allow_tasks, wait_for_running_tasks

__all__ = ["FollowState", "deliver", "execute", "follow", "follow_with", "run", "run_with"]

log = logging.getLogger(__name__)


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
    append_axis: int | str | None = 0,
    settle_s: float | None = None,
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
    append_axis
        The axis along which SOURCE grows between runs (default 0). When DEST holds the
        complete (or partial) masks of a SOURCE that has only grown along it since, only the
        blocks that touch new rows are computed; DEST's mask arrays grow to match, and the
        counts and statistics are those of the whole grown array. ``None`` (or ``"none"``):
        growth is refused like any other change.
    settle_s
        How long to wait for rows a writer appears to be still appending to SOURCE (its shape
        grown, its chunks not all written) before leaving them for the next run; default
        ``$RELU_DASK_SETTLE_TIME``, else 2 s.
    dry_run
        Plan only: validate, return the plan's report, write nothing (but ``report_path``).
    """
    options = RunOptions.create(
        source,
        dest,
        chunks=chunks,
        dest_chunks=dest_chunks,
        dest_shards=dest_shards,
        at_zero=at_zero,
        nan=nan,
        engine=engine,
        scheduler=scheduler,
        overwrite=overwrite,
        progress=progress,
        progress_interval_s=progress_interval_s,
        report_path=report_path,
        performance_report=performance_report,
        stats=stats,
        unit_axis=unit_axis,
        plot_path=plot_path,
        storage_options=storage_options,
        dest_compressor=dest_compressor,
        append_axis=append_axis,
        settle_s=settle_s,
    )
    if dry_run:
        return deliver(plan_run(options).report(), options, plot=False)
    return run_with(options)


def run_with(options: RunOptions) -> RunReport:
    """:func:`run` for options already built: open SOURCE, then under DEST's lock plan and
    execute; draw the plot and write the report the options ask for."""
    refuse_in_a_spawned_copy_of_main()
    inputs = open_inputs(options)
    with journal.hold_lock(inputs.dest):
        journal.reach_step("locked")
        report = execute(plan_run(options, inputs, under_lock=True))
    return deliver(report, options)


@dataclass
class FollowState:
    """Where a :func:`follow_with` loop stands: passes made, rows done, rows behind SOURCE."""

    passes: int = 0
    """Runs made (a check that found nothing new is a pass too)."""
    rows_done: int = 0
    """Rows DEST holds (along the append axis; the most of any array)."""
    rows_behind: int = 0
    """Rows SOURCE held beyond those at the last check (the most of any array)."""
    stopped_by: str = ""
    """Why the loop ended: ``SIGTERM``, ``SIGINT`` or ``idle``."""
    reports: list[RunReport] = field(default_factory=list)
    """The report of every pass that processed new rows."""

    def describe(self) -> str:
        """One line: rows done and how far behind SOURCE."""
        return f"{self.rows_done} rows done, {self.rows_behind} behind SOURCE, {self.passes} pass(es)"


def follow(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    every_s: float = 30.0,
    idle_s: float | None = None,
    on_pass: Callable[[RunReport, FollowState], None] | None = None,
    **options: Any,
) -> FollowState:
    """:func:`run`, then again over what is appended to SOURCE, checked every ``every_s``
    seconds, until SIGTERM, Ctrl-C or ``idle_s`` seconds without growth (see
    :func:`follow_with`). ``options`` are :func:`run`'s keyword arguments."""
    return follow_with(RunOptions.create(source, dest, **options), every_s, idle_s, on_pass)


def follow_with(
    options: RunOptions,
    every_s: float,
    idle_s: float | None = None,
    on_pass: Callable[[RunReport, FollowState], None] | None = None,
) -> FollowState:
    """Keep DEST up to date with a growing SOURCE: run, then check SOURCE every ``every_s``
    seconds and run again over what was appended, with DEST's lock held and one scheduler
    session (its dashboard) up the whole time.

    Ends on SIGTERM or Ctrl-C (the running tasks finish and are recorded; the lock is
    released) or after ``idle_s`` seconds without growth; returns how far it got, with
    :attr:`FollowState.stopped_by` saying why. ``on_pass`` is called after every pass that
    processed new rows.
    """
    if not 0 < every_s < math.inf or (idle_s is not None and not 0 < idle_s < math.inf):
        raise InputError("--follow and --follow-idle take a positive number of seconds")
    state = FollowState()
    refuse_in_a_spawned_copy_of_main()
    inputs = open_inputs(options)
    try:
        with journal.hold_lock(inputs.dest, following=True), open_session(options.scheduler) as session:
            journal.reach_step("locked")
            last_growth = time.monotonic()
            while True:
                report = execute(plan_run(options, inputs, under_lock=True), session)
                if not state.passes or report.outcome != "already complete":  # the report of the last work
                    deliver(report, options)
                options = replace(options, overwrite=False)  # replaced once, then followed
                state.passes += 1
                # what DEST's record holds, not what SOURCE had: rows held back for a writer are behind
                state.rows_done = _rows_recorded(inputs) or state.rows_done
                state.rows_behind = max(0, _rows(inputs) - state.rows_done)
                if report.outcome != "already complete":
                    last_growth = time.monotonic()
                    state.reports.append(report)
                    if on_pass is not None:
                        on_pass(report, state)
                if idle_s is not None and time.monotonic() - last_growth >= idle_s:
                    state.stopped_by = "idle"
                    log.info("follow: no growth for %g s: stopping (%s)", idle_s, state.describe())
                    return state
                time.sleep(every_s)
                inputs = open_inputs(options)
                state.rows_behind = max(0, _rows(inputs) - state.rows_done)
                log.info(
                    "follow: %s",
                    state.describe(),
                    extra={
                        "event": "follow",
                        "fields": {"rows_done": state.rows_done, "rows_behind": state.rows_behind},
                    },
                )
    except KeyboardInterrupt as stop:  # SIGTERM (StopRequested) or Ctrl-C, between or during passes
        signum = stop.exit_code - 128 if isinstance(stop, RunStopped) else getattr(stop, "signum", signal.SIGINT)
        state.stopped_by = signal.Signals(signum).name
        log.debug("follow stopped: %s", stop)
        # A pass stopped after its record said complete (while it consolidated, say) did its rows;
        # and SOURCE may have grown since the last check: both read again, as they are now.
        state.rows_done = max(state.rows_done, _rows_recorded(inputs))
        state.rows_behind = max(0, _source_rows(options, inputs) - state.rows_done)
    return state


def _source_rows(options: RunOptions, inputs: RunInputs) -> int:
    """SOURCE's rows as they are now (the most of any array along its append axis), read
    again without waiting for a writer; the last ones read if SOURCE cannot be read."""
    axes = {src.path: axis for src, axis in zip(inputs.arrays, inputs.append_axes) if axis is not None}
    try:
        arrays = storage.open_source(options.source_location).arrays
    except (ReluDaskError, OSError):
        return _rows(inputs)
    return max((a.shape[axes[a.path]] for a in arrays if a.path in axes and len(a.shape) > axes[a.path]), default=0)


def _rows_recorded(inputs: RunInputs) -> int:
    """The most rows of any array of DEST's complete record, along its append axis (0: none)."""
    record = journal.read_record(inputs.dest)
    if record is None or not record.complete:
        return 0
    axes = {src.path: axis for src, axis in zip(inputs.arrays, inputs.append_axes) if axis is not None}
    shapes = [
        (a.get("shape"), axes[a.get("path")]) for a in record.fingerprint.get("arrays", []) if a.get("path") in axes
    ]
    return max((int(shape[axis]) for shape, axis in shapes if isinstance(shape, list) and len(shape) > axis), default=0)


def _rows(inputs: RunInputs) -> int:
    """The most rows of any array of SOURCE, along its append axis."""
    return max((src.shape[axis] for src, axis in zip(inputs.arrays, inputs.append_axes) if axis is not None), default=0)


def deliver(report: RunReport, options: RunOptions, *, plot: bool = True) -> RunReport:
    """Draw the plot (unless not ``plot``) and write the JSON report the options ask for;
    return the report."""
    if plot and options.plot_path is not None:
        from relu_dask.plot import plot_unit_activity

        plot_unit_activity(report, options.plot_path)
    if options.report_path is not None:
        write_report(report, options.report_path)
    return report


def execute(plan: RunPlan, session: Session | None = None) -> RunReport:
    """Run ``plan``: write the masks DEST lacks, record them, return the report.

    ``session``: a scheduler already started (or connected to) to run on, kept open; by
    default one is opened for this run as the plan's options say, and closed at the end.
    A plan whose DEST state was not read under DEST's lock (``plan.under_lock``) is planned
    again under it first: another run may have changed DEST since.
    """
    if not plan.under_lock:
        with journal.hold_lock(plan.dest):
            journal.reach_step("locked")
            return execute(plan_run(plan.options, plan.inputs, under_lock=True), session)
    if plan.inputs.held is not None:  # rows held back now (or no longer): for the next run
        journal.write_held(plan.dest, plan.inputs.held if plan.inputs.held.shapes else None)
    if plan.state == "complete":
        report = _complete_report(plan)
        if plan.record is not None and plan.record.damaged:
            return repair(plan, report)
        log.info("DEST %s is already complete: nothing to do", plan.dest)
        return report
    if session is not None:
        return _execute(plan.for_session(session))
    with open_session(plan.options.scheduler) as opened:
        return _execute(plan.for_session(opened))


def _complete_report(plan: RunPlan) -> RunReport:
    assert plan.record is not None, "a complete DEST has its record"
    report = plan.report()
    record = plan.record
    recorded_units = record.unit_ones or [None] * len(plan.inputs.arrays)
    recorded_axes = record.unit_axes or [None] * len(plan.inputs.arrays)
    for index, (entry, src) in enumerate(zip(report.arrays, plan.inputs.arrays)):
        _set_counts(entry, record.counts_of(index), src, plan.dest)
        entry.tasks_skipped = entry.num_tasks
        axis, unit_ones = plan.inputs.unit_axes[index], recorded_units[index]
        if axis is not None and (unit_ones is None or recorded_axes[index] != axis):
            unit_ones = mask_unit_ones(plan.dest, src.path, axis, plan.options.scheduler)  # no --stats the first time
        _set_stats(entry, src, axis, unit_ones, plan.inputs.coordinates)
    if plan.inputs.is_group and not storage.is_consolidated(plan.dest):  # a kill came between the two
        storage.consolidate(plan.dest)
    if record.fingerprint != plan.inputs.fingerprint:  # an older relu-dask's record: keys it lacked
        journal.write_record(plan.dest, replace(record, fingerprint=plan.inputs.fingerprint))
    return report


def _execute(plan: RunPlan) -> RunReport:
    """Run the plan's tasks on its (started) session; the caller holds DEST's lock."""
    inputs, session = plan.inputs, plan.session
    if inputs.source.is_local and inputs.dest.is_local:
        check_workers_see(session, [inputs.source.url], [str(inputs.dest.path.parent)])
    report = plan.report()
    report.outcome = "done"
    if plan.state == "fresh":
        _start_fresh(plan)
    elif plan.state == "grow":
        _start_growing(plan)
    else:
        if storage.unconsolidate(inputs.dest):  # DEST is about to change: no longer a finished group
            log.info("DEST %s: consolidated metadata dropped until the run completes", inputs.dest)
        removed = storage.remove_partial_writes(inputs.dest)
        log.info(
            "resuming DEST %s: %d of %d tasks already done%s",
            inputs.dest,
            sum(plan.tasks_already_done),
            plan.num_tasks,
            f", {removed} half-written file(s) removed" if removed else "",
        )
        _create_outputs(plan)
    journal.reach_step("outputs-created")
    run = uuid.uuid4().hex  # this run's tasks, apart from any other run's in this process
    array_tasks = _array_tasks(plan, report, run)
    log.info(
        "start: %s -> %s, %d task(s) over %d array(s) on %s",
        inputs.source,
        inputs.dest,
        plan.num_tasks,
        len(inputs.arrays),
        report.scheduler,
        extra={
            "event": "start",
            "fields": {
                "source": str(inputs.source),
                "dest": str(inputs.dest),
                "num_tasks": plan.num_tasks,
                "scheduler": report.scheduler,
                "tasks_already_done": sum(plan.tasks_already_done),
            },
        },
    )
    tasks = [build_mask_tasks(t) for t in array_tasks]
    to_compute = [t for t in tasks if t is not None]
    options = plan.options
    start, start_cpu = time.perf_counter(), time.process_time()
    allow_tasks(run)
    # An incremental run keeps DEST on a NaN: its masks of the rows before are the user's.
    with _processing_errors(inputs.dest, keep=any(k is not None for k in plan.kept)), _stopping(plan, run):
        try:
            results = compute(
                session, to_compute, options.progress, options.progress_interval_s, options.performance_report
            )
        except Exception:
            # A task failed (a NaN with --nan error, a disk full): the pool's other threads may
            # still run theirs. None starts now, and those running finish, before DEST is
            # removed or its lock let go.
            wait_for_running_tasks(run, STOP_GRACE_S)
            raise
        finally:
            _release_buffers(session)
    report.wall_s, report.cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    journal.reach_step("tasks-done")
    totals, units, block_ones, digests, edges = _record_counts(report, plan, array_tasks, tasks, iter(results))
    journal.write_record(
        inputs.dest,
        journal.JobRecord(
            inputs.fingerprint,
            [list(p.block_shape) for p in plan.chunk_plans],
            complete=True,
            counts=[c.as_row() for c in totals],
            unit_ones=units,
            unit_axes=[t.unit_axis for t in array_tasks],
            block_ones=block_ones,
            block_digests=digests,
            append_axis=plan.options.append_axis,
            edge_blocks=edges,
        ),
    )
    journal.reach_step("complete")
    journal.remove_done_markers(inputs.dest)
    if inputs.is_group:
        storage.consolidate(inputs.dest)
    return report


def _release_buffers(session: Session) -> None:
    """Free the block buffers the tasks kept for reuse, here and on a cluster's workers."""
    chunkio.release_buffers()
    if session.client is not None:
        with contextlib.suppress(Exception):  # a worker that died took its buffers with it
            session.client.run(chunkio.release_buffers)


def _start_fresh(plan: RunPlan) -> None:
    """Replace DEST (if any) and its journal, record the job, create the outputs.

    The journal goes first: a kill while DEST is being deleted then leaves no record that
    says "complete" beside a half-deleted DEST (see docs/design.md, "Crash consistency").
    """
    remove_dest_and_journal(plan.dest, "--overwrite")
    block_shapes = [list(p.block_shape) for p in plan.chunk_plans]
    journal.write_record(plan.dest, journal.JobRecord(plan.inputs.fingerprint, block_shapes))
    journal.reach_step("job-recorded")
    _create_outputs(plan)


def _start_growing(plan: RunPlan) -> None:
    """Make DEST's record that of the grown SOURCE, before any of its blocks is written.

    The done markers of blocks cut short by the old extent go first, then ``job.json`` says
    the new job is under way with the blocks it keeps (:class:`~relu_dask.counts.KeptCounts`),
    then the mask arrays grow (:func:`_create_outputs`). A kill between any two steps leaves
    a DEST that the same command grows, or resumes, again.
    """
    dest = plan.dest
    if storage.unconsolidate(dest):
        log.info("DEST %s: consolidated metadata dropped until the run completes", dest)
    storage.remove_partial_writes(dest)
    for index, drop_from in enumerate(plan.drop_markers):
        axis = plan.inputs.append_axes[index]
        if drop_from is not None and axis is not None:
            journal.remove_done_markers_from(dest, index, axis, drop_from)
    for path, before in plan.grown.items():
        log.info(
            "SOURCE has grown: %s %s",
            path or "the source array",
            "is new" if before is None else f"from {tuple(before)} to {tuple(_source(plan, path).shape)}",
        )
    journal.write_record(
        dest,
        journal.JobRecord(
            plan.inputs.fingerprint,
            [list(p.block_shape) for p in plan.chunk_plans],
            append_axis=plan.options.append_axis,
            kept=[None if k is None else k.to_dict() for k in plan.kept],
        ),
    )
    journal.reach_step("job-recorded")
    _create_outputs(plan)


def _source(plan: RunPlan, path: str) -> storage.SourceArray:
    return next(a for a in plan.inputs.arrays if a.path == path)


@contextlib.contextmanager
def _stopping(plan: RunPlan, run: str) -> Iterator[None]:
    """On SIGTERM or Ctrl-C: no new task starts; those running may finish (up to
    :data:`STOP_GRACE_S`) and mark themselves done; then one line says how far it got."""
    try:
        yield
    except KeyboardInterrupt as stop:
        signum = getattr(stop, "signum", signal.SIGINT)
        still = wait_for_running_tasks(run, STOP_GRACE_S)
        done = sum(journal.count_done(plan.dest, i) for i in range(len(plan.inputs.arrays)))
        name = signal.Signals(signum).name
        left = f"; {still} task(s) still running were let go" if still else ""
        raise RunStopped(
            f"stopped by {name}: {done} of {plan.num_tasks} task(s) done{left}; "
            "rerun the same command to finish the rest",
            128 + signum,
        ) from None


@contextlib.contextmanager
def _processing_errors(dest: Location, *, keep: bool = False) -> Iterator[None]:
    """Turn what can go wrong while tasks run into one-line errors with their exit codes.

    A NaN with ``--nan error`` removes the partial DEST, unless ``keep`` (an incremental
    run, whose DEST holds the masks of the rows before: it is left partial, and says so).
    """
    try:
        yield
    except NaNFoundError as exc:
        if keep:
            raise NaNFoundError(
                f"{exc.args[0].split('; --nan error')[0]}; --nan error stops on NaN. DEST {dest} keeps the masks "
                "of the rows before (partial); rerun with --overwrite once the data is fixed, or with "
                "--overwrite --nan zero to map NaN to 0"
            ) from None
        remove_dest_and_journal(dest, "the source holds NaN and --nan is error")
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


def _provenance(plan: RunPlan, src: storage.SourceArray | None) -> dict[str, Any]:
    from relu_dask import __version__

    options = plan.options
    info: dict[str, Any] = {
        "source": plan.inputs.source.url,
        "rule": rule_for(options.at_zero),
        "at_zero": options.at_zero,
        "nan": options.nan,
        "version": __version__,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if src is not None:
        info.update(source_path=src.path, source_dtype=str(src.dtype), source_zarr_format=src.zarr_format)
    return {storage.PROVENANCE_KEY: info}


def _create_outputs(plan: RunPlan) -> None:
    """Create DEST's group (for a group SOURCE) and every mask array that is not there yet.

    On a fresh start that is all of them; on resume, those a kill stopped from being made, or
    that went missing since: an array made now holds no mask yet, so any done markers of its
    tasks are dropped first (they would otherwise be trusted, and leave it empty).
    """
    dest = plan.dest
    if plan.inputs.is_group and not storage.is_group(dest):
        storage.create_dest_group(dest, {**plan.inputs.attributes, **_provenance(plan, None)})
    for path, attributes in sorted(plan.inputs.groups.items()):
        storage.create_subgroup(dest, path, attributes)
    for index, (src, chunk_plan) in enumerate(zip(plan.inputs.arrays, plan.chunk_plans)):
        if storage.has_array(dest, src.path):
            storage.resize_mask_array(dest, src.path, src.shape)  # SOURCE grew (no-op otherwise)
            continue
        journal.done_dir(dest, index).remove_tree()
        storage.create_mask_array(
            dest,
            src.path,
            shape=src.shape,
            chunk_shape=chunk_plan.dest_chunk_shape,
            shard_shape=chunk_plan.dest_shard_shape,
            dimension_names=src.dimension_names,
            attributes={**conventions.mask_attributes(src), **_provenance(plan, src)},
            compressor=plan.options.dest_compressor,
        )
    for coordinate in plan.inputs.coordinates:  # small, and copied again whole after a kill
        storage.copy_array(dest, coordinate)


def _array_tasks(plan: RunPlan, report: RunReport, run: str) -> list[ArrayTasks]:
    """Each array's tasks, with the mask arrays opened as they are now in DEST."""
    out = []
    options, inputs = plan.options, plan.inputs
    for index, (src, chunk_plan) in enumerate(zip(inputs.arrays, plan.chunk_plans)):
        mask = storage.open_mask_array(inputs.dest, src.path)
        assert src.stored is not None, "open_source describes every array"
        report.arrays[index].set_io_paths(src.stored, mask)
        token = tokenize(inputs.source.url, src.path, inputs.dest.url, chunk_plan, options.at_zero, plan.engine)
        out.append(
            ArrayTasks(
                src.stored,
                mask,
                chunk_plan,
                options.at_zero,
                plan.engine,
                numexpr_threads=plan.session.cores_per_thread,
                nan_policy=options.nan,
                name=src.path,
                done_dir=journal.done_dir(inputs.dest, index),
                unit_axis=inputs.unit_axes[index],
                token=token,
                run=run,
            )
        )
    return out


def _record_counts(
    report: RunReport,
    plan: RunPlan,
    array_tasks: list[ArrayTasks],
    tasks: list[MaskTasks | None],
    results: Iterator[Any],
) -> tuple[
    list[BlockCounts], list[list[int] | None], list[list[int]], list[list[int]], list[dict[str, list[int]] | None]
]:
    """Sum the tasks' rows, and the blocks kept from earlier runs, into each array's report.

    Returns, per array, the totals, the per-unit ones, the per-block ones and digests, and the
    last block row's counts along the append axis (for the next growth: see ``job.json``'s
    ``edge_blocks``).
    """
    totals: list[BlockCounts] = []
    units: list[list[int] | None] = []
    block_ones: list[list[int]] = []
    digests: list[list[int]] = []
    edges: list[dict[str, list[int]] | None] = []
    width = len(BlockCounts.FIELDS)
    kept_all = plan.kept or (None,) * len(array_tasks)
    for entry, src, array, task, kept in zip(report.arrays, plan.inputs.arrays, array_tasks, tasks, kept_all):
        counts = BlockCounts()
        unit_ones: list[int] | None = None
        result = np.asarray(next(results)) if task is not None else None
        if result is not None:
            rows = result.reshape(-1, result.shape[-1])
            counts = BlockCounts.total(rows[:, :width].tolist())
            if array.unit_axis is not None:
                unit_ones = _per_unit(result, array)
        elif array.unit_axis is not None and kept is None:  # an empty array
            unit_ones = [0] * src.shape[array.unit_axis]
        _set_counts(entry, counts, src, plan.dest)
        entry.bytes_read = counts.elements_read * src.dtype.itemsize
        entry.tasks_skipped = counts.resumed
        entry.tasks_done_now = entry.num_tasks - counts.resumed
        if kept is not None:
            counts = counts + kept.counts
            unit_ones = _with_kept_units(kept, array, unit_ones)
            if array.unit_axis is not None and unit_ones is None:  # not kept along this axis: read the masks
                unit_ones = mask_unit_ones(plan.dest, src.path, array.unit_axis, plan.options.scheduler)
            _set_counts(entry, counts, src, plan.dest)
        ones = _per_block(array.plan, kept, result, "ones")
        digests.append(_per_block(array.plan, kept, result, "digest"))
        _set_stats(entry, src, array.unit_axis, unit_ones, plan.inputs.coordinates)
        _warn_if_relu_outputs(report, entry)
        totals.append(counts)
        units.append(unit_ones)
        block_ones.append(ones)
        edges.append(_edge_blocks(array, plan.inputs.append_axes[len(edges)], kept, result))
    return totals, units, block_ones, digests, edges


def _with_kept_units(kept: KeptCounts, array: ArrayTasks, now: list[int] | None) -> list[int] | None:
    """The per-unit ones of the whole array: those kept, and those of the blocks run now."""
    axis = array.unit_axis
    if axis is None or kept.unit_ones is None or kept.unit_axis != axis:
        return None
    if axis == kept.axis:  # the units grow with the array: the new ones follow the kept ones
        return [*kept.unit_ones, *(now or [])]
    if not now:
        return list(kept.unit_ones)
    return [a + b for a, b in zip(kept.unit_ones, now, strict=True)]


def _per_block(plan: chunking.ChunkPlan, kept: KeptCounts | None, result: np.ndarray | None, field: str) -> list[int]:
    """One count of each block (``ones`` or ``digest``, of :class:`BlockCounts`) over the
    whole grid, in C order: the kept blocks', then those run now."""
    column = BlockCounts.FIELDS.index(field)
    now = result[..., column] if result is not None else np.zeros(plan.task_numblocks, dtype=np.int64)
    if kept is None:
        return [int(v) for v in now.reshape(-1)] if plan.num_tasks else []
    kept_values = kept.block_ones if field == "ones" else kept.block_digests or (-1,) * len(kept.block_ones)
    kept_shape = [kept.first_block if a == kept.axis else n for a, n in enumerate(plan.numblocks)]
    before = np.asarray(kept_values, dtype=np.int64).reshape(kept_shape)
    if not plan.num_tasks:
        return [int(v) for v in before.reshape(-1)]
    return [int(v) for v in np.concatenate([before, now.astype(np.int64)], axis=kept.axis).reshape(-1)]


def _edge_blocks(
    array: ArrayTasks, axis: int | None, kept: KeptCounts | None, result: np.ndarray | None
) -> dict[str, list[int]] | None:
    """The last block row's counts along the append axis ``axis``, where the array's extent is
    not a whole number of blocks (the next growth redoes that row); None where it is."""
    plan = array.plan
    if axis is None:
        return None
    if result is None:  # no block ran: the kept blocks' edge stays, if its per-unit ones are along this run's
        same_units = kept is not None and kept.unit_axis == array.unit_axis
        return kept.edge if kept is not None and kept.axis == axis and same_units else None
    if not plan.shape[axis] % plan.block_shape[axis]:
        return None
    first = plan.first_blocks or (0,) * len(plan.shape)
    last = plan.task_numblocks[axis] - 1
    edge = {}
    for index in np.ndindex(*(1 if a == axis else n for a, n in enumerate(plan.task_numblocks))):
        at = tuple(last if a == axis else i for a, i in enumerate(index))
        row = result[at]
        name = journal.marker_name(tuple(i + f for i, f in zip(at, first)))
        units = []
        if array.unit_axis is not None:
            width = len(BlockCounts.FIELDS)
            extent = plan.task_chunks[array.unit_axis][at[array.unit_axis]]
            units = [int(v) for v in row[width : width + extent]]
        edge[name] = [*BlockCounts.from_row(row.tolist()).recorded(), *units]
    return edge


def _set_stats(
    entry: ArrayReport,
    src: storage.SourceArray,
    axis: int | None,
    unit_ones: list[int] | None,
    coordinates: Sequence[storage.SourceArray] = (),
) -> None:
    if axis is not None and unit_ones is not None:
        entry.stats = unit_stats(src, axis, unit_ones, coordinates)


def _per_unit(result: np.ndarray, array: ArrayTasks) -> list[int]:
    """Per-unit ones: sum over every block axis but the unit axis, then lay the blocks end to end."""
    axis = array.unit_axis
    assert axis is not None
    ndim = result.ndim - 1
    by_unit_block = result.sum(axis=tuple(a for a in range(ndim) if a != axis)).reshape(-1, result.shape[-1])
    extents = array.plan.task_chunks[axis]
    width = len(BlockCounts.FIELDS)
    return [int(v) for j, n in enumerate(extents) for v in by_unit_block[j, width : width + n]]


def _set_counts(entry: ArrayReport, counts: BlockCounts, src: storage.SourceArray, dest: Location) -> None:
    entry.num_elements = counts.elements
    entry.num_ones = counts.ones
    entry.num_nans = counts.nans
    entry.num_zeros = counts.zeros
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
