"""The live page of a run: each array's progress and unit activity, as its blocks finish.

A run registers what it is about to compute (:func:`begin`: its arrays, their tasks, unit
axes and labels); every finished task's row of counts (:class:`~relu_dask.counts.TaskRow`,
computed by the task anyway: no second pass over the data) is added to it (:func:`add`),
and :func:`snapshot` says where each array stands: blocks done of total, bytes read,
throughput, the fraction of active values so far, with ``--stats`` a histogram of per-unit
activity and the dead and always-on units so far by label; in follow mode, how far DEST is
behind SOURCE and when the last pass ran.

How rows arrive: on dask's local schedulers through a dask callback in relu-dask's process
(:func:`block_watcher`, dask's public ``Callback`` with a ``posttask``); on a distributed
cluster each task logs its row as an event on its worker (:func:`announce`: distributed's
``Worker.log_event``), and relu-dask's client subscribes to the topic
(``Client.subscribe_topic``).

Where the page is served (``/relu-dask``, its figures at ``/relu-dask/data.json``):

* inside the dask dashboard of a LocalCluster relu-dask starts: its scheduler runs in
  relu-dask's process and loads this module's :data:`routes` through distributed's
  documented ``distributed.scheduler.http.routes`` setting;
* for the other schedulers with ``--dashboard-address HOST:PORT``: by relu-dask itself
  (:func:`serve`, a tornado server on a thread of its own; tornado comes with distributed).
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import socket
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import numpy as np

from relu_dask.counts import BlockCounts, TaskRow
from relu_dask.errors import InputError

__all__ = [
    "PAGE",
    "TOPIC",
    "ArrayLive",
    "add",
    "announce",
    "begin",
    "block_watcher",
    "finish",
    "on_event",
    "page_url",
    "serve",
    "set_follow",
    "snapshot",
]

#: The page's path under the dashboard (or relu-dask's own server).
PAGE = "relu-dask"
#: The event topic tasks on a distributed cluster log their rows to.
TOPIC = "relu-dask-blocks"
#: Bins of the histogram of per-unit activity (fraction of active values per unit).
BINS = 20
#: Units named in the lists of dead and always-on units (the rest counted).
MAX_LISTED = 20


@dataclass
class ArrayLive:
    """One array of the run, as the page shows it."""

    path: str
    num_tasks: int
    itemsize: int
    unit_axis: int | None = None
    """With ``--stats``: the axis whose units are counted."""
    unit_block: int = 0
    """Units per block along the unit axis (where a task's per-unit ones start)."""
    units: int = 0
    samples_per_unit_block: dict[int, int] = field(default_factory=dict)
    labels: list[str] | None = None
    done: int = 0
    resumed: int = 0
    counts: BlockCounts = field(default_factory=BlockCounts)
    unit_ones: np.ndarray | None = None
    unit_samples: np.ndarray | None = None
    seen: set[tuple[int, ...]] = field(default_factory=set)


class _Run:
    def __init__(self, run: str, arrays: Sequence[ArrayLive], names: dict[str, str]) -> None:
        self.run = run
        self.arrays = {a.path: a for a in arrays}
        self.names = names
        self.started = time.monotonic()
        self.started_utc = datetime.now(UTC).isoformat(timespec="seconds")
        self.finished_s: float | None = None
        for a in arrays:
            if a.unit_axis is not None and a.units:
                a.unit_ones = np.zeros(a.units, dtype=np.int64)
                a.unit_samples = np.zeros(a.units, dtype=np.int64)


_LOCK = threading.Lock()
_RUN: list[_Run | None] = [None]
_FOLLOW: dict[str, Any] = {}


def begin(run: str, arrays: Sequence[ArrayLive], names: dict[str, str]) -> None:
    """Run ``run`` (its id) starts: ``arrays`` will be computed; ``names`` maps each array's
    dask collection name (its tasks' keys are ``(name, *block_index)``) to the array's path."""
    with _LOCK:
        _RUN[0] = _Run(run, arrays, names)


def finish() -> None:
    """The run's tasks are done (its figures stay on the page until the next run)."""
    with _LOCK:
        run = _RUN[0]
        if run is not None and run.finished_s is None:
            run.finished_s = time.monotonic() - run.started


def set_follow(rows_done: int, rows_behind: int, passes: int) -> None:
    """Follow mode: DEST's rows, how many SOURCE has beyond them, passes so far (now)."""
    with _LOCK:
        _FOLLOW.update(
            rows_done=rows_done,
            rows_behind=rows_behind,
            passes=passes,
            checked_utc=datetime.now(UTC).isoformat(timespec="seconds"),
        )


def add(path: str, index: Sequence[int], row: np.ndarray, run_id: str | None = None) -> None:
    """A task of the array at ``path`` finished block ``index`` with ``row`` (of run
    ``run_id``: another run's, a follow's pass before, is dropped)."""
    with _LOCK:
        run = _RUN[0]
        if run is not None and run_id is not None and run_id != run.run:
            return
        array = None if run is None else run.arrays.get(path)
        key = tuple(int(i) for i in index)
        if array is None or key in array.seen:  # another run's, or a task run again
            return
        array.seen.add(key)
        counts = BlockCounts.from_row(row[TaskRow.COUNTS].tolist())
        array.done += 1
        array.resumed += counts.resumed
        array.counts = array.counts + counts
        if array.unit_axis is not None and array.unit_ones is not None and array.unit_samples is not None:
            start = key[array.unit_axis] * array.unit_block
            n = max(0, min(array.unit_block, array.units - start))
            array.unit_ones[start : start + n] += row[TaskRow.units(n)]
            if n:
                array.unit_samples[start : start + n] += counts.elements // n


def _key_block(key: Any) -> tuple[str, tuple[int, ...]] | None:
    if isinstance(key, tuple) and key and isinstance(key[0], str):
        return key[0], tuple(key[1:])
    return None


def block_watcher() -> Any:
    """A dask ``Callback`` that adds each finished task's row on dask's local schedulers (in
    relu-dask's process)."""
    from dask.callbacks import Callback

    return Callback(posttask=_add_finished)


def _add_finished(key: Any, result: Any, dsk: Any, state: Any, id: Any) -> None:
    found = _key_block(key)
    run = _RUN[0]
    if found is None or run is None or found[0] not in run.names:
        return
    add(run.names[found[0]], found[1], np.asarray(result).reshape(-1))


def announce(run: str, path: str, index: Sequence[int], row: np.ndarray) -> None:
    """From a task of ``run`` on a distributed worker: log its row as an event (nothing elsewhere)."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):  # not on a worker: the local schedulers' callback sees it
        return
    # Compact (the scheduler keeps a topic's last events, distributed.admin.low-level-log-length:
    # a list of Python ints per unit would cost it hundreds of MiB for wide layers).
    packed = zlib.compress(np.asarray(row, dtype="<i8").tobytes(), 1)
    worker.log_event(TOPIC, {"run": run, "path": path, "index": [int(i) for i in index], "row": packed})


def on_event(event: Any) -> None:
    """A task's event (``(time, message)``), received by relu-dask's client."""
    _, message = event
    if isinstance(message, dict) and "path" in message:
        row = np.frombuffer(zlib.decompress(message["row"]), dtype="<i8")
        add(message["path"], message["index"], row, message.get("run"))


def snapshot() -> dict[str, Any]:
    """Where the run stands, as JSON-able data (what ``/relu-dask/data.json`` serves)."""
    with _LOCK:
        run = _RUN[0]
        follow = dict(_FOLLOW) or None
        if run is None:
            return {"run": None, "follow": follow}
        elapsed = run.finished_s if run.finished_s is not None else time.monotonic() - run.started
        arrays = [_array_snapshot(a, elapsed) for a in run.arrays.values()]
        return {
            "run": {"started_utc": run.started_utc, "elapsed_s": round(elapsed, 3), "done": run.finished_s is not None},
            "arrays": arrays,
            "follow": follow,
        }


def _array_snapshot(a: ArrayLive, elapsed: float) -> dict[str, Any]:
    read = a.counts.elements_read * a.itemsize
    data: dict[str, Any] = {
        "path": a.path or "(array)",
        "tasks_done": a.done,
        "num_tasks": a.num_tasks,
        "tasks_resumed": a.resumed,
        "elements": a.counts.elements,
        "ones": a.counts.ones,
        "nans": a.counts.nans,
        "active_fraction": a.counts.ones / a.counts.elements if a.counts.elements else None,
        "bytes_read": read,
        "mib_per_s": read / 2**20 / elapsed if elapsed > 0 else 0.0,
        "units": None,
    }
    if a.unit_ones is not None and a.unit_samples is not None:
        seen = a.unit_samples > 0
        fractions = a.unit_ones[seen] / a.unit_samples[seen]
        histogram, _ = np.histogram(fractions, bins=BINS, range=(0.0, 1.0))
        dead = np.flatnonzero(seen & (a.unit_ones == 0))
        always = np.flatnonzero(seen & (a.unit_ones == a.unit_samples))
        data["units"] = {
            "axis": a.unit_axis,
            "count": a.units,
            "seen": int(seen.sum()),
            "histogram": histogram.tolist(),
            "dead": len(dead),
            "always_on": len(always),
            "dead_labels": [_label(a, int(u)) for u in dead[:MAX_LISTED]],
            "always_on_labels": [_label(a, int(u)) for u in always[:MAX_LISTED]],
        }
    return data


def _label(a: ArrayLive, unit: int) -> str:
    return f"{a.labels[unit]} (#{unit})" if a.labels is not None and unit < len(a.labels) else f"#{unit}"


# --------------------------------------------------------------------------- serving


def _handlers() -> list[tuple[str, Any, dict[str, Any]]]:
    from tornado import web

    class Page(web.RequestHandler):
        def get(self) -> None:
            self.set_header("Content-Type", "text/html; charset=utf-8")
            self.set_header("Cache-Control", "no-store")
            self.write(_page())

    class Data(web.RequestHandler):
        def get(self) -> None:
            self.set_header("Content-Type", "application/json")
            self.set_header("Cache-Control", "no-store")
            self.write(json.dumps(snapshot(), allow_nan=False, default=_finite))

    return [(PAGE, Page, {}), (f"{PAGE}/data.json", Data, {})]


@functools.cache
def _page() -> str:
    """The page (``livepage.html`` beside this module): a table and histograms that fetch
    ``data.json`` every second; plain HTML, CSS and JavaScript, nothing from elsewhere."""
    return resources.files("relu_dask").joinpath("livepage.html").read_text(encoding="utf-8")


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else str(value)


def __getattr__(name: str) -> Any:
    # distributed reads ``routes`` when a scheduler starts with this module in its
    # ``distributed.scheduler.http.routes``: made then, so that importing this module
    # does not import tornado.
    if name == "routes":
        return _handlers()
    raise AttributeError(name)


def page_url(dashboard_link: str) -> str:
    """The page's address beside a dask dashboard link (``http://HOST:PORT/status``)."""
    base = dashboard_link.split("://", 1)
    host = base[-1].split("/", 1)[0]
    return f"{base[0]}://{host}/{PAGE}" if len(base) == 2 else f"http://{host}/{PAGE}"


def _listen(host: str, port: int, address: str) -> socket.socket:
    """A listening socket at ``host:port``; one line (:class:`InputError`) where it cannot be had."""
    try:
        family, kind, proto, _, where = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listening = socket.socket(family, kind, proto)
    except OSError as exc:
        raise InputError(f"cannot serve the live page at {address}: {exc.strerror or exc}") from None
    try:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind(where)
        listening.listen(128)
        listening.setblocking(False)
    except OSError as exc:
        listening.close()
        raise InputError(f"cannot serve the live page at {address}: {exc.strerror or exc}") from None
    return listening


@contextmanager
def serve(address: str) -> Iterator[str]:
    """Serve the page at ``address`` (``HOST:PORT``; port 0 for a free one) while the
    ``with`` block runs; yields its URL."""
    from tornado import web
    from tornado.httpserver import HTTPServer

    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    listening = _listen(host, int(port or 0), address)
    sockets = [listening]
    bound = listening.getsockname()[1]
    started = threading.Event()
    loop_box: list[asyncio.AbstractEventLoop] = []
    server_box: list[HTTPServer] = []

    def run() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        app = web.Application([(f"/{path}", handler, kwargs) for path, handler, kwargs in _handlers()])
        server = HTTPServer(app)
        server.add_sockets(sockets)
        loop_box.append(loop)
        server_box.append(server)
        started.set()
        loop.run_forever()
        server.stop()
        loop.close()

    thread = threading.Thread(target=run, name="relu-dask-live-page", daemon=True)
    thread.start()
    started.wait()
    try:
        yield f"http://{f'[{host}]' if ':' in host else host}:{bound}/{PAGE}"
    finally:
        loop_box[0].call_soon_threadsafe(loop_box[0].stop)
        thread.join(timeout=5)
