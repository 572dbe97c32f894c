"""xarray in, xarray out: relu_dask.xarray, and Datasets written by xarray through the CLI."""

from __future__ import annotations

import numpy as np
import pytest

import relu_dask.xarray as rx
from relu_dask.errors import InputError, NaNFoundError, UnsupportedDtypeError

xr = pytest.importorskip("xarray")
pd = pytest.importorskip("pandas")


def toy_dataset(seed: int = 0) -> xr.Dataset:
    """The issue's Dataset: two activations, dimension coordinates (int, str), a
    non-dimension int coordinate, a datetime coordinate, attributes; NaN and zeros inside."""
    rng = np.random.default_rng(seed)
    fc1 = rng.standard_normal((100, 64)).astype(np.float32)
    fc1[3, 5], fc1[7, :4] = np.nan, 0.0
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
