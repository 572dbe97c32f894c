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
import functools
import logging
import math
import os
import signal
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Unpack

from relu_dask import chunkio, conventions, journal, livepage, outputs, storage, writebehind
from relu_dask.computing import STOP_GRACE_S, compute, import_dask_meanwhile
from relu_dask.errors import NaNFoundError, ProcessingError, ReluDaskError, RunStopped
from relu_dask.graph import MaskTasks, build_mask_tasks
from relu_dask.locations import Location, at_once
from relu_dask.lock import hold_lock, hold_lock_after
from relu_dask.mask_stats import mask_unit_ones
from relu_dask.metrics import write_metrics
from relu_dask.options import RunKeywords, RunOptions
from relu_dask.planning import ArrayPlan, RunPlan, open_inputs, plan_run
from relu_dask.prepare import prepare_dest
from relu_dask.repair import repair
from relu_dask.report import RunReport, write_report
from relu_dask.results import measure_stored, planned_report, record_job, recorded_report
from relu_dask.resume import list_dest, remove_dest_and_journal
from relu_dask.schedulers import (
    Session,
    check_workers_see,
    open_session,
    refuse_in_a_spawned_copy_of_main,
)
from relu_dask.task import ArrayTasks, allow_tasks, stop_tasks_on_worker, wait_for_running_tasks

__all__ = ["deliver", "execute", "run", "run_with"]

log = logging.getLogger(__name__)


def run(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    dry_run: bool = False,
    **options: Unpack[RunKeywords],
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
    stats, unit_axis, unit_dim
        Also count, in the same pass, the ones of every unit (``ArrayReport.stats``: dead and
        always-on units, per-unit active fraction). The units are along the dimension named
        ``unit_dim`` (a name, or several: the first each array has), or along ``unit_axis``;
        given neither, along a dimension named like the units (``unit``, ``channel``,
        ``feature``, ``hidden``, ...: :data:`relu_dask.stats.UNIT_DIMS`), else the last axis.
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
    run_options = RunOptions.create(source, dest, **options)
    if dry_run:
        return deliver(planned_report(plan_run(run_options)), run_options, plot=False)
    return run_with(run_options)


def run_with(options: RunOptions) -> RunReport:
    """:func:`run` for options already built: open SOURCE, then under DEST's lock plan and
    execute; draw the plot and write the report the options ask for."""
    refuse_in_a_spawned_copy_of_main()
    if not (options.source_location.is_local and options.dest_location.is_local):
        import_dask_meanwhile()  # while the store's round trips are waited for
    if options.dest_location.object_store is not None:  # its lock is taken while SOURCE opens: DEST checked first
        outputs.prepare_dest(options.source_location, options.dest_location)
    listing = None if options.overwrite else functools.partial(list_dest, options.dest_location)
    with hold_lock_after(options.dest_location, lambda locked: open_inputs(options, locked), listing) as opened:
        journal.reach_step("locked")
        report = execute(plan_run(options, opened[0], under_lock=True, listed=opened[1]))
    return deliver(report, options)


def deliver(report: RunReport, options: RunOptions, *, plot: bool = True, rows_behind: int | None = None) -> RunReport:
    """Draw the plot (unless not ``plot``) and write the JSON report and the metrics file the
    options ask for (a plan writes no metrics); return the report."""
    if plot and options.plot_path is not None:
        from relu_dask.plot import plot_unit_activity

        plot_unit_activity(report, options.plot_path)
    if options.report_path is not None:
        write_report(report, options.report_path)
    if options.metrics_path is not None and report.outcome != "planned":
        write_metrics(options.metrics_path, report, rows_behind=rows_behind)
    return report


def execute(plan: RunPlan, session: Session | None = None) -> RunReport:
    """Run ``plan``: write the masks DEST lacks, record them, return the report.

    ``session``: a scheduler already started (or connected to) to run on, kept open; by
    default one is opened for this run as the plan's options say, and closed at the end.
    A plan whose DEST state was not read under DEST's lock (``plan.under_lock``) is planned
    again under it first: another run may have changed DEST since.
    """
    if not plan.under_lock:
        with hold_lock(plan.dest):
            journal.reach_step("locked")
            return execute(plan_run(plan.options, plan.inputs, under_lock=True), session)
    if plan.inputs.held is not None:  # rows held back now (or no longer): for the next run
        journal.write_held(plan.dest, plan.inputs.held if plan.inputs.held.shapes else None)
    if plan.state == "complete":
        report = _complete_report(plan, session)
        if plan.record is not None and plan.record.damaged:
            return repair(plan, report)
        log.info("DEST %s is already complete: nothing to do", plan.dest)
        return report
    if session is not None:
        return _execute(plan.for_session(session))
    with open_session(plan.options.scheduler) as opened:
        return _execute(plan.for_session(opened))


def _complete_report(plan: RunPlan, session: Session | None) -> RunReport:
    """The report of a DEST already complete: its recorded counts; per-unit ones first asked
    for now are read back from the masks, on ``session`` (opened for them if None)."""
    assert plan.record is not None, "a complete DEST has its record"
    record = plan.record
    with contextlib.ExitStack() as opened:

        def read_unit_ones(array: ArrayPlan) -> list[int]:
            nonlocal session
            session = session or opened.enter_context(open_session(plan.options.scheduler))
            assert array.unit_axis is not None
            return mask_unit_ones(plan.dest, array.source.path, array.unit_axis, session)

        report = recorded_report(plan, read_unit_ones)
    with ThreadPoolExecutor(1) as pool:  # on an object store, at once
        measured = pool.submit(measure_stored, report, plan)
        if plan.inputs.is_group and not outputs.is_consolidated(plan.dest):  # a kill came between the two
            outputs.consolidate(plan.dest, plan.dest_nodes)
        measured.result()
    if record.fingerprint != plan.inputs.fingerprint:  # an older relu-dask's record: keys it lacked
        journal.write_record(plan.dest, replace(record, fingerprint=plan.inputs.fingerprint))
    return report


def _execute(plan: RunPlan) -> RunReport:
    """Run the plan's tasks on its (started) session, in three steps: prepare DEST, run the
    tasks, record the job. The caller holds DEST's lock."""
    inputs, session = plan.inputs, plan.session
    if inputs.source.is_local and inputs.dest.is_local:
        check_workers_see(session, [inputs.source.url], [str(inputs.dest.path.parent)])
    report = plan.report()
    report.outcome = "done"
    run = uuid.uuid4().hex  # this run's tasks, apart from any other run's in this process
    documents = prepare_dest(plan, run=run if _defers_writes(plan) else "")
    try:
        array_tasks = _array_tasks(plan, report, run, documents)
        _log_start(plan, report)
        tasks = [build_mask_tasks(t) for t in array_tasks]
        with _live_page(plan, array_tasks, tasks) as callbacks:
            results = _run_tasks(plan, [t for t in tasks if t is not None], run, report, callbacks)
    except BaseException:
        writebehind.finish_writes(run)  # DEST may still be being prepared: not left half-uploaded
        raise
    journal.reach_step("tasks-done")
    record_job(plan, report, array_tasks, tasks, results, documents)
    return report


def _log_start(plan: RunPlan, report: RunReport) -> None:
    inputs = plan.inputs
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
                "tasks_already_done": plan.tasks_already_done,
            },
        },
    )


@contextlib.contextmanager
def _live_page(plan: RunPlan, array_tasks: list[ArrayTasks], tasks: list[MaskTasks | None]) -> Iterator[list[Any]]:
    """Where the session serves the live page: tell it of the run's arrays, and yield the
    dask callbacks that feed it on a local scheduler (a cluster's tasks log events instead)."""
    session = plan.session
    if session.live_page is None:
        yield []
        return
    arrays = []
    for planned, each in zip(plan.arrays, array_tasks, strict=True):
        src, axis = planned.source, each.unit_axis
        arrays.append(
            livepage.ArrayLive(
                src.path,
                math.prod(each.plan.task_numblocks),
                src.dtype.itemsize,
                unit_axis=axis,
                unit_block=0 if axis is None else each.plan.block_shape[axis],
                units=0 if axis is None else src.shape[axis],
                labels=None if axis is None else conventions.unit_labels(src, axis, plan.inputs.coordinates),
            )
        )
    livepage.begin(array_tasks[0].run if array_tasks else "", arrays, {t.name: t.tasks.name for t in tasks if t})
    if session.client is not None:
        session.client.subscribe_topic(livepage.TOPIC, livepage.on_event)  # events of a run not this one: dropped
    try:
        yield [] if session.client is not None else [livepage.block_watcher()]
    finally:
        livepage.finish()


def _run_tasks(
    plan: RunPlan, to_compute: list[MaskTasks], run: str, report: RunReport, callbacks: list[Any]
) -> list[Any]:
    """Compute the tasks on the plan's session (dask ``callbacks`` watching on a local
    scheduler); their count rows, per array computed. The report gets the wall and CPU time."""
    options, session = plan.options, plan.session
    start, start_cpu = time.perf_counter(), time.process_time()
    allow_tasks(run)
    # An incremental run keeps DEST on a NaN: its masks of the rows before are the user's.
    computed = False
    with _processing_errors(plan.dest, keep=plan.incremental), _stopping(plan, run):
        try:
            results = compute(
                session,
                to_compute,
                options.progress,
                options.progress_interval_s,
                options.performance_report,
                callbacks,
            )
            computed = True
        except Exception:
            # A task failed (a NaN with --nan error, a disk full): the pool's other threads may
            # still run theirs. None starts now, and those running finish, before DEST is
            # removed or its lock let go.
            _stop_tasks(session, run)
            raise
        finally:
            _release_buffers(session)
            # the chunks and done markers the tasks left to the pool (all done: the job is recorded next)
            unwritten = writebehind.finish_writes(run, drop_waiting=computed)
        if unwritten:
            raise unwritten[0]  # a write to DEST that failed
    report.wall_s, report.cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    return results


def _stop_tasks(session: Session, run: str) -> int:
    """No task of ``run`` starts now, here or on a cluster's workers (one a worker had queued
    may otherwise start after the cancel); wait (up to :data:`STOP_GRACE_S`) for those
    running; return how many still run."""
    still = wait_for_running_tasks(run, STOP_GRACE_S)
    if session.client is not None:
        with contextlib.suppress(Exception):  # a worker that went away runs nothing
            still += sum(session.client.run(stop_tasks_on_worker, run, STOP_GRACE_S).values())
    return still


def _release_buffers(session: Session) -> None:
    """Free the block buffers the tasks kept for reuse, here and on a cluster's workers."""
    chunkio.release_buffers()
    if session.client is not None:
        with contextlib.suppress(Exception):  # a worker that died took its buffers with it
            session.client.run(chunkio.release_buffers)


@contextlib.contextmanager
def _stopping(plan: RunPlan, run: str) -> Iterator[None]:
    """On SIGTERM or Ctrl-C: no new task starts; those running may finish (up to
    :data:`STOP_GRACE_S`) and mark themselves done; then one line says how far it got."""
    try:
        yield
    except KeyboardInterrupt as stop:
        signum = getattr(stop, "signum", signal.SIGINT)
        still = _stop_tasks(plan.session, run)
        writebehind.finish_writes(run)  # those the tasks let go of meanwhile: not written is not done
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


def _array_tasks(plan: RunPlan, report: RunReport, run: str, documents: dict[str, bytes]) -> list[ArrayTasks]:
    """Each array's tasks, with the mask arrays opened as they are now in DEST (from their
    ``documents`` by path where the run just wrote them)."""
    from dask.base import tokenize

    out = []
    options, inputs = plan.options, plan.inputs
    masks = at_once(
        lambda a: storage.open_mask_array(inputs.dest, a.source.path, document=documents.get(a.source.path)),
        plan.arrays,
    )
    for array, mask in zip(plan.arrays, masks, strict=True):
        src, chunk_plan = array.source, array.chunks
        assert src.stored is not None, "open_source describes every array"
        report.arrays[array.index].set_io_paths(src.stored, mask)
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
                done_dir=journal.done_dir(inputs.dest, array.index),
                may_be_done=plan.state != "fresh",  # a fresh DEST's journal holds no marker
                defer_writes=_defers_writes(plan),
                unit_axis=array.unit_axis,
                token=token,
                live=plan.session.live_page is not None and plan.session.client is not None,
                run=run,
            )
        )
    return out


def _defers_writes(plan: RunPlan) -> bool:
    """Whether the tasks leave their writes to the store's pool (:mod:`relu_dask.writebehind`):
    on the threads and synchronous schedulers, where the pool outlives each task (the store
    decides whether it has one: a local DEST writes as before)."""
    return plan.session.client is None and plan.session.spec.name in ("threads", "synchronous")
