"""schedulers: sizing from the limits a process is really under (affinity, cgroups, rlimits)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
from pathlib import Path

import numpy as np
import pytest
from _support import PYTHON, cli_env

from relu_dask.schedulers import memory_limit_bytes, parse_scheduler, plan_session


def test_memory_limit_agrees_with_distributeds() -> None:
    """The hand-kept copy of distributed's reading (to spare local runs its import) says the same."""
    from distributed.system import memory_limit

    assert memory_limit_bytes() == memory_limit()


def _plan_in_child(tmp_path: Path, small_source: tuple[Path, np.ndarray], preexec, *extra: str) -> dict:  # type: ignore[no-untyped-def]
    source, _ = small_source
    report = tmp_path / "plan.json"
    proc = subprocess.run(
        [PYTHON, "-m", "relu_dask", "plan", str(source), str(tmp_path / "out.zarr"), "--report", str(report), *extra],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=300,
        preexec_fn=preexec,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(report.read_text())


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2+ cores")
def test_a_process_pinned_to_one_core_is_sized_for_one(tmp_path: Path, small_source: tuple[Path, np.ndarray]) -> None:
    """As under ``taskset -c 0`` or a Slurm allocation of one CPU."""
    one = min(os.sched_getaffinity(0))
    report = _plan_in_child(tmp_path, small_source, lambda: os.sched_setaffinity(0, {one}))
    assert (report["num_threads"], report["numexpr_threads"]) == (1, 1)
    unpinned = _plan_in_child(tmp_path, small_source, None)
    assert unpinned["num_threads"] == len(os.sched_getaffinity(0))


def test_a_memory_limited_process_plans_within_its_limit(tmp_path: Path) -> None:
    """RLIMIT_RSS, one of the limits distributed reads: the plan's memory per thread follows it."""
    limit = 256 * 2**20
    session = plan_session(parse_scheduler("threads"))
    assert session.memory_per_thread_bytes is not None and session.memory_per_thread_bytes > limit
    probe = (
        "from relu_dask.schedulers import plan_session, parse_scheduler; "
        "s = plan_session(parse_scheduler('threads')); print(s.memory_per_thread_bytes, s.num_threads)"
    )
    proc = subprocess.run(
        [PYTHON, "-c", probe],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=120,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_RSS, (limit, limit)),
    )
    assert proc.returncode == 0, proc.stderr
    per_thread, threads = (int(v) for v in proc.stdout.split())
    assert per_thread == limit // threads
