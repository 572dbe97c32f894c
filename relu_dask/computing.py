"""Computing dask collections on a session: a progress display, and a clean stop.

:func:`compute` runs collections on a :class:`~relu_dask.schedulers.Session` (dask's local
schedulers or a ``distributed`` client), with a progress bar on a terminal or log lines
otherwise. On SIGTERM or Ctrl-C a distributed computation cancels what has not started and
lets the running tasks finish (up to :data:`STOP_GRACE_S`); on the ``processes`` pool every
worker dies with relu-dask (:func:`die_with_parent`). It knows nothing of relu_dask's
tasks: progress counts the keys the collections hand back.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

from relu_dask.errors import InputError, heed_a_lost_stop
from relu_dask.schedulers import Session

if TYPE_CHECKING:
    from dask.callbacks import Callback

__all__ = [
    "PROGRESS_INTERVAL_S",
    "STOP_GRACE_S",
    "Progress",
    "compute",
    "die_with_parent",
    "import_dask_meanwhile",
    "pool_task",
]

log = logging.getLogger(__name__)

Progress = Literal["auto", "bar", "log", "none"]

#: Seconds between progress lines when the output is not a terminal.
PROGRESS_INTERVAL_S = 10.0


def compute(
    session: Session,
    collections: Sequence[Any],
    progress: Progress = "auto",
    progress_interval_s: float = PROGRESS_INTERVAL_S,
    performance_report: str | None = None,
    callbacks: Sequence[Callback] = (),
) -> list[Any]:
    """Compute dask ``collections`` on ``session`` with a progress display; return the results.

    On a distributed scheduler, ``performance_report`` saves dask's performance report of
    the computation there (an HTML file); on the local schedulers, dask's ``callbacks``
    watch it (a distributed scheduler has its own ways).
    """
    if not collections:
        return []
    mode = _progress_mode(progress)
    if session.client is not None:
        if performance_report:
            from distributed import performance_report as saved

            with saved(filename=performance_report):
                return _compute_distributed(session, collections, mode, progress_interval_s)
        return _compute_distributed(session, collections, mode, progress_interval_s)
    import dask
    from dask.callbacks import Callback

    outputs = _output_keys(collections)
    with contextlib.ExitStack() as stack:
        stack.enter_context(Callback(posttask=_heed_lost_stop))
        for callback in callbacks:
            stack.enter_context(callback)
        if mode == "bar":
            from dask.diagnostics import ProgressBar

            stack.enter_context(ProgressBar(out=sys.stderr))
        elif mode == "log":
            stack.enter_context(Callback(posttask=_LogProgress(outputs, progress_interval_s).posttask))
        kwargs: dict[str, Any] = {"scheduler": _local_get(session.spec.name)}
        if session.spec.name != "synchronous":
            kwargs["num_workers"] = session.num_threads
        if session.spec.name == "processes":
            kwargs["initializer"] = functools.partial(
                die_with_parent,
                os.getpid() if dask.config.get("multiprocessing.context", "spawn") in ("spawn", "fork") else None,
                dask.config.get("multiprocessing.initializer", None),  # the user's, still run
                os.getpid(),
            )
        return list(dask.compute(*collections, **kwargs))


def import_dask_meanwhile() -> None:
    """Start importing what computing needs and planning does not, in a thread of its own:
    dask (some 100 modules, about 0.1 s on a quiet 2-core machine, several times that where
    files open slowly) and relu_dask's version (DEST's provenance names it). For a run on an
    object store, called before its first round trips (SOURCE's metadata, DEST's lock), so
    that the imports go on while it waits for them; :func:`compute` imports dask when it
    needs it, waiting for this import if it is still under way. Not a daemon thread: an
    early exit waits for the import instead of ending the process in the middle of it.
    Nothing is started where dask is loaded already (another run in this process)."""
    if "dask" in sys.modules:
        return

    def load() -> None:
        with contextlib.suppress(Exception):  # the import is done again, and said, where needed
            import dask  # noqa: F401

            import relu_dask

            relu_dask.__version__  # noqa: B018 - looked up (importlib.metadata) and kept

    threading.Thread(target=load, name="relu-dask-imports").start()


def die_with_parent(parent_pid: int | None, then: Any = None, owner: int | None = None) -> None:
    """Make this process (a worker of the ``processes`` pool) die when its parent dies.

    Run by each pool worker as it starts. A killed relu-dask otherwise leaves its workers
    running (reparented to init) and writing chunk files and done markers into what the
    next run on the same DEST is doing. On Linux the kernel sends the worker SIGKILL when
    its parent dies (``prctl(PR_SET_PDEATHSIG)``). ``parent_pid``: relu-dask's pid where it
    is the workers' parent (the spawn and fork contexts; under forkserver the parent is the
    fork server, which ends with relu-dask): if it is gone already, the worker ends at once.
    ``then``: the user's own initializer (dask's ``multiprocessing.initializer``), run after.
    ``owner``: relu-dask's pid, whose SIGTERM (its pool ending the worker) is heeded.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1  # from <linux/prctl.h>
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)
    _locks_that_die_with_the_worker()
    # SIGTERM and Ctrl-C reach every process of the group (Slurm, systemd, a terminal): the
    # parent decides, and lets the running task finish; the worker is not cut short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if owner is not None and hasattr(signal, "sigwaitinfo"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # taken by the thread below only
        threading.Thread(target=_end_when_the_pool_says, args=(owner,), daemon=True).start()
    else:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if then is not None:
        then()


def _locks_that_die_with_the_worker() -> None:
    """In a pool worker, ``multiprocessing.Lock()`` makes locks of the fork context, which
    are nobody's business but this process's (as in relu-dask's own process on Linux).

    numcodecs' Blosc takes such a lock the first time it compresses. Made in the spawn
    context (a spawned worker's default), a lock is registered with the resource tracker the
    worker shares with relu-dask; a worker that dies by SIGKILL (killed, ended by a broken
    pool, its parent gone) leaves it registered, and when relu-dask ends the tracker prints
    "resource_tracker: There appear to be 1 leaked semaphore objects to clean up at
    shutdown" on its stderr, a line that is not relu-dask's. The worker starts no processes
    of its own, so nothing else changes. Where there is no fork (Windows), nothing is done.
    """
    import multiprocessing

    if "fork" in multiprocessing.get_all_start_methods():
        multiprocessing.set_start_method("fork", force=True)


#: In a ``processes`` pool worker: the tasks running now, and whether the pool ended it meanwhile.
_WORKER = {"running": 0, "ending": False}
_WORKER_LOCK = threading.Lock()


def _end_when_the_pool_says(owner: int) -> None:
    """A pool worker's SIGTERMs: the group's (Slurm, systemd, a terminal's kill) are left to
    relu-dask, as if ignored; one from ``owner`` (relu-dask: its pool ending the workers of a
    pool broken by a worker killed as it started, which then waits for them) ends the worker,
    once its running task is done (:func:`pool_task`). Ignored as well, that one left relu-dask
    waiting forever (2 stops in 80 under load, Python 3.13)."""
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid != owner:
            continue
        with _WORKER_LOCK:
            _WORKER["ending"] = True
            if _WORKER["running"]:
                continue
        _end_worker()


@contextlib.contextmanager
def pool_task() -> Iterator[None]:
    """Around a task: in a ``processes`` pool worker that its pool ended meanwhile, the worker
    ends once the task is done, its writes made (elsewhere: nothing)."""
    with _WORKER_LOCK:
        _WORKER["running"] += 1
    try:
        yield
    finally:
        with _WORKER_LOCK:
            _WORKER["running"] -= 1
            ending = _WORKER["ending"] and not _WORKER["running"]
        if ending:
            _end_worker()


def _end_worker() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # the pool has given up on this worker: nothing of its to keep


def _local_get(name: str) -> Any:
    """dask's get function for a local scheduler.

    Passed as a function, not a name: given a name, dask imports distributed to look for a
    default client, which costs a local run about 0.3 s of start-up.
    """
    if name == "synchronous":
        from dask.local import get_sync

        return get_sync
    if name == "processes":
        from dask.multiprocessing import get as get_processes

        return get_processes
    from dask.threaded import get as get_threads

    return get_threads


def _progress_mode(progress: Progress) -> str:
    if progress == "auto":
        return "bar" if sys.stderr.isatty() else "log"
    if progress not in ("bar", "log", "none"):
        raise InputError(f"progress must be auto, bar, log or none, got {progress!r}")
    return progress


def _output_keys(collections: Sequence[Any]) -> set[Any]:
    """The keys the collections hand back (for relu_dask's tasks, one per block): what progress counts."""
    from dask.core import flatten

    return {key for c in collections for key in flatten(c.__dask_keys__())}


def _log_progress(done: int, total: int) -> None:
    log.info(
        "progress: %d/%d tasks (%.0f%%)",
        done,
        total,
        100 * done / max(1, total),
        extra={"event": "progress", "fields": {"done": done, "total": total}},
    )


def _heed_lost_stop(key: Any, result: Any, dsk: Any, state: Any, id: Any) -> None:
    """A dask callback's ``posttask``: a stop dropped while dask computes
    (:func:`~relu_dask.errors.ask_to_stop`) raised once the next task ends, in the
    scheduler's loop, as if it had come there."""
    heed_a_lost_stop()


class _LogProgress:
    """Plain progress lines at a steady interval, for logs that are not a terminal (a dask
    callback's ``posttask``)."""

    def __init__(self, outputs: set[Any], interval_s: float = PROGRESS_INTERVAL_S) -> None:
        self.outputs = outputs
        self.num_tasks = len(outputs)
        self.interval_s = interval_s
        self.done = 0
        self.last = time.monotonic()

    def posttask(self, key: Any, result: Any, dsk: Any, state: Any, id: Any) -> None:
        if key not in self.outputs:
            return  # dask's own bookkeeping tasks (finalize, concatenate) are not blocks
        self.done += 1
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.last = now
            _log_progress(self.done, self.num_tasks)


def _compute_distributed(session: Session, collections: Sequence[Any], mode: str, interval_s: float) -> list[Any]:
    from distributed import futures_of

    client = session.client
    persisted = client.persist(list(collections), retries=session.spec.retries)
    futures = futures_of(persisted)
    try:
        _wait_with_progress(futures, mode, interval_s)
        return list(client.gather(client.compute(persisted)))
    except BaseException:  # stopped, or a task failed: nothing starts now, and what runs finishes
        _let_running_tasks_finish(client, futures)
        raise


#: Seconds a stopped run waits for its running tasks (threads, or a cluster's workers).
STOP_GRACE_S = 20.0


def _let_running_tasks_finish(client: Any, futures: list[Any]) -> None:
    """On a stop: cancel the tasks not yet running; wait (up to :data:`STOP_GRACE_S`) for
    those running, so that they write their masks and mark themselves done.

    A task a worker began between the scheduler's answer and the cancel runs on, out of the
    scheduler's sight: the workers' call stacks (``Client.call_stack``) still show it, and it
    is waited for too, lest closing the cluster kill it mid-write.
    """
    from distributed import wait

    end = time.monotonic() + STOP_GRACE_S
    with contextlib.suppress(Exception):  # a cluster that went away has nothing running
        running = {key for keys in client.processing().values() for key in keys}
        client.cancel([f for f in futures if f.key not in running])
        wait([f for f in futures if f.key in running], timeout=STOP_GRACE_S)
        ours = [f.key for f in futures]
        while time.monotonic() < end and any(client.call_stack(keys=ours).values()):
            time.sleep(0.05)


def _wait_with_progress(futures: list[Any], mode: str, interval_s: float) -> None:
    """Wait for ``futures``: a second at a time (a stop dropped meanwhile is raised again),
    with a progress bar or log lines as ``mode`` says."""
    from distributed import progress, wait

    if mode == "bar":
        progress(futures, notebook=False)
        return
    last = time.monotonic()
    while True:
        try:
            wait(futures, timeout=1.0)
            break
        except TimeoutError:
            heed_a_lost_stop()
            if mode == "log" and time.monotonic() - last >= interval_s:
                last = time.monotonic()
                _log_progress(sum(f.done() for f in futures), len(futures))
    if mode == "log":
        _log_progress(len(futures), len(futures))
