"""Shared plumbing of the metrics: input checks, which dims to reduce, Dataset mapping, attrs.

Why one place: every metric must refuse the same bad inputs the same way. xarray would otherwise
"help" silently -- arithmetic between arrays on different grids inner-joins the coordinates and
scores only the overlap, and NaNs are skipped by means -- so a score could be computed on the wrong
points without anyone noticing. Here mismatched coordinates and NaNs raise
:class:`~wpeft.errors.DataError` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, Literal

import numpy as np
import xarray as xr

from wpeft.errors import DataError
from wpeft.metrics.weights import latitude_weights

#: ``None`` (the default set), ``"all"``, one dim name, or a list of dim names.
Dims = Literal["all"] | str | Sequence[str] | None

#: Dims a score reduces when neither ``reduce_dims`` nor ``preserve_dims`` is given.
DEFAULT_REDUCE: tuple[str, ...] = ("time", "latitude", "longitude")
SPATIAL: tuple[str, ...] = ("latitude", "longitude")

_COORD_ATOL = 1e-6  # degrees; grids closer than this are the same grid


def _as_list(dims: str | Sequence[str]) -> list[str]:
    return [dims] if isinstance(dims, str) else list(dims)


def resolve_reduce_dims(
    dims: Iterable[Hashable],
    reduce_dims: Dims,
    preserve_dims: Dims,
    *,
    exclude: Iterable[Hashable] = (),
) -> list[str]:
    """The dims to reduce, from ``scores``-style ``reduce_dims`` / ``preserve_dims``.

    ``dims`` are the data's dims (forecast and observed together); ``exclude`` (e.g. ``member``) are
    consumed by the metric itself and are never reduced or preserved. Default: the members of
    :data:`DEFAULT_REDUCE` present (time, latitude, longitude; ``level`` is kept).
    """
    excluded = {str(d) for d in exclude}
    available = [str(d) for d in dict.fromkeys(dims) if str(d) not in excluded]
    if reduce_dims is not None and preserve_dims is not None:
        raise DataError("Give reduce_dims or preserve_dims, not both.")
    if preserve_dims is not None:
        keep = available if preserve_dims == "all" else _as_list(preserve_dims)
        _check_known(keep, available, "preserve_dims")
        return [d for d in available if d not in keep]
    if reduce_dims is None:
        return [d for d in DEFAULT_REDUCE if d in available]
    if reduce_dims == "all":
        return available
    reduce = _as_list(reduce_dims)
    _check_known(reduce, available, "reduce_dims")
    return list(dict.fromkeys(reduce))


def _check_known(requested: list[str], available: list[str], arg: str) -> None:
    unknown = [d for d in requested if d not in available]
    if unknown:
        raise DataError(f"{arg} names dim(s) {unknown} that the data lacks; it has {available}.")


def scores_dims(reduce: list[str]) -> dict[str, Any]:
    """Keyword arguments telling a ``scores`` function to reduce exactly ``reduce``."""
    return {"reduce_dims": reduce} if reduce else {"preserve_dims": "all"}


def lat_weights_for(da: xr.DataArray, reduce: list[str], weighted: bool) -> xr.DataArray | None:
    """Latitude weights when ``weighted`` and ``latitude`` is reduced, else None.

    Weights are constant along every other dim, so reductions that keep latitude (e.g. the
    per-grid-point field, reduced over time only) are the same with or without them.
    """
    if not weighted or "latitude" not in reduce:
        return None
    if "latitude" not in da.coords:
        raise DataError("Latitude weighting needs a 'latitude' coordinate; pass weighted=False.")
    return latitude_weights(da["latitude"])


def as_dataarray(x: Any, name: str) -> xr.DataArray:
    """``x`` as a DataArray: DataArrays pass, Python/NumPy scalars are wrapped, others refused."""
    if isinstance(x, xr.DataArray):
        return x
    if np.ndim(x) == 0 and isinstance(x, (int, float, np.number)):
        return xr.DataArray(float(x))
    raise DataError(
        f"{name} must be an xarray DataArray (or a number); got {type(x).__name__}. "
        "Wrap NumPy arrays in xr.DataArray with the schema's dims."
    )


def check_finite(da: xr.DataArray, name: str) -> None:
    """Raise if ``da`` holds NaN or infinite values (dask arrays are computed for this)."""
    bad = int((~np.isfinite(da)).sum())
    if bad:
        raise DataError(
            f"{name} ({da.name or 'unnamed'}) has {bad} NaN/infinite value(s) of {da.size}; "
            "fill or drop them before scoring (metrics never skip missing values silently)."
        )


def check_same_coords(a: xr.DataArray, b: xr.DataArray, a_name: str, b_name: str) -> None:
    """Raise unless ``a`` and ``b`` agree on every dim they share (grid, times, levels).

    Float coordinates (latitude, longitude, level) must agree to 1e-6; others exactly. A dim with
    coordinates on one side only is refused too, since xarray could not align it.
    """
    for dim in set(a.dims) & set(b.dims):
        if a.sizes[dim] != b.sizes[dim]:
            raise DataError(
                f"{a_name} and {b_name} differ along {dim!r}: {a.sizes[dim]} vs {b.sizes[dim]} "
                f"points. {_grid_hint(dim)}"
            )
        has_a, has_b = dim in a.coords, dim in b.coords
        if has_a != has_b:
            raise DataError(
                f"Only one of {a_name} and {b_name} has a {dim!r} coordinate; give both one."
            )
        if not has_a:
            continue
        va, vb = np.asarray(a[dim].values), np.asarray(b[dim].values)
        if np.issubdtype(va.dtype, np.number) and np.issubdtype(vb.dtype, np.number):
            same = np.allclose(
                va.astype(np.float64), vb.astype(np.float64), rtol=0, atol=_COORD_ATOL
            )
        else:
            same = np.array_equal(va, vb)
        if not same:
            raise DataError(
                f"{a_name} and {b_name} have different {dim!r} coordinates "
                f"({_describe(va)} vs {_describe(vb)}). {_grid_hint(dim)}"
            )


def _describe(values: np.ndarray) -> str:
    if values.size <= 4:
        return str(values.tolist())
    return f"{values.size} values {values[0]} .. {values[-1]}"


def _grid_hint(dim: str) -> str:
    if dim in SPATIAL:
        return "Regrid one onto the other's grid (wpeft.data.regrid) before scoring."
    return f"Select matching {dim} values (e.g. with .sel) before scoring."


def check_inputs(
    arrays: Sequence[tuple[xr.DataArray, str]],
    *,
    finite: Sequence[str] | None = None,
) -> None:
    """Check every pair of arrays for matching coordinates, and the named ones for NaNs.

    Args:
        arrays: ``(array, role)`` pairs, e.g. ``[(forecast, "forecast"), (observed, "observed")]``.
        finite: Roles that must be NaN-free; default all of them.
    """
    for i, (a, a_name) in enumerate(arrays):
        for b, b_name in arrays[i + 1 :]:
            check_same_coords(a, b, a_name, b_name)
    for da, role in arrays:
        if finite is None or role in finite:
            check_finite(da, role)


def describe_variable(da: xr.DataArray) -> str:
    """What a variable is, for a metric's long_name: its long_name, name, or 'field'."""
    return str(da.attrs.get("long_name") or da.name or "field")


def annotate(
    result: xr.DataArray, source: xr.DataArray, metric: str, units: str | None
) -> xr.DataArray:
    """Name ``result`` after ``source``; long_name ``"<metric> of <variable>"``; units."""
    attrs: dict[str, str] = {"long_name": f"{metric} of {describe_variable(source)}"}
    if units is not None:
        attrs["units"] = units
    result = result.copy()
    result.attrs = attrs
    result.name = source.name
    return result


def per_variable(
    func: Callable[..., xr.DataArray], arrays: Sequence[Any], **kwargs: Any
) -> xr.Dataset:
    """Apply ``func`` to each data variable of the Dataset ``arrays[0]``.

    Other arguments that are Datasets are indexed by the same variable name (they must have it);
    DataArrays and numbers are shared by every variable.
    """
    ref = arrays[0]
    names = list(ref.data_vars)
    for other in arrays[1:]:
        if isinstance(other, xr.Dataset):
            missing = [n for n in names if n not in other.data_vars]
            if missing:
                raise DataError(
                    f"Datasets do not hold the same variables: {missing} missing from one of them "
                    f"(it has {sorted(map(str, other.data_vars))})."
                )
    out = {
        name: func(*(a[name] if isinstance(a, xr.Dataset) else a for a in arrays), **kwargs)
        for name in names
    }
    return xr.Dataset(out)


def dispatch(func: Callable[..., Any], arrays: Sequence[Any], **kwargs: Any) -> Any | None:
    """If the first of ``arrays`` is a Dataset, the per-variable result; else None.

    Raises when a later argument is a Dataset but the first is not (an ambiguous mix).
    """
    if isinstance(arrays[0], xr.Dataset):
        return per_variable(func, arrays, **kwargs)
    if any(isinstance(a, xr.Dataset) for a in arrays[1:]):
        raise DataError(
            "Mixed Dataset and DataArray inputs: pass a Dataset first (scored per variable) or "
            "DataArrays throughout."
        )
    return None
