"""Writes to an object store that a task leaves to the store's pool while it goes on.

Use :func:`write_later` for a block's chunks (and, after them, its done marker), and
:func:`finish_writes` where a run must know they are written: before it records the job,
or, stopped, counts what is done. With :func:`before_writes` the run's writes wait for DEST
being prepared (in a thread of its own, while the tasks read their first blocks).

Why: at 100 ms per request, a task that waits for its PUTs spends as long writing as
reading, and while it writes no chunk is fetched. Handed to the pool, the writes overlap
the next blocks' reads; a 256 MiB run at 100 ms went from 3.0 to 2.7 s (the chunk phase
1.18 to 0.91 s; ``scripts/bench_remote.py`` measures whole runs). The order a crash relies
on holds: a marker is sent only once its chunks are written, and not if one failed.
Memory stays flat: the bytes not yet written are bounded (:data:`LATER_BYTES`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from relu_dask import objectstores
from relu_dask.objectstores import Bucket

__all__ = [
    "LATER_BYTES",
    "append_later",
    "before_writes",
    "finish_writes",
    "take_appended",
    "wait_before_writes",
    "write_later",
]

#: Bytes of the writes left to the pool that are not written yet, at most: a task that would
#: go past waits for them, so memory stays flat however slow the store.
LATER_BYTES = 32 * 2**20


def write_later(
    bucket: Bucket, puts: Sequence[tuple[str, Any]] = (), deletes: Sequence[str] = (), *, run: str
) -> Future[None]:
    """Write ``puts`` and delete ``deletes`` from the pool while the caller goes on.

    The future is done when all are (a task's done marker waits for it: :func:`append_later`);
    :func:`finish_writes` waits for every future made here for ``run`` (a run's id: runs in
    one process apart, each waits for and hears of its own). The caller waits first while
    more than :data:`LATER_BYTES` are still to be written. Where DEST is being prepared for
    ``run`` (:func:`before_writes`), they start once it is. The bytes of ``puts`` must stay
    as they are until written (a copy, not a reused buffer).
    """
    gate = _LATER.gates.get(run)  # DEST being prepared (before_writes)
    if gate is not None and gate.done() and gate.exception() is not None:
        raise gate.exception()  # type: ignore[misc]  # DEST could not be prepared: no task goes on
    size = sum(memoryview(data).nbytes for _, data in puts)
    _LATER.reserve(size)
    done: Future[None] = Future()

    def start(ready: Future[None] | None = None) -> None:
        failed = ready.exception() if ready is not None else None
        if failed is not None:
            _LATER.settle(done, failed, size)
            return
        try:
            parts = [objectstores.submit(objectstores.put, bucket, key, data) for key, data in puts]
            if deletes:
                parts.append(objectstores.submit(objectstores.delete_many, bucket, list(deletes)))
        except BaseException as exc:  # noqa: BLE001 - a callback's error would be lost, and finish_writes wait
            _LATER.settle(done, exc, size)
            return
        _when_all(parts, lambda error: _LATER.settle(done, error, size))

    _LATER.track(run, done)
    if gate is not None:
        gate.add_done_callback(start)
    else:
        start()
    return done


def before_writes(run: str, ready: Future[None]) -> None:
    """The writes :func:`write_later` is asked for ``run`` start once ``ready`` is done (DEST
    prepared: its record and documents, a fresh DEST's, written in the background), and fail
    with its error if it failed (asked after that, they raise it). The run's tasks read their
    first blocks meanwhile: at 100 ms per request, the record and the upload of the documents
    were two round trips before the first read. :func:`finish_writes` waits for it, and says
    its error.
    """
    _LATER.track(run, ready)
    with _LATER.changed:
        _LATER.gates[run] = ready


def wait_before_writes(run: str) -> None:
    """Wait until what :func:`before_writes` prepares for ``run`` is done (raising its error):
    for a write made otherwise than by :func:`write_later` (zarr's own)."""
    gate = _LATER.gates.get(run)
    if gate is not None:
        gate.result()


def append_later(
    bucket: Bucket, folder: str, line: str, *, run: str, after: Future[None], name: Callable[[int], str]
) -> Future[None]:
    """Write ``line`` into a new object under ``folder`` once ``after`` is done (not if it
    failed, nor once :func:`finish_writes` drops what waits): the lines ready together go into
    one object, ``folder/<name(lines)>``, one line each, one PUT at a time per folder (the next
    takes what came meanwhile). A task's done marker is one such line
    (:mod:`relu_dask.markerbatches`). The future is done when its object is written.
    """
    done: Future[None] = Future()

    def ready(before: Future[None]) -> None:
        failed = before.exception()
        if failed is not None or run in _LATER.dropping:
            _LATER.settle(done, failed, 0)
            return
        _BATCHES.add(bucket, folder, (line, done, run), name)

    _LATER.track(run, done)
    after.add_done_callback(ready)
    return done


def take_appended(bucket: Bucket, under: str) -> list[str]:
    """The keys of the objects :func:`append_later` wrote in folders under the prefix
    ``under`` in this process since it was last asked (for deleting them without listing)."""
    return _BATCHES.take_written(bucket, under)


class _Batches:
    """Per folder, the lines waiting for a PUT, and whether one is under way."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.waiting: dict[tuple[Bucket, str], list[tuple[str, Future[None], str]]] = {}
        self.sending: set[tuple[Bucket, str]] = set()
        self.written: dict[tuple[Bucket, str], list[str]] = {}

    def add(self, bucket: Bucket, folder: str, item: tuple[str, Future[None], str], name: Callable[[int], str]) -> None:
        where = (bucket, folder)
        with self.lock:
            self.waiting.setdefault(where, []).append(item)
            if where in self.sending:
                return
            self.sending.add(where)
        self.send(where, name)

    def send(self, where: tuple[Bucket, str], name: Callable[[int], str]) -> None:
        with self.lock:
            lines: list[tuple[str, Future[None], str]] = []
            dropped: list[tuple[str, Future[None], str]] = []
            for item in self.waiting.pop(where, []):  # each line sent or dropped, never both
                (dropped if item[2] in _LATER.dropping else lines).append(item)
            if not lines:
                self.sending.discard(where)
        for _, done, _run in dropped:
            _LATER.settle(done, None, 0)  # its run records its job next: moot
        if not lines:
            return
        with self.lock:
            key = f"{where[1]}/{name(len(lines))}"
            self.written.setdefault(where, []).append(key)
        text = "".join(f"{line}\n" for line, _, _ in lines).encode()
        sent = objectstores.submit(objectstores.put, where[0], key, text)

        def landed(put: Future[None]) -> None:
            for _, done, _run in lines:
                _LATER.settle(done, put.exception(), 0)
            self.send(where, name)

        sent.add_done_callback(landed)

    def take_written(self, bucket: Bucket, under: str) -> list[str]:
        with self.lock:
            taken = [where for where in self.written if where[0] == bucket and where[1].startswith(under)]
            return [key for where in taken for key in self.written.pop(where)]


_BATCHES = _Batches()


def _when_all(parts: list[Future[Any]], then: Callable[[BaseException | None], None]) -> None:
    """Call ``then`` (with the first error, or None) once every one of ``parts`` is done."""
    if not parts:
        then(None)
        return
    left = [len(parts)]
    lock = threading.Lock()

    def one_done(_: Future[Any]) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        then(next((p.exception() for p in parts if p.exception() is not None), None))

    for part in parts:
        part.add_done_callback(one_done)


class _Later:
    """The writes left to the pool: their futures and the bytes not yet written."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.bytes = 0
        self.futures: dict[str, list[Future[None]]] = {}
        self.dropping: set[str] = set()
        self.gates: dict[str, Future[None]] = {}  # a run's DEST being prepared (before_writes)

    def reserve(self, size: int) -> None:
        if not size:
            return
        with self.changed:
            self.changed.wait_for(lambda: self.bytes == 0 or self.bytes + size <= LATER_BYTES)
            self.bytes += size

    def track(self, run: str, future: Future[None]) -> None:
        with self.changed:
            self.futures.setdefault(run, []).append(future)

    def settle(self, future: Future[None], error: BaseException | None, size: int) -> None:
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
        with self.changed:
            self.bytes -= size
            self.changed.notify_all()

    def finish(self, run: str, *, drop_waiting: bool) -> list[BaseException]:
        with self.changed:
            futures = self.futures.pop(run, [])
            if drop_waiting:
                self.dropping.add(run)
        errors: list[BaseException] = []
        waited = 0
        try:
            for future in futures:
                error = future.exception()  # waits for it
                if error is not None and all(error is not e for e in errors):  # a marker fails with its chunk
                    errors.append(error)
                waited += 1
        except BaseException:
            # A stop (SIGTERM, Ctrl-C) while this waits: the writes not waited for are the next
            # finish's to wait for (the stop's, before it counts what is done), not forgotten.
            with self.changed:
                self.futures[run] = futures[waited:] + self.futures.get(run, [])
            raise
        finally:
            with self.changed:
                self.dropping.discard(run)
        with self.changed:
            gate = self.gates.get(run)
            if gate is not None and gate.exception() is None:  # a failed one stays: a task let go
                del self.gates[run]  # after a stop still raises it, and writes nothing
        return errors


_LATER = _Later()


def finish_writes(run: str, *, drop_waiting: bool = False) -> list[BaseException]:
    """Wait for every write :func:`write_later` and :func:`append_later` left to the pool for
    ``run``; return the errors of those that failed (each once, in the order asked for).

    ``drop_waiting``: writes still waiting for an earlier one (a done marker for its chunks)
    are not made; those under way are waited for. For a run about to record its job
    complete, which makes the markers moot: the last tasks' markers are a round trip after
    their chunks, which the run need not wait for. Killed before the record, it redoes
    those tasks.
    """
    return _LATER.finish(run, drop_waiting=drop_waiting)
