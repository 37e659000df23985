"""Latitude weights for area means on an equiangular latitude/longitude grid.

On such a grid the rows near the poles hold as many points as the equator but cover far less of the
sphere; an unweighted mean would let them dominate every score. Weighting each row by cos(latitude)
approximates its share of the area (the WeatherBench convention). The weights are normalised to mean
1 over the latitude coordinate, so ``(w * x).mean()`` is an area mean and a single row reads as a
relative importance (METHOD.md §4: ``cos φ / mean cos φ``).
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from numpy.typing import ArrayLike
from scores.functions import create_latitude_weights

from wpeft.errors import DataError

__all__ = ["latitude_weights"]


def latitude_weights(lat: xr.DataArray | ArrayLike) -> xr.DataArray:
    """``cos φ / mean(cos φ)`` along ``latitude``: non-negative weights with mean 1.

    Args:
        lat: Latitudes in degrees north: the ``latitude`` coordinate of a schema array, or any
            1-D array-like (then wrapped on a ``latitude`` dimension).

    Returns:
        A DataArray on the ``latitude`` dimension (with that coordinate), mean exactly 1.

    Raises:
        DataError: if ``lat`` is empty, not 1-D, not finite or outside [-90, 90].
    """
    if isinstance(lat, xr.DataArray):
        if lat.ndim != 1:
            raise DataError(f"latitude_weights needs 1-D latitudes; got dims {lat.dims}.")
        values = np.asarray(lat.values, dtype=np.float64)
        dim = lat.dims[0]
    else:
        values = np.asarray(lat, dtype=np.float64)
        dim = "latitude"
        if values.ndim != 1:
            raise DataError(f"latitude_weights needs 1-D latitudes; got shape {values.shape}.")
    if values.size == 0:
        raise DataError("latitude_weights got no latitudes.")
    if not np.all(np.isfinite(values)) or np.any(np.abs(values) > 90):
        raise DataError(
            f"Latitudes must be finite degrees in [-90, 90]; got min {np.nanmin(values)}, "
            f"max {np.nanmax(values)}."
        )
    cos = np.clip(create_latitude_weights(values), 0.0, None)  # cos(±90°) is ~6e-17, not < 0
    if cos.sum() <= 0:
        raise DataError("All latitudes are at the poles: cos(latitude) weights sum to zero.")
    weights = cos / cos.mean()
    return xr.DataArray(
        weights,
        dims=(dim,),
        coords={dim: values},
        name="latitude_weight",
        attrs={"long_name": "Latitude weight cos(latitude) / mean cos(latitude)", "units": "1"},
    )
