"""Job files: several runs described in one TOML file, for batch schedulers.

Use :func:`read_job_file` to turn ``relu-dask run --config jobs.toml`` into one command
line per job. Each job is a ``[[job]]`` table with ``source``, ``dest`` and any option of
``relu-dask run`` (spelled as on the command line, with ``_`` or ``-``); an optional
``[defaults]`` table applies to every job. Relative paths are taken from the file's folder::

    [defaults]
    scheduler = "threads"
    report = "reports/{name}.json"    # {name}: the job's name (default: its DEST's stem)

    [[job]]
    source = "acts/epoch1.zarr"
    dest = "masks/epoch1.zarr"

    [[job]]
    name = "epoch2-outputs"
    source = "acts/epoch2.zarr"
    dest = "masks/epoch2.zarr"
    at_zero = 0
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relu_dask.errors import InputError

__all__ = ["FileJob", "read_job_file"]

_PATH_KEYS = ("source", "dest", "report", "plot", "performance_report", "metrics_file")


@dataclass(frozen=True)
class FileJob:
    """One job of a job file, as the arguments of ``relu-dask run``."""

    name: str
    argv: list[str]
    """SOURCE, DEST and the job's own options, as ``relu-dask run`` takes them."""
    keys: frozenset[str] = frozenset()
    """The options the job (or the file's ``[defaults]``) sets, by their names in the file:
    these win over the command line's."""


def read_job_file(path: Path) -> list[FileJob]:
    """Read a job file; raise :class:`InputError` naming the file and the problem."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"job file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"job file {path} could not be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"job file {path} is not valid TOML: {exc}") from None
    unknown = set(data) - {"defaults", "job"}
    if unknown:
        raise InputError(f"job file {path}: unknown table(s) {', '.join(sorted(unknown))}; use [defaults] and [[job]]")
    defaults = data.get("defaults", {})
    jobs = data.get("job", [])
    if not isinstance(jobs, list) or not jobs or not all(isinstance(j, dict) for j in jobs):
        raise InputError(f"job file {path} has no [[job]] tables: add one per SOURCE and DEST")
    if not isinstance(defaults, dict):
        raise InputError(f"job file {path}: [defaults] must be a table")
    return [_file_job(path, index, {**defaults, **job}) for index, job in enumerate(jobs, start=1)]


def _file_job(path: Path, index: int, table: dict[str, Any]) -> FileJob:
    where = f"job file {path}, job {index}"
    missing = [k for k in ("source", "dest") if k not in table]
    if missing:
        raise InputError(f"{where}: {' and '.join(missing)} missing")
    name = str(table.pop("name", Path(str(table["dest"])).stem))
    for key in _PATH_KEYS:
        if key in table:
            text = str(table[key]).replace("{name}", name)
            table[key] = str(path.parent / text) if not Path(text).is_absolute() else text
    argv = [table.pop("source"), table.pop("dest")]
    keys = frozenset(k.replace("-", "_") for k in table)
    for key, value in table.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value:
                argv.append(flag)
        elif isinstance(value, dict):  # storage_options = { endpoint_url = "..." }
            argv += [flag, json.dumps(value)]
        elif isinstance(value, list):
            argv += [flag, ",".join(str(v) for v in value)]
        elif isinstance(value, str | int | float):
            argv += [flag, str(value)]
        else:
            raise InputError(f"{where}: {key} must be a string, number, boolean or list, got {value!r}")
    return FileJob(name, argv, keys)
