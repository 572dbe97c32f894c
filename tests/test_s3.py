"""SOURCE and DEST in an S3-compatible object store: a real moto server on 127.0.0.1, s3fs, the CLI."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from _support import activations, chunk_files, cli, cli_env, dest_files, free_port, kill_at_step, oracle, start_cli

pytest.importorskip("s3fs")
pytest.importorskip("moto")

BUCKET = "activations"


#: moto's S3 application served by werkzeug's threaded server, no log line per request (as
#: scripts/bench_remote.py serves it): moto's own ``moto_server`` routes every request through
#: its dispatcher of all AWS services and logs it, about a third of its CPU on this suite's runs.
_SERVE_S3 = """
import logging, sys
from moto.moto_server.werkzeug_app import MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server
logging.getLogger("werkzeug").setLevel(logging.ERROR)
app = create_backend_app("s3")
make_server("127.0.0.1", int(sys.argv[1]), app, threaded=True, request_handler=MotoRequestHandler).serve_forever()
"""


def _moto_server(**env: str) -> tuple[subprocess.Popen[bytes], str]:
    """moto's S3 server on a free port of 127.0.0.1 (``env`` added to its environment), once it
    answers; its endpoint. Any HTTP answer counts: one that checks credentials says 403."""
    import os

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVE_S3, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **env},
    )
    endpoint = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            time.sleep(0.05)
    return server, endpoint


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    """A moto S3 server on 127.0.0.1 with an empty bucket; the storage options to reach it."""
    server, endpoint = _moto_server()
    try:
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
        "--chunks",
        "32,16",
    )
    assert proc.returncode == 0, proc.stderr
    # its 9 tasks' done markers (deleted by name: a fresh run wrote them all) and its lock are gone
    assert sorted(_objects(s3, "run1/masks.zarr/.relu-dask")) == ["job.json"]
    masks = zarr.open_group(store=dest, mode="r", storage_options=s3)
    assert masks["layer1"].dtype == np.int8
    assert np.array_equal(masks["layer1"][...], oracle(x))
    report = json.loads((tmp_path / "r.json").read_text())
    stored = _objects(s3, "run1/masks.zarr/layer1")
    assert report["bytes_written"] == sum(map(len, stored.values())) > 0 and len(stored) > 5
    assert report["arrays"][0]["stats"]["unit_ones"] == oracle(x).sum(axis=0).tolist()
    again = cli("run", f"s3://{BUCKET}/run1/acts.zarr", dest, "--storage-options", options, "--chunks", "32,16")
    assert again.returncode == 0 and "already complete" in again.stdout
    status = cli("status", dest, "--storage-options", options, "--json")
    assert json.loads(status.stdout)["state"] == "complete"


def test_a_listing_cut_into_ranges_lists_every_object_once(s3: dict[str, str]) -> None:
    """Ranges listed at once (from just after one cut up to the next) give what one listing
    gives, in its order, whatever the cuts: keys or not, under the prefix or not, repeated."""
    pytest.importorskip("obstore")
    from relu_dask import objectstores
    from relu_dask.chunkfiles import listing_cuts

    found = objectstores.bucket_of(f"s3://{BUCKET}/cuts", s3)
    assert isinstance(found, tuple)
    bucket, _ = found
    keys = [f"cuts/a/c/{i}/{j}" for i in range(12) for j in range(3)] + ["cuts/a/c/3", "cuts/a/zarr.json", "cuts/b"]
    objectstores.put_many(bucket, [(key, key.encode() * 2) for key in keys])
    whole = objectstores.list_prefix(bucket, "cuts/a/")
    assert [k for k, _ in whole] == sorted(k for k in keys if k.startswith("cuts/a/"))
    assert all(size == 2 * len(key) for key, size in whole)
    chunk_cuts = ["cuts/a/" + cut for cut in listing_cuts((12, 3), (1, 1), per_range=6)]
    assert len(chunk_cuts) > 3
    for cuts in (
        chunk_cuts,
        ["cuts/a/c/3", "cuts/a/c/3/", "cuts/a/c/3"],  # a key, a key's prefix, repeated
        ["cuts/", "cuts/a/c/11/2", "cuts/a/zzz", "dogs/"],  # before, at and after the prefix's keys
        ["cuts/a/zarr.json", "cuts/a/c/1"],  # not in order
    ):
        assert objectstores.list_prefix(bucket, "cuts/a/", cuts=cuts) == whole, cuts
    assert objectstores.list_prefix(bucket, "cuts/a/", limit=2, cuts=chunk_cuts) == whole[:2]
    assert objectstores.list_prefix(bucket, "cuts/none/", cuts=chunk_cuts) == []


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


def test_an_s3_dest_is_replaced_copied_and_deleted_with_its_record(s3: dict[str, str], tmp_path: Path) -> None:
    import s3fs

    x = activations((48, 20), "float32", seed=10)
    x[:8] = 0.0  # --at-zero decides these
    zarr.create_array(store=str(tmp_path / "acts.zarr"), shape=x.shape, chunks=(8, 20), dtype="float32")[...] = x
    options = json.dumps(s3)
    dest, copy = f"s3://{BUCKET}/record/masks.zarr", f"s3://{BUCKET}/record/copy.zarr"
    assert (
        cli("run", str(tmp_path / "acts.zarr"), dest, "--storage-options", options, "--chunks", "8,20").returncode == 0
    )
    fs = s3fs.S3FileSystem(**s3, skip_instance_cache=True)
    assert fs.exists(f"{BUCKET}/record/masks.zarr/.relu-dask/job.json")
    proc = cli("run", str(tmp_path / "acts.zarr"), dest, "--storage-options", options, "--at-zero", "0", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(zarr.open_array(store=dest, mode="r", storage_options=s3)[...], oracle(x, at_zero=0))
    assert json.loads(cli("status", dest, "--storage-options", options, "--json").stdout)["state"] == "complete"
    fs.copy(f"{BUCKET}/record/masks.zarr", f"{BUCKET}/record/copy.zarr", recursive=True)
    verified = cli("verify", copy, "--storage-options", options)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    fs.rm(f"{BUCKET}/record/masks.zarr", recursive=True)
    fs.invalidate_cache()
    assert fs.ls(f"{BUCKET}/record") == [f"{BUCKET}/record/copy.zarr"]  # nothing left of DEST beside it
    assert json.loads(cli("status", dest, "--storage-options", options, "--json").stdout)["state"] == "absent"


def test_a_missing_bucket_and_an_unreachable_endpoint_are_one_line_each(s3: dict[str, str], tmp_path: Path) -> None:
    options = json.dumps(s3)
    bucket = cli("run", "s3://no-such-bucket/acts.zarr", f"s3://{BUCKET}/o.zarr", "--storage-options", options)
    assert bucket.returncode == 2
    assert bucket.stderr.splitlines() == [
        "relu-dask: error: SOURCE s3://no-such-bucket/acts.zarr does not exist (or its storage cannot be reached)"
    ]
    zarr.create_array(store=str(tmp_path / "acts.zarr"), shape=(4, 4), dtype="float32")[...] = 1.0
    into = cli("run", str(tmp_path / "acts.zarr"), "s3://no-such-bucket/o.zarr", "--storage-options", options)
    assert into.returncode == 2 and "Traceback" not in into.stderr
    (said,) = [x for x in into.stderr.splitlines() if x.startswith("relu-dask: error:")]
    assert "no-such-bucket" in said and "space" not in said  # a bucket, not a disk
    # nothing listens on port 1; botocore's retries kept to one attempt so the test stays short
    unreachable = {**s3, "endpoint_url": "http://127.0.0.1:1", "config_kwargs": {"retries": {"max_attempts": 1}}}
    proc = cli(
        "run", f"s3://{BUCKET}/acts.zarr", str(tmp_path / "o.zarr"), "--storage-options", json.dumps(unreachable)
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("relu-dask: error:")]
    assert line.startswith(f"relu-dask: error: cannot reach s3://{BUCKET}/acts.zarr: ") and "127.0.0.1:1" in line


# --------------------------------------------------------------------------- the direct path


def _provenance_free(document: bytes) -> object:
    """A metadata document without the provenance that differs between two runs (when, and from where)."""
    text = re.sub(rb'"relu_dask_(created_utc|source)": "[^"]*"', rb'"relu_dask_\1": ""', document)
    return json.loads(text)


def _objects(s3: dict[str, str], prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix`` (keys relative to it), byte for byte."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3, skip_instance_cache=True)
    root = f"{BUCKET}/{prefix}"
    keys = fs.find(root)
    found = fs.cat(keys) if keys else {}  # all at once (s3fs gathers the requests)
    return {key[len(root) + 1 :]: found[key] for key in keys}


def _group_with_layouts(store: object, storage_options: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """Three layouts the direct path takes: a v3 group of zstd (zarr's default) and raw bytes
    with an all-negative chunk (its mask all fill, so not stored), and beside it (``-v2``) a v2
    group of blosc; uneven edges."""
    import numcodecs

    group = zarr.open_group(store=store, mode="w", storage_options=storage_options)
    x, y = activations((70, 45), "float32", seed=31), activations((33, 20), "float64", seed=32)
    y[:16, :16] = -1.0
    group.create_array("zstd", shape=x.shape, chunks=(16, 16), dtype="float32")[...] = x
    group.create_array("raw", shape=y.shape, chunks=(16, 16), dtype="float64", compressors=None)[...] = y
    v2 = zarr.open_group(store=f"{store}-v2", mode="w", zarr_format=2, storage_options=storage_options)
    v2.create_array("blosc", shape=x.shape, chunks=(32, 8), dtype="float32", compressors=numcodecs.Blosc())[...] = x
    return {"zstd": x, "raw": y, "blosc": x}


def test_the_direct_path_writes_on_s3_the_bytes_a_local_run_writes(s3: dict[str, str], tmp_path: Path) -> None:
    pytest.importorskip("obstore")
    local = _group_with_layouts(str(tmp_path / "acts.zarr"))
    _group_with_layouts(f"s3://{BUCKET}/layouts/acts.zarr", s3)
    options = ["--storage-options", json.dumps(s3)]
    for suffix in ("", "-v2"):
        assert cli("run", str(tmp_path / f"acts.zarr{suffix}"), str(tmp_path / f"masks{suffix}")).returncode == 0
        source, dest = f"s3://{BUCKET}/layouts/acts.zarr{suffix}", f"s3://{BUCKET}/layouts/masks{suffix}"
        proc = cli("run", source, dest, *options, "--report", str(tmp_path / "r.json"))
        assert proc.returncode == 0, proc.stderr
        for entry in json.loads((tmp_path / "r.json").read_text())["arrays"]:
            assert (entry["read_path"], entry["write_path"]) == ("direct", "direct"), entry
        masks = zarr.open_group(store=dest, mode="r", storage_options=s3)
        for name in masks.array_keys():
            assert np.array_equal(masks[name][...], oracle(local[name])), name
        metadata = ("zarr.json", ".zarray", ".zattrs", ".zgroup")
        stored = _objects(s3, f"layouts/masks{suffix}")
        chunks = {k: v for k, v in stored.items() if not k.endswith(metadata)}
        chunks = {k: v for k, v in chunks.items() if not k.startswith(".relu-dask/")}  # the journals differ
        assert chunks == chunk_files(tmp_path / f"masks{suffix}") and len(chunks) > 10
        # every metadata document as the local run's (made there by zarr node by node, here
        # staged and uploaded, and consolidated from the known nodes): but for where SOURCE was
        documents = {k: v for k, v in stored.items() if k.endswith("zarr.json")}
        made_here = dest_files(tmp_path / f"masks{suffix}")
        assert sorted(documents) == sorted(k for k in made_here if k.endswith("zarr.json")) and len(documents) >= 2
        for name, document in documents.items():
            assert _provenance_free(document) == _provenance_free(made_here[name]), name
        assert "consolidated_metadata" in json.loads(documents["zarr.json"])
        verified = cli("verify", dest, *options, "--source")
        assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "raw/c/0/0" not in _objects(s3, "layouts/masks") and "raw/c/0/1" in _objects(s3, "layouts/masks")
    # a mask object replaced by another that decodes but holds other masks: verify finds it
    import s3fs

    fs = s3fs.S3FileSystem(**s3, skip_instance_cache=True)
    fs.pipe_file(f"{BUCKET}/layouts/masks/zstd/c/1/1", fs.cat_file(f"{BUCKET}/layouts/masks/zstd/c/1/2"))
    damaged = cli("verify", f"s3://{BUCKET}/layouts/masks", *options)
    assert damaged.returncode == 1 and "zstd: block" in damaged.stdout + damaged.stderr
    assert cli("run", f"s3://{BUCKET}/layouts/acts.zarr", f"s3://{BUCKET}/layouts/masks", *options).returncode == 0
    assert np.array_equal(
        zarr.open_array(store=f"s3://{BUCKET}/layouts/masks/zstd", mode="r", storage_options=s3)[...],
        oracle(local["zstd"]),
    )


def test_options_obstore_cannot_take_keep_to_s3fs_and_say_so(s3: dict[str, str], tmp_path: Path) -> None:
    x = activations((40, 30), "float32", seed=33)
    zarr.create_array(
        store=f"s3://{BUCKET}/fallback/acts.zarr", shape=x.shape, chunks=(8, 30), dtype="float32", storage_options=s3
    )[...] = x
    options = json.dumps({**s3, "use_listings_cache": False})  # an s3fs option obstore has no word for
    dest = f"s3://{BUCKET}/fallback/masks.zarr"
    proc = cli("run", f"s3://{BUCKET}/fallback/acts.zarr", dest, "--storage-options", options)
    assert proc.returncode == 0, proc.stderr
    said = "read through zarr, not directly: not on the local file system (storage option(s) use_listings_cache"
    assert said in proc.stdout
    assert np.array_equal(zarr.open_array(store=dest, mode="r", storage_options=s3)[...], oracle(x))


def test_of_runs_racing_for_the_lock_on_s3_one_wins(s3: dict[str, str]) -> None:
    """Taking the lock is a conditional write (If-None-Match: *): of 8 threads, one creates it."""
    pytest.importorskip("obstore")
    from concurrent.futures import ThreadPoolExecutor

    from relu_dask.locations import parse_location

    for attempt in range(3):
        lock = parse_location(f"s3://{BUCKET}/race/{attempt}/lock", s3)
        assert lock.object_store is not None
        with ThreadPoolExecutor(8) as pool:
            won = list(pool.map(lambda i, lock=lock: lock.create(f"run {i}"), range(8)))
        assert won.count(True) == 1
        assert lock.read_text() == f"run {won.index(True)}"


# --------------------------------------------------------------------------- kills, growth, schedulers on S3


def _s3_source(s3: dict[str, str], prefix: str, x: np.ndarray, chunks: tuple[int, ...]) -> Any:
    """``x`` as a zarr v3 array at ``s3://BUCKET/prefix``; the zarr array (to grow it)."""
    array = zarr.create_array(
        store=f"s3://{BUCKET}/{prefix}", shape=x.shape, chunks=chunks, dtype=x.dtype, storage_options=s3
    )
    array[...] = x
    return array


def _markers(fs: Any, folder: str) -> int:
    """How many tasks are marked done under ``folder``: markers of their own, and lines of batches."""
    from relu_dask.markerbatches import lines_in

    fs.invalidate_cache()
    return sum(lines_in(key.rsplit("/", 1)[-1]) or 1 for key in fs.find(folder)) if fs.exists(folder) else 0


def _s3_mask(s3: dict[str, str], dest: str) -> np.ndarray:
    """The int8 masks at ``dest``, read and decoded by zarr over obstore (over s3fs it takes
    twice as long)."""
    from relu_dask import objectstores

    found = objectstores.bucket_of(dest, s3)
    assert isinstance(found, tuple), found
    array = zarr.open_array(store=objectstores.zarr_store(*found), mode="r")
    assert array.dtype == np.int8
    return np.asarray(array[...])


def test_a_run_on_s3_killed_after_creating_its_outputs_resumes_exactly(s3: dict[str, str], tmp_path: Path) -> None:
    pytest.importorskip("obstore")
    x = activations((64, 48), "float32", seed=41)
    _s3_source(s3, "killed/acts.zarr", x, (16, 16))
    source, dest = f"s3://{BUCKET}/killed/acts.zarr", f"s3://{BUCKET}/killed/masks.zarr"
    args = ("run", source, dest, "--storage-options", json.dumps(s3), "--chunks", "16,16", "--progress", "none")
    kill_at_step("outputs-created", *args)
    assert json.loads(cli("status", dest, "--storage-options", json.dumps(s3), "--json").stdout)["state"] != "complete"
    again = cli(*args, "--report", str(tmp_path / "r.json"))
    assert again.returncode == 0, again.stderr
    assert np.array_equal(_s3_mask(s3, dest), oracle(x))
    entry = json.loads((tmp_path / "r.json").read_text())["arrays"][0]
    assert (entry["read_path"], entry["write_path"]) == ("direct", "direct"), entry
    assert entry["tasks_done_now"] == entry["num_tasks"] == 12


@pytest.mark.parametrize(
    "layout", [(), ("--chunks", "32,48", "--dest-chunks", "16,16", "--dest-shards", "32,48")], ids=["chunks", "shards"]
)
def test_an_s3_run_reads_while_dest_is_prepared_and_writes_nothing_before_it_is(
    s3: dict[str, str], layout: tuple[str, ...]
) -> None:
    """On S3 the tasks read while DEST's record and documents are written (in the background:
    writebehind.before_writes); their writes wait (the pool's, and zarr's where it writes the
    masks). Stopped once its record is written (after an --overwrite removed the old DEST) or
    once its documents are, a run has written no chunk; the same command then finishes it exactly."""
    pytest.importorskip("obstore")
    x = activations((64, 48), "float32", seed=43)
    where = f"prepared/{len(layout)}"
    _s3_source(s3, f"{where}/acts.zarr", x, (16, 16))
    source, dest = f"s3://{BUCKET}/{where}/acts.zarr", f"s3://{BUCKET}/{where}/masks.zarr"
    args = ("run", source, dest, "--storage-options", json.dumps(s3), "--chunks", "16,16", "--progress", "none")
    args += layout
    assert cli(*args).returncode == 0
    assert any(k.startswith("c/") for k in _objects(s3, f"{where}/masks.zarr"))
    kill_at_step("job-recorded", *args, "--overwrite")
    left = sorted(k for k in _objects(s3, f"{where}/masks.zarr") if not k.startswith(".relu-dask/lock"))
    assert left == [".relu-dask/job.json"], left
    kill_at_step("outputs-created", *args)
    left = sorted(k for k in _objects(s3, f"{where}/masks.zarr") if not k.startswith(".relu-dask/"))
    assert left == ["zarr.json"], left
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert np.array_equal(_s3_mask(s3, dest), oracle(x))
    # SOURCE's fingerprint, looked at in the background meanwhile, is in the record whole
    (array,) = json.loads(_objects(s3, f"{where}/masks.zarr")[".relu-dask/job.json"])["fingerprint"]["arrays"]
    assert array["chunk_samples"] and all(size for _, size, _ in array["chunk_samples"]), array
    assert cli(*args).stdout.count("already complete") == 1


@pytest.mark.parametrize("lost", ["b/zarr.json", "zarr.json"], ids=["an-array", "the-group"])
def test_a_complete_s3_record_beside_a_dest_lacking_a_node_is_not_believed(s3: dict[str, str], lost: str) -> None:
    """On S3 DEST's nodes are looked for by their own documents, read at once: a complete
    record is believed beside all of them (rerun: nothing to do), not beside a DEST that lost
    one (the masks are computed again, exactly)."""
    import s3fs

    x, y = activations((32, 16), "float32", seed=44), activations((16, 24), "float32", seed=45)
    where = f"nodes/{lost.count('/')}"
    group = zarr.open_group(store=f"s3://{BUCKET}/{where}/acts.zarr", mode="w", storage_options=s3)
    for name, values in (("a", x), ("b", y)):
        group.create_array(name, shape=values.shape, chunks=(8, 8), dtype=values.dtype)[...] = values
    source, dest = f"s3://{BUCKET}/{where}/acts.zarr", f"s3://{BUCKET}/{where}/masks.zarr"
    args = ("run", source, dest, "--storage-options", json.dumps(s3), "--progress", "none")
    assert cli(*args).returncode == 0
    again = cli(*args)
    assert again.returncode == 0 and "already complete" in again.stdout, again.stdout + again.stderr
    s3fs.S3FileSystem(**s3, skip_instance_cache=True).rm(f"{BUCKET}/{where}/masks.zarr/{lost}")
    redone = cli(*args)
    assert redone.returncode == 0 and "computing them again" in redone.stderr, redone.stderr
    masks = zarr.open_group(store=dest, mode="r", storage_options=s3)
    assert np.array_equal(masks["a"][...], oracle(x)) and np.array_equal(masks["b"][...], oracle(y))
    assert "already complete" in cli(*args).stdout


def test_writes_left_to_the_pool_wait_for_dest_being_prepared_and_fail_with_it(s3: dict[str, str]) -> None:
    """A run's writes start once the future given to before_writes is done; if it failed, they fail
    with its error, a write asked for later raises it, and finish_writes says it once."""
    from relu_dask import objectstores, writebehind

    found = objectstores.bucket_of(f"s3://{BUCKET}/gated", s3)
    assert isinstance(found, tuple)
    bucket, key = found
    release: Future[None] = Future()
    writebehind.before_writes("p", release)
    waiting = writebehind.write_later(bucket, [(f"{key}/c/0", b"chunk")], run="p")
    time.sleep(0.5)
    assert not waiting.done() and _objects(s3, "gated") == {}
    release.set_result(None)
    assert writebehind.finish_writes("p") == []
    assert _objects(s3, "gated") == {"c/0": b"chunk"}

    failed: Future[None] = Future()
    failed.set_exception(PermissionError("DEST could not be prepared"))
    writebehind.before_writes("q", failed)
    with pytest.raises(PermissionError):
        writebehind.wait_before_writes("q")
    with pytest.raises(PermissionError):
        writebehind.write_later(bucket, [(f"{key}/c/1", b"chunk")], run="q")
    assert [str(e) for e in writebehind.finish_writes("q")] == ["DEST could not be prepared"]
    with pytest.raises(PermissionError):  # a task let go after a stop writes nothing either
        writebehind.write_later(bucket, [(f"{key}/c/2", b"chunk")], run="q")
    # a preparation that fails while writes wait for it: they fail with it, unwritten
    pending: Future[None] = Future()
    writebehind.before_writes("r", pending)
    waiting = writebehind.write_later(bucket, [(f"{key}/c/3", b"chunk")], run="r")
    pending.set_exception(OSError("the record could not be written"))
    assert str(waiting.exception(timeout=10)) == "the record could not be written"
    assert [str(e) for e in writebehind.finish_writes("r")] == ["the record could not be written"]
    assert _objects(s3, "gated") == {"c/0": b"chunk"}


def test_a_stop_while_the_writes_are_waited_for_leaves_them_to_the_next_wait(s3: dict[str, str]) -> None:
    """SIGTERM landing while a run waits for its writes (its tasks all done): the writes not
    yet waited for are the stop's to wait for before it counts what is done. They were
    forgotten, and the stop said fewer tasks done than the markers written after it."""
    from relu_dask import objectstores, writebehind
    from relu_dask.errors import StopRequested

    found = objectstores.bucket_of(f"s3://{BUCKET}/waited", s3)
    assert isinstance(found, tuple)
    bucket, key = found
    release: Future[None] = Future()
    writebehind.before_writes("s", release)
    waiting = [writebehind.write_later(bucket, [(f"{key}/c/{i}", b"chunk")], run="s") for i in range(3)]

    def stop(signum: int, frame: object) -> None:
        raise StopRequested(signum)

    previous = signal.signal(signal.SIGUSR1, stop)
    try:
        threading.Timer(0.3, signal.pthread_kill, (threading.main_thread().ident, signal.SIGUSR1)).start()
        with pytest.raises(StopRequested):
            writebehind.finish_writes("s", drop_waiting=True)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert not any(w.done() for w in waiting)
    threading.Timer(0.3, release.set_result, (None,)).start()
    assert writebehind.finish_writes("s") == []  # waits for all three, as a stop does
    assert all(w.done() for w in waiting)
    assert _objects(s3, "waited") == {f"c/{i}": b"chunk" for i in range(3)}


def test_a_run_on_s3_killed_mid_way_resumes_from_its_done_markers(s3: dict[str, str], tmp_path: Path) -> None:
    """A real SIGKILL once some tasks have written their done markers; the rerun skips those."""
    pytest.importorskip("obstore")
    import psutil
    import s3fs

    x = activations((256, 256), "float32", seed=42)
    options = json.dumps(s3)
    fs = s3fs.S3FileSystem(**s3, skip_instance_cache=True)
    for attempt in range(3):
        prefix = f"midway/{attempt}"
        _s3_source(s3, f"{prefix}/acts.zarr", x, (16, 16))
        source, dest = f"s3://{BUCKET}/{prefix}/acts.zarr", f"s3://{BUCKET}/{prefix}/masks.zarr"
        args = ("run", source, dest, "--storage-options", options, "--chunks", "16,16", "--progress", "none")
        done = f"{BUCKET}/{prefix}/masks.zarr/.relu-dask/done"
        proc = start_cli(*args, "--scheduler", "synchronous")
        end = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < end:
            if _markers(fs, done) >= 5:
                break
            time.sleep(0.02)
        if proc.poll() is not None:
            continue  # finished before it could be killed: again, with a fresh DEST
        psutil.Process(proc.pid).send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        marked = _markers(fs, done)
        assert 5 <= marked < 256
        status = json.loads(cli("status", dest, "--storage-options", options, "--json").stdout)
        assert status["state"] != "complete", status
        again = cli(*args, "--report", str(tmp_path / "r.json"))
        assert again.returncode == 0, again.stderr
        assert np.array_equal(_s3_mask(s3, dest), oracle(x))
        report = json.loads((tmp_path / "r.json").read_text())
        assert report["tasks_skipped"] >= marked and report["tasks_skipped"] > 0
        assert report["tasks_skipped"] + report["tasks_done_now"] == report["num_tasks"] == 256
        assert report["arrays"][0]["tasks_already_done"] == report["tasks_skipped"]
        assert "resumed:" in again.stdout
        return
    pytest.fail("the run finished before it could be killed, 3 times")


def test_growth_on_s3_is_incremental_and_exact(s3: dict[str, str], tmp_path: Path) -> None:
    pytest.importorskip("obstore")
    full = activations((150, 32), "float32", seed=43)
    array = _s3_source(s3, "growth/acts.zarr", full[:100], (16, 16))
    source, dest = f"s3://{BUCKET}/growth/acts.zarr", f"s3://{BUCKET}/growth/masks.zarr"
    args = ("run", source, dest, "--storage-options", json.dumps(s3), "--chunks", "32,32")
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    assert np.array_equal(_s3_mask(s3, dest), oracle(full[:100]))
    array.resize((150, 32))
    array[100:150] = full[100:150]
    grown = cli(*args, "--report", str(tmp_path / "r.json"))
    assert grown.returncode == 0, grown.stderr
    assert "(grown from 100x32; 3 block(s) kept)" in grown.stdout, grown.stdout
    entry = json.loads((tmp_path / "r.json").read_text())["arrays"][0]
    assert entry["grown_from"] == [100, 32] and entry["blocks_kept"] == 3 and entry["tasks_done_now"] == 2
    assert (entry["read_path"], entry["write_path"]) == ("direct", "direct"), entry
    assert entry["bytes_read"] <= (150 - 96) * 32 * 4  # the new rows and the old edge block, no more
    assert np.array_equal(_s3_mask(s3, dest), oracle(full))
    again = cli(*args)
    assert again.returncode == 0 and "already complete" in again.stdout


def test_a_local_cluster_reads_and_writes_s3_directly(s3: dict[str, str], tmp_path: Path) -> None:
    pytest.importorskip("obstore")
    pytest.importorskip("distributed")
    x = activations((64, 40), "float32", seed=44)
    _s3_source(s3, "cluster/acts.zarr", x, (16, 16))
    dest = f"s3://{BUCKET}/cluster/masks.zarr"
    proc = cli(
        "run",
        f"s3://{BUCKET}/cluster/acts.zarr",
        dest,
        "--storage-options",
        json.dumps(s3),
        "--scheduler",
        "local",
        "--workers",
        "1",
        "--threads-per-worker",
        "2",
        "--dashboard-address",
        "127.0.0.1:0",
        "--progress",
        "none",
        "--report",
        str(tmp_path / "r.json"),
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["scheduler"] == "local"
    (entry,) = report["arrays"]
    assert (entry["read_path"], entry["write_path"]) == ("direct", "direct"), entry
    assert np.array_equal(_s3_mask(s3, dest), oracle(x))


def test_status_of_a_complete_s3_dest_and_plan_writes_nothing(s3: dict[str, str]) -> None:
    x = activations((40, 24), "float32", seed=45)
    _s3_source(s3, "plan/acts.zarr", x, (8, 8))
    options = json.dumps(s3)
    source = f"s3://{BUCKET}/plan/acts.zarr"
    before = _objects(s3, "plan")
    planned = cli("plan", source, f"s3://{BUCKET}/plan/masks.zarr", "--storage-options", options)
    assert planned.returncode == 0, planned.stderr
    assert _objects(s3, "plan") == before  # no DEST, no journal beside it, no lock
    assert not any(key.startswith(("masks.zarr", ".masks.zarr")) for key in _objects(s3, "plan"))
    absent = json.loads(cli("status", f"s3://{BUCKET}/plan/masks.zarr", "--storage-options", options, "--json").stdout)
    assert absent["state"] == "absent", absent
    dest = f"s3://{BUCKET}/plan/done.zarr"
    assert cli("run", source, dest, "--storage-options", options).returncode == 0
    status = cli("status", dest, "--storage-options", options, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["state"] == "complete"
    # and plan over a complete DEST writes nothing either
    before = _objects(s3, "plan")
    assert cli("plan", source, dest, "--storage-options", options).returncode == 0
    assert _objects(s3, "plan") == before


def test_verify_on_s3_finds_swapped_chunks_and_the_same_run_repairs_exactly_them(
    s3: dict[str, str], tmp_path: Path
) -> None:
    """Two mask chunks swapped in the bucket (each decodes; their masks are another block's):
    verify says which, by URL, exit 1; status says damaged; the same run recomputes those two
    blocks and nothing else; then verify, and verify against SOURCE, pass."""
    import s3fs

    x = activations((32, 24), "float32", seed=46)
    _s3_source(s3, "verify/acts.zarr", x, (8, 8))
    options = json.dumps(s3)
    source, dest = f"s3://{BUCKET}/verify/acts.zarr", f"s3://{BUCKET}/verify/masks.zarr"
    args = ("run", source, dest, "--storage-options", options, "--chunks", "8,8")
    assert cli(*args).returncode == 0
    fs = s3fs.S3FileSystem(**s3, skip_instance_cache=True)
    first, second = f"{BUCKET}/verify/masks.zarr/c/0/0", f"{BUCKET}/verify/masks.zarr/c/2/1"
    a, b = fs.cat_file(first), fs.cat_file(second)
    assert a != b
    fs.pipe_file(first, b)
    fs.pipe_file(second, a)
    assert not np.array_equal(zarr.open_array(store=dest, mode="r", storage_options=s3)[...], oracle(x))

    proc = cli("verify", dest, "--storage-options", options)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    problems = [line for line in proc.stderr.splitlines() if line.startswith("relu-dask: verify:")]
    assert len(problems) == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert any("block (0, 0)" in p and f"{dest}/c/0/0" in p for p in problems), problems
    assert any("block (2, 1)" in p and f"{dest}/c/2/1" in p for p in problems), problems
    status = json.loads(cli("status", dest, "--storage-options", options, "--json").stdout)
    assert status["damaged_blocks"] == 2, status

    report = tmp_path / "repair.json"
    again = cli(*args, "--report", str(report))
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("repaired: ")
    assert json.loads(report.read_text())["tasks_done_now"] == 2  # those blocks, nothing else
    assert np.array_equal(zarr.open_array(store=dest, mode="r", storage_options=s3)[...], oracle(x))
    assert cli("verify", dest, "--storage-options", options).returncode == 0
    against = cli("verify", dest, "--storage-options", options, "--source")
    assert against.returncode == 0 and "12 block(s) equal SOURCE's masks" in against.stdout, against.stdout
    assert "verified" in cli("status", dest, "--storage-options", options).stdout


def test_wrong_credentials_end_in_one_line_naming_the_url(tmp_path: Path) -> None:
    """A moto server that checks credentials (``INITIAL_NO_AUTH_ACTION_COUNT=0``: every request
    is authenticated against its IAM, where no key exists): 403, one line, exit 2, soon."""
    server, endpoint = _moto_server(INITIAL_NO_AUTH_ACTION_COUNT="0")
    try:
        wrong = json.dumps({"endpoint_url": endpoint, "key": "wrong", "secret": "wrong"})
        start = time.monotonic()
        proc = cli("run", f"s3://{BUCKET}/acts.zarr", str(tmp_path / "o.zarr"), "--storage-options", wrong)
        assert time.monotonic() - start < 60  # a bound, not a timing: botocore and obstore retry for seconds
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"relu-dask: error: cannot reach s3://{BUCKET}/acts.zarr: ") and "403" in line
    assert not (tmp_path / "o.zarr").exists()


def test_sigterm_on_s3_counts_exactly_the_markers_the_pool_wrote(s3: dict[str, str], tmp_path: Path) -> None:
    """The threads scheduler's tasks leave their done markers to the store's pool: a stop waits
    for those before it says how many tasks are done, and nothing is written after it."""
    import s3fs

    x = activations((512 * 32, 256), "float32", seed=14)  # 512 chunks: long enough to stop
    prefix = "stop"
    _s3_source(s3, f"{prefix}/acts.zarr", x, (32, 256))
    source, dest = f"s3://{BUCKET}/{prefix}/acts.zarr", f"s3://{BUCKET}/{prefix}/masks.zarr"
    args = ("run", source, dest, "--storage-options", json.dumps(s3), "--chunks", "32,256", "--scheduler", "threads")
    proc = subprocess.Popen(
        [sys.executable, "-m", "relu_dask", *args, "--progress", "none"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
        start_new_session=True,
    )
    fs = s3fs.S3FileSystem(**s3, skip_instance_cache=True)
    done_prefix = f"{BUCKET}/{prefix}/masks.zarr/.relu-dask/done"

    def markers() -> int:
        return _markers(fs, done_prefix)

    end = time.monotonic() + 60
    while proc.poll() is None and markers() < 4 and time.monotonic() < end:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    (line,) = [x for x in err.splitlines() if x.startswith("relu-dask: error: stopped by SIGTERM: ")]
    done = int(line.split("stopped by SIGTERM: ")[1].split(" of ")[0])
    time.sleep(1.0)
    assert markers() == done and 4 <= done <= 512  # 512: the signal came as the last writes went out
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert np.array_equal(_s3_mask(s3, dest), oracle(x))


def test_writes_left_to_the_pool_keep_their_order_bound_their_bytes_and_say_their_errors(
    s3: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A done marker left to the pool is written only once its chunks are, and never after one
    failed; finish_writes says each failure once; a task waits while too many bytes are unwritten."""
    from relu_dask import objectstores, writebehind

    found, missing = (objectstores.bucket_of(url, s3) for url in (f"s3://{BUCKET}/later", "s3://no-such-bucket/later"))
    assert isinstance(found, tuple) and isinstance(missing, tuple)
    (ok, key), (gone, _) = found, missing
    chunks = writebehind.write_later(
        ok, [(f"{key}/c/0", b"chunk0"), (f"{key}/c/1", b"chunk1")], [f"{key}/c/2"], run="a"
    )

    def marker(folder: str, line: str, run: str, after: Future[None]) -> None:
        writebehind.append_later(ok, f"{key}/{folder}", line, run=run, after=after, name=lambda n: f"batch.{n}")

    marker("done0", "0", "a", chunks)
    failed = writebehind.write_later(gone, [("later/c/0", b"chunk")], run="a")
    marker("done1", "1", "a", failed)
    assert writebehind.finish_writes("b") == []  # another run in this process hears nothing of run a's
    errors = writebehind.finish_writes("a")
    assert len(errors) == 1 and isinstance(errors[0], FileNotFoundError), errors
    assert "no-such-bucket" in str(errors[0])
    assert _objects(s3, "later") == {"c/0": b"chunk0", "c/1": b"chunk1", "done0/batch.1": b"0\n"}
    assert writebehind.finish_writes("a") == []

    # a run about to record its job complete: a marker still waiting for its chunks is not made
    # (another run's, waiting for the same, is)
    gate: Future[None] = Future()
    marker("done2", "2", "a", gate)
    marker("done3", "3", "b", gate)
    threading.Timer(1.0, gate.set_result, [None]).start()  # its chunks "written" once the run finishes
    assert writebehind.finish_writes("a", drop_waiting=True) == []
    assert writebehind.finish_writes("b") == []
    assert "done2/batch.1" not in _objects(s3, "later") and "done3/batch.1" in _objects(s3, "later")

    monkeypatch.setattr(writebehind, "LATER_BYTES", 10)
    first = writebehind.write_later(ok, [(f"{key}/big/0", bytes(100))], run="a")
    writebehind.write_later(ok, [(f"{key}/big/1", bytes(100))], run="a")  # waits: 100 bytes unwritten, 10 allowed
    assert first.done()
    assert writebehind.finish_writes("a") == []
    assert _objects(s3, "later/big") == {"0": bytes(100), "1": bytes(100)}


def test_a_run_on_s3_takes_its_lock_while_source_opens_and_leaves_nothing_when_refused(s3: dict[str, str]) -> None:
    """DEST's lock is written while SOURCE opens; a SOURCE that cannot be opened is said as
    before, and the lock taken meanwhile is gone again (DEST as the user left it: nothing)."""
    options = json.dumps(s3)
    dest = f"s3://{BUCKET}/nolock/masks.zarr"
    proc = cli("run", f"s3://{BUCKET}/nolock/missing.zarr", dest, "--storage-options", options)
    assert proc.returncode == 2 and "does not exist" in proc.stderr, proc.stderr
    assert _objects(s3, "nolock") == {}
    inside = cli(
        "run", f"s3://{BUCKET}/nolock/acts.zarr", f"s3://{BUCKET}/nolock/acts.zarr/masks", "--storage-options", options
    )
    assert inside.returncode == 2 and "inside SOURCE" in inside.stderr, inside.stderr
    assert _objects(s3, "nolock") == {}


def test_an_older_record_beside_an_s3_dest_is_moved_in_by_the_lock_taken_while_source_opens(
    s3: dict[str, str],
) -> None:
    """The run reads DEST's record while its lock is being taken; an older relu-dask's record
    beside DEST is moved in by the lock, and the run reads it from there: nothing redone."""
    import s3fs

    x = activations((64, 32), "float32", seed=21)
    _s3_source(s3, "older/acts.zarr", x, (16, 32))
    source, dest = f"s3://{BUCKET}/older/acts.zarr", f"s3://{BUCKET}/older/masks.zarr"
    first = cli("run", source, dest, "--storage-options", json.dumps(s3), "--chunks", "16,32")
    assert first.returncode == 0, first.stderr
    fs = s3fs.S3FileSystem(**s3, skip_instance_cache=True)
    for key in fs.find(f"{BUCKET}/older/masks.zarr/.relu-dask"):  # where an older relu-dask kept it
        fs.mv(key, key.replace("masks.zarr/.relu-dask/", ".masks.zarr.relu-dask/"))
    assert sorted(_objects(s3, "older/.masks.zarr.relu-dask")) == ["job.json"]
    again = cli("run", source, dest, "--storage-options", json.dumps(s3), "--chunks", "16,32")
    assert again.returncode == 0 and "already complete" in again.stdout, again.stdout + again.stderr
    assert sorted(_objects(s3, "older/masks.zarr/.relu-dask")) == ["job.json"]
    assert _objects(s3, "older/.masks.zarr.relu-dask") == {}
    assert np.array_equal(_s3_mask(s3, dest), oracle(x))


def test_done_markers_in_batches_are_read_counted_and_dropped_as_markers_of_their_own(s3: dict[str, str]) -> None:
    """On S3 the pool writes the markers of the tasks ready together as one batch object; a
    resumed run reads them with one listing, counts them from the names, and growth takes some
    out of a batch (written again without them) as it drops markers of their own."""
    from relu_dask import journal, writebehind
    from relu_dask.counts import BlockCounts
    from relu_dask.locations import parse_location

    dest = parse_location(f"s3://{BUCKET}/batches/masks.zarr", s3)
    folder = journal.done_dir(dest, 0)
    counts = BlockCounts(elements=10, ones=4, nans=0, zeros=1, elements_read=10, digest=7)
    chunks: Future[None] = Future()
    for row in range(4):
        journal.record_done(folder, (row, 0), counts, [], "units=-", defer="r0", after=chunks)
    failed: Future[None] = Future()
    failed.set_exception(OSError("its chunks could not be written"))
    journal.record_done(folder, (9, 9), counts, [], "units=-", defer="r0", after=failed)
    journal.record_done(folder, (4, 0), counts, [], "units=-")  # a marker of its own (a cluster's task)
    assert folder.list_names() == ["4.0"]  # nothing before its chunks are written
    chunks.set_result(None)
    assert [str(e) for e in writebehind.finish_writes("r0")] == ["its chunks could not be written"]
    names = folder.list_names()
    assert len(names) >= 2 and all(n == "4.0" or n.startswith("batch.") for n in names), names
    assert journal.count_done(dest, 0) == 5
    resumed = BlockCounts(elements=10, ones=4, nans=0, zeros=1, resumed=1, elements_read=0, digest=7)
    for row in range(5):
        assert journal.read_done(folder, (row, 0), "units=-", run="r1") == (resumed, [])
    assert journal.read_done(folder, (9, 9), "units=-", run="r1") is None
    journal.remove_done_markers_from(dest, 0, axis=0, first_block=2)
    assert journal.count_done(dest, 0) == 2
    assert [journal.read_done(folder, (row, 0), "units=-", run="r2") is not None for row in range(5)] == [
        True,
        True,
        False,
        False,
        False,
    ]
