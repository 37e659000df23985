"""Per-grid-point skill of a run's test fields, and where one run is significantly better.

* :func:`skill_fields`: from ``fields.nc`` (``<var>`` predictions, ``<var>_target`` truth and,
  for post-processing, ``<var>_sigma``), per variable ``<var>_rmse`` and ``<var>_bias`` (over
  time, :func:`wpeft.metrics.rmse` / :func:`~wpeft.metrics.bias` with ``reduce_dims="time"``) and
  ``<var>_crps`` (Gaussian CRPS, where ``<var>_sigma`` exists), on ([level,] latitude,
  longitude).
* :func:`skill_difference`: ``metric(A) − metric(B)`` at every grid point (e.g. WeatherPEFT −
  Full-Tuning: negative RMSE difference = A better) with a significance mask from a paired test
  over time at each grid point.

Paired test. At each grid point the per-time losses of the two runs are paired by valid time:
squared errors for ``rmse``, signed errors for ``bias``, absolute errors for ``mae``, pointwise
Gaussian CRPS for ``crps``, and "mean loss A = mean loss B" is tested two-sided (for ``rmse``:
equal MSE; for ``bias``: equal bias). ``test="ttest_ar1"`` (default) is the paired t-test with
the AR(1) effective sample size of the paired differences
(:func:`wpeft.metrics.significance.paired_ttest_ar1`): consecutive 6-hourly errors are not
independent, and ``n_eff = n (1 − ρ₁)/(1 + ρ₁)`` replaces the number of times in the standard
error and the degrees of freedom. ``test="ttest"`` is the plain paired t-test
(:func:`scipy.stats.ttest_rel`) and ``test="wilcoxon"`` the Wilcoxon signed-rank test; both
ignore serial correlation, so their p-values are optimistic on 6-hourly series.
``significant = p < alpha`` (default 0.05); points where the test is undefined (all paired
differences equal, e.g. identical forecasts) are not significant. ``correction="fdr_bh"`` applies
the Benjamini-Hochberg false-discovery-rate control over all grid points (and variables) instead
of a per-point alpha (the maps test many points at once).

:func:`domain_mean_losses`: the same per-time losses, latitude-weighted mean over the domain (as
the task scores average them), one ``(time,)`` series per variable, for tests of whole-domain
scores (:func:`wpeft.training.compare.tables`).

Levels are flattened into variable names as in the summary scores (``temperature_850``), so the
result is one array ``(variable, latitude, longitude)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import xarray as xr
from scipy import stats

from wpeft.errors import ConfigError, DataError
from wpeft.metrics import bias, crps_gaussian, latitude_weights, rmse
from wpeft.metrics.significance import TEST_NAMES, paired_ttest_ar1
from wpeft.runs.layout import CONFIG, FIELDS, RunLayout, read_json_object

__all__ = [
    "benjamini_hochberg",
    "domain_mean_losses",
    "predicted_variables",
    "skill_difference",
    "skill_fields",
]

Metric = Literal["rmse", "bias", "mae", "crps"]
Test = Literal["ttest_ar1", "ttest", "wilcoxon"]


def _as_fields(obj: Any) -> tuple[xr.Dataset, str]:
    """``fields.nc`` of a Run / run directory / netCDF path, or a Dataset as is; and a label.

    A run is anything with ``path``, ``method`` and ``fields`` (:class:`~wpeft.runs.store.Run`);
    this module does not import the store, which imports it.
    """
    if isinstance(obj, xr.Dataset):
        return obj, str(obj.attrs.get("run", "dataset"))
    if isinstance(obj, (str, Path)):
        p = Path(obj)
        if not p.is_dir():
            return xr.open_dataset(p, engine="netcdf4"), str(p)
        layout = RunLayout(p)
        if not layout.has_config:
            raise DataError(f"{p} is not a run directory (no {CONFIG}).")
        if not layout.has_fields:
            raise DataError(f"Run {p} has no {FIELDS} yet (still training?).")
        method = (read_json_object(layout.config) or {}).get("method")
        return xr.open_dataset(layout.fields, engine="netcdf4"), f"{method} ({p.name})"
    if hasattr(obj, "path") and hasattr(obj, "fields"):
        if obj.fields is None:
            raise DataError(f"Run {obj.path} has no {FIELDS} yet (still training?).")
        return obj.fields, f"{obj.method} ({Path(obj.path).name})"
    raise TypeError(f"Expected a Run, a path or an xr.Dataset, got {type(obj).__name__}.")


def predicted_variables(fields: xr.Dataset) -> list[str]:
    """Variables with a prediction ``<var>`` and a truth ``<var>_target`` in ``fields``."""
    return [str(v) for v in fields.data_vars if f"{v}_target" in fields.data_vars]


def skill_fields(obj: Any, metrics: Sequence[str] = ("rmse", "bias", "crps")) -> xr.Dataset:
    """Per-grid-point skill of a run's test fields.

    Args:
        obj: A :class:`~wpeft.runs.store.Run`, run directory, ``fields.nc`` path or Dataset.
        metrics: Any of ``rmse``, ``bias``, ``crps`` (CRPS only where ``<var>_sigma`` exists).

    Returns:
        ``<var>_<metric>`` on ([level,] latitude, longitude), in the variable's units.
    """
    fields, label = _as_fields(obj)
    out: dict[str, xr.DataArray] = {}
    for v in predicted_variables(fields):
        f, o = fields[v], fields[f"{v}_target"]
        if "rmse" in metrics:
            out[f"{v}_rmse"] = rmse(f, o, reduce_dims="time")
        if "bias" in metrics:
            out[f"{v}_bias"] = bias(f, o, reduce_dims="time")
        if "crps" in metrics and f"{v}_sigma" in fields.data_vars:
            out[f"{v}_crps"] = crps_gaussian(f, fields[f"{v}_sigma"], o, reduce_dims="time")
    for name, da in out.items():
        da.name = name
    return xr.Dataset(out, attrs={"source": label, "description": "per-grid-point skill over time"})


def _flat(fields: xr.Dataset, v: str, suffix: str = "") -> dict[str, xr.DataArray]:
    """``<v><suffix>`` as (time, latitude, longitude) arrays, one per level (``<v>_<level>``) or
    per forecast lead (``<v>_<hours>h``, precipitation's ``prediction_timedelta``), named as in
    the summary scores."""
    da = fields[f"{v}{suffix}"]
    dims = ("time", "latitude", "longitude")
    if "level" in da.dims:
        return {
            f"{v}_{int(lv)}": da.sel(level=lv, drop=True).transpose(*dims)
            for lv in da["level"].values
        }
    if "prediction_timedelta" in da.dims:
        return {
            f"{v}_{int(lead / np.timedelta64(1, 'h'))}h": da.sel(
                prediction_timedelta=lead, drop=True
            ).transpose(*dims)
            for lead in da["prediction_timedelta"].values
        }
    return {v: da.transpose(*dims)}


def _losses(fields: xr.Dataset, metric: Metric) -> dict[str, xr.DataArray]:
    """Per-time pointwise losses ``(time, latitude, longitude)`` per flattened variable."""
    out = {}
    for v in predicted_variables(fields):
        pred, truth = _flat(fields, v), _flat(fields, v, "_target")
        sigma = _flat(fields, v, "_sigma") if f"{v}_sigma" in fields.data_vars else None
        for name in pred:
            # one dataset: the same coordinates, so plain arrays (no alignment per variable)
            e = pred[name].copy(deep=False, data=pred[name].values - truth[name].values)
            if metric == "rmse":
                out[name] = e**2
            elif metric == "bias":
                out[name] = e
            elif metric == "mae":
                out[name] = abs(e)
            elif metric == "crps":
                if sigma is None:
                    continue
                out[name] = crps_gaussian(pred[name], sigma[name], truth[name], reduce_dims=[])
            else:
                raise ConfigError(f"metric must be rmse, bias, mae or crps, got {metric!r}.")
    return out


def domain_mean_losses(obj: Any, metric: Metric = "rmse") -> dict[str, xr.DataArray]:
    """Per-time losses of a run, latitude-weighted mean over the domain.

    The pointwise loss is the one :func:`skill_difference` pairs (squared error for ``rmse``, so
    the series is the per-time MSE whose time mean is the square of the task's RMSE score; signed
    error for ``bias``; absolute error for ``mae``; Gaussian CRPS for ``crps``), averaged with
    the weights ``cos φ / mean cos φ`` of :func:`wpeft.metrics.latitude_weights`.

    Args:
        obj: A :class:`~wpeft.runs.store.Run`, run directory, ``fields.nc`` path or Dataset.
        metric: ``rmse``, ``bias``, ``mae`` or ``crps`` (variables without ``<var>_sigma`` are
            left out for ``crps``).

    Returns:
        ``{flattened name: (time,) DataArray}``, names as in the summary scores
        (``2m_temperature``, ``temperature_850``, ``total_precipitation_6hr_12h``).
    """
    fields, _ = _as_fields(obj)
    out: dict[str, xr.DataArray] = {}
    for name, loss in _losses(fields, metric).items():
        out[name] = _weighted_domain_mean(loss, latitude_weights(loss["latitude"]).values)
    return out


def _weighted_domain_mean(loss: xr.DataArray, w: np.ndarray) -> xr.DataArray:
    """``loss`` ``(time, latitude, longitude)`` -> ``(time,)``: Σ w·x / Σ w over the non-NaN
    entries of each time (xarray's ``weighted(w).mean``; NaN where a time has none), in two
    einsums instead of xarray's aligned operations (a scorecard takes hundreds of these)."""
    x = np.asarray(loss.values, dtype=np.float64)
    valid = ~np.isnan(x)
    num = np.einsum("tyx,y->t", np.where(valid, x, 0.0), w)
    den = np.einsum("tyx,y->t", valid.astype(np.float64), w)
    mean = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return xr.DataArray(mean, dims=("time",), coords={"time": loss["time"]}, name=loss.name)


def _check_same(a: xr.Dataset, b: xr.Dataset, la: str, lb: str) -> None:
    for dim in ("time", "latitude", "longitude", "level", "prediction_timedelta"):
        if (dim in a.dims) != (dim in b.dims):
            raise DataError(f"{la} and {lb} differ: only one has a {dim!r} dimension.")
        if dim not in a.dims:
            continue
        va, vb = a[dim].values, b[dim].values
        if va.shape != vb.shape:
            raise DataError(
                f"{la} and {lb} are on different {dim} axes ({va.size} vs {vb.size} values); "
                "compare runs of the same task and data."
            )
        same = (
            np.allclose(va.astype(np.float64), vb.astype(np.float64), rtol=0, atol=1e-6)
            if np.issubdtype(va.dtype, np.number) and np.issubdtype(vb.dtype, np.number)
            else np.array_equal(va, vb)
        )
        if not same:
            raise DataError(
                f"{la} and {lb} have different {dim} coordinates; compare runs of the same task "
                "and data (same grid and test times)."
            )


def benjamini_hochberg(p: np.ndarray, alpha: float) -> np.ndarray:
    """Boolean rejections of the Benjamini-Hochberg procedure at FDR ``alpha`` (NaN: never)."""
    flat = p.ravel()
    ok = np.isfinite(flat)
    reject = np.zeros(flat.shape, dtype=bool)
    pv = flat[ok]
    if pv.size:
        order = np.argsort(pv)
        ranked = pv[order]
        below = ranked <= alpha * np.arange(1, pv.size + 1) / pv.size
        if below.any():
            cutoff = ranked[np.nonzero(below)[0].max()]
            reject[np.nonzero(ok)[0]] = pv <= cutoff
    return reject.reshape(p.shape)


def skill_difference(
    run_a: Any,
    run_b: Any,
    metric: Metric = "rmse",
    *,
    variables: str | Iterable[str] | None = None,
    alpha: float = 0.05,
    test: Test = "ttest_ar1",
    correction: Literal["none", "fdr_bh"] = "none",
) -> xr.Dataset:
    """``metric(A) − metric(B)`` per grid point, with a paired significance test over time.

    Args:
        run_a / run_b: Runs (:class:`~wpeft.runs.store.Run`, run directory, ``fields.nc`` path or
            fields Dataset) on the same grid and test times.
        metric: ``rmse`` (over time), ``bias`` (mean error), ``mae`` or ``crps`` (mean Gaussian
            CRPS; variables without ``<var>_sigma`` in both runs are skipped).
        variables: Flattened names (``2m_temperature``, ``temperature_850``) or base names
            (``temperature``: every level) to keep; default all shared ones.
        alpha: Significance level (per point, or the FDR with ``correction="fdr_bh"``).
        test: ``ttest_ar1`` (paired t-test with the AR(1) effective sample size), ``ttest``
            (plain paired t-test) or ``wilcoxon`` (signed-rank), see the module docstring.
        correction: ``none`` or ``fdr_bh`` (Benjamini-Hochberg over all points and variables).

    Returns:
        Dataset on ``(variable, latitude, longitude)``: ``difference`` (A − B, units of the
        variable), ``significant`` (bool), ``p_value``, ``metric_a``, ``metric_b`` and, for
        ``ttest_ar1``, ``n_eff`` (effective sample size); attrs name the runs, metric, test (and
        ``test_name``, its caption), alpha, the number of paired times ``n_time`` and, for
        ``ttest_ar1``, the median and minimum n_eff over the points (``n_eff_median``,
        ``n_eff_min``).

    Raises:
        DataError: the runs are on different grids / times / levels or share no variable.
    """
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}.")
    if test not in TEST_NAMES:
        raise ConfigError(f"test must be one of {sorted(TEST_NAMES)}, got {test!r}.")
    if correction not in ("none", "fdr_bh"):
        raise ConfigError(f"correction must be 'none' or 'fdr_bh', got {correction!r}.")
    fa, la = _as_fields(run_a)
    fb, lb = _as_fields(run_b)
    _check_same(fa, fb, la, lb)
    loss_a, loss_b = _losses(fa, metric), _losses(fb, metric)
    names = _select([n for n in loss_a if n in loss_b], variables)
    if not names:
        raise DataError(
            f"{la} and {lb} share no variable to compare with metric {metric!r} "
            f"(A: {sorted(loss_a)}, B: {sorted(loss_b)}, requested: {variables!r})."
        )
    # (time, variable, latitude, longitude) per-time losses
    a = np.stack([loss_a[n].values for n in names], axis=1).astype(np.float64)
    b = np.stack([loss_b[n].values for n in names], axis=1).astype(np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise DataError("The fields hold NaN or infinite values; skill needs finite fields.")
    n_time = a.shape[0]
    if n_time < 2:
        raise DataError(f"A paired test over time needs at least 2 times, got {n_time}.")
    mean_a, mean_b = a.mean(0), b.mean(0)
    if metric == "rmse":
        mean_a, mean_b = np.sqrt(mean_a), np.sqrt(mean_b)
    p, n_eff = _paired_p_values(a, b, test)
    if correction == "fdr_bh":
        significant = benjamini_hochberg(p, alpha)
    else:
        significant = np.nan_to_num(p, nan=1.0) < alpha
    template = loss_a[names[0]]
    dims = ("variable", "latitude", "longitude")
    sig_name = f"{TEST_NAMES[test]}, p < {alpha}"
    if correction == "fdr_bh":
        sig_name += " (Benjamini-Hochberg FDR)"
    units = [str(fa[_base(n, fa)].attrs.get("units", "")) for n in names]
    better = "bias of A minus bias of B" if metric == "bias" else "negative: A better"
    out = xr.Dataset(
        {
            "difference": (dims, mean_a - mean_b, {
                "long_name": f"{metric} of A minus {metric} of B", "description": better}),
            "significant": (dims, significant, {"long_name": sig_name}),
            "p_value": (dims, p, {
                "units": "1", "long_name": f"{TEST_NAMES[test]} p-value",
                "description": "NaN where the test is undefined (constant paired differences)"}),
            "metric_a": (dims, mean_a, {"long_name": f"{metric} of A over time"}),
            "metric_b": (dims, mean_b, {"long_name": f"{metric} of B over time"}),
        },
        coords={
            "variable": names,
            "variable_units": ("variable", units),
            "latitude": ("latitude", template["latitude"].values, {"units": "degrees_north"}),
            "longitude": ("longitude", template["longitude"].values, {"units": "degrees_east"}),
        },
        attrs={
            "run_a": la, "run_b": lb, "metric": metric, "test": test,
            "test_name": TEST_NAMES[test], "alpha": alpha, "correction": correction,
            "n_time": n_time,
        },
    )
    if n_eff is not None:
        out["n_eff"] = (dims, n_eff, {
            "units": "1", "long_name": "AR(1) effective sample size of the paired differences"})
        out.attrs.update(n_eff_median=float(np.median(n_eff)), n_eff_min=float(n_eff.min()))
    return out


def _select(names: list[str], variables: str | Iterable[str] | None) -> list[str]:
    """Flattened names matching ``variables`` (a flattened name, or a base name: every level or
    lead)."""
    if variables is None:
        return names
    wanted = [variables] if isinstance(variables, str) else list(variables)

    def matches(name: str, w: str) -> bool:
        rest = name[len(w) + 1 :].removesuffix("h")  # a level or a lead in hours
        return name == w or (name.startswith(f"{w}_") and rest.isdigit())

    return [n for n in names if any(matches(n, w) for w in wanted)]


def _paired_p_values(a: np.ndarray, b: np.ndarray, test: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Two-sided p-values of the paired test over axis 0 (and, for ``ttest_ar1``, the effective
    sample sizes, else None); NaN where the paired differences are all equal (zero variance: the
    test is undefined, and nothing can be concluded)."""
    d = a - b
    n_eff = None
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        if test == "ttest_ar1":
            result = paired_ttest_ar1(a, b, axis=0)
            p, n_eff = result.pvalue, result.n_eff
        elif test == "ttest":
            p = np.asarray(stats.ttest_rel(a, b, axis=0).pvalue, dtype=np.float64)
        else:
            p = np.full(d.shape[1:], np.nan)
            varying = ~np.all(d == d[:1], axis=0)
            if varying.any():
                p[varying] = stats.wilcoxon(d[:, varying], axis=0, zero_method="wilcox").pvalue
    return np.where(np.all(d == d[:1], axis=0), np.nan, p), n_eff


def _base(flat: str, fields: xr.Dataset) -> str:
    if flat in fields.data_vars:
        return flat
    return flat.rsplit("_", 1)[0]
