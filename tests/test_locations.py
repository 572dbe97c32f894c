"""locations: the same file operations on a local folder and on an fsspec store (``memory://``)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from relu_dask.locations import Location, parse_location


@pytest.fixture(params=["local", "memory"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Location:
    if request.param == "local":
        return parse_location(tmp_path / "root")
    return parse_location(f"memory://relu-dask-tests/{uuid.uuid4().hex}")


def test_names_and_relatives(root: Location) -> None:
    child = root.child("a", "b.zarr")
    assert child.name == "b.zarr"
    assert child.parent().name == "a"
    assert child.sibling(".b.zarr.relu-dask").parent() == child.parent()
    assert str(child).endswith("a/b.zarr")
    assert root.is_local == ("://" not in root.url)


def test_write_read_stat_list_remove(root: Location) -> None:
    job = root.child("journal", "job.json")
    assert not job.exists() and job.stat() is None
    job.write_text('{"x": 1}')
    assert job.exists() and job.read_text() == '{"x": 1}' and job.read_bytes() == b'{"x": 1}'
    size, mtime = job.stat()  # type: ignore[misc]
    assert size == 8 and mtime > 0
    job.write_text("{}")  # replaced whole
    assert job.read_text() == "{}"
    assert root.child("journal").list_names() == ["job.json"]
    job.remove()
    job.remove()  # absent is fine
    assert not job.exists()


def test_create_is_exclusive(root: Location) -> None:
    lock = root.child("lock")
    assert lock.create("first")
    assert not lock.create("second")
    assert lock.read_text() == "first"


def test_remove_tree_and_rename(root: Location) -> None:
    for name in ("c/0/0", "c/0/1", "zarr.json"):
        root.child("dest", *name.split("/")).write_text(name)
    assert root.child("dest").disk_bytes() >= len("c/0/0c/0/1zarr.json")
    assert root.child("dest", "zarr.json").rename_to(root.child("aside"))
    assert root.child("aside").read_text() == "zarr.json" and not root.child("dest", "zarr.json").exists()
    root.child("dest").remove_tree()
    root.child("dest").remove_tree()  # absent is fine
    assert not root.child("dest").exists()
    assert root.child("nothing").list_names() == []
