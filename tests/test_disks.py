"""A full disk and a read-only file system, for real: small tmpfs mounts (root only).

Each gets one clear line and its documented exit code, leaves no lock behind, and the next
run starts at once; ``verify`` checks a read-only DEST without writing to it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _support import activations, cli, journal_folder, oracle, read_mask, write_zarr


def _mount(where: Path, *options: str) -> None:
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(where)], capture_output=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here (root only): {proc.stderr.decode().strip()}")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB file system of its own."""
    where = tmp_path / "disk"
    where.mkdir()
    _mount(where, "size=1m")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(disk: Path) -> Path:
    """Take every free byte of ``disk``; the file that does."""
    filler = disk / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k"], capture_output=True, check=False)
    return filler


def test_a_full_disk_is_one_line_exit_1_and_the_next_run_starts_at_once(tmp_path: Path, small_disk: Path) -> None:
    x = activations((64, 64), seed=50)
    write_zarr(tmp_path / "src.zarr", x, (16, 16))
    dest = small_disk / "out.zarr"
    args = ("run", str(tmp_path / "src.zarr"), str(dest), "--scheduler", "synchronous")
    filler = _fill(small_disk)
    proc = cli(*args)
    assert proc.returncode == 1, proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("relu-dask: error:")]
    assert "No space left on device" in line and "unexpected" not in line, line
    assert not (journal_folder(dest) / "lock").exists()
    filler.unlink()
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert "took over" not in again.stderr and "in use" not in again.stderr
    assert np.array_equal(read_mask(dest), oracle(x))


def test_a_read_only_dest_is_verified_and_a_run_into_it_is_one_line_exit_2(tmp_path: Path, small_disk: Path) -> None:
    x = activations((64, 64), seed=51)
    write_zarr(tmp_path / "src.zarr", x, (16, 16))
    dest = small_disk / "out.zarr"
    args = ("run", str(tmp_path / "src.zarr"), str(dest), "--scheduler", "synchronous")
    assert cli(*args).returncode == 0
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    proc = cli("verify", str(dest))
    assert proc.returncode == 0, proc.stderr
    assert "verified" in proc.stdout and "Read-only file system" in proc.stderr  # said, and nothing recorded
    other = cli("run", str(tmp_path / "src.zarr"), str(small_disk / "new.zarr"))
    assert other.returncode == 2
    (line,) = [x for x in other.stderr.splitlines() if x.startswith("relu-dask: error:")]
    assert "a read-only file system in" in line, line
