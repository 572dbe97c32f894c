"""Where SOURCE, DEST and DEST's journal live: a local path or an fsspec URL.

Use :func:`parse_location` to turn a user's path or URL (``s3://bucket/acts.zarr``,
``gs://...``, ``file:///...``) and its storage options into a :class:`Location`, whose few
file operations the journal and the storage module need. Local paths get POSIX guarantees
(atomic rename, exclusive create); object stores get what they offer: a single object is
written whole or not at all. S3 URLs are reached through obstore where
:mod:`relu_dask.objectstores` can (then "create if absent" is a conditional write, so of two
runs started in the same instant on one DEST only one takes its lock), else through fsspec
(then it is a check and a write; see docs/cli.md, Object storage).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from relu_dask import objectstores
from relu_dask.errors import InputError

__all__ = ["Location", "at_once", "in_background", "parse_location", "parse_storage_options"]

T = TypeVar("T")
R = TypeVar("R")


def parse_storage_options(text: str | dict[str, Any] | None) -> dict[str, Any]:
    """Parse ``--storage-options`` (a JSON object) for fsspec, e.g. ``{"endpoint_url": ...}``."""
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        return dict(text)
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InputError(f"--storage-options must be a JSON object such as '{{\"anon\": true}}': {exc}") from None
    if not isinstance(value, dict):
        raise InputError(f"--storage-options must be a JSON object, got {text!r}")
    return value


def _is_url(text: str) -> bool:
    return "://" in text and not text.startswith("file://")


@dataclass(frozen=True)
class Location:
    """A local path, or a path in an fsspec file system (with its storage options)."""

    url: str
    """The path or URL (a local path is absolute)."""
    options_json: str = "{}"
    """The storage options, as JSON (so that a Location is hashable and picklable)."""

    @property
    def is_local(self) -> bool:
        return not _is_url(self.url)

    @property
    def storage_options(self) -> dict[str, Any]:
        return dict(json.loads(self.options_json))

    @property
    def path(self) -> Path:
        """The local path (only for local locations)."""
        assert self.is_local, self.url
        return Path(self.url)

    @property
    def object_store(self) -> tuple[objectstores.Bucket, str] | None:
        """The bucket and key where obstore reaches this location directly (None: fsspec)."""
        found = _bucket_of(self.url, self.options_json)
        return None if isinstance(found, str) else found

    @property
    def why_not_object_store(self) -> str:
        """Why this URL is reached through fsspec rather than obstore ("" where it is not)."""
        found = _bucket_of(self.url, self.options_json)
        return found if isinstance(found, str) else ""

    def _fs(self) -> tuple[Any, str]:
        import fsspec.core

        fs, path = fsspec.core.url_to_fs(self.url, **self.storage_options)
        return fs, path

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def parent(self) -> Location:
        return Location(self.url.rstrip("/").rsplit("/", 1)[0], self.options_json)

    def child(self, *names: str) -> Location:
        return Location("/".join([self.url.rstrip("/"), *names]), self.options_json)

    def sibling(self, name: str) -> Location:
        return self.parent().child(name)

    def __str__(self) -> str:
        return self.url

    # -- reading ------------------------------------------------------------------------

    def exists(self) -> bool:
        if self.is_local:
            return self.path.exists() or self.path.is_symlink()
        if (direct := self.object_store) is not None:
            return objectstores.exists(*direct)
        fs, path = self._fs()
        return bool(fs.exists(path))

    def read_text(self) -> str:
        """The object's text; FileNotFoundError if it is not there."""
        if self.is_local:
            return self.path.read_text()
        return self.read_bytes().decode()

    def read_bytes(self) -> bytes:
        if self.is_local:
            return self.path.read_bytes()
        if (direct := self.object_store) is not None:
            return bytes(objectstores.get(*direct))
        fs, path = self._fs()
        return bytes(fs.cat_file(path))

    def stat(self) -> tuple[int, float] | None:
        """Size and modification time (seconds), or None if absent."""
        if self.is_local:
            try:
                st = self.path.stat()
            except OSError:
                return None
            return st.st_size, st.st_mtime
        if (direct := self.object_store) is not None:
            return objectstores.head(*direct)
        fs, path = self._fs()
        try:
            info = fs.info(path)
        except FileNotFoundError:
            return None
        modified = info.get("LastModified") or info.get("mtime") or info.get("updated") or info.get("created") or 0
        stamp = modified.timestamp() if hasattr(modified, "timestamp") else float(modified or 0)
        return int(info.get("size") or 0), stamp

    def list_names(self) -> list[str]:
        """Names directly under this location ([] if none)."""
        if self.is_local:
            return sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else []
        if (direct := self.object_store) is not None:
            bucket, key = direct
            return objectstores.list_names(bucket, f"{key}/" if key else "")  # "": a bucket's root
        fs, path = self._fs()
        try:
            return sorted(str(p).rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
        except FileNotFoundError:
            return []

    def disk_bytes(self, *, skip: str | None = None, cuts: Sequence[str] = ()) -> int:
        """Bytes stored under this location (but under its child named ``skip``). In a bucket,
        ``cuts`` (paths under this location) cut its listing into ranges listed at once
        (:func:`relu_dask.objectstores.list_prefix`)."""
        if self.is_local:
            total = 0
            for root, dirs, files in os.walk(self.path):
                if root == str(self.path) and skip in dirs:
                    dirs.remove(skip)
                for name in files:
                    with contextlib.suppress(OSError):
                        total += os.path.getsize(os.path.join(root, name))
            return total
        if (direct := self.object_store) is not None:
            bucket, key = direct
            under = f"{key}/" if key else ""
            listed = objectstores.list_prefix(bucket, under, cuts=[under + cut for cut in cuts])
            return sum(size for k, size in listed if not _below(k[len(under) :], skip))
        fs, path = self._fs()
        try:
            sizes = fs.du(path, total=False)
        except FileNotFoundError:
            return 0
        return sum(int(n) for p, n in sizes.items() if not _below(str(p)[len(path) :].lstrip("/"), skip))

    def files(self) -> list[str]:
        """The paths, relative to this location, of every object (file) under it ([] if none)."""
        if self.is_local:
            if not self.path.is_dir():
                return []
            return sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if not p.is_dir())
        if (direct := self.object_store) is not None:
            bucket, key = direct
            under = f"{key}/" if key else ""
            return sorted(k[len(under) :] for k, _ in objectstores.list_prefix(bucket, under))
        fs, path = self._fs()
        try:
            return sorted(str(p)[len(path) :].lstrip("/") for p in fs.find(path))
        except FileNotFoundError:
            return []

    # -- writing ------------------------------------------------------------------------

    def write_text(self, text: str) -> None:
        """Write the whole object at once: locally a temporary file and a rename."""
        self.write_bytes(text.encode())

    def write_bytes(self, data: bytes) -> None:
        """Write the whole object at once: locally a temporary file and a rename."""
        if self.is_local:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
            tmp.write_bytes(data)
            os.replace(tmp, self.path)
            return
        if (direct := self.object_store) is not None:
            objectstores.put(*direct, data)
            return
        fs, path = self._fs()
        fs.pipe_file(path, data)  # one PUT: the object is whole or absent

    def create(self, text: str) -> bool:
        """Create the object with ``text`` unless it exists; return whether this call made it."""
        if self.is_local:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(text)
            except OSError:  # a full disk: no empty object left behind to be taken for another's
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
                raise
            return True
        if (direct := self.object_store) is not None:  # a conditional write: one winner
            return objectstores.create(*direct, text)
        if self.exists():  # through fsspec: a check, then a write
            return False
        self.write_text(text)
        return True

    def touch(self) -> None:
        """Refresh the modification time (a heartbeat)."""
        if self.is_local:
            os.utime(self.path)
        else:
            self.write_text(self.read_text())

    def remove(self) -> None:
        """Remove one object; absent is fine."""
        if self.is_local:
            self.path.unlink(missing_ok=True)
            return
        if (direct := self.object_store) is not None:
            objectstores.delete_many(direct[0], [direct[1]])
            return
        fs, path = self._fs()
        with contextlib.suppress(FileNotFoundError):
            fs.rm_file(path)

    def remove_tree(self, *, keep: str | None = None) -> None:
        """Remove everything under this location (but its child named ``keep``); absent is fine."""
        if keep is not None and (direct := self.object_store) is not None:  # one listing, bulk deletes
            bucket, key = direct
            under = f"{key}/" if key else ""
            objectstores.delete_many(
                bucket, [k for k, _ in objectstores.list_prefix(bucket, under) if not _below(k[len(under) :], keep)]
            )
            return
        if keep is not None:
            for name in self.list_names():
                if name != keep:
                    self.child(name).remove_tree()
            return
        if self.is_local:
            if self.path.is_dir() and not self.path.is_symlink():
                shutil.rmtree(self.path)
            else:
                self.path.unlink(missing_ok=True)
            return
        if (direct := self.object_store) is not None:
            objectstores.delete_tree(*direct)
            return
        fs, path = self._fs()
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path, recursive=True)

    def rename_to(self, other: Location) -> bool:
        """Move this object to ``other``; False if it was gone (locally atomic: one winner)."""
        if self.is_local:
            try:
                os.rename(self.path, other.path)
            except FileNotFoundError:
                return False
            return True
        try:
            text = self.read_text()
        except FileNotFoundError:
            return False
        other.write_text(text)
        self.remove()
        return True


def at_once(function: Callable[[T], R], items: Iterable[T], limit: int = 8) -> list[R]:
    """``function`` of each item, in order, up to ``limit`` at once (threads: on an object
    store their round trips overlap); one item is called here."""
    items = list(items)
    if len(items) < 2:
        return [function(item) for item in items]
    with ThreadPoolExecutor(min(limit, len(items))) as pool:
        return list(pool.map(function, items))


def in_background(function: Callable[[], R], *, daemon: bool = False) -> Future[R]:
    """Call ``function`` in a thread of its own; its future (its result, or its error).
    ``daemon``: the process may end without waiting for it (for reads only)."""
    done: Future[R] = Future()

    def work() -> None:
        try:
            result = function()
        except BaseException as exc:  # noqa: BLE001 - the future's to say
            done.set_exception(exc)
        else:
            done.set_result(result)

    threading.Thread(target=work, name="relu-dask-background", daemon=daemon).start()
    return done


def _below(relative: str, name: str | None) -> bool:
    """Whether the relative path ``relative`` is ``name`` or under it."""
    return name is not None and (relative == name or relative.startswith(name + "/"))


@functools.lru_cache(maxsize=256)
def _bucket_of(url: str, options_json: str) -> tuple[objectstores.Bucket, str] | str:
    return objectstores.bucket_of(url, json.loads(options_json))


def parse_location(text: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> Location:
    """A :class:`Location` for a path (made absolute) or an fsspec URL."""
    value = os.fspath(text)
    if value.startswith("file://"):
        value = value[len("file://") :]
    if _is_url(value):
        return Location(value.rstrip("/"), json.dumps(storage_options or {}, sort_keys=True))
    return Location(str(Path(value).resolve()))  # storage options are for URLs only
