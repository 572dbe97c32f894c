"""S3 buckets through obstore: one client per bucket and process, many requests at once.

Use :func:`bucket_of` to learn whether a URL (with the fsspec storage options a user passes
to ``--storage-options``) can be reached directly through `obstore
<https://developmentseed.org/obstore/>`_, the Rust object-store client zarr's own
``zarr.storage.ObjectStore`` wraps; then :func:`get_many`, :func:`put_many` and
:func:`delete_many` move many objects at once, and the single-object calls serve
:class:`relu_dask.locations.Location`. Where this module declines (obstore not installed, a
scheme other than ``s3://``, storage options it cannot translate, credentials only an AWS
profile holds), :func:`bucket_of` says why in words and the caller keeps to fsspec and zarr.

Why: through s3fs and zarr, a chunk read was a HEAD and a GET, each signed in Python, one
chunk at a time per task, and "does it exist" a HEAD then a listing. A one-off measurement
(moto on 127.0.0.1, no added delay, 64 chunks of 4 MiB): 0.45 s one GET after another through
obstore, 0.28 s from a 32-thread pool (obstore's sync calls release the GIL, so a plain thread
pool keeps many requests in flight). ``scripts/bench_remote.py`` measures whole runs.

The translation of s3fs's options (https://s3fs.readthedocs.io/en/latest/api.html):
``key``, ``secret``, ``token``, ``endpoint_url`` (top level or in ``client_kwargs``),
``region_name`` (in ``client_kwargs``), ``anon``, ``requester_pays``, and in
``config_kwargs`` ``connect_timeout``, ``read_timeout`` and ``retries.max_attempts``.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

__all__ = [
    "IN_FLIGHT",
    "Bucket",
    "bucket_of",
    "create",
    "delete_many",
    "delete_tree",
    "exists",
    "get",
    "get_many",
    "head",
    "list_names",
    "list_prefix",
    "put",
    "put_many",
    "submit",
    "zarr_store",
]

#: Requests one process keeps in flight at most (its pool's threads): enough to hide a
#: store's first-byte latency (tens of ms) behind the chunks of the tasks running at once.
IN_FLIGHT = 32

#: Retries of a failed request when the options do not say (``config_kwargs.retries``), and
#: the time they may take in all: a scheduled job must end, and say why, within minutes.
DEFAULT_RETRIES = 4
RETRY_TIMEOUT = timedelta(seconds=30)

_SCHEMES = ("s3", "s3a")
_TOP_LEVEL = {"key", "secret", "token", "endpoint_url", "anon", "requester_pays", "client_kwargs", "config_kwargs"}


@dataclass(frozen=True)
class Bucket:
    """One S3 bucket and how to reach it: picklable, so tasks on any worker carry it."""

    name: str
    config_json: str
    """obstore's S3 configuration (keys of ``obstore.store.S3Config``), as JSON."""
    connect_timeout_s: float | None = None
    timeout_s: float | None = None
    retries: int = DEFAULT_RETRIES

    def url(self, key: str) -> str:
        return f"s3://{self.name}/{key}"


def bucket_of(url: str, storage_options: dict[str, Any]) -> tuple[Bucket, str] | str:
    """The bucket and key of an ``s3://`` URL reached through obstore, or why not (in words)."""
    scheme, _, rest = url.partition("://")
    if scheme not in _SCHEMES:
        return f"{scheme}:// is reached through fsspec"
    if not _have_obstore():
        return "obstore is not installed (pip install 'relu-dask[s3]')"
    unknown = sorted(set(storage_options) - _TOP_LEVEL)
    if unknown:
        return f"storage option(s) {', '.join(unknown)} are passed to s3fs"
    client = dict(storage_options.get("client_kwargs") or {})
    settings = dict(storage_options.get("config_kwargs") or {})
    if set(client) - {"endpoint_url", "region_name"} or set(settings) - {"connect_timeout", "read_timeout", "retries"}:
        return "client_kwargs or config_kwargs beyond endpoint, region, timeouts and retries are passed to s3fs"
    config = _s3_config(storage_options, client)
    if isinstance(config, str):
        return config
    name, _, key = rest.partition("/")
    attempts = (settings.get("retries") or {}).get("max_attempts")
    bucket = Bucket(
        name,
        json.dumps(config, sort_keys=True),
        _seconds(settings.get("connect_timeout")),
        _seconds(settings.get("read_timeout")),
        DEFAULT_RETRIES if attempts is None else max(0, int(attempts) - 1),
    )
    return bucket, key.strip("/")


def _s3_config(options: dict[str, Any], client: dict[str, Any]) -> dict[str, Any] | str:
    config: dict[str, Any] = {}
    for ours, theirs in (("key", "access_key_id"), ("secret", "secret_access_key"), ("token", "session_token")):
        if options.get(ours):
            config[theirs] = str(options[ours])
    endpoint = options.get("endpoint_url") or client.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        config["endpoint"] = str(endpoint)
    region = client.get("region_name") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region and not endpoint:
        # AWS itself answers only in the bucket's region, which s3fs looks up and obstore does not
        return "no region given (client_kwargs.region_name or AWS_REGION): s3fs finds the bucket's"
    config["region"] = str(region or "us-east-1")  # an endpoint of its own (MinIO, Ceph, moto) takes any
    if options.get("anon"):
        config["skip_signature"] = True
    if options.get("requester_pays"):
        config["request_payer"] = True
    if "access_key_id" in config and "session_token" not in config and _environment_token():
        # obstore would sign the given keys with the environment's token (another identity's)
        return "keys given without a token beside AWS_SESSION_TOKEN in the environment: s3fs keeps them apart"
    signed = "access_key_id" in config or config.get("skip_signature") or os.environ.get("AWS_ACCESS_KEY_ID")
    if not signed and _aws_profile():
        return "credentials from an AWS profile (~/.aws) are read by s3fs"
    return config


def _environment_token() -> bool:
    return bool(os.environ.get("AWS_SESSION_TOKEN") or os.environ.get("AWS_SECURITY_TOKEN"))


def _aws_profile() -> bool:
    """Whether botocore could find credentials in a profile, which obstore does not read
    (SSO, ``credential_process``, ``role_arn``, plain keys): any profile or config file."""
    if any(os.environ.get(name) for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")):
        return True
    return any(os.path.exists(os.path.expanduser(f"~/.aws/{name}")) for name in ("credentials", "config"))


def _seconds(value: Any) -> float | None:
    return None if value is None else float(value)


@functools.cache
def _have_obstore() -> bool:
    try:
        import obstore  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _client(bucket: Bucket, prefix: str = "") -> Any:
    """obstore's S3Store for ``bucket`` (under ``prefix``), made once per process."""
    from obstore.store import S3Store

    config = json.loads(bucket.config_json)
    options: dict[str, Any] = {"allow_http": str(config.get("endpoint", "")).startswith("http://")}
    if bucket.connect_timeout_s is not None:
        options["connect_timeout"] = timedelta(seconds=bucket.connect_timeout_s)
    if bucket.timeout_s is not None:
        options["timeout"] = timedelta(seconds=bucket.timeout_s)
    retry = {"max_retries": bucket.retries, "retry_timeout": RETRY_TIMEOUT}
    return S3Store(
        bucket.name,
        prefix=prefix or None,
        config=config,
        client_options=options,  # type: ignore[arg-type]
        retry_config=retry,  # type: ignore[arg-type]
    )


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="relu-dask-objectstore")


def zarr_store(bucket: Bucket, key: str) -> Any:
    """zarr's ``ObjectStore`` over the objects under ``key`` (zarr's public store for obstore)."""
    import zarr.storage

    return zarr.storage.ObjectStore(_client(bucket, key.strip("/")))


class ObjectStoreError(OSError):
    """A request the object store failed (after its retries), in one line."""


def _failed(bucket: Bucket, key: str, exc: Exception) -> OSError:
    # A listing in a bucket that is not there: obstore says NotFound only of objects, and of
    # the rest gives the status in words (NoSuchBucket, 404): nothing is stored there.
    if "NoSuchBucket" in str(exc):
        return FileNotFoundError(2, f"bucket {bucket.name} does not exist", bucket.url(key))
    if isinstance(exc, FileNotFoundError) or "404 Not Found" in str(exc):
        return FileNotFoundError(2, "no such object", bucket.url(key))
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    retried = "" if "retries" in first else f" (retried at most {bucket.retries} times)"
    return ObjectStoreError(f"{bucket.url(key)}: {first}{retried}")


def get(bucket: Bucket, key: str) -> memoryview:
    """The object's bytes; FileNotFoundError where there is none."""
    import obstore

    try:
        return memoryview(obstore.get(_client(bucket), key).bytes())
    except Exception as exc:  # noqa: BLE001 - obstore's errors, said in one line
        raise _failed(bucket, key, exc) from None


def get_many(bucket: Bucket, keys: Sequence[str]) -> list[memoryview | None]:
    """Each object's bytes (None where there is none), fetched at once."""
    if len(keys) == 1:
        return [_get_or_none(bucket, keys[0])]
    return list(_pool().map(functools.partial(_get_or_none, bucket), keys))


def _get_or_none(bucket: Bucket, key: str) -> memoryview | None:
    try:
        return get(bucket, key)
    except FileNotFoundError:
        return None


def exists(bucket: Bucket, key: str) -> bool:
    """Whether an object is at ``key``, or any under ``key/`` (a "folder"): both asked at once."""
    under = _pool().submit(list_prefix, bucket, f"{key}/", limit=1)
    return head(bucket, key) is not None or bool(under.result())


def head(bucket: Bucket, key: str) -> tuple[int, float] | None:
    """Size and modification time of an object, or None where there is none."""
    import obstore

    try:
        meta = obstore.head(_client(bucket), key)
    except Exception as exc:  # noqa: BLE001
        error = _failed(bucket, key, exc)
        if isinstance(error, FileNotFoundError):
            return None
        raise error from None
    return int(meta["size"]), meta["last_modified"].timestamp()


def put(bucket: Bucket, key: str, data: Any) -> None:
    """Write one whole object (a PUT: whole or absent)."""
    import obstore

    try:
        obstore.put(_client(bucket), key, _buffer(data))
    except Exception as exc:  # noqa: BLE001
        raise _failed(bucket, key, exc) from None


def submit(fn: Callable[..., Any], *args: Any) -> Future[Any]:
    """Run ``fn(*args)`` on this process's pool of requests (:data:`IN_FLIGHT` threads)."""
    return _pool().submit(fn, *args)


def put_many(bucket: Bucket, items: Sequence[tuple[str, Any]]) -> None:
    """Write many objects at once."""
    list(_pool().map(lambda item: put(bucket, *item), items))


def create(bucket: Bucket, key: str, data: Any) -> bool:
    """Write the object unless it exists; whether this call made it.

    A conditional write (``If-None-Match: *``): of two runs creating the same object at the
    same instant, the store lets one win. A store that does not support it (answers 501)
    gets a check, then a write.
    """
    import obstore
    from obstore.exceptions import AlreadyExistsError, NotSupportedError, PreconditionError

    try:
        obstore.put(_client(bucket), key, _buffer(data), mode="create")
    except (AlreadyExistsError, PreconditionError):
        # ours if it holds our bytes: a retried PUT whose first try landed (the lock's text is one
        # run's own: its host, pid and start)
        try:
            return bytes(get(bucket, key)) == bytes(_buffer(data))
        except FileNotFoundError:
            return False
    except NotSupportedError:
        if head(bucket, key) is not None:
            return False
        put(bucket, key, data)
    except Exception as exc:  # noqa: BLE001
        raise _failed(bucket, key, exc) from None
    return True


def delete_many(bucket: Bucket, keys: Iterable[str]) -> None:
    """Delete objects (absent ones are fine), in bulk requests."""
    import obstore

    keys = list(keys)
    if keys:
        try:
            obstore.delete(_client(bucket), keys)
        except Exception as exc:  # noqa: BLE001
            raise _failed(bucket, keys[0], exc) from None


def delete_tree(bucket: Bucket, key: str) -> None:
    """Delete the object at ``key`` and every one under ``key/``: the first while the rest are listed."""
    alone = _pool().submit(delete_many, bucket, [key])
    delete_many(bucket, [k for k, _ in list_prefix(bucket, f"{key}/")])
    alone.result()


def list_prefix(
    bucket: Bucket, prefix: str, *, limit: int | None = None, cuts: Sequence[str] = ()
) -> list[tuple[str, int]]:
    """Keys and sizes of the objects under ``prefix`` (all levels; at most ``limit``), in
    S3's order.

    ``cuts``: keys that cut the listing into ranges listed at once, each from just after
    one cut up to the next (any keys: the ranges cover every key whatever they are). S3
    lists 1000 keys a round trip, one page after another; cut where each range holds about
    that many, a listing takes one round trip however many objects there are (up to
    :data:`IN_FLIGHT` ranges at once).
    """
    bounds: list[str | None] = [None, *sorted(set(cuts)), None] if limit is None else [None, None]
    ranges = list(itertools.pairwise(bounds))
    try:
        if len(ranges) == 1:
            return _list_range(bucket, prefix, None, None, limit)
        with ThreadPoolExecutor(min(len(ranges), IN_FLIGHT), thread_name_prefix="relu-dask-listing") as pool:
            parts = list(pool.map(lambda r: _list_range(bucket, prefix, *r), ranges))
    except Exception as exc:  # noqa: BLE001
        error = _failed(bucket, prefix, exc)
        if isinstance(error, FileNotFoundError):
            return []  # no bucket: nothing under the prefix
        raise error from None
    return [item for part in parts for item in part]


def _list_range(
    bucket: Bucket, prefix: str, after: str | None, upto: str | None, limit: int | None = None
) -> list[tuple[str, int]]:
    """Keys and sizes under ``prefix`` greater than ``after`` and at most ``upto`` (None: no bound)."""
    import obstore

    found: list[tuple[str, int]] = []
    for batch in obstore.list(_client(bucket), prefix, offset=after, chunk_size=limit or 1000):
        for meta in batch:
            key = str(meta["path"])
            if upto is not None and key > upto:
                return found
            found.append((key, int(meta["size"])))
        if limit is not None and len(found) >= limit:
            return found[:limit]
    return found


def list_names(bucket: Bucket, prefix: str) -> list[str]:
    """The names directly under ``prefix`` (a folder: ending in ``/``, or "" for the bucket's
    root): its objects and its sub-prefixes, one level, as S3 lists with a delimiter."""
    import obstore

    try:
        found = obstore.list_with_delimiter(_client(bucket), prefix or None)
    except Exception as exc:  # noqa: BLE001
        error = _failed(bucket, prefix, exc)
        if isinstance(error, FileNotFoundError):
            return []
        raise error from None
    paths = [str(p) for p in found["common_prefixes"]] + [str(m["path"]) for m in found["objects"]]
    return sorted({p[len(prefix) :].strip("/").split("/", 1)[0] for p in paths if p.startswith(prefix)} - {""})


def _buffer(data: Any) -> Any:
    """Bytes obstore takes: text encoded, numpy arrays as their bytes (unsigned)."""
    if isinstance(data, str):
        return data.encode()
    view = memoryview(data)
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view
