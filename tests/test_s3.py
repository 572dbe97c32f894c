"""SOURCE and DEST in an S3-compatible object store: a real moto server on 127.0.0.1, s3fs, the CLI."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr
from _support import activations, cli, oracle

pytest.importorskip("s3fs")
pytest.importorskip("moto")

BUCKET = "activations"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    """A moto S3 server on 127.0.0.1 with an empty bucket; the storage options to reach it."""
    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        import s3fs

        s3fs.S3FileSystem(**options).mkdir(BUCKET)
        yield options
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_s3_round_trip_through_the_cli(s3: dict[str, str], tmp_path: Path) -> None:
    x = activations((70, 45), "float32", seed=8)
    group = zarr.open_group(store=f"s3://{BUCKET}/run1/acts.zarr", mode="w", storage_options=s3)
    group.create_array("layer1", shape=x.shape, chunks=(16, 16), dtype="float32")[...] = x
    options = json.dumps(s3)
    dest = f"s3://{BUCKET}/run1/masks.zarr"
    proc = cli(
        "run",
        f"s3://{BUCKET}/run1/acts.zarr",
        dest,
        "--storage-options",
        options,
        "--stats",
        "--report",
        str(tmp_path / "r.json"),
    )
    assert proc.returncode == 0, proc.stderr
    masks = zarr.open_group(store=dest, mode="r", storage_options=s3)
    assert masks["layer1"].dtype == np.int8
    assert np.array_equal(masks["layer1"][...], oracle(x))
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["bytes_written"] > 0
    assert report["arrays"][0]["stats"]["unit_ones"] == oracle(x).sum(axis=0).tolist()
    again = cli("run", f"s3://{BUCKET}/run1/acts.zarr", dest, "--storage-options", options)
    assert again.returncode == 0 and "already complete" in again.stdout
    status = cli("status", dest, "--storage-options", options, "--json")
    assert json.loads(status.stdout)["state"] == "complete"


def test_local_source_to_s3_dest_and_refusals(s3: dict[str, str], tmp_path: Path) -> None:
    x = activations((40, 30), "float64", seed=9)
    zarr.create_array(store=str(tmp_path / "acts.zarr"), shape=x.shape, chunks=(8, 30), dtype="float64")[...] = x
    options = json.dumps(s3)
    dest = f"s3://{BUCKET}/run2/masks.zarr"
    assert cli("run", str(tmp_path / "acts.zarr"), dest, "--storage-options", options).returncode == 0
    assert np.array_equal(zarr.open_array(store=dest, mode="r", storage_options=s3)[...], oracle(x))
    changed = cli("run", str(tmp_path / "acts.zarr"), dest, "--storage-options", options, "--at-zero", "0")
    assert changed.returncode == 2 and "holds another job" in changed.stderr
    missing = cli("run", f"s3://{BUCKET}/nothing.zarr", f"s3://{BUCKET}/o.zarr", "--storage-options", options)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_a_missing_bucket_and_an_unreachable_endpoint_are_one_line_each(s3: dict[str, str], tmp_path: Path) -> None:
    options = json.dumps(s3)
    bucket = cli("run", "s3://no-such-bucket/acts.zarr", f"s3://{BUCKET}/o.zarr", "--storage-options", options)
    assert bucket.returncode == 2
    assert bucket.stderr.splitlines() == [
        "relu-dask: error: SOURCE s3://no-such-bucket/acts.zarr does not exist (or its storage cannot be reached)"
    ]
    # nothing listens on port 1; botocore's retries kept to one attempt so the test stays short
    unreachable = {**s3, "endpoint_url": "http://127.0.0.1:1", "config_kwargs": {"retries": {"max_attempts": 1}}}
    proc = cli(
        "run", f"s3://{BUCKET}/acts.zarr", str(tmp_path / "o.zarr"), "--storage-options", json.dumps(unreachable)
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("relu-dask: error:")]
    assert line.startswith(f"relu-dask: error: cannot reach s3://{BUCKET}/acts.zarr: ") and "127.0.0.1:1" in line
