"""The live page: its figures as blocks finish, served over HTTP during real runs (a real
LocalCluster's dashboard, and relu-dask's own server for the threads scheduler), drawn by a
real browser (headless Chromium)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
from _support import cli, cli_env, free_port

from relu_dask import livepage
from relu_dask.counts import BlockCounts, TaskRow


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        body = response.read()
    return json.loads(body) if url.endswith(".json") else body.decode()


def _layers(path: Path, rows: int = 1200) -> dict[str, np.ndarray]:
    """Three layers as xarray writes them, units labelled, a dead and an always-on unit each."""
    rng = np.random.default_rng(7)
    data = {}
    for name, width in (("fc1", 48), ("fc2", 32), ("fc3", 16)):
        x = rng.standard_normal((rows, width)).astype(np.float32)
        x[:, 3], x[:, 5] = -1.0, 1.0
        data[name] = x
    ds = xr.Dataset(
        {name: (("step", f"unit_{name}"), x) for name, x in data.items()},
        coords={f"unit_{n}": [f"{n}.u{i}" for i in range(x.shape[1])] for n, x in data.items()},
    )
    with warnings.catch_warnings():  # zarr: fixed-width text is not in the v3 spec yet
        warnings.simplefilter("ignore")
        chunks = {name: {"chunks": (8, x.shape[1])} for name, x in data.items()}
        ds.to_zarr(path, mode="w", zarr_format=3, consolidated=False, encoding=chunks)
    return data


def _expected(x: np.ndarray, name: str) -> dict[str, Any]:
    mask = x >= 0
    ones = mask.sum(axis=0)
    return {
        "ones": int(mask.sum()),
        "elements": int(x.size),
        "dead": [f"{name}.u{u} (#{u})" for u in np.flatnonzero(ones == 0)],
        "always_on": [f"{name}.u{u} (#{u})" for u in np.flatnonzero(ones == x.shape[0])],
        "histogram": np.histogram(ones / x.shape[0], bins=livepage.BINS, range=(0.0, 1.0))[0].tolist(),
    }


def test_rows_add_up_to_the_figures_of_the_array() -> None:
    arrays = [livepage.ArrayLive("fc", 2, 4, unit_axis=1, unit_block=2, units=3)]
    livepage.begin("run-a", arrays, {"relu_mask_fc-x": "fc"})
    # two blocks of 4 rows x 2 units, then the edge block of 4 rows x 1 unit
    livepage.add("fc", (0, 0), TaskRow.encode(BlockCounts(8, 4, 0, 0, 0, 8), [4, 0], TaskRow.width(2)))
    livepage.add("fc", (0, 0), TaskRow.encode(BlockCounts(8, 4, 0, 0, 0, 8), [4, 0], TaskRow.width(2)))  # again
    livepage.add("fc", (0, 1), TaskRow.encode(BlockCounts(4, 2, 0, 0, 0, 4), [2], TaskRow.width(2)), "run-b")
    partial = livepage.snapshot()["arrays"][0]
    assert (partial["tasks_done"], partial["ones"], partial["bytes_read"]) == (1, 4, 32)  # another run's: dropped
    assert partial["units"]["dead_labels"] == ["#1"] and partial["units"]["always_on_labels"] == ["#0"]
    assert partial["units"]["seen"] == 2
    livepage.add("fc", (0, 1), TaskRow.encode(BlockCounts(4, 2, 0, 0, 0, 4), [2], TaskRow.width(2)), "run-a")
    done = livepage.snapshot()["arrays"][0]
    assert (done["tasks_done"], done["num_tasks"], done["ones"], done["elements"]) == (2, 2, 6, 12)
    assert done["active_fraction"] == 0.5 and done["units"]["seen"] == 3
    assert sum(done["units"]["histogram"]) == 3 and done["units"]["histogram"][10] == 1  # unit 2: 2 of 4


def _follow(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """``relu-dask run ... --follow``: the run stays up (and its page with it) until idle."""
    with log.open("wb") as err:  # the child has its own copy of the file
        return subprocess.Popen(
            [sys.executable, "-m", "relu_dask", "run", *args, "--follow", "0.5", "--follow-idle", "20"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=cli_env(),
        )


def _watch(url: str, proc: subprocess.Popen[bytes], total: int) -> list[dict[str, Any]]:
    """Poll the page's figures until every task is done (or the run ends); all snapshots seen."""
    seen: list[dict[str, Any]] = []
    end = time.monotonic() + 120
    while time.monotonic() < end and proc.poll() is None:
        try:
            data = _get(url)
        except OSError:
            time.sleep(0.02)
            continue
        seen.append(data)
        if data.get("arrays") and sum(a["tasks_done"] for a in data["arrays"]) == total and data.get("follow"):
            return seen
        time.sleep(0.02)
    raise AssertionError(f"the page never showed all {total} tasks done: last {seen[-1:] or 'nothing'}")


@pytest.mark.parametrize("scheduler", ["local", "threads", "external"])
def test_the_page_follows_a_real_run_to_the_figures_numpy_gives(
    tmp_path: Path, scheduler: str, request: pytest.FixtureRequest
) -> None:
    data = _layers(tmp_path / "acts.zarr")
    port = free_port()
    log = tmp_path / "stderr.log"
    args = [str(tmp_path / "acts.zarr"), str(tmp_path / "masks.zarr"), "--stats", "--chunks", "8,64"]
    args += ["--dashboard-address", f"127.0.0.1:{port}", "--report", str(tmp_path / "report.json")]
    if scheduler == "external":  # a cluster of the user's: its workers log events, relu-dask serves the page
        args += ["--scheduler", request.getfixturevalue("dask_cluster")]
    else:
        args += ["--scheduler", scheduler, "--workers", "1"]
    if scheduler == "local":
        args += ["--threads-per-worker", "1"]
    proc = _follow(args, log)
    try:
        total = 3 * 1200 // 8
        seen = _watch(f"http://127.0.0.1:{port}/relu-dask/data.json", proc, total)
        page = _get(f"http://127.0.0.1:{port}/relu-dask")
        if scheduler == "local":  # inside the dask dashboard, beside its own pages
            assert "Dask" in _get(f"http://127.0.0.1:{port}/status")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert proc.returncode == 0, log.read_text()
    assert "<title>relu-dask: live</title>" in page
    done = [sum(a["tasks_done"] for a in s["arrays"]) for s in seen if s.get("arrays")]
    assert any(0 < n < total for n in done), f"no snapshot caught the run part way: {done[:5]}...{done[-5:]}"
    assert done == sorted(done)  # blocks only ever add up
    last = seen[-1]
    assert last["follow"]["rows_done"] == 1200 and last["follow"]["rows_behind"] == 0
    for entry in last["arrays"]:
        want = _expected(data[entry["path"]], entry["path"])
        assert (entry["ones"], entry["elements"], entry["tasks_done"]) == (want["ones"], want["elements"], 150)
        assert entry["bytes_read"] == want["elements"] * 4
        units = entry["units"]
        assert (units["dead_labels"], units["always_on_labels"]) == (want["dead"], want["always_on"])
        assert units["histogram"] == want["histogram"]
    assert json.loads((tmp_path / "report.json").read_text())["live_page"] == f"http://127.0.0.1:{port}/relu-dask"
    # the link is said when the run starts, before any task
    lines = log.read_text().splitlines()
    said = next(i for i, line in enumerate(lines) if f"127.0.0.1:{port}/relu-dask" in line)
    assert said < next(i for i, line in enumerate(lines) if "start:" in line)


def test_a_browser_draws_the_page(tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("RELU_DASK_REQUIRE_BROWSER"):
            pytest.fail("no Chromium, and RELU_DASK_REQUIRE_BROWSER says there must be one (.ci/run installs it)")
        pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium)")
    _layers(tmp_path / "acts.zarr", rows=240)
    port = free_port()
    args = [str(tmp_path / "acts.zarr"), str(tmp_path / "masks.zarr"), "--stats", "--chunks", "8,64"]
    proc = _follow([*args, "--workers", "1", "--dashboard-address", f"127.0.0.1:{port}"], tmp_path / "log")
    try:
        _watch(f"http://127.0.0.1:{port}/relu-dask/data.json", proc, 3 * 240 // 8)
        url = f"http://127.0.0.1:{port}/relu-dask"
        shown = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--dump-dom", url],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    dom = shown.stdout.split("<script>")[0]  # what the page drew, not its script
    assert shown.returncode == 0, shown.stderr[-2000:]
    for name in ("fc1", "fc2", "fc3"):  # a row each, every block done, and a histogram drawn
        assert f'<tr class="array" data-path="{name}"><td>{name}</td><td class="blocks">30 / 30</td>' in dom
    assert dom.count('<rect class="bin"') == 3 * livepage.BINS
    assert "fc1.u3 (#3)" in dom and "fc1.u5 (#5)" in dom  # the dead and the always-on unit, by label


def test_a_bad_dashboard_address_is_one_line(tmp_path: Path) -> None:
    proc = cli("run", str(tmp_path / "a.zarr"), str(tmp_path / "m.zarr"), "--dashboard-address", "8787")
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        "relu-dask: error: --dashboard-address must be HOST:PORT, such as 127.0.0.1:8787, got '8787'"
    ]


def test_a_taken_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _layers(tmp_path / "acts.zarr", rows=16)
        proc = cli(
            "run", str(tmp_path / "acts.zarr"), str(tmp_path / "m.zarr"), "--dashboard-address", f"127.0.0.1:{port}"
        )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        f"relu-dask: error: cannot serve the live page at 127.0.0.1:{port}: Address already in use"
    ]
    assert not (tmp_path / "m.zarr").exists()
