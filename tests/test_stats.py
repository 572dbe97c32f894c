"""Unit statistics in the same pass: planted dead and always-on units, against numpy."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from _support import PYTHON, activations, cli, cli_env, oracle, write_zarr

import relu_dask
from relu_dask.stats import MAX_INLINE_UNITS, summarize_units

DEAD, ALWAYS = [2, 17, 30], [0, 11]


def planted(shape: tuple[int, ...], unit_axis: int, dtype: str = "float32", seed: int = 0) -> np.ndarray:
    """Activations whose units DEAD never fire and ALWAYS always fire, with NaNs elsewhere."""
    x = activations(shape, dtype, seed=seed)
    moved = np.moveaxis(x, unit_axis, -1)  # a view: writes land in x
    moved[..., DEAD] = -np.abs(moved[..., DEAD]) - 1
    moved[..., ALWAYS] = np.abs(np.nan_to_num(moved[..., ALWAYS])) + 1
    moved[..., 5].flat[::7] = np.nan  # unit 5: some NaN samples, which count as 0
    return x


def expected_unit_ones(x: np.ndarray, unit_axis: int, at_zero: int = 1) -> np.ndarray:
    others = tuple(a for a in range(x.ndim) if a != unit_axis)
    return oracle(x, at_zero).sum(axis=others, dtype=np.int64)


@pytest.mark.parametrize("chunks", ["auto", (7, 16), (42, 8)], ids=["auto", "ragged-rows", "ragged-units"])
def test_stats_equal_numpys(tmp_path: Path, chunks: object) -> None:
    """Blocks cut across units and samples (every scheduler: tests/test_scheduler_contract.py)."""
    x = planted((45, 37), unit_axis=1)
    write_zarr(tmp_path / "s.zarr", x, (7, 8) if chunks != "auto" else (9, 37))
    report = relu_dask.run(tmp_path / "s.zarr", tmp_path / "out.zarr", stats=True, chunks=chunks)  # type: ignore[arg-type]
    (entry,) = report.arrays
    stats = entry.stats
    assert stats is not None
    ones = expected_unit_ones(x, 1)
    assert stats.unit_ones == ones.tolist()
    assert stats.dead_units == DEAD == np.flatnonzero(ones == 0).tolist()
    assert stats.always_on_units == ALWAYS
    assert (stats.num_units, stats.samples_per_unit, stats.unit_axis) == (37, 45, 1)
    assert entry.num_nans == int(np.isnan(x).sum())
    assert entry.num_zeros == int((x == 0).sum())
    assert entry.active_fraction == pytest.approx(oracle(x).mean(), abs=0)  # the same division, exactly


@pytest.mark.parametrize("at_zero", [0, 1])
def test_conv_activations_with_channels_as_units(tmp_path: Path, at_zero: int) -> None:
    x = planted((3, 40, 5, 6), unit_axis=1, dtype="float64")  # N, C, H, W: the channels are the units
    x[:, 7] = 0.0  # a unit that is exactly zero: dead under x > 0, always on under x >= 0
    write_zarr(tmp_path / "s.zarr", x, (2, 16, 5, 4))
    report = relu_dask.run(tmp_path / "s.zarr", tmp_path / "out.zarr", stats=True, unit_axis=1, at_zero=at_zero)
    stats = report.arrays[0].stats
    assert stats is not None
    ones = expected_unit_ones(x, 1, at_zero)
    assert stats.unit_ones == ones.tolist()
    assert (7 in stats.dead_units) == (at_zero == 0)
    assert (7 in stats.always_on_units) == (at_zero == 1)


def test_stats_of_masks_equal_the_same_pass(tmp_path: Path) -> None:
    x = planted((60, 33), unit_axis=1, seed=3)
    write_zarr(tmp_path / "g.zarr", x, (16, 16), name="layer1")
    write_zarr(tmp_path / "g.zarr", planted((20, 40), unit_axis=1, seed=4), (8, 8), name="layer2")
    same_pass = relu_dask.run(tmp_path / "g.zarr", tmp_path / "out.zarr", stats=True)
    proc = subprocess.run(
        [PYTHON, "-m", "relu_dask", "stats", str(tmp_path / "out.zarr"), "--report", str(tmp_path / "stats.json")],
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env(),
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "stats.json").read_text())
    for entry, array in zip(data["arrays"], same_pass.arrays):
        assert array.stats is not None
        assert entry["path"] == array.path
        assert entry["stats"]["unit_ones"] == array.stats.unit_ones
        assert entry["stats"]["dead_units"] == array.stats.dead_units
        assert entry["num_ones"] == array.num_ones
    assert "layer1: " in proc.stdout and f"{len(DEAD)} dead [2, 17, 30]" in proc.stdout
    assert "NaN and exact-zero counts need the source" in proc.stdout


def test_stats_on_a_job_completed_without_them(tmp_path: Path) -> None:
    x = planted((30, 36), unit_axis=1, seed=5)
    write_zarr(tmp_path / "s.zarr", x, (10, 12))
    relu_dask.run(tmp_path / "s.zarr", tmp_path / "out.zarr")
    again = relu_dask.run(tmp_path / "s.zarr", tmp_path / "out.zarr", stats=True)
    assert again.outcome == "already complete"
    stats = again.arrays[0].stats
    assert stats is not None and stats.unit_ones == expected_unit_ones(x, 1).tolist()


def test_summary_names_dead_and_always_on_units(tmp_path: Path) -> None:
    write_zarr(tmp_path / "s.zarr", planted((40, 32), unit_axis=1), (10, 32))
    proc = subprocess.run(
        [PYTHON, "-m", "relu_dask", "run", str(tmp_path / "s.zarr"), str(tmp_path / "o.zarr"), "--stats"],
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert "unit activity (mask = 1):" in proc.stdout
    assert "3 dead [2, 17, 30], 2 always on [0, 11]" in proc.stdout
    assert "least active live units:" in proc.stdout


def test_wide_layers_go_to_a_side_file(tmp_path: Path) -> None:
    units = MAX_INLINE_UNITS + 10
    x = np.full((2, units), 1.0, np.float32)
    x[:, 123] = -1.0
    write_zarr(tmp_path / "s.zarr", x, (2, 8192))
    relu_dask.run(tmp_path / "s.zarr", tmp_path / "out.zarr", stats=True, report_path=tmp_path / "r.json")
    entry = json.loads((tmp_path / "r.json").read_text())["arrays"][0]["stats"]
    assert "unit_ones" not in entry and entry["num_dead"] == 1
    with np.load(tmp_path / entry["units_file"]) as side:
        assert side["dead_units"].tolist() == [123]
        assert side["unit_ones"].shape == (units,) and side["unit_ones"].sum() == 2 * (units - 1)


@pytest.mark.parametrize("num_arrays", [2, 13], ids=["panels", "layer-summary"])
def test_plot_is_a_png(tmp_path: Path, num_arrays: int) -> None:
    for i in range(num_arrays):
        write_zarr(tmp_path / "g.zarr", planted((20, 32), unit_axis=1, seed=i), (10, 32), name=f"layer{i:02d}")
    relu_dask.run(tmp_path / "g.zarr", tmp_path / "out.zarr", plot_path=tmp_path / "units.png")
    data = (tmp_path / "units.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_bad_unit_axis_is_exit_2(tmp_path: Path) -> None:
    write_zarr(tmp_path / "s.zarr", activations((4, 4)), (4, 4))
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "relu_dask",
            "run",
            str(tmp_path / "s.zarr"),
            str(tmp_path / "o.zarr"),
            "--stats",
            "--unit-axis",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env(),
    )
    assert proc.returncode == 2
    assert "--unit-axis 2 is out of range" in proc.stderr
    assert not (tmp_path / "o.zarr").exists()


def test_summarize_units_edges() -> None:
    empty = summarize_units(np.zeros(0, np.int64), samples_per_unit=5, unit_axis=0)
    assert (empty.dead_units, empty.always_on_units, empty.least_active) == ([], [], [])
    no_samples = summarize_units(np.zeros(3, np.int64), samples_per_unit=0, unit_axis=1)
    assert no_samples.dead_units == [] and no_samples.always_on_units == []


@pytest.mark.parametrize("rows", [1, 32767, 32768, 70000])
def test_unit_sums_are_exact_in_whatever_type_they_use(rows: int) -> None:
    """A block's per-unit ones, summed in the narrowest type that cannot overflow."""
    from relu_dask.task import _sum_ones

    mask = np.ones((rows, 3), dtype=np.int8)
    mask[0, 1] = 0
    assert _sum_ones(mask, (0,)).tolist() == [rows, rows - 1, rows]


def test_stats_of_a_store_without_masks_is_refused(tmp_path: Path) -> None:
    """The activations themselves (SOURCE, not DEST): not 0 arrays and exit 0, but one line, exit 2."""
    write_zarr(tmp_path / "acts.zarr", activations((16, 8)), (8, 8), name="fc1")
    proc = cli("stats", str(tmp_path / "acts.zarr"))
    assert proc.returncode == 2
    assert "holds no int8 masks (fc1 float32): give the DEST of a relu-dask run" in proc.stderr


def _conv_and_dense(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    conv = planted((30, 32, 3, 2), unit_axis=1, seed=11)  # N, C, H, W: the channels are the units
    dense = planted((30, 32), unit_axis=1, seed=12)
    write_zarr(tmp_path / "g.zarr", conv, (10, 32, 3, 2), name="conv", dimension_names=("step", "channel", "h", "w"))
    write_zarr(tmp_path / "g.zarr", dense, (10, 32), name="fc1", dimension_names=("step", "unit"))
    return tmp_path / "g.zarr", conv, dense


def test_units_are_found_by_dimension_name(tmp_path: Path) -> None:
    """No option: a dimension named like the units (channel, unit, ...) gives the axis, so a
    conv layer's units are its channels, not its last spatial axis."""
    source, conv, dense = _conv_and_dense(tmp_path)
    report = relu_dask.run(source, tmp_path / "out.zarr", stats=True, scheduler="synchronous")
    stats = {a.path: a.stats for a in report.arrays}
    assert stats["conv"] is not None and stats["conv"].unit_axis == 1
    assert stats["conv"].unit_ones == np.count_nonzero(conv >= 0, axis=(0, 2, 3)).tolist()
    assert stats["fc1"] is not None and stats["fc1"].unit_ones == np.count_nonzero(dense >= 0, axis=0).tolist()
    by_number = relu_dask.run(source, tmp_path / "w.zarr", stats=True, unit_axis=-1, scheduler="synchronous")
    assert [a.stats.unit_axis for a in by_number.arrays if a.stats] == [3, 1]  # asked for: the last axis


def test_unit_dim_by_name_per_variable_and_its_refusals(tmp_path: Path) -> None:
    source, conv, _ = _conv_and_dense(tmp_path)
    args = ("run", str(source), str(tmp_path / "out.zarr"), "--stats", "--scheduler", "synchronous")
    proc = cli(*args, "--unit-dim", "channel")
    assert proc.returncode == 2 and "--unit-dim channel: fc1 has dimensions step, unit" in proc.stderr
    assert not (tmp_path / "out.zarr").exists()
    both = cli(*args, "--unit-dim", "channel", "--unit-axis", "1")
    assert both.returncode == 2 and "not both" in both.stderr
    report = tmp_path / "r.json"
    ok = cli(*args, "--unit-dim", "h,unit", "--report", str(report))  # h for conv, unit for fc1
    assert ok.returncode == 0, ok.stderr
    arrays = {a["path"]: a["stats"] for a in json.loads(report.read_text())["arrays"]}
    assert arrays["conv"]["unit_axis"] == 2 and arrays["fc1"]["unit_axis"] == 1
    assert arrays["conv"]["unit_ones"] == np.count_nonzero(conv >= 0, axis=(0, 1, 3)).tolist()
    later = cli("stats", str(tmp_path / "out.zarr"), "--unit-dim", "channel,unit", "--report", str(report))
    assert later.returncode == 0, later.stderr
    arrays = {a["path"]: a["stats"] for a in json.loads(report.read_text())["arrays"]}
    assert (
        arrays["conv"]["unit_axis"] == 1
        and arrays["conv"]["unit_ones"] == np.count_nonzero(conv >= 0, axis=(0, 2, 3)).tolist()
    )
