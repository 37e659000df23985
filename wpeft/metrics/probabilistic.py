r"""Probabilistic scores: CRPS of Gaussian and ensemble forecasts, plain and threshold-weighted.

Why: the ENS-10 post-processing task (METHOD.md §4) predicts a Gaussian N(μ, σ²) per point and is
trained and scored with its closed-form CRPS, plus an extreme-event weighted CRPS; raw ensembles are
the baseline it is compared with.

Sources:

* :func:`crps_ensemble`, :func:`twcrps_ensemble` wrap ``scores.probability.crps_for_ensemble`` and
  ``scores.probability.tail_tw_crps_for_ensemble``.
* :func:`crps_gaussian`, :func:`twcrps_gaussian` are own code: ``scores`` 2.7 has no parametric
  (Gaussian) CRPS -- only ensembles and CDFs tabulated on thresholds -- and no twCRPS for a
  Gaussian. Both are closed forms, derived in the docstrings and tested against numerical
  integration.

The extreme-event weighted CRPS is the threshold-weighted CRPS (Gneiting & Ranjan 2011; Allen et al.
2023) with weight ``w(x) = 1{x > t}``: it integrates the CRPS integrand only over outcomes above a
threshold ``t``, typically a climatological quantile per grid point (e.g. the 90th percentile),
so it scores how well the forecast describes the upper tail. ``tail="lower"`` weights ``x < t``.

CRPS has the units of the variable. Aggregation follows :mod:`wpeft.metrics.deterministic`:
latitude-weighted mean over time, latitude, longitude by default; ``reduce_dims="time"`` gives the
per-grid-point field.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import scores
import xarray as xr
from scipy.special import ndtr

from wpeft.errors import DataError
from wpeft.metrics._common import (
    Dims,
    annotate,
    as_dataarray,
    check_inputs,
    dispatch,
    lat_weights_for,
    resolve_reduce_dims,
    scores_dims,
)

__all__ = ["crps_ensemble", "crps_gaussian", "twcrps_ensemble", "twcrps_gaussian"]

XrObj = xr.DataArray | xr.Dataset
Tail = Literal["upper", "lower"]

_INV_SQRT_PI = 1.0 / np.sqrt(np.pi)
_INV_SQRT_2PI = 1.0 / np.sqrt(2.0 * np.pi)


def _phi(z: xr.DataArray) -> xr.DataArray:
    """Standard normal density."""
    return _INV_SQRT_2PI * np.exp(-0.5 * z**2)


def _Phi(z: xr.DataArray) -> xr.DataArray:
    """Standard normal CDF."""
    return xr.apply_ufunc(ndtr, z, dask="allowed")


def _gaussian_inputs(
    mu: xr.DataArray | float, sigma: xr.DataArray | float, observed: xr.DataArray
) -> tuple[xr.DataArray, xr.DataArray, xr.DataArray]:
    m = as_dataarray(mu, "mu")
    s = as_dataarray(sigma, "sigma")
    o = as_dataarray(observed, "observed")
    check_inputs([(m, "mu"), (s, "sigma"), (o, "observed")])
    n_bad = int((s <= 0).sum())
    if n_bad:
        raise DataError(
            f"sigma must be > 0 everywhere; {n_bad} value(s) are <= 0 (min {float(s.min())}). "
            "Parameterise it as exp(s) or softplus(s) plus a small floor."
        )
    return m, s, o


def _aggregate(
    pointwise: xr.DataArray, reduce_dims: Dims, preserve_dims: Dims, weighted: bool
) -> tuple[xr.DataArray, bool]:
    """Mean of a pointwise score over the requested dims, and whether it was latitude-weighted."""
    reduce = resolve_reduce_dims(pointwise.dims, reduce_dims, preserve_dims)
    if not reduce:
        return pointwise, False
    weights = lat_weights_for(pointwise, reduce, weighted)
    result = scores.processing.aggregate(pointwise, reduce_dims=reduce, weights=weights)
    return result, weights is not None


def _crps_gaussian_pointwise(m: xr.DataArray, s: xr.DataArray, o: xr.DataArray) -> xr.DataArray:
    # Even in z, so z = (y - mu)/sigma gives the same value as METHOD.md's z = (mu - y)/sigma.
    z = (o - m) / s
    return s * (z * (2.0 * _Phi(z) - 1.0) + 2.0 * _phi(z) - _INV_SQRT_PI)


def crps_gaussian(
    mu: xr.DataArray | xr.Dataset,
    sigma: xr.DataArray | xr.Dataset | float,
    observed: xr.DataArray | xr.Dataset,
    *,
    reduce_dims: Dims = None,
    preserve_dims: Dims = None,
    weighted: bool = True,
) -> XrObj:
    r"""CRPS of the Gaussian forecast N(mu, sigma²), closed form (Gneiting et al. 2005).

    ``CRPS = σ [z (2Φ(z) − 1) + 2φ(z) − 1/√π]`` with ``z = (y − μ)/σ`` (the expression is even in
    ``z``, so METHOD.md's ``z = (μ − y)/σ`` is the same). At ``y = μ`` it is ``σ(√2 − 1)/√π``.

    Args:
        mu: Forecast mean, schema dims.
        sigma: Forecast standard deviation (> 0), same grid, or a number.
        observed: Observations on the same grid and times.
        reduce_dims, preserve_dims, weighted: As in :func:`wpeft.metrics.rmse`.

    Returns:
        The (latitude-weighted mean) CRPS, in the units of ``mu``.

    Raises:
        DataError: different grids/times, NaNs, ``sigma <= 0``.
    """
    mapped = dispatch(
        crps_gaussian,
        (mu, sigma, observed),
        reduce_dims=reduce_dims,
        preserve_dims=preserve_dims,
        weighted=weighted,
    )
    if mapped is not None:
        return mapped
    m, s, o = _gaussian_inputs(mu, sigma, observed)
    pointwise = _crps_gaussian_pointwise(m, s, o)
    result, w = _aggregate(pointwise, reduce_dims, preserve_dims, weighted)
    label = "Latitude-weighted Gaussian CRPS" if w else "Gaussian CRPS"
    return annotate(result, m, label, m.attrs.get("units", o.attrs.get("units")))


def _G(z: xr.DataArray) -> xr.DataArray:
    """Antiderivative of Φ(z)² with G(-∞) = 0: ``zΦ(z)² + 2Φ(z)φ(z) − Φ(√2 z)/√π``."""
    p = _Phi(z)
    return z * p**2 + 2.0 * p * _phi(z) - _Phi(np.sqrt(2.0) * z) * _INV_SQRT_PI


def _twcrps_gaussian_upper(
    m: xr.DataArray, s: xr.DataArray, o: xr.DataArray, t: xr.DataArray
) -> xr.DataArray:
    a = (t - m) / s
    b = (np.maximum(t, o) - m) / s
    return s * (_G(b) - _G(a) + _G(-b))


def twcrps_gaussian(
    mu: xr.DataArray | xr.Dataset,
    sigma: xr.DataArray | xr.Dataset | float,
    observed: xr.DataArray | xr.Dataset,
    threshold: xr.DataArray | xr.Dataset | float,
    *,
    tail: Tail = "upper",
    reduce_dims: Dims = None,
    preserve_dims: Dims = None,
    weighted: bool = True,
) -> XrObj:
    r"""Threshold-weighted (extreme-event) CRPS of N(mu, sigma²), closed form.

    ``twCRPS(F, y) = ∫ w(x) (F(x) − 1{y ≤ x})² dx`` with ``w(x) = 1{x > t}`` (``tail="upper"``)
    or ``1{x < t}`` (``tail="lower"``).

    Derivation (upper tail): with ``c = max(t, y)`` the integrand is ``F²`` on ``(t, c)`` and
    ``(1 − F)²`` above ``c``. Standardising ``x = μ + σz`` and using the antiderivative
    ``G(z) = zΦ(z)² + 2Φ(z)φ(z) − Φ(√2 z)/√π`` of ``Φ(z)²`` (``G(−∞) = 0``) and
    ``∫_b^∞ (1 − Φ)² = ∫_{−∞}^{−b} Φ² = G(−b)``::

        twCRPS = σ [G(b) − G(a) + G(−b)],   a = (t − μ)/σ,  b = (max(t, y) − μ)/σ.

    As ``t → −∞`` this is the plain CRPS; for ``y ≤ t = μ`` it is ``σ(√2 − 1)/(2√π)``. The lower
    tail follows by reflection: ``twCRPS_lower(μ, σ, y; t) = twCRPS_upper(−μ, σ, −y; −t)``.

    Args:
        mu, sigma, observed: As in :func:`crps_gaussian`.
        threshold: Where the tail starts: a number or a per-grid-point DataArray, typically a
            climatological quantile, e.g. ``clim.quantile(0.9, "time").drop_vars("quantile")``.
        tail: ``"upper"`` (weight outcomes above the threshold) or ``"lower"``.
        reduce_dims, preserve_dims, weighted: As in :func:`wpeft.metrics.rmse`.

    Returns:
        The (latitude-weighted mean) twCRPS, in the units of ``mu``; always <= the plain CRPS.

    Raises:
        DataError: different grids/times, NaNs, ``sigma <= 0``, unknown ``tail``.
    """
    mapped = dispatch(
        twcrps_gaussian,
        (mu, sigma, observed, threshold),
        tail=tail,
        reduce_dims=reduce_dims,
        preserve_dims=preserve_dims,
        weighted=weighted,
    )
    if mapped is not None:
        return mapped
    if tail not in ("upper", "lower"):
        raise DataError(f"tail must be 'upper' or 'lower'; got {tail!r}.")
    m, s, o = _gaussian_inputs(mu, sigma, observed)
    t = as_dataarray(threshold, "threshold")
    check_inputs([(m, "mu"), (o, "observed"), (t, "threshold")])
    if tail == "upper":
        pointwise = _twcrps_gaussian_upper(m, s, o, t)
    else:
        pointwise = _twcrps_gaussian_upper(-m, s, -o, -t)
    result, w = _aggregate(pointwise, reduce_dims, preserve_dims, weighted)
    label = f"{'Latitude-weighted ' if w else ''}{tail}-tail threshold-weighted Gaussian CRPS"
    return annotate(result, m, label, m.attrs.get("units", o.attrs.get("units")))


def _ensemble_inputs(
    ensemble: xr.DataArray, observed: xr.DataArray, member_dim: str
) -> tuple[xr.DataArray, xr.DataArray]:
    e = as_dataarray(ensemble, "ensemble")
    o = as_dataarray(observed, "observed")
    if member_dim not in e.dims:
        raise DataError(f"ensemble has no {member_dim!r} dim (dims {e.dims}); set member_dim.")
    if member_dim in o.dims:
        raise DataError(f"observed must not have the ensemble dim {member_dim!r}.")
    check_inputs([(e, "ensemble"), (o, "observed")])
    return e, o


def crps_ensemble(
    ensemble: xr.DataArray | xr.Dataset,
    observed: xr.DataArray | xr.Dataset,
    member_dim: str = "member",
    *,
    method: Literal["ecdf", "fair"] = "ecdf",
    reduce_dims: Dims = None,
    preserve_dims: Dims = None,
    weighted: bool = True,
) -> XrObj:
    """CRPS of an ensemble, via ``scores.probability.crps_for_ensemble``.

    ``CRPS = mean_i |x_i − y| − (1/2K) Σ_ij |x_i − x_j|`` with ``K = M²`` (``method="ecdf"``: the
    exact CRPS of the empirical CDF) or ``K = M(M − 1)`` (``"fair"``: unbiased for the underlying
    distribution). A one-member ensemble (ecdf) scores the absolute error.

    Args:
        ensemble: Members along ``member_dim``, otherwise schema dims.
        observed: Observations (no member dim) on the same grid and times.
        member_dim: Name of the ensemble dim.
        method: ``"ecdf"`` or ``"fair"``.
        reduce_dims, preserve_dims, weighted: As in :func:`wpeft.metrics.rmse`.

    Raises:
        DataError: different grids/times, NaNs, missing member dim.
    """
    mapped = dispatch(
        crps_ensemble,
        (ensemble, observed),
        member_dim=member_dim,
        method=method,
        reduce_dims=reduce_dims,
        preserve_dims=preserve_dims,
        weighted=weighted,
    )
    if mapped is not None:
        return mapped
    e, o = _ensemble_inputs(ensemble, observed, member_dim)
    reduce = resolve_reduce_dims(
        (*e.dims, *o.dims), reduce_dims, preserve_dims, exclude=[member_dim]
    )
    weights = lat_weights_for(e, reduce, weighted)
    result = scores.probability.crps_for_ensemble(
        e, o, member_dim, method=method, weights=weights, **scores_dims(reduce)
    )
    label = f"{'Latitude-weighted ' if weights is not None else ''}ensemble CRPS ({method})"
    return annotate(result, e, label, e.attrs.get("units", o.attrs.get("units")))


def twcrps_ensemble(
    ensemble: xr.DataArray | xr.Dataset,
    observed: xr.DataArray | xr.Dataset,
    threshold: xr.DataArray | xr.Dataset | float,
    member_dim: str = "member",
    *,
    tail: Tail = "upper",
    method: Literal["ecdf", "fair"] = "ecdf",
    reduce_dims: Dims = None,
    preserve_dims: Dims = None,
    weighted: bool = True,
) -> XrObj:
    """Threshold-weighted CRPS of an ensemble, via ``scores.probability.tail_tw_crps_for_ensemble``.

    The ensemble counterpart of :func:`twcrps_gaussian`: the CRPS of the members and observation
    mapped through the chaining function ``v(x) = max(x, t)`` (upper tail) or ``min(x, t)``.
    Arguments as in :func:`crps_ensemble` and :func:`twcrps_gaussian`.
    """
    mapped = dispatch(
        twcrps_ensemble,
        (ensemble, observed, threshold),
        member_dim=member_dim,
        tail=tail,
        method=method,
        reduce_dims=reduce_dims,
        preserve_dims=preserve_dims,
        weighted=weighted,
    )
    if mapped is not None:
        return mapped
    if tail not in ("upper", "lower"):
        raise DataError(f"tail must be 'upper' or 'lower'; got {tail!r}.")
    e, o = _ensemble_inputs(ensemble, observed, member_dim)
    t = as_dataarray(threshold, "threshold")
    check_inputs([(e, "ensemble"), (o, "observed"), (t, "threshold")])
    reduce = resolve_reduce_dims(
        (*e.dims, *o.dims), reduce_dims, preserve_dims, exclude=[member_dim]
    )
    weights = lat_weights_for(e, reduce, weighted)
    result = scores.probability.tail_tw_crps_for_ensemble(
        e, o, member_dim, t, tail=tail, method=method, weights=weights, **scores_dims(reduce)
    )
    label = (
        f"{'Latitude-weighted ' if weights is not None else ''}{tail}-tail threshold-weighted "
        f"ensemble CRPS ({method})"
    )
    return annotate(result, e, label, e.attrs.get("units", o.attrs.get("units")))
