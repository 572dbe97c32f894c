"""Plugins relu-dask installs in the processes of a LocalCluster it starts.

Use :func:`install` on the client of such a cluster. SIGTERM (Slurm at the end of a
walltime, systemd's stop) and Ctrl-C reach every process of the group; the workers and
their nannies are in relu-dask's. Left to themselves they would die on the spot, cutting a
chunk write short and printing their tracebacks; instead they ignore both, and relu-dask,
which gets them too, lets the running tasks finish and closes the cluster itself (as the
``processes`` pool's workers do: :func:`relu_dask.computing.die_with_parent`).
"""

from __future__ import annotations

import contextlib
import signal
from typing import Any

from distributed.diagnostics.plugin import NannyPlugin, WorkerPlugin

__all__ = ["install"]


def _ignore_group_signals() -> None:
    with contextlib.suppress(ValueError):  # not the process's main thread: leave it be
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


class IgnoreGroupSignalsInWorkers(WorkerPlugin):
    """Each worker process ignores SIGTERM and SIGINT."""

    def setup(self, worker: Any) -> None:
        _ignore_group_signals()


class IgnoreGroupSignalsInNannies(NannyPlugin):
    """Each nanny process ignores SIGTERM and SIGINT (its worker is not restarted)."""

    restart = False

    def setup(self, nanny: Any) -> None:
        _ignore_group_signals()


def install(client: Any) -> None:
    """Make the workers and nannies of ``client``'s cluster ignore SIGTERM and SIGINT."""
    client.register_plugin(IgnoreGroupSignalsInWorkers(), name="relu-dask-signals-worker")
    client.register_plugin(IgnoreGroupSignalsInNannies(), name="relu-dask-signals-nanny")
