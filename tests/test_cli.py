"""The command line, in-process (main(argv) -> int) and as a real subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
from _support import PYTHON, activations, cli, cli_env, oracle, read_mask, run_cli, snapshot, write_zarr

from relu_dask import __version__
from relu_dask.cli import main
from relu_dask.errors import EXIT_OK, EXIT_USAGE

CONSOLE_SCRIPT = Path(sys.executable).with_name("relu-dask")


def assert_one_line_error(stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.splitlines() if line.startswith("relu-dask: error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_run_in_process(
    small_source: tuple[Path, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, x = small_source
    code = main(["run", str(source), str(tmp_path / "out.zarr"), "--chunks", "16,32", "--progress", "none"])
    out = capsys.readouterr().out
    assert code == 0
    assert np.array_equal(read_mask(tmp_path / "out.zarr"), oracle(x))
    assert out.startswith("done: processed 1 array(s), 6 task(s), rule x >= 0")
    assert "written to" in out


def test_run_as_subprocess_with_report(small_source: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    source, x = small_source
    report = tmp_path / "report.json"
    proc = run_cli("run", str(source), str(tmp_path / "out.zarr"), "--at-zero", "0", "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(read_mask(tmp_path / "out.zarr"), oracle(x, at_zero=0))
    data = json.loads(report.read_text())
    assert data["rule"] == "x > 0"
    assert data["arrays"][0]["num_ones"] == int(oracle(x, 0).sum())
    assert "rule x > 0" in proc.stdout


def test_console_script_and_version(small_source: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    assert CONSOLE_SCRIPT.exists(), "pip install should have made the relu-dask command"
    (script,) = entry_points(group="console_scripts", name="relu-dask")
    assert script.value == "relu_dask.__main__:main"  # the process set up, cli.main, a quick exit
    proc = subprocess.run([str(CONSOLE_SCRIPT), "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"relu-dask {__version__}"
    source, x = small_source
    dest = tmp_path / "out.zarr"
    for args, code in (((str(tmp_path / "missing.zarr"), str(dest)), EXIT_USAGE), ((str(source), str(dest)), EXIT_OK)):
        proc = subprocess.run([str(CONSOLE_SCRIPT), "run", *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == code, proc.stderr
    assert "done: processed 1 array(s)" in proc.stdout
    np.testing.assert_array_equal(read_mask(dest), oracle(x))


def test_the_command_prepares_the_process_and_freezes_the_heap_after_main(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import relu_dask.__main__ as command

    calls: list[str] = []
    monkeypatch.setattr(command.gc, "freeze", lambda: calls.append("freeze"))  # not this test process's heap
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)  # restored after the test
    monkeypatch.setattr(sys, "argv", ["relu-dask", "run", str(tmp_path / "missing.zarr"), str(tmp_path / "out")])
    assert command.main() == EXIT_USAGE  # main's own exit code
    assert calls == ["freeze"]
    assert os.environ["OPENBLAS_NUM_THREADS"] == "1"


def test_help_documents_exit_codes_and_the_rule() -> None:
    proc = cli("run", "--help")
    assert proc.returncode == 0
    for text in (
        "exit codes:",
        "2  bad usage or input",
        "3  DEST is in use",
        "NaN gives 0",
        "--overwrite",
        "--scheduler",
        "--dest-shards",
        "--at-zero",
    ):
        assert text in proc.stdout


def test_plan_writes_nothing(small_source: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    source, _ = small_source
    before = snapshot(tmp_path)
    proc = cli("plan", str(source), str(tmp_path / "out.zarr"), "--chunks", "16,37")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("planned: would process 1 array(s), 3 task(s)")
    assert "nothing written" in proc.stdout
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["run", "{tmp}/missing.zarr", "{tmp}/out.zarr"], ["does not exist"]),
        (["run", "{src}", "{tmp}/out.zarr", "--chunks", "0,5"], ["positive"]),
        (["run", "{src}", "{tmp}/out.zarr", "--chunks", "8,8,8"], ["3 axes", "has 2"]),
        (["run", "{src}", "{tmp}/out.zarr", "--chunks", "12,16"], ["not a multiple", "write unit"]),
        (["run", "{src}", "{tmp}/out.zarr", "--chunks", "lots"], ["byte size"]),
        (["run", "{src}", "{tmp}/out.zarr", "--dest-chunks", "4,-4"], ["positive"]),
        (["run", "{src}", "{tmp}/out.zarr", "--dest-chunks", "4,4", "--dest-shards", "6,8"], ["multiple"]),
        (["run", "{src}", "{tmp}/out.zarr", "--scheduler", "mpi"], ["scheduler must be one of"]),
        (["run", "{src}", "{tmp}/out.zarr", "--at-zero", "2"], ["--at-zero"]),
        (["run", "{src}", "{src}"], ["SOURCE itself"]),
        (["run", "{src}", "{src}/inner"], ["inside SOURCE"]),
        (["run", "{src}", "{tmp}/nofolder/out.zarr"], ["does not exist"]),
        (["run", "{src}"], ["DEST"]),
    ],
    ids=[
        "missing-source",
        "zero-chunks",
        "wrong-rank",
        "not-multiple",
        "bad-size",
        "negative-dest-chunks",
        "shards-not-multiple",
        "unknown-scheduler",
        "bad-at-zero",
        "dest-is-source",
        "dest-in-source",
        "dest-folder-missing",
        "missing-dest-arg",
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    small_source: tuple[Path, np.ndarray], tmp_path: Path, args: list[str], needles: list[str]
) -> None:
    source, _ = small_source
    before = snapshot(tmp_path)
    argv = [a.format(tmp=tmp_path, src=source) for a in args]
    proc = cli(*argv)
    assert proc.returncode == 2, proc.stderr
    assert_one_line_error(proc.stderr, *needles)
    assert snapshot(tmp_path) == before


def test_existing_dest_needs_overwrite(small_source: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    source, x = small_source
    dest = tmp_path / "out.zarr"
    write_zarr(dest, np.zeros((2, 2), np.int8), (2, 2))
    before = snapshot(dest)
    proc = cli("run", str(source), str(dest))
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "already exists", "--overwrite")
    assert snapshot(dest) == before
    proc = cli("run", str(source), str(dest), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(read_mask(dest), oracle(x))


def test_unreachable_scheduler_fails_fast(small_source: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    source, _ = small_source
    start = time.monotonic()
    proc = cli(
        "run", str(source), str(tmp_path / "out.zarr"), "--scheduler", "tcp://127.0.0.1:9", "--connect-timeout", "2"
    )
    assert time.monotonic() - start < 60
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "cannot reach the dask scheduler at tcp://127.0.0.1:9 within 2 s")
    assert not (tmp_path / "out.zarr").exists()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    proc = run_cli("run", str(tmp_path / "missing.zarr"), str(tmp_path / "out.zarr"), "--debug")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr
    assert "InputError" in proc.stderr


def test_progress_lines_when_not_a_terminal(small_source: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    source, _ = small_source
    proc = cli("run", str(source), str(tmp_path / "out.zarr"), "--chunks", "8,16", "--progress-interval", "0")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "progress:" in line]
    assert lines[-1].endswith("tasks (100%)")
    assert len(lines) >= 12
    assert "\r" not in proc.stderr


@pytest.mark.parametrize("scheduler", ["threads", "local"])
def test_progress_bar_on_a_terminal(small_source: tuple[Path, np.ndarray], tmp_path: Path, scheduler: str) -> None:
    source, x = small_source
    main_fd, sub_fd = pty.openpty()
    try:
        proc = subprocess.Popen(
            [PYTHON, "-m", "relu_dask", "run", str(source), str(tmp_path / "out.zarr"), "--scheduler", scheduler],
            stdin=sub_fd,
            stdout=sub_fd,
            stderr=sub_fd,
            env=cli_env(),
            close_fds=True,
        )
        os.close(sub_fd)
        output = b""
        while True:
            try:
                data = os.read(main_fd, 4096)
            except OSError:  # the pty closes when the process exits
                break
            if not data:
                break
            output += data
        assert proc.wait(timeout=120) == 0, output.decode(errors="replace")
    finally:
        os.close(main_fd)
    text = output.decode(errors="replace")
    assert "100%" in text
    assert "#" in text or "█" in text or "|" in text  # a drawn bar, not log lines
    assert "progress:" not in text
    assert np.array_equal(read_mask(tmp_path / "out.zarr"), oracle(x))


def test_demo_small(tmp_path: Path) -> None:
    proc = cli("demo", "--size", "8MiB", "--data-dir", str(tmp_path / "data"), "--chunks", "2MiB")
    assert proc.returncode == 0, proc.stderr
    assert "checked" in proc.stdout and "all equal" in proc.stdout
    assert "creating the demo source" in proc.stderr
    source = tmp_path / "data" / "demo-activations-8MiB.zarr"
    masks = tmp_path / "data" / "demo-masks-8MiB.zarr"
    first = snapshot(source)
    np.testing.assert_array_equal(read_mask(masks), oracle(np.asarray(__import__("zarr").open_array(str(source))[...])))
    again = cli("demo", "--size", "8MiB", "--data-dir", str(tmp_path / "data"))
    assert again.returncode == 0, again.stderr
    assert "creating the demo source" not in again.stderr
    assert snapshot(source) == first


def test_group_summary_names_copied_coordinates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_zarr(tmp_path / "g.zarr", activations((6, 4)), (3, 4), name="relu1", dimension_names=("s", "unit"))
    write_zarr(tmp_path / "g.zarr", np.arange(4), (4,), name="unit", dimension_names=("unit",))
    assert main(["run", str(tmp_path / "g.zarr"), str(tmp_path / "out.zarr"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "relu1: 6x4 float32" in out
    assert "coordinates copied as they are: unit" in out


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in Linux /proc")
def test_the_command_starts_numpy_without_openblas_threads_and_import_relu_dask_loads_no_library() -> None:
    code = (
        "import os, sys\n"
        "import relu_dask, relu_dask.__main__ as command\n"
        "loaded = {'numpy', 'zarr', 'dask'} & set(sys.modules)\n"
        "assert not loaded, f'import relu_dask loaded {sorted(loaded)}'\n"
        "if sys.argv[1] == 'prepared':\n"
        "    command.prepare_process()\n"
        "import numpy\n"
        "print(len(os.listdir('/proc/self/task')))\n"
    )
    limits = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")  # what OpenBLAS reads
    env = {k: v for k, v in cli_env().items() if k not in limits}
    threads = {
        how: int(
            subprocess.run(
                [PYTHON, "-c", code, how], capture_output=True, text=True, env=env, check=True, timeout=60
            ).stdout
        )
        for how in ("prepared", "plain")
    }
    assert threads["prepared"] == 1, threads
    if len(os.sched_getaffinity(0)) > 1:
        assert threads["plain"] > 1, threads  # the control: OpenBLAS's own pool, one thread per core


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="pins itself to one core (Linux)")
def test_the_command_line_loads_dask_only_to_compute() -> None:
    """dask (some 100 modules) is imported when a run computes, not with the command line: a
    run on an object store imports it while its first round trips are under way."""
    code = (
        "import os, sys\n"
        "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # dask counts cores past 32 only\n"
        "import relu_dask.cli, relu_dask.options\n"
        "options = relu_dask.options.RunOptions.create(sys.argv[1], sys.argv[2], storage_options={'anon': True})\n"
        "assert options.scheduler.num_workers == 32, options.scheduler\n"
        "print(sorted(m for m in sys.modules if m == 'dask' or m.startswith('dask.')))\n"
    )
    argv = [PYTHON, "-c", code, "s3://bucket/acts.zarr", "s3://bucket/masks.zarr"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=cli_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_every_public_name_resolves_to_its_module_object() -> None:
    import importlib

    import relu_dask

    assert set(relu_dask.__all__) == {*relu_dask._HOMES, "__version__"}
    for name, home in relu_dask._HOMES.items():
        assert getattr(relu_dask, name) is getattr(importlib.import_module(f"relu_dask.{home}"), name)
    assert set(relu_dask.__all__) <= set(dir(relu_dask))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        relu_dask.no_such_name  # noqa: B018


def test_a_dest_that_is_a_plain_file_is_never_offered_to_overwrite(
    small_source: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    source, _ = small_source
    dest = tmp_path / "notes.txt"
    dest.write_text("mine")
    for extra in ((), ("--overwrite",)):
        proc = cli("run", str(source), str(dest), *extra)
        assert proc.returncode == 2
        assert_one_line_error(proc.stderr, "not a Zarr store", "will not delete it", "choose another DEST")
        assert "pass --overwrite" not in proc.stderr
    assert dest.read_text() == "mine"


def test_status_into_a_pipe_closed_early_ends_quietly(
    small_source: tuple[Path, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``relu-dask status DEST | head -1``: the reader went away; no error, 128 + SIGPIPE."""
    source, _ = small_source
    dest = tmp_path / "out.zarr"
    assert cli("run", str(source), str(dest)).returncode == 0
    capsys.readouterr()
    read_end, write_end = os.pipe()
    os.close(read_end)  # head has read its line and gone
    with open(write_end, "w", buffering=1) as closed, contextlib.redirect_stdout(closed):
        code = main(["status", str(dest)])
    assert code == 141
    assert "error" not in capsys.readouterr().err


def test_a_shape_written_with_x_is_told_to_use_commas(small_source: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    source, _ = small_source
    proc = cli("run", str(source), str(tmp_path / "out.zarr"), "--chunks", "8192x1024")
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "looks like a block shape: write it with commas, --chunks 8192,1024")


def test_status_says_the_rows_waiting_once_for_arrays_that_share_them(tmp_path: Path) -> None:
    source, dest = tmp_path / "g.zarr", tmp_path / "out.zarr"
    full = activations((200, 8))
    layers = [write_zarr(source, full[:100], (16, 8), name=f"fc{i}") for i in range(3)]
    assert cli("run", str(source), str(dest)).returncode == 0
    for layer in layers:
        layer.resize((164, 8))
        layer[100:164] = full[100:164]
    proc = cli("status", str(dest))
    assert "SOURCE has grown: 64 more rows wait" in proc.stdout, proc.stdout


def test_masks_given_as_source_are_refused(small_source: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    source, _ = small_source
    masks = tmp_path / "masks.zarr"
    assert cli("run", str(source), str(masks), "--scheduler", "synchronous").returncode == 0
    before = snapshot(tmp_path)
    proc = cli("run", str(masks), str(tmp_path / "again.zarr"), "--scheduler", "synchronous")
    assert proc.returncode == EXIT_USAGE
    assert_one_line_error(proc.stderr, f"SOURCE {masks} holds masks relu-dask made (from {source})")
    assert snapshot(tmp_path) == before


def test_a_rerun_that_does_nothing_says_it_read_and_wrote_nothing(
    small_source: tuple[Path, np.ndarray], tmp_path: Path
) -> None:
    source, _ = small_source
    args = ("run", str(source), str(tmp_path / "out.zarr"), "--scheduler", "synchronous")
    first = cli(*args)
    assert "B written" in first.stdout and "written to" in first.stdout
    again = cli(*args)
    assert again.stdout.startswith("already complete: ")
    assert "B written" not in again.stdout and "written to" not in again.stdout  # what DEST holds: stored
    assert "% active, " in again.stdout and "B stored" in again.stdout
    assert f"  nothing read or written: {tmp_path / 'out.zarr'} holds " in again.stdout


def test_units_always_on_because_their_inputs_are_zero_get_the_at_zero_hint(tmp_path: Path) -> None:
    x = activations((64, 8), seed=5)
    x[:, 3] = 0.0  # a unit whose inputs are exactly 0: its mask is 1 everywhere under x >= 0
    write_zarr(tmp_path / "src.zarr", x, (16, 8))
    args = ("run", str(tmp_path / "src.zarr"), str(tmp_path / "out.zarr"), "--stats", "--scheduler", "synchronous")
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert "the source has 1 always-on unit(s) and 66 exact zeros" in proc.stdout  # 64 of unit 3, 2 elsewhere
    assert "To count such units as dead, use --at-zero 0" in proc.stdout
    dead = cli(*args[:3], str(tmp_path / "dead.zarr"), *args[4:], "--at-zero", "0")
    assert "always-on unit(s) and" not in dead.stdout  # under x > 0 it is a dead unit, nothing to hint
