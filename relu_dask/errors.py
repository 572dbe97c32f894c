"""Errors relu_dask raises on purpose, each mapped to a documented exit code.

Exit codes (README, ``relu-dask --help``):

* 0 -- done
* 1 -- failed while processing (:class:`ProcessingError`)
* 2 -- bad usage or input; nothing was written (:class:`InputError`)
* 3 -- DEST is in use by another run (:class:`DestinationInUseError`)
* 130 / 143 -- stopped by Ctrl-C / SIGTERM; what finished is recorded (:class:`RunStopped`)
"""

from __future__ import annotations

import signal

__all__ = [
    "EXIT_FAILED",
    "EXIT_IN_USE",
    "EXIT_OK",
    "EXIT_USAGE",
    "DamagedSourceError",
    "DestinationExistsError",
    "DestinationInUseError",
    "InputError",
    "NaNFoundError",
    "NotWritableError",
    "ProcessingError",
    "ReluDaskError",
    "RunStopped",
    "StopRequested",
    "TaskNotStarted",
    "UnsupportedDtypeError",
    "ask_to_stop",
    "heed_a_lost_stop",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_IN_USE = 3


class ReluDaskError(Exception):
    """Base class of every error relu_dask raises on purpose.

    The message is one line that names the problem and what to do about it.
    """

    exit_code: int = EXIT_FAILED


class InputError(ReluDaskError, ValueError):
    """Bad usage or input, found before anything was written (exit 2)."""

    exit_code = EXIT_USAGE


class UnsupportedDtypeError(InputError, TypeError):
    """The source holds values that have no ReLU derivative (exit 2)."""


class DestinationExistsError(InputError):
    """DEST exists and ``overwrite`` was not given (exit 2)."""


class NotWritableError(InputError):
    """DEST's folder cannot be written: a read-only file system, or no permission (exit 2)."""


class NaNFoundError(InputError):
    """``--nan error`` and the source holds a NaN (exit 2; the partial DEST is removed)."""


class ProcessingError(ReluDaskError, RuntimeError):
    """Failed while processing: I/O, a worker, the disk (exit 1)."""

    exit_code = EXIT_FAILED


class TaskNotStarted(ReluDaskError):
    """The run was told to stop (SIGTERM, Ctrl-C, a failed task) before this task began: it
    did nothing, and the same command runs it again."""


class DestinationInUseError(ReluDaskError):
    """Another run holds DEST (exit 3)."""

    exit_code = EXIT_IN_USE


class DamagedSourceError(ProcessingError):
    """A stored chunk of SOURCE cannot be read or decoded (exit 1): rerunning will not help."""


class StopRequested(KeyboardInterrupt):
    """SIGTERM reached the ``relu-dask`` command (Slurm at the end of a walltime, systemd's
    stop): raised in its main thread, as Ctrl-C raises KeyboardInterrupt."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


#: The signals :func:`ask_to_stop` was called for, in this process.
_STOPS_ASKED: list[int] = []


def ask_to_stop(signum: int) -> None:
    """Raise the stop for signal ``signum`` (from its handler, in the main thread): StopRequested
    for SIGTERM, KeyboardInterrupt for Ctrl-C; and remember that it was asked for.

    A signal handler runs between any two bytecodes of the main thread, also inside a weakref
    callback or a ``__del__`` (dask and distributed drop many objects while they compute),
    where Python prints an exception as "ignored" and drops it, and the stop with it:
    :func:`heed_a_lost_stop` raises it again where relu_dask waits.
    """
    _STOPS_ASKED.append(signum)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise StopRequested(signum)


def heed_a_lost_stop() -> None:
    """Raise the stop :func:`ask_to_stop` was asked for, if there was one: called where a
    stop raised and caught would not have come to (after it, the run or follow has ended),
    so one that comes here was dropped on the way."""
    if _STOPS_ASKED:
        raise StopRequested(_STOPS_ASKED[-1])


class RunStopped(KeyboardInterrupt):
    """A run stopped on SIGTERM or Ctrl-C once its running tasks were done (exit 143 or 130).

    A KeyboardInterrupt, so that a caller of :func:`relu_dask.run` sees an interrupt as an
    interrupt (``except ReluDaskError`` does not swallow it); its message says how far the
    run got.
    """

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
