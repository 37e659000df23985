"""Deterministic scores: latitude-weighted RMSE, mean error (bias), anomaly correlation (ACC).

Why these: METHOD.md §4 scores downscaling by latitude-weighted RMSE, and regional precipitation
by area-weighted RMSE and ACC against a climatology. RMSE and bias are ``scores``' own
(:func:`scores.continuous.rmse`, :func:`scores.continuous.mean_error`) with latitude weights;
``scores`` has no ACC (its correlations are Pearson/Spearman, i.e. centred), so ACC is written here.

Every function takes DataArrays with the schema's dims (or Datasets, scored per variable) and
``scores``-style ``reduce_dims``/``preserve_dims``: by default time, latitude and longitude are
reduced (other dims, such as ``level``, are kept); ``reduce_dims="time"`` gives the per-grid-point
field used for skill maps.

RMSE convention: the score is the square root of the latitude-weighted mean squared error over
all reduced dims together, ``sqrt(mean_t,φ,λ w·(f-o)^2)`` (as ``scores`` and WeatherBench2 compute
it), not the time mean of per-time RMSEs; pass ``preserve_dims=["time"]`` and average yourself for
the latter.
"""

from __future__ import annotations

import numpy as np
import scores
import xarray as xr

from wpeft.errors import DataError
from wpeft.metrics._common import (
    SPATIAL,
    Dims,
    annotate,
    as_dataarray,
    check_inputs,
    dispatch,
    lat_weights_for,
    resolve_reduce_dims,
    scores_dims,
)
from wpeft.metrics.weights import latitude_weights

__all__ = ["acc", "bias", "rmse"]

XrObj = xr.DataArray | xr.Dataset


def _prefix(weights: xr.DataArray | None) -> str:
    return "Latitude-weighted " if weights is not None else ""


def _paired(
    public, score, label: str, forecast, observed, reduce_dims, preserve_dims, weighted
) -> XrObj:
    """A ``scores`` forecast-vs-observation score with wpeft's checks, dims and weights."""
    mapped = dispatch(
        public,
        (forecast, observed),
        reduce_dims=reduce_dims,
        preserve_dims=preserve_dims,
        weighted=weighted,
    )
    if mapped is not None:
        return mapped
    f = as_dataarray(forecast, "forecast")
    o = as_dataarray(observed, "observed")
    check_inputs([(f, "forecast"), (o, "observed")])
    reduce = resolve_reduce_dims((*f.dims, *o.dims), reduce_dims, preserve_dims)
    weights = lat_weights_for(f, reduce, weighted)
    result = score(f, o, weights=weights, **scores_dims(reduce))
    return annotate(result, f, f"{_prefix(weights)}{label}", f.attrs.get("units"))


def rmse(
    forecast: XrObj,
    observed: XrObj,
    *,
    reduce_dims: Dims = None,
    preserve_dims: Dims = None,
    weighted: bool = True,
) -> XrObj:
    """Root mean squared error, latitude-weighted (cos φ / mean cos φ) when latitude is reduced.

    Args:
        forecast: Forecast, schema dims (``time``, [``level``,] ``latitude``, ``longitude``).
        observed: Verifying observations on the same grid and times.
        reduce_dims: Dims to reduce; default time, latitude, longitude. ``"time"`` gives the
            per-grid-point RMSE field.
        preserve_dims: Dims to keep (the others are reduced); exclusive with ``reduce_dims``.
        weighted: Apply latitude weights when latitude is reduced.

    Returns:
        The RMSE, in the forecast's units.

    Raises:
        DataError: different grids/times, NaNs in either input, unknown dims.
    """
    return _paired(
        rmse,
        scores.continuous.rmse,
        "RMSE",
        forecast,
        observed,
        reduce_dims,
        preserve_dims,
        weighted,
    )


def bias(
    forecast: XrObj,
    observed: XrObj,
    *,
    reduce_dims: Dims = None,
    preserve_dims: Dims = None,
    weighted: bool = True,
) -> XrObj:
    """Mean error ``mean(forecast - observed)``, latitude-weighted when latitude is reduced.

    Positive means the forecast is too high. Arguments, returns and errors as in :func:`rmse`.
    """
    return _paired(
        bias,
        scores.continuous.mean_error,
        "mean error (bias)",
        forecast,
        observed,
        reduce_dims,
        preserve_dims,
        weighted,
    )


def acc(
    forecast: XrObj,
    observed: XrObj,
    climatology: XrObj,
    *,
    reduce_dims: Dims = None,
    preserve_dims: Dims = None,
    weighted: bool = True,
) -> XrObj:
    """Uncentred anomaly correlation coefficient against ``climatology``.

    With anomalies ``f' = forecast - climatology`` and ``o' = observed - climatology``::

        ACC = sum(w f' o') / sqrt(sum(w f'^2) * sum(w o'^2))

    * If latitude and/or longitude are among the reduced dims (the score), the correlation is taken
      over those spatial dims separately for each init time (``w`` = latitude weights when
      latitude is one of them and ``weighted``), and the per-time values are then averaged
      (unweighted) over the remaining reduced dims, e.g. ``time``. This is METHOD.md's "uncentred,
      per init time".
    * If no spatial dim is reduced (the field, ``reduce_dims="time"``), the correlation is taken
      over the reduced dims at each grid point (``w`` = 1): uncentred correlation over time of the
      anomalies.

    "Uncentred" means the anomalies' own means are not removed: a forecast that gets the sign of
    the anomaly right everywhere but its size wrong still scores close to 1.

    Args:
        forecast: Forecast, schema dims.
        observed: Observations on the same grid and times.
        climatology: Reference state broadcastable to the forecast: e.g. ``(latitude, longitude)``,
            or ``(time, latitude, longitude)`` already matched to the valid times.
        reduce_dims, preserve_dims: As in :func:`rmse`.
        weighted: Latitude-weight the spatial sums.

    Returns:
        ACC in [-1, 1] (units ``1``); NaN where an anomaly is identically zero (undefined).

    Raises:
        DataError: different grids/times among the three inputs, NaNs, no dims to reduce.
    """
    mapped = dispatch(
        acc,
        (forecast, observed, climatology),
        reduce_dims=reduce_dims,
        preserve_dims=preserve_dims,
        weighted=weighted,
    )
    if mapped is not None:
        return mapped
    f = as_dataarray(forecast, "forecast")
    o = as_dataarray(observed, "observed")
    c = as_dataarray(climatology, "climatology")
    check_inputs([(f, "forecast"), (o, "observed"), (c, "climatology")])
    extra = set(c.dims) - set(f.dims)
    if extra:
        raise DataError(f"climatology has dims {sorted(extra)} that the forecast lacks.")
    reduce = resolve_reduce_dims((*f.dims, *o.dims), reduce_dims, preserve_dims)
    if not reduce:
        raise DataError("ACC is a correlation: it needs at least one dim to reduce.")

    f_anom, o_anom = f - c, o - c
    corr_dims = [d for d in reduce if d in SPATIAL] or reduce
    rest = [d for d in reduce if d not in corr_dims]
    if weighted and "latitude" in corr_dims:
        w: xr.DataArray | float = latitude_weights(f["latitude"])
    else:
        w = 1.0
    numerator = (w * f_anom * o_anom).sum(corr_dims)
    denominator = np.sqrt((w * f_anom**2).sum(corr_dims) * (w * o_anom**2).sum(corr_dims))
    with np.errstate(divide="ignore", invalid="ignore"):
        result = (numerator / denominator).where(denominator > 0)
    if rest:
        result = result.mean(rest)
    spatial = [d for d in corr_dims if d in SPATIAL]
    kind = "Latitude-weighted uncentred ACC" if isinstance(w, xr.DataArray) else "Uncentred ACC"
    if spatial and rest:
        kind += f" (over {', '.join(spatial)}, mean over {', '.join(rest)})"
    elif not spatial:
        kind += f" (over {', '.join(corr_dims)})"
    return annotate(result, f, kind, "1")
