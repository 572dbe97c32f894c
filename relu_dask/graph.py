"""Dask graphs: the only module that builds them. Nothing here computes.

Two ways to the same bits:

* :func:`derivative_mask` -- lazy dask array in, lazy int8 dask array out, for users who
  hold a dask array (``map_blocks`` over :func:`relu_dask.kernel.relu_derivative`).
* :func:`build_mask_tasks` -- what :func:`relu_dask.run` uses: one fused task per block
  that reads the block from the source, computes the mask and writes it to DEST, and
  returns only a few counts. No block ever crosses the scheduler, so a distributed cluster
  moves no array data between workers.

The tasks of :func:`build_mask_tasks` are a small dask collection of their own
(:class:`MaskTasks`), not a ``dask.array``: importing ``dask.array`` also imports xarray
and pandas wherever they are installed, which cost every run 0.36 s and 37 MiB of peak
memory (``scripts/bench_pipeline.py``). ``dask.array`` is imported only by the functions
that hand dask arrays to the user.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import numpy as np

from relu_dask.chunking import ChunkPlan
from relu_dask.errors import NaNFoundError
from relu_dask.kernel import Engine, check_dtype, parse_at_zero, parse_nan_policy, relu_derivative
from relu_dask.task import ArrayTasks, process_block

if TYPE_CHECKING:
    import dask.array as da

__all__ = [
    "ARRAY_TASK_PREFIX",
    "TASK_PREFIX",
    "MaskTasks",
    "build_mask_tasks",
    "derivative_mask",
    "task_prefix",
    "unit_ones_of_mask",
]

#: Dask key prefix of :func:`derivative_mask`'s lazy masks.
TASK_PREFIX = "relu-mask"
#: The first part of the names of a run's tasks (:func:`task_prefix`).
ARRAY_TASK_PREFIX = "relu_mask"


def derivative_mask(darr: da.Array, *, at_zero: int = 1, engine: Engine = "numpy", nan: str = "zero") -> da.Array:
    """The ReLU derivative mask of a dask array, lazily: int8, same shape and chunks.

    ``nan``: ``"zero"`` (NaN gives 0) or ``"error"`` (computing a block that holds NaN
    raises :class:`~relu_dask.errors.NaNFoundError`, naming the block), as in
    :func:`relu_dask.run`.

    Examples
    --------
    >>> import dask.array as da
    >>> x = da.from_array(np.array([-1.0, 0.0, 3.0]), chunks=2)
    >>> derivative_mask(x).compute()
    array([0, 1, 1], dtype=int8)
    """
    import dask.array as da
    from dask.base import tokenize

    check_dtype(darr.dtype, where="the dask array")
    rule, policy = parse_at_zero(at_zero), parse_nan_policy(nan)
    return da.map_blocks(
        _mask_block,
        darr,
        at_zero=rule,
        engine=engine,
        nan=policy,
        dtype=np.int8,
        meta=np.empty((0,) * darr.ndim, dtype=np.int8),
        name=f"{TASK_PREFIX}-{tokenize(darr.name, rule, engine, policy)}",
    )


def _mask_block(
    x: np.ndarray, *, at_zero: int, engine: Engine, nan: str, block_info: dict[Any, Any] | None = None
) -> np.ndarray:
    if nan == "error" and x.dtype.kind == "f" and np.isnan(x).any():
        where = block_info[0]["chunk-location"] if block_info else "?"
        raise NaNFoundError(f"block {tuple(where)} holds NaN; nan='error' stops on NaN: use nan='zero' to map NaN to 0")
    return relu_derivative(x, at_zero=at_zero, engine=engine)


class MaskTasks:
    """The tasks of one array: a dask collection of one task per block.

    Computing it writes every mask block and gives back the tasks' counts as one array of
    shape ``plan.task_numblocks + (tasks.row_width,)``. It follows dask's collection protocol, so
    ``dask.compute``, ``Client.persist`` and ``distributed.futures_of`` take it as they take
    a dask array; its keys are ``(name, *block_index)``, its name ``relu-mask-<token>``.
    """

    def __init__(self, tasks: ArrayTasks, name: str, graph: dict[Any, Any] | None = None) -> None:
        self.tasks = tasks
        self.name = name
        self._keys = [(name, *index) for index in tasks.plan.iter_block_indices()]
        self._graph = graph if graph is not None else {k: (process_block, tasks, tuple(k[1:])) for k in self._keys}

    def __dask_graph__(self) -> dict[Any, Any]:
        return self._graph

    def __dask_keys__(self) -> list[Any]:
        return list(self._keys)

    def __dask_layers__(self) -> tuple[str, ...]:
        return (self.name,)

    def __dask_tokenize__(self) -> str:
        return self.name

    def __dask_postcompute__(self) -> tuple[Any, tuple[Any, ...]]:
        return _assemble, (self.tasks.plan.task_numblocks, self.tasks.row_width)

    def __dask_postpersist__(self) -> tuple[Any, tuple[Any, ...]]:
        return _rebuild, (self.tasks, self.name)

    @staticmethod
    def __dask_optimize__(dsk: Any, keys: Any, **kwargs: Any) -> Any:
        return dsk  # one independent task per block: nothing to fuse or cull

    @staticmethod
    def __dask_scheduler__(dsk: Any, keys: Any, **kwargs: Any) -> Any:
        from dask.threaded import get

        return get(dsk, keys, **kwargs)


def _assemble(rows: list[np.ndarray], numblocks: tuple[int, ...], width: int) -> np.ndarray:
    return np.stack([np.asarray(r).reshape(width) for r in rows]).reshape(*numblocks, width)


def _rebuild(dsk: Any, tasks: ArrayTasks, name: str, rename: Any = None) -> MaskTasks:
    return MaskTasks(tasks, name, dict(dsk))


def build_mask_tasks(tasks: ArrayTasks) -> MaskTasks | None:
    """The tasks that write every mask block of ``tasks`` and count what they saw.

    Returns None for an empty array (nothing to compute).
    """
    if tasks.plan.num_tasks == 0:
        return None
    from dask.base import tokenize

    token = tasks.token or tokenize(tasks.plan, tasks.at_zero, tasks.engine)
    return MaskTasks(tasks, f"{task_prefix(tasks.name)}-{token}")


def task_prefix(path: str) -> str:
    """The name before the token of the tasks of the array at ``path``: what dask's dashboard
    (progress, task stream, performance report) groups tasks by (``dask.utils.key_split``
    keeps a key's first ``-``-separated word whole), so one bar per array.

    Examples
    --------
    >>> task_prefix("fc1"), task_prefix("block1/relu-out"), task_prefix("")
    ('relu_mask_fc1', 'relu_mask_block1.relu_out', 'relu_mask')
    """
    escaped = re.sub(r"[^A-Za-z0-9_.]", "_", path.replace("/", "."))
    return f"{ARRAY_TASK_PREFIX}_{escaped}" if escaped else ARRAY_TASK_PREFIX


def unit_ones_of_mask(mask: Any, plan: ChunkPlan, axis: int) -> da.Array:
    """Lazily, the ones of each unit along ``axis`` of an int8 mask array (zarr), as int64."""
    import dask.array as da
    from dask.base import tokenize

    name = f"read-mask-{tokenize(str(mask.store_path), plan)}"
    darr = da.from_array(mask, chunks=plan.chunks, lock=False, asarray=True, name=name)
    others = tuple(a for a in range(len(plan.shape)) if a != axis)
    return darr.sum(axis=others, dtype=np.int64)
