"""Helpers shared by the tests: the numpy oracle, real Zarr stores on disk, snapshots."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr


def oracle(x: np.ndarray, at_zero: int = 1) -> np.ndarray:
    """The numpy oracle: the mask every result is compared with, bit for bit."""
    return ((x >= 0) if at_zero == 1 else (x > 0)).astype(np.int8)


def activations(shape: tuple[int, ...], dtype: str = "float32", seed: int = 0) -> np.ndarray:
    """Seeded activations with NaN, signed zeros, infinities and subnormals planted."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    flat = x.reshape(-1)
    if np.dtype(dtype).kind == "f" and flat.size >= 8:
        tiny = np.finfo(dtype).smallest_subnormal
        flat[:8] = [np.nan, -0.0, 0.0, np.inf, -np.inf, tiny, -tiny, -np.nan]
    return x


def write_zarr(
    path: Path,
    data: np.ndarray,
    chunks: tuple[int, ...],
    *,
    zarr_format: int = 3,
    shards: tuple[int, ...] | None = None,
    name: str | None = None,
    dimension_names: tuple[str, ...] | None = None,
) -> Any:
    """Write ``data`` as a real Zarr array on disk (inside a group when ``name`` is given)."""
    kwargs: dict[str, Any] = {"shape": data.shape, "dtype": data.dtype, "chunks": chunks, "zarr_format": zarr_format}
    if shards is not None:
        kwargs["shards"] = shards
    if dimension_names is not None and zarr_format == 3:
        kwargs["dimension_names"] = dimension_names
    if name is None:
        array = zarr.create_array(store=str(path), **kwargs)
    else:
        group = zarr.open_group(store=str(path), mode="a", zarr_format=zarr_format)
        kwargs.pop("zarr_format")
        array = group.create_array(name, **kwargs)
    if data.size:
        array[...] = data
    return array


def read_mask(path: Path, name: str = "") -> np.ndarray:
    node: Any = zarr.open(store=str(path), mode="r")
    array = node[name] if name else node
    assert array.dtype == np.int8
    return np.asarray(array[...])


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes: to prove nothing was touched."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def dest_files(dest: Path) -> dict[str, bytes]:
    """Every file of DEST, byte for byte: the chunk files as they are, and the metadata
    (``zarr.json``) as written but for the one thing two runs of a job write differently, the
    value of the creation time in its provenance. DEST's journal (``.relu-dask/``, the run's
    record) is left out."""
    files = {k: v for k, v in snapshot(dest).items() if not k.startswith(".relu-dask/")}
    for name, data in files.items():
        if name.endswith("zarr.json"):
            files[name] = re.sub(rb'"relu_dask_created_utc": "[^"]*"', b'"relu_dask_created_utc": ""', data)
    return files


def chunk_files(path: Path) -> dict[str, bytes]:
    """The chunk files of a store (metadata excluded: it holds a creation time; a DEST's journal too)."""
    metadata = ("zarr.json", ".zarray", ".zgroup", ".zattrs")
    return {k: v for k, v in snapshot(path).items() if not k.endswith(metadata) and not k.startswith(".relu-dask/")}


def cli_env() -> dict[str, str]:
    """The environment for running the CLI as a subprocess."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


PYTHON = sys.executable


def run_cli(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m relu_dask ARGS`` as a real subprocess; its exit code and output.

    For what only a separate process shows: signals, kills, locks held by another process,
    environment variables read at start-up, the traceback of ``--debug``, the entry point.
    Everything else goes through :func:`cli`, in this process, without the 0.7 s import.
    """
    return subprocess.run(
        [PYTHON, "-m", "relu_dask", *args], capture_output=True, text=True, timeout=timeout, env=env or cli_env()
    )


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``relu_dask.cli.main(ARGS)`` in this process, as the command would: its exit code
    and what it printed, in the shape :func:`run_cli` returns.

    The process-wide state the command sets up for itself (its log handlers, warnings routed
    to the log) is put back afterwards, and warnings are shown, not raised, as in the
    command's own process (the suite turns them into errors).
    """
    from relu_dask.cli import main

    names = ("relu_dask", "py.warnings", "asyncio")
    saved = [(log, log.handlers[:], log.level, log.propagate) for log in map(logging.getLogger, names)]
    out, err = io.StringIO(), io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            warnings.simplefilter("default")
            try:
                code = main(list(args))
            except SystemExit as exit_:  # argparse: --help, --version and usage errors
                code = exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 2
                if isinstance(exit_.code, str):
                    print(exit_.code, file=sys.stderr)
    finally:
        logging.captureWarnings(False)
        for log, handlers, level, propagate in saved:
            log.handlers[:], log.level, log.propagate = handlers, level, propagate
    return subprocess.CompletedProcess(["relu-dask", *args], code, out.getvalue(), err.getvalue())


def start_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start the CLI in the background (its output is not needed: it is killed part way)."""
    return subprocess.Popen(
        [PYTHON, "-m", "relu_dask", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env or cli_env(),
    )


def kill_at_step(step: str, *args: str) -> None:
    """Run the CLI with ``args`` until it stops itself at ``step`` (``RELU_DASK_STOP_AT``, one of
    ``relu_dask.journal.STEPS``), then SIGKILL it there: what a kill at exactly that point leaves."""
    import psutil

    proc = start_cli(*args, env={**cli_env(), "RELU_DASK_STOP_AT": step})
    end = time.monotonic() + 120
    while psutil.Process(proc.pid).status() != psutil.STATUS_STOPPED:
        assert proc.poll() is None and time.monotonic() < end, f"the run never reached step {step}"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def files_under(path: Path) -> list[Path]:
    """Every file under ``path`` ([] if none), safe to call while a run deletes folders there
    (``os.walk`` passes over one gone meanwhile, where ``Path.rglob`` raises)."""
    return [Path(root, name) for root, _, names in os.walk(path) for name in names]


def journal_folder(dest: Path) -> Path:
    """The hidden folder inside DEST where relu-dask keeps the job's record."""
    return dest / ".relu-dask"


@dataclass(frozen=True)
class SchedulerCase:
    """One scheduler the contract runs on (conftest's ``scheduler`` fixture), as each interface names it."""

    id: str
    """synchronous, threads, processes, local or external (the test id)."""
    api: Any
    """What ``relu_dask.run(scheduler=...)`` gets: a name, an address or a ``SchedulerSpec``."""
    cli: tuple[str, ...]
    """The same scheduler as options of ``relu-dask run``."""
    label: str
    """What the run report's ``scheduler`` says."""
    num_threads: int
    """Tasks it runs at once, as the run report's ``num_threads`` says."""
    distributed: bool
    """Whether it is a ``dask.distributed`` cluster (it has a dashboard)."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server a test starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
