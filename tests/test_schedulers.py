"""schedulers: sizing from the limits a process is really under (affinity, cgroups, rlimits)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _support import PYTHON, cli_env

from relu_dask.schedulers import count_cores, memory_limit_bytes, open_session, parse_scheduler, plan_session


def test_memory_limit_agrees_with_distributeds() -> None:
    """The hand-kept copy of distributed's reading (to spare local runs its import) says the same."""
    from distributed.system import memory_limit

    assert memory_limit_bytes() == memory_limit()


def _plan_in_child(tmp_path: Path, small_source: tuple[Path, np.ndarray], preexec, *extra: str) -> dict:  # type: ignore[no-untyped-def]
    source, _ = small_source
    report = tmp_path / "plan.json"
    proc = subprocess.run(
        [PYTHON, "-m", "relu_dask", "plan", str(source), str(tmp_path / "out.zarr"), "--report", str(report), *extra],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=300,
        preexec_fn=preexec,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(report.read_text())


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2+ cores")
def test_a_process_pinned_to_one_core_is_sized_for_one(tmp_path: Path, small_source: tuple[Path, np.ndarray]) -> None:
    """As under ``taskset -c 0`` or a Slurm allocation of one CPU."""
    one = min(os.sched_getaffinity(0))
    report = _plan_in_child(tmp_path, small_source, lambda: os.sched_setaffinity(0, {one}))
    assert (report["num_threads"], report["numexpr_threads"]) == (1, 1)
    unpinned = _plan_in_child(tmp_path, small_source, None)
    assert unpinned["num_threads"] == len(os.sched_getaffinity(0))


def test_a_memory_limited_process_plans_within_its_limit(tmp_path: Path) -> None:
    """RLIMIT_RSS, one of the limits distributed reads: the plan's memory per thread follows it."""
    limit = 256 * 2**20
    session = plan_session(parse_scheduler("threads"))
    assert session.memory_per_thread_bytes is not None and session.memory_per_thread_bytes > limit
    probe = (
        "from relu_dask.schedulers import plan_session, parse_scheduler; "
        "s = plan_session(parse_scheduler('threads')); print(s.memory_per_thread_bytes, s.num_threads)"
    )
    proc = subprocess.run(
        [PYTHON, "-c", probe],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=120,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_RSS, (limit, limit)),
    )
    assert proc.returncode == 0, proc.stderr
    per_thread, threads = (int(v) for v in proc.stdout.split())
    assert per_thread == limit // threads


#: Prints, as JSON, how relu_dask sizes itself in the process it runs in.
_SIZING = """
import json
from relu_dask.schedulers import count_cores, memory_limit_bytes, open_session, parse_scheduler, plan_session
threads = plan_session(parse_scheduler("threads"))
local = plan_session(parse_scheduler("local", dashboard_address="127.0.0.1:0"))
print(json.dumps({
    "cores": count_cores(),
    "memory": memory_limit_bytes(),
    "threads": [threads.num_threads, threads.cores_per_thread, threads.memory_per_thread_bytes],
    "local": [local.num_threads, local.cores_per_thread, local.memory_per_thread_bytes],
}))
"""


def _sizing(*prefix: str) -> dict[str, Any]:
    """Run :data:`_SIZING` in a new process, its command line led by ``prefix``; its JSON."""
    proc = subprocess.run([*prefix, PYTHON, "-c", _SIZING], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) is not installed here")
@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2+ cores")
def test_taskset_to_one_core_sizes_the_threads_scheduler_and_the_plan_for_one(
    tmp_path: Path, small_source: tuple[Path, np.ndarray]
) -> None:
    """``taskset -c N relu-dask ...``: one core, one thread, and ``relu-dask plan`` says so."""
    pin = ["taskset", "-c", str(min(os.sched_getaffinity(0)))]
    pinned = _sizing(*pin)
    assert pinned["cores"] == 1
    assert pinned["threads"][:2] == [1, 1]  # one thread, one numexpr thread for it
    assert pinned["threads"][2] == memory_limit_bytes()  # all the memory to the one thread
    assert _sizing()["threads"][0] == count_cores() > 1  # unpinned, as many as the cores

    source, _ = small_source
    plan = ["-m", "relu_dask", "plan", str(source), str(tmp_path / "out.zarr"), "--scheduler", "threads"]
    for prefix, threads in ((pin, 1), ([], count_cores())):
        report = tmp_path / f"plan-{threads}.json"
        proc = subprocess.run(
            [*prefix, PYTHON, *plan, "--report", str(report)],
            capture_output=True,
            text=True,
            env=cli_env(),
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        said = re.search(r"scheduler threads \((\d+) thread\(s\)\)", proc.stdout)
        assert said is not None, proc.stdout
        assert int(said.group(1)) == threads, proc.stdout
        assert f"{threads} task(s) at once" in proc.stdout
        assert json.loads(report.read_text())["num_threads"] == threads
        assert not (tmp_path / "out.zarr").exists()  # a plan writes nothing


# --- cgroups: a process in its own cgroup, seeing it as a container does -------------------------
#
# dask and distributed read a cgroup's limits where a container sees its own cgroup: at the
# root of /sys/fs/cgroup (cgroup v1: cpu,cpuacct/cpu.cfs_quota_us and memory/*; cgroup v2:
# memory.max, and cpu.max of the cgroup /proc/self/cgroup names). So the child is moved into
# a new cgroup, given its own cgroup and mount namespaces (``unshare --cgroup --mount``), and
# /sys/fs/cgroup is mounted again inside them: the view ``docker run --cpus 1 --memory 1g``
# gives. Nothing is faked: the kernel's cgroup files are what the child reads. Where the
# machine does not allow one of the steps, the test is skipped with the step and the error.

_CGROUP_FS = Path("/sys/fs/cgroup")
_PERIOD_US = 100_000


@dataclass
class _ChildCgroups:
    """New cgroups for one test, one per hierarchy, and how a process gets into them."""

    version: int
    folders: dict[str, Path] = field(default_factory=dict)
    """Controller -> the new cgroup's folder (cgroup v2: the same folder for each)."""
    mounts: list[str] = field(default_factory=list)
    """Shell commands that mount /sys/fs/cgroup again, inside the new namespaces."""
    enabled: list[tuple[Path, str]] = field(default_factory=list)
    """(cgroup.subtree_control, controller) this test enabled (cgroup v2), to disable again."""

    def write(self, controller: str, name: str, value: str) -> None:
        path = self.folders[controller] / name
        try:
            path.write_text(value)
        except OSError as exc:
            pytest.skip(f"cgroup v{self.version} not writable here: cannot write {value!r} to {path}: {exc}")

    def command(self, *argv: str) -> list[str]:
        """``argv`` run in these cgroups, in new cgroup and mount namespaces, /sys/fs/cgroup mounted again."""
        folders = sorted(set(self.folders.values()))
        moves = " && ".join(f"echo $$ > {shlex.quote(str(p / 'cgroup.procs'))}" for p in folders)
        remount = f'{{ {" && ".join(self.mounts)}; }} || exit 97; exec "$@"'
        namespaced = f"unshare --cgroup --mount --propagation private sh -c {shlex.quote(remount)} sh"
        return ["sh", "-c", f'{{ {moves}; }} || exit 96; exec {namespaced} "$@"', "sh", *argv]


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """This process's mounts: (root inside the file system, mount point, type, super options)."""
    rows = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        fields, (fs_type, _source, options) = before.split(), after.split()[:3]
        rows.append((fields[3], fields[4], fs_type, set(options.split(","))))
    return rows


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup in each hierarchy: controller ("" for cgroup v2) -> its path."""
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            own[controller] = path
    return own


def _make_v2(made: _ChildCgroups, controllers: tuple[str, ...], name: str) -> None:
    # The namespace's own cgroup2 mount: the new cgroup is its root (cgroup2 will not mount on itself).
    made.mounts += [f"umount -l {_CGROUP_FS}", f"mount -t cgroup2 cgroup2 {_CGROUP_FS}"]
    parent = _CGROUP_FS / _own_cgroups()[""].lstrip("/")
    available = (parent / "cgroup.controllers").read_text().split()
    for controller in controllers:
        if controller not in available:
            pytest.skip(f"cgroup v2: the {controller} controller is not available in {parent} (only {available})")
    subtree = parent / "cgroup.subtree_control"
    for controller in controllers:
        if controller not in subtree.read_text().split():
            try:
                subtree.write_text(f"+{controller}")
            except OSError as exc:
                pytest.skip(f"cgroup v2 not writable here: cannot enable {controller} in {subtree}: {exc}")
            made.enabled.append((subtree, controller))
    try:
        (parent / name).mkdir()
    except OSError as exc:
        pytest.skip(f"cgroup v2 not writable here: cannot create {parent / name}: {exc}")
    made.folders = dict.fromkeys(controllers, parent / name)


def _make_v1(made: _ChildCgroups, controllers: tuple[str, ...], name: str) -> None:
    made.mounts.append(f"mount -t tmpfs cgroup {_CGROUP_FS}")
    known = {line.split()[0] for line in Path("/proc/cgroups").read_text().splitlines() if not line.startswith("#")}
    own = _own_cgroups()
    for controller in controllers:
        found = [(root, at, opts) for root, at, kind, opts in _mounts() if kind == "cgroup" and controller in opts]
        if not found or controller not in own:
            pytest.skip(f"/sys/fs/cgroup is not cgroup2, and no cgroup v1 hierarchy has the {controller} controller")
        root, at, options = found[0]
        relative = os.path.relpath(own[controller], root)
        if relative.startswith(".."):
            pytest.skip(f"cgroup v1: this process's {controller} cgroup {own[controller]} is outside the mount {at}")
        folder = Path(at) / relative / name
        try:
            folder.mkdir()
        except OSError as exc:
            pytest.skip(f"cgroup v1 not writable here: cannot create {folder}: {exc}")
        made.folders[controller] = folder
        # Mounted where dask and distributed read it: dask reads a v1 CPU quota only under
        # cpu,cpuacct (or cpuacct,cpu), as systemd and container runtimes name it; not under
        # cpu/, where a host may mount the cpu controller alone.
        target = _CGROUP_FS / ("cpu,cpuacct" if controller == "cpu" else controller)
        hierarchy = ",".join(sorted(options & known))
        made.mounts += [
            f"mkdir -p {shlex.quote(str(target))}",
            f"mount -t cgroup -o {hierarchy} cgroup {shlex.quote(str(target))}",
        ]


@contextlib.contextmanager
def _child_cgroups(*controllers: str) -> Iterator[_ChildCgroups]:
    """New cgroups (with ``controllers``) for child processes, under this process's own; removed after."""
    if not sys.platform.startswith("linux"):
        pytest.skip("cgroups are Linux's")
    if os.geteuid() != 0:
        pytest.skip(f"making cgroups and namespaces needs root (this is euid {os.geteuid()})")
    for tool in ("unshare", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} (util-linux) is not installed here")
    on_cgroup_fs = [kind for _, at, kind, _ in _mounts() if at == str(_CGROUP_FS)]
    name = f"relu-dask-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    made = _ChildCgroups(2 if on_cgroup_fs[-1:] == ["cgroup2"] else 1)
    try:
        (_make_v2 if made.version == 2 else _make_v1)(made, controllers, name)
        probe = subprocess.run(made.command("true"), capture_output=True, text=True, timeout=60)
        if probe.returncode != 0:
            step = {96: "moving a process into it", 97: "mounting /sys/fs/cgroup again in new namespaces"}
            pytest.skip(
                f"cgroup v{made.version}: {step.get(probe.returncode, 'unshare --cgroup --mount')} "
                f"is not allowed here (exit {probe.returncode}: {probe.stderr.strip()})"
            )
        yield made
    finally:
        for folder in sorted(set(made.folders.values())):
            _remove_cgroup(folder)
        for subtree, controller in made.enabled:
            with contextlib.suppress(OSError):
                subtree.write_text(f"-{controller}")


def _remove_cgroup(folder: Path) -> None:
    """Remove a test's cgroup, once the processes the test started in it are gone."""
    deadline = time.monotonic() + 30
    while folder.exists():
        try:
            folder.rmdir()
        except OSError:
            if time.monotonic() > deadline:
                raise
            with contextlib.suppress(OSError, ValueError):
                for pid in (folder / "cgroup.procs").read_text().split():  # this test's children only
                    os.kill(int(pid), signal.SIGKILL)
            time.sleep(0.2)


def test_a_cgroup_cpu_quota_of_one_core_sizes_for_one() -> None:
    """A CPU quota of one core (``docker run --cpus 1``, a Kubernetes CPU limit): one core, one thread."""
    if count_cores() < 2:
        pytest.skip("this machine gives one core already: a quota of one would change nothing")
    with _child_cgroups("cpu") as cgroups:
        if cgroups.version == 2:
            cgroups.write("cpu", "cpu.max", f"{_PERIOD_US} {_PERIOD_US}")
        else:
            cgroups.write("cpu", "cpu.cfs_period_us", str(_PERIOD_US))
            cgroups.write("cpu", "cpu.cfs_quota_us", str(_PERIOD_US))
        inside = _sizing(*cgroups.command())
    assert inside["cores"] == 1
    assert inside["threads"][:2] == [1, 1]
    assert inside["local"][:2] == [1, 1]  # a LocalCluster of one worker with one thread
    assert _sizing()["cores"] == count_cores() > 1  # outside the cgroup: every core


#: Starts a LocalCluster as ``relu-dask run --scheduler local`` does; prints its sizing as JSON.
_LOCAL_CLUSTER = """
import json
from distributed.system import memory_limit
from relu_dask.schedulers import _scheduler_workers, open_session, parse_scheduler, plan_session
spec = parse_scheduler("local", dashboard_address="127.0.0.1:0")
plan = plan_session(spec)
with open_session(spec) as session:
    workers = [[int(w["nthreads"]), int(w["memory_limit"])] for w in _scheduler_workers(session.client).values()]
print(json.dumps({"distributed": memory_limit(), "per_thread": plan.memory_per_thread_bytes, "workers": workers}))
"""


def test_a_local_cluster_in_a_memory_limited_cgroup_is_sized_from_its_limit() -> None:
    """memory.max (cgroup v2) or memory.limit_in_bytes (v1) of 1 GiB: the plan and a LocalCluster's workers share it."""
    limit = 2**30
    if memory_limit_bytes() <= limit:
        pytest.skip(f"this process may use {memory_limit_bytes()} bytes already, not more than the 1 GiB to test")
    with _child_cgroups("memory") as cgroups:
        cgroups.write("memory", "memory.max" if cgroups.version == 2 else "memory.limit_in_bytes", str(limit))
        inside = _sizing(*cgroups.command())
        # Two cores at most, so that the workers' own memory stays well within the limit.
        two = sorted(os.sched_getaffinity(0))[:2] if hasattr(os, "sched_getaffinity") else []
        pin = ["taskset", "-c", ",".join(map(str, two))] if two and shutil.which("taskset") else []
        proc = subprocess.run(
            cgroups.command(*pin, PYTHON, "-c", _LOCAL_CLUSTER),
            capture_output=True,
            text=True,
            env=cli_env(),
            timeout=300,
        )
    assert proc.returncode == 0, proc.stderr
    cluster = json.loads(proc.stdout.splitlines()[-1])
    assert inside["memory"] == limit == cluster["distributed"]  # relu_dask reads what distributed reads
    threads, _, per_thread = inside["threads"]
    assert per_thread == limit // threads
    workers = cluster["workers"]
    assert sum(m for _, m in workers) == pytest.approx(limit, abs=len(workers))  # the workers share the 1 GiB
    for nthreads, memory in workers:  # and each thread has what the plan said
        assert memory // nthreads == pytest.approx(cluster["per_thread"], abs=1)
    assert memory_limit_bytes() > limit  # outside the cgroup: more


def test_a_local_cluster_gives_each_worker_the_memory_the_plan_counted_on() -> None:
    """One worker of one thread on a machine of more cores: distributed's "auto" would give it
    memory / cores; the plan counts on all the memory for its one thread."""
    spec = parse_scheduler("local", num_workers=1, threads_per_worker=1, dashboard_address="127.0.0.1:0")
    planned = plan_session(spec)
    with open_session(spec) as session:
        assert session.client is not None
        workers = session.client.scheduler_info()["workers"]
        assert [int(w["memory_limit"]) for w in workers.values()] == [planned.memory_per_thread_bytes]
    assert planned.memory_per_thread_bytes == memory_limit_bytes()


# distributed leaves the socket it tried the taken port with to the garbage collector
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_dashboard_port_in_use_is_served_elsewhere_without_distributeds_warning() -> None:
    """Another run's dashboard holds the port: relu-dask's own line gives the link, and
    distributed's UserWarning does not reach the user (it broke the one-line output)."""
    import socket
    import warnings

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        spec = parse_scheduler("local", num_workers=1, threads_per_worker=1, dashboard_address=f"127.0.0.1:{port}")
        with warnings.catch_warnings(record=True) as caught, open_session(spec) as session:
            warnings.simplefilter("always", UserWarning)
            assert session.dashboard_link and f":{port}/" not in session.dashboard_link
    assert not [w for w in caught if "already in use" in str(w.message)]
