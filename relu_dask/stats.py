"""What the masks say: per-unit activity, dead and always-on units (pure numpy).

Use :func:`summarize_units` to turn the per-unit counts of ones (gathered by the tasks of a
``--stats`` run in the same pass that writes the masks, or read back from masks by
``relu-dask stats``) into a :class:`UnitStats`, and :func:`render_stats` for the human lines.
A *unit* is one index along the unit axis (default: the last axis, the layer's units or
channels); its *samples* are all the elements that share that index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from relu_dask.errors import InputError

__all__ = [
    "MAX_INLINE_UNITS",
    "UNIT_DIMS",
    "UnitChoice",
    "UnitStats",
    "parse_unit_axis",
    "parse_unit_dims",
    "render_stats",
    "summarize_units",
]

#: Per-unit vectors longer than this go to a side file next to the JSON report.
MAX_INLINE_UNITS = 65536
_WORST = 5


def parse_unit_axis(axis: int | str, ndim: int, *, where: str = "the array") -> int:
    """The unit axis as a non-negative index for an array of ``ndim`` axes (-1: the last)."""
    try:
        value = int(axis)
    except (TypeError, ValueError):
        raise InputError(f"--unit-axis must be an integer axis such as -1, got {axis!r}") from None
    if ndim == 0:
        raise InputError(f"{where} is 0-d: it has no unit axis")
    if not -ndim <= value < ndim:
        raise InputError(f"--unit-axis {value} is out of range for {where}, which has {ndim} axes")
    return value % ndim


#: The dimension names that say "these are the units", looked for (in this order) when neither
#: ``--unit-dim`` nor ``--unit-axis`` is given: a conv layer's channels, a dense layer's units.
UNIT_DIMS: tuple[str, ...] = (
    "unit",
    "units",
    "channel",
    "channels",
    "feature",
    "features",
    "hidden",
    "neuron",
    "neurons",
)


def parse_unit_dims(value: str | Sequence[str]) -> tuple[str, ...]:
    """``--unit-dim``: one dimension name, or several (``unit,channel``) for the variables of a
    Dataset whose unit dimensions are named differently."""
    names = tuple(n.strip() for n in (value.split(",") if isinstance(value, str) else value))
    if not names or not all(isinstance(n, str) and n for n in names):
        raise InputError(f"--unit-dim must be a dimension name, or several separated by commas; got {value!r}")
    return names


@dataclass(frozen=True)
class UnitChoice:
    """How an array's unit axis is chosen: the first of :attr:`dims` it has, else :attr:`axis`."""

    axis: int = -1
    """The unit axis where an array has none of :attr:`dims` (-1: the last)."""
    dims: tuple[str, ...] = ()
    """Dimension names whose axis is the units (``--unit-dim``, or :data:`UNIT_DIMS`)."""
    required: bool = False
    """The names were asked for (``--unit-dim``): an array with none of them is refused."""

    def axis_of(self, ndim: int, dims: Sequence[str] | None, *, where: str = "the array") -> int | None:
        """The unit axis of an array of ``ndim`` axes named ``dims`` (None for a 0-d array: no units).

        Examples
        --------
        >>> UnitChoice(dims=UNIT_DIMS).axis_of(4, ("step", "channel", "h", "w"))
        1
        >>> UnitChoice(dims=UNIT_DIMS).axis_of(2, ("step", "x"))
        1
        """
        if ndim == 0:
            return None
        for name in self.dims:
            if dims is not None and name in dims:
                return list(dims).index(name)
        if self.required:
            have = f"dimensions {', '.join(dims)}" if dims else "no dimension names"
            raise InputError(f"--unit-dim {','.join(self.dims)}: {where} has {have}")
        return parse_unit_axis(self.axis, ndim, where=where)


@dataclass
class UnitStats:
    """Activity of the units of one array."""

    unit_axis: int
    """The axis whose indices are the units."""
    num_units: int
    """Units (the array's length along the unit axis)."""
    samples_per_unit: int
    """Elements per unit (the product of the other axes' lengths)."""
    unit_ones: list[int]
    """Per unit, the number of samples whose mask is 1."""
    dead_units: list[int]
    """Units whose mask is never 1."""
    always_on_units: list[int]
    """Units whose mask is always 1."""
    least_active: list[tuple[int, float]]
    """The least active units that are not dead, with their active fraction."""
    unit_labels: list[str] | None = None
    """Each unit's label, where the unit axis has a coordinate (xarray's ``unit`` = ``u0``...)."""

    def label(self, unit: int) -> str:
        """``u17 (#17)`` where units have labels, else ``17``."""
        return f"{self.unit_labels[unit]} (#{unit})" if self.unit_labels is not None else str(unit)

    @property
    def unit_active_fraction(self) -> np.ndarray:
        return np.asarray(self.unit_ones, dtype=np.float64) / max(1, self.samples_per_unit)

    def to_dict(self, *, inline_units: bool = True) -> dict[str, Any]:
        data = asdict(self)
        data["num_dead"] = len(self.dead_units)
        data["num_always_on"] = len(self.always_on_units)
        if self.unit_labels is not None:
            data["dead_unit_labels"] = [self.unit_labels[u] for u in self.dead_units]
            data["always_on_unit_labels"] = [self.unit_labels[u] for u in self.always_on_units]
            data["least_active_labels"] = [self.unit_labels[u] for u, _ in self.least_active]
        else:
            data.pop("unit_labels")
        if not inline_units:
            for key in ("unit_ones", "dead_units", "always_on_units", "unit_labels", "dead_unit_labels"):
                data.pop(key, None)
            data.pop("always_on_unit_labels", None)
        return data


def summarize_units(
    unit_ones: np.ndarray, samples_per_unit: int, unit_axis: int, labels: list[str] | None = None
) -> UnitStats:
    """Dead, always-on and least active units from the per-unit counts of ones (``labels``:
    the units' labels, where the unit axis has a coordinate).

    >>> s = summarize_units(np.array([0, 3, 4, 1]), samples_per_unit=4, unit_axis=1)
    >>> s.dead_units, s.always_on_units, s.least_active[0]
    ([0], [2], (3, 0.25))
    """
    ones = np.asarray(unit_ones, dtype=np.int64)
    dead = np.flatnonzero(ones == 0) if samples_per_unit else np.array([], dtype=np.int64)
    always = np.flatnonzero(ones == samples_per_unit) if samples_per_unit else np.array([], dtype=np.int64)
    alive = np.flatnonzero(ones > 0)
    order = alive[np.argsort(ones[alive], kind="stable")][:_WORST]
    least = [(int(u), float(ones[u]) / samples_per_unit) for u in order]
    if labels is not None and len(labels) != ones.size:
        labels = None  # a coordinate of another length labels something else
    return UnitStats(
        unit_axis, int(ones.size), int(samples_per_unit), ones.tolist(), dead.tolist(), always.tolist(), least, labels
    )


def render_stats(name: str, stats: UnitStats, active_fraction: float) -> list[str]:
    """Lines for the summary: active fraction, dead and always-on units, the least active."""

    def listed(units: list[int]) -> str:
        shown = ", ".join(stats.label(u) for u in units[:10])
        return f" [{shown}{', ...' if len(units) > 10 else ''}]" if units else ""

    lines = [
        f"  {name}: {active_fraction:.1%} active over {stats.num_units} unit(s) (axis {stats.unit_axis}, "
        f"{stats.samples_per_unit} sample(s) each); {len(stats.dead_units)} dead{listed(stats.dead_units)}, "
        f"{len(stats.always_on_units)} always on{listed(stats.always_on_units)}"
    ]
    if stats.least_active:
        worst = ", ".join(
            f"{stats.label(u)}: {f:.2%}" if stats.unit_labels else f"{u} ({f:.2%})" for u, f in stats.least_active
        )
        lines.append(f"    least active live units: {worst}")
    return lines
