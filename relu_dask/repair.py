"""Recompute the blocks ``relu-dask verify`` found damaged, and only those.

Use :func:`repair` from :func:`relu_dask.execution.execute` when a complete DEST's record
lists blocks that ``verify`` found wrong (``job.json``'s ``damaged``): each is computed
again from SOURCE in this process and must come out as its task first wrote it (the
digest it recorded), which proves SOURCE unchanged under it.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import replace

import numpy as np

from relu_dask import blocks, journal, storage
from relu_dask.counts import BlockCounts
from relu_dask.errors import ProcessingError
from relu_dask.planning import RunPlan
from relu_dask.report import RunReport
from relu_dask.task import ArrayTasks, allow_tasks, process_block

__all__ = ["repair"]

log = logging.getLogger(__name__)


def repair(plan: RunPlan, report: RunReport) -> RunReport:
    """Recompute the blocks ``relu-dask verify`` found wrong (``job.json``'s ``damaged``), and
    only those, in this process; each must come out as its task first wrote it (its digest),
    which proves SOURCE unchanged under them. The record then forgets them, and DEST is not
    verified until ``verify`` runs again."""
    record, inputs, options = plan.record, plan.inputs, plan.options
    assert record is not None and record.damaged, "a complete DEST that verify found damaged"
    run = uuid.uuid4().hex
    allow_tasks(run)
    start = time.perf_counter()
    column = BlockCounts.FIELDS.index("digest")
    for key, names in sorted(record.damaged.items()):
        index = int(key)
        src, chunk_plan, entry = plan.arrays[index].source, plan.arrays[index].chunks, report.arrays[index]
        assert src.stored is not None, "open_source describes every array"
        mask, folder = storage.open_mask_array(inputs.dest, src.path), storage.array_location(inputs.dest, src.path)
        entry.set_io_paths(src.stored, mask)
        tasks = ArrayTasks(src.stored, mask, chunk_plan, options.at_zero, plan.engine, name=src.path, run=run)
        written = record.array(index).block_digests or []
        for name in names:
            block = tuple(int(i) for i in name.split(".")) if chunk_plan.shape else ()
            blocks.drop_stored_objects(mask, folder, chunk_plan.block_slices(block))
            row = process_block(tasks, block).reshape(-1)
            linear = int(np.ravel_multi_index(block, chunk_plan.numblocks)) if block else 0
            if linear < len(written) and written[linear] >= 0 and int(row[column]) != written[linear]:
                raise ProcessingError(
                    f"{src.path or 'SOURCE'}: block {block} recomputed from SOURCE is not the masks first written "
                    "there: SOURCE changed in a way its fingerprint did not show; rerun with --overwrite"
                )
            entry.bytes_read += int(row[BlockCounts.FIELDS.index("elements_read")]) * src.dtype.itemsize
        entry.tasks_done_now, entry.tasks_skipped = len(names), entry.num_tasks - len(names)
    journal.write_record(inputs.dest, replace(record, damaged=None, verified_utc=None))
    report.outcome, report.wall_s = "repaired", time.perf_counter() - start
    report.warnings.append(
        f"recomputed {sum(map(len, record.damaged.values()))} block(s) that relu-dask verify found damaged: "
        "run relu-dask verify DEST again to check the whole DEST"
    )
    log.info("DEST %s: %d damaged block(s) recomputed", inputs.dest, sum(map(len, record.damaged.values())))
    return report
