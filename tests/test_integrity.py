"""Never exit 0 on a wrong or incomplete DEST: kills at each step, stale markers, checks up front.

Each test reproduces a failure a user met (issue 17) with real processes, real signals and
real stores on disk, and checks the outcome against the numpy oracle.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from _support import (
    PYTHON,
    activations,
    chunk_files,
    cli,
    cli_env,
    journal_folder,
    kill_at_step,
    oracle,
    read_mask,
    start_cli,
    write_zarr,
)
from test_batch import markers, wait_for, wait_until_stopped

import relu_dask
from relu_dask import journal
from relu_dask.errors import NaNFoundError
from relu_dask.locations import parse_location

#: Many small chunk files, so that deleting DEST takes long enough to be stopped part way.
MANY = {"shape": (1024, 1024), "chunks": (32, 32)}


@pytest.fixture(scope="module")
def many_chunks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    folder = tmp_path_factory.mktemp("many")
    x = activations(MANY["shape"], seed=11)
    write_zarr(folder / "src.zarr", x, MANY["chunks"])
    return folder / "src.zarr", x


def _complete_dest(source: Path, dest: Path) -> None:
    proc = cli("run", str(source), str(dest), "--scheduler", "synchronous")
    assert proc.returncode == 0, proc.stderr


def _stop_when(proc: subprocess.Popen[str], condition, tries_s: float = 120) -> bool:  # type: ignore[no-untyped-def]
    """SIGSTOP ``proc`` once ``condition()`` holds, and check it still held once stopped."""
    end = time.monotonic() + tries_s
    while proc.poll() is None and time.monotonic() < end:
        if condition():
            proc.send_signal(signal.SIGSTOP)
            wait_until_stopped(proc.pid)
            if condition():
                return True
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.0002)
    return False


def _dest_damaged(dest: Path, num_files: int) -> bool:
    """DEST is being deleted: it exists, but with files missing."""
    try:
        return dest.exists() and sum(1 for p in dest.rglob("*") if p.is_file()) < num_files
    except FileNotFoundError:  # a folder vanished under rglob: deletion under way
        return dest.exists()


def _then_the_same_command(args: tuple[str, ...], dest: Path, x: np.ndarray) -> None:
    """After a kill: ``status`` claims complete only for exact masks; the same command without
    --overwrite (what a nightly job runs) finishes exactly or refuses with exit 2; never a
    quiet exit 0 on a wrong DEST. Then --overwrite always gives the exact masks."""
    status = json.loads(cli("status", str(dest), "--json").stdout)
    if status["state"] == "complete":
        assert np.array_equal(read_mask(dest), oracle(x))
    again = cli(*args)
    if again.returncode == 0:
        assert np.array_equal(read_mask(dest), oracle(x))
        assert json.loads(cli("status", str(dest), "--json").stdout)["state"] == "complete"
    else:
        assert again.returncode == 2 and "--overwrite" in again.stderr, again.stderr
    fixed = cli(*args, "--overwrite")
    assert fixed.returncode == 0, fixed.stderr
    assert np.array_equal(read_mask(dest), oracle(x))


@pytest.mark.parametrize("overwrite", [False, True], ids=["first-run", "overwrite"])
@pytest.mark.parametrize("step", journal.STEPS)
def test_a_kill_at_each_step_of_a_run_then_the_same_command(tmp_path: Path, step: str, overwrite: bool) -> None:
    """Each row of docs/design.md's crash-consistency table, with a real SIGKILL at that step."""

    x = activations((64, 64), seed=12)
    write_zarr(tmp_path / "src.zarr", x, (16, 16))
    dest = tmp_path / "out.zarr"
    args = ("run", str(tmp_path / "src.zarr"), str(dest), "--scheduler", "synchronous", "--chunks", "16,16")
    if overwrite:
        _complete_dest(tmp_path / "src.zarr", dest)  # an earlier DEST of the same job, being replaced
    kill_at_step(step, *args, *(["--overwrite"] if overwrite else []), "--progress", "none")
    _then_the_same_command(args, dest, x)


def test_overwrite_killed_while_deleting_dest_never_ends_in_a_wrong_exit_0(
    many_chunks: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    """The user's case: killed part way through deleting DEST (caught by polling, then SIGSTOP)."""
    point = "dest-half-deleted"
    source, x = many_chunks
    dest = tmp_path / "out.zarr"
    args = ("run", str(source), str(dest), "--scheduler", "synchronous", "--progress", "none")
    for _attempt in range(20):
        _complete_dest(source, dest)
        num_files = sum(1 for p in dest.rglob("*") if p.is_file())
        job = journal_folder(dest) / "job.json"
        assert job.exists()
        proc = start_cli(*args, "--overwrite")
        replacing = journal_folder(dest) / "replacing"
        condition = lambda: replacing.exists() and _dest_damaged(dest, num_files)  # noqa: B023, E731 - this attempt
        if _stop_when(proc, condition):
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            break
        proc.wait(timeout=60)
        subprocess.run(["rm", "-rf", str(dest), str(journal_folder(dest))], check=True)
    else:
        pytest.fail(f"never stopped an --overwrite at {point} in 20 runs")
    assert json.loads(cli("status", str(dest), "--json").stdout)["state"] != "complete"
    _then_the_same_command(args, dest, x)


def test_a_complete_record_beside_a_dest_without_its_masks_is_not_believed(tmp_path: Path) -> None:
    x = activations((40, 30), seed=2)
    write_zarr(tmp_path / "src.zarr", x, (8, 8))
    dest = tmp_path / "out.zarr"
    _complete_dest(tmp_path / "src.zarr", dest)
    want = chunk_files(dest)
    (dest / "zarr.json").unlink()  # what an older relu-dask's killed --overwrite left behind
    status = cli("status", str(dest))
    assert "partial (masks missing" in status.stdout, status.stdout
    again = cli("run", str(tmp_path / "src.zarr"), str(dest), "--scheduler", "synchronous")
    assert again.returncode == 0, again.stderr
    assert "computing them again" in again.stderr
    assert np.array_equal(read_mask(dest), oracle(x))
    assert chunk_files(dest) == want
    assert cli("status", str(dest)).stdout.startswith(f"{dest}: complete")


def test_resume_with_another_unit_axis_recounts_instead_of_reusing(tmp_path: Path) -> None:
    """Square blocks make the done markers of --unit-axis 1 and 0 the same length."""
    x = activations((2048, 2048), seed=5)
    x[:, :100] -= 3.0  # units that differ along both axes
    write_zarr(tmp_path / "src.zarr", x, (256, 256))
    dest = tmp_path / "out.zarr"
    base = ("run", str(tmp_path / "src.zarr"), str(dest), "--scheduler", "synchronous", "--chunks", "256,256")
    proc = start_cli(*base, "--stats", "--unit-axis", "1")
    assert wait_for(lambda: markers(dest) >= 10, proc), "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    again = cli(*base, "--stats", "--unit-axis", "0", "--report", str(tmp_path / "r.json"))
    assert again.returncode == 0, again.stderr
    stats = json.loads((tmp_path / "r.json").read_text())["arrays"][0]["stats"]
    assert stats["unit_ones"] == oracle(x).sum(axis=1, dtype=np.int64).tolist()


@pytest.mark.parametrize("option", ["--report", "--plot"])
def test_an_output_file_in_a_missing_folder_is_refused_before_any_work(
    small_source: tuple[Path, np.ndarray], tmp_path: Path, option: str
) -> None:
    source, _ = small_source
    dest = tmp_path / "out.zarr"
    proc = cli("run", str(source), str(dest), option, str(tmp_path / "reports" / "r.out"))
    assert proc.returncode == 2
    assert "does not exist: create it first" in proc.stderr
    assert not dest.exists() and not journal_folder(dest).exists()


def test_a_job_file_runs_every_job_whatever_one_raises(tmp_path: Path) -> None:
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        write_zarr(tmp_path / f"{name}.zarr", activations((10, 10), seed=seed), (5, 5))
    (tmp_path / "jobs.toml").write_text(
        """
[defaults]
scheduler = "synchronous"

[[job]]
source = "a.zarr"
dest = "a-masks.zarr"

[[job]]
source = "b.zarr"
dest = "b-masks.zarr"
plot = "b.notanimageformat"

[[job]]
source = "c.zarr"
dest = "c-masks.zarr"
"""
    )
    proc = cli("run", "--config", str(tmp_path / "jobs.toml"), "--quiet")
    assert proc.returncode == 1, proc.stderr
    assert "job 1 a-masks: ok (exit 0)" in proc.stdout
    assert "job 2 b-masks: failed (exit 1)" in proc.stdout
    assert "job 3 c-masks: ok (exit 0)" in proc.stdout
    assert "worst exit code 1" in proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1 and "job b-masks: unexpected" in proc.stderr
    for name, seed in (("a", 1), ("c", 3)):
        assert np.array_equal(read_mask(tmp_path / f"{name}-masks.zarr"), oracle(activations((10, 10), seed=seed)))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_an_undecodable_source_chunk_is_named_with_what_to_do(tmp_path: Path, damage: str) -> None:
    x = activations((16, 16), seed=4)
    write_zarr(tmp_path / "src.zarr", x, (8, 8))
    chunk = tmp_path / "src.zarr" / "c" / "1" / "0"
    stored = chunk.read_bytes()
    chunk.write_bytes(stored[:5] + b"\xff" * 40 if damage == "garbage" else stored[: len(stored) // 2])
    proc = cli("run", str(tmp_path / "src.zarr"), str(tmp_path / "out.zarr"), "--scheduler", "synchronous", "--quiet")
    assert proc.returncode == 1
    assert str(chunk) in proc.stderr
    assert "restore or rewrite that chunk" in proc.stderr and "rerun the same command" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert zarr.open_array(str(tmp_path / "src.zarr"), mode="r").shape == (16, 16)  # the source untouched


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_process_pool_workers_die_with_a_killed_run(tmp_path: Path, sig: signal.Signals) -> None:
    import psutil

    x = activations((96 * 512, 512), seed=8)
    write_zarr(tmp_path / "src.zarr", x, (512, 512))
    dest = tmp_path / "out.zarr"
    args = ("run", str(tmp_path / "src.zarr"), str(dest), "--scheduler", "processes", "--chunks", "512,512")
    proc = start_cli(*args)
    assert wait_for(lambda: markers(dest) >= 5, proc), "the run ended before it could be killed"
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "the processes scheduler started no worker processes"
    proc.send_signal(sig)
    proc.wait(timeout=60)
    _, alive = psutil.wait_procs(children, timeout=3)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"still running 3 s after the kill: {[p.cmdline()[:3] for p in alive]}"
    again = cli(*args, "--overwrite", "--dest-compressor", "zstd")
    assert again.returncode == 0, again.stderr
    assert np.array_equal(read_mask(dest), oracle(x))


def _verified_dest(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    x = activations((64, 48), seed=9)
    write_zarr(tmp_path / "src.zarr", x, (16, 16))
    dest = tmp_path / "out.zarr"
    args = ("--scheduler", "synchronous", "--chunks", "32,16", "--verify")
    proc = cli("run", str(tmp_path / "src.zarr"), str(dest), *args)
    assert proc.returncode == 0, proc.stderr
    assert f"{dest}: verified: 1 array(s), 6 block(s), 12 chunk(s) read" in proc.stdout
    assert cli("status", str(dest)).stdout.startswith(f"{dest}: complete ({x.shape[0]} rows, 6 tasks; verified ")
    return tmp_path / "src.zarr", dest, x


@pytest.mark.parametrize("damage", ["deleted", "truncated", "replaced"])
def test_verify_catches_a_damaged_chunk_file(tmp_path: Path, damage: str) -> None:
    _, dest, x = _verified_dest(tmp_path)
    mask = oracle(x)
    victim, other = dest / "c" / "1" / "2", dest / "c" / "3" / "0"  # in blocks (0, 2) and (1, 0)
    assert mask[16:32, 32:48].sum() != mask[48:64, 0:16].sum()  # replacing one by the other changes its count
    if damage == "deleted":
        victim.unlink()
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:20])
    else:
        victim.write_bytes(other.read_bytes())
    proc = cli("verify", str(dest))
    assert proc.returncode == 1, proc.stdout
    assert "NOT verified: 1 problem(s)" in proc.stdout
    (problem,) = [line for line in proc.stderr.splitlines() if line.startswith("relu-dask: verify:")]
    assert str(victim) in problem if damage == "truncated" else "block (0, 2) holds" in problem
    assert "verified" not in cli("status", str(dest)).stdout


def test_verify_of_a_whole_dest_and_of_no_dest(tmp_path: Path) -> None:
    _, dest, _ = _verified_dest(tmp_path)
    again = cli("verify", str(dest))
    assert again.returncode == 0 and "verified" in again.stdout
    absent = cli("verify", str(tmp_path / "nothing.zarr"))
    assert absent.returncode == 2 and "no relu-dask job record" in absent.stderr


def test_a_mask_array_gone_after_a_kill_at_complete_is_computed_again(tmp_path: Path) -> None:
    """Done markers outlive a kill right after "complete" is recorded: never trusted for an array made anew."""

    a, b = activations((32, 32), seed=1), activations((32, 32), seed=2)
    write_zarr(tmp_path / "g.zarr", a, (8, 8), name="a")
    write_zarr(tmp_path / "g.zarr", b, (8, 8), name="b")
    dest = tmp_path / "out.zarr"
    args = ("run", str(tmp_path / "g.zarr"), str(dest), "--scheduler", "synchronous", "--chunks", "8,8")
    kill_at_step("complete", *args)
    assert (journal_folder(dest) / "done" / "1").is_dir()  # the markers of b are still there
    subprocess.run(["rm", "-rf", str(dest / "b")], check=True)  # and b is lost
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert np.array_equal(read_mask(dest, "a"), oracle(a))
    assert np.array_equal(read_mask(dest, "b"), oracle(b))
    assert cli("verify", str(dest)).returncode == 0


def test_what_a_killed_replacement_left_is_deleted_but_nothing_of_the_users(tmp_path: Path) -> None:
    x = activations((32, 32), seed=3)
    write_zarr(tmp_path / "src.zarr", x, (8, 8))
    dest = tmp_path / "out.zarr"
    args = ("run", str(tmp_path / "src.zarr"), str(dest), "--scheduler", "synchronous")
    _complete_dest(tmp_path / "src.zarr", dest)
    journal.mark_replacing(parse_location(dest))
    (dest / "zarr.json").unlink()  # what a kill part way through deleting it left: chunk files only
    assert cli(*args, "--overwrite").returncode == 0
    assert np.array_equal(read_mask(dest), oracle(x))
    # the same record, but the user put a folder of their own at DEST meanwhile: never deleted
    journal.mark_replacing(parse_location(dest))
    subprocess.run(["rm", "-rf", str(dest)], check=True)
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    refused = cli(*args, "--overwrite")
    assert refused.returncode == 2 and "will not delete it" in refused.stderr
    assert (dest / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("scheduler", "sig"),
    [
        ("synchronous", signal.SIGTERM),
        ("threads", signal.SIGTERM),
        ("processes", signal.SIGTERM),
        ("local", signal.SIGTERM),
        ("threads", signal.SIGINT),  # Ctrl-C
        ("local", signal.SIGINT),  # to the whole group: the cluster's workers print nothing
    ],
    ids=["synchronous", "threads", "processes", "local", "threads-ctrl-c", "local-ctrl-c"],
)
def test_sigterm_stops_a_run_cleanly_and_the_same_command_finishes_it(
    big_source_for_stop: tuple[Path, Path], tmp_path: Path, scheduler: str, sig: signal.Signals
) -> None:
    """Slurm at the end of a walltime, systemd's stop: one line, exit 143, no lock left, then an exact rerun."""
    source, reference = big_source_for_stop
    for attempt in range(3):  # a loaded machine may let the tasks end before the signal lands
        dest = tmp_path / f"out{attempt}.zarr"
        args = ("run", str(source), str(dest), "--scheduler", scheduler, "--chunks", "256,512", "--progress", "none")
        proc = subprocess.Popen(
            [PYTHON, "-m", "relu_dask", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
            start_new_session=True,  # a group of its own: signalled whole, as Slurm, systemd and a terminal do
        )
        assert wait_for(lambda: markers(dest) >= 4, proc), "the run ended before it could be stopped"  # noqa: B023
        os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + sig, err
        (line,) = [x for x in err.splitlines() if x.startswith("relu-dask: error:")]
        assert f"stopped by {sig.name}" in line and "rerun the same command to finish the rest" in line
        assert "Traceback" not in err
        assert all(x.startswith("relu-dask: ") for x in err.splitlines() if x.strip()), err  # only its own lines
        assert not (journal_folder(dest) / "lock").exists()
        if f"stopped by {sig.name}: " in line:  # while tasks ran: it says how many were done
            break
        again = cli(*args[:-2])  # stopped once its tasks were done: the same command finishes it all the same
        assert again.returncode == 0 and chunk_files(dest) == chunk_files(reference), again.stderr
    else:
        pytest.fail("the signal never landed while tasks ran, in 3 runs")
    # What it says it did is what the journal holds, and nothing writes after it has gone.
    done = int(line.split(f"stopped by {sig.name}: ")[1].split(" of ")[0])
    time.sleep(1.0)
    assert markers(dest) == done
    assert not list(dest.rglob("*.partial"))
    again = cli(*args[:-2])
    assert again.returncode == 0, again.stderr
    assert chunk_files(dest) == chunk_files(reference)


def test_a_processes_pool_worker_killed_mid_run_ends_the_run_and_the_same_command_finishes_it(
    big_source_for_stop: tuple[Path, Path], tmp_path: Path
) -> None:
    """A pool worker killed (as the group's SIGTERM kills one still starting): the pool is
    broken and ends its other workers with SIGTERM, then waits for them. Ignored, that left
    relu-dask waiting forever; now the run ends in one line, and the same command finishes it."""
    import psutil

    source, reference = big_source_for_stop
    dest = tmp_path / "out.zarr"
    args = ("run", str(source), str(dest), "--scheduler", "processes", "--chunks", "256,512", "--progress", "none")
    proc = subprocess.Popen(
        [PYTHON, "-m", "relu_dask", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env()
    )
    assert wait_for(lambda: markers(dest) >= 4, proc), "the run ended before a worker could be killed"
    workers = [c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())]
    assert workers, "no pool worker found"
    workers[0].kill()
    _, err = proc.communicate(timeout=60)  # waited forever before
    assert proc.returncode not in (0, None), err
    (line,) = [x for x in err.splitlines() if x.startswith("relu-dask: error:")]
    assert "rerun the same command" in line and "Traceback" not in err, err
    # only its own lines: not Python's "resource_tracker: There appear to be 1 leaked
    # semaphore objects" for a lock numcodecs took in the killed worker
    assert all(x.startswith("relu-dask: ") for x in err.splitlines() if x.strip()), err
    assert not (journal_folder(dest) / "lock").exists()
    again = cli(*args[:-2])
    assert again.returncode == 0, again.stderr
    assert chunk_files(dest) == chunk_files(reference)


@pytest.fixture(scope="module")
def big_source_for_stop(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("stop")
    x = activations((64 * 256, 512), seed=13)
    write_zarr(folder / "src.zarr", x, (256, 512))
    reference = folder / "reference.zarr"
    proc = cli("run", str(folder / "src.zarr"), str(reference), "--scheduler", "synchronous", "--chunks", "256,512")
    assert proc.returncode == 0, proc.stderr
    return folder / "src.zarr", reference


def test_a_failing_run_does_not_stop_another_run_in_the_same_process(tmp_path: Path) -> None:
    """Runs in threads of one process: one stopping on NaN lets its own tasks finish, not the other's."""
    from concurrent.futures import ThreadPoolExecutor

    x = activations((512, 512), seed=3)
    y = activations((64, 64), seed=4)
    y[40, 3] = np.nan
    write_zarr(tmp_path / "a.zarr", x, (16, 16))
    write_zarr(tmp_path / "b.zarr", y, (16, 16))
    with ThreadPoolExecutor(2) as pool:
        long_run = pool.submit(
            relu_dask.run, tmp_path / "a.zarr", tmp_path / "a-masks.zarr", scheduler="threads", chunks="16,16"
        )
        while not (tmp_path / "a-masks.zarr").exists():  # the long run is under way
            time.sleep(0.005)
        failing = pool.submit(
            relu_dask.run, tmp_path / "b.zarr", tmp_path / "b-masks.zarr", scheduler="threads", nan="error"
        )
        with pytest.raises(NaNFoundError):
            failing.result()
        assert not long_run.done(), "the failure came after the long run: nothing was tested"
        report = long_run.result()
    assert report.outcome == "done" and report.tasks_done_now == 32 * 32
    assert np.array_equal(read_mask(tmp_path / "a-masks.zarr"), oracle(x))
    assert not (tmp_path / "b-masks.zarr").exists()


def test_a_sigterm_while_the_libraries_import_is_one_line(tmp_path: Path) -> None:
    """Signalled as soon as it catches SIGTERM, while numpy, dask and zarr still import: the
    one line and 143, never an ImportError's traceback. (Python itself catches SIGINT from
    its start, before relu-dask runs, so there is no such moment to wait for with Ctrl-C.)"""
    sig = signal.SIGTERM
    write_zarr(tmp_path / "src.zarr", activations((16, 16)), (8, 16))
    proc = subprocess.Popen(
        [PYTHON, "-m", "relu_dask", "run", str(tmp_path / "src.zarr"), str(tmp_path / "out.zarr")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    end = time.monotonic() + 60
    while not _catches(proc.pid, sig):  # its handler is in place: the earliest it can say anything
        assert proc.poll() is None and time.monotonic() < end
        time.sleep(0.001)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and "ImportError" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("relu-dask: error:")]
    assert f"stopped by {sig.name}" in line


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (Linux: SigCgt in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False
