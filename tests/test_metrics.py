"""Tests for wpeft.metrics: every metric against hand-computed values on tiny grids.

Expected numbers are written as arithmetic in the tests. Most grids use latitudes (60, 0), whose
weights cos φ / mean cos φ are (0.5, 1) / 0.75 = (2/3, 4/3), so a latitude-weighted mean differs
from an unweighted one.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy import integrate
from scipy.stats import norm

from wpeft.errors import DataError
from wpeft.metrics import (
    acc,
    bias,
    crps_ensemble,
    crps_gaussian,
    latitude_weights,
    rmse,
    seeps,
    seeps_climatology,
    twcrps_ensemble,
    twcrps_gaussian,
)
from wpeft.metrics.significance import (
    ar1_effective_sample_size,
    lag1_autocorrelation,
    paired_ttest_ar1,
)

W60, W0 = 2 / 3, 4 / 3  # latitude weights of rows 60° and 0° on a (60, 0) grid
SQRT_PI = math.sqrt(math.pi)


def _field(
    values,
    *,
    lats=(60.0, 0.0),
    lons=(0.0, 180.0),
    name="2m_temperature",
    units="K",
    long_name="2 metre temperature",
) -> xr.DataArray:
    """A (time, latitude, longitude) DataArray from a nested list."""
    values = np.asarray(values, dtype=np.float64)
    return xr.DataArray(
        values,
        dims=("time", "latitude", "longitude"),
        coords={
            "time": pd.date_range("2020-01-01", periods=values.shape[0], freq="6h"),
            "latitude": list(lats),
            "longitude": list(lons),
        },
        name=name,
        attrs={"units": units, "long_name": long_name},
    )


def _static(values, *, lats=(60.0, 0.0), lons=(0.0, 180.0)) -> xr.DataArray:
    """A (latitude, longitude) DataArray (climatologies, thresholds)."""
    return xr.DataArray(
        np.asarray(values, dtype=np.float64),
        dims=("latitude", "longitude"),
        coords={"latitude": list(lats), "longitude": list(lons)},
    )


# ---------------------------------------------------------------------------------------------
# latitude weights


def test_latitude_weights_hand_values():
    w = latitude_weights([60.0, 0.0, -60.0])
    # cos = (0.5, 1, 0.5), mean 2/3 -> (0.75, 1.5, 0.75)
    np.testing.assert_allclose(w.values, [0.5 / (2 / 3), 1 / (2 / 3), 0.5 / (2 / 3)])
    np.testing.assert_allclose(w.values, [0.75, 1.5, 0.75])
    assert w.dims == ("latitude",)
    np.testing.assert_allclose(w["latitude"].values, [60.0, 0.0, -60.0])
    assert float(w.mean()) == pytest.approx(1.0)


def test_latitude_weights_from_coordinate():
    w = latitude_weights(_field(np.zeros((1, 2, 2)))["latitude"])
    np.testing.assert_allclose(w.values, [W60, W0])


def test_latitude_weights_refuses_bad_latitudes():
    with pytest.raises(DataError, match="-90, 90"):
        latitude_weights([95.0, 0.0])


# ---------------------------------------------------------------------------------------------
# RMSE and bias

# Errors forecast - observed, dims (time, latitude, longitude); row 60° errs more than row 0°.
ERRORS = [
    [[1.0, 2.0], [1.0, -1.0]],
    [[3.0, 2.0], [1.0, 1.0]],
]


def _forecast_observed() -> tuple[xr.DataArray, xr.DataArray]:
    observed = _field(np.full((2, 2, 2), 280.0))
    forecast = observed + np.asarray(ERRORS)
    forecast.attrs = dict(observed.attrs)
    return forecast, observed


def test_rmse_is_latitude_weighted():
    forecast, observed = _forecast_observed()
    # mean squared error per row: 60° -> (1+4+9+4)/4 = 4.5; 0° -> (1+1+1+1)/4 = 1
    weighted = math.sqrt((W60 * 4.5 + W0 * 1.0) / 2)  # = sqrt(13/6)
    unweighted = math.sqrt((4.5 + 1.0) / 2)
    assert float(rmse(forecast, observed)) == pytest.approx(weighted)
    assert weighted == pytest.approx(math.sqrt(13 / 6))
    assert float(rmse(forecast, observed, weighted=False)) == pytest.approx(unweighted)


def test_rmse_field_reduces_only_time():
    forecast, observed = _forecast_observed()
    field = rmse(forecast, observed, reduce_dims="time")
    assert field.dims == ("latitude", "longitude")
    expected = [
        [math.sqrt((1 + 9) / 2), math.sqrt((4 + 4) / 2)],
        [math.sqrt((1 + 1) / 2), math.sqrt((1 + 1) / 2)],
    ]
    np.testing.assert_allclose(field.values, expected)
    # preserve_dims says the same thing the other way round
    kept = rmse(forecast, observed, preserve_dims=["latitude", "longitude"])
    np.testing.assert_allclose(kept.values, expected)


def test_rmse_attrs():
    forecast, observed = _forecast_observed()
    result = rmse(forecast, observed)
    assert result.attrs["units"] == "K"
    assert "RMSE" in result.attrs["long_name"]
    assert "2 metre temperature" in result.attrs["long_name"]


def test_bias_weighted_and_field():
    forecast, observed = _forecast_observed()
    # mean error per row: 60° -> (1+2+3+2)/4 = 2; 0° -> (1-1+1+1)/4 = 0.5
    assert float(bias(forecast, observed)) == pytest.approx((W60 * 2 + W0 * 0.5) / 2)  # = 1
    assert float(bias(forecast, observed, weighted=False)) == pytest.approx((2 + 0.5) / 2)
    field = bias(forecast, observed, reduce_dims="time")
    np.testing.assert_allclose(
        field.values, [[(1 + 3) / 2, (2 + 2) / 2], [(1 + 1) / 2, (-1 + 1) / 2]]
    )
    assert field.attrs["units"] == "K"


def test_rmse_keeps_level_and_maps_datasets():
    forecast, observed = _forecast_observed()
    f = forecast.expand_dims(level=[500, 850], axis=1).copy()
    f[:, 1] = observed  # level 850: perfect
    o = observed.expand_dims(level=[500, 850], axis=1)
    by_level = rmse(f.rename("temperature"), o.rename("temperature"))
    assert by_level.dims == ("level",)
    np.testing.assert_allclose(by_level.values, [math.sqrt(13 / 6), 0.0])
    ds = rmse(forecast.to_dataset(), observed.to_dataset())
    assert isinstance(ds, xr.Dataset)
    assert float(ds["2m_temperature"]) == pytest.approx(math.sqrt(13 / 6))
    assert ds["2m_temperature"].attrs["units"] == "K"


# ---------------------------------------------------------------------------------------------
# ACC


def _anomaly_case() -> tuple[xr.DataArray, xr.DataArray, xr.DataArray]:
    """Grid lat (60, 0) x lon (0,); climatology 10; anomalies chosen by hand."""
    clim = _static([[10.0], [10.0]], lons=(0.0,))
    f_anom = [[[1.0], [2.0]], [[1.0], [0.0]]]  # (time, lat, lon)
    o_anom = [[[2.0], [1.0]], [[1.0], [1.0]]]
    forecast = _field(np.asarray(f_anom) + 10, lons=(0.0,))
    observed = _field(np.asarray(o_anom) + 10, lons=(0.0,))
    return forecast, observed, clim


def test_acc_perfect_and_negated():
    _, observed, clim = _anomaly_case()
    assert float(acc(observed, observed, clim)) == pytest.approx(1.0)
    negated = 2 * clim - observed  # anomaly -o'
    assert float(acc(negated, observed, clim)) == pytest.approx(-1.0)


def test_acc_hand_example_is_uncentred_and_weighted():
    forecast, observed, clim = _anomaly_case()
    # time 0: f' = (1, 2), o' = (2, 1), w = (2/3, 4/3)
    num0 = W60 * 1 * 2 + W0 * 2 * 1  # 4
    acc0 = num0 / math.sqrt((W60 * 1 + W0 * 4) * (W60 * 4 + W0 * 1))  # 4 / sqrt(6 * 4)
    # time 1: f' = (1, 0), o' = (1, 1)
    acc1 = (W60 * 1) / math.sqrt((W60 * 1) * (W60 + W0))  # (2/3) / sqrt(2/3 * 2)
    per_time = acc(forecast, observed, clim, preserve_dims=["time"])
    np.testing.assert_allclose(per_time.values, [acc0, acc1])
    assert acc0 == pytest.approx(2 / math.sqrt(6))
    assert acc1 == pytest.approx(1 / math.sqrt(3))
    assert float(acc(forecast, observed, clim)) == pytest.approx((acc0 + acc1) / 2)
    # unweighted time 0: 4 / sqrt(5 * 5) = 0.8 (a centred correlation would give -1 here)
    unweighted = acc(forecast, observed, clim, weighted=False, preserve_dims=["time"])
    assert float(unweighted[0]) == pytest.approx(4 / 5)
    assert acc(forecast, observed, clim).attrs["units"] == "1"


def test_acc_field_is_correlation_over_time():
    forecast, observed, clim = _anomaly_case()
    field = acc(forecast, observed, clim, reduce_dims="time")
    assert field.dims == ("latitude", "longitude")
    # (60, 0): f' = (1, 1), o' = (2, 1) -> 3 / sqrt(2 * 5); (0, 0): f' = (2, 0), o' = (1, 1)
    np.testing.assert_allclose(field.values, [[3 / math.sqrt(10)], [2 / math.sqrt(4 * 2)]])


# ---------------------------------------------------------------------------------------------
# CRPS


def _crps_by_integration(mu: float, sigma: float, y: float, lower: float = -np.inf) -> float:
    """∫_lower^∞ (Φ((x-μ)/σ) - 1{x >= y})² dx, split at y where the integrand jumps."""
    cdf = norm(mu, sigma).cdf
    below = integrate.quad(lambda x: cdf(x) ** 2, lower, max(y, lower))[0] if y > lower else 0.0
    above = integrate.quad(lambda x: (1 - cdf(x)) ** 2, max(y, lower), np.inf)[0]
    return below + above


def _point(value: float) -> xr.DataArray:
    return _field([[[value]]], lats=(0.0,), lons=(0.0,))


def test_crps_gaussian_at_the_mean():
    sigma = 2.0
    result = crps_gaussian(_point(3.0), sigma, _point(3.0))
    # σ(2φ(0) - 1/√π) = σ(2/√(2π) - 1/√π) = σ(√2 - 1)/√π
    assert float(result) == pytest.approx(sigma * (2 / math.sqrt(2 * math.pi) - 1 / SQRT_PI))
    assert float(result) == pytest.approx(sigma * (math.sqrt(2) - 1) / SQRT_PI)


def test_crps_gaussian_matches_numerical_integration():
    mu, sigma, y = 1.0, 2.0, 2.5
    expected = _crps_by_integration(mu, sigma, y)
    assert float(crps_gaussian(_point(mu), _point(sigma), _point(y))) == pytest.approx(
        expected, rel=1e-7
    )


def test_crps_gaussian_is_weighted_and_has_field():
    mu = _field(np.zeros((1, 2, 2)))
    observed = _field(np.zeros((1, 2, 2)))
    sigma = _field([[[1.0, 1.0], [2.0, 2.0]]])  # row 60° sigma 1, row 0° sigma 2
    c = (math.sqrt(2) - 1) / SQRT_PI  # CRPS at y = μ per unit sigma
    assert float(crps_gaussian(mu, sigma, observed)) == pytest.approx((W60 * c + W0 * 2 * c) / 2)
    field = crps_gaussian(mu, sigma, observed, reduce_dims="time")
    np.testing.assert_allclose(field.values, [[c, c], [2 * c, 2 * c]])
    assert field.attrs["units"] == "K"


def test_crps_ensemble_one_member_is_absolute_error():
    forecast, observed = _forecast_observed()
    one = crps_ensemble(forecast.expand_dims(member=1), observed)
    # weighted MAE: row 60° |e| mean (1+2+3+2)/4 = 2, row 0° 1
    assert float(one) == pytest.approx((W60 * 2 + W0 * 1) / 2)


def test_crps_ensemble_two_members_hand():
    ens = _point(0.0).expand_dims(member=2).copy()
    ens[1] = 2.0  # members (0, 2), observation 1
    y = _point(1.0)
    # ecdf: mean|x - y| - (1/2M²) Σ|x_i - x_j| = 1 - (0+2+2+0)/8 = 0.5
    assert float(crps_ensemble(ens, y)) == pytest.approx(1 - 4 / 8)
    # fair: 1 - (1/(2M(M-1))) Σ|x_i - x_j| = 1 - 4/4 = 0
    assert float(crps_ensemble(ens, y, method="fair")) == pytest.approx(0.0)


def test_crps_gaussian_agrees_with_quantile_ensemble():
    """A large ensemble at the Gaussian's quantiles has nearly the Gaussian's CRPS."""
    m = 2000
    members = norm.ppf((np.arange(m) + 0.5) / m, loc=1.0, scale=2.0)
    ens = xr.concat([_point(v) for v in members], dim="member")
    expected = float(crps_gaussian(_point(1.0), 2.0, _point(2.5)))
    assert float(crps_ensemble(ens, _point(2.5))) == pytest.approx(expected, rel=1e-3)


# ---------------------------------------------------------------------------------------------
# threshold-weighted (extreme-event) CRPS


def test_twcrps_gaussian_threshold_at_mean_hand_value():
    sigma = 2.0
    # y <= t = μ: only x > μ counts, where 1{y <= x} = 1 -> σ ∫_0^∞ (1 - Φ)² = σ(√2 - 1)/(2√π),
    # the same for every y below the threshold.
    expected = sigma * (math.sqrt(2) - 1) / (2 * SQRT_PI)
    for y in (3.0, -2.0):
        result = twcrps_gaussian(_point(3.0), sigma, _point(y), 3.0)
        assert float(result) == pytest.approx(expected)


@pytest.mark.parametrize(
    "mu, sigma, y, t", [(1.0, 2.0, 2.5, 0.5), (1.0, 2.0, 0.0, 2.0), (-1.0, 0.5, 3.0, 1.0)]
)
def test_twcrps_gaussian_matches_numerical_integration(mu, sigma, y, t):
    expected = _crps_by_integration(mu, sigma, y, lower=t)
    result = twcrps_gaussian(_point(mu), sigma, _point(y), t)
    assert float(result) == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_twcrps_gaussian_limits_and_lower_tail():
    mu, sigma, y = 1.0, 2.0, 2.5
    crps = float(crps_gaussian(_point(mu), sigma, _point(y)))
    # threshold far below: the whole line counts -> plain CRPS
    assert float(twcrps_gaussian(_point(mu), sigma, _point(y), mu - 40 * sigma)) == pytest.approx(
        crps
    )
    # upper + lower tail at the same threshold partition the line -> they add up to the CRPS
    upper = float(twcrps_gaussian(_point(mu), sigma, _point(y), 0.7))
    lower = float(twcrps_gaussian(_point(mu), sigma, _point(y), 0.7, tail="lower"))
    assert upper + lower == pytest.approx(crps)
    # lower tail against direct integration of ∫_{-∞}^t (F - H)²
    cdf = norm(mu, sigma).cdf
    direct = integrate.quad(lambda x: cdf(x) ** 2, -np.inf, 0.7)[0]  # y = 2.5 > t: H = 0 below t
    assert lower == pytest.approx(direct, rel=1e-7)


def test_twcrps_gaussian_per_point_threshold():
    mu = _field(np.zeros((1, 2, 2)))
    observed = _field(np.zeros((1, 2, 2)))
    threshold = _static([[0.0, 0.0], [-40.0, -40.0]])  # row 0°: everything counts -> CRPS
    field = twcrps_gaussian(mu, 1.0, observed, threshold, reduce_dims="time")
    c = (math.sqrt(2) - 1) / SQRT_PI
    np.testing.assert_allclose(field.values, [[c / 2, c / 2], [c, c]])


def test_twcrps_ensemble_hand():
    ens = _point(3.0).expand_dims(member=1)
    # one member: |max(x, t) - max(y, t)| = |3 - 2| with x = 3, y = 1, t = 2
    assert float(twcrps_ensemble(ens, _point(1.0), 2.0)) == pytest.approx(1.0)
    # lower tail: |min(3, 2) - min(1, 2)| = 1 as well; threshold 0: |0 - 0| = 0
    assert float(twcrps_ensemble(ens, _point(1.0), 0.0, tail="lower")) == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------
# SEEPS


def _seeps_matrix(p1: float) -> np.ndarray:
    """Rodwell et al. (2010) eq. 15, rows forecast (dry, light, heavy), columns observed."""
    p3 = (1 - p1) / 3
    return 0.5 * np.array(
        [
            [0, 1 / (1 - p1), 1 / p3 + 1 / (1 - p1)],
            [1 / p1, 0, 1 / p3],
            [1 / p1 + 1 / (1 - p3), 1 / (1 - p3), 0],
        ]
    )


def test_seeps_matrix_values_for_p1_half():
    # p1 = 0.5, p3 = 1/6: ½[[0, 2, 8], [2, 0, 6], [2 + 1.2, 1.2, 0]]
    np.testing.assert_allclose(_seeps_matrix(0.5), [[0, 1, 4], [1, 0, 3], [1.6, 0.6, 0]])


# (forecast, observed) in mm with wet threshold 5 mm, and the SEEPS category pair (fc, obs).
SEEPS_CASES = [
    (0.0, 0.05, (0, 0)),  # dry, dry
    (2.0, 0.0, (1, 0)),  # light, dry
    (0.0, 10.0, (0, 2)),  # dry, heavy
    (10.0, 0.0, (2, 0)),  # heavy, dry
    (10.0, 2.0, (2, 1)),  # heavy, light
    (2.0, 10.0, (1, 2)),  # light, heavy
    (0.1, 0.09, (1, 0)),  # exactly 0.1 mm is light (dry is < 0.1), 0.09 is dry
    (5.0, 5.01, (1, 2)),  # the threshold itself is light
]


def _seeps_series(p1: float) -> tuple[xr.DataArray, xr.DataArray, xr.DataArray, xr.DataArray]:
    fc = [[[c[0]]] for c in SEEPS_CASES]
    ob = [[[c[1]]] for c in SEEPS_CASES]
    kw = {
        "lats": (0.0,),
        "lons": (0.0,),
        "name": "total_precipitation_6hr",
        "units": "mm",
        "long_name": "6-hour accumulated precipitation",
    }
    return (
        _field(fc, **kw),
        _field(ob, **kw),
        _static([[p1]], lats=(0.0,), lons=(0.0,)),
        _static([[5.0]], lats=(0.0,), lons=(0.0,)),
    )


@pytest.mark.parametrize("p1", [0.5, 0.7])
def test_seeps_hand_categories(p1):
    forecast, observed, clim_p1, wet = _seeps_series(p1)
    s = _seeps_matrix(p1)
    expected = [s[c] for _, _, c in SEEPS_CASES]
    pointwise = seeps(forecast, observed, clim_p1, wet, preserve_dims="all")
    np.testing.assert_allclose(pointwise.values.ravel(), expected)
    if p1 == 0.5:
        np.testing.assert_allclose(expected, [0, 1, 4, 1.6, 0.6, 3, 1, 3])
    score = seeps(forecast, observed, clim_p1, wet)
    assert float(score) == pytest.approx(sum(expected) / len(expected))
    assert score.attrs["units"] == "1"
    assert "SEEPS" in score.attrs["long_name"]


def test_seeps_masks_p1_outside_open_interval():
    # 2x2 grid, one time; every point forecasts light (2 mm) and observes dry (0 mm): SEEPS 1/(2 p1)
    forecast = _field([[[2.0, 2.0], [2.0, 2.0]]], units="mm")
    observed = _field([[[0.0, 0.0], [0.0, 0.0]]], units="mm")
    clim_p1 = _static([[0.5, 0.9], [0.25, 0.1]])  # 0.9 and 0.1 (boundary) are masked
    wet = _static([[5.0, 5.0], [5.0, 5.0]])
    field = seeps(forecast, observed, clim_p1, wet, reduce_dims="time")
    np.testing.assert_allclose(field.values, [[1 / (2 * 0.5), np.nan], [1 / (2 * 0.25), np.nan]])
    # score: weighted over the two valid points only (row 60°: 1, row 0°: 2)
    assert float(seeps(forecast, observed, clim_p1, wet)) == pytest.approx(
        (W60 * 1 + W0 * 2) / (W60 + W0)
    )


def test_seeps_climatology_hand():
    record = [0.0, 0.0, 0.0, 0.05, 0.1, 1.0, 2.0, 3.0, 4.0, 5.0]  # 4 dry (< 0.1), 6 wet
    clim = _field(
        [[[v]] for v in record],
        lats=(0.0,),
        lons=(0.0,),
        name="total_precipitation_6hr",
        units="mm",
        long_name="6-hour accumulated precipitation",
    )
    p1, wet = seeps_climatology(clim)
    assert p1.item() == pytest.approx(4 / 10)
    # wet values 0.1, 1, 2, 3, 4, 5; 2/3 quantile at position 5 * 2/3 = 3.33 -> 3 + (4 - 3) / 3
    assert wet.item() == pytest.approx(3 + 1 / 3)
    assert p1.dims == ("latitude", "longitude") and "time" not in wet.dims
    assert wet.attrs["units"] == "mm"


# ---------------------------------------------------------------------------------------------
# errors


def test_mismatched_grid_raises():
    forecast, observed = _forecast_observed()
    shifted = observed.assign_coords(latitude=[50.0, 0.0])
    with pytest.raises(DataError, match="latitude"):
        rmse(forecast, shifted)
    with pytest.raises(DataError, match="longitude"):
        bias(forecast, observed.assign_coords(longitude=[0.0, 90.0]))
    with pytest.raises(DataError, match="time"):
        rmse(forecast, observed.assign_coords(time=observed.time + np.timedelta64(6, "h")))
    with pytest.raises(DataError, match="latitude"):
        acc(forecast, observed, _static([[0.0, 0.0], [0.0, 0.0]], lats=(50.0, 0.0)))


def test_nan_in_forecast_raises():
    forecast, observed = _forecast_observed()
    forecast[0, 0, 0] = np.nan
    for metric in (rmse, bias):
        with pytest.raises(DataError, match="NaN"):
            metric(forecast, observed)
    with pytest.raises(DataError, match="NaN"):
        crps_gaussian(forecast, 1.0, observed)
    with pytest.raises(DataError, match="NaN"):
        crps_ensemble(forecast.expand_dims(member=2), observed)
    p1, wet = _static([[0.5, 0.5], [0.5, 0.5]]), _static([[5.0, 5.0], [5.0, 5.0]])
    with pytest.raises(DataError, match="NaN"):
        seeps(forecast, observed, p1, wet)


def test_sigma_not_positive_raises():
    with pytest.raises(DataError, match="sigma"):
        crps_gaussian(_point(0.0), 0.0, _point(0.0))
    with pytest.raises(DataError, match="sigma"):
        twcrps_gaussian(_point(0.0), _point(-1.0), _point(0.0), 0.0)


def test_other_bad_inputs_raise():
    forecast, observed = _forecast_observed()
    with pytest.raises(DataError, match="member"):
        crps_ensemble(forecast, observed)
    with pytest.raises(DataError, match="reduce_dims"):
        rmse(forecast, observed, reduce_dims=["step"])
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        seeps(forecast, observed, _static([[1.5, 0.5], [0.5, 0.5]]), _static(np.ones((2, 2))))
    with pytest.raises(DataError, match="DataArray"):
        rmse(forecast.values, observed)
    with pytest.raises(DataError, match="tail"):
        twcrps_gaussian(_point(0.0), 1.0, _point(0.0), 0.0, tail="middle")


# --- significance: paired t-test with the AR(1) effective sample size -----------------------------


def _ar1(rng: np.random.Generator, rho: float, shape: tuple[int, ...]) -> np.ndarray:
    """Stationary unit-variance AR(1) series along axis 0."""
    x = np.empty(shape)
    x[0] = rng.normal(size=shape[1:])
    innovations = rng.normal(size=shape) * math.sqrt(1 - rho**2)
    for t in range(1, shape[0]):
        x[t] = rho * x[t - 1] + innovations[t]
    return x


def test_effective_sample_size_by_hand():
    # d = 1, 2, 3, 4: deviations -1.5 -0.5 0.5 1.5; Σ dev² = 5, Σ dev_t dev_t+1 = 1.25
    assert float(lag1_autocorrelation([1.0, 2.0, 3.0, 4.0])) == pytest.approx(0.25)
    assert float(ar1_effective_sample_size([1.0, 2.0, 3.0, 4.0])) == pytest.approx(
        4 * 0.75 / 1.25)  # 2.4
    # along another axis, one series per row; alternating signs: ρ₁ = -3/4, clipped to 0 -> n
    d = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, -1.0, 1.0, -1.0], [5.0, 5.0, 5.0, 5.0]])
    assert float(lag1_autocorrelation(d[1])) == pytest.approx(-0.75)
    np.testing.assert_allclose(ar1_effective_sample_size(d, axis=1), [2.4, 4.0, 4.0])
    with pytest.raises(DataError, match="at least 2"):
        ar1_effective_sample_size([1.0])
    with pytest.raises(DataError, match="NaN"):
        ar1_effective_sample_size([1.0, np.nan, 2.0])


def test_effective_sample_size_of_a_known_ar1_series():
    rho, n = 0.8, 2000
    x = _ar1(np.random.default_rng(0), rho, (n,))
    ratio = float(ar1_effective_sample_size(x)) / n
    assert ratio == pytest.approx((1 - rho) / (1 + rho), abs=0.02)  # 1/9


def test_ar1_ttest_equals_ttest_rel_without_autocorrelation():
    from scipy.stats import ttest_rel

    rng = np.random.default_rng(3)
    b = rng.normal(size=4)
    d0 = np.array([1.5, 0.5, -0.5, 0.5])  # deviations 1 0 -1 0: ρ₁ = 0 exactly
    d1 = np.array([0.3, 1.2, -0.4, 0.9])  # ρ₁ < 0: clipped, n_eff = n as well
    for d in (d0, d1):
        assert float(lag1_autocorrelation(d)) <= 0
        r = paired_ttest_ar1(b + d, b)
        ref = ttest_rel(b + d, b)
        assert float(r.n_eff) == 4 and float(r.df) == 3
        assert float(r.statistic) == pytest.approx(ref.statistic, rel=1e-12)
        assert float(r.pvalue) == pytest.approx(ref.pvalue, rel=1e-12)
    # autocorrelated differences: a smaller sample, a larger p-value than ttest_rel
    d = np.array([1.0, 1.2, 1.1, 0.2, 0.1, 0.3, 1.0, 1.3])
    r, ref = paired_ttest_ar1(b.repeat(2) + d, b.repeat(2)), ttest_rel(b.repeat(2) + d, b.repeat(2))
    assert float(r.n_eff) < 8 and float(r.pvalue) > ref.pvalue
    # identical series: undefined, NaN (never significant)
    assert np.isnan(paired_ttest_ar1(b, b).pvalue)
    with pytest.raises(DataError, match="same shape"):
        paired_ttest_ar1(b, b[:3])


def test_ar1_ttest_false_positive_rate_under_autocorrelated_null():
    """Independent AR(1) pairs with equal means (ρ = 0.6, 200 times, 2000 pairs): the plain paired
    t-test rejects far more often than alpha; the AR(1) test close to alpha."""
    from scipy.stats import ttest_rel

    rng = np.random.default_rng(42)
    a, b = _ar1(rng, 0.6, (200, 2000)), _ar1(rng, 0.6, (200, 2000))
    fpr_ar1 = float((paired_ttest_ar1(a, b).pvalue < 0.05).mean())
    fpr_plain = float((ttest_rel(a, b).pvalue < 0.05).mean())
    assert abs(fpr_ar1 - 0.05) < 0.025
    assert fpr_plain > 0.25
