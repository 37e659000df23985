"""Paired significance tests over time that allow for serial correlation.

Consecutive 6-hourly forecast errors are not independent: a plain paired t-test over ``n`` test
times treats them as ``n`` independent samples and so overstates the evidence (its p-values are
too small, and "significant" differences appear far more often than ``alpha`` under the null).
The standard remedy (Wilks 1997; used by WeatherBench-X's inference module) models the paired
differences ``d_t = loss_A(t) − loss_B(t)`` as AR(1) and replaces ``n`` by the effective sample
size

    n_eff = n (1 − ρ₁) / (1 + ρ₁),

with ρ₁ the lag-1 autocorrelation of ``d`` along time, both in the standard error of the mean
difference (``s / sqrt(n_eff)``, ``s`` the sample standard deviation) and in the degrees of
freedom (``n_eff − 1``) of the two-sided t-test. ρ₁ is clipped to ``[0, 1)``: negative
autocorrelation would make ``n_eff > n``, and the test never claims more independent samples
than there are times (at ρ₁ ≤ 0 it is :func:`scipy.stats.ttest_rel`). Where ``n_eff ≤ 1`` (ρ₁
close to 1 on a short series) there is no degree of freedom left and the p-value is NaN (not
significant). The sample ρ₁ is biased low on short series (by about ``(1 + 4ρ)/n``), so the test
stays slightly liberal there.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from wpeft.errors import DataError

__all__ = [
    "TEST_NAMES",
    "Ar1TTestResult",
    "ar1_effective_sample_size",
    "lag1_autocorrelation",
    "paired_ttest_ar1",
]

#: What each paired test of :func:`wpeft.runs.skill_difference` is called in captions and notes.
TEST_NAMES: dict[str, str] = {
    "ttest_ar1": "paired t-test with AR(1) effective sample size",
    "ttest": "paired t-test",
    "wilcoxon": "Wilcoxon signed-rank test",
}


class Ar1TTestResult(NamedTuple):
    """:func:`paired_ttest_ar1` per series (arrays shaped like ``d`` without ``axis``)."""

    statistic: np.ndarray  # t = mean(d) / (s / sqrt(n_eff))
    pvalue: np.ndarray  # two-sided; NaN where d is constant or n_eff <= 1
    n_eff: np.ndarray  # effective sample size, in (0, n]
    df: np.ndarray  # n_eff - 1


def _series(d: ArrayLike, axis: int) -> np.ndarray:
    x = np.moveaxis(np.asarray(d, dtype=np.float64), axis, 0)
    if x.shape[0] < 2:
        raise DataError(f"A series along axis {axis} needs at least 2 values, got {x.shape[0]}.")
    if not np.isfinite(x).all():
        raise DataError("The paired differences hold NaN or infinite values; give finite series.")
    return x


def lag1_autocorrelation(d: ArrayLike, axis: int = 0) -> np.ndarray:
    """Sample lag-1 autocorrelation ``Σ (d_t − d̄)(d_{t+1} − d̄) / Σ (d_t − d̄)²`` along ``axis``.

    Args:
        d: Series, e.g. paired loss differences ``(time, ...)``.
        axis: The time axis.

    Returns:
        ρ₁ per series, shaped like ``d`` without ``axis`` (unclipped, in [-1, 1]); NaN where the
        series is constant.
    """
    x = _series(d, axis)
    dev = x - x.mean(axis=0)
    denom = (dev**2).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (dev[1:] * dev[:-1]).sum(axis=0) / denom, np.nan)


def ar1_effective_sample_size(d: ArrayLike, axis: int = 0) -> np.ndarray:
    """``n_eff = n (1 − ρ₁) / (1 + ρ₁)`` of series along ``axis``, ρ₁ clipped to ``[0, 1)``.

    Args:
        d: Series ``(time, ...)`` (or time on ``axis``), e.g. paired loss differences.
        axis: The time axis (length ``n`` ≥ 2).

    Returns:
        n_eff per series, in ``(0, n]``: ``n`` where ρ₁ ≤ 0 (negative autocorrelation does not
        inflate the sample) or the series is constant.
    """
    x = _series(d, axis)
    n = x.shape[0]
    rho = np.clip(np.nan_to_num(lag1_autocorrelation(x, 0), nan=0.0), 0.0, np.nextafter(1.0, 0))
    return n * (1.0 - rho) / (1.0 + rho)


def paired_ttest_ar1(a: ArrayLike, b: ArrayLike, axis: int = 0) -> Ar1TTestResult:
    """Two-sided paired t-test of "mean(a) = mean(b)" with the AR(1) effective sample size.

    Args:
        a, b: Paired samples of the same shape, time on ``axis`` (e.g. per-time losses
            ``(time, variable, latitude, longitude)`` of two runs).
        axis: The time axis.

    Returns:
        :class:`Ar1TTestResult`; with ρ₁ ≤ 0 it equals :func:`scipy.stats.ttest_rel`.

    Raises:
        DataError: ``a`` and ``b`` differ in shape, hold NaN, or have fewer than 2 times.
    """
    a_, b_ = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_.shape != b_.shape:
        raise DataError(f"Paired samples need the same shape, got {a_.shape} and {b_.shape}.")
    d = _series(a_ - b_, axis)
    n_eff = ar1_effective_sample_size(d, 0)
    df = n_eff - 1.0
    sd = d.std(axis=0, ddof=1)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        t = d.mean(axis=0) / (sd / np.sqrt(n_eff))
        p = 2.0 * stats.t.sf(np.abs(t), np.where(df > 0, df, np.nan))
    constant = np.all(d == d[:1], axis=0)
    p = np.where(constant | (df <= 0), np.nan, p)
    t = np.where(constant, np.nan, t)
    return Ar1TTestResult(np.asarray(t), np.asarray(p), np.asarray(n_eff), np.asarray(df))
