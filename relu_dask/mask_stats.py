"""``relu-dask stats DEST``: unit statistics read back from masks already written.

``relu-dask run --stats`` counts the ones of every unit while it writes the masks (the
tasks' rows, :mod:`relu_dask.task`); this module computes the same from DEST alone, with
dask reading the int8 masks (:func:`relu_dask.graph.unit_ones_of_mask`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from relu_dask import chunking, conventions, storage
from relu_dask.computing import compute
from relu_dask.errors import InputError
from relu_dask.graph import unit_ones_of_mask
from relu_dask.locations import Location, parse_location, parse_storage_options
from relu_dask.options import check_output_files, unit_choice
from relu_dask.report import ArrayReport, RunReport, collect_versions, write_report
from relu_dask.schedulers import SchedulerSpec, Session, open_session, parse_scheduler
from relu_dask.stats import UnitStats, summarize_units

__all__ = ["mask_unit_ones", "stats_of_masks", "unit_stats"]


def unit_stats(
    src: storage.SourceArray,
    axis: int,
    unit_ones: Sequence[int] | np.ndarray,
    coordinates: Sequence[storage.SourceArray],
) -> UnitStats:
    """The unit statistics of ``src`` from its per-unit ones along ``axis``, units named by
    the labels of that axis's coordinate among ``coordinates`` (if any)."""
    samples = math.prod(n for a, n in enumerate(src.shape) if a != axis)
    labels = conventions.unit_labels(src, axis, coordinates)
    return summarize_units(np.asarray(unit_ones), samples, axis, labels)


def mask_unit_ones(dest: Location, path: str, axis: int, session: Session) -> list[int]:
    """Per-unit ones of a mask array already in DEST, read back with dask on ``session``
    (the run's own: a run never starts a second scheduler)."""
    mask = storage.open_array(dest, path)
    plan = chunking.plan_chunks(mask.shape, 1, mask.chunks, mask.chunks, getattr(mask, "shards", None))
    (ones,) = compute(session, [unit_ones_of_mask(mask, plan, axis)], progress="none")
    return [int(v) for v in np.asarray(ones)]


def stats_of_masks(
    dest: str | os.PathLike[str],
    *,
    unit_axis: int | None = None,
    unit_dim: str | Sequence[str] | None = None,
    scheduler: str | SchedulerSpec = "threads",
    report_path: str | os.PathLike[str] | None = None,
    plot_path: str | os.PathLike[str] | None = None,
    storage_options: str | dict[str, Any] | None = None,
) -> RunReport:
    """``relu-dask stats DEST``: the statistics of ``--stats`` from masks already written.

    NaN and exact-zero counts need the source: they are reported only by ``run --stats``.
    The units: as for ``run`` (``unit_dim`` by name, ``unit_axis`` by number, else a
    dimension named like the units, else the last axis).
    """
    units = unit_choice(unit_axis, unit_dim)
    spec = scheduler if isinstance(scheduler, SchedulerSpec) else parse_scheduler(scheduler)
    check_output_files(report=report_path, plot=plot_path)
    contents = storage.open_source(parse_location(dest, parse_storage_options(storage_options)))
    arrays, skipped = contents.arrays, contents.skipped
    if not any(src.dtype == np.int8 for src in arrays):
        found = ", ".join(f"{s.path or '(array)'} {s.dtype}" for s in arrays[:4]) or "no array"
        raise InputError(
            f"{dest} holds no int8 masks ({found}): give the DEST of a relu-dask run (its SOURCE is not masks)"
        )
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
            axis = units.axis_of(len(src.shape), src.dimension_names, where=src.path or str(dest))
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
                entry.stats = unit_stats(src, axis, np.asarray(ones), contents.coordinates)
                entry.num_ones = sum(entry.stats.unit_ones)
            report.arrays.append(entry)
    report.wall_s, report.cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    report.warnings.append("NaN and exact-zero counts need the source: run `relu-dask run --stats` for them")
    if plot_path is not None:
        from relu_dask.plot import plot_unit_activity

        plot_unit_activity(report, plot_path)
    if report_path is not None:
        write_report(report, report_path)
    return report
