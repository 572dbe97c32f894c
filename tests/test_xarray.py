"""xarray in, xarray out: relu_dask.xarray, and Datasets written by xarray through the CLI."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr
from _support import activations, cli, kill_at_step

import relu_dask
import relu_dask.xarray as rx
from relu_dask import journal, outputs
from relu_dask.errors import DestinationExistsError, InputError, NaNFoundError, UnsupportedDtypeError
from relu_dask.locations import parse_location

xr = pytest.importorskip("xarray")
pd = pytest.importorskip("pandas")


def toy_dataset(seed: int = 0) -> xr.Dataset:
    """The issue's Dataset: two activations, dimension coordinates (int, str), a
    non-dimension int coordinate, a datetime coordinate, attributes; NaN and zeros inside."""
    rng = np.random.default_rng(seed)
    fc1 = rng.standard_normal((100, 64)).astype(np.float32)
    fc1[3, 5], fc1[7, :4] = np.nan, 0.0
    fc1[:, 17] = -np.abs(fc1[:, 17]) - 1  # a dead unit
    fc1[:, 40] = np.abs(np.nan_to_num(fc1[:, 40]))  # an always-on unit
    conv = rng.standard_normal((100, 8, 4, 4)).astype(np.float32)
    conv[:, 2] = np.abs(conv[:, 2])  # an always-on channel
    ds = xr.Dataset(
        {"fc1": (("step", "unit"), fc1, {"layer": "fc1"}), "conv": (("step", "channel", "h", "w"), conv)},
        coords={
            "step": np.arange(100) * 10,
            "unit": [f"u{i}" for i in range(64)],
            "epoch": ("step", np.repeat(np.arange(10), 10)),
            "time": ("step", pd.date_range("2026-01-01", periods=100, freq="h")),
        },
        attrs={"model": "toy"},
    )
    return ds


def oracle(ds: xr.Dataset, at_zero: int = 1) -> xr.Dataset:
    """numpy's masks of the data variables, with the Dataset's coordinates and attributes."""
    masks = {
        name: var.copy(data=((var.values >= 0) if at_zero else (var.values > 0)).astype(np.int8))
        for name, var in ds.data_vars.items()
    }
    for name, mask in masks.items():  # what a mask says it is
        mask.attrs.update(
            long_name=f"ReLU derivative mask of {name}", flag_values=[0, 1], flag_meanings="inactive active"
        )
    return xr.Dataset(masks, coords=ds.coords, attrs=ds.attrs)


@pytest.mark.parametrize("at_zero", [1, 0])
def test_a_dataset_gives_its_masks_lazily_with_coordinates_and_attributes(at_zero: int) -> None:
    ds = toy_dataset()
    masks = rx.derivative_mask(ds, at_zero=at_zero)
    assert isinstance(masks, xr.Dataset)
    assert list(masks.data_vars) == list(ds.data_vars)
    assert all(masks[name].chunks is not None for name in masks.data_vars)  # dask-backed: nothing computed yet
    xr.testing.assert_identical(masks.compute(), oracle(ds, at_zero))
    assert all(masks[n].dtype == np.int8 and masks[n].encoding == {} for n in masks.data_vars)


def test_a_dask_backed_dataarray_keeps_its_chunks_and_name() -> None:
    acts = toy_dataset()["fc1"].chunk({"step": 30, "unit": 16})
    mask = rx.derivative_mask(acts)
    assert isinstance(mask, xr.DataArray) and mask.name == "fc1"
    assert mask.chunks == acts.chunks
    xr.testing.assert_identical(mask.compute(), oracle(toy_dataset())["fc1"])


def test_non_real_data_variables_are_left_out_and_rules_hold() -> None:
    ds = toy_dataset().assign(label=("step", np.array(["a"] * 100)))
    assert list(rx.derivative_mask(ds).data_vars) == ["fc1", "conv"]
    with pytest.raises(UnsupportedDtypeError):
        rx.derivative_mask(ds["label"])
    with pytest.raises(NaNFoundError, match="holds NaN"):
        rx.derivative_mask(ds["fc1"], nan="error").compute()
    with pytest.raises(InputError, match="DataArray or Dataset"):
        rx.derivative_mask(np.zeros(3))  # type: ignore[call-overload]


def _write(ds: xr.Dataset, path: Path, zarr_format: int, mode: str = "w-") -> None:
    """``ds.to_zarr``, as a user would (zarr warns that v3 fixed-width text is not in the spec yet)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.to_zarr(path, zarr_format=zarr_format, mode=mode)


def _opened(path: Path) -> xr.Dataset:
    """A source written by xarray, opened as a user would."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return xr.open_zarr(path).compute()


def _open_quietly(path: Path) -> xr.Dataset:
    """``xr.open_zarr``, failing on any warning (a missing consolidated metadata warns)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return xr.open_zarr(path).compute()


def _chunk_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_a_dataset_written_by_xarray_comes_out_with_its_coordinates_and_attributes(
    tmp_path: Path, zarr_format: int
) -> None:
    ds = toy_dataset()
    source, dest = tmp_path / "acts.zarr", tmp_path / "masks.zarr"
    _write(ds, source, zarr_format)
    report = relu_dask.run(source, dest, stats=True, scheduler="synchronous", report_path=tmp_path / "r.json")

    assert sorted(a.path for a in report.arrays) == ["conv", "fc1"]  # epoch and time are not masked
    assert sorted(report.coordinates) == ["epoch", "step", "time", "unit"] and report.skipped == []
    masks, opened = _open_quietly(dest), _opened(source)
    assert list(masks.data_vars) == list(opened.data_vars)
    xr.testing.assert_equal(masks, (opened >= 0).astype(np.int8))
    for name in ("fc1", "conv"):  # bit for bit, with numpy's oracle
        got = masks[name].values
        assert got.dtype == np.int8 and np.array_equal(got, (ds[name].values >= 0).astype(np.int8)), name
    for name in opened.coords:
        xr.testing.assert_identical(masks[name], opened[name])
        stored, copied = zarr.open_array(source / name, mode="r"), zarr.open_array(dest / name, mode="r")
        assert copied.chunks == stored.chunks and copied.metadata.dimension_names == opened[name].dims
        assert copied.dtype == stored.dtype, name  # text too: <U stays fixed-width
        assert masks[name].dtype == opened[name].dtype, name
        assert np.asarray(copied[...]).tobytes() == np.asarray(stored[...]).tobytes(), name
        if zarr_format == 3:  # the same codecs: the same chunk files, byte for byte
            files = {k: v for k, v in _chunk_files(source / name).items() if k != "zarr.json"}
            assert files == {k: v for k, v in _chunk_files(dest / name).items() if k != "zarr.json"}, name
    assert masks.attrs["model"] == "toy" and "relu_dask_source" in masks.attrs
    assert masks.fc1.attrs["layer"] == "fc1" and "_FillValue" not in zarr.open_array(dest / "fc1").attrs
    assert masks.fc1.dims == ("step", "unit") and masks.conv.dims == ("step", "channel", "h", "w")
    assert outputs.is_consolidated(parse_location(dest))

    fc1 = next(a for a in report.arrays if a.path == "fc1").stats
    assert fc1 is not None and fc1.unit_labels == [f"u{i}" for i in range(64)]
    assert fc1.dead_units == [17] and fc1.always_on_units == [40]
    saved = next(a for a in json.loads((tmp_path / "r.json").read_text())["arrays"] if a["path"] == "fc1")
    assert saved["stats"]["dead_unit_labels"] == ["u17"] and saved["stats"]["always_on_unit_labels"] == ["u40"]
    summary = "\n".join(relu_dask.report.render_summary(report))
    assert "1 dead [u17 (#17)], 1 always on [u40 (#40)]" in summary

    xr.testing.assert_equal(rx.derivative_mask(opened).compute(), masks)  # the Python API: the same masks
    xr.testing.assert_equal(rx.derivative_mask(opened["fc1"]).compute(), masks["fc1"])


def test_stats_of_masks_name_units_by_label_and_a_changed_coordinate_is_refused(tmp_path: Path) -> None:
    source, dest = tmp_path / "acts.zarr", tmp_path / "masks.zarr"
    _write(toy_dataset(), source, 3)
    relu_dask.run(source, dest, scheduler="synchronous")
    stats = relu_dask.stats_of_masks(dest)
    fc1 = next(a for a in stats.arrays if a.path == "fc1").stats
    assert fc1 is not None and fc1.unit_labels is not None and fc1.dead_units == [17]
    assert [a.path for a in stats.arrays] == ["conv", "fc1"] and stats.skipped == []
    assert relu_dask.run(source, dest, scheduler="synchronous").outcome == "already complete"
    relabelled = toy_dataset().assign_coords(unit=[f"n{i}" for i in range(64)])
    _write(relabelled, source, 3, mode="w")
    with pytest.raises(DestinationExistsError, match=r"fc1 changed \(its chunk c/0/0 was rewritten"):
        relu_dask.run(source, dest, scheduler="synchronous")
    with pytest.raises(DestinationExistsError, match="its coordinates changed"):  # without growth, said too
        relu_dask.run(source, dest, scheduler="synchronous", append_axis=None)


def test_a_partial_dest_is_never_consolidated(tmp_path: Path) -> None:
    source, dest = tmp_path / "acts.zarr", tmp_path / "masks.zarr"
    _write(toy_dataset(), source, 2)
    args = ("run", str(source), str(dest), "--scheduler", "synchronous", "--progress", "none")
    where = parse_location(dest)
    kill_at_step("tasks-done", *args)  # a first run, killed before it completed
    assert dest.exists() and not outputs.is_consolidated(where)
    assert cli(*args).returncode == 0 and outputs.is_consolidated(where)
    shutil.rmtree(dest / "fc1")  # a complete DEST loses an array: the next run redoes it
    kill_at_step("outputs-created", *args)
    assert not outputs.is_consolidated(where)  # dropped before anything changed
    kill_at_step("complete", *args)  # complete, but killed before consolidating
    assert not outputs.is_consolidated(where)
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert outputs.is_consolidated(where)
    xr.testing.assert_equal(_open_quietly(dest), (_opened(source) >= 0).astype(np.int8))


def test_what_cannot_be_masked_or_copied_as_it_is_is_said_and_missing_values_survive(tmp_path: Path) -> None:
    ds = toy_dataset()
    ds["packed"] = ds["fc1"].copy()
    ds["packed"].encoding = {"dtype": "int16", "scale_factor": 0.1, "add_offset": -5.0, "_FillValue": -32768}
    ds["sentinel"] = ds["fc1"].copy()
    ds["sentinel"].encoding = {"_FillValue": 9.97e36}
    ds["stamp"] = ("step", pd.date_range("2025-01-01", periods=100, freq="D"))  # a CF time data variable
    lr = np.linspace(0.1, 1.0, 100)
    lr[5] = np.nan
    ds = ds.assign_coords(lr=("step", lr), tag=("step", np.array([b"x"] * 100, dtype=object)))
    ds["lr"].encoding = {"_FillValue": -999.0}
    source, dest = tmp_path / "acts.zarr", tmp_path / "masks.zarr"
    _write(ds, source, 2)
    report = relu_dask.run(source, dest, scheduler="synchronous")
    reasons = {s["path"]: s["reason"] for s in report.skipped}
    assert set(reasons) == {"packed", "sentinel", "stamp", "tag"}
    assert "stored packed" in reasons["packed"] and "missing values are stored as" in reasons["sentinel"]
    assert "CF time" in reasons["stamp"] and "not copied" in reasons["tag"]
    assert sorted(a.path for a in report.arrays) == ["conv", "fc1"]
    masks = _open_quietly(dest)
    assert np.isnan(masks["lr"].values[5]) and masks["lr"].values[4] == pytest.approx(lr[4])  # -999 read as missing
    expected = (_opened(source)[["fc1", "conv"]] >= 0).astype(np.int8).drop_vars("tag")  # tag: not copied
    xr.testing.assert_equal(masks[["fc1", "conv"]], expected)


def test_subgroups_keep_their_attributes_and_coordinates(tmp_path: Path) -> None:
    source, dest = tmp_path / "tree.zarr", tmp_path / "masks.zarr"
    layer = toy_dataset().drop_vars("conv").assign_attrs(layer="dense")
    _write(xr.Dataset(attrs={"model": "toy"}), source, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.to_zarr(source, group="layer1", zarr_format=3, mode="a")
    relu_dask.run(source, dest, scheduler="synchronous")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masks = xr.open_zarr(dest, group="layer1").compute()
    assert masks.attrs["layer"] == "dense"
    assert set(masks.coords) == {"step", "unit", "epoch", "time"} and list(masks.data_vars) == ["fc1"]
    assert np.array_equal(masks["fc1"].values, (layer["fc1"].values >= 0).astype(np.int8))


def test_a_dest_whose_arrays_are_now_coordinates_is_refused_with_the_reason(tmp_path: Path) -> None:
    source, dest = tmp_path / "acts.zarr", tmp_path / "masks.zarr"
    _write(toy_dataset(), source, 3)
    relu_dask.run(source, dest, scheduler="synchronous")
    record = journal.read_record(parse_location(dest))
    assert record is not None
    old = dict(record.fingerprint)  # as an earlier relu-dask recorded it: epoch masked as an array
    old["arrays"] = [*old["arrays"], {"path": "epoch"}]
    old.pop("coordinates")
    journal.write_record(parse_location(dest), dataclasses.replace(record, fingerprint=old))
    with pytest.raises(DestinationExistsError, match="epoch is now read as xarray's coordinate"):
        relu_dask.run(source, dest, scheduler="synchronous")


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_a_scalar_coordinate_is_copied_never_masked_also_after_an_append(tmp_path: Path, zarr_format: int) -> None:
    """``layer_index`` (0-d, named by fc1's ``coordinates``): Zarr v3 gives a scalar no
    dimension names, and it was masked as a data variable."""
    x = activations((24, 4), seed=40)
    source, dest = tmp_path / "acts.zarr", tmp_path / "masks.zarr"

    def dataset(start: int, stop: int) -> xr.Dataset:
        return xr.Dataset(
            {"fc1": (("step", "unit"), x[start:stop])}, coords={"step": np.arange(start, stop), "layer_index": 3}
        )

    dataset(0, 16).to_zarr(source, zarr_format=zarr_format, consolidated=False, encoding={"fc1": {"chunks": (8, 4)}})
    for stop in (16, 24):
        if stop == 24:
            dataset(16, 24).to_zarr(source, append_dim="step", consolidated=False)
        report = relu_dask.run(source, dest)
        assert [a.path for a in report.arrays] == ["fc1"]
        assert "layer_index" in report.coordinates
        masks = xr.open_zarr(dest)
        assert masks["layer_index"].dtype == np.int64 and int(masks["layer_index"]) == 3
        xr.testing.assert_equal(masks, (xr.open_zarr(source, consolidated=False) >= 0).astype("int8"))


def test_masks_say_what_they_are_and_go_on_to_netcdf(tmp_path: Path) -> None:
    """The provenance is flat (strings and numbers, as netCDF holds them); a mask keeps the
    source's own attributes but not those that say what the source's values are, and says
    what it is (CF: long_name, flag_values, flag_meanings)."""
    pytest.importorskip("h5netcdf")
    ds = toy_dataset()
    ds["fc1"].attrs.update(long_name="fc1 pre-activation", units="1", standard_name="pre_activation")
    source, dest = tmp_path / "acts.zarr", tmp_path / "masks.zarr"
    _write(ds, source, 3)
    relu_dask.run(source, dest, scheduler="synchronous")
    masks = _open_quietly(dest)
    fc1 = masks.fc1.attrs
    assert fc1["long_name"] == "ReLU derivative mask of fc1 pre-activation" and fc1["layer"] == "fc1"
    assert list(fc1["flag_values"]) == [0, 1] and fc1["flag_meanings"] == "inactive active"
    assert "units" not in fc1 and "standard_name" not in fc1
    assert masks.conv.attrs["long_name"] == "ReLU derivative mask of conv"
    assert masks.attrs["relu_dask_rule"] == "x >= 0" and masks.attrs["relu_dask_source"] == str(source.resolve())
    assert all(isinstance(v, str | int | float | list) for v in [*masks.attrs.values(), *fc1.values()])
    masks.to_netcdf(tmp_path / "masks.nc", engine="h5netcdf")
    back = xr.open_dataset(tmp_path / "masks.nc", engine="h5netcdf").load()
    xr.testing.assert_equal(back[["fc1", "conv"]], masks[["fc1", "conv"]])
    assert back.fc1.attrs["flag_meanings"] == "inactive active"
    lazy = rx.derivative_mask(ds)  # the same attributes from Python, less the provenance of a run
    assert lazy.fc1.attrs == {k: v for k, v in fc1.items() if not k.startswith("relu_dask_")} | {"flag_values": [0, 1]}
