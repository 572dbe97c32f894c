"""journal: the job record, done markers that say what they hold, and the replacing record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _support import journal_folder

from relu_dask import journal
from relu_dask.counts import BlockCounts
from relu_dask.locations import parse_location


def test_a_record_round_trips_and_another_format_is_not_read(tmp_path: Path) -> None:
    dest = parse_location(tmp_path / "out.zarr")
    record = journal.JobRecord({"source": "s"}, [[4, 4]], complete=True, counts=[[1, 2, 3, 4, 0, 1]], block_ones=[[2]])
    journal.write_record(dest, record)
    assert journal.read_record(dest) == record
    folder = tmp_path / "out.zarr" / ".relu-dask"
    data = json.loads((folder / "job.json").read_text())
    (folder / "job.json").write_text(json.dumps({**data, "format": 999}))
    assert journal.read_record(dest) is None
    (folder / "job.json").write_text("{not json")
    assert journal.read_record(dest) is None


def test_a_record_from_before_per_block_counts_still_reads(tmp_path: Path) -> None:
    dest = parse_location(tmp_path / "out.zarr")
    folder = tmp_path / "out.zarr" / ".relu-dask"
    folder.mkdir(parents=True)
    old = {"format": 1, "fingerprint": {}, "block_shapes": [[2]], "complete": True, "counts": None}
    (folder / "job.json").write_text(json.dumps(old))
    record = journal.read_record(dest)
    assert record is not None and record.block_ones is None and record.verified_utc is None


@pytest.mark.parametrize(
    ("written_as", "read_as", "reused"),
    [
        ("units=-", "units=-", True),
        ("units=1", "units=1", True),
        ("units=1", "units=0", False),
        ("units=-", "units=1", False),
    ],
)
def test_a_marker_is_reused_only_by_a_task_that_expects_what_it_holds(
    tmp_path: Path, written_as: str, read_as: str, reused: bool
) -> None:
    folder = parse_location(tmp_path / "done" / "0")
    counts = BlockCounts(elements=10, ones=4, nans=0, zeros=1, elements_read=10, digest=123)
    journal.record_done(folder, (1, 2), counts, [3, 1], written_as)
    marker = tmp_path / "done" / "0" / journal.marker_name((1, 2))
    assert marker.read_text() == f"{written_as} crc32:123 10 4 0 1 3 1"
    resumed = BlockCounts(elements=10, ones=4, nans=0, zeros=1, resumed=1, elements_read=0, digest=123)
    assert journal.read_done(folder, (1, 2), read_as) == ((resumed, [3, 1]) if reused else None)
    assert journal.read_done(folder, (2, 2), read_as) is None  # not done
    marker.write_text(f"{written_as} 10 4 0 1 3 1")  # an older relu-dask's marker: no digest
    older = BlockCounts(elements=10, ones=4, nans=0, zeros=1, resumed=1)
    assert journal.read_done(folder, (1, 2), read_as) == ((older, [3, 1]) if reused else None)


def test_a_marker_of_the_old_format_or_garbage_is_redone(tmp_path: Path) -> None:
    folder = tmp_path / "done"
    folder.mkdir()
    (folder / "0.0").write_text("10 4 0 1")  # before markers said what they hold
    (folder / "0.1").write_text("units=- x y")
    (folder / "0.2").write_text("")
    for index in ((0, 0), (0, 1), (0, 2)):
        assert journal.read_done(parse_location(folder), index, "units=-") is None
    with pytest.raises(ValueError, match="one word"):
        journal.record_done(parse_location(folder), (0, 3), BlockCounts(), [], "two words")


def test_replacing_is_recorded_until_unmarked(tmp_path: Path) -> None:
    dest = parse_location(tmp_path / "out.zarr")
    assert not journal.is_being_replaced(dest)
    journal.mark_replacing(dest)
    assert journal.is_being_replaced(dest)
    journal.remove_journal(dest)  # forgetting the job keeps it: the deletion is still to come
    assert journal.is_being_replaced(dest)
    journal.unmark_replacing(dest)
    assert not journal.is_being_replaced(dest)


def test_reach_step_knows_only_the_documented_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELU_DASK_STOP_AT", raising=False)
    for step in journal.STEPS:
        journal.reach_step(step)  # without the variable: nothing happens
    with pytest.raises(AssertionError):
        journal.reach_step("no-such-step")
    design = (Path(__file__).parents[1] / "docs" / "design.md").read_text()
    assert all(f"`{step}`" in design for step in journal.STEPS)  # each has its row in the table


def test_block_counts_keep_their_order_through_a_row_a_sum_and_a_marker() -> None:
    a = BlockCounts(elements=6, ones=2, nans=1, zeros=3, elements_read=6, digest=77)
    b = BlockCounts.resumed_from([4, 4, 0, 0, 9, 9])  # a marker's four counts, then per-unit ones
    assert b == BlockCounts(elements=4, ones=4, resumed=1)
    assert b.digest == -1  # an older marker: no digest
    assert a.as_row() == [6, 2, 1, 3, 0, 6, 77]
    assert (a + b).digest == (a - b).digest == -1  # a sum of blocks has none
    assert BlockCounts.total([a.as_row(), a.as_row()]) == BlockCounts(12, 4, 2, 6, 0, 12)
    assert BlockCounts.from_row([*a.as_row(), 7, 7]) == a  # the per-unit tail of a task's row is not a count
    assert a.recorded() == [6, 2, 1, 3]


def test_held_reads_its_own_record_and_an_older_relu_dasks(tmp_path: Path) -> None:
    dest = parse_location(tmp_path / "out.zarr")
    assert journal.read_held(dest) == journal.Held()  # none yet
    held = journal.Held({"a": [160, 32], "step": [160]}, {"a": ["c/7/1"]})
    journal.write_held(dest, held)
    assert journal.read_held(dest) == held
    older = journal_folder(tmp_path / "out.zarr") / "held.json"
    older.write_text(json.dumps({"a": [160, 32]}))  # an older relu-dask's: the shapes alone
    assert journal.read_held(dest) == journal.Held({"a": [160, 32]})
    older.write_text("[1, 2")
    assert journal.read_held(dest) == journal.Held()
    journal.write_held(dest, None)
    assert not older.exists()
