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

__all__ = ["BlockCounts"]


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

    #: The field names in row order.
    FIELDS: ClassVar[tuple[str, ...]] = ("elements", "ones", "nans", "zeros", "resumed", "elements_read")
    #: How many of them a done marker keeps: a resumed task gives back the first four.
    NUM_RECORDED: ClassVar[int] = 4

    @classmethod
    def from_row(cls, values: Sequence[int]) -> BlockCounts:
        """The counts at the head of a task's row (or of a sum of rows)."""
        return cls(*(int(v) for v in values[: len(cls.FIELDS)]))

    @classmethod
    def resumed_from(cls, recorded: Sequence[int]) -> BlockCounts:
        """A done block's counts, as its marker kept them (:meth:`recorded`)."""
        elements, ones, nans, zeros = (int(v) for v in recorded[: cls.NUM_RECORDED])
        return cls(elements, ones, nans, zeros, resumed=1)

    def as_row(self) -> list[int]:
        """The counts in :data:`FIELDS` order, as a task's row and ``job.json`` hold them."""
        return [int(v) for v in astuple(self)]

    def recorded(self) -> list[int]:
        """What a done marker keeps of them."""
        return self.as_row()[: self.NUM_RECORDED]


assert tuple(f.name for f in fields(BlockCounts)) == BlockCounts.FIELDS
