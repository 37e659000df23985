"""Regridding between regular, cell-centred latitude/longitude grids.

Why this module exists: the embedded world is generated on one fine grid and the tasks need the
same fields on coarser (pretraining, coarse-to-fine downscaling) and finer grids. Two operations
cover that:

* :func:`coarsen_conservative` -- an area-weighted block mean, which for regular cell-centred grids
  is exactly first-order conservative remapping (as used for the WeatherBench regridding): the
  area-weighted global mean, and every coarse cell's area-weighted content, are preserved.
* :func:`upsample_bilinear` -- bilinear interpolation onto a finer grid, periodic in longitude on a
  global grid (clamped at the edge columns of a regional one) and clamped to the edge cells in
  latitude, used as the classic baseline of the downscaling task.

Grids follow :mod:`wpeft.data.schema`: latitude strictly decreasing, longitude increasing in
``[0, 360)``. Cells are centred on the coordinates; a cell centred at ``lat`` with height ``dlat``
covers ``[lat - dlat/2, lat + dlat/2]`` and its area is proportional to the difference of the
sines of those edges.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr

from wpeft.errors import DataError

__all__ = [
    "BilinearPlan",
    "bilinear_plan",
    "cell_area_weights",
    "coarsen_conservative",
    "covers_circle",
    "upsample_bilinear",
]

_LAT, _LON = "latitude", "longitude"


def _regular_spacing(values: np.ndarray, name: str) -> float:
    """The constant spacing of a regular 1-D coordinate (absolute value), or a DataError."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        raise DataError(
            f"Cannot infer the {name} spacing from {values.size} point(s); pass it explicitly."
        )
    steps = np.diff(values)
    step = float(np.mean(steps))
    if not np.allclose(steps, step, rtol=1e-4, atol=1e-6):
        raise DataError(
            f"{name} is not regularly spaced (steps range {steps.min():.6g}..{steps.max():.6g}); "
            "conservative block coarsening needs a regular cell-centred grid. Regrid it first."
        )
    return abs(step)


def cell_area_weights(lat: np.ndarray, dlat: float | None = None) -> np.ndarray:
    """Relative areas of the cells of a regular cell-centred grid, one per latitude.

    The cell centred at ``lat`` spans ``[lat - dlat/2, lat + dlat/2]`` (clipped to the poles); its
    area per unit longitude is proportional to ``sin(lat + dlat/2) - sin(lat - dlat/2)``.

    Args:
        lat: Cell-centre latitudes in degrees, shape ``(H,)``, any order.
        dlat: Cell height in degrees; inferred from the (regular) spacing of ``lat`` when None.

    Returns:
        Weights of shape ``(H,)``, normalised to mean 1 (so ``(w * x).mean()`` is an area mean).
    """
    lat = np.asarray(lat, dtype=np.float64)
    if dlat is None:
        dlat = _regular_spacing(lat, "latitude")
    if not dlat > 0:
        raise DataError(f"dlat must be positive, got {dlat}.")
    upper = np.deg2rad(np.clip(lat + dlat / 2.0, -90.0, 90.0))
    lower = np.deg2rad(np.clip(lat - dlat / 2.0, -90.0, 90.0))
    weights = np.sin(upper) - np.sin(lower)
    if np.any(weights <= 0):
        raise DataError(f"Latitudes {lat} with dlat={dlat} give cells of zero area.")
    return weights / weights.mean()


def _check_latlon(ds: xr.Dataset, what: str) -> None:
    for coord in (_LAT, _LON):
        if coord not in ds.coords:
            raise DataError(
                f"{what}: dataset has no {coord!r} coordinate "
                f"(coords: {sorted(map(str, ds.coords))})."
            )


def _majority_block(values: np.ndarray, weights: np.ndarray, factor: int) -> np.ndarray:
    """Area-weighted majority category per ``factor x factor`` block.

    Args:
        values: Categories, shape ``(..., H, W)``.
        weights: Cell areas, shape ``(H, 1)``.
    Returns:
        Shape ``(..., H // factor, W // factor)``; ties go to the smallest category.
    """
    cats = np.unique(values[np.isfinite(values)])
    h, w = values.shape[-2:]
    shape = values.shape[:-2] + (h // factor, factor, w // factor, factor)
    wb = np.broadcast_to(weights, (h, w)).reshape(h // factor, factor, w // factor, factor)
    best = np.full(values.shape[:-2] + (h // factor, w // factor), np.nan)
    best_score = np.full(best.shape, -1.0)
    blocks = values.reshape(shape)
    for cat in cats:
        score = np.where(blocks == cat, wb, 0.0).sum(axis=(-3, -1))
        better = score > best_score
        best = np.where(better, cat, best)
        best_score = np.where(better, score, best_score)
    return best


def coarsen_conservative(ds: xr.Dataset, factor: int) -> xr.Dataset:
    """Area-weighted ``factor x factor`` block mean of every latitude/longitude variable.

    For a regular cell-centred grid the coarse cell is exactly the union of its ``factor**2`` fine
    cells, so the area-weighted mean is first-order conservative remapping: each coarse value is
    the coarse cell's area mean and the global area-weighted mean is preserved (up to float
    rounding). NaNs are skipped (the mean is over the valid fine cells of a block). Variables with
    a ``flag_values`` attribute (categorical, e.g. ``soil_type``) get the area-weighted majority
    category instead of a meaningless mean; those are computed eagerly (they are small statics).
    The result is lazy (dask) if the input is; variables without both horizontal dims and all
    attributes are kept. New coordinates are the centres of the coarse cells.

    Args:
        ds: Dataset on a regular cell-centred grid, e.g. variables ``(T, H, W)``/``(T, L, H, W)``.
        factor: Block size; must divide both the latitude and longitude sizes.

    Returns:
        Dataset with ``H // factor`` latitudes and ``W // factor`` longitudes, same dtypes.
    """
    _check_latlon(ds, "coarsen_conservative")
    if not isinstance(factor, (int, np.integer)) or isinstance(factor, bool) or factor < 1:
        raise DataError(f"coarsen factor must be a positive integer, got {factor!r}.")
    factor = int(factor)
    nlat, nlon = ds.sizes[_LAT], ds.sizes[_LON]
    if nlat % factor or nlon % factor:
        raise DataError(
            f"Grid {nlat} x {nlon} (latitude x longitude) is not divisible by the coarsen factor "
            f"{factor}; choose a factor that divides both sizes."
        )
    if factor == 1:
        return ds.copy()
    # factor >= 2 divides both sizes here, so both axes have at least two points
    lat = np.asarray(ds[_LAT].values, dtype=np.float64)
    _regular_spacing(np.asarray(ds[_LON].values, dtype=np.float64), "longitude")
    weights = xr.DataArray(cell_area_weights(lat), dims=_LAT)

    new_lat = lat.reshape(-1, factor).mean(axis=1)
    new_lon = np.asarray(ds[_LON].values, dtype=np.float64).reshape(-1, factor).mean(axis=1)
    window = {_LAT: factor, _LON: factor}

    out_vars: dict[str, xr.DataArray] = {}
    for name, da in ds.data_vars.items():
        if _LAT not in da.dims or _LON not in da.dims:
            out_vars[str(name)] = da
            continue
        if "flag_values" in da.attrs:
            order = [d for d in da.dims if d not in (_LAT, _LON)] + [_LAT, _LON]
            values = np.asarray(da.transpose(*order).values, dtype=np.float64)
            coarse = _majority_block(values, weights.values[:, None], factor)
            res = xr.DataArray(coarse.astype(da.dtype), dims=order).transpose(*da.dims)
        else:
            valid = da.notnull()
            num = (da.fillna(0) * weights).coarsen(window).sum()
            den = (valid * weights).coarsen(window).sum()
            res = (num / den).astype(da.dtype)
        res = res.drop_vars([c for c in res.coords if c in (_LAT, _LON)], errors="ignore")
        res.attrs = dict(da.attrs)
        res.encoding = {}
        out_vars[str(name)] = res

    coords = {k: v for k, v in ds.coords.items() if _LAT not in v.dims and _LON not in v.dims}
    coords[_LAT] = xr.DataArray(new_lat.astype(ds[_LAT].dtype), dims=_LAT, attrs=ds[_LAT].attrs)
    coords[_LON] = xr.DataArray(new_lon.astype(ds[_LON].dtype), dims=_LON, attrs=ds[_LON].attrs)
    out = xr.Dataset(out_vars, coords=coords, attrs=dict(ds.attrs))
    return out


def _interp_indices(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bracketing indices and weight for linear interpolation of ``dst`` in increasing ``src``.

    Points outside ``[src[0], src[-1]]`` are clamped to the edge values. Returns ``(i0, i1, w)``
    with ``value = (1 - w) * f[i0] + w * f[i1]``.
    """
    x = np.clip(dst, src[0], src[-1])
    i1 = np.clip(np.searchsorted(src, x, side="right"), 1, src.size - 1)
    i0 = i1 - 1
    w = (x - src[i0]) / (src[i1] - src[i0])
    return i0, i1, np.clip(w, 0.0, 1.0)


def covers_circle(lon: np.ndarray) -> bool:
    """Whether regular longitudes close the circle (``n`` points spaced ``360 / n``): a global
    grid, whose interpolation wraps from the last column to the first."""
    lon = np.sort(np.asarray(lon, dtype=np.float64) % 360.0)
    if lon.size < 2:
        return False
    spacing = (lon[-1] - lon[0]) / (lon.size - 1)
    return bool(abs(spacing * lon.size - 360.0) <= 1e-3 * spacing)


@dataclass(frozen=True)
class BilinearPlan:
    """Where each destination point reads from in a bilinear interpolation between two grids.

    Destination row ``r`` is ``(1 - wy[r]) * src[j0[r]] + wy[r] * src[j1[r]]`` and likewise for
    columns with ``i0, i1, wx``; computed once by :func:`bilinear_plan`, applied to an xarray
    Dataset by :func:`upsample_bilinear` or to tensors by the tasks, per batch.
    """

    j0: np.ndarray
    j1: np.ndarray
    wy: np.ndarray
    i0: np.ndarray
    i1: np.ndarray
    wx: np.ndarray
    periodic: bool


def bilinear_plan(
    src_lat: np.ndarray,
    src_lon: np.ndarray,
    dst_lat: np.ndarray,
    dst_lon: np.ndarray,
    *,
    periodic: bool | None = None,
) -> BilinearPlan:
    """Indices and weights of a bilinear interpolation from ``(src_lat, src_lon)`` points to
    ``(dst_lat, dst_lon)`` points (see :func:`upsample_bilinear` for the conventions).

    Args:
        periodic: Wrap in longitude (a wrap column at ``src_lon[0] + 360``); ``None``: when the
            source longitudes close the circle (:func:`covers_circle`), else clamp at the edge
            columns as latitude is (a regional grid must not borrow from its opposite edge).
    """
    src_lat = np.asarray(src_lat, dtype=np.float64)
    src_lon = np.asarray(src_lon, dtype=np.float64)
    dst_lat = np.asarray(dst_lat, dtype=np.float64)
    dst_lon = np.asarray(dst_lon, dtype=np.float64) % 360.0
    if periodic is None:
        periodic = covers_circle(src_lon)

    # latitude: work in increasing order, map back to the original row indices
    order = np.argsort(src_lat)
    if src_lat.size > 1:
        j0, j1, wy = _interp_indices(src_lat[order], dst_lat)
        j0, j1 = order[j0], order[j1]
    else:
        j0 = j1 = np.zeros(dst_lat.size, dtype=int)
        wy = np.zeros(dst_lat.size)

    lon_order = np.argsort(src_lon)
    lon_sorted = src_lon[lon_order] % 360.0
    n = src_lon.size
    if periodic:  # via a wrap column at src_lon[0] + 360
        ext = np.concatenate([lon_sorted, [lon_sorted[0] + 360.0]])
        x = np.where(dst_lon < lon_sorted[0], dst_lon + 360.0, dst_lon)
        i0, i1, wx = _interp_indices(ext, x)
        i0, i1 = lon_order[i0 % n], lon_order[i1 % n]
    elif n > 1:
        i0, i1, wx = _interp_indices(lon_sorted, dst_lon)
        i0, i1 = lon_order[i0], lon_order[i1]
    else:
        i0 = i1 = np.zeros(dst_lon.size, dtype=int)
        wx = np.zeros(dst_lon.size)
    return BilinearPlan(j0=j0, j1=j1, wy=wy, i0=i0, i1=i1, wx=wx, periodic=bool(periodic))


def upsample_bilinear(
    ds: xr.Dataset, like: xr.Dataset, *, periodic: bool | None = None
) -> xr.Dataset:
    """Bilinear interpolation of every latitude/longitude variable onto ``like``'s grid.

    Longitude is periodic on a global source grid: a wrap column (the first column at
    ``lon + 360``) closes the circle, so targets between the last source longitude and 360
    interpolate towards the first column. On a regional source grid (longitudes that do not close
    the circle) targets beyond the outermost columns are clamped to them, as latitudes beyond the
    outermost source cell centres (the polar half cells) are clamped to the edge row. ``periodic``
    forces either behaviour. Works lazily for dask-backed inputs (index selection plus weighted
    sums).

    Args:
        ds: Source dataset, variables ``(..., H, W)``.
        like: Dataset (or anything with ``latitude``/``longitude`` coordinates) giving the target
            grid ``(H', W')``.
        periodic: See :func:`bilinear_plan`.

    Returns:
        Dataset with the same variables on ``(H', W')``, attributes kept, dtypes kept.
    """
    _check_latlon(ds, "upsample_bilinear")
    _check_latlon(like, "upsample_bilinear (target)")
    plan = bilinear_plan(
        ds[_LAT].values, ds[_LON].values, like[_LAT].values, like[_LON].values, periodic=periodic
    )
    j0, j1, i0, i1 = plan.j0, plan.j1, plan.i0, plan.i1

    def take(da: xr.DataArray, jj: np.ndarray, ii: np.ndarray) -> xr.DataArray:
        return da.isel({_LAT: xr.DataArray(jj, dims=_LAT), _LON: xr.DataArray(ii, dims=_LON)})

    wy_da = xr.DataArray(plan.wy, dims=_LAT)
    wx_da = xr.DataArray(plan.wx, dims=_LON)
    out_vars: dict[str, xr.DataArray] = {}
    for name, da in ds.data_vars.items():
        if _LAT not in da.dims or _LON not in da.dims:
            out_vars[str(name)] = da
            continue
        da0 = da.drop_vars([c for c in (_LAT, _LON) if c in da.coords])
        top = take(da0, j0, i0) * (1 - wx_da) + take(da0, j0, i1) * wx_da
        bottom = take(da0, j1, i0) * (1 - wx_da) + take(da0, j1, i1) * wx_da
        res = (top * (1 - wy_da) + bottom * wy_da).astype(da.dtype).transpose(*da.dims)
        res.attrs = dict(da.attrs)
        out_vars[str(name)] = res

    coords = {k: v for k, v in ds.coords.items() if _LAT not in v.dims and _LON not in v.dims}
    coords[_LAT] = xr.DataArray(np.asarray(like[_LAT].values), dims=_LAT, attrs=ds[_LAT].attrs)
    coords[_LON] = xr.DataArray(np.asarray(like[_LON].values), dims=_LON, attrs=ds[_LON].attrs)
    return xr.Dataset(out_vars, coords=coords, attrs=dict(ds.attrs))
