"""Screenshots of the live page for docs/: a run part way, and the same run done.

A Dataset of three layers as xarray writes them (labelled units, a few dead and always-on),
masked by ``relu-dask run --stats --follow`` on a LocalCluster of one single-threaded worker
(small blocks, so that the run takes a few seconds), its page at ``/relu-dask`` of the dask
dashboard. Headless Chromium (Debian's ``chromium``) takes a screenshot while the run is part
way and one once every block is done. Usage::

    python scripts/screenshot_livepage.py            # writes docs/images/livepage-*.png
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent.parent / "docs" / "images"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--hide-scrollbars",
    "--window-size=1100,640",
    "--virtual-time-budget=2500",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dataset(path: Path) -> None:
    import xarray as xr

    rng = np.random.default_rng(20261203)
    layers = {}
    for name, width in (("conv1", 64), ("fc1", 128), ("fc2", 32)):
        x = rng.standard_normal((20000, width)).astype(np.float32) + rng.normal(0, 0.8, width).astype(np.float32)
        x[:, rng.choice(width, 3, replace=False)] = -1.0  # dead units
        x[:, rng.choice(width, 2, replace=False)] = 1.0  # always-on units
        layers[name] = x
    ds = xr.Dataset(
        {name: (("step", f"{name}_unit"), x) for name, x in layers.items()},
        coords={f"{n}_unit": [f"{n}.{i}" for i in range(x.shape[1])] for n, x in layers.items()},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.to_zarr(
            path, mode="w", zarr_format=3, encoding={n: {"chunks": (100, x.shape[1])} for n, x in layers.items()}
        )


def _shot(browser: str, url: str, target: Path) -> None:
    subprocess.run(
        [browser, *FLAGS, f"--screenshot={target}", url],
        check=True,
        capture_output=True,
        timeout=120,
    )
    print(f"wrote {target}")


def main() -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("no chromium: apt-get install chromium")
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        source, dest = Path(work) / "acts.zarr", Path(work) / "masks.zarr"
        _dataset(source)
        port = _free_port()
        args = [str(source), str(dest), "--stats", "--chunks", "100,128", "--scheduler", "local", "--workers", "1"]
        args += ["--threads-per-worker", "1", "--dashboard-address", f"127.0.0.1:{port}", "--follow", "1"]
        run = subprocess.Popen([sys.executable, "-m", "relu_dask", "run", *args], stdout=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}/relu-dask"
        taken_part_way = False
        try:
            end = time.monotonic() + 300
            while time.monotonic() < end:
                try:
                    with urllib.request.urlopen(f"{url}/data.json", timeout=5) as response:
                        data = json.load(response)
                except OSError:
                    time.sleep(0.1)
                    continue
                arrays = data.get("arrays") or []
                done, total = sum(a["tasks_done"] for a in arrays), sum(a["num_tasks"] for a in arrays)
                if not taken_part_way and total and 0.3 * total < done < 0.7 * total:
                    _shot(browser, url, OUT / "livepage-running.png")
                    taken_part_way = True
                if total and done == total and data.get("follow"):
                    _shot(browser, url, OUT / "livepage-done.png")
                    return
                time.sleep(0.1)
            raise SystemExit("the run did not finish within 300 s")
        finally:
            run.terminate()
            run.wait(timeout=60)


if __name__ == "__main__":
    main()
