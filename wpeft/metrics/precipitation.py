r"""SEEPS, the Stable Equitable Error in Probability Space (Rodwell et al. 2010), for precipitation.

Why: RMSE rewards smooth, drizzly precipitation forecasts; SEEPS instead scores the category
(dry / light / heavy) with penalties set by the local climate, so that it is equitable and
comparable across climates. METHOD.md §4 uses it for the regional precipitation task with: dry
< 0.1 mm, the light/heavy split at the climatological wet threshold, and points with a
climatological dry fraction p1 outside (0.1, 0.85) masked.

The score itself is ``scores.categorical.seeps``, adapted to METHOD.md's conventions:

* ``scores`` calls a value dry when it is ``<=`` its threshold; METHOD.md says dry is ``< 0.1 mm``.
  Inputs are cast to float64 and ``scores`` gets the next float64 below the dry threshold, so
  exactly 0.1 mm counts as light rain.
* ``scores`` keeps ``p1`` in the closed interval [0.1, 0.85]; METHOD.md masks outside the open
  interval (0.1, 0.85). The masking is done here (``p1`` set to NaN), and ``scores``' own masking
  is off. Masked points are NaN in the field and left out of the (weighted) score.

:func:`seeps_climatology` derives ``p1`` and the wet threshold from a climate record (own code;
``scores`` leaves the climatology to the user).
"""

from __future__ import annotations

import warnings

import numpy as np
import scores
import xarray as xr

from wpeft.errors import DataError
from wpeft.metrics._common import (
    Dims,
    annotate,
    as_dataarray,
    check_finite,
    check_inputs,
    dispatch,
    lat_weights_for,
    resolve_reduce_dims,
    scores_dims,
)

__all__ = ["seeps", "seeps_climatology"]

XrObj = xr.DataArray | xr.Dataset

DRY_THRESHOLD_MM = 0.1
P1_RANGE = (0.1, 0.85)


def seeps(
    forecast: XrObj,
    observed: XrObj,
    climatology_p1: XrObj,
    climatology_wet_threshold: XrObj,
    *,
    dry_threshold: float = DRY_THRESHOLD_MM,
    p1_range: tuple[float, float] = P1_RANGE,
    reduce_dims: Dims = None,
    preserve_dims: Dims = None,
    weighted: bool = True,
) -> XrObj:
    r"""SEEPS of precipitation forecasts (lower is better; 0 is perfect, a random forecast ~1).

    Categories: dry ``x < dry_threshold``; light ``dry_threshold <= x <= wet_threshold``; heavy
    ``x > wet_threshold``. With ``p1`` the climatological dry probability and ``p3 = (1 − p1)/3``
    the heavy one (the wet threshold splits wet days 2:1, so ``p2 = 2 p3``), the penalty for
    forecast category i (row) and observed category j (column) is (Rodwell et al. 2010, eq. 15)::

                     obs dry                 obs light        obs heavy
        fc dry    [ 0                      1/(1−p1)          1/p3 + 1/(1−p1) ]
        fc light  [ 1/p1                   0                 1/p3            ]  × 1/2
        fc heavy  [ 1/p1 + 1/(1−p3)        1/(1−p3)          0               ]

    e.g. for ``p1 = 0.5`` (``p3 = 1/6``): ``[[0, 1, 4], [1, 0, 3], [1.6, 0.6, 0]]``.

    Args:
        forecast: Precipitation accumulations (mm), schema dims.
        observed: Observed accumulations on the same grid and times.
        climatology_p1: Climatological dry fraction per grid point, in [0, 1] (NaN = masked).
        climatology_wet_threshold: Climatological light/heavy threshold per grid point (mm).
        dry_threshold: Dry if below this (mm).
        p1_range: Points with ``p1`` outside this open interval are masked (NaN).
        reduce_dims, preserve_dims, weighted: As in :func:`wpeft.metrics.rmse`; masked points are
            excluded from means (the weights renormalise over the valid points).

    Returns:
        SEEPS (units ``1``); NaN where every reduced point is masked.

    Raises:
        DataError: different grids/times, NaNs in forecast or observed, ``p1`` outside [0, 1],
            a bad ``p1_range``.
    """
    mapped = dispatch(
        seeps,
        (forecast, observed, climatology_p1, climatology_wet_threshold),
        dry_threshold=dry_threshold,
        p1_range=p1_range,
        reduce_dims=reduce_dims,
        preserve_dims=preserve_dims,
        weighted=weighted,
    )
    if mapped is not None:
        return mapped
    f = as_dataarray(forecast, "forecast")
    o = as_dataarray(observed, "observed")
    p1 = as_dataarray(climatology_p1, "climatology_p1")
    wet = as_dataarray(climatology_wet_threshold, "climatology_wet_threshold")
    check_inputs(
        [
            (f, "forecast"),
            (o, "observed"),
            (p1, "climatology_p1"),
            (wet, "climatology_wet_threshold"),
        ],
        finite=("forecast", "observed"),
    )
    lo, hi = p1_range
    if not 0 <= lo < hi <= 1:
        raise DataError(f"p1_range must satisfy 0 <= low < high <= 1; got {p1_range}.")
    outside = int(((p1 < 0) | (p1 > 1)).sum())
    if outside:
        raise DataError(
            f"climatology_p1 is a probability; {outside} value(s) lie outside [0, 1] "
            f"(min {float(p1.min())}, max {float(p1.max())})."
        )
    reduce = resolve_reduce_dims((*f.dims, *o.dims), reduce_dims, preserve_dims)
    weights = lat_weights_for(f, reduce, weighted)

    p1_masked = p1.where((p1 > lo) & (p1 < hi))
    result = scores.categorical.seeps(
        f.astype(np.float64),
        o.astype(np.float64),
        p1_masked.astype(np.float64),
        wet.astype(np.float64),
        # scores: dry <=> value <= threshold; METHOD.md: dry <=> value < 0.1 mm.
        dry_light_threshold=float(np.nextafter(np.float64(dry_threshold), -np.inf)),
        mask_clim_extremes=False,
        weights=weights,
        **scores_dims(reduce),
    )
    label = f"{'Latitude-weighted ' if weights is not None else ''}SEEPS"
    return annotate(result, f, label, "1")


def seeps_climatology(
    observed_climate: XrObj,
    dry_threshold: float = DRY_THRESHOLD_MM,
    *,
    time_dim: str = "time",
    wet_quantile: float = 2.0 / 3.0,
) -> tuple[XrObj, XrObj]:
    """SEEPS climatology per grid point: the dry fraction ``p1`` and the light/heavy threshold.

    ``p1`` is the fraction of times with precipitation ``< dry_threshold``. The wet threshold is
    the ``wet_quantile`` (2/3, so light is twice as likely as heavy, as Rodwell et al. 2010 define
    the categories) quantile of the wet values (``>= dry_threshold``), linearly interpolated.

    Args:
        observed_climate: A long record of observed accumulations (mm), with ``time_dim``.
        dry_threshold: Dry if below this (mm).
        time_dim: The dim the climatology is taken over.
        wet_quantile: Quantile of wet values that separates light from heavy.

    Returns:
        ``(p1, wet_threshold)``, without ``time_dim``; the threshold is NaN where no value is wet
        (such points have ``p1 = 1`` and are masked by :func:`seeps`). Datasets give Datasets.

    Raises:
        DataError: NaNs in the record, no ``time_dim``, ``wet_quantile`` outside (0, 1).
    """
    if isinstance(observed_climate, xr.Dataset):
        pairs = {
            name: seeps_climatology(da, dry_threshold, time_dim=time_dim, wet_quantile=wet_quantile)
            for name, da in observed_climate.data_vars.items()
        }
        return (
            xr.Dataset({n: p[0] for n, p in pairs.items()}),
            xr.Dataset({n: p[1] for n, p in pairs.items()}),
        )
    o = as_dataarray(observed_climate, "observed_climate")
    if time_dim not in o.dims:
        raise DataError(f"observed_climate has no {time_dim!r} dim (dims {o.dims}).")
    if not 0 < wet_quantile < 1:
        raise DataError(f"wet_quantile must be in (0, 1); got {wet_quantile}.")
    check_finite(o, "observed_climate")
    what = str(o.attrs.get("long_name") or o.name or "precipitation")

    p1 = (o < dry_threshold).mean(time_dim)
    p1.attrs = {
        "long_name": f"Climatological dry fraction (< {dry_threshold}) of {what}",
        "units": "1",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-dry points: "All-NaN slice"
        wet = o.where(o >= dry_threshold).quantile(wet_quantile, dim=time_dim, skipna=True)
    wet = wet.drop_vars("quantile")
    wet.attrs = {"long_name": f"Climatological light/heavy threshold of {what}"}
    if "units" in o.attrs:
        wet.attrs["units"] = o.attrs["units"]
    p1.name, wet.name = o.name, o.name
    return p1, wet
