"""A run's results: the tasks' count rows and the blocks kept from earlier runs, summed into
the report and into the job DEST records.

The last of a run's three steps (:func:`relu_dask.execution.execute`): :func:`record_counts`
adds up each array's counts (:class:`relu_dask.counts.BlockCounts`), its per-unit ones, its
per-block ones and digests and its last block row along the append axis (for the next
growth), and fills in the report's figures.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from relu_dask import chunking, journal, outputs, storage
from relu_dask.chunkfiles import listing_cuts
from relu_dask.counts import BlockCounts, KeptCounts, TaskRow
from relu_dask.graph import MaskTasks
from relu_dask.locations import Location, at_once
from relu_dask.mask_stats import mask_unit_ones, unit_stats
from relu_dask.planning import ArrayPlan, RunPlan
from relu_dask.report import ArrayReport, RunReport
from relu_dask.task import ArrayTasks

__all__ = [
    "measure_stored",
    "planned_report",
    "record_counts",
    "record_job",
    "recorded_report",
    "set_counts",
    "set_stats",
]

log = logging.getLogger(__name__)


def record_job(
    plan: RunPlan,
    report: RunReport,
    array_tasks: list[ArrayTasks],
    tasks: list[MaskTasks | None],
    results: Sequence[Any],
    documents: dict[str, bytes] | None = None,
) -> None:
    """The last step of a run: sum the counts into the report (:func:`record_counts`), record
    the job complete in ``job.json``, drop the done markers, consolidate a group DEST (from
    ``documents``, its nodes' metadata documents by path, where the run made them all)."""
    dest = plan.dest
    if plan.session.client is not None and outputs.remove_partial_writes(dest):
        # a worker killed mid-write left its temporary file; its task ran again elsewhere
        log.info("DEST %s: temporary files of writes cut short by a lost worker removed", dest)
    totals, units, block_ones, digests, edges = record_counts(report, plan, array_tasks, tasks, iter(results))
    record = journal.JobRecord(
        plan.inputs.fingerprint,
        [list(a.chunks.block_shape) for a in plan.arrays],
        complete=True,
        counts=[c.as_row() for c in totals],
        unit_ones=units,
        unit_axes=[t.unit_axis for t in array_tasks],
        block_ones=block_ones,
        block_digests=digests,
        append_axis=plan.options.append_axis,
        edge_blocks=edges,
    )
    remote = dest.object_store is not None
    with ThreadPoolExecutor(3) as pool:  # independent: on an object store, their round trips overlap
        measured = pool.submit(measure_stored, report, plan)
        # On an object store the markers go and DEST is consolidated while the record is
        # written: killed before it is, the next run redoes the tasks whose markers are gone.
        after: list[Any] = []
        if remote:
            after = _finish_dest(pool, plan, array_tasks, documents)
        journal.write_record(dest, record)
        journal.reach_step("complete")
        if not remote:
            after = _finish_dest(pool, plan, array_tasks, documents)
        for step in [*after, measured]:
            step.result()


def _finish_dest(
    pool: ThreadPoolExecutor, plan: RunPlan, array_tasks: list[ArrayTasks], documents: dict[str, bytes] | None
) -> list[Any]:
    """Drop the done markers and consolidate a group DEST, from ``pool``; their futures."""
    steps = [pool.submit(journal.remove_done_markers, plan.dest, _own_markers(plan, array_tasks))]
    if plan.inputs.is_group:
        steps.append(pool.submit(outputs.consolidate, plan.dest, plan.dest_nodes, documents))
    return steps


def _own_markers(plan: RunPlan, array_tasks: list[ArrayTasks]) -> list[Location] | None:
    """Every done marker of its own in DEST where this run's tasks wrote them all (a fresh
    DEST), else None. Tasks that left their markers to the pool wrote batches instead
    (:func:`relu_dask.journal.remove_done_markers` deletes those): none of their own."""
    if plan.state != "fresh":
        return None
    return [
        t.done_dir.child(journal.marker_name(i))
        for t in array_tasks
        if t.done_dir and not t.defer_writes
        for i in t.plan.iter_block_indices()
    ]


def record_counts(
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
    for entry, planned, array, task in zip(report.arrays, plan.arrays, array_tasks, tasks, strict=True):
        src, kept = planned.source, planned.kept
        counts = BlockCounts()
        unit_ones: list[int] | None = None
        result = np.asarray(next(results)) if task is not None else None
        if result is not None:
            rows = result.reshape(-1, result.shape[-1])
            counts = BlockCounts.total(rows[:, TaskRow.COUNTS].tolist())
            if array.unit_axis is not None:
                unit_ones = _per_unit(result, array)
        elif array.unit_axis is not None and kept is None:  # an empty array
            unit_ones = [0] * src.shape[array.unit_axis]
        set_counts(entry, counts)
        entry.bytes_read = counts.elements_read * src.dtype.itemsize
        entry.tasks_skipped = counts.resumed
        entry.tasks_done_now = entry.num_tasks - counts.resumed
        if kept is not None:
            counts = counts + kept.counts
            unit_ones = _with_kept_units(kept, array, unit_ones)
            if array.unit_axis is not None and unit_ones is None:  # not kept along this axis: read the masks
                unit_ones = mask_unit_ones(plan.dest, src.path, array.unit_axis, plan.session)
            set_counts(entry, counts)
        ones = _per_block(array.plan, kept, result, "ones")
        digests.append(_per_block(array.plan, kept, result, "digest"))
        set_stats(entry, src, array.unit_axis, unit_ones, plan.inputs.coordinates)
        _warn_about_zeros(report, entry)
        totals.append(counts)
        units.append(unit_ones)
        block_ones.append(ones)
        edges.append(_edge_blocks(array, planned.append_axis, kept, result))
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
            extent = plan.task_chunks[array.unit_axis][at[array.unit_axis]]
            units = row[TaskRow.units(extent)].tolist()
        edge[name] = TaskRow.encode_recorded(BlockCounts.from_row(row.tolist()), units)
    return edge


def set_stats(
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
    return [int(v) for j, n in enumerate(extents) for v in by_unit_block[j, TaskRow.units(n)]]


def set_counts(entry: ArrayReport, counts: BlockCounts) -> None:
    entry.num_elements = counts.elements
    entry.num_ones = counts.ones
    entry.num_nans = counts.nans
    entry.num_zeros = counts.zeros


def planned_report(plan: RunPlan) -> RunReport:
    """The report of a dry run (``relu-dask plan``). Of a DEST already complete it gives what
    its record holds (counts, per-unit ones where recorded) and the bytes DEST stores, as a
    run would say: nothing is read from the masks and nothing is written."""
    if plan.state != "complete" or plan.record is None:
        return plan.report()
    report = recorded_report(plan)
    measure_stored(report, plan)
    return report


def recorded_report(plan: RunPlan, read_unit_ones: Callable[[ArrayPlan], list[int]] | None = None) -> RunReport:
    """The report of a plan whose DEST is complete, from DEST's record: its counts, every task
    skipped, per-unit statistics. Per-unit ones the record lacks (no ``--stats`` the first
    time, or another unit axis) come from ``read_unit_ones`` (the masks read back), else are
    left out."""
    assert plan.record is not None, "a complete DEST has its record"
    report = plan.report()
    for entry, array in zip(report.arrays, plan.arrays, strict=True):
        recorded = plan.record.array(array.index)
        set_counts(entry, recorded.counts)
        entry.tasks_skipped = entry.num_tasks
        axis, unit_ones = array.unit_axis, recorded.unit_ones
        if axis is not None and (unit_ones is None or recorded.unit_axis != axis):
            unit_ones = read_unit_ones(array) if read_unit_ones is not None else None
        set_stats(entry, array.source, axis, unit_ones, plan.inputs.coordinates)
    return report


def measure_stored(report: RunReport, plan: RunPlan) -> None:
    """Each array's bytes in DEST (``bytes_written``): its files listed, all arrays at once
    (in a bucket, each array's listing cut into ranges listed at once: a round trip or so
    however many chunks it has)."""
    dest = plan.dest

    def stored(array: ArrayPlan) -> int:
        cuts = listing_cuts(array.chunks.shape, array.chunks.write_unit) if dest.object_store is not None else []
        return storage.array_location(dest, array.path).disk_bytes(skip=journal.JOURNAL_NAME, cuts=cuts)

    sizes = at_once(stored, plan.arrays)
    for entry, size in zip(report.arrays, sizes, strict=True):
        entry.bytes_written = size


def _warn_about_zeros(report: RunReport, entry: ArrayReport) -> None:
    """Under the rule x >= 0 an exact 0 gives 1: say so where that may not be what was meant
    (ReLU outputs given as inputs; units always on because their inputs are all 0)."""
    if report.rule != "x >= 0" or not entry.num_elements:
        return
    name = entry.path or "the source"
    negatives = entry.num_elements - entry.num_ones - entry.num_nans
    if negatives == 0 and entry.num_zeros >= 0.1 * entry.num_elements:
        report.warnings.append(
            f"{name} has no negative values and {entry.num_zeros / entry.num_elements:.0%} exact zeros: "
            "it looks like ReLU outputs, not inputs; with the rule x >= 0 every value gives 1. "
            "If these are ReLU outputs, use --at-zero 0 (rule x > 0)"
        )
    elif entry.stats is not None and entry.stats.always_on_units and entry.num_zeros >= entry.stats.samples_per_unit:
        report.warnings.append(
            f"{name} has {len(entry.stats.always_on_units)} always-on unit(s) and {entry.num_zeros} exact zeros: a "
            "unit whose inputs are all 0 gives 1 everywhere under the rule x >= 0. To count such units as dead, "
            "use --at-zero 0 (rule x > 0)"
        )
