"""Schedulers: picking one by name, sizing it for the machine, starting it.

Use :func:`parse_scheduler` to turn ``--scheduler`` into a :class:`SchedulerSpec`,
:func:`plan_session` to size it without starting anything, and :func:`open_session` to get
it ready (starting or connecting to a cluster); :func:`relu_dask.computing.compute`
computes dask collections on the session.

Schedulers, picked by name; distributed is imported only when asked for:

* ``synchronous`` -- one task at a time in this thread (for debugging);
* ``threads`` -- dask's thread pool, one thread per core (the default);
* ``processes`` -- dask's process pool, one process per core;
* ``local`` -- a ``dask.distributed`` LocalCluster started for the run, dashboard on
  127.0.0.1;
* ``tcp://HOST:PORT`` -- an existing ``dask.distributed`` scheduler.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relu_dask import chunking, livepage
from relu_dask.errors import InputError
from relu_dask.kernel import numexpr_threads_for

__all__ = [
    "CONNECT_TIMEOUT_S",
    "DASHBOARD_ADDRESS",
    "DEFAULT_RETRIES",
    "LOCAL_SCHEDULERS",
    "SchedulerSpec",
    "Session",
    "check_workers_see",
    "cores_at_most",
    "count_cores",
    "memory_limit_bytes",
    "open_session",
    "parse_scheduler",
    "plan_session",
    "refuse_in_a_spawned_copy_of_main",
]

log = logging.getLogger(__name__)

LOCAL_SCHEDULERS = ("synchronous", "threads", "processes")
_SCHEDULERS = (*LOCAL_SCHEDULERS, "local")
#: Seconds to wait for an existing scheduler to answer before giving up.
CONNECT_TIMEOUT_S = 10.0
#: Seconds to wait for a LocalCluster and its client to close.
CLOSE_TIMEOUT_S = 20.0
#: Tries again of a distributed task that raised (a worker lost mid-task is handled by
#: the scheduler itself: its tasks are rescheduled on the other workers).
DEFAULT_RETRIES = 2
#: Where a LocalCluster serves its dashboard: loopback only, unless the user says otherwise.
DASHBOARD_ADDRESS = "127.0.0.1:8787"


@dataclass(frozen=True)
class SchedulerSpec:
    """Which scheduler to run on, and how to size it."""

    name: str
    """synchronous, threads, processes, local or address."""
    address: str | None = None
    """The scheduler's address, for ``name == "address"``."""
    num_workers: int | None = None
    """Workers (local) or pool size (threads, processes); default: fitted to the machine."""
    threads_per_worker: int | None = None
    """Threads per LocalCluster worker; default: fitted to the machine."""
    memory_limit_bytes: int | None = None
    """Memory limit per LocalCluster worker; default: the machine's memory shared out."""
    dashboard_address: str | None = None
    """Where a LocalCluster serves its dashboard (None: :data:`DASHBOARD_ADDRESS`); for the
    other schedulers, where relu-dask serves its live page (None: nowhere)."""
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    """Seconds to wait for an existing scheduler before giving up."""
    scheduler_file: str | None = None
    """A scheduler file (``dask scheduler --scheduler-file``, dask-jobqueue), for ``name == "address"``."""
    retries: int = DEFAULT_RETRIES
    """How often a distributed task that failed is tried again (a lost worker does not count)."""

    @property
    def label(self) -> str:
        if self.name != "address":
            return self.name
        return self.address or f"scheduler file {self.scheduler_file}"


def parse_scheduler(
    text: str,
    *,
    num_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | int | None = None,
    dashboard_address: str | None = None,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    scheduler_file: str | None = None,
    retries: int = DEFAULT_RETRIES,
) -> SchedulerSpec:
    """Parse ``--scheduler`` and its sizing options (``dashboard_address``: where a
    LocalCluster serves its dashboard, or relu-dask its live page for another scheduler).

    >>> parse_scheduler("tcp://127.0.0.1:8786").name
    'address'
    """
    value = str(text).strip()
    for what, number in (("workers", num_workers), ("threads per worker", threads_per_worker)):
        if number is not None and number < 1:
            raise InputError(f"the number of {what} must be at least 1, got {number}")
    limit = None if memory_limit in (None, "auto") else chunking.parse_bytes(memory_limit, what="memory limit")
    if retries < 0:
        raise InputError(f"retries must be 0 or more, got {retries}")
    if not connect_timeout_s > 0:
        raise InputError(f"the connect timeout must be positive seconds, got {connect_timeout_s}")
    if scheduler_file is not None:
        if value not in ("threads", ""):
            raise InputError("give either --scheduler or --scheduler-file, not both")
        if not Path(scheduler_file).is_file():
            raise InputError(f"scheduler file {scheduler_file} does not exist: is the scheduler running?")
        _check_address(dashboard_address)
        return SchedulerSpec(
            "address",
            None,
            dashboard_address=dashboard_address,
            connect_timeout_s=float(connect_timeout_s),
            scheduler_file=str(scheduler_file),
            retries=retries,
        )
    _check_address(dashboard_address)
    if "://" in value:
        if not value.startswith(("tcp://", "tls://", "inproc://", "ws://", "wss://")):
            raise InputError(f"scheduler address {value!r} must start with tcp:// (or tls://)")
        return SchedulerSpec(
            "address",
            value,
            dashboard_address=dashboard_address,
            connect_timeout_s=float(connect_timeout_s),
            retries=retries,
        )
    if value not in _SCHEDULERS:
        raise InputError(f"scheduler must be one of {', '.join(_SCHEDULERS)} or tcp://HOST:PORT, got {value!r}")
    if value == "local" or dashboard_address is not None:
        _warn_if_public(dashboard_address or DASHBOARD_ADDRESS)
    return SchedulerSpec(value, None, num_workers, threads_per_worker, limit, dashboard_address, retries=retries)


def _check_address(address: str | None) -> None:
    """A ``--dashboard-address`` is ``HOST:PORT`` (port 0: any free one)."""
    if address is None:
        return
    _, colon, port = address.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise InputError(f"--dashboard-address must be HOST:PORT, such as 127.0.0.1:8787, got {address!r}")


def _warn_if_public(dashboard_address: str) -> None:
    host = dashboard_address.rpartition(":")[0].strip("[]") if ":" in dashboard_address else dashboard_address
    if host in ("", "0.0.0.0", "::", "*"):
        log.warning(
            "the dashboard binds to all interfaces (%s): anyone who can reach it can watch the cluster, "
            "and its scheduler runs code for whoever can reach it; prefer 127.0.0.1 and an SSH tunnel",
            dashboard_address,
        )


@dataclass
class Session:
    """A scheduler ready to compute on."""

    spec: SchedulerSpec
    num_threads: int
    """Tasks that run at once."""
    cores_per_thread: int
    """Cores each task may use (numexpr threads are sized from it)."""
    memory_per_thread_bytes: int | None
    """Memory one task may use, for the planner's check."""
    client: Any = None
    """The ``distributed.Client``, for distributed schedulers."""
    dashboard_link: str | None = None
    live_page: str | None = None
    """Where relu-dask's live page is served (:mod:`relu_dask.livepage`), if anywhere."""


def plan_session(spec: SchedulerSpec) -> Session:
    """A session's sizing, without starting anything (what a dry run shows)."""
    cores = count_cores()
    memory = memory_limit_bytes()
    if spec.name == "synchronous":
        return Session(spec, 1, cores, memory)
    if spec.name in ("threads", "processes"):
        workers = spec.num_workers or cores
        return Session(spec, workers, numexpr_threads_for(workers, cores), memory // workers)
    if spec.name == "local":
        workers, threads = _local_sizes(spec, cores)
        limit = spec.memory_limit_bytes or memory // workers
        return Session(spec, workers * threads, numexpr_threads_for(workers * threads, cores), limit // threads)
    return Session(spec, 0, 1, None)  # an existing cluster: known once connected


def _local_sizes(spec: SchedulerSpec, cores: int) -> tuple[int, int]:
    if spec.num_workers and spec.threads_per_worker:
        return spec.num_workers, spec.threads_per_worker
    if spec.num_workers:
        return spec.num_workers, max(1, cores // spec.num_workers)
    if spec.threads_per_worker:
        return max(1, cores // spec.threads_per_worker), spec.threads_per_worker
    from distributed.deploy.utils import nprocesses_nthreads

    workers, threads = nprocesses_nthreads(cores)
    return int(workers), int(threads)


def count_cores() -> int:
    """Cores this process may use: its CPU affinity (``taskset``, a Slurm allocation's cpuset)
    and a cgroup CPU quota (a container's ``--cpus``), as dask reckons them, at least 1."""
    from dask.system import cpu_count

    return max(1, int(cpu_count()))


def cores_at_most() -> int:
    """At least :func:`count_cores`, without importing dask: the CPUs this process may run on
    (dask's count is these, or fewer under a cgroup quota)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


#: Memory limits a process may be under, as ``distributed.system.memory_limit`` reads them:
#: cgroup v1 hard and soft limits, cgroup v2 ``max``, ``high`` and ``low``.
_CGROUP_MEMORY_FILES = (
    "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    "/sys/fs/cgroup/memory/memory.soft_limit_in_bytes",
    "/sys/fs/cgroup/memory.max",
    "/sys/fs/cgroup/memory.high",
    "/sys/fs/cgroup/memory.low",
)


def memory_limit_bytes() -> int:
    """Memory this process may use: the machine's, or less under a cgroup limit or RLIMIT_RSS.

    The same sources, in the same way, as ``distributed.system.memory_limit`` (which a
    LocalCluster's ``memory_limit="auto"`` uses), without importing distributed, which would
    cost every local run about 0.25 s of start-up; ``tests/test_schedulers.py`` checks that
    the two agree.
    """
    import psutil  # a dependency of distributed

    limit = int(psutil.virtual_memory().total)
    if sys.platform == "linux":
        for path in _CGROUP_MEMORY_FILES:
            with contextlib.suppress(OSError, ValueError):
                value = int(Path(path).read_text())  # "max" (no limit) is not a number
                if value > 0:
                    limit = min(limit, value)
    with contextlib.suppress(ImportError, OSError, ValueError):
        import resource

        hard = resource.getrlimit(resource.RLIMIT_RSS)[1]
        if 0 < hard < limit:
            limit = hard
    return limit


@contextlib.contextmanager
def open_session(spec: SchedulerSpec) -> Iterator[Session]:
    """Start (or connect to) the scheduler; close what was started on the way out."""
    session = plan_session(spec)
    if spec.name == "local":
        with _local_cluster(spec, session) as started:
            yield started
        return
    with contextlib.ExitStack() as stack:
        if spec.name not in LOCAL_SCHEDULERS:
            session = stack.enter_context(_connect(spec))
        if spec.dashboard_address is not None:  # the live page, served by relu-dask itself
            session.live_page = stack.enter_context(livepage.serve(spec.dashboard_address))
            log.info("live page: %s", session.live_page)
        yield session


@contextlib.contextmanager
def _local_cluster(spec: SchedulerSpec, session: Session) -> Iterator[Session]:
    import dask
    from distributed import Client, LocalCluster

    workers, threads = _local_sizes(spec, count_cores())
    # Each worker gets the memory the plan counted on (distributed's "auto" would give
    # memory x threads / cores, less than that where workers x threads < cores).
    assert session.memory_per_thread_bytes is not None
    limit = session.memory_per_thread_bytes * threads
    refuse_in_a_spawned_copy_of_main()
    try:
        with warnings.catch_warnings():
            # distributed says so when the dashboard's port is taken (another run's): it serves
            # the dashboard on another port, and the line below gives the link.
            warnings.filterwarnings("ignore", message=r"Port \d+ is already in use", category=UserWarning)
            # the scheduler (in this process) serves the live page among the dashboard's routes
            routes = [*dask.config.get("distributed.scheduler.http.routes", []), "relu_dask.livepage"]
            with dask.config.set({"distributed.scheduler.http.routes": routes}):
                cluster = LocalCluster(
                    n_workers=workers,
                    threads_per_worker=threads,
                    memory_limit=limit,
                    host="127.0.0.1",
                    dashboard_address=spec.dashboard_address or DASHBOARD_ADDRESS,
                    processes=True,
                    # A failed task is reported once, as one line, by relu-dask; the workers' own
                    # tracebacks are for --debug.
                    silence_logs=logging.WARNING if log.isEnabledFor(logging.DEBUG) else logging.CRITICAL,
                )
    except Exception as exc:
        if _main_is_a_script():  # the commonest cause by far: a script without the guard
            raise InputError(
                f"the LocalCluster's workers failed to start ({type(exc).__name__}: {exc}); if a script calls "
                'relu_dask at its top level, put the call under `if __name__ == "__main__":` (each worker '
                "process imports the script again)"
            ) from exc
        raise
    try:
        client = Client(cluster)
        try:
            from relu_dask.workers import install

            install(client)  # its processes leave a stop by SIGTERM or Ctrl-C to relu-dask
            session.client = client
            session.dashboard_link = client.dashboard_link
            session.live_page = livepage.page_url(client.dashboard_link)
            log.info(
                "started a LocalCluster: %d worker(s) x %d thread(s), dashboard %s, live page %s",
                workers,
                threads,
                client.dashboard_link,
                session.live_page,
            )
            yield session
        finally:
            client.close(timeout=CLOSE_TIMEOUT_S)
    finally:
        cluster.close(timeout=CLOSE_TIMEOUT_S)


def _main_is_a_script() -> bool:
    """Whether this process runs a Python script of the user's (not relu-dask's command)."""
    main = vars(sys.modules["__main__"]) if "__main__" in sys.modules else {}
    return bool(main.get("__file__")) and main.get("__spec__") is None


def refuse_in_a_spawned_copy_of_main() -> None:
    """Refuse a run called from the top level of the user's script while a worker process
    that multiprocessing's spawn started imports it again (as ``__mp_main__``): the script
    lacks the ``if __name__ == "__main__":`` guard, and each worker would start a run of its own."""
    import inspect

    frame = inspect.currentframe()
    while frame is not None and not (
        frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "__mp_main__"
    ):
        frame = frame.f_back
    if frame is not None:  # the top level of the script, run again by multiprocessing's spawn
        raise InputError(
            "relu_dask was called at the top level of a script that a worker process it started is importing "
            'again (multiprocessing\'s spawn): put the call under `if __name__ == "__main__":`'
        )


@contextlib.contextmanager
def _connect(spec: SchedulerSpec) -> Iterator[Session]:
    from distributed import Client

    where = spec.address or spec.scheduler_file
    try:
        if spec.scheduler_file:
            client = Client(scheduler_file=spec.scheduler_file, timeout=f"{spec.connect_timeout_s}s")
        else:
            client = Client(spec.address, timeout=f"{spec.connect_timeout_s}s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise InputError(
            f"cannot reach the dask scheduler at {where} within {spec.connect_timeout_s:g} s: is it running? ({exc})"
        ) from None
    try:
        info = _scheduler_workers(client)
        if not info:
            raise InputError(f"the dask scheduler at {where} has no workers: start some with `dask worker ADDRESS`")
        threads = sum(int(w["nthreads"]) for w in info.values())
        per_thread = min(int(w["memory_limit"]) // max(1, int(w["nthreads"])) or 2**62 for w in info.values())
        cores = client.run(count_cores)
        cores_per_thread = min(max(1, int(cores[a]) // max(1, int(w["nthreads"]))) for a, w in info.items())
        log.info(
            "connected to %s: %d worker(s), %d thread(s), dashboard %s",
            where,
            len(info),
            threads,
            client.dashboard_link,
        )
        yield Session(spec, threads, cores_per_thread, per_thread, client, client.dashboard_link)
    finally:
        client.close(timeout=CLOSE_TIMEOUT_S)


def _scheduler_workers(client: Any) -> dict[str, Any]:
    """Every worker's info (recent distributed lists only the first few unless asked)."""
    try:
        return dict(client.scheduler_info(n_workers=-1)["workers"])
    except TypeError:  # distributed before 2025.4 has no n_workers and lists all
        return dict(client.scheduler_info()["workers"])


def check_workers_see(session: Session, read_paths: Sequence[str], write_paths: Sequence[str]) -> None:
    """Raise :class:`InputError` naming any cluster worker that cannot read or write where it must.

    A worker on another machine without the shared file system would otherwise fail deep in
    a task traceback. Local schedulers share this process's view: nothing to check.
    """
    if session.client is None:
        return
    seen = session.client.run(_probe_paths, list(read_paths), list(write_paths))
    for worker, missing in sorted(seen.items()):
        if missing:
            raise InputError(
                f"dask worker {worker} cannot see {', '.join(missing)}: SOURCE and DEST must be on storage "
                "every worker shares (the same path on every machine)"
            )


def _probe_paths(read_paths: list[str], write_paths: list[str]) -> list[str]:
    """Run on each worker: the paths it cannot read (or, for DEST's folder, write)."""

    missing = [p for p in read_paths if not os.access(p, os.R_OK)]
    missing += [f"{p} (to write)" for p in write_paths if not os.access(p, os.W_OK | os.X_OK)]
    return missing
