"""``--metrics-file``: a run's figures in Prometheus' text format, read back with prometheus_client's parser."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _support import activations, cli, oracle, read_mask, write_zarr

import relu_dask

parser = pytest.importorskip("prometheus_client.parser")


def _samples(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in parser.text_string_to_metric_families(path.read_text())
        for s in family.samples
    }


def test_a_run_writes_its_figures_for_prometheus(tmp_path: Path) -> None:
    x = activations((64, 32), seed=9)
    x[:, 7] = -1.0  # a dead unit
    write_zarr(tmp_path / "g.zarr", x, (16, 32), name="fc1")
    dest, metrics, report = tmp_path / "out.zarr", tmp_path / "relu.prom", tmp_path / "r.json"
    args = ("run", str(tmp_path / "g.zarr"), str(dest), "--stats", "--chunks", "16,32", "--scheduler", "synchronous")
    proc = cli(*args, "--metrics-file", str(metrics), "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    got, data, d = _samples(metrics), json.loads(report.read_text()), (("dest", str(dest)),)
    assert got[("relu_dask_tasks_done", d)] == data["tasks_done_now"] == 4
    assert got[("relu_dask_tasks_skipped", d)] == 0
    assert got[("relu_dask_read_bytes", d)] == data["bytes_read"] == x.nbytes
    assert got[("relu_dask_dest_bytes", d)] == data["bytes_written"]
    assert got[("relu_dask_run_outcome", (("dest", str(dest)), ("outcome", "done")))] == 1
    fc1 = (("array", "fc1"), ("dest", str(dest)))
    assert got[("relu_dask_active_fraction", fc1)] == pytest.approx(oracle(x).mean())
    assert got[("relu_dask_dead_units", fc1)] == 1 and got[("relu_dask_always_on_units", fc1)] == 0
    assert got[("relu_dask_last_success_timestamp_seconds", d)] > 1.7e9
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []  # written whole, renamed

    again = cli(*args, "--metrics-file", str(metrics))  # a rerun that did nothing says so too
    assert _samples(metrics)[("relu_dask_run_outcome", (("dest", str(dest)), ("outcome", "already complete")))] == 1
    assert again.returncode == 0 and _samples(metrics)[("relu_dask_tasks_skipped", d)] == 4


def test_a_plan_writes_no_metrics_and_a_follow_says_how_far_behind(tmp_path: Path) -> None:
    x = activations((40, 8), seed=3)
    write_zarr(tmp_path / "src.zarr", x, (10, 8))
    source, dest, metrics = tmp_path / "src.zarr", tmp_path / "out.zarr", tmp_path / "relu.prom"
    assert cli("plan", str(source), str(dest), "--metrics-file", str(metrics)).returncode == 0
    assert not metrics.exists()
    state = relu_dask.follow(source, dest, every_s=0.1, idle_s=0.3, metrics_path=metrics, scheduler="synchronous")
    assert state.stopped_by == "idle" and state.passes >= 2
    got = _samples(metrics)
    assert got[("relu_dask_rows_behind", (("dest", str(dest)),))] == 0
    assert np.array_equal(read_mask(dest), oracle(x))


def test_each_job_of_a_job_file_gets_its_own_metrics_file(tmp_path: Path) -> None:
    write_zarr(tmp_path / "a.zarr", activations((10, 10), seed=1), (5, 5))
    write_zarr(tmp_path / "b.zarr", activations((12, 6), seed=2), (4, 6))
    (tmp_path / "jobs.toml").write_text(
        '[defaults]\nmetrics_file = "prom/{name}.prom"\nscheduler = "synchronous"\n\n'
        '[[job]]\nsource = "a.zarr"\ndest = "a-masks.zarr"\n\n'
        '[[job]]\nsource = "b.zarr"\ndest = "b-masks.zarr"\n'
    )
    (tmp_path / "prom").mkdir()
    assert cli("run", "--config", str(tmp_path / "jobs.toml")).returncode == 0
    for name, tasks in (("a-masks", 1), ("b-masks", 1)):  # small: one block each
        dest = (("dest", str(tmp_path / f"{name}.zarr")),)
        assert _samples(tmp_path / "prom" / f"{name}.prom")[("relu_dask_tasks_done", dest)] == tasks
