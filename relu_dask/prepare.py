"""Preparing DEST for a run's tasks: replaced, grown or resumed; its record first, then its arrays.

:func:`prepare_dest` is the first of a run's three steps (prepare DEST, run the tasks,
record the job: :func:`relu_dask.execution.execute`). Every step is ordered so that a kill
between any two leaves a DEST the same command finishes (docs/design.md, "Crash
consistency"): the journal says what is under way before anything it describes is written.
"""

from __future__ import annotations

import logging
import tempfile
from datetime import UTC, datetime
from typing import Any

from relu_dask import conventions, journal, objectstores, outputs, storage, writebehind
from relu_dask.kernel import rule_for
from relu_dask.locations import Location, in_background, parse_location
from relu_dask.planning import RunPlan
from relu_dask.resume import remove_dest_and_journal

__all__ = ["prepare_dest"]

log = logging.getLogger(__name__)


def prepare_dest(plan: RunPlan, *, run: str = "") -> dict[str, bytes]:
    """Make DEST ready for the plan's tasks, as its state says: replaced (``fresh``), grown
    (``grow``), or resumed (what a kill left half-written removed).

    Returns the metadata documents of DEST's nodes by path ("" for DEST itself) where they
    were made here (a fresh DEST on an object store, see :func:`_stage_outputs`), else {}.
    ``run``: the id of a run whose writes the store's pool makes (:mod:`relu_dask.writebehind`):
    a fresh DEST on an object store is then prepared in the background, its documents made
    first (returned), and the run's writes wait for it (:func:`~relu_dask.writebehind.before_writes`).
    """
    if plan.forget_completion and plan.record is not None:  # DEST lost masks its journal said were done
        journal.remove_done_markers(plan.dest)
        journal.write_record(plan.dest, plan.record)
    if plan.state == "fresh":
        return _start_fresh(plan, run)
    if plan.state == "grow":
        _start_growing(plan)
    else:
        if outputs.unconsolidate(plan.dest):  # DEST is about to change: no longer a finished group
            log.info("DEST %s: consolidated metadata dropped until the run completes", plan.dest)
        removed = outputs.remove_partial_writes(plan.dest)
        log.info(
            "resuming DEST %s: %d of %d tasks already done%s",
            plan.dest,
            plan.tasks_already_done,
            plan.num_tasks,
            f", {removed} half-written file(s) removed" if removed else "",
        )
        _create_outputs(plan)
    journal.reach_step("outputs-created")
    return {}


def _start_fresh(plan: RunPlan, run: str) -> dict[str, bytes]:
    """Replace DEST (if any) and its journal, record the job, create the outputs.

    The journal goes first: a kill while DEST is being deleted then leaves no record that
    says "complete" beside a half-deleted DEST (see docs/design.md, "Crash consistency").
    On an object store the outputs are made in a local folder first (:func:`_stage_outputs`);
    with ``run``, all that follows goes on while the run's tasks read.
    """
    staged = _stage_outputs(plan) if plan.dest.object_store is not None else None

    def record_and_create() -> None:
        fingerprint = plan.inputs.fingerprint  # SOURCE looked at (or failed to be) before an old DEST goes
        if plan.dest_clean:  # nothing there to remove
            journal.reach_step("journal-forgotten")
            journal.reach_step("dest-removed")
        else:
            remove_dest_and_journal(plan.dest, "--overwrite")
        block_shapes = [list(a.chunks.block_shape) for a in plan.arrays]
        journal.write_record(plan.dest, journal.JobRecord(fingerprint, block_shapes))
        journal.reach_step("job-recorded")
        _create_outputs(plan, fresh=True, staged=staged)
        journal.reach_step("outputs-created")

    if run and staged is not None:
        writebehind.before_writes(run, in_background(record_and_create))
    else:
        record_and_create()
    return {k.removesuffix("zarr.json").rstrip("/"): v for k, v in (staged or {}).items() if _is_document(k)}


def _start_growing(plan: RunPlan) -> None:
    """Make DEST's record that of the grown SOURCE, before any of its blocks is written.

    The done markers of blocks cut short by the old extent go first, then ``job.json`` says
    the new job is under way with the blocks it keeps (:class:`~relu_dask.counts.KeptCounts`),
    then the mask arrays grow (:func:`_create_outputs`). A kill between any two steps leaves
    a DEST that the same command grows, or resumes, again.
    """
    dest = plan.dest
    if outputs.unconsolidate(dest):
        log.info("DEST %s: consolidated metadata dropped until the run completes", dest)
    outputs.remove_partial_writes(dest)
    for array in plan.arrays:
        if array.drop_markers_from is not None and array.append_axis is not None:
            journal.remove_done_markers_from(dest, array.index, array.append_axis, array.drop_markers_from)
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
            [list(a.chunks.block_shape) for a in plan.arrays],
            append_axis=plan.options.append_axis,
            kept=[None if a.kept is None else a.kept.to_dict() for a in plan.arrays],
        ),
    )
    journal.reach_step("job-recorded")
    _create_outputs(plan)


def _source(plan: RunPlan, path: str) -> storage.SourceArray:
    return next(a for a in plan.inputs.arrays if a.path == path)


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
    return {outputs.PROVENANCE_PREFIX + key: value for key, value in info.items()}


def _create_outputs(plan: RunPlan, *, fresh: bool = False, staged: dict[str, bytes] | None = None) -> None:
    """Create DEST's group (for a group SOURCE) and every mask array that is not there yet.

    On a fresh start (``fresh``: DEST and its done markers were just removed) that is all of
    them, and nothing is asked first; on an object store they were made in a local folder by
    zarr (``staged``) and are uploaded at once (one round trip, where zarr asks and writes node
    by node). On resume, those a kill stopped from being made, or that went missing since: an
    array made now holds no mask yet, so any done markers of its tasks are dropped first (they
    would otherwise be trusted, and leave it empty).
    """
    if staged is not None and (direct := plan.dest.object_store) is not None:
        bucket, key = direct
        objectstores.put_many(bucket, [(f"{key}/{name}", data) for name, data in staged.items()])
        return
    _make_outputs(plan, plan.dest, fresh=fresh)


def _stage_outputs(plan: RunPlan) -> dict[str, bytes]:
    """A fresh DEST's files, made by zarr (public API) in a local folder, by name: uploaded
    by :func:`_create_outputs`; their documents open the mask arrays and consolidate DEST at
    the end (nothing read back)."""
    with tempfile.TemporaryDirectory(prefix="relu-dask-dest-") as folder:
        staged = parse_location(folder)
        _make_outputs(plan, staged, fresh=True)
        return {name: staged.child(name).read_bytes() for name in staged.files()}


def _is_document(name: str) -> bool:
    return name == "zarr.json" or name.endswith("/zarr.json")


def _make_outputs(plan: RunPlan, dest: Location, *, fresh: bool) -> None:
    """:func:`_create_outputs`, into ``dest`` (DEST, or a local folder staging a fresh one)."""
    if plan.inputs.is_group and (fresh or not outputs.is_group(dest)):
        outputs.create_dest_group(dest, {**plan.inputs.attributes, **_provenance(plan, None)})
    for path, attributes in sorted(plan.inputs.groups.items()):
        outputs.create_subgroup(dest, path, attributes)
    for array in plan.arrays:
        src, chunk_plan = array.source, array.chunks
        if not fresh and storage.has_array(dest, src.path):
            outputs.resize_mask_array(dest, src.path, src.shape)  # SOURCE grew (no-op otherwise)
            continue
        if not fresh:
            journal.done_dir(dest, array.index).remove_tree()
        outputs.create_mask_array(
            dest,
            src.path,
            shape=src.shape,
            chunk_shape=chunk_plan.dest_chunk_shape,
            shard_shape=chunk_plan.dest_shard_shape,
            dimension_names=src.dimension_names,
            attributes={
                **conventions.mask_attributes(src.array.attrs, src.path.rpartition("/")[2]),
                **_provenance(plan, src),
            },
            compressor=plan.options.dest_compressor,
        )
    for coordinate in plan.inputs.coordinates:  # small, and copied again whole after a kill
        outputs.copy_array(dest, coordinate)
