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
import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from relu_dask import chunking, journal, storage
from relu_dask.chunking import format_bytes
from relu_dask.counts import BlockCounts, KeptCounts
from relu_dask.errors import InputError, ReluDaskError
from relu_dask.kernel import choose_engine, rule_for
from relu_dask.locations import Location
from relu_dask.options import RunOptions, check_output_files
from relu_dask.report import ArrayReport, RunReport, collect_versions, render_summary
from relu_dask.resume import DestState, dest_state
from relu_dask.schedulers import Session, plan_session
from relu_dask.stats import parse_unit_axis

__all__ = ["RunInputs", "RunPlan", "open_inputs", "plan_run"]

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
    fingerprint: dict[str, Any]
    """Source identity and the options that change the result, as found at the start."""
    held: journal.Held | None = None
    """What this run holds back of rows that look half-written (the run records it: see
    :class:`relu_dask.journal.Held`); empty: an earlier run's record is done with; None:
    nothing to record."""

    @property
    def is_group(self) -> bool:
        """Whether SOURCE is a group (DEST then is one too)."""
        return not (len(self.arrays) == 1 and self.arrays[0].path == "")

    @property
    def array_paths(self) -> list[str]:
        return [a.path for a in self.arrays]


def open_inputs(options: RunOptions) -> RunInputs:
    """Open SOURCE, locate DEST, check the unit axis against every array; touch nothing."""
    check_output_files(
        report=options.report_path, plot=options.plot_path, performance_report=options.performance_report
    )
    source = options.source_location
    contents = storage.open_source(source)
    dest = storage.prepare_dest(source, options.dest_location)
    record = None if options.overwrite else journal.read_record(dest)
    recorded: dict[str, dict[str, Any]] = {}
    for entry in record.fingerprint.get("arrays", []) if record else []:
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            recorded[entry["path"]] = entry
    # A writer appending now grows the shape first, then writes the chunks (xarray: one
    # variable after the other): SOURCE is read again until what it appended looks written;
    # what still does not after options.settle_s waits for the next run, unless SOURCE's shapes are
    # those a run already held rows back at (then the missing chunks are all fill value).
    held_before = journal.read_held(dest)
    # chunks missing at the last run's hold and still missing now are all fill value
    stale = {path: frozenset(keys) for path, keys in held_before.missing.items()}
    end = time.monotonic() + options.settle_s
    while True:
        append_axes = _append_axes(options.append_axis, contents.arrays)
        shapes = {a.path: list(a.array.shape) for a in (*contents.arrays, *contents.coordinates)}
        rows, coordinate_rows = _written(contents, append_axes, recorded, stale)
        whole = all(rows[a.path] == a.shape[axis] for a, axis in zip(contents.arrays, append_axes) if axis is not None)
        whole = whole and all(
            coordinate_rows[c.path] == c.shape[0] for c in contents.coordinates if c.path in coordinate_rows
        )
        if whole or shapes == held_before.shapes:
            arrays, coordinates = list(contents.arrays), list(contents.coordinates)
            held = journal.Held() if held_before.shapes else None
            break
        if time.monotonic() >= end:
            arrays, coordinates = _hold_back(contents, append_axes, rows, coordinate_rows, options.settle_s)
            held = journal.Held(shapes, _missing(contents, append_axes, rows, recorded))
            break
        time.sleep(0.05)
        contents = storage.open_source(source)
    unit_axes = tuple(_unit_axis(options.unit_axis, src) for src in arrays)
    fingerprint = {
        "source": source.url,
        "arrays": [
            # held at the shape DEST recorded: the array as DEST last saw it
            recorded[a.path]
            if a.held_shape is not None and list(a.held_shape) == recorded.get(a.path, {}).get("shape")
            else storage.fingerprint_array(a, append_axis=axis)
            for a, axis in zip(arrays, append_axes)
        ],
        "coordinates": [storage.fingerprint_array(c) for c in coordinates],
        "rule": rule_for(options.at_zero),
        "nan": options.nan,
        "dest_chunks": _as_list(options.dest_chunks),
        "dest_shards": _as_list(options.dest_shards),
        "compressor": options.dest_compressor,
    }
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
        fingerprint,
        held,
    )


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
    chunk_plans: tuple[chunking.ChunkPlan, ...]
    """Per array, how it is cut into tasks (a resumed run: exactly as the first run cut it)."""
    tasks_already_done: tuple[int, ...]
    """Per array, the tasks DEST's journal marks done."""
    kept: tuple[KeptCounts | None, ...] = ()
    """Per array, the blocks DEST holds already and no task redoes (an incremental run over
    a grown SOURCE, or its resumption; None: every block has a task)."""
    grown: dict[str, list[int] | None] = field(default_factory=dict)
    """``grow``: the arrays that grew since DEST's record (their shape then) or are new (None)."""
    drop_markers: tuple[int | None, ...] = ()
    """``grow``, per array: done markers to drop before any task runs, those of the blocks
    from this index on along the append axis (0: all; None: none). They were done for a
    smaller SOURCE, at whose edge their blocks were cut short."""
    under_lock: bool = False
    """Whether DEST's state was read under DEST's lock, held by the caller (as
    :func:`relu_dask.run` does); :func:`relu_dask.execution.execute` reads it again under
    the lock otherwise."""

    @property
    def dest(self) -> Location:
        return self.inputs.dest

    @property
    def num_tasks(self) -> int:
        return sum(p.num_tasks for p in self.chunk_plans)

    def for_session(self, session: Session) -> RunPlan:
        """This plan for a scheduler now started (or connected to): planned again only if
        its sizing differs from the one planned for (an existing cluster is known only once
        connected)."""
        sized = (session.num_threads, session.cores_per_thread, session.memory_per_thread_bytes)
        if sized == (self.session.num_threads, self.session.cores_per_thread, self.session.memory_per_thread_bytes):
            return replace(self, session=session)
        return _plan(
            self.options, self.inputs, self.state, self.record, self.grown, session, under_lock=self.under_lock
        )

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
            outcome="already complete" if self.state == "complete" else "planned",
        )
        kept = self.kept or (None,) * len(self.inputs.arrays)
        for src, plan, done, base in zip(self.inputs.arrays, self.chunk_plans, self.tasks_already_done, kept):
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
                    blocks_kept=_num_kept(plan, base),
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

    def describe(self) -> list[str]:
        """The plan in the lines ``relu-dask plan`` prints."""
        report = self.report()
        lines = render_summary(report)
        if report.outcome == "planned":
            memory = format_bytes(max((a.memory_per_task_bytes for a in report.arrays), default=0))
            threads = report.num_threads or "all the cluster"
            lines.append(f"  nothing written; about {memory} per task at most, {threads} task(s) at once")
        return lines


def plan_run(options: RunOptions, inputs: RunInputs | None = None, *, under_lock: bool = False) -> RunPlan:
    """Plan a run: open SOURCE (unless ``inputs`` are given), read DEST's state, size the
    scheduler without starting it, plan every array.

    Raises the run's one-line errors (:class:`~relu_dask.errors.InputError`,
    :class:`~relu_dask.errors.DestinationExistsError`, a plan that cannot fit in memory)
    before anything is written. ``under_lock``: the caller holds DEST's lock, and a journal
    that claims more than DEST holds is corrected on the spot (see
    :func:`relu_dask.resume.dest_state`).
    """
    inputs = inputs if inputs is not None else open_inputs(options)
    by_path = {a.path: a for a in inputs.arrays}
    state, record, grown = dest_state(
        inputs.dest,
        inputs.fingerprint,
        is_group=inputs.is_group,
        overwrite=options.overwrite,
        under_lock=under_lock,
        append_axis=options.append_axis,
        restat=lambda path, key: storage.stat_chunk(by_path[path], key),
        rehash=lambda path, axis, rows: storage.settled_sha256(by_path[path], axis, rows),
    )
    return _plan(options, inputs, state, record, grown, plan_session(options.scheduler), under_lock=under_lock)


def _plan(
    options: RunOptions,
    inputs: RunInputs,
    state: DestState,
    record: journal.JobRecord | None,
    grown: dict[str, list[int] | None],
    session: Session,
    *,
    under_lock: bool,
) -> RunPlan:
    memory = session.memory_per_thread_bytes
    if state == "grow":
        assert record is not None, "only a recorded job grows"
        growth = [_grow_array(options, inputs, record, grown, i, memory) for i in range(len(inputs.arrays))]
        plans = tuple(g[0] for g in growth)
        kept = tuple(g[1] for g in growth)
        drops = tuple(g[2] for g in growth)
        done: tuple[int, ...] = (0,) * len(plans)  # counted once the markers are dropped
    else:
        block_shapes = record.block_shapes if record is not None else None
        kept = tuple(
            _if_present(_recorded_kept(record, i), inputs.dest, src.path) for i, src in enumerate(inputs.arrays)
        )
        plans = tuple(
            _starting_at(_plan_array(options, src, memory, block_shapes[i] if block_shapes else None), base)
            for i, (src, base) in enumerate(zip(inputs.arrays, kept))
        )
        drops = ()
        done = tuple(journal.count_done(inputs.dest, i) if record is not None else 0 for i in range(len(plans)))
    engine = choose_engine(options.engine, session.cores_per_thread)
    return RunPlan(
        options,
        inputs,
        state,
        record,
        session,
        engine,
        plans,
        done,
        kept=kept,
        grown=grown,
        drop_markers=drops,
        under_lock=under_lock,
    )


def _recorded_kept(record: journal.JobRecord | None, index: int) -> KeptCounts | None:
    """The kept blocks an interrupted incremental run recorded for array ``index``."""
    if record is None or record.complete or not record.kept or index >= len(record.kept):
        return None
    data = record.kept[index]
    return None if data is None else KeptCounts.from_dict(data)


def _if_present(kept: KeptCounts | None, dest: Location, path: str) -> KeptCounts | None:
    """``kept``, unless DEST lost the mask array since (then every block is redone)."""
    return kept if kept is None or storage.has_array(dest, path) else None


def _starting_at(plan: chunking.ChunkPlan, kept: KeptCounts | None) -> chunking.ChunkPlan:
    return plan if kept is None else plan.starting_at(kept.axis, kept.first_block)


def _num_kept(plan: chunking.ChunkPlan, kept: KeptCounts | None) -> int:
    if kept is None or not math.prod(plan.shape):
        return 0
    return kept.first_block * math.prod(n for a, n in enumerate(plan.numblocks) if a != kept.axis)


def _grow_array(
    options: RunOptions,
    inputs: RunInputs,
    record: journal.JobRecord,
    grown: dict[str, list[int] | None],
    index: int,
    memory: int | None,
) -> tuple[chunking.ChunkPlan, KeptCounts | None, int | None]:
    """Plan array ``index`` of a SOURCE that grew since DEST's record: its tasks, the blocks
    it keeps, and the done markers to drop (see :attr:`RunPlan.drop_markers`)."""
    src, axis = inputs.arrays[index], inputs.append_axes[index]
    old_paths = [a["path"] for a in record.fingerprint["arrays"]]
    # Markers are kept per array index: if the arrays moved, none can be trusted. A complete
    # record's markers (a kill came before they were dropped) count for nothing either.
    drop_all = 0 if old_paths != inputs.array_paths or record.complete else None
    if src.path not in old_paths:  # new in the SOURCE group: every block has a task
        return _plan_array(options, src, memory, None), None, 0
    old = old_paths.index(src.path)
    block = record.block_shapes[old]
    recorded = _kept_whole(record, old, block, axis) if record.complete else _recorded_kept(record, old)
    recorded = _if_present(recorded, inputs.dest, src.path)
    if src.path not in grown:  # unchanged: what DEST holds stays (a partial run resumes)
        plan = _plan_array(options, src, memory, block)
        return _starting_at(plan, recorded), recorded, drop_all
    old_rows = grown[src.path]
    assert old_rows is not None and axis is not None, "a grown array has its old shape and an append axis"
    if block[axis] >= old_rows[axis]:
        # One block row covered the old extent: plan afresh for the new one, redo it all.
        return _plan_array(options, src, memory, None), None, 0
    plan = _plan_array(options, src, memory, block)
    if recorded is not None and recorded.axis != axis:  # grown along another axis than recorded
        return plan, None, 0
    first = old_rows[axis] // block[axis]  # the first block not whole at the old extent
    if record.complete:
        kept = _without_edge(record, old, recorded, old_rows, block, axis, first)
        return _starting_at(plan, kept), kept, drop_all
    if recorded is None and not record.complete:
        return plan, None, 0 if drop_all == 0 else first
    return _starting_at(plan, recorded), recorded, 0 if drop_all == 0 else first


def _kept_whole(record: journal.JobRecord, index: int, block: list[int], axis: int | None) -> KeptCounts | None:
    """Every block of array ``index`` of a complete record, as kept blocks along ``axis``."""
    if axis is None or not record.block_ones or index >= len(record.block_ones):
        return None
    shape = record.fingerprint["arrays"][index]["shape"]
    if not math.prod(shape):
        return None
    unit_axis = record.unit_axes[index] if record.unit_axes and index < len(record.unit_axes) else None
    unit_ones = record.unit_ones[index] if record.unit_ones and index < len(record.unit_ones) else None
    recorded_axis = None if record.append_axis is None else record.append_axis % len(shape)
    edges = record.edge_blocks if recorded_axis == axis and record.edge_blocks else []
    return KeptCounts(
        axis=axis,
        first_block=-(-shape[axis] // block[axis]),
        counts=BlockCounts.from_row(record.counts_of(index).recorded()),
        block_ones=tuple(record.block_ones[index]),
        block_digests=_recorded_digests(record, index),
        unit_axis=unit_axis if unit_ones is not None else None,
        unit_ones=tuple(unit_ones) if unit_ones is not None else None,
        edge=edges[index] if index < len(edges) else None,
    )


def _recorded_digests(record: journal.JobRecord, index: int) -> tuple[int, ...] | None:
    """The block digests a complete record holds for array ``index`` (None: an older relu-dask's)."""
    digests, ones = record.block_digests, record.block_ones or []
    if not digests or index >= min(len(digests), len(ones)) or len(digests[index]) != len(ones[index]):
        return None
    return tuple(int(v) for v in digests[index])


def _without_edge(
    record: journal.JobRecord,
    index: int,
    whole: KeptCounts | None,
    old_shape: list[int],
    block: list[int],
    axis: int,
    first: int,
) -> KeptCounts | None:
    """The kept blocks of a complete array once grown: all but the old edge block row along
    ``axis`` (whose blocks were cut short by the old extent), or None if that row's counts
    were not recorded (then every block is redone)."""
    if whole is None:
        return None
    numblocks = [-(-n // b) for n, b in zip(old_shape, block)]
    ones = np.asarray(whole.block_ones, dtype=np.int64).reshape(numblocks)
    kept_ones = np.take(ones, range(first), axis=axis).reshape(-1)
    kept_digests = None
    if whole.block_digests is not None:
        digests = np.asarray(whole.block_digests, dtype=np.int64).reshape(numblocks)
        kept_digests = tuple(int(v) for v in np.take(digests, range(first), axis=axis).reshape(-1))
    counts, unit_ones = whole.counts, None if whole.unit_ones is None else list(whole.unit_ones)
    if first < numblocks[axis]:  # the old edge row is redone: take its counts out
        edge = whole.edge or {}
        if len(edge) != math.prod(n for a, n in enumerate(numblocks) if a != axis):
            return None
        for name, values in edge.items():
            at = [int(i) for i in name.split(".")]
            if len(at) != len(old_shape) or at[axis] != first:
                return None
            counts = counts - BlockCounts.from_row(values[: BlockCounts.NUM_RECORDED])
            if unit_ones is not None and whole.unit_axis is not None:
                start = at[whole.unit_axis] * block[whole.unit_axis]
                for k, v in enumerate(values[BlockCounts.NUM_RECORDED :]):
                    unit_ones[start + k] -= int(v)
        if unit_ones is not None and whole.unit_axis == axis:
            unit_ones = unit_ones[: first * block[axis]]
    return replace(
        whole,
        first_block=first,
        counts=counts,
        block_ones=tuple(int(v) for v in kept_ones),
        block_digests=kept_digests,
        unit_ones=None if unit_ones is None else tuple(unit_ones),
        edge=None,
    )


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


def _append_axes(append_axis: int | None, arrays: list[storage.SourceArray]) -> tuple[int | None, ...]:
    """Each array's append axis (None where it has fewer axes, or is a scalar: it cannot
    grow); refused only if no array has it."""
    if append_axis is None:
        return (None,) * len(arrays)
    axes = tuple(append_axis % len(a.shape) if -len(a.shape) <= append_axis < len(a.shape) else None for a in arrays)
    if all(axis is None for axis in axes) and any(a.shape for a in arrays):
        ndim = max(len(a.shape) for a in arrays)
        raise InputError(f"--append-axis {append_axis} is out of range: the arrays of SOURCE have at most {ndim} axes")
    return axes


def _missing(
    contents: storage.SourceContents,
    append_axes: tuple[int | None, ...],
    rows: dict[str, int],
    recorded: dict[str, dict[str, Any]],
) -> dict[str, list[str]]:
    """Per array held back, the keys of its objects not stored (or, of the old edge chunk
    row, not rewritten yet) in the rows held back (:func:`storage.unwritten_keys`)."""
    out = {}
    for src, axis in zip(contents.arrays, append_axes):
        if axis is not None and rows[src.path] < src.shape[axis]:
            keys = storage.unwritten_keys(src, axis, rows[src.path], recorded.get(src.path, {}).get("edge_samples"))
            if keys:
                out[src.path] = keys
    return out


def _written(
    contents: storage.SourceContents,
    append_axes: tuple[int | None, ...],
    recorded: dict[str, dict[str, Any]],
    stale: dict[str, frozenset[str]] | None = None,
) -> tuple[dict[str, int], dict[str, int]]:
    """Per array, the rows along its append axis that look written (:func:`storage.written_rows`,
    the keys in ``stale`` taken as written) and agree with the rest of its Dataset: every array
    and 1-D coordinate along one dimension of one group as long as the shortest of them (xarray
    appends one variable after the other), never less than DEST recorded. Then per such
    coordinate, its rows."""
    rows: dict[str, int] = {}
    floors: dict[str, int] = {}
    extents: dict[tuple[str, str], int] = {}
    for src, axis in zip(contents.arrays, append_axes):
        if axis is None:
            continue
        before = recorded.get(src.path, {})
        old = before.get("shape")
        from_row = int(old[axis]) if isinstance(old, list) and len(old) == len(src.shape) else None
        if from_row is not None and from_row > src.shape[axis]:
            from_row = None  # shrunk: refused later, as a change
        rows[src.path] = storage.written_rows(
            src, axis, from_row, before.get("edge_samples"), (stale or {}).get(src.path, frozenset())
        )
        floors[src.path] = from_row or 0
        key = _dimension(src, src.dimension_names[axis] if src.dimension_names else f"#{src.path}")
        extents[key] = min(extents.get(key, rows[src.path]), rows[src.path])
    coordinate_rows = {}
    for c in contents.coordinates:
        key = _dimension(c, c.dimension_names[0]) if c.dimension_names and len(c.shape) == 1 else ("", "")
        if key in extents:
            extents[key] = min(extents[key], c.shape[0])
            coordinate_rows[c.path] = key
    for src, axis in zip(contents.arrays, append_axes):
        if axis is not None:
            key = _dimension(src, src.dimension_names[axis] if src.dimension_names else f"#{src.path}")
            rows[src.path] = max(min(rows[src.path], extents[key]), floors[src.path])
    return rows, {path: extents[key] for path, key in coordinate_rows.items()}


def _hold_back(
    contents: storage.SourceContents,
    append_axes: tuple[int | None, ...],
    rows: dict[str, int],
    coordinate_rows: dict[str, int],
    settle_s: float,
) -> tuple[list[storage.SourceArray], list[storage.SourceArray]]:
    """SOURCE's arrays and coordinates, those with rows that still look half-written held at
    the rows that do (:attr:`storage.SourceArray.held_shape`): the rest waits for the next run."""
    arrays = []
    for src, axis in zip(contents.arrays, append_axes):
        if axis is None or rows[src.path] >= src.shape[axis]:
            arrays.append(src)
            continue
        log.warning(
            "%s: rows %d to %d still look half-written after %g s: they wait for the next run",
            src.path or "SOURCE",
            rows[src.path],
            src.shape[axis],
            settle_s,
        )
        arrays.append(
            replace(src, held_shape=tuple(rows[src.path] if a == axis else n for a, n in enumerate(src.shape)))
        )
    coordinates = [
        replace(c, held_shape=(coordinate_rows[c.path],)) if coordinate_rows.get(c.path, c.shape[0]) < c.shape[0] else c
        for c in contents.coordinates
    ]
    return arrays, coordinates


def _dimension(src: storage.SourceArray, name: str) -> tuple[str, str]:
    """A dimension, by its group (each group of a SOURCE is a Dataset of its own) and name."""
    return (src.path.rpartition("/")[0], name)


def _unit_axis(unit_axis: int | None, src: storage.SourceArray) -> int | None:
    """The unit axis of ``src`` (a bad ``--unit-axis`` is refused before anything runs)."""
    if unit_axis is None or not src.shape:
        return None
    return parse_unit_axis(unit_axis, len(src.shape), where=src.path or "the source")


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _as_list(shape: tuple[int, ...] | None) -> list[int] | None:
    return None if shape is None else list(shape)
