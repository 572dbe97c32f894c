"""xarray in, xarray out: the ReLU derivative masks of a DataArray or a Dataset, lazily.

>>> import numpy as np, xarray as xr
>>> acts = xr.DataArray(np.array([[-1.0, 0.0], [2.0, np.nan]]), dims=("step", "unit"),
...                     coords={"unit": ["u0", "u1"]}, name="fc1")
>>> derivative_mask(acts).values
array([[0, 1],
       [1, 0]], dtype=int8)

The same kernel and the same rules as ``relu-dask run`` (``at_zero``, the NaN policy);
coordinates, dimension names and attributes come through as they were. xarray is an
optional dependency: ``pip install 'relu-dask[xarray]'``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, overload

import numpy as np

from relu_dask.conventions import mask_attributes
from relu_dask.errors import InputError, UnsupportedDtypeError
from relu_dask.graph import derivative_mask as _dask_mask
from relu_dask.kernel import Engine, check_dtype, parse_at_zero, parse_nan_policy

if TYPE_CHECKING:
    import xarray as xr

__all__ = ["derivative_mask"]


@overload
def derivative_mask(
    obj: xr.DataArray, *, at_zero: int = 1, nan: str = "zero", engine: Engine = "numpy"
) -> xr.DataArray: ...
@overload
def derivative_mask(
    obj: xr.Dataset, *, at_zero: int = 1, nan: str = "zero", engine: Engine = "numpy"
) -> xr.Dataset: ...


def derivative_mask(
    obj: xr.DataArray | xr.Dataset, *, at_zero: int = 1, nan: str = "zero", engine: Engine = "numpy"
) -> xr.DataArray | xr.Dataset:
    """The int8 ReLU derivative masks of ``obj``, lazily (dask-backed), as the same kind of object.

    A DataArray gives its mask; a Dataset gives the masks of its real-numbered data
    variables (others are left out, as ``relu-dask run`` skips them), in the same order.
    Coordinates and the Dataset's attributes are kept as they were; each mask keeps its
    variable's attributes but those that say what its values are or how to decode them, and
    says what it is (:func:`relu_dask.conventions.mask_attributes`: ``long_name``,
    ``flag_values``, ``flag_meanings``), as ``relu-dask run`` writes them. Each mask's encoding
    is reset, so that ``to_zarr`` writes plain int8 rather than the source's scale factors or
    fill values.

    ``at_zero``: the mask at ``x == 0`` (1: rule ``x >= 0``; 0: rule ``x > 0``). ``nan``:
    ``"zero"`` (NaN gives 0) or ``"error"`` (computing a block holding NaN raises
    :class:`~relu_dask.errors.NaNFoundError`). In-memory data is wrapped in a dask array
    first (dask's ``"auto"`` chunks); dask-backed data keeps its chunks.
    """
    xr = _xarray()
    rule, policy = parse_at_zero(at_zero), parse_nan_policy(nan)
    if isinstance(obj, xr.DataArray):
        return _mask(obj, rule, policy, engine)
    if isinstance(obj, xr.Dataset):
        masks = {name: _mask(var, rule, policy, engine) for name, var in obj.data_vars.items() if _is_real(var)}
        return xr.Dataset(masks, coords=obj.coords, attrs=dict(obj.attrs))
    raise InputError(f"derivative_mask takes an xarray DataArray or Dataset, got {type(obj).__name__}")


def _mask(var: xr.DataArray, at_zero: int, nan: str, engine: Engine) -> xr.DataArray:
    import dask.array as da

    check_dtype(var.dtype, where=f"variable {var.name!r}" if var.name is not None else "the DataArray")
    data: Any = var.data
    darr = data if isinstance(data, da.Array) else da.from_array(np.asarray(data), chunks="auto")
    out = var.copy(data=_dask_mask(darr, at_zero=at_zero, engine=engine, nan=nan))
    out.attrs = mask_attributes(var.attrs, str(var.name) if var.name is not None else "")
    out.encoding = {}
    return out


def _is_real(var: xr.DataArray) -> bool:
    try:
        check_dtype(var.dtype)
    except UnsupportedDtypeError:
        return False
    return True


def _xarray() -> Any:
    try:
        import xarray
    except ImportError:
        raise InputError("relu_dask.xarray needs xarray: pip install 'relu-dask[xarray]'") from None
    return xarray
