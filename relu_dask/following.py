"""Follow mode: keep DEST up to date with a SOURCE that a training job keeps appending to.

:func:`follow_with` (``relu-dask run --follow SECONDS``, :func:`relu_dask.follow`) runs,
then checks SOURCE every few seconds and runs again over what was appended (growth:
:mod:`relu_dask.growth`; a writer mid-append: :mod:`relu_dask.livewriter`), with DEST's lock
and one scheduler session held the whole time, until SIGTERM, Ctrl-C or an idle time.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Unpack

from relu_dask import journal, livepage, storage
from relu_dask.errors import InputError, ReluDaskError, RunStopped, heed_a_lost_stop
from relu_dask.execution import deliver, execute
from relu_dask.lock import hold_lock
from relu_dask.metrics import write_metrics
from relu_dask.options import RunKeywords, RunOptions
from relu_dask.planning import RunInputs, open_inputs, plan_run
from relu_dask.report import RunReport
from relu_dask.schedulers import open_session, refuse_in_a_spawned_copy_of_main

__all__ = ["FollowState", "follow", "follow_with"]

log = logging.getLogger(__name__)


@dataclass
class FollowState:
    """Where a :func:`follow_with` loop stands: passes made, rows done, rows behind SOURCE."""

    passes: int = 0
    """Runs made (a check that found nothing new is a pass too)."""
    rows_done: int = 0
    """Rows DEST holds (along the append axis; the most of any array)."""
    rows_behind: int = 0
    """Rows SOURCE held beyond those at the last check (the most of any array)."""
    stopped_by: str = ""
    """Why the loop ended: ``SIGTERM``, ``SIGINT`` or ``idle``."""
    reports: list[RunReport] = field(default_factory=list)
    """The report of every pass that processed new rows."""

    def describe(self) -> str:
        """One line: rows done and how far behind SOURCE."""
        return f"{self.rows_done} rows done, {self.rows_behind} behind SOURCE, {self.passes} pass(es)"


def follow(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    every_s: float = 30.0,
    idle_s: float | None = None,
    on_pass: Callable[[RunReport, FollowState], None] | None = None,
    **options: Unpack[RunKeywords],
) -> FollowState:
    """:func:`run`, then again over what is appended to SOURCE, checked every ``every_s``
    seconds, until SIGTERM, Ctrl-C or ``idle_s`` seconds without growth (see
    :func:`follow_with`). ``options`` are :func:`run`'s keyword arguments."""
    return follow_with(RunOptions.create(source, dest, **options), every_s, idle_s, on_pass)


def follow_with(
    options: RunOptions,
    every_s: float,
    idle_s: float | None = None,
    on_pass: Callable[[RunReport, FollowState], None] | None = None,
) -> FollowState:
    """Keep DEST up to date with a growing SOURCE: run, then check SOURCE every ``every_s``
    seconds and run again over what was appended, with DEST's lock held and one scheduler
    session (its dashboard) up the whole time.

    Ends on SIGTERM or Ctrl-C (the running tasks finish and are recorded; the lock is
    released) or after ``idle_s`` seconds without growth; returns how far it got, with
    :attr:`FollowState.stopped_by` saying why. ``on_pass`` is called after every pass that
    processed new rows.
    """
    if not 0 < every_s < math.inf or (idle_s is not None and not 0 < idle_s < math.inf):
        raise InputError("--follow and --follow-idle take a positive number of seconds")
    state = FollowState()
    refuse_in_a_spawned_copy_of_main()
    inputs = open_inputs(options)
    try:
        with hold_lock(inputs.dest, following=True), open_session(options.scheduler) as session:
            journal.reach_step("locked")
            last_growth = time.monotonic()
            while True:
                report = execute(plan_run(options, inputs, under_lock=True), session)
                # what DEST's record holds, not what SOURCE had: rows held back for a writer are behind
                state.rows_done = _rows_recorded(inputs) or state.rows_done
                state.rows_behind = max(0, _rows(inputs) - state.rows_done)
                _deliver_pass(report, options, state)
                livepage.set_follow(state.rows_done, state.rows_behind, state.passes + 1)
                options = replace(options, overwrite=False)  # replaced once, then followed
                state.passes += 1
                if report.outcome != "already complete":
                    last_growth = time.monotonic()
                    state.reports.append(report)
                    if on_pass is not None:
                        on_pass(report, state)
                if idle_s is not None and time.monotonic() - last_growth >= idle_s:
                    state.stopped_by = "idle"
                    log.info("follow: no growth for %g s: stopping (%s)", idle_s, state.describe())
                    return state
                _wait(every_s)
                inputs = open_inputs(options)
                state.rows_behind = max(0, _rows(inputs) - state.rows_done)
                livepage.set_follow(state.rows_done, state.rows_behind, state.passes)
                log.info(
                    "follow: %s",
                    state.describe(),
                    extra={
                        "event": "follow",
                        "fields": {"rows_done": state.rows_done, "rows_behind": state.rows_behind},
                    },
                )
    except KeyboardInterrupt as stop:  # SIGTERM (StopRequested) or Ctrl-C, between or during passes
        signum = stop.exit_code - 128 if isinstance(stop, RunStopped) else getattr(stop, "signum", signal.SIGINT)
        state.stopped_by = signal.Signals(signum).name
        log.debug("follow stopped: %s", stop)
        # A pass stopped after its record said complete (while it consolidated, say) did its rows;
        # and SOURCE may have grown since the last check: both read again, as they are now.
        state.rows_done = max(state.rows_done, _rows_recorded(inputs))
        state.rows_behind = max(0, _source_rows(options, inputs) - state.rows_done)
    return state


#: Seconds the wait between two checks of SOURCE sleeps at a time.
_SLEEP_S = 0.5


def _wait(seconds: float) -> None:
    """Sleep until the next check of SOURCE; a stop asked for and dropped on the way (see
    :func:`~relu_dask.errors.ask_to_stop`) ends the wait within :data:`_SLEEP_S`."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        heed_a_lost_stop()
        time.sleep(min(left, _SLEEP_S))
    heed_a_lost_stop()


def _deliver_pass(report: RunReport, options: RunOptions, state: FollowState) -> None:
    """After a pass: the report and plot of the last pass that did work, and the metrics of
    every pass (a scrape then sees the follow alive, and how far behind it is)."""
    if not state.passes or report.outcome != "already complete":
        deliver(report, options, rows_behind=state.rows_behind)
    elif options.metrics_path is not None:
        write_metrics(options.metrics_path, report, rows_behind=state.rows_behind)


def _source_rows(options: RunOptions, inputs: RunInputs) -> int:
    """SOURCE's rows as they are now (the most of any array along its append axis), read
    again without waiting for a writer; the last ones read if SOURCE cannot be read."""
    axes = {src.path: axis for src, axis in zip(inputs.arrays, inputs.append_axes) if axis is not None}
    try:
        arrays = storage.open_source(options.source_location).arrays
    except (ReluDaskError, OSError):
        return _rows(inputs)
    return max((a.shape[axes[a.path]] for a in arrays if a.path in axes and len(a.shape) > axes[a.path]), default=0)


def _rows_recorded(inputs: RunInputs) -> int:
    """The most rows of any array of DEST's complete record, along its append axis (0: none)."""
    record = journal.read_record(inputs.dest)
    if record is None or not record.complete:
        return 0
    axes = {src.path: axis for src, axis in zip(inputs.arrays, inputs.append_axes) if axis is not None}
    shapes = [
        (a.get("shape"), axes[a.get("path")]) for a in record.fingerprint.get("arrays", []) if a.get("path") in axes
    ]
    return max((int(shape[axis]) for shape, axis in shapes if isinstance(shape, list) and len(shape) > axis), default=0)


def _rows(inputs: RunInputs) -> int:
    """The most rows of any array of SOURCE, along its append axis."""
    return max((src.shape[axis] for src, axis in zip(inputs.arrays, inputs.append_axes) if axis is not None), default=0)
