"""DEST's lock: one run (or follow) at a time per DEST, on one machine or many.

:func:`hold_lock` takes ``lock`` in DEST's journal folder (:func:`relu_dask.journal.journal_dir`)
for a run: host, pid and process start time, with its file's mtime as a heartbeat. A lock
whose process is gone (same host) or whose heartbeat stopped (another host) is taken over;
any other is refused with who holds it (:class:`relu_dask.errors.DestinationInUseError`).
:func:`lock_holder` says who holds it, for ``relu-dask status``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from relu_dask.errors import DestinationInUseError, NotWritableError, ProcessingError, ReluDaskError
from relu_dask.journal import journal_dir
from relu_dask.locations import Location

__all__ = ["HEARTBEAT_S", "STALE_AFTER_S", "hold_lock", "lock_holder"]

log = logging.getLogger(__name__)


#: Seconds between heartbeats of a held lock (its file's mtime).
HEARTBEAT_S = 10.0


#: A lock from another host whose heartbeat is older than this is taken over.
STALE_AFTER_S = 120.0


def _process_start_time(pid: int) -> float | None:
    import psutil  # a dependency of distributed

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def _describe(owner: dict[str, Any]) -> str:
    if not owner:
        return "an unreadable lock (a run that could not finish writing it)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"pid {owner.get('pid')} on {owner.get('host')} (since {since})"


def _stale_reason(owner: dict[str, Any], age_s: float, stale_after_s: float) -> str | None:
    """Why a lock is stale, or None if its holder may still be running."""
    if owner.get("host") == socket.gethostname():
        start = _process_start_time(int(owner.get("pid", -1)))
        if start is None:
            return "its process is gone"
        if abs(start - float(owner.get("pid_started", start))) > 1.0:
            return "its pid now belongs to another process"
        return None
    if age_s > stale_after_s:
        return f"its heartbeat is {age_s:.0f} s old"
    return None


@contextlib.contextmanager
def hold_lock(
    dest: Location, *, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S, following: bool = False
) -> Iterator[None]:
    """Hold DEST's lock for the duration; raise :class:`DestinationInUseError` if held.

    A lock whose holder is gone (same host: its pid is gone or reused; another host: no
    heartbeat for ``stale_after_s``) is taken over with a warning. ``following``: the
    holder is a follow (``run --follow``), which may hold it for days: a run refused says so.
    """
    lock = journal_dir(dest).child("lock")
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_started": _process_start_time(os.getpid()),
        "started": time.time(),
        **({"following": True} if following else {}),
    }
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lock, stop, heartbeat_s), name="relu-dask-lock", daemon=True)
    try:
        _acquire(lock, me, stale_after_s, dest)
        beat.start()
        yield
    finally:
        _finish_even_if_stopped(_release, lock, me, dest, stop, beat)


def _release(lock: Location, me: dict[str, Any], dest: Location, stop: threading.Event, beat: threading.Thread) -> None:
    stop.set()
    if beat.is_alive():
        beat.join()
    with contextlib.suppress(OSError, ValueError):
        if json.loads(lock.read_text()).get("pid") == me["pid"]:
            lock.remove()
    folder = journal_dir(dest)
    if folder.is_local:  # a run refused under the lock leaves nothing behind
        with contextlib.suppress(OSError):
            folder.path.rmdir()


def _finish_even_if_stopped(step: Any, *args: Any) -> None:
    """Run ``step`` to its end even if SIGTERM or Ctrl-C arrives meanwhile; then let the stop through.

    A lock left behind by a stopped run would refuse the next one (from another host, for
    ``STALE_AFTER_S``).
    """
    stopped: BaseException | None = None
    while True:
        try:
            step(*args)
            break
        except KeyboardInterrupt as exc:  # StopRequested too: finish first
            stopped = exc
    if stopped is not None:
        raise stopped


def _acquire(lock: Location, me: dict[str, Any], stale_after_s: float, dest: Location) -> None:
    end = time.monotonic() + _BEING_WRITTEN_S + 1.0  # a lock another run is writing now: read again
    while time.monotonic() < end:
        try:
            if lock.create(json.dumps(me)):
                return
        except OSError as exc:
            raise _cannot_write(lock, exc) from None
        _take_over_if_stale(lock, stale_after_s, dest)
    raise DestinationInUseError(f"could not take the lock {lock}: other runs keep taking it; try again")


def _cannot_write(lock: Location, exc: OSError) -> ReluDaskError:
    """The one line for a lock that cannot be written: a read-only or foreign folder, or an
    object store that refuses (exit 2), or a full disk and other I/O errors (exit 1)."""
    why = exc.strerror or str(exc)
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return NotWritableError(f"cannot write DEST's lock {lock} ({why}): DEST's folder must be writable")
    if not lock.is_local:  # a bucket that is not there, credentials that may not write, an endpoint down
        return NotWritableError(f"cannot write DEST's lock {lock} ({why}): check DEST's bucket and storage options")
    return ProcessingError(f"cannot write DEST's lock {lock} ({why}): free some space (or fix the disk) and rerun")


#: Seconds an empty or unreadable lock is taken for one another run is writing right now.
_BEING_WRITTEN_S = 5.0


def _read_owner(lock: Location) -> tuple[dict[str, Any], float] | None:
    """The lock's holder and the age of its heartbeat, or None if the lock is gone."""
    stat = lock.stat()
    if stat is None:
        return None
    age_s = time.time() - stat[1]
    try:
        return json.loads(lock.read_text()), age_s
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}, age_s


def _take_over_if_stale(lock: Location, stale_after_s: float, dest: Location) -> None:
    found = _read_owner(lock)
    if found is None:
        return  # released meanwhile: try again
    owner, age_s = found
    if not owner and age_s < _BEING_WRITTEN_S:  # being written right now
        time.sleep(0.2)
        return
    reason = _stale_reason(owner, age_s, stale_after_s) if owner else "it is unreadable"
    if reason is None and owner.get("following"):
        raise DestinationInUseError(
            f"DEST {dest} is kept up to date by a relu-dask follow, {_describe(owner)}: it processes what SOURCE "
            f"gains itself; stop it (SIGTERM, or Ctrl-C where it runs) to run something else on DEST (lock: {lock})"
        )
    if reason is None:
        raise DestinationInUseError(
            f"DEST {dest} is in use by another relu-dask run, {_describe(owner)}; wait for it to finish (lock: {lock})"
        )
    # Locally only one of several runs taking over can win this rename.
    aside = lock.sibling(f"lock.stale-{os.getpid()}")
    if not lock.rename_to(aside):
        return
    try:
        taken = json.loads(aside.read_text()) if owner else {}
    except (OSError, ValueError):
        taken = {}
    if taken != owner:  # another run took the stale lock first and made a fresh one: give it back
        with contextlib.suppress(OSError):
            aside.rename_to(lock)
        return
    aside.remove()
    log.warning("took over the lock of a run that is no longer running (%s; %s)", _describe(owner), reason)


def lock_holder(dest: Location) -> str | None:
    """Who holds DEST's lock now (``pid N on HOST (since ...)``), or None if nobody alive does."""
    found = _read_owner(journal_dir(dest).child("lock"))
    if not found or not found[0]:
        return None
    owner, age_s = found
    return None if _stale_reason(owner, age_s, STALE_AFTER_S) else _describe(owner)


def _heartbeat(lock: Location, stop: threading.Event, every_s: float) -> None:
    while not stop.wait(every_s):
        with contextlib.suppress(OSError):
            lock.touch()
