"""Shared fixtures: real Zarr stores on disk, a real dask.distributed cluster."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _support import SchedulerCase, activations, write_zarr
from hypothesis import settings

# One hypothesis profile for every property test: enough examples to find edge cases in the
# planner and the kernel, no deadline (the machines are shared and noisy), no example
# database left in the checkout. HYPOTHESIS_PROFILE=quick for a fast local loop.
settings.register_profile("relu-dask", max_examples=200, deadline=None, database=None)
settings.register_profile("quick", max_examples=20, deadline=None, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "relu-dask"))

# A run waits up to 2 s (--settle-time) for rows a writer seems to be still appending: the tests
# that land a run beside a half-done append set it short, for in-process runs and subprocesses
# alike (they inherit the environment). tests/test_growth.py checks the wait itself.
os.environ.setdefault("RELU_DASK_SETTLE_TIME", "0.2")


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (pyproject.toml): a test process per core this process may run on (its
    affinity mask, which taskset and cgroup cpusets set), and at least 2: many tests spend
    their time waiting on a subprocess or a cluster, which another test can use meanwhile.
    Every test works in its own ``tmp_path``, binds port 0 and starts its own clusters, so
    the processes share nothing."""
    return max(2, len(os.sched_getaffinity(0)))


@pytest.fixture
def small_source(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A 2-D float32 Zarr v3 array with ragged edges and every edge value."""
    x = activations((45, 37))
    path = tmp_path / "src.zarr"
    write_zarr(path, x, (8, 16))
    return path, x


@pytest.fixture(scope="session")
def dask_cluster() -> Iterator[str]:
    """A real dask.distributed scheduler with two worker processes on 127.0.0.1; its address."""
    from distributed import LocalCluster

    # No Client here: a default client would capture every dask.compute() of the session.
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        memory_limit="2GiB",
    ) as cluster:
        cluster.wait_for_workers(2, timeout=60)
        yield cluster.scheduler_address


#: The schedulers the contract (tests/test_scheduler_contract.py) runs on, each small: two tasks at once.
SCHEDULERS = ("synchronous", "threads", "processes", "local", "external")


@pytest.fixture(scope="session", params=SCHEDULERS, ids=[f"scheduler={name}" for name in SCHEDULERS])
def scheduler(request: pytest.FixtureRequest) -> SchedulerCase:
    """Each scheduler in turn: dask's three local ones, a LocalCluster relu-dask starts itself
    (``--scheduler local``), and an existing cluster it connects to (``dask_cluster``'s address)."""
    from relu_dask.schedulers import parse_scheduler

    name = request.param
    if name == "synchronous":
        return SchedulerCase(name, "synchronous", ("--scheduler", "synchronous"), "synchronous", 1, False)
    if name in ("threads", "processes"):
        spec = parse_scheduler(name, num_workers=2)
        return SchedulerCase(name, spec, ("--scheduler", name, "--workers", "2"), name, 2, False)
    if name == "local":
        spec = parse_scheduler("local", num_workers=2, threads_per_worker=1, dashboard_address="127.0.0.1:0")
        sizes = ("--workers", "2", "--threads-per-worker", "1", "--dashboard-address", "127.0.0.1:0")
        cli = ("--scheduler", "local", *sizes)
        return SchedulerCase(name, spec, cli, "local", 2, True)
    address = request.getfixturevalue("dask_cluster")  # two workers of one thread each
    return SchedulerCase(name, address, ("--scheduler", address), address, 2, True)
