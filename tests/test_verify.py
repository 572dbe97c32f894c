"""``relu-dask verify`` proves DEST right, and the next run repairs what it found wrong.

One family of damages (a chunk deleted, truncated, swapped with another in its block or in
another block, a value edited through zarr, a bit flipped in an uncompressed chunk) over each
layout of DEST (blocks of several chunks, a chunk a block, shards, no compressor): verify exits 1
on every damaged DEST, naming the block and its stored objects, and 0 on every intact one; the
same ``run`` command then recomputes exactly the damaged blocks, and DEST equals the numpy
oracle again.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from _support import activations, cli, journal_folder, oracle, read_mask, write_zarr

LAYOUTS = {
    # name: (source chunks, source shards, relu-dask options)
    "blocks-of-chunks": ((16, 16), None, ("--chunks", "32,32")),
    "a-chunk-a-block": ((16, 16), None, ("--chunks", "16,16")),
    "sharded": ((16, 16), (32, 32), ("--chunks", "32,64")),
    "uncompressed": ((16, 16), None, ("--chunks", "32,32", "--dest-compressor", "none")),
    "zstd": ((16, 16), None, ("--chunks", "32,32", "--dest-compressor", "zstd")),
}

#: (layout, damage, the stored objects it touches, how many blocks it damages)
CASES = [
    ("blocks-of-chunks", "deleted", ("c/0/0",), 1),
    ("blocks-of-chunks", "truncated", ("c/0/0",), 1),
    ("blocks-of-chunks", "swapped", ("c/0/0", "c/1/1"), 1),  # within block (0, 0)
    ("blocks-of-chunks", "swapped", ("c/0/0", "c/2/2"), 2),  # blocks (0, 0) and (1, 1)
    ("blocks-of-chunks", "edited", ("c/0/0",), 1),
    ("a-chunk-a-block", "swapped", ("c/0/0", "c/1/1"), 2),
    ("a-chunk-a-block", "edited", ("c/1/2",), 1),
    ("sharded", "swapped", ("c/0/0", "c/0/1"), 1),  # two shards of block (0, 0)
    ("sharded", "swapped", ("c/0/0", "c/1/0"), 2),
    ("sharded", "edited", ("c/1/1",), 1),
    ("sharded", "truncated", ("c/1/1",), 1),
    ("uncompressed", "bit-flipped", ("c/2/3",), 1),
    ("uncompressed", "edited", ("c/3/3",), 1),
    # bytes appended after the encoded frame: every decoder but zstd's still decodes the chunk
    ("blocks-of-chunks", "appended", ("c/1/1",), 1),
    ("a-chunk-a-block", "appended", ("c/2/1",), 1),
    ("sharded", "appended", ("c/1/1",), 1),
    ("uncompressed", "appended", ("c/1/1",), 1),
    ("zstd", "appended", ("c/1/1",), 1),
]


def _dest(tmp_path: Path, layout: str) -> tuple[tuple[str, ...], Path, np.ndarray]:
    chunks, shards, options = LAYOUTS[layout]
    x = activations((64, 64), seed=21)
    write_zarr(tmp_path / "src.zarr", x, chunks, shards=shards)
    dest = tmp_path / "out.zarr"
    args = ("run", str(tmp_path / "src.zarr"), str(dest), "--scheduler", "synchronous", *options)
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    return args, dest, x


def _damage(dest: Path, damage: str, objects: tuple[str, ...]) -> None:
    first = dest / objects[0]
    if damage == "deleted":
        first.unlink()
    elif damage == "truncated":
        first.write_bytes(first.read_bytes()[:20])
    elif damage == "swapped":
        other = dest / objects[1]
        a, b = first.read_bytes(), other.read_bytes()
        assert a != b
        first.write_bytes(b)
        other.write_bytes(a)
    elif damage == "appended":
        first.write_bytes(first.read_bytes() + b"appended")
    elif damage == "bit-flipped":  # raw int8 values: the flipped bit turns a 0 into 1 or back
        data = bytearray(first.read_bytes())
        data[len(data) // 2] ^= 1
        first.write_bytes(bytes(data))
    else:  # two values edited through zarr, one 1 -> 0 and one 0 -> 1: the ones stay as many
        mask = zarr.open_array(str(dest), mode="r+")
        i, j = (int(c) for c in objects[0].split("/")[1:])
        unit = mask.shards or mask.chunks
        region = (slice(i * unit[0], (i + 1) * unit[0]), slice(j * unit[1], (j + 1) * unit[1]))
        values = np.asarray(mask[region])
        one, zero = np.argwhere(values == 1)[0], np.argwhere(values == 0)[0]
        values[tuple(one)], values[tuple(zero)] = 0, 1
        mask[region] = values


@pytest.mark.parametrize(("layout", "damage", "objects", "num_damaged"), CASES)
def test_verify_finds_every_damage_and_the_same_run_repairs_exactly_it(
    tmp_path: Path, layout: str, damage: str, objects: tuple[str, ...], num_damaged: int
) -> None:
    args, dest, x = _dest(tmp_path, layout)
    _damage(dest, damage, objects)
    if damage not in ("truncated", "appended"):  # a truncated chunk does not decode; appended bytes may
        assert not np.array_equal(read_mask(dest), oracle(x))

    proc = cli("verify", str(dest))
    assert proc.returncode == 1, proc.stdout
    problems = [line for line in proc.stderr.splitlines() if line.startswith("relu-dask: verify:")]
    assert len(problems) == num_damaged, proc.stderr
    assert all("block (" in p for p in problems)
    assert any(objects[0] in p and str(dest) in p for p in problems)  # the stored object, by its key
    assert f"rerun the same relu-dask run command to recompute the {num_damaged} damaged block(s)" in proc.stdout
    status = cli("status", str(dest))
    assert f"{dest}: damaged (" in status.stdout and f"found {num_damaged} block(s) wrong" in status.stdout
    assert json.loads(cli("status", str(dest), "--json").stdout)["damaged_blocks"] == num_damaged

    report = tmp_path / "repair.json"
    again = cli(*args, "--report", str(report))
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("repaired: ")
    assert json.loads(report.read_text())["tasks_done_now"] == num_damaged  # those blocks, nothing else
    assert np.array_equal(read_mask(dest), oracle(x))
    assert "verified" not in cli("status", str(dest)).stdout  # until verify says so
    assert cli("verify", str(dest)).returncode == 0
    assert cli(*args).stdout.startswith("already complete: ")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_an_intact_dest_verifies_in_every_layout(tmp_path: Path, layout: str) -> None:
    _, dest, _ = _dest(tmp_path, layout)
    proc = cli("verify", str(dest))
    assert proc.returncode == 0, proc.stderr
    assert "every one decodes and matches the journal" in proc.stdout
    assert "verified" in cli("status", str(dest)).stdout


def test_a_dest_of_an_older_relu_dask_without_digests_is_checked_by_its_ones(tmp_path: Path) -> None:
    """No digests recorded: a swap that changes a block's ones is still found; DEST is never
    called damaged where nothing says so."""
    args, dest, x = _dest(tmp_path, "a-chunk-a-block")
    path = journal_folder(dest) / "job.json"
    record = json.loads(path.read_text())
    del record["block_digests"], record["damaged"]
    path.write_text(json.dumps(record))
    assert cli("verify", str(dest)).returncode == 0
    mask = oracle(x)
    assert mask[0:16, 0:16].sum() != mask[16:32, 16:32].sum()
    _damage(dest, "swapped", ("c/0/0", "c/1/1"))
    proc = cli("verify", str(dest))
    assert proc.returncode == 1
    assert "block (0, 0) holds" in proc.stderr and "ones, its task recorded" in proc.stderr
    assert cli(*args).returncode == 0  # no digest to prove the redone blocks by: recomputed all the same
    assert np.array_equal(read_mask(dest), oracle(x))


def test_verify_source_finds_masks_wrong_from_the_start(tmp_path: Path) -> None:
    """Masks written wrong, with a journal that agrees (as a bug in an older relu-dask would
    leave them): only SOURCE can tell, and --source does."""
    args, dest, x = _dest(tmp_path, "blocks-of-chunks")
    assert cli("verify", str(dest), "--source").returncode == 0
    wrong = oracle(x)
    wrong[40, 7] = 1 - wrong[40, 7]
    zarr.open_array(str(dest), mode="r+")[...] = wrong
    path = journal_folder(dest) / "job.json"
    record = json.loads(path.read_text())
    del record["block_digests"]  # a journal with no digests, and the ones as the wrong masks hold them
    record["block_ones"][0][2] += int(wrong[32:64, 0:32].sum() - oracle(x)[32:64, 0:32].sum())
    path.write_text(json.dumps(record))
    assert cli("verify", str(dest)).returncode == 0  # the journal cannot tell
    proc = cli("verify", str(dest), "--source")
    assert proc.returncode == 1
    assert "block (1, 0) differs from the masks of SOURCE in 1 value(s), first at element (40, 7)" in proc.stderr
    assert "rerun with --overwrite" in proc.stderr
    sampled = cli("verify", str(dest), "--source", "--sample", "0.25")  # 1 of the 4 blocks (seeded: (1, 1))
    assert sampled.returncode == 0 and "1 block(s) equal SOURCE's masks" in sampled.stdout
    assert cli("run", *args[1:], "--overwrite").returncode == 0
    proc = cli("verify", str(dest), "--source", "--sample", "1")
    assert proc.returncode == 0 and "4 block(s) equal SOURCE's masks" in proc.stdout


@pytest.mark.parametrize("args", [("--sample", "0.5"), ("--source", "--sample", "0"), ("--source", "--sample", "2")])
def test_verify_refuses_a_sample_that_cannot_work(tmp_path: Path, args: tuple[str, ...]) -> None:
    _, dest, _ = _dest(tmp_path, "a-chunk-a-block")
    proc = cli("verify", str(dest), *args)
    assert proc.returncode == 2 and "--sample takes a fraction in (0, 1] of the blocks, with --source" in proc.stderr
