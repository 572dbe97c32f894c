"""``--metrics-file PATH``: a run's figures for a metrics system, in Prometheus' text format.

Scheduled batch jobs are watched by machines: Prometheus' node_exporter reads ``*.prom``
files from the folder given to its textfile collector (``--collector.textfile.directory``).
:func:`write_metrics` writes one after every run (and every follow pass) atomically, a
temporary file renamed over the last, so a scrape never sees half a file. Format:
https://prometheus.io/docs/instrumenting/exposition_formats/ (text format 0.0.4).
"""

from __future__ import annotations

import math
import os
import time
import uuid
from pathlib import Path

from relu_dask.report import RunReport

__all__ = ["render_metrics", "write_metrics"]

#: (name, type, help) of every metric, in the order written.
_METRICS = (
    ("relu_dask_last_success_timestamp_seconds", "gauge", "When the last run that did not fail ended (Unix time)."),
    ("relu_dask_run_duration_seconds", "gauge", "Wall time of the last run's tasks."),
    ("relu_dask_run_outcome", "gauge", "1 for the last run's outcome (done, already complete, repaired, ...)."),
    ("relu_dask_tasks_done", "gauge", "Tasks the last run computed."),
    ("relu_dask_tasks_skipped", "gauge", "Tasks the last run found done already."),
    ("relu_dask_read_bytes", "gauge", "Uncompressed bytes the last run read from SOURCE."),
    ("relu_dask_dest_bytes", "gauge", "Bytes DEST's masks take, as stored."),
    ("relu_dask_active_fraction", "gauge", "Fraction of ones in an array's masks."),
    ("relu_dask_dead_units", "gauge", "Units whose mask is never 1 (with --stats)."),
    ("relu_dask_always_on_units", "gauge", "Units whose mask is always 1 (with --stats)."),
    ("relu_dask_rows_behind", "gauge", "Rows SOURCE holds beyond DEST's (follow mode)."),
)


def render_metrics(report: RunReport, *, rows_behind: int | None = None, now: float | None = None) -> str:
    """The report's figures as Prometheus text-format lines, labelled with DEST (and array)."""
    dest = _label(report.dest)
    values: dict[str, list[tuple[str, float]]] = {name: [] for name, _, _ in _METRICS}
    values["relu_dask_last_success_timestamp_seconds"].append((f'dest="{dest}"', now or time.time()))
    values["relu_dask_run_duration_seconds"].append((f'dest="{dest}"', report.wall_s))
    values["relu_dask_run_outcome"].append((f'dest="{dest}",outcome="{_label(report.outcome)}"', 1))
    values["relu_dask_tasks_done"].append((f'dest="{dest}"', report.tasks_done_now))
    values["relu_dask_tasks_skipped"].append((f'dest="{dest}"', report.tasks_skipped))
    values["relu_dask_read_bytes"].append((f'dest="{dest}"', report.bytes_read))
    values["relu_dask_dest_bytes"].append((f'dest="{dest}"', report.bytes_written))
    for array in report.arrays:
        labels = f'dest="{dest}",array="{_label(array.path)}"'
        values["relu_dask_active_fraction"].append((labels, array.active_fraction))
        if array.stats is not None:
            values["relu_dask_dead_units"].append((labels, len(array.stats.dead_units)))
            values["relu_dask_always_on_units"].append((labels, len(array.stats.always_on_units)))
    if rows_behind is not None:
        values["relu_dask_rows_behind"].append((f'dest="{dest}"', rows_behind))
    lines = []
    for name, kind, text in _METRICS:
        if values[name]:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            lines += [f"{name}{{{labels}}} {_number(value)}" for labels, value in values[name]]
    return "\n".join(lines) + "\n"


def write_metrics(path: str | os.PathLike[str], report: RunReport, *, rows_behind: int | None = None) -> None:
    """Write :func:`render_metrics` to ``path`` atomically (a temporary file beside it, renamed)."""
    target = Path(path)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        partial.write_text(render_metrics(report, rows_behind=rows_behind))
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _label(value: str) -> str:
    """A label value as the text format escapes it: backslash, double quote and newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int) or (math.isfinite(value) and value == int(value) and abs(value) < 2**53):
        return str(int(value))
    return repr(float(value))
