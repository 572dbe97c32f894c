"""Pictures of what the masks say: per-unit active fraction, one panel per array.

Use :func:`plot_unit_activity` (``--plot PATH.png``). matplotlib is an optional dependency
(``pip install 'relu-dask[plot]'``), imported only here and only when a plot is asked for.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from relu_dask.errors import InputError
from relu_dask.report import RunReport

__all__ = ["MAX_PANELS", "plot_unit_activity"]

#: Above this many arrays, one layer-by-layer summary replaces the per-array histograms.
MAX_PANELS = 12


def plot_unit_activity(report: RunReport, path: str | os.PathLike[str]) -> None:
    """Draw, per array, the histogram of its units' active fraction; save as PNG at ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'relu-dask[plot]'") from None
    arrays = [a for a in report.arrays if a.stats is not None]
    if not arrays:
        raise InputError("--plot has nothing to draw: no array has a unit axis (0-d arrays have none)")
    figure = _layer_summary(plt, arrays, report) if len(arrays) > MAX_PANELS else _histograms(plt, arrays, report)
    figure.savefig(os.fspath(path), dpi=110)
    plt.close(figure)


def _histograms(plt: Any, arrays: list[Any], report: RunReport) -> Any:
    cols = min(3, len(arrays))
    rows = math.ceil(len(arrays) / cols)
    figure, axes = plt.subplots(rows, cols, figsize=(max(7.0, 5.2 * cols), 4.2 * rows), squeeze=False)
    for ax, array in zip(axes.flat, arrays):
        stats = array.stats
        fractions = stats.unit_active_fraction
        ax.hist(fractions, bins=np.linspace(0, 1, 41), color="#4477aa", edgecolor="white")
        ax.set_xlim(0, 1)
        shape = "x".join(map(str, array.shape))
        ax.set_title(f"{array.path or 'array'} ({shape}, unit axis {stats.unit_axis})", fontsize=10)
        ax.set_xlabel("fraction of samples where the unit is active (mask = 1)")
        ax.set_ylabel("number of units")
        ax.text(
            0.98,
            0.95,
            f"{stats.num_units} units, {stats.samples_per_unit} samples each\n"
            f"overall active: {array.active_fraction:.1%}\n"
            f"dead (never active): {len(stats.dead_units)}{_named(stats, stats.dead_units)}\n"
            f"always active: {len(stats.always_on_units)}{_named(stats, stats.always_on_units)}",
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=8,
            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85},
        )
    for ax in list(axes.flat)[len(arrays) :]:
        ax.set_visible(False)
    figure.suptitle(_title(report), fontsize=10)
    figure.tight_layout()
    return figure


def _layer_summary(plt: Any, arrays: list[Any], report: RunReport) -> Any:
    names = [a.path or "array" for a in arrays]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, 0.45 * len(arrays)), 7), sharex=True)
    spread = [a.stats.unit_active_fraction for a in arrays]
    top.boxplot(spread, showfliers=False)
    top.set_ylabel("per-unit active fraction")
    top.set_title(_title(report), fontsize=10)
    positions = np.arange(1, len(arrays) + 1)
    bottom.bar(positions - 0.2, [len(a.stats.dead_units) for a in arrays], width=0.4, label="dead (never active)")
    bottom.bar(positions + 0.2, [len(a.stats.always_on_units) for a in arrays], width=0.4, label="always active")
    bottom.set_ylabel("number of units")
    bottom.legend(fontsize=8)
    bottom.set_xticks(positions, names, rotation=60, ha="right", fontsize=8)
    figure.tight_layout()
    return figure


def _title(report: RunReport) -> str:
    rule = f"mask rule {report.rule}" if report.rule else "masks as written"
    return f"ReLU unit activity, {rule}\n{report.source}"


def _named(stats: Any, units: list[int], most: int = 4) -> str:
    """The first few of ``units`` by label, where the units have labels."""
    if stats.unit_labels is None or not units:
        return ""
    shown = ", ".join(stats.unit_labels[u] for u in units[:most])
    return f" ({shown}{', ...' if len(units) > most else ''})"
