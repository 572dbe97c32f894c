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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, TypeVar

from relu_dask.errors import DestinationInUseError, NotWritableError, ProcessingError, ReluDaskError
from relu_dask.journal import adopt_legacy_journal, journal_dir, legacy_files, legacy_journal_dir
from relu_dask.locations import Location

T = TypeVar("T")
U = TypeVar("U")

__all__ = ["HEARTBEAT_S", "STALE_AFTER_S", "adopt_if_idle", "hold_lock", "hold_lock_after", "lock_holder", "moved_in"]

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
        recorded = owner.get("pid_started")  # None: its start time could not be read then
        if isinstance(recorded, int | float) and abs(start - float(recorded)) > 1.0:
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
    An older relu-dask's lock beside DEST is honoured too, and its record moved into DEST
    (:func:`relu_dask.journal.adopt_legacy_journal`). A local DEST folder the lock made is
    removed again if the run leaves nothing in it.
    """
    lock = journal_dir(dest).child("lock")
    made_dest = dest.is_local and not dest.exists()
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_started": _process_start_time(os.getpid()),
        "started": time.time(),
        **({"following": True} if following else {}),
    }
    stop = threading.Event()
    beaten: list[float] = []  # when the lock was last written by us (monotonic): none until taken
    beat = threading.Thread(
        target=_heartbeat, args=(lock, stop, heartbeat_s, beaten), name="relu-dask-lock", daemon=True
    )
    legacy = legacy_journal_dir(dest)
    try:
        with ThreadPoolExecutor(1) as pool:  # is there an older relu-dask's record beside DEST? (meanwhile)
            older = pool.submit(legacy_files, dest)
            _acquire(lock, me, stale_after_s, dest)
            beaten[:] = [time.monotonic()]
            beat.start()
        if older.result():
            _refuse_if_held(legacy.child("lock"), stale_after_s, dest)
            adopt_legacy_journal(dest)
        yield
    finally:
        _finish_even_if_stopped(_release, lock, me, made_dest, stop, beat, beaten, stale_after_s)


@contextlib.contextmanager
def hold_lock_after(
    dest: Location, first: Callable[[Callable[[], None] | None], T], then: Callable[[], U] | None = None
) -> Iterator[tuple[T, U | None]]:
    """Run ``first``, then hold DEST's lock (:func:`hold_lock`) for the block; yield what
    ``first`` returned, and what ``then`` did under the lock.

    On an object store the lock is taken while ``first`` runs (a round trip less one after
    another), then ``then`` runs at once (it reads DEST, say); a failure of ``first`` is
    still said before a refused lock, as if it had run first. ``first`` only reads; it is
    passed a function that waits for the lock (None where it is taken after ``first``), for
    what it must read under it (an older relu-dask's record, which the lock moves into DEST).
    Elsewhere ``then`` is not called (None: the caller reads DEST itself, under the lock).
    """
    if dest.object_store is None:
        value = first(None)
        with hold_lock(dest):
            yield value, None
        return
    with contextlib.ExitStack() as held:

        def take() -> U | None:
            held.enter_context(hold_lock(dest))
            return then() if then is not None else None

        with ThreadPoolExecutor(1) as pool:
            taking = pool.submit(take)

            def locked() -> None:
                taking.result()

            try:
                value = first(locked)
            finally:
                wait([taking])  # taken (and let go by ``held``) or refused, before anything goes on
        yield value, taking.result()


def _release(
    lock: Location,
    me: dict[str, Any],
    made_dest: bool,
    stop: threading.Event,
    beat: threading.Thread,
    beaten: list[float],
    stale_after_s: float,
) -> None:
    """Remove our lock. Written by us less than half the stale age ago, nobody can have taken
    it over (on an object store, the read that checks is a round trip saved); else it is read
    first, and removed only if it is still ours."""
    stop.set()
    if beat.is_alive():
        beat.join()
    with contextlib.suppress(OSError, ValueError):
        recent = bool(beaten) and time.monotonic() - beaten[-1] < stale_after_s / 2
        if beaten and (recent or json.loads(lock.read_text()).get("pid") == me["pid"]):
            lock.remove()
    folder = lock.parent()
    if folder.is_local:  # a run refused under the lock leaves nothing behind
        with contextlib.suppress(OSError):
            folder.path.rmdir()
            if made_dest:
                folder.parent().path.rmdir()


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


def _refuse_if_held(lock: Location, stale_after_s: float, dest: Location) -> None:
    """Raise :class:`DestinationInUseError` if a live process holds ``lock``."""
    found = _read_owner(lock)
    if found is not None and found[0] and _stale_reason(found[0], found[1], stale_after_s) is None:
        _refuse(found[0], lock, dest)


def _refuse(owner: dict[str, Any], lock: Location, dest: Location) -> None:
    if owner.get("following"):
        raise DestinationInUseError(
            f"DEST {dest} is kept up to date by a relu-dask follow, {_describe(owner)}: it processes what SOURCE "
            f"gains itself; stop it (SIGTERM, or Ctrl-C where it runs) to run something else on DEST (lock: {lock})"
        )
    raise DestinationInUseError(
        f"DEST {dest} is in use by another relu-dask run, {_describe(owner)}; wait for it to finish (lock: {lock})"
    )


def _take_over_if_stale(lock: Location, stale_after_s: float, dest: Location) -> None:
    found = _read_owner(lock)
    if found is None:
        return  # released meanwhile: try again
    owner, age_s = found
    if not owner and age_s < _BEING_WRITTEN_S:  # being written right now
        time.sleep(0.2)
        return
    reason = _stale_reason(owner, age_s, stale_after_s) if owner else "it is unreadable"
    if reason is None:
        _refuse(owner, lock, dest)
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
    """Who holds DEST's lock now (``pid N on HOST (since ...)``), or None if nobody alive does
    (an older relu-dask's lock beside DEST counts too)."""
    for lock in (journal_dir(dest).child("lock"), legacy_journal_dir(dest).child("lock")):
        found = _read_owner(lock)
        if found and found[0] and _stale_reason(found[0], found[1], STALE_AFTER_S) is None:
            return _describe(found[0])
    return None


def adopt_if_idle(dest: Location) -> bool:
    """Move an older relu-dask's record of DEST into DEST (see
    :func:`relu_dask.journal.adopt_legacy_journal`) unless a run holds DEST now; return
    whether a record was moved. For the commands that read DEST's record without its lock
    (``status``, ``plan``, a run before it locks DEST): one listing when there is none."""
    if not legacy_files(dest) or lock_holder(dest) is not None:
        return False
    try:
        return adopt_legacy_journal(dest)
    except OSError as exc:  # read-only, say: it is read where it is (or moved by the next run)
        log.debug("DEST %s: the older record beside it not moved: %s", dest, exc)
        return False


def moved_in(dest: Location, locked: Callable[[], None] | None) -> bool:
    """Whether an older relu-dask's record beside DEST is now inside it: moved by our lock
    once ``locked`` (see :func:`hold_lock_after`) returns, or here if nobody holds DEST."""
    if locked is None:
        return adopt_if_idle(dest)
    locked()
    return True


def _heartbeat(lock: Location, stop: threading.Event, every_s: float, beaten: list[float]) -> None:
    while not stop.wait(every_s):
        with contextlib.suppress(OSError):
            lock.touch()
            beaten[:] = [time.monotonic()]
