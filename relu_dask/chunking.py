"""Chunk planning: pure arithmetic on shapes and bytes (no dask, no zarr, no I/O).

Use :func:`plan_chunks` to choose the processing block of a run. Its invariants, which
``tests/test_chunking.py`` checks with hypothesis:

* the blocks tile the array exactly (ragged only at the far edge of each axis);
* every block is a whole number of the output's write unit (its shard, or its chunk when
  the output is not sharded), so no two tasks ever write the same output chunk;
* where it fits the budget, every block is also a whole number of the source's storage
  chunks, so no chunk is read (and decompressed) twice;
* the projected memory of one task stays within ``memory_limit_bytes`` when given.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

from relu_dask.errors import InputError

__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "ChunkPlan",
    "ChunksSpec",
    "format_bytes",
    "parse_bytes",
    "parse_chunks",
    "parse_shape",
    "plan_chunks",
]

#: Input bytes per block for ``chunks="auto"``: large enough that per-task overhead is
#: small next to a block's codec work, small enough that a few blocks per thread stay
#: well under the 350 MB peak-memory target.
DEFAULT_BLOCK_BYTES = 64 * 2**20

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}
_BYTES_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")

ChunksSpec = str | int | tuple[int, ...]


def parse_bytes(text: str | int, *, what: str = "size") -> int:
    """Parse ``"256MiB"``, ``"1.5GB"``, ``"4096"`` or an int into a positive byte count.

    >>> parse_bytes("256MiB")
    268435456
    """
    if isinstance(text, bool):
        raise InputError(f"{what} must be a byte size such as 256MiB, got {text!r}")
    if isinstance(text, int):
        value = text
    else:
        match = _BYTES_RE.match(str(text))
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in _UNITS:
            raise InputError(f"{what} must be a byte size such as 256MiB or 2GB, got {text!r}")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise InputError(f"{what} must be larger than zero, got {text!r}")
    return value


def format_bytes(num_bytes: float) -> str:
    """Render a byte count for people: ``format_bytes(3 * 2**20) == '3.0 MiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num_bytes) < 1024 or unit == "TiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def parse_shape(text: str | Sequence[int], *, what: str, ndim: int | None = None) -> tuple[int, ...]:
    """Parse ``"8192,4096"`` (or a sequence) into a tuple of positive ints of rank ``ndim``."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        try:
            values = tuple(int(p) for p in parts)
        except ValueError:
            raise InputError(f"{what} must be comma-separated integers such as 4096,4096, got {text!r}") from None
    else:
        values = tuple(int(v) for v in text)
    if not values and ndim != 0:
        raise InputError(f"{what} is empty; give one integer per axis such as 4096,4096")
    if any(v <= 0 for v in values):
        raise InputError(f"{what} must be positive integers, got {text!r}")
    if ndim is not None and len(values) != ndim:
        raise InputError(f"{what} has {len(values)} axes but the array has {ndim}: got {text!r}")
    return values


def parse_chunks(spec: ChunksSpec) -> str | int | tuple[int, ...]:
    """Parse the ``--chunks`` value: ``"auto"``, a byte size, or a block shape.

    Returns ``"auto"``, a byte count (int) or a shape (tuple); the rank of a shape is
    checked later, against each array.
    """
    if isinstance(spec, tuple):
        return parse_shape(spec, what="chunks")
    if isinstance(spec, int) and not isinstance(spec, bool):
        return parse_bytes(spec, what="chunks")
    text = str(spec).strip()
    if text.lower() == "auto":
        return "auto"
    if "," in text or (text.isdigit() and not text.endswith(("B", "b"))):
        # A bare integer is a 1-D block shape, as in dask; sizes need a unit.
        return parse_shape(text, what="chunks")
    parts = [p.strip() for p in text.lower().replace("*", "x").split("x")]
    if len(parts) > 1 and all(p.isdigit() for p in parts):  # 8192x1024: a shape, written the other way
        raise InputError(
            f"chunks: {text!r} looks like a block shape: write it with commas, --chunks {','.join(parts)} "
            "(or a byte size such as 256MiB, or auto)"
        )
    return parse_bytes(text, what="chunks")


@dataclass(frozen=True)
class ChunkPlan:
    """How one array is cut into blocks, one dask task each."""

    shape: tuple[int, ...]
    """Shape of the array."""
    itemsize: int
    """Bytes per source element."""
    block_shape: tuple[int, ...]
    """Shape of a full (not ragged) processing block."""
    source_chunk_shape: tuple[int, ...]
    """The source's storage chunk (its read unit)."""
    dest_chunk_shape: tuple[int, ...]
    """The output's chunk shape."""
    dest_shard_shape: tuple[int, ...] | None = None
    """The output's shard shape, if sharded (then the write unit)."""
    read_aligned: bool = True
    """Whether every block is a whole number of source chunks (no chunk read twice)."""
    notes: tuple[str, ...] = field(default=())
    """What the planner could not do as asked, said to the user."""
    first_blocks: tuple[int, ...] | None = None
    """The first block index, per axis, that has a task (None: every block has one). An
    incremental run over a grown array has tasks only for the blocks that touch new rows."""

    @property
    def write_unit(self) -> tuple[int, ...]:
        """The output's unit of writing: the shard if sharded, else the chunk."""
        return self.dest_shard_shape or self.dest_chunk_shape

    @property
    def chunks(self) -> tuple[tuple[int, ...], ...]:
        """dask-style chunks (a tuple of block lengths per axis)."""
        return tuple(_axis_chunks(n, b) for n, b in zip(self.shape, self.block_shape))

    @property
    def numblocks(self) -> tuple[int, ...]:
        """Number of blocks along each axis."""
        return tuple(len(c) for c in self.chunks)

    @property
    def task_numblocks(self) -> tuple[int, ...]:
        """Number of blocks with a task along each axis (those from :attr:`first_blocks` on)."""
        first = self.first_blocks or (0,) * len(self.shape)
        return tuple(max(0, n - f) for n, f in zip(self.numblocks, first))

    @property
    def task_chunks(self) -> tuple[tuple[int, ...], ...]:
        """:attr:`chunks` of the blocks with a task."""
        first = self.first_blocks or (0,) * len(self.shape)
        return tuple(c[f:] for c, f in zip(self.chunks, first))

    @property
    def num_tasks(self) -> int:
        """Number of blocks with a task (0 for an empty array)."""
        if math.prod(self.shape) == 0:
            return 0
        return math.prod(self.task_numblocks)

    def starting_at(self, axis: int, first_block: int) -> ChunkPlan:
        """This plan with tasks only for the blocks from ``first_block`` on along ``axis``."""
        first = [0] * len(self.shape)
        first[axis] = first_block
        return replace(self, first_blocks=tuple(first) if first_block else None)

    @property
    def block_bytes(self) -> int:
        """Source bytes in one full block."""
        return math.prod(self._clipped_block) * self.itemsize

    @property
    def memory_per_task_bytes(self) -> int:
        """Projected peak memory of one task: the block, its mask, codec buffers.

        Reading decodes up to two source chunks beside the block; writing encodes up to
        two output chunks beside the mask (zarr's chunk buffers and the compressor's).
        """
        mask = math.prod(self._clipped_block)
        src_chunk = math.prod(_clip(self.source_chunk_shape, self.shape)) * self.itemsize
        dst_chunk = math.prod(_clip(self.dest_chunk_shape, self.shape))
        return self.block_bytes + mask + 2 * min(src_chunk, self.block_bytes) + 2 * min(dst_chunk, mask)

    @property
    def _clipped_block(self) -> tuple[int, ...]:
        return _clip(self.block_shape, self.shape)

    def block_slices(self, block_index: Sequence[int]) -> tuple[slice, ...]:
        """The region of the array that block ``block_index`` covers."""
        out = []
        for n, b, i in zip(self.shape, self.block_shape, block_index):
            start = i * b
            if not 0 <= start < max(n, 1):
                raise IndexError(f"block {tuple(block_index)} is outside {self.numblocks}")
            out.append(slice(start, min(start + b, n)))
        return tuple(out)

    def iter_block_indices(self) -> Iterator[tuple[int, ...]]:
        """The index of every block with a task, in C order (none for an empty array)."""
        if self.num_tasks:
            first = self.first_blocks or (0,) * len(self.shape)
            for index in _ndindex(self.task_numblocks):
                yield tuple(i + f for i, f in zip(index, first))


def plan_chunks(
    shape: Sequence[int],
    itemsize: int,
    source_chunk_shape: Sequence[int],
    dest_chunk_shape: Sequence[int] | None = None,
    dest_shard_shape: Sequence[int] | None = None,
    chunks: ChunksSpec = "auto",
    memory_limit_bytes: int | None = None,
) -> ChunkPlan:
    """Choose the processing block for one array.

    Parameters
    ----------
    shape, itemsize
        The array's shape and bytes per element.
    source_chunk_shape
        The source's storage chunk shape (its read unit).
    dest_chunk_shape, dest_shard_shape
        The output's chunk shape (default: the source's) and shard shape, if sharded.
    chunks
        ``"auto"`` (blocks of about :data:`DEFAULT_BLOCK_BYTES`), a byte target, or an
        explicit block shape, which must be a multiple of the write unit on every axis
        it does not cover whole.
    memory_limit_bytes
        Refuse a plan whose projected memory per task exceeds this.

    Examples
    --------
    >>> plan = plan_chunks((65536, 4096), 4, (4096, 4096))
    >>> plan.block_shape, plan.num_tasks
    ((4096, 4096), 16)
    """
    shape = tuple(int(n) for n in shape)
    ndim = len(shape)
    if any(n < 0 for n in shape):
        raise InputError(f"array shape must not be negative, got {shape}")
    src = _rank(source_chunk_shape, ndim, "the source's chunk shape")
    dst = _rank(dest_chunk_shape if dest_chunk_shape is not None else src, ndim, "dest chunks")
    shard = _rank(dest_shard_shape, ndim, "dest shards") if dest_shard_shape is not None else None
    if shard is not None and any(s % c for s, c in zip(shard, dst)):
        raise InputError(f"dest shards {_fmt(shard)} must be a whole multiple of dest chunks {_fmt(dst)} on every axis")
    write = shard or dst
    spec = parse_chunks(chunks)
    notes: list[str] = []
    if isinstance(spec, tuple):
        block = _explicit_block(spec, shape, write)
    else:
        target = DEFAULT_BLOCK_BYTES if spec == "auto" else int(spec)
        unit = _aligned_unit(shape, itemsize, src, write, target, notes)
        block = _grow(unit, shape, itemsize, target)
        if math.prod(_clip(block, shape)) * itemsize > target and spec != "auto":
            notes.append(
                f"a block is {_fmt(_clip(block, shape))} ({format_bytes(math.prod(_clip(block, shape)) * itemsize)}), "
                f"more than the {format_bytes(target)} asked: "
                f"it cannot be smaller than the output's write unit {_fmt(write)}"
            )
    read_aligned = all(b >= n or b % c == 0 for b, c, n in zip(block, src, shape))
    if isinstance(spec, tuple) and not read_aligned:
        notes.append(
            f"blocks {_fmt(block)} are not whole multiples of the source's chunks {_fmt(src)}: "
            "some source chunks will be read more than once"
        )
    plan = ChunkPlan(shape, int(itemsize), block, src, dst, shard, read_aligned, tuple(notes))
    if memory_limit_bytes is not None and plan.num_tasks and plan.memory_per_task_bytes > memory_limit_bytes:
        raise InputError(
            f"one task would need about {format_bytes(plan.memory_per_task_bytes)} "
            f"(block {_fmt(plan._clipped_block)}) but the memory limit per task is "
            f"{format_bytes(memory_limit_bytes)}: use smaller --chunks (or --dest-chunks/--dest-shards)"
        )
    return plan


def _rank(values: Sequence[int], ndim: int, what: str) -> tuple[int, ...]:
    return parse_shape(tuple(values), what=what, ndim=ndim)


def _explicit_block(block: tuple[int, ...], shape: tuple[int, ...], write: tuple[int, ...]) -> tuple[int, ...]:
    if len(block) != len(shape):
        raise InputError(f"chunks {_fmt(block)} has {len(block)} axes but the array has {len(shape)}")
    for axis, (b, w, n) in enumerate(zip(block, write, shape)):
        if b < n and b % w:
            raise InputError(
                f"chunks {_fmt(block)}: {b} on axis {axis} is not a multiple of the output's "
                f"write unit {w} (from {_fmt(write)}); use a multiple of it so no two tasks write one chunk"
            )
    return tuple(min(b, max(n, 1)) for b, n in zip(block, shape))


def _aligned_unit(
    shape: tuple[int, ...], itemsize: int, src: tuple[int, ...], write: tuple[int, ...], target: int, notes: list[str]
) -> tuple[int, ...]:
    """The smallest block aligned to the write unit and, if affordable, to the source chunks."""
    both = tuple(math.lcm(s, w) for s, w in zip(src, write))
    if both == write:
        return write
    budget = max(target, math.prod(_clip(write, shape)) * itemsize)
    if math.prod(_clip(both, shape)) * itemsize <= budget:
        return both
    notes.append(
        f"the source's chunks {_fmt(src)} and the output's write unit {_fmt(write)} do not nest; "
        f"aligning to both would need blocks of {_fmt(_clip(both, shape))}, so some source chunks "
        "will be read more than once (set --dest-chunks to a multiple of the source's chunks to avoid it)"
    )
    return write


def _grow(unit: tuple[int, ...], shape: tuple[int, ...], itemsize: int, target: int) -> tuple[int, ...]:
    """Multiply ``unit`` along axes, last first, while the block stays within ``target`` bytes."""
    block = list(_clip(unit, shape))
    for axis in reversed(range(len(shape))):
        if block[axis] >= shape[axis]:
            continue
        others = math.prod(block[:axis] + block[axis + 1 :]) * itemsize
        max_factor = -(-shape[axis] // unit[axis])
        factor = max(1, min(max_factor, target // max(1, others * unit[axis])))
        block[axis] = min(unit[axis] * factor, shape[axis])
        if factor < max_factor:
            break
    return tuple(max(b, 1) for b in block)


def _clip(block: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(min(b, n) for b, n in zip(block, shape))


def _axis_chunks(n: int, b: int) -> tuple[int, ...]:
    if n == 0:
        return (0,)
    full, rest = divmod(n, b)
    return (b,) * full + ((rest,) if rest else ())


def _ndindex(numblocks: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    if not numblocks:
        yield ()
        return
    for i in range(numblocks[0]):
        for rest in _ndindex(numblocks[1:]):
            yield (i, *rest)


def _fmt(shape: Sequence[int]) -> str:
    return ",".join(str(v) for v in shape) or "()"
