"""Tests of :mod:`relu_dask.chunking`: parsing sizes and shapes, and the chunk planner.

The planner is pure arithmetic, so besides a table of named cases it is checked with
hypothesis against the invariants its module docstring promises: the blocks tile the array
exactly once, the chunks are regular, every block boundary falls on the output's write unit
(and on the source's chunks when the plan says so), blocks stay within the byte target, and
the memory per task stays within the limit or the plan is refused.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relu_dask.chunking import (
    DEFAULT_BLOCK_BYTES,
    ChunkPlan,
    format_bytes,
    parse_bytes,
    parse_chunks,
    parse_shape,
    plan_chunks,
)
from relu_dask.errors import InputError

# --------------------------------------------------------------------------------------
# parse_bytes, parse_shape, parse_chunks, format_bytes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("256MiB", 256 * 2**20),
        ("1.5GB", 1_500_000_000),
        ("4096", 4096),
        (4096, 4096),
        ("64 KiB", 64 * 2**10),
        (" 2gib ", 2 * 2**30),
        ("1k", 1024),
        ("3M", 3 * 2**20),
        ("10B", 10),
        ("1TB", 10**12),
        (".5KiB", 512),
        ("2.", 2),
        (1, 1),
    ],
    ids=repr,
)
def test_parse_bytes(text: Any, expected: int) -> None:
    assert parse_bytes(text) == expected
    assert type(parse_bytes(text)) is int


@pytest.mark.parametrize(
    "text",
    ["0", "-1", "abc", "12XB", True, False, 0, -5, "", "1.5.2MB", "MiB", "0.1B", "1e6", "256 MiB B"],
    ids=repr,
)
def test_parse_bytes_refuses(text: Any) -> None:
    with pytest.raises(InputError) as info:
        parse_bytes(text, what="--memory-limit")
    message = str(info.value)
    assert message.startswith("--memory-limit must be ")
    assert repr(text) in message


@pytest.mark.parametrize(
    ("text", "ndim", "expected"),
    [
        ("8192,4096", None, (8192, 4096)),
        ("8192,4096", 2, (8192, 4096)),
        (" 1 , 2 ,3", 3, (1, 2, 3)),
        ("100", 1, (100,)),
        ("64,64,", None, (64, 64)),
        ([3, 4], 2, (3, 4)),
        ((5,), None, (5,)),
        ((), 0, ()),
        (np.array([7, 8]), 2, (7, 8)),
    ],
    ids=repr,
)
def test_parse_shape(text: Any, ndim: int | None, expected: tuple[int, ...]) -> None:
    result = parse_shape(text, what="--dest-chunks", ndim=ndim)
    assert result == expected
    assert all(type(v) is int for v in result)


@pytest.mark.parametrize(
    ("text", "ndim", "match"),
    [
        ("a,b", None, "comma-separated integers"),
        ("1.5,2", None, "comma-separated integers"),
        ("0,4", None, "positive"),
        ("-1,4", None, "positive"),
        ((4, 0), None, "positive"),
        ("", None, "empty"),
        ((), None, "empty"),
        (",", 1, "empty"),
        ("1,2", 3, "2 axes but the array has 3"),
        ((1, 2, 3), 1, "3 axes but the array has 1"),
    ],
    ids=repr,
)
def test_parse_shape_refuses(text: Any, ndim: int | None, match: str) -> None:
    with pytest.raises(InputError, match=match) as info:
        parse_shape(text, what="--dest-chunks", ndim=ndim)
    assert str(info.value).startswith("--dest-chunks ")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("auto", "auto"),
        (" AUTO ", "auto"),
        ("256MiB", 256 * 2**20),
        ("100B", 100),
        ("1.5GB", 1_500_000_000),
        (4096, 4096),
        ("8192,4096", (8192, 4096)),
        ("100", (100,)),  # a bare integer is a 1-D block shape, as in dask
        ("64,", (64,)),
        ((64, 32), (64, 32)),
    ],
    ids=repr,
)
def test_parse_chunks(spec: Any, expected: Any) -> None:
    assert parse_chunks(spec) == expected


@pytest.mark.parametrize("spec", ["0", "0,4", "abc", "-1", 0, -1, True, (0, 4), "12XB", ""], ids=repr)
def test_parse_chunks_refuses(spec: Any) -> None:
    with pytest.raises(InputError, match="chunks"):
        parse_chunks(spec)


@pytest.mark.parametrize(
    ("num_bytes", "expected"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (3 * 2**20, "3.0 MiB"),
        (64 * 2**20, "64.0 MiB"),
        (int(1.5 * 2**30), "1.5 GiB"),
        (2**40, "1.0 TiB"),
        (2**50, "1024.0 TiB"),
        (-2048, "-2.0 KiB"),
    ],
    ids=repr,
)
def test_format_bytes(num_bytes: int, expected: str) -> None:
    assert format_bytes(num_bytes) == expected


# --------------------------------------------------------------------------------------
# Invariants, shared by the table and by hypothesis
# --------------------------------------------------------------------------------------


def _boundaries(chunks: tuple[int, ...]) -> list[int]:
    """Where blocks start along one axis (not counting 0), plus the end."""
    return [int(b) for b in np.cumsum(chunks)]


def check_invariants(plan: ChunkPlan) -> None:
    shape = plan.shape
    # (b) regular chunks that sum to the shape
    assert len(plan.chunks) == len(shape) == len(plan.block_shape)
    for n, b, c in zip(shape, plan.block_shape, plan.chunks):
        assert b >= 1
        assert sum(c) == n
        if n == 0:
            assert c == (0,)
        else:
            assert all(x == min(b, n) for x in c[:-1]), c
            assert 0 < c[-1] <= min(b, n)
    assert plan.numblocks == tuple(len(c) for c in plan.chunks)
    # (c) boundaries on the write unit, (d) on the source chunks when read_aligned
    for n, c, w, s in zip(shape, plan.chunks, plan.write_unit, plan.source_chunk_shape):
        for edge in _boundaries(c):
            assert edge % w == 0 or edge == n, (edge, w, n)
            if plan.read_aligned:
                assert edge % s == 0 or edge == n, (edge, s, n)
    misaligned = any(
        edge % s and edge != n
        for n, c, s in zip(shape, plan.chunks, plan.source_chunk_shape)
        for edge in _boundaries(c)
    )
    assert plan.read_aligned == (not misaligned)
    # (e) one task per block; (a) the blocks tile the array exactly once
    indices = list(plan.iter_block_indices())
    assert len(indices) == plan.num_tasks
    assert len(set(indices)) == len(indices)
    if math.prod(shape) == 0:
        assert plan.num_tasks == 0
    else:
        assert plan.num_tasks == math.prod(plan.numblocks)
    largest = 0
    axis_slices: list[dict[int, slice]] = [{} for _ in shape]
    for index in indices:
        slices = plan.block_slices(index)
        assert tuple(s.stop - s.start for s in slices) == tuple(c[i] for c, i in zip(plan.chunks, index))
        largest = max(largest, math.prod(s.stop - s.start for s in slices))
        for seen, i, region in zip(axis_slices, index, slices):
            assert seen.setdefault(i, region) == region, "a block index must cover the same range on every axis"
    if math.prod(shape) <= 2**16:
        coverage = np.zeros(shape, dtype=np.int32)
        for index in indices:
            coverage[plan.block_slices(index)] += 1
        assert (coverage == 1).all()
    elif indices:
        # too big to mark element by element: blocks are a product of per-axis ranges, so
        # tiling each axis exactly once and visiting every index combination is the same
        assert set(indices) == set(np.ndindex(*plan.numblocks))
        for n, seen in zip(shape, axis_slices):
            ranges = [seen[i] for i in sorted(seen)]
            assert ranges[0].start == 0 and ranges[-1].stop == n
            assert all(a.stop == b.start for a, b in itertools.pairwise(ranges))
    assert plan.block_bytes == largest * plan.itemsize
    # the memory model counts at least the block and its mask
    assert plan.memory_per_task_bytes >= plan.block_bytes + plan.block_bytes // plan.itemsize


def _clipped_bytes(unit: tuple[int, ...], shape: tuple[int, ...], itemsize: int) -> int:
    return math.prod(min(u, n) for u, n in zip(unit, shape)) * itemsize


# --------------------------------------------------------------------------------------
# plan_chunks: named cases
# --------------------------------------------------------------------------------------


@dataclass
class Case:
    shape: tuple[int, ...]
    itemsize: int
    source: tuple[int, ...]
    dest: tuple[int, ...] | None = None
    shards: tuple[int, ...] | None = None
    chunks: Any = "auto"
    memory_limit_bytes: int | None = None
    # expectations
    block_shape: tuple[int, ...] | None = None
    dask_chunks: tuple[tuple[int, ...], ...] | None = None
    num_tasks: int | None = None
    read_aligned: bool = True
    note: str | None = None  # a substring of one of plan.notes; None: no notes

    def plan(self) -> ChunkPlan:
        return plan_chunks(
            self.shape,
            self.itemsize,
            self.source,
            dest_chunk_shape=self.dest,
            dest_shard_shape=self.shards,
            chunks=self.chunks,
            memory_limit_bytes=self.memory_limit_bytes,
        )


PLAN_CASES = {
    "default-65536x4096-float32": Case(
        (65536, 4096), 4, (4096, 4096), block_shape=(4096, 4096), num_tasks=16,
        dask_chunks=((4096,) * 16, (4096,)),
    ),
    "default-fits-350MB-limit": Case(
        (65536, 4096), 4, (4096, 4096), memory_limit_bytes=350 * 10**6, block_shape=(4096, 4096), num_tasks=16,
    ),
    "auto-whole-small-array": Case((10, 7), 8, (4, 3), block_shape=(10, 7), num_tasks=1, dask_chunks=((10,), (7,))),
    "ragged-explicit": Case(
        (10, 7), 8, (4, 3), chunks=(4, 3), block_shape=(4, 3), num_tasks=9, dask_chunks=((4, 4, 2), (3, 3, 1)),
    ),
    "ragged-byte-target-grows-last-axis": Case(
        (10, 7), 1, (4, 3), chunks="24B", block_shape=(4, 6), num_tasks=6, dask_chunks=((4, 4, 2), (6, 1)),
    ),
    "ragged-1d-string-shape": Case((10,), 4, (3,), chunks="6", block_shape=(6,), dask_chunks=((6, 4),)),
    "source-chunks-larger-than-array": Case(
        (10, 10), 4, (100, 100), block_shape=(10, 10), num_tasks=1, dask_chunks=((10,), (10,)),
    ),
    "explicit-chunks-larger-than-array": Case(
        (10, 10), 4, (4, 4), chunks=(1000, 1000), block_shape=(10, 10), num_tasks=1,
    ),
    "explicit-whole-axis-not-a-multiple": Case(
        (95, 20), 4, (10, 10), chunks=(95, 10), block_shape=(95, 10), num_tasks=2,
    ),
    "explicit-not-read-aligned": Case(
        (100,), 4, (10,), dest=(5,), chunks=(15,), block_shape=(15,), num_tasks=7, read_aligned=False,
        note="not whole multiples of the source's chunks",
    ),
    "empty-1d": Case((0,), 4, (5,), num_tasks=0, dask_chunks=((0,),)),
    "empty-2d": Case((3, 0), 8, (2, 2), num_tasks=0, dask_chunks=((3,), (0,))),
    "empty-explicit": Case((0, 5), 4, (2, 2), chunks=(4, 2), num_tasks=0),
    "empty-ignores-memory-limit": Case((0, 5), 4, (2, 2), memory_limit_bytes=1, num_tasks=0),
    "0-d": Case((), 8, (), block_shape=(), num_tasks=1, dask_chunks=()),
    "0-d-byte-target": Case((), 4, (), chunks="1B", block_shape=(), num_tasks=1, note="more than the 1 B asked"),
    "size-one-axes": Case((1, 1, 1), 2, (1, 1, 1), block_shape=(1, 1, 1), num_tasks=1),
    "dest-not-nesting-falls-back-to-write-unit": Case(
        (10000,), 4, (100,), dest=(64,), chunks="1KiB", block_shape=(256,), read_aligned=False, note="do not nest",
    ),
    "dest-not-nesting-but-affordable": Case(
        (10**6,), 4, (100,), dest=(64,), chunks="64KiB", block_shape=(16000,), num_tasks=63,
    ),
    "dest-coarser-than-source": Case((1000, 1000), 1, (10, 10), dest=(50, 50), chunks="5000B", block_shape=(50, 100)),
    "shards": Case(
        (1000, 1000), 1, (10, 10), dest=(10, 10), shards=(100, 100), chunks="20KB", block_shape=(100, 200),
        num_tasks=50,
    ),
    "shards-explicit-multiple": Case(
        (1000, 1000), 1, (10, 10), dest=(10, 10), shards=(100, 100), chunks=(200, 1000), block_shape=(200, 1000),
        num_tasks=5,
    ),
    "byte-target-smaller-than-write-unit": Case(
        (100, 100), 4, (10, 10), dest=(20, 20), chunks="16B", block_shape=(20, 20), num_tasks=25,
        note="cannot be smaller than the output's write unit",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", PLAN_CASES.values(), ids=PLAN_CASES.keys())
def test_plan_cases(case: Case) -> None:
    plan = case.plan()
    check_invariants(plan)
    if case.block_shape is not None:
        assert plan.block_shape == case.block_shape
    if case.dask_chunks is not None:
        assert plan.chunks == case.dask_chunks
    if case.num_tasks is not None:
        assert plan.num_tasks == case.num_tasks
    assert plan.read_aligned is case.read_aligned
    if case.note is None:
        assert plan.notes == ()
    else:
        assert any(case.note in note for note in plan.notes), plan.notes
    assert plan.source_chunk_shape == case.source
    assert plan.dest_chunk_shape == (case.dest or case.source)
    assert plan.write_unit == (case.shards or case.dest or case.source)
    if case.memory_limit_bytes is not None and plan.num_tasks:
        assert plan.memory_per_task_bytes <= case.memory_limit_bytes


def test_default_plan_memory_is_within_the_peak_target() -> None:
    plan = plan_chunks((65536, 4096), 4, (4096, 4096))
    assert plan.block_bytes == DEFAULT_BLOCK_BYTES == 64 * 2**20
    assert plan.memory_per_task_bytes < 350 * 10**6


def test_zero_d_plan_slices() -> None:
    plan = plan_chunks((), 4, ())
    assert list(plan.iter_block_indices()) == [()]
    assert plan.block_slices(()) == ()
    assert plan.block_bytes == 4


def test_block_slices_outside_the_plan() -> None:
    plan = plan_chunks((10, 7), 1, (4, 3), chunks=(4, 3))
    assert plan.block_slices((2, 2)) == (slice(8, 10), slice(6, 7))
    for index in [(3, 0), (0, 3), (-1, 0)]:
        with pytest.raises(IndexError):
            plan.block_slices(index)


def test_plan_is_frozen() -> None:
    plan = plan_chunks((10,), 4, (5,))
    with pytest.raises(AttributeError):
        plan.block_shape = (1,)  # type: ignore[misc]


ERROR_CASES = {
    "explicit-not-multiple-of-chunk": (
        dict(shape=(100, 100), itemsize=4, source_chunk_shape=(10, 10), chunks=(15, 10)),
        r"15 on axis 0 is not a multiple of the output's write unit 10",
    ),
    "explicit-not-multiple-of-dest-chunk": (
        dict(shape=(100, 100), itemsize=4, source_chunk_shape=(10, 10), dest_chunk_shape=(20, 20), chunks=(20, 30)),
        r"30 on axis 1 is not a multiple of the output's write unit 20",
    ),
    "explicit-not-multiple-of-shard": (
        dict(
            shape=(1000, 1000), itemsize=1, source_chunk_shape=(10, 10), dest_chunk_shape=(10, 10),
            dest_shard_shape=(100, 100), chunks=(150, 100),
        ),
        r"150 on axis 0 is not a multiple of the output's write unit 100",
    ),
    "explicit-wrong-rank": (
        dict(shape=(100, 100), itemsize=4, source_chunk_shape=(10, 10), chunks=(10,)),
        "chunks 10 has 1 axes but the array has 2",
    ),
    "explicit-wrong-rank-string": (
        dict(shape=(100, 100), itemsize=4, source_chunk_shape=(10, 10), chunks="10,10,10"),
        "has 3 axes but the array has 2",
    ),
    "source-wrong-rank": (dict(shape=(100, 100), itemsize=4, source_chunk_shape=(10,)), "source's chunk shape"),
    "dest-wrong-rank": (
        dict(shape=(100, 100), itemsize=4, source_chunk_shape=(10, 10), dest_chunk_shape=(10, 10, 10)),
        "dest chunks has 3 axes",
    ),
    "shards-wrong-rank": (
        dict(shape=(100, 100), itemsize=4, source_chunk_shape=(10, 10), dest_shard_shape=(100,)),
        "dest shards has 1 axes",
    ),
    "explicit-zero": (dict(shape=(100, 100), itemsize=4, source_chunk_shape=(10, 10), chunks=(0, 10)), "positive"),
    "explicit-negative": (dict(shape=(100, 100), itemsize=4, source_chunk_shape=(10, 10), chunks="-10,10"), "positive"),
    "byte-target-zero": (dict(shape=(100,), itemsize=4, source_chunk_shape=(10,), chunks="0B"), "larger than zero"),
    "byte-target-negative": (dict(shape=(100,), itemsize=4, source_chunk_shape=(10,), chunks=-1), "larger than zero"),
    "source-zero": (dict(shape=(100, 100), itemsize=4, source_chunk_shape=(0, 10)), "positive"),
    "dest-negative": (
        dict(shape=(100, 100), itemsize=4, source_chunk_shape=(10, 10), dest_chunk_shape=(10, -1)),
        "positive",
    ),
    "shape-negative": (dict(shape=(-1, 5), itemsize=4, source_chunk_shape=(10, 10)), "must not be negative"),
    "memory-limit-smaller-than-one-task": (
        dict(shape=(65536, 4096), itemsize=4, source_chunk_shape=(4096, 4096), memory_limit_bytes=2**20),
        r"memory limit per task is 1\.0 MiB: use smaller --chunks",
    ),
    "memory-limit-explicit-block": (
        dict(shape=(1000,), itemsize=8, source_chunk_shape=(10,), chunks=(1000,), memory_limit_bytes=8000),
        "--chunks",
    ),
    "shards-not-multiple-of-chunks": (
        dict(shape=(100, 100), itemsize=4, source_chunk_shape=(10, 10), dest_chunk_shape=(10, 10),
             dest_shard_shape=(15, 10)),
        "dest shards 15,10 must be a whole multiple of dest chunks 10,10",
    ),
    "unparseable-chunks": (dict(shape=(100,), itemsize=4, source_chunk_shape=(10,), chunks="lots"), "byte size"),
}  # fmt: skip


@pytest.mark.parametrize(("kwargs", "match"), ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_plan_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InputError, match=match):
        plan_chunks(**kwargs)


# --------------------------------------------------------------------------------------
# plan_chunks: hypothesis
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    shape: tuple[int, ...]
    itemsize: int
    source: tuple[int, ...]
    dest: tuple[int, ...] | None
    shards: tuple[int, ...] | None
    chunks: Any

    @property
    def write(self) -> tuple[int, ...]:
        return self.shards or self.dest or self.source

    def plan(self, memory_limit_bytes: int | None = None) -> ChunkPlan:
        return plan_chunks(
            self.shape,
            self.itemsize,
            self.source,
            dest_chunk_shape=self.dest,
            dest_shard_shape=self.shards,
            chunks=self.chunks,
            memory_limit_bytes=memory_limit_bytes,
        )


def _axes(ndim: int, low: int, high: int) -> st.SearchStrategy[tuple[int, ...]]:
    return st.tuples(*[st.integers(low, high)] * ndim)


@st.composite
def problems(
    draw: st.DrawFn, kinds: tuple[str, ...] = ("auto", "bytes", "bytes-text", "shape"), explicit_any: bool = False
) -> Problem:
    ndim = draw(st.integers(1, 4))
    shape = draw(_axes(ndim, 0, 12 if ndim <= 2 else 6))
    itemsize = draw(st.sampled_from([1, 2, 4, 8]))
    source = draw(_axes(ndim, 1, 8))
    dest = draw(st.none() | _axes(ndim, 1, 8))
    dest_or_source = dest or source
    shards = None
    if draw(st.booleans()):
        factors = draw(_axes(ndim, 1, 3))
        shards = tuple(c * f for c, f in zip(dest_or_source, factors))
    write = shards or dest_or_source
    kind = draw(st.sampled_from(kinds))
    chunks: Any
    if kind == "auto":
        chunks = "auto"
    elif kind == "bytes":
        chunks = draw(st.integers(1, 4096))
    elif kind == "bytes-text":
        chunks = f"{draw(st.integers(1, 4096))}B"
    elif explicit_any:
        chunks = draw(_axes(ndim, 1, 30))
    else:
        # a multiple of the write unit on each axis, or at least the whole axis
        chunks = tuple(draw(st.sampled_from([w, 2 * w, 3 * w, max(n, 1), n + 5])) for w, n in zip(write, shape))
    return Problem(shape, itemsize, source, dest, shards, chunks)


@given(problem=problems())
def test_plan_invariants(problem: Problem) -> None:
    plan = problem.plan()
    check_invariants(plan)
    assert plan.write_unit == problem.write
    shape, itemsize = problem.shape, problem.itemsize
    if isinstance(problem.chunks, tuple):
        assert plan.block_shape == tuple(min(b, max(n, 1)) for b, n in zip(problem.chunks, shape))
        return
    # (f) a block is at most the byte target, or one write unit where that is larger
    target = DEFAULT_BLOCK_BYTES if problem.chunks == "auto" else parse_bytes(problem.chunks)
    budget = max(target, _clipped_bytes(problem.write, shape, itemsize))
    assert plan.block_bytes <= budget
    # where aligning to both source and write unit fits the budget, the plan reads each chunk once
    both = tuple(math.lcm(s, w) for s, w in zip(problem.source, problem.write))
    if _clipped_bytes(both, shape, itemsize) <= budget:
        assert plan.read_aligned
    else:
        assert not plan.read_aligned
        assert any("do not nest" in note for note in plan.notes)


@given(problem=problems(), memory_limit_bytes=st.integers(1, 20_000))
def test_plan_memory_limit(problem: Problem, memory_limit_bytes: int) -> None:
    unlimited = problem.plan()
    try:
        plan = problem.plan(memory_limit_bytes)
    except InputError as exc:
        # (g) refused only where one task would need more than the limit
        assert unlimited.num_tasks > 0
        assert unlimited.memory_per_task_bytes > memory_limit_bytes
        assert "--chunks" in str(exc)
    else:
        assert plan == unlimited
        assert plan.num_tasks == 0 or plan.memory_per_task_bytes <= memory_limit_bytes


@given(problem=problems(kinds=("shape",), explicit_any=True))
def test_explicit_chunks_refused_iff_not_on_write_unit(problem: Problem) -> None:
    misaligned = any(b < n and b % w for b, n, w in zip(problem.chunks, problem.shape, problem.write))
    if misaligned:
        with pytest.raises(InputError, match="write unit"):
            problem.plan()
    else:
        check_invariants(problem.plan())


@given(
    shape=_axes(2, 1, 4000),
    itemsize=st.sampled_from([1, 2, 4, 8]),
    source=_axes(2, 1, 600),
    target=st.integers(1, 2**22),
)
def test_plan_large_shapes_without_coverage_array(
    shape: tuple[int, ...], itemsize: int, source: tuple[int, ...], target: int
) -> None:
    """Bigger arrays, checked arithmetically (the coverage array would be too large)."""
    plan = plan_chunks(shape, itemsize, source, chunks=target)
    for n, b, c in zip(shape, plan.block_shape, plan.chunks):
        assert sum(c) == n
        assert all(x == min(b, n) for x in c[:-1])
    for n, c, s in zip(shape, plan.chunks, source):
        assert all(edge % s == 0 or edge == n for edge in _boundaries(c))  # dest defaults to source
    assert plan.block_bytes <= max(target, _clipped_bytes(source, shape, itemsize))
    assert plan.num_tasks == math.prod(len(c) for c in plan.chunks)
