"""relu_dask: out-of-core ReLU derivative masks of chunked Zarr arrays, with dask.

The public API:

* :func:`relu_derivative` -- numpy block in, int8 mask out (the kernel);
* :func:`derivative_mask` -- lazy dask array in, lazy int8 dask array out;
* :func:`run` -- SOURCE Zarr in, DEST Zarr masks out, :class:`RunReport` back; in steps,
  :class:`RunOptions` -> :func:`plan_run` -> :class:`RunPlan` -> :func:`execute`; a SOURCE
  that grew since is extended, not redone;
* :func:`follow` -- :func:`run`, then again over every append to a growing SOURCE
  (:class:`FollowState` back);
* :func:`job_status` and :func:`stats_of_masks` -- what a DEST holds, and what its masks say;
* :func:`verify_dest` -- every mask chunk of a DEST read back and checked against its journal;
* :func:`plan_chunks` and :class:`ChunkPlan` -- how an array is cut into tasks;
* :class:`ReluDaskError` and its subclasses, each with its ``exit_code``.

Each name is imported on first use: ``import relu_dask`` alone loads neither numpy nor
zarr nor dask, so that the command line (:mod:`relu_dask.__main__`) can set up its process
before they load.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relu_dask.chunking import ChunkPlan, plan_chunks
    from relu_dask.errors import (
        DamagedSourceError,
        DestinationExistsError,
        DestinationInUseError,
        InputError,
        NaNFoundError,
        ProcessingError,
        ReluDaskError,
        RunStopped,
        UnsupportedDtypeError,
    )
    from relu_dask.execution import execute, run
    from relu_dask.following import FollowState, follow
    from relu_dask.graph import derivative_mask
    from relu_dask.kernel import relu_derivative
    from relu_dask.mask_stats import stats_of_masks
    from relu_dask.options import RunOptions
    from relu_dask.planning import RunPlan, plan_run
    from relu_dask.report import ArrayReport, RunReport
    from relu_dask.resume import JobStatus, job_status
    from relu_dask.schedulers import parse_scheduler
    from relu_dask.verify import VerifyResult, verify_dest

    __version__: str

#: The module each public name comes from.
_HOMES = {
    "ArrayReport": "report",
    "JobStatus": "resume",
    "RunOptions": "options",
    "RunPlan": "planning",
    "execute": "execution",
    "follow": "following",
    "FollowState": "following",
    "plan_run": "planning",
    "ChunkPlan": "chunking",
    "DamagedSourceError": "errors",
    "DestinationExistsError": "errors",
    "DestinationInUseError": "errors",
    "InputError": "errors",
    "NaNFoundError": "errors",
    "ProcessingError": "errors",
    "ReluDaskError": "errors",
    "RunReport": "report",
    "RunStopped": "errors",
    "UnsupportedDtypeError": "errors",
    "VerifyResult": "verify",
    "derivative_mask": "graph",
    "job_status": "resume",
    "parse_scheduler": "schedulers",
    "plan_chunks": "chunking",
    "relu_derivative": "kernel",
    "run": "execution",
    "stats_of_masks": "mask_stats",
    "verify_dest": "verify",
}

__all__ = [
    "ArrayReport",
    "ChunkPlan",
    "DamagedSourceError",
    "DestinationExistsError",
    "DestinationInUseError",
    "FollowState",
    "InputError",
    "JobStatus",
    "NaNFoundError",
    "ProcessingError",
    "ReluDaskError",
    "RunOptions",
    "RunPlan",
    "RunReport",
    "RunStopped",
    "UnsupportedDtypeError",
    "VerifyResult",
    "__version__",
    "derivative_mask",
    "execute",
    "follow",
    "job_status",
    "parse_scheduler",
    "plan_chunks",
    "plan_run",
    "relu_derivative",
    "run",
    "stats_of_masks",
    "verify_dest",
]


def __getattr__(name: str) -> Any:
    """A public name, imported from its module the first time it is asked for."""
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value: Any = version("relu-dask")
        except PackageNotFoundError:  # pragma: no cover - running from a source tree
            value = "0+unknown"
    elif name in _HOMES:
        value = getattr(importlib.import_module(f"relu_dask.{_HOMES[name]}"), name)
    else:
        raise AttributeError(f"module 'relu_dask' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
