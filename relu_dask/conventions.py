"""xarray's and CF's conventions, read from a Zarr store's attributes and metadata.

Which arrays xarray reads as coordinates (:func:`coordinate_paths`), which data variables
hold stored numbers that are not their values (:func:`why_not_masked`), which coordinates
a Zarr v3 DEST can hold (:func:`why_not_copied`), what a mask keeps of its source's
attributes (:func:`mask_attributes`), and the labels of units (:func:`unit_labels`).
Nothing here opens a store: :mod:`relu_dask.storage` does, and asks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from relu_dask.storage import SourceArray

__all__ = [
    "ENCODING_ATTRIBUTES",
    "MEANING_ATTRIBUTES",
    "coordinate_paths",
    "fill_value_attribute",
    "is_nan",
    "is_text",
    "mask_attributes",
    "unit_labels",
    "why_not_copied",
    "why_not_masked",
]


def coordinate_paths(arrays: list[SourceArray], groups: dict[str, dict[str, Any]]) -> set[str]:
    """The arrays xarray reads as coordinates: dimension coordinates (1-D, named after their
    own dimension) and those a variable's or a group's ``coordinates`` attribute names.

    ``groups``: the attributes of each group by path (``""``: SOURCE's own).
    """
    # xarray names every dimension; a scalar has none to name (Zarr v3 writes no dimension_names)
    paths = {a.path for a in arrays if a.dimension_names is not None or not a.shape}
    found = set()
    for src in arrays:
        parent, _, leaf = src.path.rpartition("/")
        if len(src.shape) == 1 and src.dimension_names == (leaf,):
            found.add(src.path)
        found.update(_named(parent, src.array.attrs.get("coordinates"), paths))
    for group, attributes in groups.items():
        found.update(_named(group, attributes.get("coordinates"), paths))
    return found


def _named(group: str, names: Any, paths: set[str]) -> set[str]:
    """The arrays of ``group`` that a ``coordinates`` attribute (space-separated names) names."""
    if not isinstance(names, str):
        return set()
    return {p for p in (f"{group}/{n}" if group else n for n in names.split()) if p in paths}


#: CF attributes that say a variable's stored numbers are not its values.
_PACKED = ("scale_factor", "add_offset", "_Unsigned")


def why_not_masked(src: SourceArray) -> str:
    """Why the stored numbers of ``src`` are not the values xarray shows, or "" (plain).

    relu-dask masks what is stored. A packed variable (``scale_factor``, ``add_offset``) or
    one whose missing values are a number (``_FillValue``, ``missing_value``) would give
    masks that disagree with the decoded values; a CF time is not an activation.
    """
    attrs = src.array.attrs
    packed = [k for k in _PACKED if k in attrs]
    if packed:
        return f"stored packed ({', '.join(packed)}): its stored numbers are not its values; unpack it first"
    for key in ("_FillValue", "missing_value"):
        if key in attrs and not is_nan(attrs[key]):
            return f"its missing values are stored as {key} {attrs[key]!r}: write them as NaN first"
    fill = src.array.fill_value
    if src.zarr_format == 2 and "_ARRAY_DIMENSIONS" in attrs and fill is not None and not is_nan(fill):
        # xarray reads a v2 array's fill value as its missing value
        shown = fill.item() if isinstance(fill, np.generic) else fill
        return f"its missing values are stored as fill value {shown!r}: write them as NaN first"
    if " since " in str(attrs.get("units", "")):
        return f"a CF time ({attrs['units']}), not an activation"
    return ""


def is_nan(value: Any) -> bool:
    """Whether a ``_FillValue`` attribute is NaN (xarray writes floats in v3 as base64 of a float64)."""
    if isinstance(value, str):
        import base64
        import binascii

        try:
            raw = base64.standard_b64decode(value)
        except (binascii.Error, ValueError):
            return value.lower() == "nan"
        return len(raw) in (4, 8) and bool(np.isnan(np.frombuffer(raw, dtype="<f8" if len(raw) == 8 else "<f4")[0]))
    try:
        return bool(np.isnan(float(value)))
    except (TypeError, ValueError):
        return False


def why_not_copied(src: SourceArray) -> str:
    """Why the coordinate ``src`` cannot be copied into a Zarr v3 DEST, or "": numbers,
    booleans, dates and text are copied; raw bytes and other objects are not."""
    if is_text(src) or np.dtype(src.array.dtype).kind in "biufcmM":
        return ""
    return f"coordinate of dtype {src.array.dtype}: not copied (relu-dask copies numbers, dates and text)"


def is_text(src: SourceArray) -> bool:
    """Whether ``src`` holds text: fixed-width (``<U``), numpy's ``StringDType``, or objects
    that v2's ``vlen-utf8`` or v3's ``string`` say are text."""
    kind = np.dtype(src.array.dtype).kind
    if kind in "UT":
        return True
    if kind != "O":
        return False
    metadata = src.metadata or {}
    if metadata.get("zarr_format") == 3:
        return metadata.get("data_type") == "string"
    return any(isinstance(f, dict) and f.get("id") == "vlen-utf8" for f in metadata.get("filters") or [])


#: Attributes of a source array that say how to decode *its* values (CF encoding, xarray's
#: v2 dimension names): a mask that kept them would be decoded wrongly (a scale factor applied
#: to 0 and 1, 0 read as a fill value), so they are not copied to it.
ENCODING_ATTRIBUTES = frozenset(
    {
        "_ARRAY_DIMENSIONS",
        "_FillValue",
        "missing_value",
        "scale_factor",
        "add_offset",
        "_Unsigned",
        "valid_min",
        "valid_max",
        "valid_range",
        "dtype",
    }
)


#: Attributes that say what a source's *values* are (CF's ``long_name``, ``units``, ...): a
#: mask's values are something else, so they are not copied to it; it says what it is instead.
MEANING_ATTRIBUTES = frozenset(
    {
        "long_name",
        "standard_name",
        "units",
        "calendar",
        "cell_methods",
        "actual_range",
        "flag_values",
        "flag_masks",
        "flag_meanings",
        "ancillary_variables",
        "description",
    }
)


def mask_attributes(attributes: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The attributes of the mask of a source array named ``name`` with ``attributes``: the
    source's, less :data:`ENCODING_ATTRIBUTES` and :data:`MEANING_ATTRIBUTES`, and the mask's
    own CF description (``long_name``, ``flag_values``, ``flag_meanings``), all netCDF-safe.

    Examples
    --------
    >>> mask = mask_attributes({"long_name": "fc1 pre-activation", "units": "1", "layer": "fc1"}, "fc1")
    >>> mask["long_name"], mask["flag_meanings"], "units" in mask, mask["layer"]
    ('ReLU derivative mask of fc1 pre-activation', 'inactive active', False, 'fc1')
    """
    kept = {k: v for k, v in attributes.items() if k not in ENCODING_ATTRIBUTES and k not in MEANING_ATTRIBUTES}
    what = attributes.get("long_name") if isinstance(attributes.get("long_name"), str) else None
    return {
        **kept,
        "long_name": f"ReLU derivative mask of {what or name or 'the source'}",
        "flag_values": [0, 1],
        "flag_meanings": "inactive active",
    }


def unit_labels(src: SourceArray, axis: int, coordinates: Sequence[SourceArray]) -> list[str] | None:
    """The labels of ``src``'s units along ``axis``: the values of the dimension coordinate
    of that axis (in the same group), as text; None where there is none."""
    if src.dimension_names is None:
        return None
    parent = src.path.rpartition("/")[0]
    name = src.dimension_names[axis]
    path = f"{parent}/{name}" if parent else name
    for coordinate in coordinates:
        if coordinate.path == path and coordinate.shape == (src.shape[axis],):
            return [str(v) for v in np.asarray(coordinate.array[...]).tolist()]
    return None


def fill_value_attribute(value: Any, dtype: np.dtype) -> Any:
    """A fill value as xarray writes ``_FillValue`` for Zarr v3: a float as the base64 of
    its float64 bytes, anything else as it is."""
    if dtype.kind == "f":
        import base64

        return base64.standard_b64encode(np.float64(value).astype("<f8").tobytes()).decode("ascii")
    return value.item() if isinstance(value, np.generic) else value
