"""DEST and its record are one thing: moved, copied or deleted together (issue 27, item 6).

The job's record (``job.json``, done markers, the lock) lives in ``DEST/.relu-dask/``. These
tests move, copy and delete DESTs as a user would (``mv``, ``cp -r``, ``rm -rf``), open them
with zarr, xarray and tensorstore with every warning an error, and take over the record an
older relu-dask left beside DEST.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import warnings
from pathlib import Path

import numpy as np
import psutil
import pytest
import zarr
from _support import activations, chunk_files, cli, dest_files, journal_folder, kill_at_step, oracle, write_zarr

xr = pytest.importorskip("xarray")


def _dataset(tmp_path: Path) -> tuple[Path, xr.Dataset]:
    rng = np.random.default_rng(3)
    ds = xr.Dataset(
        {
            "fc1": (("step", "unit"), rng.standard_normal((96, 24)).astype(np.float32)),
            "fc2": (("step", "unit"), rng.standard_normal((96, 24)).astype(np.float32)),
        },
        coords={"step": np.arange(96), "unit": [f"u{i}" for i in range(24)]},
    )
    source = tmp_path / "acts.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr's note on writing fixed-width text
        ds.chunk({"step": 32}).to_zarr(source, zarr_format=3, consolidated=True)
    return source, ds


def _exact(dest: Path, ds: xr.Dataset) -> None:
    masks = xr.open_zarr(dest)
    for name in ("fc1", "fc2"):
        assert np.array_equal(masks[name].values, oracle(ds[name].values)), name


def _ok(*args: str) -> str:
    proc = cli(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def _status(dest: Path) -> dict[str, object]:
    proc = cli("status", str(dest), "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return dict(json.loads(proc.stdout))


def test_a_moved_dest_keeps_its_record_and_a_deleted_one_leaves_nothing(tmp_path: Path) -> None:
    source, ds = _dataset(tmp_path)
    dest = tmp_path / "masks.zarr"
    _ok("run", str(source), str(dest), "--chunks", "32,24", "--progress", "none")
    assert (journal_folder(dest) / "job.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acts.zarr", "masks.zarr"]  # nothing beside DEST

    moved = tmp_path / "moved.zarr"
    os.rename(dest, moved)  # mv masks.zarr moved.zarr
    status = _status(moved)
    assert (status["state"], status["tasks_done"], status["num_tasks"]) == ("complete", 6, 6)
    assert "verified" in _ok("verify", str(moved), "--source")
    assert "already complete" in _ok("run", str(source), str(moved), "--chunks", "32,24", "--progress", "none")
    _exact(moved, ds)

    copied = tmp_path / "copy.zarr"
    shutil.copytree(moved, copied)  # cp -r: the copy is a DEST of its own, with its own record
    assert _status(copied)["state"] == "complete"
    assert "verified" in _ok("verify", str(copied))
    assert dest_files(copied) == dest_files(moved)

    shutil.rmtree(moved)  # rm -rf: nothing of it is left
    shutil.rmtree(copied)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acts.zarr"]
    assert _status(moved)["state"] == "absent"


def test_a_dest_moved_part_way_resumes_where_it_stopped(tmp_path: Path) -> None:
    x = activations((128, 64), seed=4)
    write_zarr(tmp_path / "src.zarr", x, (16, 64))
    dest, moved = tmp_path / "out.zarr", tmp_path / "elsewhere.zarr"
    kill_at_step("tasks-done", "run", str(tmp_path / "src.zarr"), str(dest), "--chunks", "16,64", "--progress", "none")
    os.rename(dest, moved)
    status = _status(moved)
    assert (status["state"], status["tasks_done"], status["num_tasks"]) == ("partial", 8, 8)
    said = _ok("run", str(tmp_path / "src.zarr"), str(moved), "--chunks", "16,64", "--progress", "none")
    assert "8 of 8 tasks already done" in said
    assert np.array_equal(zarr.open_array(moved, mode="r")[...], oracle(x))


def test_zarr_xarray_and_tensorstore_open_a_dest_without_a_warning(tmp_path: Path) -> None:
    source, ds = _dataset(tmp_path)
    group, single = tmp_path / "masks.zarr", tmp_path / "fc1.zarr"
    _ok("run", str(source), str(group), "--progress", "none")
    _ok("run", str(source / "fc1"), str(single), "--progress", "none")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        root = zarr.open_group(group, mode="r")
        assert sorted(name for name, _ in root.members(max_depth=None)) == ["fc1", "fc2", "step", "unit"]
        for name in ("fc1", "fc2"):
            assert np.array_equal(root[name][...], oracle(ds[name].values))
        _exact(group, ds)
        tree = xr.open_datatree(group, engine="zarr")
        assert list(tree.children) == [] and set(tree.data_vars) == {"fc1", "fc2"}
        assert np.array_equal(zarr.open_array(single, mode="r")[...], oracle(ds["fc1"].values))
    ts = pytest.importorskip("tensorstore")
    for path, name in ((group / "fc2", "fc2"), (single, "fc1")):
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
        assert np.array_equal(ts.open(spec).result().read().result(), oracle(ds[name].values))


def test_a_record_an_older_relu_dask_left_beside_dest_is_moved_in(tmp_path: Path) -> None:
    source, ds = _dataset(tmp_path)
    dest = tmp_path / "masks.zarr"
    _ok("run", str(source), str(dest), "--chunks", "32,24", "--progress", "none")
    before = chunk_files(dest)
    legacy = tmp_path / ".masks.zarr.relu-dask"
    os.rename(journal_folder(dest), legacy)  # where relu-dask kept it before

    status = _status(dest)  # read where it is, and moved in
    assert status["state"] == "complete"
    assert not legacy.exists() and (journal_folder(dest) / "job.json").is_file()
    assert "already complete" in _ok("run", str(source), str(dest), "--chunks", "32,24", "--progress", "none")
    assert chunk_files(dest) == before

    os.rename(journal_folder(dest), legacy)  # an older relu-dask running on DEST now: its lock is honoured
    started = psutil.Process().create_time()
    (legacy / "lock").write_text(
        json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "pid_started": started, "started": time.time()})
    )
    refused = cli("run", str(source), str(dest), "--chunks", "32,24", "--progress", "none")
    assert refused.returncode == 3 and f"pid {os.getpid()}" in refused.stderr, refused.stderr
    assert (legacy / "job.json").is_file() and not journal_folder(dest).exists()
    assert _status(dest)["running"] is not None
    (legacy / "lock").unlink()
    assert "already complete" in _ok("run", str(source), str(dest), "--chunks", "32,24", "--progress", "none")
    assert not legacy.exists()
    _exact(dest, ds)


def test_a_dest_that_is_a_file_is_refused_and_an_empty_folder_is_filled(tmp_path: Path) -> None:
    x = activations((32, 16), seed=5)
    write_zarr(tmp_path / "src.zarr", x, (16, 16))
    (tmp_path / "notes.txt").write_text("mine")
    proc = cli("run", str(tmp_path / "src.zarr"), str(tmp_path / "notes.txt"), "--overwrite")
    assert proc.returncode == 2 and "is a file, not a Zarr store" in proc.stderr, proc.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "empty.zarr").mkdir()
    _ok("run", str(tmp_path / "src.zarr"), str(tmp_path / "empty.zarr"))
    assert np.array_equal(zarr.open_array(tmp_path / "empty.zarr", mode="r")[...], oracle(x))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    proc = cli("run", str(tmp_path / "src.zarr"), str(mine))
    assert proc.returncode == 2 and "already exists" in proc.stderr, proc.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]  # no lock, no record left in it
