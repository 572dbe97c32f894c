"""The run report: what a run did, as typed data, as JSON, and as a short summary.

Use :class:`RunReport` when you need the facts of a run from Python (``relu_dask.run``
returns one) and :func:`render_summary` for the lines ``relu-dask run`` prints at the end.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from relu_dask.chunking import format_bytes
from relu_dask.stats import MAX_INLINE_UNITS, UnitStats, render_stats

__all__ = ["ArrayReport", "RunReport", "collect_versions", "render_summary", "write_report"]

_PACKAGES = ("relu-dask", "numpy", "numexpr", "dask", "distributed", "zarr", "numcodecs", "bokeh")

log = logging.getLogger(__name__)


@dataclass
class ArrayReport:
    """One array of the run."""

    path: str
    """Path inside SOURCE and DEST ("" when SOURCE is a single array)."""
    shape: list[int]
    """Shape of the source and of its mask."""
    dtype: str
    """The source's dtype."""
    source_chunk_shape: list[int]
    """The source's chunk shape (its read unit)."""
    dest_chunk_shape: list[int]
    """The mask's chunk shape."""
    dest_shard_shape: list[int] | None
    """The mask's shard shape, if sharded."""
    block_shape: list[int]
    """The processing block: one task each."""
    num_tasks: int
    """Number of blocks, hence of tasks."""
    read_aligned: bool
    """Whether every block is a whole number of source chunks."""
    memory_per_task_bytes: int
    """The planner's projection of one task's peak memory."""
    bytes_read: int = 0
    """Uncompressed bytes read from the source by this run (resumed tasks read nothing)."""
    bytes_written: int = 0
    """Bytes the mask takes on disk (compressed, as stored)."""
    num_elements: int = 0
    """Elements processed."""
    num_ones: int = 0
    """Elements whose mask is 1."""
    num_nans: int = 0
    """NaN elements in the source (their mask is 0)."""
    num_zeros: int = 0
    """Elements exactly 0 (or -0.0) in the source: where the rule at zero matters."""
    tasks_already_done: int = 0
    """Tasks DEST's journal marked done before this run started (a resumed run)."""
    tasks_done_now: int = 0
    """Tasks this run computed."""
    tasks_skipped: int = 0
    """Tasks this run skipped as already done."""
    grown_from: list[int] | None = None
    """An incremental run: the shape DEST held when the run started (SOURCE has grown since)."""
    blocks_kept: int = 0
    """An incremental run: blocks DEST already held whole, kept without a task."""
    rows_waiting: int = 0
    """Rows of SOURCE (along the append axis) this run left for the next one: they looked
    half-written, as by a writer appending now."""
    stats: UnitStats | None = None
    """With ``--stats``: per-unit activity, dead and always-on units."""
    read_path: str = ""
    """How the source's chunks were read: ``direct`` (its chunk files, by relu_dask) or
    ``zarr`` (zarr's public API); see :mod:`relu_dask.chunkfiles`."""
    read_path_reason: str = ""
    """Why not ``direct``, when it is not."""
    write_path: str = ""
    """How the mask's chunks were written: ``direct`` or ``zarr`` ("" when nothing ran)."""
    write_path_reason: str = ""
    """Why not ``direct``, when it is not."""

    @property
    def active_fraction(self) -> float:
        """Fraction of ones in the mask (0 for an empty array)."""
        return self.num_ones / self.num_elements if self.num_elements else 0.0

    def set_io_paths(self, source: Any, dest: Any) -> None:
        """Say, here and in the debug log, how the tasks read and write this array
        (``source`` and ``dest``: :class:`relu_dask.blocks.StoredArray`)."""
        self.read_path, self.read_path_reason = source.io_path, source.why_not_direct
        self.write_path, self.write_path_reason = dest.io_path, dest.why_not_direct
        log.debug(
            "%s: read %s%s, written %s%s",
            self.path or "the source array",
            source.io_path,
            f" ({source.why_not_direct})" if source.why_not_direct else "",
            dest.io_path,
            f" ({dest.why_not_direct})" if dest.why_not_direct else "",
        )


@dataclass
class RunReport:
    """What one ``relu-dask run`` did."""

    source: str
    """SOURCE as given."""
    dest: str
    """DEST as given."""
    rule: str
    """The mask rule: ``"x >= 0"`` or ``"x > 0"``; NaN always gives 0."""
    nan_policy: str = field(default="zero", kw_only=True)
    """``zero`` (NaN gives 0) or ``error`` (a NaN stops the run)."""
    scheduler: str
    """The scheduler used: synchronous, threads, processes, local or an address."""
    engine: str
    """The kernel engine used: numpy or numexpr."""
    num_threads: int
    """Tasks that ran at once (dask threads, processes or worker threads in all)."""
    numexpr_threads: int
    """numexpr threads per task (so that tasks x numexpr threads <= cores)."""
    chunks: str
    """The ``chunks`` option as given (auto, a byte size or a shape)."""
    arrays: list[ArrayReport] = field(default_factory=list)
    """One entry per array processed."""
    skipped: list[dict[str, str]] = field(default_factory=list)
    """Arrays of a SOURCE group not processed, each with its reason."""
    coordinates: list[str] = field(default_factory=list)
    """xarray's coordinates of a SOURCE group, copied into DEST unchanged (never masked)."""
    warnings: list[str] = field(default_factory=list)
    """What the user should know: plan notes, data that looks like ReLU outputs, ..."""
    dashboard_link: str | None = None
    """The dask dashboard's address, for distributed schedulers."""
    live_page: str | None = None
    """Where the run's live page was served (:mod:`relu_dask.livepage`), if anywhere."""
    wall_s: float = 0.0
    """Wall-clock seconds from the first task submitted to the last finished."""
    cpu_s: float = 0.0
    """CPU seconds (user + system) this process spent meanwhile: all the work on the
    synchronous and threads schedulers, only the client's share on processes or a cluster."""
    outcome: str = "done"
    """``done``, ``already complete`` (nothing to do), ``planned`` (dry run) or ``failed``."""
    versions: dict[str, str] = field(default_factory=dict)
    """Versions of Python, relu_dask and the libraries it ran on."""

    @property
    def num_tasks(self) -> int:
        return sum(a.num_tasks for a in self.arrays)

    @property
    def tasks_done_now(self) -> int:
        return sum(a.tasks_done_now for a in self.arrays)

    @property
    def tasks_skipped(self) -> int:
        return sum(a.tasks_skipped for a in self.arrays)

    @property
    def bytes_read(self) -> int:
        return sum(a.bytes_read for a in self.arrays)

    @property
    def bytes_written(self) -> int:
        return sum(a.bytes_written for a in self.arrays)

    @property
    def throughput_bytes_per_s(self) -> float:
        """Source bytes processed per wall second."""
        return self.bytes_read / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data, totals included."""
        data = asdict(self)
        for entry, array in zip(data["arrays"], self.arrays):
            entry["active_fraction"] = array.active_fraction
            if array.stats is not None:
                entry["stats"] = array.stats.to_dict(inline_units=array.stats.num_units <= MAX_INLINE_UNITS)
        data.update(
            num_tasks=self.num_tasks,
            tasks_done_now=self.tasks_done_now,
            tasks_skipped=self.tasks_skipped,
            bytes_read=self.bytes_read,
            bytes_written=self.bytes_written,
            throughput_bytes_per_s=self.throughput_bytes_per_s,
        )
        return data


def write_report(report: RunReport, path: str | os.PathLike[str]) -> None:
    """Write ``report`` as indented JSON to ``path`` (atomically: temp file + rename)."""
    target = Path(path)
    data = report.to_dict()
    for entry, array in zip(data["arrays"], report.arrays):
        if array.stats is not None and array.stats.num_units > MAX_INLINE_UNITS:
            # Per-unit vectors of very wide layers go to a side file, not into the JSON.
            side = target.with_name(f"{target.stem}.{(array.path or 'array').replace('/', '.')}.units.npz")
            np.savez_compressed(
                side,
                unit_ones=np.asarray(array.stats.unit_ones, dtype=np.int64),
                dead_units=np.asarray(array.stats.dead_units, dtype=np.int64),
                always_on_units=np.asarray(array.stats.always_on_units, dtype=np.int64),
            )
            entry["stats"]["units_file"] = side.name
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, target)


def collect_versions() -> dict[str, str]:
    """Python's version and those of the packages a run depends on."""
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def _dims(shape: list[int]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def _render_mask_stats(report: RunReport) -> list[str]:
    lines = [f"stats of the masks in {report.dest}: {len(report.arrays)} array(s), {report.wall_s:.2f} s"]
    for a in report.arrays:
        if a.stats is not None:
            lines.extend(render_stats(a.path or "(array)", a.stats, a.num_ones / max(1, a.num_elements)))
        else:
            lines.append(f"  {a.path or '(array)'}: no unit axis")
    lines.extend(f"  skipped {s['path']}: {s['reason']}" for s in report.skipped)
    lines.extend(f"  note: {w}" for w in report.warnings)
    return lines


def render_summary(report: RunReport) -> list[str]:
    """The human summary of a run, a line each."""
    if report.outcome == "stats":
        return _render_mask_stats(report)
    verb = {"planned": "would process", "already complete": "holds"}.get(report.outcome, "processed")
    lines = [
        f"{report.outcome}: {verb} {len(report.arrays)} array(s), {report.num_tasks} task(s), "
        f"rule {report.rule}, engine {report.engine}, scheduler {report.scheduler} "
        f"({report.num_threads} thread(s))"
    ]
    if report.outcome == "already complete":
        lines.append(f"  {report.dest} already holds every mask of this job: nothing to do")
    elif report.tasks_skipped:
        lines.append(
            f"  resumed: {report.tasks_skipped} task(s) were already done, {report.tasks_done_now} computed now"
        )
    for a in report.arrays:
        name = a.path or "(array)"
        line = (
            f"  {name}: {_dims(a.shape)} {a.dtype}, blocks {','.join(map(str, a.block_shape))}, {a.num_tasks} task(s)"
        )
        if report.outcome == "planned" and a.tasks_already_done:
            line += f", {a.tasks_already_done} already done (will resume)"
        if a.grown_from is not None:
            line += f" (grown from {_dims(a.grown_from)}; {a.blocks_kept} block(s) kept)"
        if report.outcome != "planned":
            stored = "stored" if report.outcome == "already complete" else "written"
            line += f", {a.active_fraction:.1%} active, {a.num_nans} NaN, {format_bytes(a.bytes_written)} {stored}"
        else:
            line += f", ~{format_bytes(a.memory_per_task_bytes)} per task"
        lines.append(line)
        for what, path, reason in (
            ("read", a.read_path, a.read_path_reason),
            ("written", a.write_path, a.write_path_reason),
        ):
            if path == "zarr":
                lines.append(f"    {what} through zarr, not directly: {reason}")
    if report.coordinates:
        lines.append(f"  coordinates copied as they are: {', '.join(report.coordinates)}")
    for s in report.skipped:
        lines.append(f"  skipped {s['path']}: {s['reason']}")
    stats = [(a.path or "(array)", a.stats, a.active_fraction) for a in report.arrays if a.stats is not None]
    if stats:
        lines.append("  unit activity (mask = 1):")
        for name, unit_stats, fraction in stats:
            lines.extend("  " + line for line in render_stats(name, unit_stats, fraction))
    if report.outcome == "already complete":
        lines.append(f"  nothing read or written: {report.dest} holds {format_bytes(report.bytes_written)}")
    elif report.outcome != "planned":
        rate = format_bytes(report.throughput_bytes_per_s)
        lines.append(
            f"  {format_bytes(report.bytes_read)} read in {report.wall_s:.2f} s ({rate}/s), "
            f"{format_bytes(report.bytes_written)} written to {report.dest}"
        )
    if report.dashboard_link:
        closed = " (closed with the run's LocalCluster; its link was logged as it started)"
        lines.append(f"  dashboard: {report.dashboard_link}{closed if report.scheduler == 'local' else ''}")
    if report.live_page:
        lines.append(f"  live page: {report.live_page} (served while the run lasted)")
    lines.extend(f"  warning: {w}" for w in report.warnings)
    return lines
