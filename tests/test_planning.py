"""Options, then a plan, then execution: each step on its own, and the import order between them."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from _support import activations, cli, journal_folder, read_mask, snapshot, write_zarr

import relu_dask
from relu_dask import journal, storage
from relu_dask.errors import DestinationExistsError, InputError
from relu_dask.options import RunOptions
from relu_dask.planning import plan_run

PACKAGE = Path(relu_dask.__file__).parent


def test_options_parse_text_at_the_edge_and_are_frozen(tmp_path: Path) -> None:
    options = RunOptions.create(
        tmp_path / "a.zarr",
        tmp_path / "b.zarr",
        chunks="256MiB",
        dest_chunks="8,16",
        at_zero="0",
        storage_options=None,
        stats=True,
        unit_axis=0,
    )
    assert options.chunks == 256 * 2**20
    assert options.dest_chunks == (8, 16)
    assert options.at_zero == 0
    assert options.unit_axis == 0
    assert options.source == str(tmp_path / "a.zarr")
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.overwrite = True  # type: ignore[misc]
    assert RunOptions.create("a", "b").unit_axis is None  # statistics only when asked for
    assert RunOptions.create("a", "b", stats=True, unit_axis=np.int64(1)).unit_axis == 1  # type: ignore[arg-type]
    assert RunOptions.create("a", "b", stats=True, unit_axis="-1").unit_axis == -1  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"chunks": "256MiBB"}, "chunks"),
        ({"at_zero": 2}, "at_zero must be 1"),
        ({"nan": "ignore"}, "nan must be zero"),
        ({"engine": "cuda"}, "engine must be one of"),
        ({"progress": "loud"}, "progress must be one of"),
        ({"dest_compressor": "lzma"}, "--dest-compressor must be one of"),
        ({"dest_chunks": (8, 0)}, "dest chunks must be positive"),
        ({"stats": True, "unit_axis": "last"}, "--unit-axis must be an integer"),
        ({"progress_interval_s": None}, "progress interval must be a number"),
        ({"performance_report": "p.html"}, "needs a distributed scheduler"),
    ],
)
def test_options_refuse_what_the_command_line_refuses(changes: dict[str, object], message: str) -> None:
    with pytest.raises(InputError, match=message):
        RunOptions.create("a.zarr", "b.zarr", **changes)  # type: ignore[arg-type]


def test_run_follow_and_create_take_one_set_of_keywords_and_refuse_others(tmp_path: Path) -> None:
    """``run``, ``follow`` and ``RunOptions.create`` share :class:`RunKeywords`: they cannot drift."""
    import inspect
    import typing

    from relu_dask.options import RunKeywords

    for function in (relu_dask.run, relu_dask.follow, RunOptions.create):
        hints = typing.get_type_hints(function, include_extras=True)
        assert typing.get_args(hints["options"]) == (RunKeywords,), function
        assert inspect.signature(function).parameters["options"].kind is inspect.Parameter.VAR_KEYWORD
    with pytest.raises(TypeError, match="chunk_size"):
        relu_dask.run(tmp_path / "a.zarr", tmp_path / "b.zarr", chunk_size="64MiB")  # type: ignore[call-arg]
    assert not (tmp_path / "b.zarr").exists()


def test_an_object_store_gets_more_tasks_in_flight_on_smaller_blocks_unless_told() -> None:
    from relu_dask.options import REMOTE_BLOCK_BYTES, REMOTE_THREADS
    from relu_dask.schedulers import count_cores

    s3 = '{"anon": true}'
    remote = RunOptions.create("s3://b/acts.zarr", "masks.zarr", storage_options=s3)
    assert remote.scheduler.num_workers == max(REMOTE_THREADS, count_cores()) and remote.chunks == REMOTE_BLOCK_BYTES
    told = RunOptions.create("a.zarr", "s3://b/m.zarr", storage_options=s3, chunks="64MiB", scheduler="threads")
    assert told.chunks == 64 * 2**20 and told.scheduler.num_workers == max(REMOTE_THREADS, count_cores())
    local = RunOptions.create("a.zarr", "b.zarr")
    assert local.chunks == "auto" and local.scheduler.num_workers is None
    synchronous = RunOptions.create("s3://b/a.zarr", "s3://b/m.zarr", storage_options=s3, scheduler="synchronous")
    assert synchronous.scheduler.num_workers is None


def test_the_constructor_checks_parsed_values_too() -> None:
    with pytest.raises(InputError, match="chunks"):
        RunOptions("a", "b", chunks="lots")
    with pytest.raises(InputError, match="unit axis must be an integer"):
        RunOptions("a", "b", unit_axis=True)


def _source(tmp_path: Path) -> Path:
    path = tmp_path / "src.zarr"
    write_zarr(path, activations((45, 37)), (8, 16))
    return path


def test_a_plan_touches_nothing_and_says_what_plan_prints(tmp_path: Path) -> None:
    source, dest = _source(tmp_path), tmp_path / "out.zarr"
    options = RunOptions.create(source, dest, chunks="8,16", scheduler="synchronous")
    plan = plan_run(options)
    assert not dest.exists()
    assert plan.state == "fresh" and plan.record is None
    assert plan.num_tasks == 6 * 3 and plan.tasks_already_done == 0
    assert [a.chunks.block_shape for a in plan.arrays] == [(8, 16)]
    printed = cli("plan", str(source), str(dest), "--chunks", "8,16", "--scheduler", "synchronous")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.splitlines() == plan.describe()
    assert plan.describe()[-1].startswith("  nothing written; about ")
    assert not dest.exists()


def test_a_plan_of_a_complete_dest_says_what_it_holds_as_a_run_would(tmp_path: Path) -> None:
    """Not "0.0% active, 0 B stored": the record's counts and DEST's bytes, and nothing written."""
    source, dest = _source(tmp_path), tmp_path / "out.zarr"
    args = (str(source), str(dest), "--chunks", "8,16", "--scheduler", "synchronous", "--stats")
    assert cli("run", *args).returncode == 0
    rerun = cli("run", *args)
    before = snapshot(dest)
    planned = cli("plan", *args)
    assert planned.returncode == 0, planned.stderr
    assert snapshot(dest) == before
    x = activations((45, 37))
    said = [line for line in rerun.stdout.splitlines() if "active" in line]  # the array, its units
    assert len(said) == 3 and f"{(x >= 0).sum() / x.size:.1%} active" in said[0], rerun.stdout
    assert " 0 B stored" not in said[0] and f"{np.isnan(x).sum()} NaN" in said[0]
    assert set(said) <= set(planned.stdout.splitlines()), planned.stdout
    assert "already holds every mask" in planned.stdout
    report = relu_dask.run(source, dest, chunks="8,16", scheduler="synchronous", stats=True, dry_run=True)
    assert report.outcome == "already complete" and report.arrays[0].num_ones == int((x >= 0).sum())
    assert report.arrays[0].stats is not None and report.arrays[0].bytes_written > 0


def test_planning_writes_nothing_even_where_the_journal_claims_more_than_dest_holds(tmp_path: Path) -> None:
    """A complete DEST group loses a mask array: the plan (under the lock, too) says it will
    redo it and writes nothing; the run's first step records the job incomplete, then redoes it."""
    import shutil

    import zarr

    source, dest = tmp_path / "acts.zarr", tmp_path / "masks.zarr"
    group = zarr.open_group(str(source), mode="w", zarr_format=3)
    xs = {name: activations((24, 16), seed=seed) for seed, name in enumerate(("a", "b"))}
    for name, x in xs.items():
        group.create_array(name, shape=x.shape, chunks=(8, 16), dtype=x.dtype)[...] = x
    options = RunOptions.create(source, dest, chunks="8,16", scheduler="synchronous")
    relu_dask.execute(plan_run(options))
    shutil.rmtree(dest / "b")
    journal_before = snapshot(journal_folder(dest))
    plan = plan_run(options, under_lock=True)
    assert (plan.state, plan.forget_completion, plan.tasks_already_done) == ("resume", True, 0)
    assert plan.record is not None and not plan.record.complete
    assert snapshot(journal_folder(dest)) == journal_before  # planning reads only
    report = relu_dask.execute(plan)
    assert report.tasks_done_now == 6
    for name, x in xs.items():
        np.testing.assert_array_equal(read_mask(dest, name), (x >= 0).astype(np.int8))


def test_execute_writes_exact_masks_and_a_second_plan_sees_it_complete(tmp_path: Path) -> None:
    source, dest = _source(tmp_path), tmp_path / "out.zarr"
    options = RunOptions.create(source, dest, chunks="8,16", scheduler="synchronous", stats=True)
    plan = plan_run(options)  # read without DEST's lock: execute reads DEST again under it
    assert not plan.under_lock
    report = relu_dask.execute(plan)
    assert report.outcome == "done" and report.tasks_done_now == plan.num_tasks
    x = storage.open_array(source)[...]
    mask = storage.open_array(dest)[...]
    assert mask.dtype == np.int8
    np.testing.assert_array_equal(mask, (x >= 0).astype(np.int8))
    assert report.arrays[0].num_ones == int(np.count_nonzero(x >= 0))
    assert report.arrays[0].stats is not None
    assert report.arrays[0].stats.unit_ones == np.count_nonzero(x >= 0, axis=0).tolist()
    again = plan_run(options)
    assert again.state == "complete" and again.record is not None and again.record.complete
    assert again.record.counts_of(0).ones == report.arrays[0].num_ones
    assert relu_dask.execute(again).outcome == "already complete"
    status = relu_dask.job_status(dest)
    assert (status.state, status.tasks_done, status.num_tasks) == ("complete", 18, 18)
    assert status.to_dict()["state"] == "complete" and "missing" not in status.to_dict()


def test_a_plan_for_another_job_in_dest_is_refused_before_anything_runs(tmp_path: Path) -> None:
    source, dest = _source(tmp_path), tmp_path / "out.zarr"
    relu_dask.run(source, dest, scheduler="synchronous")
    with pytest.raises(DestinationExistsError, match="rule"):
        plan_run(RunOptions.create(source, dest, at_zero=0))
    overwrite = plan_run(RunOptions.create(source, dest, at_zero=0, overwrite=True))
    assert overwrite.state == "fresh"
    assert journal.read_record(overwrite.dest) is not None  # planning deleted nothing


def test_job_status_of_absent_and_foreign_dest(tmp_path: Path) -> None:
    assert relu_dask.job_status(tmp_path / "none.zarr").to_dict() == {
        "dest": str(tmp_path / "none.zarr"),
        "running": None,
        "state": "absent",
    }
    (tmp_path / "other").mkdir()
    assert relu_dask.job_status(tmp_path / "other").state == "absent"  # an empty folder: a run fills it
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert relu_dask.job_status(tmp_path / "other").state == "unknown"


def _imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    typing_only = {  # imports for type hints alone run no code: they may point anywhere
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("relu_dask"):
            found.add(node.module.removeprefix("relu_dask").lstrip(".") or "")
            found.update(a.name for a in node.names if node.module == "relu_dask")
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("relu_dask.") for a in node.names if a.name.startswith("relu_dask."))
    return found - {"", "__version__"}


#: Each layer may import only from the layers after it.
LAYERS = [
    {"cli"},
    {"demo", "following", "commandline"},
    {"execution"},
    {"repair", "prepare", "results"},
    {"mask_stats", "planning"},
    {"options", "resume", "verify", "plot", "jobfile", "xarray"},
    {"graph", "livewriter", "growth"},
    {"task", "fingerprint", "lock", "outputs", "metrics"},
    {"computing", "storage", "journal", "report"},
    {"schedulers", "blocks"},
    {"chunkfiles", "livepage", "markerbatches"},
    {
        "chunkio",
        "kernel",
        "stats",
        "locations",
        "chunking",
        "counts",
        "conventions",
        "workers",
        "records",
        "writebehind",
    },
    {"objectstores"},
    {"errors"},
]


def test_imports_go_one_way() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    assert modules == set().union(*LAYERS), "every module has its place in LAYERS"
    rank = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    backwards = [
        f"{module} imports {imported}"
        for module in sorted(modules)
        for imported in sorted(_imports(module))
        if imported in rank and rank[imported] <= rank[module] and imported != module
    ]
    assert backwards == []
    for module in ("schedulers", "computing"):
        assert not {"graph", "task", "journal", "storage"} & _imports(module), f"{module} knows of relu's tasks"
