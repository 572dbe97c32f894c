"""Mistakes as a user meets them: exit code, one clear line, nothing lost."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _support import PYTHON, activations, cli, cli_env, oracle, read_mask, snapshot, write_zarr

import relu_dask
from relu_dask.errors import NaNFoundError

#: Run the CLI as the user nobody: the interpreter lives in root's home, out of nobody's
#: reach, so it starts as root, loads what it needs, then drops to nobody for good.
AS_NOBODY = """
import os, sys, pwd
import relu_dask.cli, relu_dask.execution, relu_dask.storage, zarr, numpy, dask.array
user = pwd.getpwnam("nobody")
os.setgroups([]); os.setgid(user.pw_gid); os.setuid(user.pw_uid)
sys.exit(relu_dask.cli.main(sys.argv[1:]))
"""


def run_cli_as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-c", AS_NOBODY, *args], capture_output=True, text=True, timeout=180, env=cli_env())


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("relu-dask: error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


def test_nan_error_is_one_line_exit_2_and_leaves_nothing(tmp_path: Path) -> None:
    """The command's side of ``--nan error`` (every scheduler: tests/test_scheduler_contract.py), on
    a LocalCluster: its worker processes log the failed task to the command's stderr, which must
    still hold one error line and no traceback."""
    x = np.ones((40, 30), np.float32)
    x[27, 13] = np.nan
    write_zarr(tmp_path / "g.zarr", x, (10, 10), name="layer3/relu")
    before = snapshot(tmp_path)
    small = (
        "--scheduler",
        "local",
        "--workers",
        "2",
        "--threads-per-worker",
        "1",
        "--dashboard-address",
        "127.0.0.1:0",
    )
    proc = cli("run", str(tmp_path / "g.zarr"), str(tmp_path / "out.zarr"), "--nan", "error", *small)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert "layer3/relu holds NaN in chunk (2, 1) (first at element (27, 13))" in line
    assert "--nan zero" in line
    assert snapshot(tmp_path) == before


def test_nan_zero_is_the_default_and_counts_nans(tmp_path: Path) -> None:
    x = activations((20, 20), "float64")
    x[5, :4] = np.nan
    write_zarr(tmp_path / "s.zarr", x, (7, 7))
    report = relu_dask.run(tmp_path / "s.zarr", tmp_path / "out.zarr")
    assert np.array_equal(read_mask(tmp_path / "out.zarr"), oracle(x))
    assert report.arrays[0].num_nans == int(np.isnan(x).sum())
    assert report.nan_policy == "zero"
    with pytest.raises(NaNFoundError):
        relu_dask.run(tmp_path / "s.zarr", tmp_path / "out2.zarr", nan="error")
    assert not (tmp_path / "out2.zarr").exists()


def test_relu_outputs_give_a_warning_naming_the_option(tmp_path: Path) -> None:
    x = np.maximum(activations((30, 30)), 0)  # what a ReLU layer outputs
    x[np.isnan(x)] = 0
    write_zarr(tmp_path / "s.zarr", x, (10, 10))
    proc = cli("run", str(tmp_path / "s.zarr"), str(tmp_path / "out.zarr"))
    assert proc.returncode == 0, proc.stderr
    assert "looks like ReLU outputs" in proc.stdout
    assert "--at-zero 0" in proc.stdout
    quiet = relu_dask.run(tmp_path / "s.zarr", tmp_path / "out0.zarr", at_zero=0)
    assert quiet.warnings == []
    inputs = relu_dask.run(tmp_path / "s.zarr", tmp_path / "out1.zarr", at_zero=1)
    assert any("ReLU outputs" in w for w in inputs.warnings)


@pytest.mark.parametrize(
    ("dtype", "kind"),
    [("bool", "boolean"), ("complex64", "complex"), ("U3", "string"), ("M8[s]", "datetime")],
)
def test_unsupported_dtype_is_exit_2(tmp_path: Path, dtype: str, kind: str) -> None:
    data = np.zeros(4, dtype=dtype)
    path = tmp_path / "s.zarr"
    if dtype == "U3":
        import warnings

        import zarr.errors

        with warnings.catch_warnings():  # writing test data in a dtype v3 has no stable spec for
            warnings.simplefilter("ignore", zarr.errors.UnstableSpecificationWarning)
            write_zarr(path, data, (4,))
    else:
        write_zarr(path, data, (4,))
    before = snapshot(tmp_path)
    proc = cli("run", str(path), str(tmp_path / "out.zarr"))
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert kind in line and "real numbers only" in line
    assert snapshot(tmp_path) == before


def test_absurd_block_is_refused_before_anything_runs(tmp_path: Path) -> None:
    write_zarr(tmp_path / "s.zarr", activations((64, 64)), (8, 8))
    proc = cli(
        "run",
        str(tmp_path / "s.zarr"),
        str(tmp_path / "out.zarr"),
        "--scheduler",
        "local",
        "--workers",
        "1",
        "--threads-per-worker",
        "1",
        "--memory-limit",
        "8KiB",
    )
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert "memory limit per task" in line and "--chunks" in line
    assert not (tmp_path / "out.zarr").exists()


@pytest.fixture
def world_readable_dir() -> Iterator[Path]:
    """A folder another user can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="relu-dask-perm-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)


def test_unreadable_source_for_another_user(world_readable_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run the CLI as another user")
    source = world_readable_dir / "private.zarr"
    write_zarr(source, activations((8, 8)), (4, 4))
    source.chmod(0o700)  # owned by root, closed to others
    before = snapshot(source)
    proc = run_cli_as_nobody("run", str(source), str(world_readable_dir / "out.zarr"))
    assert proc.returncode == 2, proc.stderr
    assert "not readable (permission denied)" in one_error_line(proc.stderr)
    assert snapshot(source) == before
    assert not (world_readable_dir / "out.zarr").exists()


def test_unwritable_dest_folder_for_another_user(world_readable_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run the CLI as another user")
    source = world_readable_dir / "s.zarr"
    write_zarr(source, activations((8, 8)), (4, 4))
    for p in [source, *source.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    closed = world_readable_dir / "closed"
    closed.mkdir(mode=0o755)
    proc = run_cli_as_nobody("run", str(source), str(closed / "out.zarr"))
    assert proc.returncode == 2, proc.stderr
    assert "permission denied" in one_error_line(proc.stderr)
    assert list(closed.iterdir()) == []


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A real 256 KiB tmpfs: a disk that fills up."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    path = Path(tempfile.mkdtemp(prefix="relu-dask-disk-"))
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(path)], capture_output=True)
    if result.returncode != 0:
        path.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield path
    subprocess.run(["umount", str(path)], check=True)
    path.rmdir()


def test_disk_full_is_exit_1_with_a_clear_line_and_a_rerun_completes(tmp_path: Path, small_disk: Path) -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2048, 1024)).astype(np.float32)  # masks of random bits: ~400 KiB compressed
    write_zarr(tmp_path / "s.zarr", x, (128, 1024))
    source_before = snapshot(tmp_path / "s.zarr")
    dest = small_disk / "out.zarr"
    proc = cli("run", str(tmp_path / "s.zarr"), str(dest))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = one_error_line(proc.stderr)
    assert f"the disk is full while writing DEST {dest} (No space left on device)" in line
    assert "rerun the same command" in line
    assert snapshot(tmp_path / "s.zarr") == source_before
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)  # the user frees space
    again = cli("run", str(tmp_path / "s.zarr"), str(dest))  # the same command: it resumes
    assert again.returncode == 0, again.stderr
    assert "resuming DEST" in again.stderr
    assert np.array_equal(read_mask(dest), oracle(x))
