"""What a run is asked to do: :class:`RunOptions`, one frozen, self-validating value.

The command line (:mod:`relu_dask.cli`), a job file (through the same parser) and the
Python API (:func:`relu_dask.run`) all build one with :meth:`RunOptions.create`, which
parses text such as ``"256MiB"``, ``"8192,4096"`` or ``'{"anon": true}'`` at this edge.
Below it (:mod:`relu_dask.planning`, :mod:`relu_dask.execution`) only numbers, tuples and
parsed specs travel.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, Unpack, get_args

from relu_dask import chunking
from relu_dask.computing import PROGRESS_INTERVAL_S, Progress
from relu_dask.errors import InputError
from relu_dask.kernel import ENGINES, Engine, parse_at_zero, parse_nan_policy
from relu_dask.livewriter import SETTLE_S
from relu_dask.locations import Location, parse_location, parse_storage_options
from relu_dask.outputs import DEFAULT_COMPRESSOR, parse_compressor
from relu_dask.schedulers import SchedulerSpec, cores_at_most, count_cores, parse_scheduler
from relu_dask.stats import UNIT_DIMS, UnitChoice, parse_unit_dims

__all__ = [
    "SETTLE_ENV",
    "RunKeywords",
    "RunOptions",
    "check_output_files",
    "default_settle_s",
    "parse_append_axis",
    "parse_settle_s",
    "unit_choice",
]

_PROGRESS: tuple[str, ...] = get_args(Progress)


def _threads() -> SchedulerSpec:
    return parse_scheduler("threads")


#: The environment variable that sets the default of ``--settle-time`` (seconds).
SETTLE_ENV = "RELU_DASK_SETTLE_TIME"


def parse_settle_s(value: float | str, *, what: str = "--settle-time") -> float:
    """A settle time: a number of seconds, 0 or more (0: never wait for a writer)."""
    try:
        seconds = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        seconds = math.nan
    if not 0 <= seconds < math.inf:
        raise InputError(f"{what} must be 0 or more seconds, got {value!r}")
    return seconds


def default_settle_s() -> float:
    """The settle time when none is given: ``$RELU_DASK_SETTLE_TIME``, else
    :data:`relu_dask.livewriter.SETTLE_S` (2 s)."""
    text = os.environ.get(SETTLE_ENV, "").strip()
    return parse_settle_s(text, what=SETTLE_ENV) if text else SETTLE_S


class RunKeywords(TypedDict, total=False):
    """The keyword options of :func:`relu_dask.run`, :func:`relu_dask.follow` and
    :meth:`RunOptions.create`, in the forms they take (text where the CLI gives text): the one
    place they are declared. :func:`relu_dask.run`'s docstring says what each does and its
    default."""

    chunks: chunking.ChunksSpec
    dest_chunks: str | Sequence[int] | None
    dest_shards: str | Sequence[int] | None
    at_zero: int | str
    nan: str
    engine: Engine
    scheduler: str | SchedulerSpec
    overwrite: bool
    progress: Progress
    progress_interval_s: float
    report_path: str | os.PathLike[str] | None
    metrics_path: str | os.PathLike[str] | None
    performance_report: str | os.PathLike[str] | None
    stats: bool
    unit_axis: int | None
    unit_dim: str | Sequence[str] | None
    plot_path: str | os.PathLike[str] | None
    storage_options: str | dict[str, Any] | None
    dest_compressor: str
    append_axis: int | str | None
    settle_s: float | str | None


@dataclass(frozen=True)
class RunOptions:
    """SOURCE, DEST and every option of ``relu-dask run``, parsed and checked.

    Build it with :meth:`create` (which takes the text forms); the constructor takes the
    parsed forms and checks them again, so that no invalid value exists.
    """

    source: str
    dest: str
    chunks: str | int | tuple[int, ...] = "auto"
    """The processing block: ``"auto"``, a byte count, or a block shape."""
    dest_chunks: tuple[int, ...] | None = None
    """The masks' chunk shape (None: the source's)."""
    dest_shards: tuple[int, ...] | None = None
    """The masks' shard shape (None: the source's, unless ``dest_chunks`` is given)."""
    at_zero: int = 1
    nan: str = "zero"
    engine: Engine = "auto"
    scheduler: SchedulerSpec = field(default_factory=_threads)
    overwrite: bool = False
    progress: Progress = "none"
    progress_interval_s: float = PROGRESS_INTERVAL_S
    report_path: str | None = None
    metrics_path: str | None = None
    """Where to write the run's figures in Prometheus' text format (``--metrics-file``)."""
    performance_report: str | None = None
    unit_axis: int | None = None
    """With statistics: the unit axis where an array has none of :attr:`unit_dims` (-1: the
    last); None: no statistics."""
    unit_dims: tuple[str, ...] = ()
    """With statistics: the dimension names whose axis is the units, the first an array has
    (``--unit-dim``, or :data:`relu_dask.stats.UNIT_DIMS` when no unit axis is given)."""
    unit_dims_required: bool = False
    """Whether an array without any of :attr:`unit_dims` is refused (``--unit-dim`` given)."""
    plot_path: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    dest_compressor: str = DEFAULT_COMPRESSOR
    append_axis: int | None = 0
    """The axis along which SOURCE may grow between runs (None: growth is refused)."""
    settle_s: float = field(default_factory=default_settle_s)
    """How long a run waits for rows a writer appears to be still appending to SOURCE
    (its shape grown, its chunks not all written) before it leaves them for the next run."""

    @classmethod
    def create(
        cls, source: str | os.PathLike[str], dest: str | os.PathLike[str], **options: Unpack[RunKeywords]
    ) -> RunOptions:
        """Parse the text forms the CLI, a job file and :func:`relu_dask.run` take
        (:class:`RunKeywords`; each one absent takes its default).

        ``stats`` (or a ``plot_path``) turns statistics on along ``unit_axis``;
        ``settle_s`` None takes :func:`default_settle_s`. An unknown keyword is a TypeError,
        as for any function.
        """
        unknown = sorted(set(options) - RunKeywords.__optional_keys__)
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
        o = options
        scheduler = o.get("scheduler", "threads")
        spec = scheduler if isinstance(scheduler, SchedulerSpec) else parse_scheduler(scheduler)
        storage_options = parse_storage_options(o.get("storage_options"))
        remote = not all(parse_location(p, storage_options).is_local for p in (source, dest))
        chunks, spec = _for_the_store(chunking.parse_chunks(o.get("chunks", "auto")), spec, remote=remote)
        dest_chunks, dest_shards = o.get("dest_chunks"), o.get("dest_shards")
        plot_path, settle_s = o.get("plot_path"), o.get("settle_s")
        units = unit_choice(o.get("unit_axis"), o.get("unit_dim"))
        return cls(
            source=os.fspath(source),
            dest=os.fspath(dest),
            chunks=chunks,
            dest_chunks=None if dest_chunks is None else chunking.parse_shape(dest_chunks, what="dest chunks"),
            dest_shards=None if dest_shards is None else chunking.parse_shape(dest_shards, what="dest shards"),
            at_zero=parse_at_zero(o.get("at_zero", 1)),
            nan=o.get("nan", "zero"),
            engine=o.get("engine", "auto"),
            scheduler=spec,
            overwrite=o.get("overwrite", False),
            progress=o.get("progress", "none"),
            progress_interval_s=o.get("progress_interval_s", PROGRESS_INTERVAL_S),
            report_path=_path_or_none(o.get("report_path")),
            metrics_path=_path_or_none(o.get("metrics_path")),
            performance_report=_path_or_none(o.get("performance_report")),
            **_unit_fields(units if o.get("stats", False) or plot_path is not None else None),
            plot_path=_path_or_none(plot_path),
            storage_options=storage_options,
            dest_compressor=o.get("dest_compressor", DEFAULT_COMPRESSOR),
            append_axis=parse_append_axis(o.get("append_axis", 0)),
            settle_s=default_settle_s() if settle_s is None else parse_settle_s(settle_s),
        )

    def __post_init__(self) -> None:
        if chunking.parse_chunks(self.chunks) != self.chunks:
            raise InputError(f"chunks must be 'auto', a byte count or a block shape, got {self.chunks!r}")
        for what, shape in (("dest chunks", self.dest_chunks), ("dest shards", self.dest_shards)):
            if shape is not None and chunking.parse_shape(shape, what=what) != shape:
                raise InputError(f"{what} must be a tuple of positive integers, got {shape!r}")
        parse_at_zero(self.at_zero)
        parse_nan_policy(self.nan)
        if self.engine not in ENGINES:
            raise InputError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.progress not in _PROGRESS:
            raise InputError(f"progress must be one of {', '.join(_PROGRESS)}, got {self.progress!r}")
        if isinstance(self.progress_interval_s, bool) or not isinstance(self.progress_interval_s, int | float):
            raise InputError(f"the progress interval must be a number of seconds, got {self.progress_interval_s!r}")
        if not self.progress_interval_s >= 0:
            raise InputError(f"the progress interval must be 0 or more seconds, got {self.progress_interval_s}")
        parse_compressor(self.dest_compressor)
        if parse_settle_s(self.settle_s, what="the settle time") != self.settle_s:
            raise InputError(f"the settle time must be a number of seconds, got {self.settle_s!r}")
        if self.append_axis is not None and (
            isinstance(self.append_axis, bool) or not isinstance(self.append_axis, int)
        ):
            raise InputError(f"the append axis must be an integer or None, got {self.append_axis!r}")
        if self.unit_axis is not None and (isinstance(self.unit_axis, bool) or not isinstance(self.unit_axis, int)):
            raise InputError(f"the unit axis must be an integer, got {self.unit_axis!r}")
        if self.performance_report is not None and self.scheduler.name not in ("local", "address"):
            raise InputError(
                "--performance-report needs a distributed scheduler: --scheduler local, tcp://... or --scheduler-file"
            )
        if self.plot_path is not None:
            import importlib.util

            if importlib.util.find_spec("matplotlib") is None:
                raise InputError("--plot needs matplotlib: pip install 'relu-dask[plot]'")
        if self.storage_options and self.source_location.is_local and self.dest_location.is_local:
            raise InputError("--storage-options only apply to URLs such as s3://bucket/path")

    @property
    def units(self) -> UnitChoice | None:
        """How each array's unit axis is chosen (None: no statistics)."""
        if self.unit_axis is None:
            return None
        return UnitChoice(self.unit_axis, self.unit_dims, self.unit_dims_required)

    @property
    def source_location(self) -> Location:
        return parse_location(self.source, self.storage_options)

    @property
    def dest_location(self) -> Location:
        """DEST as given (for a group SOURCE, :func:`relu_dask.outputs.prepare_dest` may refine it)."""
        return parse_location(self.dest, self.storage_options)


def _axis(value: int | str) -> int:
    """An integer axis as a Python int (``1``, ``"1"``, ``np.int64(1)``)."""
    try:
        return operator.index(value) if not isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise InputError(f"--unit-axis must be an integer axis such as -1, got {value!r}") from None


#: On an object store a task waits on the network more than it computes: the threads
#: scheduler runs at least this many tasks at once (unless ``--workers`` says otherwise) ...
REMOTE_THREADS = 32
#: ... on blocks of about this many bytes (for ``--chunks auto``), so that memory stays flat.
REMOTE_BLOCK_BYTES = 4 * 2**20


def _for_the_store(
    chunks: str | int | tuple[int, ...], spec: SchedulerSpec, *, remote: bool
) -> tuple[str | int | tuple[int, ...], SchedulerSpec]:
    """``--chunks`` and the scheduler as given, or, where SOURCE or DEST is an object store and
    they were left to relu-dask, more tasks in flight on smaller blocks (latency hidden)."""
    if not remote:
        return chunks, spec
    if spec.name == "threads" and spec.num_workers is None:  # (count_cores imports dask: only where it may matter)
        threads = REMOTE_THREADS if cores_at_most() <= REMOTE_THREADS else max(REMOTE_THREADS, count_cores())
        spec = dataclasses.replace(spec, num_workers=threads)
    return (REMOTE_BLOCK_BYTES if chunks == "auto" else chunks), spec


def unit_choice(unit_axis: int | str | None, unit_dim: str | Sequence[str] | None) -> UnitChoice:
    """The units by name (``--unit-dim``), by axis (``--unit-axis``), or, given neither, a
    dimension named like the units (:data:`relu_dask.stats.UNIT_DIMS`), else the last axis."""
    if unit_axis is not None and unit_dim is not None:
        raise InputError("give --unit-dim (by name) or --unit-axis (by number), not both")
    if unit_dim is not None:
        return UnitChoice(dims=parse_unit_dims(unit_dim), required=True)
    if unit_axis is None:
        return UnitChoice(dims=UNIT_DIMS)
    return UnitChoice(axis=_axis(unit_axis))


def _unit_fields(units: UnitChoice | None) -> dict[str, Any]:
    """RunOptions' unit fields for ``units`` (None: no statistics)."""
    if units is None:
        return {"unit_axis": None}
    return {"unit_axis": units.axis, "unit_dims": units.dims, "unit_dims_required": units.required}


def parse_append_axis(value: int | str | None) -> int | None:
    """``--append-axis``: an integer axis (``0``, ``-1``), or ``none`` (None) to refuse growth."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    try:
        return _axis(value)
    except InputError:
        raise InputError(f"--append-axis must be an integer axis such as 0, or none; got {value!r}") from None


def _path_or_none(value: str | os.PathLike[str] | None) -> str | None:
    return None if value is None else os.fspath(value)


def check_output_files(**paths: str | os.PathLike[str] | None) -> None:
    """Refuse, before any work, a ``--report``, ``--plot`` or ``--performance-report`` file
    that could not be written at the end: its folder missing or not writable, or a folder
    in its place."""
    for option, value in paths.items():
        if value is None:
            continue
        path, flag = Path(value), "--" + option.replace("_", "-")
        if path.is_dir():
            raise InputError(f"{flag} {path} is a folder: give a file name")
        folder = path.parent
        if not folder.is_dir():
            raise InputError(f"{flag} {path}: the folder {folder} does not exist: create it first")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise InputError(f"{flag} {path}: cannot write in {folder} (permission denied)")
