"""What a task counts in its block: one typed record for the task, the journal and the report.

A task (:mod:`relu_dask.task`) returns its counts as the head of a small int64 row (dask
assembles the rows of all blocks into one array); its done marker (:mod:`relu_dask.journal`)
keeps the part a resumed task gives back; the report (:mod:`relu_dask.report`) shows the
sums. :class:`BlockCounts` is the one place that says which count sits where.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple, dataclass, fields
from typing import ClassVar

import numpy as np

__all__ = ["BlockCounts", "KeptCounts", "TaskRow"]


@dataclass(frozen=True)
class BlockCounts:
    """The counts of one block, or their sums over an array."""

    elements: int = 0
    """Values in the block."""
    ones: int = 0
    """Ones in its mask."""
    nans: int = 0
    """NaNs in the source block (their mask is 0)."""
    zeros: int = 0
    """Exact zeros in the source block (their mask is the rule's value at 0)."""
    resumed: int = 0
    """Tasks that found their block already done (0 or 1 for one block)."""
    elements_read: int = 0
    """Values read from SOURCE now (0 for a resumed task)."""
    digest: int = -1
    """The CRC-32 of the block's mask values (int8, C order), what ``relu-dask verify``
    checks the stored masks against; -1 where there is none: in a sum of blocks, and for a
    block an older relu-dask marked done."""

    #: The field names in row order.
    FIELDS: ClassVar[tuple[str, ...]] = ("elements", "ones", "nans", "zeros", "resumed", "elements_read", "digest")
    #: How many of them a done marker keeps: a resumed task gives back the first four.
    NUM_RECORDED: ClassVar[int] = 4

    @classmethod
    def from_row(cls, values: Sequence[int]) -> BlockCounts:
        """The counts at the head of a task's row (or of a sum of rows)."""
        return cls(*(int(v) for v in values[: len(cls.FIELDS)]))

    @classmethod
    def resumed_from(cls, recorded: Sequence[int], digest: int = -1) -> BlockCounts:
        """A done block's counts, as its marker kept them (:meth:`recorded`, and the digest)."""
        elements, ones, nans, zeros = (int(v) for v in recorded[: cls.NUM_RECORDED])
        return cls(elements, ones, nans, zeros, resumed=1, digest=digest)

    @classmethod
    def total(cls, rows: Sequence[Sequence[int]]) -> BlockCounts:
        """The sum of the counts at the head of several tasks' rows (a sum has no digest)."""
        width = len(cls.FIELDS) - 1
        sums = [sum(int(row[k]) for row in rows) for k in range(width)]
        return cls(*sums)

    def as_row(self) -> list[int]:
        """The counts in :data:`FIELDS` order, as a task's row and ``job.json`` hold them."""
        return [int(v) for v in astuple(self)]

    def recorded(self) -> list[int]:
        """What a done marker keeps of them."""
        return self.as_row()[: self.NUM_RECORDED]

    def __add__(self, other: BlockCounts) -> BlockCounts:
        return BlockCounts(*(a + b for a, b in zip(self.as_row()[:-1], other.as_row()[:-1])))

    def __sub__(self, other: BlockCounts) -> BlockCounts:
        return BlockCounts(*(a - b for a, b in zip(self.as_row()[:-1], other.as_row()[:-1])))


class TaskRow:
    """The one place that lays out a task's row and a done marker's numbers.

    A task returns ``[*BlockCounts.as_row(), *unit_ones]``: its counts in
    :data:`BlockCounts.FIELDS` order, then with ``--stats`` the ones of each unit of its block
    along the unit axis, padded with zeros to the widest block of its array (dask stacks the
    rows). A done marker and ``job.json``'s ``edge_blocks`` keep ``[*BlockCounts.recorded(),
    *unit_ones]``.

    Examples
    --------
    >>> row = TaskRow.encode(BlockCounts(4, 3, 0, 1, digest=7), [2, 1], TaskRow.width(3))
    >>> row.tolist(), row[TaskRow.units(2)].tolist()
    ([4, 3, 0, 1, 0, 0, 7, 2, 1, 0], [2, 1])
    >>> TaskRow.decode_recorded(TaskRow.encode_recorded(BlockCounts(4, 3, 0, 1), [2, 1]))
    (BlockCounts(elements=4, ones=3, nans=0, zeros=1, resumed=0, elements_read=0, digest=-1), [2, 1])
    """

    HEAD: ClassVar[int] = len(BlockCounts.FIELDS)
    #: The counts of a row (or of rows stacked along the last axis).
    COUNTS: ClassVar[slice] = slice(0, HEAD)

    @classmethod
    def width(cls, num_units: int) -> int:
        """The length of a row with room for ``num_units`` per-unit ones."""
        return cls.HEAD + num_units

    @classmethod
    def units(cls, num_units: int) -> slice:
        """The first ``num_units`` per-unit ones of a row."""
        return slice(cls.HEAD, cls.HEAD + num_units)

    @classmethod
    def encode(cls, counts: BlockCounts, unit_ones: Sequence[int], width: int) -> np.ndarray:
        """A task's row, ``width`` long (int64)."""
        row = np.zeros(width, dtype=np.int64)
        row[cls.COUNTS] = counts.as_row()
        row[cls.units(len(unit_ones))] = unit_ones
        return row

    @staticmethod
    def encode_recorded(counts: BlockCounts, unit_ones: Sequence[int]) -> list[int]:
        """What a done marker (or an edge block) keeps: the recorded counts, the per-unit ones."""
        return [*counts.recorded(), *(int(v) for v in unit_ones)]

    @staticmethod
    def decode_recorded(values: Sequence[int]) -> tuple[BlockCounts, list[int]]:
        """:meth:`encode_recorded` read back."""
        head = BlockCounts.NUM_RECORDED
        return BlockCounts.from_row(values[:head]), [int(v) for v in values[head:]]


@dataclass(frozen=True)
class KeptCounts:
    """What DEST already holds of a grown array, before the blocks an incremental run computes.

    The blocks before ``first_block`` along ``axis`` are kept as they are; their counts are
    summed here, so that the incremental run's totals, per-unit ones and per-block ones are
    those of the whole grown array. ``job.json`` keeps it (:meth:`to_dict`) while the run is
    under way, so that a kill and the same command again still add it.
    """

    axis: int
    """The append axis."""
    first_block: int
    """The first block index along ``axis`` that is not kept (its tasks run)."""
    counts: BlockCounts
    """The summed counts of the kept blocks (``resumed`` and ``elements_read`` 0)."""
    block_ones: tuple[int, ...]
    """The ones of each kept block, in C order over the kept blocks."""
    block_digests: tuple[int, ...] | None = None
    """The digest (:attr:`BlockCounts.digest`) of each kept block, in the same order; None
    where an older relu-dask recorded none."""
    unit_axis: int | None = None
    """The axis of ``unit_ones`` (None: none kept)."""
    unit_ones: tuple[int, ...] | None = None
    """Per unit, the ones of the kept blocks (along ``axis`` too if it is the unit axis:
    then only the units of the kept blocks)."""
    edge: dict[str, list[int]] | None = None
    """An array kept whole (none of its blocks run): the last block row's counts, as
    ``job.json``'s ``edge_blocks`` had them, for the next growth."""

    def to_dict(self) -> dict[str, object]:
        return {
            "axis": self.axis,
            "first_block": self.first_block,
            "counts": self.counts.recorded(),
            "block_ones": list(self.block_ones),
            "block_digests": None if self.block_digests is None else list(self.block_digests),
            "unit_axis": self.unit_axis,
            "unit_ones": None if self.unit_ones is None else list(self.unit_ones),
            "edge": self.edge,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> KeptCounts:
        def ints(value: object) -> tuple[int, ...]:
            assert isinstance(value, list)
            return tuple(int(v) for v in value)

        unit_axis, unit_ones, edge = data.get("unit_axis"), data.get("unit_ones"), data.get("edge")
        digests = data.get("block_digests")
        return cls(
            axis=int(data["axis"]),  # type: ignore[call-overload]
            first_block=int(data["first_block"]),  # type: ignore[call-overload]
            counts=BlockCounts.from_row(ints(data["counts"])),
            block_ones=ints(data["block_ones"]),
            block_digests=None if digests is None else ints(digests),
            unit_axis=None if unit_axis is None else int(unit_axis),  # type: ignore[call-overload]
            unit_ones=None if unit_ones is None else ints(unit_ones),
            edge=edge if isinstance(edge, dict) else None,
        )


assert tuple(f.name for f in fields(BlockCounts)) == BlockCounts.FIELDS
