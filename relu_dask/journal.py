"""A job's record on disk: its fingerprint, which tasks are done, and who holds it.

Use this module to make a run resumable and exclusive. It lives beside DEST, in a hidden
folder ``.<DEST name>.relu-dask/`` (inside DEST, zarr would warn about an unknown object):

* ``job.json`` -- the job's fingerprint (what SOURCE was, the options that change the
  result, the block shape) and, once every task is done, ``"complete": true`` with the
  run's counts;
* ``done/<array>/<block index>`` -- one small file per finished task, written by the task
  itself right after its mask block was written (zarr >= 3.1.3 writes each chunk file
  atomically, through a temporary file and a rename), holding the task's counts;
* ``lock`` -- who runs the job now: host, pid, process start time; its mtime is a heartbeat.

Completion is never inferred from chunk keys: zarr does not store chunks equal to the fill
value, so an all-negative block leaves no key at all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relu_dask.errors import DestinationInUseError

__all__ = [
    "HEARTBEAT_S",
    "STALE_AFTER_S",
    "JobRecord",
    "hold_lock",
    "journal_dir",
    "lock_holder",
    "read_done",
    "read_record",
    "record_done",
    "remove_done_markers",
    "remove_journal",
    "write_record",
]

log = logging.getLogger(__name__)

#: Seconds between heartbeats of a held lock (its file's mtime).
HEARTBEAT_S = 10.0
#: A lock from another host whose heartbeat is older than this is taken over.
STALE_AFTER_S = 120.0
_FORMAT = 1


def journal_dir(dest: Path) -> Path:
    """The hidden folder beside DEST that records the job: ``.<name>.relu-dask``."""
    return dest.parent / f".{dest.name}.relu-dask"


def remove_done_markers(dest: Path) -> None:
    """Drop the per-task markers of a complete job (``job.json`` keeps its counts)."""
    shutil.rmtree(journal_dir(dest) / "done", ignore_errors=True)


def remove_journal(dest: Path) -> None:
    """Forget the job of DEST (all but the lock, which its holder removes)."""
    folder = journal_dir(dest)
    shutil.rmtree(folder / "done", ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (folder / "job.json").unlink()


@dataclass
class JobRecord:
    """What ``job.json`` holds."""

    fingerprint: dict[str, Any]
    """Source identity and the options that change the result."""
    block_shapes: list[list[int]]
    """The block shape of each array, so that a resumed run cuts the same tasks."""
    complete: bool = False
    counts: list[list[int]] | None = None
    """Per array, the summed task counts, once complete."""
    unit_ones: list[list[int] | None] | None = None
    """Per array, the per-unit ones of a ``--stats`` run, once complete."""
    unit_axes: list[int | None] | None = None
    """Per array, the unit axis those per-unit ones are along."""

    def to_json(self) -> str:
        return json.dumps({"format": _FORMAT, **self.__dict__}, indent=1, sort_keys=True)


def read_record(dest: Path) -> JobRecord | None:
    """The job recorded for DEST, or None (none, unreadable or from another format)."""
    try:
        data = json.loads((journal_dir(dest) / "job.json").read_text())
    except (OSError, ValueError):
        return None
    if data.pop("format", None) != _FORMAT:
        return None
    try:
        return JobRecord(**data)
    except TypeError:
        return None


def write_record(dest: Path, record: JobRecord) -> None:
    """Write ``job.json`` atomically (temp file + rename)."""
    folder = journal_dir(dest)
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(folder / "job.json", record.to_json())


def done_dir(dest: Path, array_index: int) -> Path:
    """Where the tasks of array ``array_index`` mark themselves done."""
    return journal_dir(dest) / "done" / str(array_index)


def marker_name(block_index: Sequence[int]) -> str:
    return ".".join(str(i) for i in block_index) or "0"


def record_done(folder: str, block_index: Sequence[int], counts: Sequence[int]) -> None:
    """Mark one task done, with its counts (called by the task, after its write)."""
    path = Path(folder) / marker_name(block_index)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, " ".join(str(int(c)) for c in counts))


def read_done(folder: str, block_index: Sequence[int]) -> list[int] | None:
    """The counts of a task marked done, or None if it is not done."""
    try:
        return [int(v) for v in (Path(folder) / marker_name(block_index)).read_text().split()]
    except (OSError, ValueError):
        return None


def count_done(dest: Path, array_index: int) -> int:
    """How many tasks of array ``array_index`` are marked done."""
    folder = done_dir(dest, array_index)
    return sum(1 for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else 0


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- the lock ---------------------------------------------------------------------------


def _process_start_time(pid: int) -> float | None:
    import psutil  # a dependency of distributed

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def _describe(owner: dict[str, Any]) -> str:
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
def hold_lock(dest: Path, *, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S) -> Iterator[None]:
    """Hold DEST's lock for the duration; raise :class:`DestinationInUseError` if held.

    A lock whose holder is gone (same host: its pid is gone or reused; another host: no
    heartbeat for ``stale_after_s``) is taken over with a warning.
    """
    folder = journal_dir(dest)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "lock"
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_started": _process_start_time(os.getpid()),
        "started": time.time(),
    }
    _acquire(path, me, stale_after_s, dest)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, stop, heartbeat_s), name="relu-dask-lock", daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == me["pid"]:
                path.unlink()


def _acquire(path: Path, me: dict[str, Any], stale_after_s: float, dest: Path) -> None:
    for _attempt in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _take_over_if_stale(path, stale_after_s, dest)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return
    raise DestinationInUseError(f"could not take the lock {path}: other runs keep taking it; try again")


def _take_over_if_stale(path: Path, stale_after_s: float, dest: Path) -> None:
    try:
        owner = json.loads(path.read_text())
        age_s = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return  # released meanwhile: try again
    except (OSError, ValueError):
        owner, age_s = {}, time.time() - path.stat().st_mtime
        if age_s < 5.0:  # being written right now
            time.sleep(0.2)
            return
    reason = _stale_reason(owner, age_s, stale_after_s) if owner else "it is unreadable"
    if reason is None:
        raise DestinationInUseError(
            f"DEST {dest} is in use by another relu-dask run, {_describe(owner)}; wait for it to finish (lock: {path})"
        )
    # Only one of several runs taking over can win this rename.
    aside = path.with_name(f"lock.stale-{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    try:
        taken = json.loads(aside.read_text()) if owner else {}
    except (OSError, ValueError):
        taken = {}
    if taken != owner:  # another run took the stale lock first and made a fresh one: give it back
        with contextlib.suppress(OSError):
            os.rename(aside, path)
        return
    aside.unlink(missing_ok=True)
    log.warning("took over the lock of a run that is no longer running (%s; %s)", _describe(owner), reason)


def lock_holder(dest: Path) -> str | None:
    """Who holds DEST's lock now (``pid N on HOST (since ...)``), or None if nobody alive does."""
    path = journal_dir(dest) / "lock"
    try:
        owner = json.loads(path.read_text())
        age_s = time.time() - path.stat().st_mtime
    except (OSError, ValueError):
        return None
    return None if _stale_reason(owner, age_s, STALE_AFTER_S) else _describe(owner)


def _heartbeat(path: Path, stop: threading.Event, every_s: float) -> None:
    while not stop.wait(every_s):
        with contextlib.suppress(OSError):
            os.utime(path)
