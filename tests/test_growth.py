"""A SOURCE that grows between runs: only the new rows are computed, and DEST ends up
byte-identical, every file, to a from-scratch run over the grown SOURCE, with the same counts
and statistics. What is not growth (a rewritten old chunk, a shrink, another dimension) is
refused, and so is growth itself with ``--append-axis none``.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from _support import (
    PYTHON,
    activations,
    chunk_files,
    cli,
    cli_env,
    dest_files,
    files_under,
    journal_folder,
    kill_at_step,
    oracle,
    read_mask,
    snapshot,
    start_cli,
    write_zarr,
)

import relu_dask
from relu_dask.errors import DestinationExistsError
from relu_dask.report import RunReport
from relu_dask.verify import verify_dest

#: Rows of the full activations; SOURCE holds a prefix of them that grows.
ROWS = 700
#: Uneven growth, each ending off the 16-row chunk edge (a ragged edge every time).
GROWTH = (101, 250, 259, 700)


def _grow(array: Any, full: np.ndarray, rows: int) -> None:
    """Append rows as a training job does: resize, then write only the new rows."""
    old = array.shape[0]
    array.resize((rows, *full.shape[1:]))
    array[old:rows] = full[old:rows]


def _same_as_fresh(source: Path, dest: Path, tmp_path: Path, grown: RunReport, **options: Any) -> RunReport:
    """Run from scratch into a new DEST; check the grown DEST equals it, file for file and count for count."""
    fresh_dest = tmp_path / f"fresh-{time.monotonic_ns()}.zarr"
    fresh = relu_dask.run(source, fresh_dest, **options)
    assert dest_files(dest) == dest_files(fresh_dest)
    for a, b in zip(grown.arrays, fresh.arrays, strict=True):
        assert (a.path, a.shape, a.num_elements, a.num_ones, a.num_nans, a.num_zeros) == (
            b.path,
            b.shape,
            b.num_elements,
            b.num_ones,
            b.num_nans,
            b.num_zeros,
        )
        assert a.stats == b.stats
    shutil.rmtree(fresh_dest)
    shutil.rmtree(journal_folder(fresh_dest), ignore_errors=True)
    return fresh


@pytest.mark.parametrize(
    ("zarr_format", "shards", "unit_axis"),
    [(3, None, -1), (3, (32, 16), -1), (2, None, 0)],
    ids=["v3", "v3-sharded", "v2-units-along-the-append-axis"],
)
def test_three_growths_by_zarr_each_equal_a_fresh_run(
    tmp_path: Path, zarr_format: int, shards: tuple[int, ...] | None, unit_axis: int
) -> None:
    full = activations((ROWS, 48), seed=3)
    other = activations((ROWS, 24), dtype="float64", seed=4)
    fixed = activations((40, 8), seed=5)  # an array that never grows
    source = tmp_path / "acts.zarr"
    a = write_zarr(source, full[: GROWTH[0]], (16, 16), zarr_format=zarr_format, shards=shards, name="a")
    b = write_zarr(source, other[: GROWTH[0]], (16, 16), zarr_format=zarr_format, name="b")
    write_zarr(source, fixed, (16, 8), zarr_format=zarr_format, name="fixed")
    dest = tmp_path / "masks.zarr"
    options = {"chunks": (64, 16) if shards is None else (64, 32), "stats": True, "unit_axis": unit_axis}
    first = relu_dask.run(source, dest, **options)
    assert first.arrays[0].grown_from is None
    for step, rows in enumerate(GROWTH[1:], start=1):
        _grow(a, full, rows)
        _grow(b, other, rows)
        if step == 2:  # an array new in the SOURCE group is processed whole
            write_zarr(source, activations((30, 6), seed=6), (16, 6), zarr_format=zarr_format, name="late")
        old_rows = GROWTH[step - 1]
        grown = relu_dask.run(source, dest, **options)
        entry = next(e for e in grown.arrays if e.path == "a")
        assert entry.grown_from == [old_rows, 48]
        # Read: the new rows, plus the old edge block whose source chunk the writer completed.
        block_rows = options["chunks"][0]
        assert entry.bytes_read <= (rows - old_rows + block_rows) * 48 * 4
        assert entry.blocks_kept == (old_rows // block_rows) * -(-48 // options["chunks"][1])
        assert next(e for e in grown.arrays if e.path == "fixed").tasks_done_now == 0
        assert np.array_equal(read_mask(dest, "a"), oracle(full[:rows]))
        assert np.array_equal(read_mask(dest, "b"), oracle(other[:rows]))
        _same_as_fresh(source, dest, tmp_path, grown, **options)
        assert verify_dest(dest).ok
    again = relu_dask.run(source, dest, **options)
    assert again.outcome == "already complete"


def test_growth_by_xarray_append_dim_equals_a_fresh_run(tmp_path: Path) -> None:
    xr = pytest.importorskip("xarray")
    full = activations((300, 32), seed=7)

    def dataset(start: int, stop: int) -> Any:
        return xr.Dataset(
            {"relu_in": (("step", "unit"), full[start:stop], {"layer": "fc1"})},
            coords={"step": np.arange(start, stop), "unit": np.arange(32)},
        )

    source, dest = tmp_path / "acts.zarr", tmp_path / "masks.zarr"
    encoding = {"relu_in": {"chunks": (16, 32)}, "step": {"chunks": (16,)}}
    dataset(0, 90).to_zarr(source, mode="w", zarr_format=3, encoding=encoding, consolidated=False)
    options = {"chunks": (32, 32), "stats": True}
    relu_dask.run(source, dest, **options)
    dataset(90, 211).to_zarr(source, append_dim="step", consolidated=False)
    grown = relu_dask.run(source, dest, **options)
    assert grown.arrays[0].grown_from == [90, 32]
    assert sorted(grown.coordinates) == ["step", "unit"]
    _same_as_fresh(source, dest, tmp_path, grown, **options)
    masks = xr.open_zarr(dest)
    assert np.array_equal(masks["step"].values, np.arange(211))
    assert np.array_equal(masks["relu_in"].values, oracle(full[:211]))


def _grown_source(tmp_path: Path) -> tuple[Path, Path, np.ndarray, Any]:
    full = activations((200, 32), seed=8)
    source, dest = tmp_path / "acts.zarr", tmp_path / "masks.zarr"
    array = write_zarr(source, full[:100], (16, 16))
    assert cli("run", str(source), str(dest), "--chunks", "32,32").returncode == 0
    return source, dest, full, array


def test_growth_is_refused_with_append_axis_none(tmp_path: Path) -> None:
    source, dest, full, array = _grown_source(tmp_path)
    _grow(array, full, 150)
    before = snapshot(dest)
    proc = cli("run", str(source), str(dest), "--chunks", "32,32", "--append-axis", "none")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("relu-dask: error: DEST")
    assert "holds another job (the source array changed (shape, metadata_sha256" in proc.stderr
    assert snapshot(dest) == before
    proc = cli("run", str(source), str(dest), "--chunks", "32,32")
    assert proc.returncode == 0, proc.stderr
    assert "(grown from 100x32; 3 block(s) kept)" in proc.stdout
    assert np.array_equal(read_mask(dest), oracle(full[:150]))


@pytest.mark.parametrize("change", ["old chunk rewritten", "shrunk", "other axis grown", "axis 1 asked"])
def test_what_is_not_growth_along_the_append_axis_is_refused(tmp_path: Path, change: str) -> None:
    source, dest, full, array = _grown_source(tmp_path)
    expected = {
        "old chunk rewritten": "the source array changed (its chunk c/2/1 was rewritten since it was processed)",
        "shrunk": "the source array shrank from 100 to 90 along axis 0",
        "other axis grown": "the source array changed shape from (100, 32) to (100, 40), not only along the "
        "append axis 0",
        "axis 1 asked": "the source array changed shape from (100, 32) to (150, 32), not only along the append axis 1",
    }[change]
    time.sleep(0.01)  # a new mtime for a rewritten chunk
    if change == "old chunk rewritten":
        _grow(array, full, 150)
        array[32:48, 16:32] = -full[32:48, 16:32]
    elif change == "shrunk":
        array.resize((90, 32))
    elif change == "other axis grown":
        array.resize((100, 40))
    else:
        _grow(array, full, 150)
    before = snapshot(dest)
    axis = 1 if change == "axis 1 asked" else 0
    with pytest.raises(DestinationExistsError) as refused:
        relu_dask.run(source, dest, chunks=(32, 32), append_axis=axis)
    assert expected in str(refused.value)
    assert snapshot(dest) == before


def test_growth_along_another_axis_than_dest_was_made_with_is_refused(tmp_path: Path) -> None:
    """Made with the default --append-axis 0; SOURCE grows along axis 1 and the rerun asks for it."""
    full = activations((96, 120), seed=3)
    source, dest = tmp_path / "acts.zarr", tmp_path / "masks.zarr"
    array = write_zarr(source, full[:, :100], (16, 20))
    assert cli("run", str(source), str(dest)).returncode == 0
    array.resize((96, 120))
    array[:, 100:] = full[:, 100:]
    before = snapshot(dest)
    proc = cli("run", str(source), str(dest), "--append-axis", "1", "--verify")
    assert proc.returncode == 2
    assert "grew along axis 1, but DEST was made with --append-axis 0" in proc.stderr
    assert snapshot(dest) == before
    again = cli("run", str(source), str(dest), "--append-axis", "1", "--overwrite")
    assert again.returncode == 0, again.stderr
    assert np.array_equal(read_mask(dest), oracle(full))


def test_an_array_gone_from_a_grown_group_is_refused(tmp_path: Path) -> None:
    source, dest = tmp_path / "acts.zarr", tmp_path / "masks.zarr"
    full = activations((100, 16))
    a = write_zarr(source, full[:50], (16, 16), name="a")
    write_zarr(source, full[:50], (16, 16), name="b")
    relu_dask.run(source, dest)
    _grow(a, full, 100)
    shutil.rmtree(source / "b")
    with pytest.raises(DestinationExistsError, match="b is gone"):
        relu_dask.run(source, dest)


def _markers(dest: Path) -> int:
    return len(files_under(journal_folder(dest) / "done"))  # a run may be deleting them


@pytest.mark.parametrize("when", ["job-recorded", "outputs-created", "tasks"])
def test_a_kill_during_an_incremental_run_then_the_same_command_is_identical(tmp_path: Path, when: str) -> None:
    full = activations((4800, 256), seed=10)
    source, dest = tmp_path / "acts.zarr", tmp_path / "masks.zarr"
    array = write_zarr(source, full[:1200], (8, 256))
    args = ("run", str(source), str(dest), "--chunks", "8,256", "--scheduler", "synchronous", "--stats")
    assert cli(*args).returncode == 0
    _grow(array, full, 4795)
    num_new = 4795 // 8 - 1200 // 8 + 1  # blocks that touch the new rows (the last one ragged)
    if when == "tasks":  # SIGKILL once some of the new blocks are done
        proc = start_cli(*args)
        end = time.monotonic() + 60
        while _markers(dest) < 5 and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert 0 < _markers(dest) < num_new, "killed part way through the new blocks"
    else:
        kill_at_step(when, *args)
    status = json.loads(cli("status", str(dest), "--json").stdout)
    assert (status["state"], status["num_tasks"]) == ("partial", num_new)
    proc = cli(*args, "--report", str(tmp_path / "report.json"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    fresh = tmp_path / "fresh.zarr"
    fresh_args = ("--chunks", "8,256", "--stats", "--report", str(tmp_path / "fresh.json"))
    assert cli("run", str(source), str(fresh), *fresh_args).returncode == 0
    assert dest_files(dest) == dest_files(fresh)
    expected = json.loads((tmp_path / "fresh.json").read_text())
    for key in ("stats", "num_ones", "num_nans", "num_zeros", "num_elements"):
        assert report["arrays"][0][key] == expected["arrays"][0][key]


def test_source_grown_again_after_an_interrupted_incremental_run(tmp_path: Path) -> None:
    """Blocks done for a smaller SOURCE are kept, but the one its edge cut short is redone."""
    full = activations((900, 32), seed=11)
    source, dest = tmp_path / "acts.zarr", tmp_path / "masks.zarr"
    array = write_zarr(source, full[:100], (8, 32))
    options = {"chunks": (16, 32), "stats": True, "unit_axis": 0, "scheduler": "synchronous"}
    relu_dask.run(source, dest, **options)
    _grow(array, full, 404)  # ragged: the block of rows 400..416 is cut short
    args = ("run", str(source), str(dest), "--chunks", "16,32", "--stats", "--unit-axis", "0")
    kill_at_step("tasks-done", *args)  # every new block marked done, the record not yet complete
    assert _markers(dest) == 404 // 16 - 100 // 16 + 1
    _grow(array, full, 777)
    grown = relu_dask.run(source, dest, **options)
    assert grown.arrays[0].tasks_skipped == 400 // 16 - 100 // 16  # all but the cut-short block
    assert grown.arrays[0].blocks_kept == 100 // 16
    _same_as_fresh(source, dest, tmp_path, grown, **options)


def test_status_says_rows_done_and_rows_waiting(tmp_path: Path) -> None:
    source, dest, full, array = _grown_source(tmp_path)
    assert cli("status", str(dest)).stdout.startswith(f"{dest}: complete (100 rows, 4 tasks)")
    _grow(array, full, 170)
    proc = cli("status", str(dest))
    assert "SOURCE has grown: 70 more rows wait; rerun the same command to process them" in proc.stdout
    assert json.loads(cli("status", str(dest), "--json").stdout)["rows_waiting"] == {"": 70}
    assert cli("run", str(source), str(dest), "--chunks", "32,32").returncode == 0
    proc = cli("status", str(dest))
    assert proc.stdout.startswith(f"{dest}: complete (170 rows, 6 tasks)")
    assert "wait" not in proc.stdout


def test_a_dest_of_an_older_journal_learns_the_layout_hash_then_grows(tmp_path: Path) -> None:
    source, dest, full, array = _grown_source(tmp_path)
    path = journal_folder(dest) / "job.json"
    learnt = path.read_text()

    def as_an_older_relu_dask_wrote_it() -> None:
        record = json.loads(learnt)
        for entry in record["fingerprint"]["arrays"]:
            del entry["layout_sha256"], entry["settled_sha256"]
        del record["edge_blocks"], record["append_axis"]
        path.write_text(json.dumps(record))

    as_an_older_relu_dask_wrote_it()
    assert relu_dask.run(source, dest, chunks=(32, 32)).outcome == "already complete"
    assert json.loads(path.read_text())["fingerprint"] == json.loads(learnt)["fingerprint"]  # learnt the hash
    as_an_older_relu_dask_wrote_it()
    _grow(array, full, 120)
    with pytest.raises(DestinationExistsError, match=r"changed \(shape, metadata_sha256, chunk_samples\)"):
        relu_dask.run(source, dest, chunks=(32, 32))
    record = json.loads(learnt)
    del record["edge_blocks"]  # learnt on a complete DEST: no counts of the old edge block row
    path.write_text(json.dumps(record))
    grown = relu_dask.run(source, dest, chunks=(32, 32))
    assert grown.arrays[0].grown_from == [100, 32]
    assert grown.arrays[0].blocks_kept == 0  # so every block is redone, once
    assert np.array_equal(read_mask(dest), oracle(full[:120]))


def test_a_grown_zarr_array_opens_as_zarr_wrote_it(tmp_path: Path) -> None:
    """DEST's mask array grows through zarr's public ``resize``: zarr reads it back whole."""
    source, dest, full, array = _grown_source(tmp_path)
    _grow(array, full, 133)
    relu_dask.run(source, dest, chunks=(32, 32))
    mask = zarr.open_array(dest, mode="r")
    assert mask.shape == (133, 32)
    assert np.array_equal(mask[...], oracle(full[:133]))


# The writer starts appending once the follow's first pass is recorded: a first run that lands
# inside an append can take the old edge chunk row before zarr rewrote it (issue 26).
WRITER = """
import json, sys, time
from pathlib import Path
import numpy as np, zarr
array = zarr.open_array(sys.argv[1], mode="r+")
full = np.load(sys.argv[2])
record, end = Path(sys.argv[3]), time.monotonic() + 120
while time.monotonic() < end and not (record.exists() and json.loads(record.read_text() or "{}").get("complete")):
    time.sleep(0.05)
for stop in map(int, sys.argv[4:]):
    time.sleep(0.4)
    array.append(full[array.shape[0]:stop])  # zarr grows the shape first, then writes the chunks
"""


def _stop(proc: subprocess.Popen[str], sig: signal.Signals) -> tuple[str, str]:
    """Stop a follow with ``sig``; what it printed."""
    proc.send_signal(sig)
    return proc.communicate(timeout=60)


def _started(*command: str) -> subprocess.Popen[str]:
    """``command`` started, its output read when it ends (:func:`_stop`)."""
    return subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())


def _wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    """Until ``path`` exists (up to 120 s), ``proc`` still running meanwhile."""
    _wait_until(path.exists, proc)


def _wait_until(condition: Callable[[], object], proc: subprocess.Popen[str]) -> None:
    """Until ``condition()`` is true (up to 120 s), ``proc`` still running meanwhile."""
    end = time.monotonic() + 120
    while not condition():
        assert proc.poll() is None and time.monotonic() < end, proc.communicate()
        time.sleep(0.01)


def _record(dest: Path) -> dict[str, Any]:
    try:
        return json.loads((journal_folder(dest) / "job.json").read_text())
    except (OSError, ValueError):
        return {}


@pytest.mark.parametrize(
    ("scheduler", "sig"),
    [("threads", signal.SIGTERM), ("local", signal.SIGTERM), ("threads", signal.SIGINT)],
    ids=["threads-SIGTERM", "local-SIGTERM", "threads-Ctrl-C"],
)
def test_follow_masks_every_row_a_live_writer_appends_and_stops_cleanly(
    tmp_path: Path, scheduler: str, sig: signal.Signals
) -> None:
    full = activations((400, 64), seed=12)
    np.save(tmp_path / "full.npy", full)
    source, dest = tmp_path / "acts.zarr", tmp_path / "masks.zarr"
    write_zarr(source, full[:50], (16, 32))
    stops = ["83", "140", "141", "260", "333"]  # uneven, most of them off the chunk edge
    record = journal_folder(dest) / "job.json"
    writer = subprocess.Popen([PYTHON, "-c", WRITER, str(source), str(tmp_path / "full.npy"), str(record), *stops])
    report = tmp_path / "report.json"
    args = (
        "--chunks",
        "32,64",
        "--stats",
        "--scheduler",
        scheduler,
        "--dashboard-address",
        ":0",
        "--report",
        str(report),
    )
    proc = _started(PYTHON, "-m", "relu_dask", "run", str(source), str(dest), "--follow", "0.3", *args)
    try:
        assert writer.wait(timeout=120) == 0
        end = time.monotonic() + 120
        while not (_record(dest).get("complete") and _record(dest)["fingerprint"]["arrays"][0]["shape"][0] == 333):
            assert proc.poll() is None and time.monotonic() < end, proc.communicate()
            time.sleep(0.1)
        assert (journal_folder(dest) / "lock").exists()  # held between passes too
        link = json.loads(report.read_text())["dashboard_link"]  # the last pass's report
        if scheduler == "local":  # the dashboard is still served, by the cluster the first pass started
            with urllib.request.urlopen(link, timeout=30) as page:
                assert page.status == 200
        else:
            assert link is None
        out, err = _stop(proc, sig)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"follow ended (stopped by {sig.name}): 333 rows done, 0 behind SOURCE" in out, err
    assert "rows done" in err  # a progress line at each check
    assert not (journal_folder(dest) / "lock").exists()
    assert np.array_equal(read_mask(dest), oracle(full[:333]))
    fresh = relu_dask.run(source, tmp_path / "fresh.zarr", chunks=(32, 64), stats=True)
    assert dest_files(dest) == dest_files(tmp_path / "fresh.zarr")
    assert json.loads(cli("status", str(dest), "--json").stdout)["rows"] == {"": 333}
    assert fresh.arrays[0].num_ones == int(oracle(full[:333]).sum())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_follow_stopped_between_passes_says_the_rows_behind_as_they_are_then(
    tmp_path: Path, sig: signal.Signals
) -> None:
    source, dest, full, array = _grown_source(tmp_path)
    proc = _started(PYTHON, "-m", "relu_dask", "run", str(source), str(dest), "--chunks", "32,32", "--follow", "600")
    try:
        _wait_for(journal_folder(dest) / "lock", proc)  # SOURCE read (100 rows), the first pass begun
        _grow(array, full, 164)  # during that pass or the wait for the next check, 600 s away
        other = cli("run", str(source), str(dest), "--chunks", "32,32")  # another run meanwhile: told why
        assert other.returncode == 3
        assert "is kept up to date by a relu-dask follow" in other.stderr and "stop it (SIGTERM" in other.stderr
        _wait_until(lambda: _record(dest).get("complete"), proc)  # between passes: the first one recorded
        out, err = _stop(proc, sig)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"follow ended (stopped by {sig.name}): 100 rows done, 64 behind SOURCE" in out
    status = json.loads(cli("status", str(dest), "--json").stdout)
    assert (status["rows"], status["rows_waiting"]) == ({"": 100}, {"": 64})


# ``relu-dask`` itself, with a garbage collection of the main thread that takes 3 s once armed:
# a signal that comes meanwhile has its handler's exception raised inside gc's callback, where
# Python prints it as "ignored" and drops it (as inside any weakref callback or __del__).
SLOW_COLLECTION = """
import gc, sys, threading, time
from pathlib import Path
arm, inside = Path(sys.argv[1]), Path(sys.argv[2])
def slow(phase, info):
    if phase == "start" and threading.current_thread() is threading.main_thread():
        if arm.exists() and not inside.exists():
            inside.touch()
            time.sleep(3)
gc.callbacks.append(slow)
from relu_dask.__main__ import main
sys.argv = ["relu-dask", *sys.argv[3:]]
sys.exit(main())
"""


def test_a_follow_stopped_while_the_stop_is_dropped_on_the_way_still_stops(tmp_path: Path) -> None:
    """SIGTERM while the main thread runs a gc callback: the handler's StopRequested is dropped
    there; the follow still ends, soon and cleanly (it slept until the next check, 600 s away)."""
    source, dest, _, _ = _grown_source(tmp_path)
    arm, inside = tmp_path / "arm", tmp_path / "inside"
    args = ["run", str(source), str(dest), "--chunks", "32,32", "--follow", "0.2"]
    proc = _started(PYTHON, "-c", SLOW_COLLECTION, str(arm), str(inside), *args)
    try:
        _wait_for(journal_folder(dest) / "lock", proc)
        arm.touch()
        _wait_for(inside, proc)  # the main thread collects garbage between two passes, or in one
        out, err = _stop(proc, signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Exception ignored" in err and "StopRequested" in err  # dropped where it was raised
    assert proc.returncode == 0, err
    assert "follow ended (stopped by SIGTERM): 100 rows done, 0 behind SOURCE" in out
    assert not (journal_folder(dest) / "lock").exists()


def test_a_run_whose_stop_is_dropped_on_the_way_stops_at_the_next_task_and_resumes(tmp_path: Path) -> None:
    """The same in a run: armed once it holds DEST's lock, the dropped stop is raised when the
    next task ends; the run stops as on any SIGTERM (exit 143, what is done recorded)."""
    x = activations((4096, 32), seed=13)
    source, dest = tmp_path / "acts.zarr", tmp_path / "masks.zarr"
    write_zarr(source, x, (8, 32))
    inside = tmp_path / "inside"
    args = ["run", str(source), str(dest), "--chunks", "8,32", "--scheduler", "threads"]
    proc = _started(PYTHON, "-c", SLOW_COLLECTION, str(journal_folder(dest) / "lock"), str(inside), *args)
    try:
        _wait_for(inside, proc)
        out, err = _stop(proc, signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Exception ignored" in err and "StopRequested" in err
    assert proc.returncode == 143, out + err
    assert "stopped by SIGTERM: " in err and " of 512 task(s) done" in err
    assert cli(*args).returncode == 0
    assert np.array_equal(read_mask(dest), oracle(x))


def test_follow_idle_ends_the_follow_with_exit_0(tmp_path: Path) -> None:
    source, dest, full, array = _grown_source(tmp_path)
    _grow(array, full, 120)
    proc = cli("run", str(source), str(dest), "--chunks", "32,32", "--follow", "0.2", "--follow-idle", "1")
    assert proc.returncode == 0, proc.stderr
    assert "(grown from 100x32; 3 block(s) kept)" in proc.stdout
    assert "follow ended (no growth for --follow-idle): 120 rows done, 0 behind SOURCE" in proc.stdout
    assert not (journal_folder(dest) / "lock").exists()
    assert np.array_equal(read_mask(dest), oracle(full[:120]))


def test_follow_is_refused_in_a_job_file_and_follow_idle_alone(tmp_path: Path) -> None:
    source, dest, _full, _array = _grown_source(tmp_path)
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(f'[[job]]\nsource = "{source}"\ndest = "{dest}"\nfollow = 5\n')
    proc = cli("run", "--config", str(jobs))
    assert proc.returncode == 2
    assert "follow keeps one job going" in proc.stderr
    proc = cli("run", str(source), str(dest), "--follow-idle", "5")
    assert (proc.returncode, proc.stderr.strip()) == (2, "relu-dask: error: --follow-idle needs --follow SECONDS")


def test_follow_from_python_returns_how_far_it_got(tmp_path: Path) -> None:
    source, dest, full, array = _grown_source(tmp_path)
    _grow(array, full, 133)
    passes: list[int] = []
    state = relu_dask.follow(
        source,
        dest,
        every_s=0.1,
        idle_s=0.5,
        on_pass=lambda report, now: passes.append(report.arrays[0].shape[0]),
        chunks=(32, 32),
        stats=True,
    )
    assert (state.stopped_by, state.rows_done, state.rows_behind, passes) == ("idle", 133, 0, [133])
    assert state.reports[0].arrays[0].grown_from == [100, 32]
    assert np.array_equal(read_mask(dest), oracle(full[:133]))


def test_stats_first_asked_after_growth_are_counted_whole(tmp_path: Path) -> None:
    """The first run counted no units: the grown run counts the kept blocks' from DEST's masks."""
    source, dest, full, array = _grown_source(tmp_path)  # made without --stats
    _grow(array, full, 170)
    grown = relu_dask.run(source, dest, chunks=(32, 32), stats=True)
    assert grown.arrays[0].blocks_kept == 3
    _same_as_fresh(source, dest, tmp_path, grown, chunks=(32, 32), stats=True)


def test_append_axis_in_a_job_file(tmp_path: Path) -> None:
    source, dest, full, array = _grown_source(tmp_path)
    _grow(array, full, 140)
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(f'[[job]]\nsource = "{source}"\ndest = "{dest}"\nchunks = [32, 32]\nappend_axis = "none"\n')
    proc = cli("run", "--config", str(jobs))
    assert proc.returncode == 2
    assert "holds another job" in proc.stderr
    jobs.write_text(f'[[job]]\nsource = "{source}"\ndest = "{dest}"\nchunks = [32, 32]\nappend_axis = 0\n')
    proc = cli("run", "--config", str(jobs))
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(read_mask(dest), oracle(full[:140]))


def test_a_nan_in_appended_rows_with_nan_error_keeps_dest(tmp_path: Path) -> None:
    full = activations((200, 32), seed=13)
    full[0, :8] = 1.0  # no NaN in the first rows ...
    full[150, 3] = np.nan  # ... one in the appended ones
    source, dest = tmp_path / "acts.zarr", tmp_path / "masks.zarr"
    array = write_zarr(source, full[:100], (16, 16))
    relu_dask.run(source, dest, chunks=(32, 32), nan="error")
    before = chunk_files(dest)
    _grow(array, full, 200)
    proc = cli("run", str(source), str(dest), "--chunks", "32,32", "--nan", "error")
    assert proc.returncode == 2
    assert "holds NaN in chunk (9, 0)" in proc.stderr
    assert f"DEST {dest} keeps the masks of the rows before" in proc.stderr
    assert np.array_equal(read_mask(dest)[:96], oracle(full[:96]))  # the blocks before the old edge
    assert all(chunk_files(dest).get(k) == v for k, v in before.items() if not k.startswith("c/6/"))


def test_a_kill_after_complete_then_growth_redoes_the_cut_short_block(tmp_path: Path) -> None:
    """A kill between ``complete`` and the markers' removal leaves markers: growth trusts none of them."""
    full = activations((150, 32), seed=14)
    source, dest = tmp_path / "acts.zarr", tmp_path / "masks.zarr"
    array = write_zarr(source, full[:100], (16, 16))
    kill_at_step("complete", "run", str(source), str(dest), "--chunks", "32,32", "--scheduler", "synchronous")
    assert _markers(dest) == 4
    _grow(array, full, 150)
    grown = relu_dask.run(source, dest, chunks=(32, 32))
    assert grown.arrays[0].tasks_skipped == 0
    _same_as_fresh(source, dest, tmp_path, grown, chunks=(32, 32))


def test_a_run_between_a_writers_resize_and_its_write_leaves_the_new_rows_for_the_next(tmp_path: Path) -> None:
    source, dest, full, array = _grown_source(tmp_path)
    array.resize((110, 32))  # zarr's append: the shape first ...
    between = relu_dask.run(source, dest, chunks=(32, 32))  # ... a run lands here (and waits --settle-time) ...
    assert (between.outcome, between.arrays[0].shape) == ("already complete", [100, 32])
    array[100:110] = full[100:110]  # ... then the chunks
    assert json.loads(cli("status", str(dest), "--json").stdout)["rows_waiting"] == {"": 10}
    grown = relu_dask.run(source, dest, chunks=(32, 32))
    assert grown.arrays[0].grown_from == [100, 32]
    _same_as_fresh(source, dest, tmp_path, grown, chunks=(32, 32))


def test_a_run_waits_up_to_the_settle_time_for_a_writer_mid_append(tmp_path: Path) -> None:
    """The writer finishes its append within ``settle_s``: the run takes the new rows."""
    import threading

    source, dest, full, array = _grown_source(tmp_path)
    array.resize((110, 32))  # the shape first ...
    writer = threading.Timer(0.5, lambda: array.__setitem__(slice(100, 110), full[100:110]))  # ... the chunks later
    writer.start()
    try:
        grown = relu_dask.run(source, dest, chunks=(32, 32), settle_s=60)
    finally:
        writer.join()
    assert grown.arrays[0].grown_from == [100, 32]
    assert grown.arrays[0].shape == [110, 32]
    assert not grown.warnings
    assert np.array_equal(read_mask(dest), oracle(full[:110]))


@pytest.mark.parametrize(
    ("args", "env", "said"),
    [
        (("--settle-time", "-1"), {}, "--settle-time must be 0 or more seconds, got -1.0"),
        (("--settle-time", "inf"), {}, "--settle-time must be 0 or more seconds, got inf"),
        ((), {"RELU_DASK_SETTLE_TIME": "soon"}, "RELU_DASK_SETTLE_TIME must be 0 or more seconds, got 'soon'"),
    ],
)
def test_a_bad_settle_time_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...], env: dict[str, str], said: str
) -> None:
    source, dest, _full, _array = _grown_source(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    proc = cli("run", str(source), str(dest), *args)
    assert (proc.returncode, proc.stderr.strip()) == (2, f"relu-dask: error: {said}")


def test_a_run_between_two_variables_of_an_xarray_append_waits_for_both(tmp_path: Path) -> None:
    xr = pytest.importorskip("xarray")
    full = activations((150, 32), seed=15)
    source, dest = tmp_path / "acts.zarr", tmp_path / "masks.zarr"
    ds = xr.Dataset({"relu_in": (("step", "unit"), full[:90])}, coords={"step": np.arange(90), "unit": np.arange(32)})
    encoding = {"relu_in": {"chunks": (16, 32)}, "step": {"chunks": (16,)}}
    ds.to_zarr(source, mode="w", zarr_format=3, encoding=encoding, consolidated=False)
    relu_dask.run(source, dest, chunks=(32, 32))
    group = zarr.open_group(source, mode="a")  # xarray's append_dim, one variable after the other:
    group["relu_in"].resize((120, 32))
    group["relu_in"][90:120] = full[90:120]
    between = relu_dask.run(source, dest, chunks=(32, 32))  # a run lands between the two
    assert between.arrays[0].shape == [90, 32]
    assert xr.open_zarr(dest)["step"].shape == (90,)  # DEST stays one consistent Dataset
    group["step"].resize((120,))
    group["step"][90:120] = np.arange(90, 120)
    grown = relu_dask.run(source, dest, chunks=(32, 32))
    assert grown.arrays[0].grown_from == [90, 32]
    _same_as_fresh(source, dest, tmp_path, grown, chunks=(32, 32))


def test_an_unchanged_array_kept_whole_while_stats_change_axis_then_grown(tmp_path: Path) -> None:
    """The last block row's counts kept for an array no task ran on are dropped when the
    per-unit ones are counted along another axis (or first asked for) meanwhile."""
    fx, fy = activations((300, 32), seed=1), activations((300, 32), seed=2)
    source, dest = tmp_path / "acts.zarr", tmp_path / "masks.zarr"
    x = write_zarr(source, fx[:100], (16, 16), name="x")
    y = write_zarr(source, fy[:100], (16, 16), name="y")
    relu_dask.run(source, dest, chunks=(32, 32), stats=True, unit_axis=0)
    _grow(y, fy, 150)
    relu_dask.run(source, dest, chunks=(32, 32), stats=True, unit_axis=-1)  # x: kept whole, units recounted
    _grow(x, fx, 170)
    grown = relu_dask.run(source, dest, chunks=(32, 32), stats=True, unit_axis=-1)
    _same_as_fresh(source, dest, tmp_path, grown, chunks=(32, 32), stats=True, unit_axis=-1)


def test_status_rows_along_a_negative_append_axis_beside_a_scalar(tmp_path: Path) -> None:
    source, dest = tmp_path / "acts.zarr", tmp_path / "masks.zarr"
    write_zarr(source, activations((100, 32), seed=1), (16, 16), name="x")
    write_zarr(source, np.array(1.5, dtype="float32"), (), name="scalar")
    relu_dask.run(source, dest, append_axis=-1)
    proc = cli("status", str(dest))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{dest}: complete (32 rows, 2 tasks)")


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("--follow", "5", "--verify"), "--verify checks a finished DEST"),
        (("--follow", "inf"), "--follow and --follow-idle take a positive number of seconds"),
        (("--follow", "1", "--follow-idle", "0"), "--follow and --follow-idle take a positive number of seconds"),
    ],
)
def test_follow_options_that_cannot_work_are_refused(tmp_path: Path, args: tuple[str, ...], said: str) -> None:
    source, dest, _full, _array = _grown_source(tmp_path)
    proc = cli("run", str(source), str(dest), *args)
    assert proc.returncode == 2
    assert said in proc.stderr


def test_coordinates_are_checked_against_their_own_groups_dimensions(tmp_path: Path) -> None:
    """Two Datasets in subgroups, each with its own ``step``: each is checked on its own."""
    xr = pytest.importorskip("xarray")
    from relu_dask import storage
    from relu_dask.livewriter import _written
    from relu_dask.locations import parse_location

    source = tmp_path / "acts.zarr"
    for group, rows in (("train", 100), ("eval", 30)):
        ds = xr.Dataset({"relu_in": (("step", "unit"), activations((rows, 8)))}, coords={"step": np.arange(rows)})
        ds.to_zarr(source, group=group, mode="a", zarr_format=3, consolidated=False)
    contents = storage.open_source(parse_location(source))
    assert _written(contents, (0, 0), {}) == (
        {"eval/relu_in": 30, "train/relu_in": 100},
        {"eval/step": 30, "train/step": 100},
    )
    zarr.open_group(source, mode="a")["eval/step"].resize((20,))  # as if its append were half done
    contents = storage.open_source(parse_location(source))
    assert _written(contents, (0, 0), {})[0] == {"eval/relu_in": 20, "train/relu_in": 100}


def test_appended_rows_with_a_chunk_all_fill_value_are_taken_by_the_next_run(tmp_path: Path) -> None:
    """zarr never stores such a chunk: it looks unwritten once, and SOURCE unchanged says it is not."""
    source, dest, full, array = _grown_source(tmp_path)
    full[112:128, 16:] = 0  # a whole chunk of the appended rows equal to the fill value
    _grow(array, full, 160)
    journal = snapshot(journal_folder(dest))
    planned = relu_dask.run(source, dest, chunks=(32, 32), dry_run=True)
    assert planned.arrays[0].shape == [112, 32]
    assert snapshot(journal_folder(dest)) == journal  # a plan writes nothing, not even what it held back
    first = relu_dask.run(source, dest, chunks=(32, 32))
    assert first.arrays[0].shape == [112, 32]  # up to the chunk row that lacks a chunk
    assert any("112x32 processed of 160x32" in w for w in first.warnings)
    second = relu_dask.run(source, dest, chunks=(32, 32))
    assert second.arrays[0].grown_from == [112, 32]
    _same_as_fresh(source, dest, tmp_path, second, chunks=(32, 32))


def test_a_chunk_written_after_two_runs_took_it_as_fill_is_refused_with_what_to_do(tmp_path: Path) -> None:
    """A writer slower than the settle time and the time between two runs: the chunk it had
    not yet written is the fill value by then, and its late write is a rewrite DEST refuses."""
    source, dest, full, array = _grown_source(tmp_path)
    array.resize((160, 32))
    array[100:160] = full[100:160]
    late = full[112:128, 16:32].copy()
    array[112:128, 16:32] = 0  # the writer has not written this chunk yet: zarr deletes it
    args = ("run", str(source), str(dest), "--chunks", "32,32")
    assert cli(*args).returncode == 0  # held back once
    assert cli(*args).returncode == 0  # then taken as the fill value it is
    array[112:128, 16:32] = late  # the writer wakes up
    proc = cli(*args)
    assert proc.returncode == 2
    assert "written after a run took it, missing, as the fill value" in proc.stderr
    assert "--settle-time" in proc.stderr and "pass --overwrite" in proc.stderr
    fixed = cli(*args, "--overwrite")
    assert fixed.returncode == 0, fixed.stderr
    assert np.array_equal(read_mask(dest), oracle(full[:160]))


def test_an_all_fill_chunk_holds_rows_back_once_while_source_keeps_growing(tmp_path: Path) -> None:
    """SOURCE grows again before the next run: the chunk still missing since the last run's
    hold is all fill value, and DEST moves on (it stayed at 112 rows for ever before)."""
    source, dest, full, array = _grown_source(tmp_path)
    full = np.concatenate([full, activations((200, 32), seed=30)])
    full[112:128, 16:] = 0  # zarr stores no chunk for these appended rows
    _grow(array, full, 144)
    first = relu_dask.run(source, dest, chunks=(32, 32))
    assert first.arrays[0].shape == [112, 32]  # held back once: it may be a writer mid-append
    rows = [first.arrays[0].shape[0]]
    for stop in (176, 208, 240, 272):  # a training job appends between every two runs
        _grow(array, full, stop)
        rows.append(relu_dask.run(source, dest, chunks=(32, 32)).arrays[0].shape[0])
    assert rows == [112, 176, 208, 240, 272]
    assert np.array_equal(read_mask(dest), oracle(full[:272]))
    assert json.loads(cli("status", str(dest), "--json").stdout)["rows_waiting"] == {}


def test_an_xarray_append_with_an_all_nan_chunk_holds_the_dataset_back_once(tmp_path: Path) -> None:
    """xarray's fill value for floats is NaN: an all-NaN chunk is not stored. fc2 shares the
    dimension, and follows fc1."""
    xr = pytest.importorskip("xarray")
    fc1, fc2 = activations((120, 16), seed=31), activations((120, 8), seed=32)
    fc1[56:64] = np.nan

    def dataset(start: int, stop: int) -> Any:
        return xr.Dataset(
            {"fc1": (("step", "unit"), fc1[start:stop]), "fc2": (("step", "u2"), fc2[start:stop])},
            coords={"step": np.arange(start, stop)},
        )

    source, dest = tmp_path / "acts.zarr", tmp_path / "masks.zarr"
    encoding = {"fc1": {"chunks": (8, 16)}, "fc2": {"chunks": (8, 8)}, "step": {"chunks": (8,)}}
    dataset(0, 40).to_zarr(source, mode="w", zarr_format=3, encoding=encoding, consolidated=False)
    relu_dask.run(source, dest)
    steps, previous = [], 40
    for stop in (72, 88, 104, 120):  # 16 steps appended between two runs, as a training job does
        dataset(previous, stop).to_zarr(source, append_dim="step", consolidated=False)
        previous = stop
        report = relu_dask.run(source, dest)
        steps.append([a.shape[0] for a in report.arrays])
    assert steps[0] == [56, 56]  # held back once, both variables
    assert steps[1:] == [[88, 88], [104, 104], [120, 120]]
    masks = xr.open_zarr(dest)
    assert np.array_equal(masks["fc1"].values, oracle(fc1))
    assert np.array_equal(masks["fc2"].values, oracle(fc2))
    assert np.array_equal(masks["step"].values, np.arange(120))


def test_a_first_run_beside_a_writer_mid_append_leaves_its_rows_for_the_next(tmp_path: Path) -> None:
    xr = pytest.importorskip("xarray")
    full = activations((16, 8), seed=16)
    source, dest = tmp_path / "acts.zarr", tmp_path / "masks.zarr"
    ds = xr.Dataset({"x": (("step", "unit"), full[:8])}, coords={"step": np.arange(8)})
    ds.to_zarr(
        source,
        mode="w",
        zarr_format=3,
        encoding={"x": {"chunks": (4, 8)}, "step": {"chunks": (4,)}},
        consolidated=False,
    )
    group = zarr.open_group(source, mode="a")
    group["x"].resize((12, 8))  # the writer has grown x, and written nothing yet
    first = relu_dask.run(source, dest)
    assert first.arrays[0].shape == [8, 8]
    assert dict(xr.open_zarr(dest).sizes) == {"step": 8, "unit": 8}
    group["x"][8:12] = full[8:12]
    group["step"].resize((12,))
    group["step"][8:12] = np.arange(8, 12)
    second = relu_dask.run(source, dest)
    assert second.arrays[0].grown_from == [8, 8]
    _same_as_fresh(source, dest, tmp_path, second)


def _two_variables(tmp_path: Path) -> tuple[Any, np.ndarray, np.ndarray, Path, Path]:
    """xarray, and a Dataset of two variables a and b along one dimension step (12 of their 16
    rows written), its store and DEST's place."""
    xr = pytest.importorskip("xarray")
    a, b = activations((16, 8), seed=17), activations((16, 8), seed=18)
    source, dest = tmp_path / "acts.zarr", tmp_path / "masks.zarr"
    ds = xr.Dataset({"a": (("step", "unit"), a[:12]), "b": (("step", "unit"), b[:12])}, coords={"step": np.arange(12)})
    ds.to_zarr(
        source, mode="w", zarr_format=3, encoding={"a": {"chunks": (4, 8)}, "b": {"chunks": (4, 8)}}, consolidated=False
    )
    return xr, a, b, source, dest


def test_two_variables_of_one_dataset_are_taken_as_long_as_the_shorter(tmp_path: Path) -> None:
    xr, a, b, source, dest = _two_variables(tmp_path)
    relu_dask.run(source, dest)
    group = zarr.open_group(source, mode="a")
    group["b"].resize((16, 8))  # xarray appends b first, then step, then a
    group["b"][12:16] = b[12:16]
    between = relu_dask.run(source, dest)
    assert [e.shape for e in between.arrays] == [[12, 8], [12, 8]]
    assert dict(xr.open_zarr(dest).sizes) == {"step": 12, "unit": 8}
    group["step"].resize((16,))
    group["step"][12:16] = np.arange(12, 16)
    group["a"].resize((16, 8))
    group["a"][12:16] = a[12:16]
    grown = relu_dask.run(source, dest)
    assert [e.grown_from for e in grown.arrays] == [[12, 8], [12, 8]]
    _same_as_fresh(source, dest, tmp_path, grown)


def test_of_two_variables_sharing_a_dimension_one_that_alone_grew_is_taken_by_the_next_run(tmp_path: Path) -> None:
    _, a, b, source, dest = _two_variables(tmp_path)
    args = ("run", str(source), str(dest), "--verify")
    assert cli(*args).returncode == 0
    group = zarr.open_group(source, mode="a")
    group["b"].resize((16, 8))  # b alone grows, and a never does
    group["b"][12:16] = b[12:16]
    held = cli(*args)
    assert held.returncode == 1 and "b: rows 12 to 16 still look half-written" in held.stderr  # said, not exit 0
    taken = cli(*args)  # b has not changed since: taken as it is, at its own pace
    assert taken.returncode == 0, taken.stderr
    assert "SOURCE has grown: b from (12, 8) to (16, 8)" in taken.stderr
    assert np.array_equal(read_mask(dest, "b"), oracle(b))
    assert np.array_equal(read_mask(dest, "a"), oracle(a[:12]))
    assert "complete (rows: a 12, b 16" in cli("status", str(dest)).stdout


def test_a_static_source_whose_last_chunk_row_holds_an_unstored_chunk(tmp_path: Path) -> None:
    """Zero padding in the last rows: the first run cannot tell it from a writer mid-append, so
    it leaves those rows, and ``run --verify`` says so (exit 1), never "verified"; the second
    run takes them as the fill value they are."""
    x = activations((100, 32), seed=33)
    x[96:, 16:] = 0  # chunk c/6/1 equals the fill value: zarr does not store it
    source, dest = tmp_path / "acts.zarr", tmp_path / "masks.zarr"
    write_zarr(source, x, (16, 16))
    assert not (source / "c" / "6" / "1").exists()
    args = ("run", str(source), str(dest), "--scheduler", "synchronous", "--verify", "--report", str(tmp_path / "r"))
    first = cli(*args)
    assert first.returncode == 1, first.stderr
    assert f"{dest}: not complete: 4 more rows of SOURCE looked half-written" in first.stdout
    assert f"{dest}: verified" not in first.stdout
    assert json.loads((tmp_path / "r").read_text())["arrays"][0]["rows_waiting"] == 4
    second = cli(*args)
    assert second.returncode == 0, second.stdout
    assert f"{dest}: verified" in second.stdout
    assert np.array_equal(read_mask(dest), oracle(x))
    assert json.loads((tmp_path / "r").read_text())["arrays"][0]["rows_waiting"] == 0


def test_an_old_chunk_rewritten_while_source_grew_is_found_though_not_sampled(tmp_path: Path) -> None:
    """16 chunks are sampled of 100: the one rewritten (c/0/1) is not among them. The listing of
    every chunk of the whole chunk rows finds it."""
    full = activations((420, 64), seed=34)
    source, dest = tmp_path / "acts.zarr", tmp_path / "masks.zarr"
    array = write_zarr(source, full[:400], (16, 16))
    first = relu_dask.run(source, dest, chunks=(64, 64))
    sampled = {
        key
        for key, *_ in json.loads((journal_folder(dest) / "job.json").read_text())["fingerprint"]["arrays"][0][
            "chunk_samples"
        ]
    }
    assert "c/0/1" not in sampled and first.outcome == "done"
    time.sleep(0.01)  # a new mtime for the rewritten chunk
    _grow(array, full, 420)
    array[0:16, 16:32] = -full[0:16, 16:32]
    before = snapshot(dest)
    with pytest.raises(DestinationExistsError, match=r"a chunk of its first 400 rows along axis 0 was rewritten"):
        relu_dask.run(source, dest, chunks=(64, 64))
    assert snapshot(dest) == before


def test_a_small_array_grown_many_times_reads_its_old_rows_at_most_once_more(tmp_path: Path) -> None:
    """A first run of one block row (auto blocks cover a small array whole) is redone once;
    from then on each growth reads the new rows plus at most one block row, as docs say."""
    full = activations((640, 64), seed=21)
    source, dest = tmp_path / "acts.zarr", tmp_path / "masks.zarr"
    array = write_zarr(source, full[:100], (16, 64))
    first = relu_dask.run(source, dest, stats=True)
    assert first.arrays[0].num_tasks == 1  # the whole array in one block
    read, old_rows, old_block_rows = [], 100, 100
    for rows in (150, 230, 300, 420, 500, 640):
        _grow(array, full, rows)
        grown = relu_dask.run(source, dest, stats=True)
        entry = grown.arrays[0]
        assert entry.grown_from == [old_rows, 64]
        read.append(entry.bytes_read // (64 * 4))
        # the new rows, and at most the one block row of the old edge
        assert read[-1] <= rows - old_rows + old_block_rows, (rows, read)
        block_rows = json.loads((journal_folder(dest) / "job.json").read_text())["block_shapes"][0][0]
        assert block_rows <= max(16, old_rows // 16 * 16)  # so the next growth keeps the rest
        assert np.array_equal(read_mask(dest), oracle(full[:rows]))
        old_rows, old_block_rows = rows, block_rows
    assert sum(read) <= 640 + 100 + 6 * 96, read  # the new rows, the first run once more, an edge block row each
    _same_as_fresh(source, dest, tmp_path, grown, stats=True)
