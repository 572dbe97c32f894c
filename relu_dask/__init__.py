"""relu_dask: out-of-core ReLU derivative masks of chunked Zarr arrays, with dask.

The public API:

* :func:`relu_derivative` -- numpy block in, int8 mask out (the kernel);
* :func:`derivative_mask` -- lazy dask array in, lazy int8 dask array out;
* :func:`run` -- SOURCE Zarr in, DEST Zarr masks out, :class:`RunReport` back;
* :func:`job_status` and :func:`stats_of_masks` -- what a DEST holds, and what its masks say;
* :func:`plan_chunks` and :class:`ChunkPlan` -- how an array is cut into tasks;
* :class:`ReluDaskError` and its subclasses, each with its ``exit_code``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from relu_dask.chunking import ChunkPlan, plan_chunks
from relu_dask.errors import (
    DestinationExistsError,
    DestinationInUseError,
    InputError,
    ProcessingError,
    ReluDaskError,
    UnsupportedDtypeError,
)
from relu_dask.execution import job_status, run, stats_of_masks
from relu_dask.graph import derivative_mask
from relu_dask.kernel import relu_derivative
from relu_dask.report import ArrayReport, RunReport
from relu_dask.schedulers import parse_scheduler

try:
    __version__ = version("relu-dask")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "ArrayReport",
    "ChunkPlan",
    "DestinationExistsError",
    "DestinationInUseError",
    "InputError",
    "ProcessingError",
    "ReluDaskError",
    "RunReport",
    "UnsupportedDtypeError",
    "__version__",
    "derivative_mask",
    "job_status",
    "parse_scheduler",
    "plan_chunks",
    "relu_derivative",
    "run",
    "stats_of_masks",
]
