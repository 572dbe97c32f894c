"""``relu-dask verify DEST``: read every mask chunk back and check it against the job's journal.

Use :func:`verify_dest` after a run (or ``relu-dask run --verify``) when the next stage of a
pipeline must not consume a DEST that is damaged: every chunk of every mask array is read
and decoded (masks are about an eighth of the source's size, so this is cheap), and each
block's masks must be those its task wrote: the same CRC-32 of their values
(:attr:`relu_dask.counts.BlockCounts.digest`, recorded by the task as it wrote them). A
chunk file deleted, truncated, swapped with another, or with a single value changed fails.
(For a DEST an older relu-dask wrote, without digests, the ones of each block are compared
instead, which a swap of two chunks with as many ones does not fail.) A DEST that passes is
marked verified in its journal (``relu-dask status`` says so) until a later run changes it;
the blocks one that fails holds wrong are recorded (``job.json``'s ``damaged``), and the
next ``relu-dask run`` of the job recomputes exactly those.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np

from relu_dask import blocks, chunkio, journal, storage
from relu_dask.errors import InputError, NotWritableError
from relu_dask.kernel import relu_derivative
from relu_dask.locations import Location, parse_location, parse_storage_options
from relu_dask.lock import hold_lock
from relu_dask.records import ArrayFingerprint
from relu_dask.schedulers import count_cores
from relu_dask.task import mask_digest

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
    num_blocks_compared: int = 0
    """With ``against_source``: the blocks whose masks were computed again from SOURCE and compared."""
    damaged: dict[str, list[str]] = field(default_factory=dict)
    """Per array (its index in the job, as text), the blocks found wrong (``"0.2"``: block (0, 2))."""

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_dest(
    dest: str | os.PathLike[str],
    *,
    storage_options: str | dict[str, Any] | None = None,
    num_threads: int | None = None,
    against_source: bool = False,
    sample: float | None = None,
) -> VerifyResult:
    """Read every mask chunk of DEST back and check it against DEST's journal.

    ``against_source``: also compute each block's masks again from SOURCE (as the journal
    names it, with the job's rule) and compare them value for value: this finds masks that
    were wrong from the start, which the journal cannot. ``sample``: a fraction of each
    array's blocks to compare so (at least one), chosen at random; default all.

    Raises :class:`InputError` when DEST has no relu-dask job record to check against;
    :class:`~relu_dask.errors.DestinationInUseError` while a run holds DEST. Otherwise
    returns a :class:`VerifyResult` whose ``problems`` name each chunk that does not decode
    and each block whose ones differ from the journal's, and marks DEST verified if there
    are none.
    """
    location = parse_location(dest, parse_storage_options(storage_options))
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(hold_lock(location))
            writable = True
        except NotWritableError as exc:  # a read-only DEST is checked all the same; nothing recorded
            log.warning("%s: verifying without the lock, and recording nothing", exc)
            writable = False
        record = journal.read_record(location)
        if record is None:
            raise InputError(f"DEST {dest} has no relu-dask job record to verify against (see relu-dask status)")
        result = VerifyResult(str(dest))
        if not record.complete:
            result.problems.append("the job is not complete: rerun the same `relu-dask run` command to finish it")
            return result
        arrays = record.fingerprint.get("arrays", [])
        sources = _source_arrays(record, location, against_source, sample)
        with ThreadPoolExecutor(num_threads or count_cores()) as pool:
            for index, array in enumerate(arrays):
                _verify_array(location, record, index, array, pool, result, sources.get(array["path"]), sample)
        result.num_arrays = len(arrays)
        verified = datetime.now(UTC).isoformat(timespec="seconds") if result.ok else None
        damaged = result.damaged or None
        changed = verified or record.verified_utc or damaged != record.damaged  # found damaged: no longer verified
        if writable and changed:
            journal.write_record(location, replace(record, verified_utc=verified, damaged=damaged))
        log.info("verified %s: %d problem(s) in %d chunk(s) read", dest, len(result.problems), result.num_chunks_read)
        return result


def _source_arrays(
    record: journal.JobRecord, dest: Location, against_source: bool, sample: float | None
) -> dict[str, Any]:
    """SOURCE's arrays by path, opened read-only, for ``against_source`` (else none)."""
    if sample is not None and not (against_source and 0 < sample <= 1):
        raise InputError(f"--sample takes a fraction in (0, 1] of the blocks, with --source; got {sample}")
    if not against_source:
        return {}
    url = record.fingerprint.get("source")
    try:
        contents = storage.open_source(parse_location(str(url), dest.storage_options))
    except InputError as exc:
        raise InputError(f"--source: SOURCE {url}, as DEST's journal names it, cannot be read ({exc})") from None
    return {a.path: a.array for a in contents.arrays}


def _verify_array(
    dest: Location,
    record: journal.JobRecord,
    index: int,
    array: ArrayFingerprint,
    pool: Any,
    result: VerifyResult,
    source: Any = None,
    sample: float | None = None,
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
    at_zero = 0 if record.fingerprint.get("rule") == "x > 0" else 1
    compared = _sampled(blocks, sample, seed=index) if source is not None else set()
    result.num_blocks_compared += len(compared)
    found = list(
        pool.map(lambda b: _read_block(mask, b, block, name, source if b in compared else None, at_zero), blocks)
    )
    result.num_blocks += len(blocks)
    recorded = record.array(index)
    expected = (
        recorded.block_ones if recorded.block_ones is not None and len(recorded.block_ones) == len(blocks) else None
    )
    digests = recorded.block_digests if expected is not None and recorded.block_digests is not None else None
    digests = digests if digests is not None else [-1] * len(blocks)
    for linear, (coords, (ones, digest, problems, chunks)) in enumerate(zip(blocks, found)):
        result.num_chunks_read += len(chunks)
        named = ", ".join(chunks[:_NAMED]) + (f" and {len(chunks) - _NAMED} more" if len(chunks) > _NAMED else "")
        if not problems and digests[linear] >= 0 and digest != digests[linear]:
            problems = [
                f"{name}: block {coords} holds masks other than its task wrote (CRC-32 {digest:08x}, "
                f"written {digests[linear]:08x}): {named}"
            ]
        elif not problems and expected is not None and ones != expected[linear]:
            problems = [f"{name}: block {coords} holds {ones} ones, its task recorded {expected[linear]}: {named}"]
        if problems:
            result.problems.extend(problems)
            result.damaged.setdefault(str(index), []).append(journal.marker_name(coords))
    if expected is None:  # a journal from before per-block counts: the array's total
        total, want = sum(f[0] for f in found), recorded.counts.ones
        if total != want:
            result.problems.append(f"{name}: holds {total} ones, the run recorded {want}")


#: The stored objects of a wrong block a problem names (then how many more).
_NAMED = 8


def _sampled(block_indices: list[tuple[int, ...]], sample: float | None, seed: int) -> set[tuple[int, ...]]:
    """The blocks to compare with SOURCE: all, or a random ``sample`` fraction (at least one)."""
    if sample is None or not block_indices:
        return set(block_indices)
    count = max(1, round(sample * len(block_indices)))
    chosen = np.random.default_rng(seed).choice(len(block_indices), size=count, replace=False)
    return {block_indices[int(i)] for i in chosen}


def _read_block(
    mask: blocks.StoredArray,
    coords: tuple[int, ...],
    block: list[int],
    name: str,
    source: Any = None,
    at_zero: int = 1,
) -> tuple[int, int, list[str], list[str]]:
    """One block of masks, read a stored object (chunk, or shard where sharded) at a time:
    its ones, its digest (:func:`relu_dask.task.mask_digest`), the objects that do not
    decode (and, given ``source``, how its masks differ from those computed from it), and
    the objects it spans, named."""
    shape, unit = mask.array.shape, mask.stored_unit  # a shard at a time where sharded: its key names it
    lo = [c * b for c, b in zip(coords, block)]
    hi = [min(a + b, n) for a, b, n in zip(lo, block, shape)]
    values = np.zeros([z - a for a, z in zip(lo, hi)], dtype=np.int8)
    problems, chunks = [], []
    for chunk in itertools.product(*[range(a // u, -(-z // u)) for a, z, u in zip(lo, hi, unit)]):
        region = tuple(slice(max(a, c * u), min(z, (c + 1) * u)) for a, z, c, u in zip(lo, hi, chunk, unit))
        chunks.append(mask.describe_chunk(chunk))
        try:
            values[tuple(slice(r.start - a, r.stop - a) for r, a in zip(region, lo))] = mask.array[region]
            local = mask.files is not None and mask.bucket is None
            if local and not chunkio.frame_is_whole(mask.files.path(chunk), mask.files.format):  # type: ignore[union-attr]
                raise ValueError("bytes follow its encoded frame")
        except Exception as exc:  # noqa: BLE001 - whatever zarr or a codec raises, it is this chunk's problem
            problems.append(f"{name}: block {coords}: {chunks[-1]} cannot be read ({type(exc).__name__}: {exc})")
    if source is not None and not problems:
        region = tuple(slice(a, z) for a, z in zip(lo, hi))
        expected = relu_derivative(np.asarray(source[region]), at_zero=at_zero)
        wrong = np.argwhere(expected != values)
        if len(wrong):
            first = tuple(int(a + i) for a, i in zip(lo, wrong[0]))
            problems.append(
                f"{name}: block {coords} differs from the masks of SOURCE in {len(wrong)} value(s), first at "
                f"element {first}: DEST was wrong from the start, or SOURCE changed since; rerun with --overwrite"
            )
    return int(np.count_nonzero(values)), mask_digest(values), problems, chunks
