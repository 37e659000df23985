"""A WeatherBench-X-style scorecard: the test scores of N runs against one reference run.

Why: a table of absolute scores hides what matters when choosing a fine-tuning method, namely how
much better or worse each run is than a reference (e.g. Full-Tuning) per variable, level or lead
and metric, and whether that difference is more than noise. :func:`scorecard` reads it from the
run directories alone (``summary.json`` scores, ``fields.nc`` test fields); the figure is
:func:`wpeft.viz.scorecard.plot_scorecard` (no matplotlib here).

**Sign convention.** ``relative_difference = 100 · (run − reference) / |reference|`` in %, the
plain change of the score. ``oriented_difference`` is the same number with the sign flipped for
metrics where higher is better (ACC), so that **negative = better for every metric**: an RMSE
that drops by 3 % and an ACC that rises by 3 % are both −3 %, ``better`` is True for both, and a
diverging colour map with blue below zero reads "blue = better" across the card.

**Significance.** For metrics with a per-time loss (RMSE: squared error, MAE, CRPS) the
latitude-weighted domain-mean loss per test time of the run and of the reference
(:func:`wpeft.runs.skill.domain_mean_losses`) are paired over the test times and tested two-sided
with the paired t-test with the AR(1) effective sample size
(:func:`wpeft.metrics.significance.paired_ttest_ar1`), as the ``wpeft compare`` tables do.
Metrics without one (ACC, SEEPS), runs without ``fields.nc`` and runs on other test times get
``p_value`` NaN and ``significant`` False.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from wpeft.errors import ConfigError, DataError
from wpeft.metrics.significance import TEST_NAMES, paired_ttest_ar1
from wpeft.runs.curves import is_headline
from wpeft.runs.layout import SUMMARY
from wpeft.runs.skill import domain_mean_losses
from wpeft.runs.store import Run, open_run

__all__ = ["HIGHER_IS_BETTER", "LOWER_IS_BETTER", "SCORECARD_BINS", "run_label", "scorecard"]

#: Edges (%) of the symmetric diverging colour scale of ``oriented_difference``:
#: ±1, ±2, ±5, ±10, ±20, ±50 (beyond ±50 %: the outermost colours).
SCORECARD_BINS: tuple[float, ...] = (1, 2, 5, 10, 20, 50)
#: Score metrics where a lower value is better.
LOWER_IS_BETTER: frozenset[str] = frozenset({"rmse", "mae", "crps", "seeps"})
#: Score metrics where a higher value is better.
HIGHER_IS_BETTER: frozenset[str] = frozenset({"acc"})
#: Metrics with a per-time loss to pair (:func:`wpeft.runs.skill.domain_mean_losses`).
_PAIRED = ("rmse", "mae", "crps")
_LEAD = re.compile(r"^(.+)_(\d+)h$")
_LEVEL = re.compile(r"^(.+)_(\d+)$")


def _as_run(obj: Run | str | Path) -> Run:
    if isinstance(obj, Run):
        return obj
    if isinstance(obj, (str, Path)):
        return open_run(obj)
    raise TypeError(f"Expected a Run or a run directory, got {type(obj).__name__}.")


def run_label(run: Run) -> str:
    """``"weatherpeft 4% s0"``: method, budget (``default``: the method's own size) and seed."""
    ident = run.identity
    budget = "default" if ident.budget is None else f"{100 * ident.budget:.3g}%"
    return f"{ident.method} {budget} s{ident.seed}"


def _labels(runs: Sequence[Run]) -> list[str]:
    """:func:`run_label` of each run; directory names where two runs would share a label."""
    labels = [run_label(r) for r in runs]
    if len(set(labels)) == len(labels):
        return labels
    names = [r.path.name for r in runs]
    return names if len(set(names)) == len(names) else [str(r.path) for r in runs]


def _split_score(key: str) -> tuple[str, str]:
    """``"rmse/temperature_850"`` -> ``("rmse", "temperature_850")``."""
    metric, sep, variable = key.partition("/")
    if not sep or not metric or not variable:
        raise DataError(f"score key {key!r} is not '<metric>/<variable>'.")
    return metric, variable


def _parse_variable(name: str) -> tuple[str, float, float]:
    """``temperature_850`` -> ``("temperature", 850, nan)``; ``total_precipitation_6hr_12h`` ->
    ``("total_precipitation_6hr", nan, 12)``; ``2m_temperature`` -> ``("2m_temperature", nan,
    nan)``."""
    if m := _LEAD.match(name):
        return m.group(1), math.nan, float(m.group(2))
    if m := _LEVEL.match(name):
        return m.group(1), float(m.group(2)), math.nan
    return name, math.nan, math.nan


def _scores(run: Run) -> dict[str, float]:
    summary = run.summary
    if summary is None:
        raise ConfigError(
            f"run {run.path} has no {SUMMARY} yet (still training?); give finished runs."
        )
    scores = summary.get("scores")
    if not isinstance(scores, dict):
        raise ConfigError(f"run {run.path}: {SUMMARY} holds no scores; give finished runs.")
    return {
        str(k): float(v) for k, v in scores.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _columns(
    scores: dict[str, float], metrics: Sequence[str] | None, variables: Sequence[str] | None
) -> list[str]:
    """The reference's score keys on the card, ordered by metric then as the scores list them."""
    known = LOWER_IS_BETTER | HIGHER_IS_BETTER
    if metrics is not None:
        unknown = [m for m in metrics if m not in known]
        if unknown:
            raise ConfigError(
                f"metrics {unknown} have no known orientation; choose from {sorted(known)}."
            )
    keys = [k for k in scores if _split_score(k)[0] in known]  # not rmse_bilinear, crps_raw, ...
    order = list(metrics) if metrics is not None else [
        *dict.fromkeys(_split_score(k)[0] for k in keys)]
    keys = [k for k in keys if _split_score(k)[0] in order]
    if variables is not None:
        keys = [k for k in keys if is_headline(_split_score(k)[1], tuple(variables))]
    keys.sort(key=lambda k: order.index(_split_score(k)[0]))
    if not keys:
        raise ConfigError(
            f"the reference has no score for metrics {metrics} and variables {variables}; its "
            f"scores are {sorted(scores)}."
        )
    return keys


def _variables(scores: dict[str, float]) -> set[str]:
    known = LOWER_IS_BETTER | HIGHER_IS_BETTER
    return {_split_score(k)[1] for k in scores if _split_score(k)[0] in known}


def _check_comparable(ref: Run, ref_scores: dict[str, float], runs: Sequence[Run],
                      scores: Sequence[dict[str, float]]) -> None:
    """Every run is of the reference's task and scores the reference's variables."""
    task = ref.task
    other_task = [f"{r.path} ({r.task})" for r in runs if r.task != task]
    if other_task:
        raise ConfigError(
            f"runs {', '.join(other_task)} are of another task than the reference {ref.path} "
            f"({task}); a scorecard compares runs of one task."
        )
    want = _variables(ref_scores)
    for run, s in zip(runs, scores):
        have = _variables(s)
        if have != want:
            missing, extra = sorted(want - have), sorted(have - want)
            raise ConfigError(
                f"run {run.path} scores other variables than the reference {ref.path} "
                f"(missing {missing}, extra {extra}); compare runs with the same variables."
            )


def _losses(run: Run, metrics: Iterable[str], cache: dict[Path, dict[str, Any]]) -> dict[str, Any]:
    """``{metric: {variable: (time,) DataArray}}`` of the run's test fields; {} without fields."""
    if run.path not in cache:
        fields = run.fields
        cache[run.path] = {} if fields is None else {
            m: domain_mean_losses(fields, m) for m in metrics  # type: ignore[arg-type]
        }
    return cache[run.path]


def _p_value(a: xr.DataArray | None, b: xr.DataArray | None) -> float:
    """Two-sided p of the AR(1) paired t-test of two ``(time,)`` loss series; NaN if untestable."""
    if a is None or b is None:
        return math.nan
    try:
        a, b = xr.align(a, b, join="exact")  # the same test times
        return float(paired_ttest_ar1(a.values, b.values).pvalue)
    except (ValueError, DataError):  # other test times, a single time, non-finite losses
        return math.nan


def scorecard(
    runs: Sequence[Run | str | Path],
    reference: Run | str | Path,
    *,
    metrics: Sequence[str] | None = None,
    variables: Sequence[str] | None = None,
    alpha: float = 0.05,
) -> xr.Dataset:
    """Test scores of ``runs`` against ``reference``: absolute values, relative differences and
    significance (see the module docstring for the sign convention and the test).

    Args:
        runs: Finished runs (:class:`~wpeft.runs.store.Run` or run directories) of the
            reference's task; the reference itself may be among them (it is listed once).
        reference: The run every other is compared with (first row of the card).
        metrics: Score metrics to show, in this order (default: every metric of the
            reference's scores with a known orientation, :data:`LOWER_IS_BETTER` /
            :data:`HIGHER_IS_BETTER`; reference-forecast scores such as ``rmse_bilinear`` or
            ``crps_raw`` are never shown: they do not depend on the run).
        variables: Flattened (``temperature_850``) or base names (``temperature``: every level
            or lead) to show; default all.
        alpha: Significance level of the paired test.

    Returns:
        Dataset on ``(run, score)``, R = 1 + other runs rows (the reference first) and S score
        columns (``"rmse/temperature_850"``): ``value`` (the run's score), ``relative_difference``
        (%, ``100 (value − ref) / |ref|``), ``oriented_difference`` (%, negative = better for
        every metric), ``better`` (bool), ``p_value`` and ``significant`` (bool; False where
        untested). Coordinates: ``run`` (labels, :func:`run_label` or directory names),
        ``run_path``, and per score ``metric``, ``variable`` (flattened), ``base_variable``,
        ``level`` (hPa) and ``lead_hours`` (NaN where the score has none), ``higher_is_better``.
        Attributes: task, reference label and path, alpha, test name, sign convention, bins
        (:data:`SCORECARD_BINS`). ``card.to_dataframe()`` is the tidy table.

    Raises:
        ConfigError: a run is unfinished, of another task or scores other variables than the
            reference; ``metrics`` names a metric without a known orientation; ``alpha`` is out
            of (0, 1).
    """
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}.")
    ref = _as_run(reference)
    others = [r for r in map(_as_run, runs) if r.path.resolve() != ref.path.resolve()]
    rows = [ref, *others]
    ref_scores = _scores(ref)
    scores = [_scores(r) for r in others]
    _check_comparable(ref, ref_scores, others, scores)
    keys = _columns(ref_scores, metrics, variables)

    value = np.array([[s.get(k, math.nan) for k in keys] for s in [ref_scores, *scores]])
    base = value[:1]
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(np.abs(base) > 0, 100.0 * (value - base) / np.abs(base), np.nan)
    metric_of = [_split_score(k)[0] for k in keys]
    higher = np.array([m in HIGHER_IS_BETTER for m in metric_of])
    oriented = np.where(higher, -relative, relative)
    oriented = oriented + 0.0  # no negative zero on the reference row

    paired = sorted(set(metric_of) & set(_PAIRED))
    p = np.full(value.shape, np.nan)
    cache: dict[Path, dict[str, Any]] = {}
    ref_losses = _losses(ref, paired, cache) if paired else {}
    if ref_losses:
        for i, run in enumerate(others, start=1):
            run_losses = _losses(run, paired, cache)
            for j, key in enumerate(keys):
                metric, var = _split_score(key)
                if metric in paired and run_losses:
                    p[i, j] = _p_value(run_losses[metric].get(var), ref_losses[metric].get(var))
    significant = np.nan_to_num(p, nan=1.0) < alpha

    parsed = [_parse_variable(_split_score(k)[1]) for k in keys]
    dims = ("run", "score")
    return xr.Dataset(
        {
            "value": (dims, value, {"long_name": "test score of the run"}),
            "relative_difference": (dims, relative, {
                "units": "%", "long_name": "relative difference to the reference",
                "description": "100 (value - reference) / |reference|"}),
            "oriented_difference": (dims, oriented, {
                "units": "%",
                "long_name": "relative difference to the reference, negative = better",
                "description": "relative_difference, sign flipped where higher is better (ACC)"}),
            "better": (dims, oriented < 0, {"long_name": "better than the reference"}),
            "p_value": (dims, p, {
                "units": "1", "long_name": f"{TEST_NAMES['ttest_ar1']} p-value",
                "description": "NaN where untested (no per-time loss, no fields, other times)"}),
            "significant": (dims, significant, {
                "long_name": f"{TEST_NAMES['ttest_ar1']}, p < {alpha}"}),
        },
        coords={
            "run": _labels(rows),
            "run_path": ("run", [str(r.path) for r in rows]),
            "score": keys,
            "metric": ("score", metric_of),
            "variable": ("score", [_split_score(k)[1] for k in keys]),
            "base_variable": ("score", [b for b, _, _ in parsed]),
            "level": ("score", [lv for _, lv, _ in parsed], {"units": "hPa"}),
            "lead_hours": ("score", [ld for _, _, ld in parsed], {"units": "h"}),
            "higher_is_better": ("score", higher),
        },
        attrs={
            "task": ref.task,
            "reference": _labels(rows)[0],
            "reference_path": str(ref.path),
            "alpha": alpha,
            "test": "ttest_ar1",
            "test_name": TEST_NAMES["ttest_ar1"],
            "sign_convention": "oriented_difference: negative = better than the reference "
                               "(lower error, higher ACC); relative_difference: the plain change",
            "bins": list(SCORECARD_BINS),
        },
    )
