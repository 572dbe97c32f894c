"""Helpers shared by the benchmark scripts: machine facts, medians, Markdown tables, and
child processes measured from outside (wall, CPU seconds, peak RSS).

Peak RSS of a child is ``ru_maxrss`` from ``os.wait4`` on that child alone (Linux's
high-water mark of its resident set, all threads, sampled by the kernel: no polling gaps).
One trap is avoided on purpose: Python's :mod:`subprocess` starts children with
``vfork``, and then Linux folds the *parent's* high-water mark into the child's
``ru_maxrss`` at ``exec``. Passing a ``preexec_fn`` forces a plain ``fork``, after which
the child's figure is ``max(its own peak, the parent's anonymous RSS at fork)``; the
drivers keep the parent small (no arrays held, data made in children) so the first term
always wins. :func:`run_child` records the parent's RSS at each spawn so that this can
be checked (see :func:`check_parent_small`).
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

__all__ = [
    "GIB",
    "MIB",
    "ChildResult",
    "OtherLoad",
    "check_parent_small",
    "compile_bytecode",
    "machine_facts",
    "markdown_table",
    "median",
    "print_facts",
    "run_child",
]

MIB = 2**20
GIB = 2**30

#: The parent's RSS above which a child's ru_maxrss could be the parent's, not its own.
PARENT_RSS_WARN_BYTES = 80 * MIB

_PACKAGES = ("numpy", "numexpr", "dask", "distributed", "zarr", "numcodecs", "relu-dask")


def machine_facts() -> list[tuple[str, str]]:
    """(fact, value) pairs: CPU, cores, memory, Python and the libraries that matter."""
    facts = [
        ("CPU", _cpu_model()),
        ("cores (affinity / os.cpu_count)", f"{len(os.sched_getaffinity(0))} / {os.cpu_count()}"),
        ("memory", f"{_total_memory_bytes() / GIB:.1f} GiB"),
        ("python", f"{platform.python_version()} ({platform.python_implementation()}, {sys.platform})"),
    ]
    for name in _PACKAGES:
        try:
            facts.append((name, version(name)))
        except PackageNotFoundError:
            facts.append((name, "not installed"))
    import numexpr

    facts.append(("numexpr threads (default)", str(numexpr.get_num_threads())))
    blas = {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS_", "OMP_", "NUMEXPR_", "MKL_"))}
    facts.append(("thread env vars", ", ".join(f"{k}={v}" for k, v in sorted(blas.items())) or "none set"))
    return facts


def print_facts(title: str = "Machine", extra: Sequence[tuple[str, str]] = ()) -> None:
    print(f"### {title}\n")
    print(markdown_table(["fact", "value"], [*machine_facts(), *extra], align="ll"))
    print()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _total_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def compile_bytecode() -> str:
    """Compile relu_dask's and these scripts' bytecode now, as ``pip install`` does; say so.

    Children then start as an installed package starts. Without it, an editable install
    under ``PYTHONDONTWRITEBYTECODE=1`` (this project's machines set it) compiles every
    relu_dask module from source in every child: about 35 ms of each run's start-up, on
    one core. The libraries in site-packages were compiled when pip installed them.
    """
    import compileall
    import importlib.util

    spec = importlib.util.find_spec("relu_dask")  # finds it without importing it
    folders = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    folders.append(Path(__file__).resolve().parent)
    for folder in folders:
        if not compileall.compile_dir(folder, quiet=1, maxlevels=0):
            raise RuntimeError(f"could not compile the bytecode of {folder}")
    return "compiled before measuring (" + ", ".join(str(f) for f in folders) + ")"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A GitHub Markdown table; ``align`` has one letter per column (l, r or c)."""
    align = align or "l" + "r" * (len(headers) - 1)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(marks[a] for a in align) + "|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass(frozen=True)
class ChildResult:
    """One child process, measured from outside."""

    wall_s: float
    """From just before the spawn to the reap: interpreter start and imports included."""
    user_s: float
    sys_s: float
    peak_rss_bytes: int
    """ru_maxrss of this child (see the module docstring)."""
    parent_rss_bytes: int
    """The parent's RSS when it spawned the child (an upper bound on what could leak in)."""
    machine_busy_s: float
    """CPU seconds the whole machine spent busy while the child ran (from /proc/stat)."""
    returncode: int
    stdout: str
    stderr: str

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    @property
    def other_load(self) -> float:
        """Average cores that other processes kept busy meanwhile: the noise on this run."""
        return max(0.0, self.machine_busy_s - self.cpu_s) / self.wall_s


def run_child(argv: Sequence[str], *, env: dict[str, str] | None = None, timeout_s: float | None = None) -> ChildResult:
    """Run ``argv`` to completion; return its wall, CPU and peak RSS. Raises on failure."""
    out_path = Path(f"/tmp/.bench-child-{os.getpid()}.out")
    err_path = Path(f"/tmp/.bench-child-{os.getpid()}.err")
    parent_rss = _self_rss_bytes()
    with out_path.open("w+b") as out, err_path.open("w+b") as err:
        busy_before = _machine_busy_s()
        start = time.perf_counter()
        # preexec_fn forces fork instead of vfork: see the module docstring.
        proc = subprocess.Popen(list(argv), stdout=out, stderr=err, env=env, preexec_fn=_noop)
        timer = threading.Timer(timeout_s, proc.kill) if timeout_s else None
        if timer:
            timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            if timer:
                timer.cancel()
        wall = time.perf_counter() - start
        busy = _machine_busy_s() - busy_before
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    out_path.unlink(missing_ok=True)
    err_path.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}:\n{stdout}\n{stderr}")
    return ChildResult(
        wall_s=wall,
        user_s=usage.ru_utime,
        sys_s=usage.ru_stime,
        peak_rss_bytes=usage.ru_maxrss * 1024,  # KiB on Linux
        parent_rss_bytes=parent_rss,
        machine_busy_s=busy,
        returncode=proc.returncode,
        stdout=stdout,
        stderr=stderr,
    )


def _noop() -> None:
    pass


class OtherLoad:
    """Cores that other processes kept busy during a ``with`` block of this process.

    >>> with OtherLoad() as load:
    ...     pass
    >>> load.cores >= 0
    True
    """

    def __enter__(self) -> OtherLoad:
        self._busy = _machine_busy_s()
        self._own = _own_cpu_s()
        self._start = time.perf_counter()
        self.cores = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        wall = max(time.perf_counter() - self._start, 1e-9)
        others = (_machine_busy_s() - self._busy) - (_own_cpu_s() - self._own)
        self.cores = max(0.0, others) / wall


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _self_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def check_parent_small(results: Sequence[ChildResult]) -> str | None:
    """A warning if the parent was ever large enough to blur a child's peak RSS."""
    worst = max((r.parent_rss_bytes for r in results), default=0)
    if worst > PARENT_RSS_WARN_BYTES:
        return (
            f"warning: this driver's RSS reached {worst / MIB:.0f} MiB at a spawn; "
            "children's peak RSS below that may be the driver's, not theirs"
        )
    return None
