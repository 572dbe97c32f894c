"""``relu-dask verify DEST``: read every mask chunk back and check it against the job's journal.

Use :func:`verify_dest` after a run (or ``relu-dask run --verify``) when the next stage of a
pipeline must not consume a DEST that is damaged: every chunk of every mask array is read
and decoded (masks are about an eighth of the source's size, so this is cheap), and the ones
counted in each block must equal those the run's tasks recorded in the journal. A chunk file
deleted, truncated or replaced by another's bytes fails one of these checks. A DEST that
passes is marked verified in its journal (``relu-dask status`` says so) until a later run
changes it.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np

from relu_dask import blocks, journal, storage
from relu_dask.errors import InputError
from relu_dask.locations import Location, parse_location, parse_storage_options
from relu_dask.schedulers import count_cores

__all__ = ["VerifyResult", "verify_dest"]

log = logging.getLogger(__name__)


@dataclass
class VerifyResult:
    """What :func:`verify_dest` found."""

    dest: str
    problems: list[str] = field(default_factory=list)
    """One line per problem; empty when DEST is whole."""
    num_arrays: int = 0
    num_blocks: int = 0
    num_chunks_read: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_dest(
    dest: str | os.PathLike[str], *, storage_options: str | dict[str, Any] | None = None, num_threads: int | None = None
) -> VerifyResult:
    """Read every mask chunk of DEST back and check it against DEST's journal.

    Raises :class:`InputError` when DEST has no relu-dask job record to check against;
    :class:`~relu_dask.errors.DestinationInUseError` while a run holds DEST. Otherwise
    returns a :class:`VerifyResult` whose ``problems`` name each chunk that does not decode
    and each block whose ones differ from the journal's, and marks DEST verified if there
    are none.
    """
    location = parse_location(dest, parse_storage_options(storage_options))
    with journal.hold_lock(location):
        record = journal.read_record(location)
        if record is None:
            raise InputError(f"DEST {dest} has no relu-dask job record to verify against (see relu-dask status)")
        result = VerifyResult(str(dest))
        if not record.complete:
            result.problems.append("the job is not complete: rerun the same `relu-dask run` command to finish it")
            return result
        arrays = record.fingerprint.get("arrays", [])
        with ThreadPoolExecutor(num_threads or count_cores()) as pool:
            for index, array in enumerate(arrays):
                _verify_array(location, record, index, array, pool, result)
        result.num_arrays = len(arrays)
        verified = datetime.now(UTC).isoformat(timespec="seconds") if result.ok else None
        if verified or record.verified_utc:  # a DEST found damaged is no longer verified
            journal.write_record(location, replace(record, verified_utc=verified))
        log.info("verified %s: %d problem(s) in %d chunk(s) read", dest, len(result.problems), result.num_chunks_read)
        return result


def _verify_array(
    dest: Location, record: journal.JobRecord, index: int, array: dict[str, Any], pool: Any, result: VerifyResult
) -> None:
    path, name = array["path"], array["path"] or "the mask array"
    if not storage.has_array(dest, path):
        result.problems.append(f"{name}: missing from DEST (no metadata)")
        return
    mask = storage.open_mask_array(dest, path, writable=False)
    if list(mask.array.shape) != list(array["shape"]) or np.dtype(mask.array.dtype) != np.int8:
        result.problems.append(f"{name}: {mask.array.dtype} {list(mask.array.shape)}, expected int8 {array['shape']}")
        return
    block = record.block_shapes[index]
    grid = [range(-(-n // b)) for n, b in zip(array["shape"], block)]
    blocks = list(itertools.product(*grid)) if math.prod(array["shape"]) else []  # an empty array has none
    found = list(pool.map(lambda b: _count_block(mask, b, block, name), blocks))
    result.num_blocks += len(blocks)
    recorded = record.block_ones[index] if record.block_ones else None
    expected = recorded if recorded is not None and len(recorded) == len(blocks) else None
    for linear, (coords, (ones, problems, num_chunks)) in enumerate(zip(blocks, found)):
        result.problems.extend(problems)
        result.num_chunks_read += num_chunks
        if expected is not None and not problems and ones != expected[linear]:
            result.problems.append(f"{name}: block {coords} holds {ones} ones, its task recorded {expected[linear]}")
    if expected is None:  # a journal from before per-block counts: the array's total
        total, want = sum(f[0] for f in found), (record.counts or [[0, 0]] * (index + 1))[index][1]
        if total != want:
            result.problems.append(f"{name}: holds {total} ones, the run recorded {want}")


def _count_block(
    mask: blocks.StoredArray, coords: tuple[int, ...], block: list[int], name: str
) -> tuple[int, list[str], int]:
    """The ones of one block, read a stored chunk at a time; the chunks that do not decode."""
    shape, unit = mask.array.shape, mask.stored_unit  # a shard at a time where sharded: its key names it
    lo = [c * b for c, b in zip(coords, block)]
    hi = [min(a + b, n) for a, b, n in zip(lo, block, shape)]
    ones, problems, num_chunks = 0, [], 0
    for chunk in itertools.product(*[range(a // u, -(-z // u)) for a, z, u in zip(lo, hi, unit)]):
        region = tuple(slice(max(a, c * u), min(z, (c + 1) * u)) for a, z, c, u in zip(lo, hi, chunk, unit))
        num_chunks += 1
        try:
            ones += int(np.count_nonzero(np.asarray(mask.array[region])))
        except Exception as exc:  # noqa: BLE001 - whatever zarr or a codec raises, it is this chunk's problem
            problems.append(f"{name}: {mask.describe_chunk(chunk)} cannot be read ({type(exc).__name__}: {exc})")
    return ones, problems, num_chunks
