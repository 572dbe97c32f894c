"""``python -m relu_dask`` and the ``relu-dask`` command: the process set up, the CLI, a quick exit."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys


def main() -> int:
    """Set up this process (:func:`prepare_process`), run :func:`relu_dask.cli.main`, then freeze.

    Whatever the command left is still referenced when the interpreter exits, and its
    final garbage collections walk all of it (the objects of some 600 modules):
    ``gc.freeze()`` lets them skip it, 60-70 ms of every run, all of it time with one core
    busy (a one-off measurement on the 1 GiB benchmark array, 2 threads). Module teardown
    and ``atexit`` (logging's flush, the finalizers of distributed and s3fs) still run;
    only objects in reference cycles go without their finalizers, and every file, lock,
    store and cluster of a run is closed in a ``finally`` or ``with`` before
    :func:`relu_dask.cli.main` returns. Not in :func:`relu_dask.cli.main` itself, which
    tests call in process.
    """
    prepare_process()
    # A stop while the libraries import is held until they have: raised inside an extension
    # module's import, it would come out as an ImportError and a traceback.
    pending: list[int] = []
    for held in (signal.SIGTERM, signal.SIGINT):
        signal.signal(held, lambda signum, frame: pending.append(signum))
    try:
        from relu_dask.cli import main as cli_main

        signal.signal(signal.SIGTERM, _stop_requested)
        signal.signal(signal.SIGINT, _interrupted)
        if pending:
            _stop_requested(pending[0], None)
        code = cli_main()
    except KeyboardInterrupt as stop:  # a stop before or after cli.main's own handling (while importing, say)
        stopped_by = int(getattr(stop, "signum", signal.SIGINT))
        code = 128 + stopped_by
        with contextlib.suppress(OSError, ValueError):
            print(
                f"relu-dask: error: stopped by {signal.Signals(stopped_by).name} before the run began; "
                "rerun the same command",
                file=sys.stderr,
                flush=True,
            )
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    gc.freeze()
    return code


def _stop_requested(signum: int, frame: object) -> None:
    """SIGTERM (Slurm's walltime, systemd's stop): stop as Ctrl-C does, cleanly.

    The run stops starting tasks, lets the running ones finish, records them, releases
    DEST's lock and exits 143 with one line. A second SIGTERM meanwhile is let through.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from relu_dask.errors import ask_to_stop

    ask_to_stop(signum)


def _interrupted(signum: int, frame: object) -> None:
    """Ctrl-C: KeyboardInterrupt, as Python's own handler raises it, and remembered (a stop
    dropped inside a weakref callback is raised again where relu_dask waits)."""
    from relu_dask.errors import ask_to_stop

    ask_to_stop(signum)


def prepare_process() -> None:
    """What the command's own process needs before numpy loads (``import relu_dask`` does not load it).

    numpy's wheels bundle OpenBLAS, which starts a thread per core when it loads, and those
    threads spin for a while before they sleep. relu-dask does no linear algebra: with one
    OpenBLAS thread a 1 GiB run on 2 cores takes about 0.1 CPU-s less (5% of it), and a
    big machine is spared a pool of idle threads per run. A value the user set is kept;
    the library (``import relu_dask`` in someone else's process) changes nothing.
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    return_freed_blocks_to_the_os()


def return_freed_blocks_to_the_os() -> None:
    """Keep every block-sized buffer out of glibc's heap arenas (Linux only).

    Blocks are tens of MiB. glibc raises its mmap threshold after such buffers are freed
    and from then on serves them from its arenas, which keep the memory: peak RSS creeps up
    by about a block per thread. A fixed threshold (``mallopt(M_MMAP_THRESHOLD)``, which
    also stops that adjustment) keeps them mmapped and gives them back when freed (peak RSS
    of a 1 GiB run with 2 threads, a one-off measurement: 522 MB without, 437 MB with).
    The process's own setting: here, not in :func:`relu_dask.cli.main`, which others may
    call in a process of theirs.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 1 << 20)


_M_MMAP_THRESHOLD = -3  # from glibc's <malloc.h>


if __name__ == "__main__":
    sys.exit(main())
