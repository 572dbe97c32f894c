"""``python -m relu_dask`` and the ``relu-dask`` command: the process set up, then the CLI."""

from __future__ import annotations

import os
import sys


def main() -> int:
    """Set up this process (:func:`prepare_process`), then run :func:`relu_dask.cli.entry_point`."""
    prepare_process()
    from relu_dask.cli import entry_point

    return entry_point()


def prepare_process() -> None:
    """What the command's own process needs before numpy loads (``import relu_dask`` does not load it).

    numpy's wheels bundle OpenBLAS, which starts a thread per core when it loads, and those
    threads spin for a while before they sleep. relu-dask does no linear algebra: with one
    OpenBLAS thread a 1 GiB run on 2 cores takes about 0.1 CPU-s less (5% of it), and a
    big machine is spared a pool of idle threads per run. A value the user set is kept;
    the library (``import relu_dask`` in someone else's process) changes nothing.
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


if __name__ == "__main__":
    sys.exit(main())
