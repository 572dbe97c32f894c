"""Batch jobs that survive: kill and resume, one writer at a time, job files, status, JSON logs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from _support import (
    activations,
    chunk_files,
    cli,
    files_under,
    journal_folder,
    oracle,
    read_mask,
    snapshot,
    start_cli,
    write_zarr,
)

from relu_dask import journal
from relu_dask.locations import parse_location

#: 96 tasks of one 512 x 2048 float32 chunk each: long enough to be killed part way.
SHAPE, CHUNK = (96 * 512, 2048), (512, 2048)
TASKS = ("--chunks", "512,2048")


@pytest.fixture(scope="module")
def big_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A source with many tasks, and the masks of an uninterrupted run of it."""
    folder = tmp_path_factory.mktemp("batch")
    rng = np.random.default_rng(3)
    x = rng.standard_normal(SHAPE, dtype=np.float32)
    x[: SHAPE[0] // 8] = -1.0  # all-negative blocks: their masks are never stored as chunks
    write_zarr(folder / "src.zarr", x, CHUNK)
    reference = folder / "reference.zarr"
    proc = cli("run", str(folder / "src.zarr"), str(reference), "--scheduler", "synchronous", *TASKS)
    assert proc.returncode == 0, proc.stderr
    return folder / "src.zarr", reference


def markers(dest: Path) -> int:
    folder = journal_folder(dest) / "done" / "0"
    return len([p for p in folder.iterdir() if not p.name.startswith(".")]) if folder.is_dir() else 0


def partial_files(dest: Path) -> list[Path]:
    """The half-written chunk files in DEST, looked for while a run may be deleting its folders."""
    return [p for p in files_under(dest) if p.name.endswith(".partial")]


def wait_until_stopped(pid: int) -> None:
    """A signal is delivered asynchronously: wait until the process is really stopped, every
    thread of it (the main thread shows stopped while a worker thread may still be finishing
    a chunk write, and rename its temporary file away after it was seen)."""
    for _ in range(10_000):
        if all(state in "tT" for state in _thread_states(pid)):
            return
        time.sleep(0.0005)
    raise AssertionError(f"process {pid} did not stop")


def _thread_states(pid: int) -> list[str]:
    """The state letter of each thread of ``pid`` (Linux: ``/proc/PID/task/TID/stat``)."""
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
        states.append(stat.rsplit(")", 1)[1].split()[0])
    return states


def wait_for(condition, proc: subprocess.Popen[str], timeout: float = 120) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    return False


def kill_and_resume(source: Path, reference: Path, dest: Path, kill_when) -> tuple[int, dict]:  # type: ignore[no-untyped-def]
    """Start a run, SIGKILL it when ``kill_when(dest)`` holds, rerun it; return done-at-kill and the report."""
    args = ("run", str(source), str(dest), "--scheduler", "threads", "--progress", "none", *TASKS)
    proc = start_cli(*args)
    assert wait_for(lambda: kill_when(dest), proc), "the run ended before the kill point"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done_at_kill = markers(dest)
    report_path = dest.parent / f"{dest.name}.report.json"
    again = cli(*args, "--report", str(report_path))
    assert again.returncode == 0, again.stderr
    assert chunk_files(dest) == chunk_files(reference)
    x = np.asarray(__import__("zarr").open_array(str(source), mode="r")[...])
    assert np.array_equal(read_mask(dest), oracle(x))
    assert partial_files(dest) == []
    return done_at_kill, json.loads(report_path.read_text())


@pytest.mark.parametrize(
    "point",
    ["early", "middle", "late"],
)
def test_sigkill_then_rerun_redoes_only_missing_tasks(
    big_source: tuple[Path, Path], tmp_path: Path, point: str
) -> None:
    source, reference = big_source
    threshold = {"early": 1, "middle": 40, "late": 85}[point]
    done_at_kill, report = kill_and_resume(source, reference, tmp_path / "out.zarr", lambda d: markers(d) >= threshold)
    assert done_at_kill >= threshold
    assert report["tasks_skipped"] == done_at_kill
    assert report["tasks_done_now"] == 96 - done_at_kill
    assert report["num_tasks"] == 96
    assert report["outcome"] == "done"
    # counts cover the whole array, resumed tasks included
    assert report["arrays"][0]["num_elements"] == SHAPE[0] * SHAPE[1]


def test_sigkill_during_a_chunk_write(big_source: tuple[Path, Path], tmp_path: Path) -> None:
    """Stop the process while zarr's temporary chunk file exists, then kill it there."""
    source, reference = big_source
    dest = tmp_path / "out.zarr"
    args = ("run", str(source), str(dest), "--scheduler", "threads", "--progress", "none", *TASKS)
    for _attempt in range(20):
        proc = start_cli(*args)
        caught = False
        while proc.poll() is None and not caught:
            if partial_files(dest):
                proc.send_signal(signal.SIGSTOP)  # freeze it, then check that it froze mid-write
                wait_until_stopped(proc.pid)
                caught = bool(partial_files(dest))
                if not caught:
                    proc.send_signal(signal.SIGCONT)
            time.sleep(0.0005)
        if caught:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            break
        proc.wait(timeout=60)  # finished before a write was caught: start again from nothing
        subprocess.run(["rm", "-rf", str(dest), str(journal_folder(dest))], check=True)
    else:
        pytest.fail("never caught a chunk write in progress in 20 runs")
    assert partial_files(dest), "the kill left a half-written chunk file behind"
    done_at_kill = markers(dest)
    again = cli(*args, "--report", str(tmp_path / "r.json"))
    assert again.returncode == 0, again.stderr
    assert "half-written file(s) removed" in again.stderr
    assert partial_files(dest) == []
    assert chunk_files(dest) == chunk_files(reference)
    assert json.loads((tmp_path / "r.json").read_text())["tasks_skipped"] == done_at_kill


def test_rerun_of_a_complete_job_is_a_quick_no_op(big_source: tuple[Path, Path], tmp_path: Path) -> None:
    source, reference = big_source
    dest = tmp_path / "out.zarr"
    assert cli("run", str(source), str(dest), *TASKS).returncode == 0
    before = chunk_files(dest)
    again = cli("run", str(source), str(dest), *TASKS, "--report", str(tmp_path / "r.json"))
    assert again.returncode == 0
    assert "already complete" in again.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["outcome"] == "already complete"
    assert report["tasks_done_now"] == 0
    assert report["bytes_read"] == 0
    assert chunk_files(dest) == before == chunk_files(reference)


def test_second_concurrent_run_gets_exit_3(big_source: tuple[Path, Path], tmp_path: Path) -> None:
    source, _ = big_source
    dest = tmp_path / "out.zarr"
    first = start_cli("run", str(source), str(dest), "--scheduler", "synchronous", "--progress", "none", *TASKS)
    try:
        assert wait_for(lambda: markers(dest) >= 1, first)
        first.send_signal(signal.SIGSTOP)  # hold it mid-run, lock taken, for as long as the test needs
        second = cli("run", str(source), str(dest), *TASKS)
        assert second.returncode == 3, second.stderr
        line = [ln for ln in second.stderr.splitlines() if ln.startswith("relu-dask: error:")]
        assert len(line) == 1
        assert f"in use by another relu-dask run, pid {first.pid} on {socket.gethostname()}" in line[0]
        status = cli("status", str(dest))
        assert f"running now: pid {first.pid}" in status.stdout
        assert "partial (" in status.stdout
    finally:
        first.send_signal(signal.SIGCONT)
        first.kill()
        first.wait(timeout=60)


def test_lock_of_a_dead_process_is_taken_over(big_source: tuple[Path, Path], tmp_path: Path) -> None:
    source, reference = big_source
    dest = tmp_path / "out.zarr"
    dead = subprocess.Popen(["true"])
    dead.wait()
    folder = journal_folder(dest)
    folder.mkdir(parents=True)
    (folder / "lock").write_text(
        json.dumps({"host": socket.gethostname(), "pid": dead.pid, "pid_started": 1.0, "started": time.time()})
    )
    proc = cli("run", str(source), str(dest), *TASKS)
    assert proc.returncode == 0, proc.stderr
    assert "took over the lock of a run that is no longer running" in proc.stderr
    assert f"pid {dead.pid}" in proc.stderr
    assert chunk_files(dest) == chunk_files(reference)
    assert not (folder / "lock").exists()


@pytest.mark.parametrize(("age_s", "code"), [(10, 3), (3600, 0)], ids=["fresh-heartbeat", "stale-heartbeat"])
def test_lock_from_another_host_is_judged_by_its_heartbeat(
    big_source: tuple[Path, Path], tmp_path: Path, age_s: float, code: int
) -> None:
    source, _ = big_source
    dest = tmp_path / "out.zarr"
    folder = journal_folder(dest)
    folder.mkdir(parents=True)
    lock = folder / "lock"
    lock.write_text(json.dumps({"host": "node-17.cluster", "pid": 4242, "pid_started": 1.0, "started": 0.0}))
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    proc = cli("run", str(source), str(dest), "--chunks", "64MiB")
    assert proc.returncode == code, proc.stderr
    if code == 3:
        assert "pid 4242 on node-17.cluster" in proc.stderr
        assert sorted(p.name for p in dest.rglob("*")) == [".relu-dask", "lock"]  # theirs, untouched
    else:
        assert "heartbeat is" in proc.stderr


def test_changed_source_is_refused_unless_overwrite(tmp_path: Path) -> None:
    x = activations((64, 32))
    write_zarr(tmp_path / "src.zarr", x, (16, 32))
    dest = tmp_path / "out.zarr"
    assert cli("run", str(tmp_path / "src.zarr"), str(dest)).returncode == 0
    time.sleep(0.01)  # a new mtime for the rewritten chunks
    import zarr

    zarr.open_array(str(tmp_path / "src.zarr"), mode="r+")[48:] = -x[48:]
    before = chunk_files(dest)
    proc = cli("run", str(tmp_path / "src.zarr"), str(dest))
    assert proc.returncode == 2
    assert (
        "holds another job (the source array changed (its chunk c/3/0 was rewritten since it was processed))"
        in proc.stderr
    )
    assert chunk_files(dest) == before
    proc = cli("run", str(tmp_path / "src.zarr"), str(dest), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(read_mask(dest), oracle(np.asarray(zarr.open_array(str(tmp_path / "src.zarr"))[...])))


def test_status_absent_partial_complete(big_source: tuple[Path, Path], tmp_path: Path) -> None:
    source, _ = big_source
    dest = tmp_path / "out.zarr"
    assert cli("status", str(dest)).stdout.strip() == f"{dest}: absent"
    proc = start_cli("run", str(source), str(dest), "--scheduler", "synchronous", *TASKS)
    assert wait_for(lambda: markers(dest) >= 5, proc)
    proc.kill()
    proc.wait(timeout=60)
    done = markers(dest)
    partial = cli("status", str(dest), "--json")
    data = json.loads(partial.stdout)
    assert (data["state"], data["tasks_done"], data["num_tasks"], data["running"]) == ("partial", done, 96, None)
    assert data["fingerprint"]["arrays"][0]["shape"] == list(SHAPE)
    assert cli("run", str(source), str(dest), "--chunks", "64MiB").returncode == 0  # resumes: same tasks
    complete = cli("status", str(dest))
    assert complete.stdout.startswith(f"{dest}: complete ({SHAPE[0]} rows, 96 tasks)")
    assert f"source: {source}" in complete.stdout


def test_job_file_runs_in_order_and_exits_with_the_worst_code(tmp_path: Path) -> None:
    write_zarr(tmp_path / "a.zarr", activations((10, 10), seed=1), (5, 5))
    write_zarr(tmp_path / "b.zarr", activations((12, 6), seed=2), (4, 6))
    (tmp_path / "jobs.toml").write_text(
        """
[defaults]
scheduler = "synchronous"
report = "reports-{name}.json"

[[job]]
source = "a.zarr"
dest = "a-masks.zarr"

[[job]]
name = "missing"
source = "nope.zarr"
dest = "nope-masks.zarr"

[[job]]
source = "b.zarr"
dest = "b-masks.zarr"
at_zero = 0
dest_chunks = [4, 3]
"""
    )
    proc = cli("run", "--config", str(tmp_path / "jobs.toml"), "--quiet")
    assert proc.returncode == 2
    assert "3 job(s) from" in proc.stdout and "worst exit code 2" in proc.stdout
    assert "job 1 a-masks: ok (exit 0)" in proc.stdout
    assert "job 2 missing: failed (exit 2)" in proc.stdout
    assert "job 3 b-masks: ok (exit 0)" in proc.stdout
    assert "nope.zarr does not exist" in proc.stderr
    assert np.array_equal(read_mask(tmp_path / "a-masks.zarr"), oracle(activations((10, 10), seed=1)))
    assert np.array_equal(read_mask(tmp_path / "b-masks.zarr"), oracle(activations((12, 6), seed=2), at_zero=0))
    report = json.loads((tmp_path / "reports-b-masks.json").read_text())
    assert report["rule"] == "x > 0"
    assert report["arrays"][0]["dest_chunk_shape"] == [4, 3]


def test_plan_with_a_job_file_plans_every_job_and_writes_nothing(tmp_path: Path) -> None:
    write_zarr(tmp_path / "a.zarr", activations((10, 10), seed=1), (5, 5))
    write_zarr(tmp_path / "b.zarr", activations((12, 6), seed=2), (4, 6))
    (tmp_path / "jobs.toml").write_text(
        '[[job]]\nsource = "a.zarr"\ndest = "a-masks.zarr"\n\n'
        '[[job]]\nsource = "b.zarr"\ndest = "b-masks.zarr"\nchunks = [4, 6]\n'
    )
    before = snapshot(tmp_path)
    proc = cli("plan", "--config", str(tmp_path / "jobs.toml"))
    assert proc.returncode == 0, proc.stderr
    assert "2 job(s) from" in proc.stdout and "job 1 a-masks: ok (exit 0)" in proc.stdout
    assert proc.stdout.count("planned: ") == 2
    assert "12x6 float32, blocks 4,6, 3 task(s)" in proc.stdout  # b, with its job's chunks
    assert proc.stdout.count("nothing written") == 2
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[[job]]\nsource = 'a'\n", "dest missing"),
        ("[[job]\n", "not valid TOML"),
        ("[other]\n", "unknown table"),
        ("[[job]]\nsource = 'a'\ndest = 'b'\ndest_chunk = [2, 2]\n", "unknown option(s) dest_chunk"),
    ],
    ids=["no-dest", "bad-toml", "unknown-table", "abbreviated-key"],
)
def test_bad_job_file_is_exit_2(tmp_path: Path, text: str, needle: str) -> None:
    (tmp_path / "jobs.toml").write_text(text)
    proc = cli("run", "--config", str(tmp_path / "jobs.toml"))
    assert proc.returncode == 2
    assert needle in proc.stderr


def test_json_logs_one_object_a_line(small_source: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    source, _ = small_source
    proc = cli(
        "run",
        str(source),
        str(tmp_path / "out.zarr"),
        "--log-format",
        "json",
        "--chunks",
        "8,16",
        "--progress-interval",
        "0",
    )
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stderr.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "finish"
    assert "progress" in kinds
    assert events[0]["num_tasks"] == 18
    assert events[-1]["tasks_done_now"] == 18
    bad = cli("run", str(tmp_path / "missing.zarr"), str(tmp_path / "o.zarr"), "--log-format", "json")
    (error,) = [json.loads(line) for line in bad.stderr.splitlines()]
    assert error["event"] == "error" and error["exit_code"] == 2 and "does not exist" in error["message"]


def test_resume_makes_outputs_a_kill_stopped_from_being_made(tmp_path: Path) -> None:
    """Killed after DEST's group was made but before all its arrays were: the rerun makes them."""
    a, b = activations((8, 8), seed=4), activations((6,), seed=5)
    write_zarr(tmp_path / "g.zarr", a, (4, 4), name="first")
    write_zarr(tmp_path / "g.zarr", b, (3,), name="deep/second")
    dest = tmp_path / "out.zarr"
    assert cli("run", str(tmp_path / "g.zarr"), str(dest)).returncode == 0
    record = journal.read_record(parse_location(dest))
    assert record is not None and record.complete
    # Put DEST back as a kill during output creation leaves it: incomplete, one array missing.
    journal.write_record(parse_location(dest), journal.JobRecord(record.fingerprint, record.block_shapes))
    subprocess.run(["rm", "-rf", str(dest / "deep")], check=True)
    proc = cli("run", str(tmp_path / "g.zarr"), str(dest))
    assert proc.returncode == 0, proc.stderr
    assert "resuming DEST" in proc.stderr
    assert np.array_equal(read_mask(dest, "first"), oracle(a))
    assert np.array_equal(read_mask(dest, "deep/second"), oracle(b))


def test_refused_run_leaves_nothing_beside_dest(tmp_path: Path) -> None:
    write_zarr(tmp_path / "s.zarr", activations((8, 8)), (4, 4))
    write_zarr(tmp_path / "out.zarr", np.zeros((2, 2), np.int8), (2, 2))  # made by someone else
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = cli("run", str(tmp_path / "s.zarr"), str(tmp_path / "out.zarr"))
    assert proc.returncode == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_job_files_options_win_over_the_command_lines_which_win_over_the_defaults(tmp_path: Path) -> None:
    x = activations((10, 8), seed=3)
    write_zarr(tmp_path / "a.zarr", x, (5, 4))
    (tmp_path / "jobs.toml").write_text(
        """
[defaults]
scheduler = "synchronous"
report = "{name}.json"

[[job]]
source = "a.zarr"
dest = "plain.zarr"

[[job]]
source = "a.zarr"
dest = "own.zarr"
at-zero = 1
stats = false
"""
    )
    proc = cli("run", "--config", str(tmp_path / "jobs.toml"), "--at-zero", "0", "--stats", "--chunks", "5,8")
    assert proc.returncode == 0, proc.stderr
    plain = json.loads((tmp_path / "plain.json").read_text())
    own = json.loads((tmp_path / "own.json").read_text())
    assert plain["rule"] == "x > 0" and plain["arrays"][0]["stats"] is not None
    assert own["rule"] == "x >= 0" and own["arrays"][0]["stats"] is None
    assert plain["arrays"][0]["block_shape"] == own["arrays"][0]["block_shape"] == [5, 8]
    assert np.array_equal(read_mask(tmp_path / "plain.zarr"), oracle(x, at_zero=0))
    assert np.array_equal(read_mask(tmp_path / "own.zarr"), oracle(x))


def test_a_bad_option_in_a_job_file_names_the_job(tmp_path: Path) -> None:
    write_zarr(tmp_path / "s.zarr", activations((8, 8)), (4, 8))
    jobs = tmp_path / "jobs.toml"
    jobs.write_text('[[job]]\nname = "epoch7"\nsource = "s.zarr"\ndest = "m.zarr"\nat_zero = 5\n')
    proc = cli("run", "--config", str(jobs))
    assert proc.returncode == 2
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("relu-dask: error:")]
    assert line.startswith("relu-dask: error: job epoch7: argument --at-zero: invalid choice: 5"), line
    assert not (tmp_path / "m.zarr").exists()
