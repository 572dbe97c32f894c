"""A run's plan: what will be read, how it is cut into tasks, and what DEST already holds.

:func:`plan_run` turns :class:`~relu_dask.options.RunOptions` into a frozen
:class:`RunPlan`: it opens SOURCE (:func:`open_inputs`), reads DEST's state and journal
(:mod:`relu_dask.resume`), sizes the scheduler without starting it, resolves the engine
and plans every array once (:func:`relu_dask.chunking.plan_chunks`). ``relu-dask plan``
prints :meth:`RunPlan.describe`; :func:`relu_dask.execution.execute` runs the plan.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Literal

from relu_dask import chunking, journal, outputs, storage
from relu_dask.chunking import format_bytes
from relu_dask.counts import KeptCounts
from relu_dask.errors import InputError, ReluDaskError
from relu_dask.fingerprint import fingerprint_job, settled_sha256, stat_chunk
from relu_dask.growth import kept_of_partial_run, num_kept, plan_growth, starting_at
from relu_dask.kernel import choose_engine, rule_for
from relu_dask.livewriter import settle
from relu_dask.locations import Location, at_once, in_background
from relu_dask.lock import moved_in
from relu_dask.options import RunOptions, check_output_files
from relu_dask.records import ArrayFingerprint, JobFingerprint
from relu_dask.report import ArrayReport, RunReport, collect_versions, render_summary
from relu_dask.resume import DestFound, DestListing, DestState, dest_state
from relu_dask.schedulers import Session, plan_session

__all__ = ["ArrayPlan", "RunInputs", "RunPlan", "open_inputs", "plan_run"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunInputs:
    """SOURCE opened and DEST located: everything about a run that does not depend on DEST's state."""

    source: Location
    dest: Location
    arrays: tuple[storage.SourceArray, ...]
    skipped: tuple[storage.Skipped, ...]
    coordinates: tuple[storage.SourceArray, ...]
    """xarray's coordinates of a group SOURCE: copied into DEST unchanged."""
    attributes: dict[str, Any]
    """The SOURCE group's attributes (DEST's group keeps them)."""
    groups: dict[str, dict[str, Any]]
    """The SOURCE group's subgroups and their attributes, by path."""
    unit_axes: tuple[int | None, ...]
    """Per array, the unit axis of the statistics (None: no statistics, or a scalar)."""
    append_axes: tuple[int | None, ...]
    """Per array, the axis it may grow along between runs (None: growth refused, or a scalar)."""
    fingerprinted: Future[JobFingerprint]
    """Source identity and the options that change the result, as found at the start (on an
    object store looked at in the background: a fresh DEST's record is written while the
    tasks read; a rerun's plan waits for it): :attr:`fingerprint`."""
    held: journal.Held | None = None
    """What this run holds back of rows that look half-written (the run records it: see
    :class:`relu_dask.journal.Held`); empty: an earlier run's record is done with; None:
    nothing to record."""

    @property
    def fingerprint(self) -> JobFingerprint:
        return self.fingerprinted.result()

    @property
    def is_group(self) -> bool:
        """Whether SOURCE is a group (DEST then is one too)."""
        return not (len(self.arrays) == 1 and self.arrays[0].path == "")

    @property
    def array_paths(self) -> list[str]:
        return [a.path for a in self.arrays]


def open_inputs(options: RunOptions, locked: Callable[[], None] | None = None) -> RunInputs:
    """Open SOURCE, locate DEST, check the unit axis against every array; touch nothing.

    ``locked``: waits for DEST's lock, being taken meanwhile (:func:`relu_dask.lock.hold_lock_after`),
    which moves an older relu-dask's record into DEST; without it, such a record is moved
    here unless a run holds DEST."""
    check_output_files(
        report=options.report_path,
        plot=options.plot_path,
        performance_report=options.performance_report,
        metrics_file=options.metrics_path,
    )
    source = options.source_location
    with ThreadPoolExecutor(3) as pool:  # DEST's record read while SOURCE opens: on an object store, at once
        older = pool.submit(journal.legacy_files, options.dest_location)  # an older relu-dask's, beside DEST
        held = pool.submit(journal.read_held, options.dest_location)
        recorded_job = pool.submit(lambda: None if options.overwrite else journal.read_record(options.dest_location))
        contents = storage.open_source(source)
        _refuse_masks_as_source(source, contents)
        dest = outputs.prepare_dest(source, options.dest_location)
        held_before, record = held.result(), recorded_job.result()
        if older.result() and moved_in(dest, locked):  # read again, from DEST
            held_before = journal.read_held(dest)
            record = None if options.overwrite else journal.read_record(dest)
    recorded: dict[str, ArrayFingerprint] = {}
    for entry in record.fingerprint.get("arrays", []) if record else []:
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            recorded[entry["path"]] = entry
    taken = settle(source, contents, dest, options.append_axis, recorded, options.settle_s, held_before)
    contents, arrays, coordinates, append_axes = taken.contents, taken.arrays, taken.coordinates, taken.append_axes
    unit_axes = tuple(_unit_axis(options, src) for src in arrays)
    settings: JobFingerprint = {
        "source": source.url,
        "arrays": [],
        "rule": rule_for(options.at_zero),
        "nan": options.nan,
        "dest_chunks": _as_list(options.dest_chunks),
        "dest_shards": _as_list(options.dest_shards),
        "compressor": options.dest_compressor,
    }
    job = partial(fingerprint_job, source, tuple(arrays), tuple(coordinates), append_axes, recorded, settings)
    return RunInputs(
        source,
        dest,
        tuple(arrays),
        tuple(contents.skipped),
        tuple(coordinates),
        contents.attributes,
        contents.groups,
        unit_axes,
        append_axes,
        in_background(job, daemon=True) if not source.is_local else _done(job()),
        taken.held,
    )


def _done(fingerprint: JobFingerprint) -> Future[JobFingerprint]:
    done: Future[JobFingerprint] = Future()
    done.set_result(fingerprint)
    return done


def _refuse_masks_as_source(source: Location, contents: storage.SourceContents) -> None:
    """SOURCE that is relu-dask's own output (its provenance attribute says so): its masks
    would be all 1, a mistake of argument order far more often than a wish."""
    made = [contents.attributes, *(a.array.attrs for a in contents.arrays)]
    source_key = outputs.PROVENANCE_PREFIX + "source"
    found = next((m for m in made if source_key in m or outputs.PROVENANCE_KEY in m), None)
    if found is not None:
        older = found.get(outputs.PROVENANCE_KEY)
        origin = found.get(source_key) or (older.get("source") if isinstance(older, dict) else None)
        raise InputError(
            f"SOURCE {source} holds masks relu-dask made"
            + (f" (from {origin})" if origin else "")
            + ": pass the activations as SOURCE, the masks' place as DEST"
        )


@dataclass(frozen=True)
class ArrayPlan:
    """One array's part of a run: its source, how it is cut into tasks, what DEST keeps of it."""

    index: int
    """Its place among SOURCE's arrays (the journal's array index)."""
    source: storage.SourceArray
    chunks: chunking.ChunkPlan
    """How it is cut into tasks (a resumed run: exactly as the first run cut it)."""
    unit_axis: int | None
    """The unit axis of its statistics (None: no statistics, or a scalar)."""
    append_axis: int | None
    """The axis it may grow along between runs (None: growth refused, or a scalar)."""
    tasks_already_done: int = 0
    """The tasks DEST's journal marks done."""
    kept: KeptCounts | None = None
    """The blocks DEST holds already and no task redoes (an incremental run over a grown
    SOURCE, or its resumption; None: every block has a task)."""
    drop_markers_from: int | None = None
    """``grow``: the done markers to drop before any task runs, those of the blocks from this
    index on along the append axis (0: all; None: none). They were done for a smaller SOURCE,
    at whose edge their blocks were cut short."""

    @property
    def path(self) -> str:
        return self.source.path


@dataclass(frozen=True)
class RunPlan:
    """Everything decided before the first task: frozen, and described by :meth:`describe`."""

    options: RunOptions
    inputs: RunInputs
    state: DestState
    """``fresh`` (DEST new, or replaced with ``overwrite``), ``resume`` or ``complete``."""
    record: journal.JobRecord | None
    """The job DEST's journal holds (None when fresh)."""
    session: Session
    """The scheduler's sizing: tasks at once, cores and memory per task."""
    engine: Literal["numpy", "numexpr"]
    arrays: tuple[ArrayPlan, ...]
    """One plan per array of SOURCE, in order."""
    grown: dict[str, list[int] | None] = field(default_factory=dict)
    """``grow``: the arrays that grew since DEST's record (their shape then) or are new (None)."""
    forget_completion: bool = False
    """DEST's journal said complete but DEST lacks masks it names: the run's first step
    records ``record`` (made incomplete) and drops the done markers
    (:attr:`relu_dask.resume.DestFound.forget_completion`)."""
    under_lock: bool = False
    """Whether DEST's state was read under DEST's lock, held by the caller (as
    :func:`relu_dask.run` does); :func:`relu_dask.execution.execute` reads it again under
    the lock otherwise."""
    dest_clean: bool = False
    """``fresh``: DEST held nothing to remove (:attr:`relu_dask.resume.DestFound.clean`)."""

    @property
    def dest(self) -> Location:
        return self.inputs.dest

    @property
    def dest_nodes(self) -> list[str]:
        """The paths of the arrays and groups the run makes in DEST (masks, coordinates, groups)."""
        inputs = self.inputs
        return [*(a.source.path for a in self.arrays), *(c.path for c in inputs.coordinates), *inputs.groups]

    @property
    def num_tasks(self) -> int:
        return sum(a.chunks.num_tasks for a in self.arrays)

    @property
    def tasks_already_done(self) -> int:
        """The tasks DEST's journal marks done, of every array."""
        return sum(a.tasks_already_done for a in self.arrays)

    @property
    def incremental(self) -> bool:
        """Whether DEST keeps blocks of an earlier run that no task redoes (SOURCE grew)."""
        return any(a.kept is not None for a in self.arrays)

    def for_session(self, session: Session) -> RunPlan:
        """This plan for a scheduler now started (or connected to): planned again only if
        its sizing differs from the one planned for (an existing cluster is known only once
        connected)."""
        sized = (session.num_threads, session.cores_per_thread, session.memory_per_thread_bytes)
        if sized == (self.session.num_threads, self.session.cores_per_thread, self.session.memory_per_thread_bytes):
            return replace(self, session=session)
        found = DestFound(self.state, self.record, self.grown, self.forget_completion, self.dest_clean)
        return _plan(self.options, self.inputs, found, session, under_lock=self.under_lock)

    def report(self) -> RunReport:
        """A new report of this plan, before any task ran (the run fills in the rest)."""
        report = RunReport(
            source=str(self.inputs.source),
            dest=str(self.dest),
            rule=rule_for(self.options.at_zero),
            scheduler=self.options.scheduler.label,
            engine=self.engine,
            num_threads=self.session.num_threads,
            numexpr_threads=self.session.cores_per_thread,
            chunks=str(self.options.chunks),
            skipped=[{"path": s.path, "reason": s.reason} for s in self.inputs.skipped],
            coordinates=[c.path for c in self.inputs.coordinates],
            versions=collect_versions(),
            nan_policy=self.options.nan,
            dashboard_link=self.session.dashboard_link,
            live_page=self.session.live_page,
            outcome="already complete" if self.state == "complete" else "planned",
        )
        for array in self.arrays:
            src, plan, done, base = array.source, array.chunks, array.tasks_already_done, array.kept
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
                    tasks_already_done=done,
                    grown_from=self.grown.get(src.path),
                    blocks_kept=num_kept(plan, base),
                    rows_waiting=math.prod(src.array.shape)
                    and max((n - h for n, h in zip(src.array.shape, src.held_shape or src.array.shape)), default=0),
                )
            )
            report.warnings.extend(f"{src.path}: {n}" if src.path else n for n in plan.notes)
            if src.held_shape is not None:
                report.warnings.append(
                    f"{src.path or 'SOURCE'}: {_dims(src.held_shape)} processed of {_dims(src.array.shape)}: the rest "
                    "looks half-written (a writer appending now?) and waits for the next run, which takes it as it "
                    "is if SOURCE has not changed by then"
                )
        return report

    def describe(self, report: RunReport | None = None) -> list[str]:
        """The plan in the lines ``relu-dask plan`` prints: of ``report`` where given (this
        plan's, filled in: :func:`relu_dask.results.planned_report`), else of a new one."""
        report = report if report is not None else self.report()
        lines = render_summary(report)
        if report.outcome == "planned":
            memory = format_bytes(max((a.memory_per_task_bytes for a in report.arrays), default=0))
            threads = report.num_threads or "all the cluster"
            lines.append(f"  nothing written; about {memory} per task at most, {threads} task(s) at once")
        return lines


def plan_run(
    options: RunOptions, inputs: RunInputs | None = None, *, under_lock: bool = False, listed: DestListing | None = None
) -> RunPlan:
    """Plan a run: open SOURCE (unless ``inputs`` are given), read DEST's state, size the
    scheduler without starting it, plan every array.

    Raises the run's one-line errors (:class:`~relu_dask.errors.InputError`,
    :class:`~relu_dask.errors.DestinationExistsError`, a plan that cannot fit in memory)
    before anything is written. Reads only. ``under_lock``: the caller holds DEST's lock (else
    :func:`relu_dask.execution.execute` plans again under it); ``listed``: DEST listed under it.
    """
    inputs = inputs if inputs is not None else open_inputs(options)
    by_path = {a.path: a for a in inputs.arrays}
    found = dest_state(
        inputs.dest,
        lambda: inputs.fingerprint,
        is_group=inputs.is_group,
        overwrite=options.overwrite,
        append_axis=options.append_axis,
        restat=lambda path, key: stat_chunk(by_path[path], key),
        rehash=lambda path, axis, rows: settled_sha256(by_path[path], axis, rows),
        listed=listed,
    )
    return _plan(options, inputs, found, plan_session(options.scheduler), under_lock=under_lock)


def _plan(options: RunOptions, inputs: RunInputs, found: DestFound, session: Session, *, under_lock: bool) -> RunPlan:
    state, record, grown = found.state, found.record, found.grown
    memory = session.memory_per_thread_bytes
    if state == "grow":
        assert record is not None, "only a recorded job grows"
        growth = [
            plan_growth(
                record,
                inputs.array_paths,
                src.path,
                axis,
                grown,
                partial(_plan_array, options, src, memory),
                partial(storage.has_array, inputs.dest, src.path),
            )
            for src, axis in zip(inputs.arrays, inputs.append_axes)
        ]
        done = [0] * len(growth)  # counted once the markers are dropped
    else:
        block_shapes = record.block_shapes if record is not None else None
        kept = [
            _if_present(kept_of_partial_run(record, i), inputs.dest, src.path) for i, src in enumerate(inputs.arrays)
        ]
        growth = [
            (
                starting_at(_plan_array(options, src, memory, block_shapes[i] if block_shapes else None), base),
                base,
                None,
            )
            for i, (src, base) in enumerate(zip(inputs.arrays, kept))
        ]
        # markers beside a record made incomplete are dropped before any task runs; a
        # complete one's were deleted (on an object store, a listing each saved)
        counted = record is not None and not found.forget_completion and state != "complete"
        done = at_once(partial(journal.count_done, inputs.dest), range(len(growth))) if counted else [0] * len(growth)
    arrays = tuple(
        ArrayPlan(i, src, chunks, unit_axis, append_axis, n, kept, drop_from)
        for i, (src, unit_axis, append_axis, (chunks, kept, drop_from), n) in enumerate(
            zip(inputs.arrays, inputs.unit_axes, inputs.append_axes, growth, done)
        )
    )
    return RunPlan(
        options,
        inputs,
        state,
        record,
        session,
        choose_engine(options.engine, session.cores_per_thread),
        arrays,
        grown=grown,
        forget_completion=found.forget_completion,
        under_lock=under_lock,
        dest_clean=found.clean,
    )


def _if_present(kept: KeptCounts | None, dest: Location, path: str) -> KeptCounts | None:
    """``kept``, unless DEST lost the mask array since (then every block is redone)."""
    return kept if kept is None or storage.has_array(dest, path) else None


def _plan_array(
    options: RunOptions, src: storage.SourceArray, memory_limit: int | None, block_shape: list[int] | None
) -> chunking.ChunkPlan:
    where = f" of {src.path}" if src.path else ""
    ndim = len(src.shape)
    chunk_shape = (
        chunking.parse_shape(options.dest_chunks, what=f"dest chunks{where}", ndim=ndim)
        if options.dest_chunks is not None
        else src.chunk_shape
    )
    shard_shape = (
        chunking.parse_shape(options.dest_shards, what=f"dest shards{where}", ndim=ndim)
        if options.dest_shards is not None
        else (src.shard_shape if options.dest_chunks is None else None)
    )
    # A resumed run cuts exactly the tasks of the first run, whatever --chunks says now.
    spec = tuple(block_shape) if block_shape else options.chunks
    try:
        return chunking.plan_chunks(
            src.shape,
            src.dtype.itemsize,
            src.chunk_shape,
            chunk_shape,
            shard_shape,
            chunks=spec,
            memory_limit_bytes=memory_limit,
        )
    except ReluDaskError as exc:
        raise type(exc)(f"{src.path}: {exc}" if src.path else str(exc)) from None


def _unit_axis(options: RunOptions, src: storage.SourceArray) -> int | None:
    """The unit axis of ``src`` (a bad ``--unit-axis`` or ``--unit-dim`` is refused before anything runs)."""
    units = options.units
    return None if units is None else units.axis_of(len(src.shape), src.dimension_names, where=src.path or "the source")


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _as_list(shape: tuple[int, ...] | None) -> list[int] | None:
    return None if shape is None else list(shape)
