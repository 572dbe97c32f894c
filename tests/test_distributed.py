"""dask.distributed for real: `dask scheduler` and `dask worker` processes, a killed worker,
the dashboard over HTTP, the memory check, and workers that cannot see the data."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, closing
from pathlib import Path

import numpy as np
import psutil
import pytest
from _support import PYTHON, activations, chunk_files, cli, cli_env, journal_folder, write_zarr

DASK = str(Path(sys.executable).with_name("dask"))
SHAPE, CHUNK = (96 * 512, 2048), (512, 2048)
TASKS = ("--chunks", "512,2048")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("dist")
    x = np.random.default_rng(11).standard_normal(SHAPE, dtype=np.float32)
    write_zarr(folder / "src.zarr", x, CHUNK)
    reference = folder / "reference.zarr"
    proc = cli("run", str(folder / "src.zarr"), str(reference), *TASKS)
    assert proc.returncode == 0, proc.stderr
    return folder / "src.zarr", reference


def markers(dest: Path) -> int:
    folder = journal_folder(dest) / "done" / "0"
    return len(list(folder.iterdir())) if folder.is_dir() else 0


def _address_in(scheduler_file: Path) -> str:
    """The scheduler's address, once its file is there and whole (it is written in place:
    read too soon, it is empty or cut short)."""
    end = time.monotonic() + 60
    while True:
        try:
            return str(json.loads(scheduler_file.read_text())["address"])
        except (OSError, ValueError, KeyError):
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


class Cluster:
    """`dask scheduler` and `dask worker` started as separate processes on 127.0.0.1."""

    def __init__(self, folder: Path, stack: ExitStack) -> None:
        self.file = folder / "scheduler.json"
        self.stack = stack
        self.scheduler = self._start(
            [
                DASK,
                "scheduler",
                "--scheduler-file",
                str(self.file),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--dashboard-address",
                "127.0.0.1:0",
            ]
        )
        self.address = _address_in(self.file)
        self.workers: list[subprocess.Popen[bytes]] = []

    def _start(self, argv: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())
        self.stack.callback(_stop, proc)
        return proc

    def add_worker(self, *extra: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
        worker = self._start(
            [
                *prefix,
                DASK,
                "worker",
                "--scheduler-file",
                str(self.file),
                "--host",
                "127.0.0.1",
                "--nthreads",
                "1",
                "--no-nanny",
                *extra,
            ]
        )
        self.workers.append(worker)
        return worker

    def wait_for_workers(self, count: int) -> None:
        from distributed import Client

        with Client(self.address, timeout="30s") as client:
            client.wait_for_workers(count, timeout=60)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with ExitStack() as stack:
        yield Cluster(tmp_path, stack)


def test_worker_killed_mid_run_does_not_fail_the_job(data: tuple[Path, Path], cluster: Cluster, tmp_path: Path) -> None:
    source, reference = data
    victim = cluster.add_worker()
    cluster.add_worker()
    cluster.wait_for_workers(2)
    dest = tmp_path / "out.zarr"
    job = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "relu_dask",
            "run",
            str(source),
            str(dest),
            "--scheduler-file",
            str(cluster.file),
            *TASKS,
            "--report",
            str(tmp_path / "r.json"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    end = time.monotonic() + 120
    while markers(dest) < 10 and job.poll() is None and time.monotonic() < end:
        time.sleep(0.005)
    assert job.poll() is None, "the job ended before a worker could be killed"
    victim.send_signal(signal.SIGKILL)
    # what a worker killed between writing a chunk's temporary file and its rename leaves
    (dest / "c" / "0").mkdir(parents=True, exist_ok=True)
    (dest / "c" / "0" / "0.0123456789abcdef.partial").write_bytes(b"cut short")
    _out, err = job.communicate(timeout=300)
    assert victim.wait(timeout=10) == -signal.SIGKILL
    assert job.returncode == 0, err
    assert chunk_files(dest) == chunk_files(reference)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["scheduler"] == f"scheduler file {cluster.file}"
    assert report["num_threads"] == 2
    assert report["numexpr_threads"] * 1 <= psutil.cpu_count()


def test_oversized_plan_is_refused_for_the_workers_memory(
    data: tuple[Path, Path], cluster: Cluster, tmp_path: Path
) -> None:
    source, _ = data
    cluster.add_worker("--memory-limit", "100MiB")
    cluster.wait_for_workers(1)
    proc = cli("run", str(source), str(tmp_path / "out.zarr"), "--scheduler", cluster.address, "--chunks", "256MiB")
    assert proc.returncode == 2, proc.stderr
    assert "memory limit per task" in proc.stderr and "--chunks" in proc.stderr
    assert not (tmp_path / "out.zarr").exists()


def test_worker_that_cannot_see_the_data_is_a_clear_error(
    data: tuple[Path, Path], cluster: Cluster, tmp_path: Path
) -> None:
    """A worker in its own mount namespace, where SOURCE's folder is an empty tmpfs: another machine."""
    source, _ = data
    hide = f'mount -t tmpfs tmpfs {source.parent} && exec "$0" "$@"'
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace here: {probe.stderr.decode().strip()}")
    cluster.add_worker(prefix=("unshare", "-m", "sh", "-c", hide))
    cluster.wait_for_workers(1)
    proc = cli("run", str(source), str(tmp_path / "out.zarr"), "--scheduler", cluster.address)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("relu-dask: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert f"cannot see {source}" in lines[0] and "shares" in lines[0]
    assert not (tmp_path / "out.zarr").exists()


def _listening_addresses(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.laddr.port == port}


def _other_address() -> str | None:
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return str(a.address)
    return None


def test_dashboard_answers_on_loopback_only_while_a_job_runs(data: tuple[Path, Path], tmp_path: Path) -> None:
    source, _ = data
    with closing(socket.socket()) as taken:  # 8787 is busy: the real port must be printed
        with contextlib.suppress(OSError):  # or busy already, with the dashboard of a test run beside this one
            taken.bind(("127.0.0.1", 8787))
            taken.listen()
        job = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "relu_dask",
                "run",
                str(source),
                str(tmp_path / "out.zarr"),
                "--scheduler",
                "local",
                "--workers",
                "1",
                "--threads-per-worker",
                "1",
                *TASKS,
                "--performance-report",
                str(tmp_path / "perf.html"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
        )
        try:
            assert job.stderr is not None
            link = None
            for line in job.stderr:
                found = re.search(r"dashboard (http://\S+)", line)
                if found:
                    link = found.group(1)
                    break
            assert link is not None, "no dashboard link printed"
            port = int(re.search(r":(\d+)/", link).group(1))  # type: ignore[union-attr]
            assert link.startswith("http://127.0.0.1:") and port != 8787
            base = link.rsplit("/", 1)[0]
            for page in ("status", "individual-task-stream", "individual-progress"):
                with urllib.request.urlopen(f"{base}/{page}", timeout=30) as response:
                    assert response.status == 200, page
            assert job.poll() is None, "the job should still be running while the pages answer"
            assert _listening_addresses(port) == {"127.0.0.1"}
            other = _other_address()
            if other is not None:
                with closing(socket.socket()) as probe:
                    probe.settimeout(5)
                    assert probe.connect_ex((other, port)) != 0
        finally:
            out, err = job.communicate(timeout=300)
    assert job.returncode == 0, err
    assert "dashboard: http://127.0.0.1:" in out
    assert "(closed with the run's LocalCluster; its link was logged as it started)" in out
    assert (tmp_path / "perf.html").stat().st_size > 10_000
    assert "Dask Performance Report" in (tmp_path / "perf.html").read_text()


def test_performance_report_needs_a_distributed_scheduler(data: tuple[Path, Path], tmp_path: Path) -> None:
    source, _ = data
    proc = cli("run", str(source), str(tmp_path / "out.zarr"), "--performance-report", str(tmp_path / "p.html"))
    assert proc.returncode == 2
    assert "--performance-report needs a distributed scheduler" in proc.stderr


def test_dashboard_on_all_interfaces_warns(data: tuple[Path, Path], tmp_path: Path) -> None:
    source, _ = data
    proc = cli(
        "plan", str(source), str(tmp_path / "out.zarr"), "--scheduler", "local", "--dashboard-address", "0.0.0.0:0"
    )
    assert proc.returncode == 0, proc.stderr
    assert "binds to all interfaces" in proc.stderr


@pytest.mark.skipif(
    int(__import__("distributed").__version__.split(".")[0]) < 2026,
    reason="distributed before 2026 waits over 2 minutes for nannies that failed to start (the lowest-versions lane)",
)
def test_a_script_without_the_main_guard_is_told_to_add_it(tmp_path: Path) -> None:
    """The README's example pasted into a script as it is: each worker process of the
    LocalCluster imports the script again. The workers refuse, and the script's run says why."""
    write_zarr(tmp_path / "acts.zarr", activations((16, 8)), (8, 8))
    script = tmp_path / "masks.py"
    script.write_text(
        "import relu_dask\n"
        "from relu_dask.schedulers import parse_scheduler\n"
        f"relu_dask.run({str(tmp_path / 'acts.zarr')!r}, {str(tmp_path / 'masks.zarr')!r}, "
        "scheduler=parse_scheduler('local', num_workers=1, dashboard_address='127.0.0.1:0'))\n"
    )
    proc = subprocess.run([PYTHON, str(script)], capture_output=True, text=True, timeout=300, env=cli_env())
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("relu_dask.errors.InputError: the LocalCluster's workers failed to start"), last
    assert 'put the call under `if __name__ == "__main__":`' in last
    assert "called at the top level of a script that a worker process it started" in proc.stderr  # the workers'
    assert not (tmp_path / "masks.zarr").exists()


def test_the_dashboard_shows_one_task_group_per_array(tmp_path: Path) -> None:
    """Task names start with the array's path (escaped so that dask's ``key_split`` keeps it
    whole): the progress page, task stream and performance report show one bar per layer."""
    import relu_dask
    from relu_dask.schedulers import parse_scheduler

    source = tmp_path / "g.zarr"
    write_zarr(source, activations((64, 16), seed=1), (16, 16), name="fc1")
    write_zarr(source, activations((64, 16), seed=2), (16, 16), name="block1/relu-out")
    spec = parse_scheduler("local", num_workers=1, threads_per_worker=2, dashboard_address="127.0.0.1:0")
    perf = tmp_path / "perf.html"
    relu_dask.run(source, tmp_path / "out.zarr", chunks="16,16", scheduler=spec, performance_report=perf)
    html = perf.read_text()
    assert "relu_mask_fc1" in html and "relu_mask_block1.relu_out" in html
