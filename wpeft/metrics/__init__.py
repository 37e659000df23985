"""Verification metrics for the fine-tuning tasks (METHOD.md §4), on schema xarray data.

Every metric takes DataArrays with the schema's dims (``time``, [``level``,] ``latitude``,
``longitude``; ensembles add ``member``), or Datasets (scored per variable), and ``scores``-style
``reduce_dims`` / ``preserve_dims``:

* default: the score, reduced over time, latitude and longitude with latitude weights
  ``cos φ / mean cos φ`` (other dims such as ``level`` are kept);
* ``reduce_dims="time"``: the per-grid-point field, for skill maps.

Inputs on different grids or times, or with NaNs, raise :class:`wpeft.errors.DataError`.

Modules: :mod:`~wpeft.metrics.weights` (latitude weights), :mod:`~wpeft.metrics.deterministic`
(RMSE, bias, ACC), :mod:`~wpeft.metrics.probabilistic` (Gaussian and ensemble CRPS, plain and
threshold-weighted), :mod:`~wpeft.metrics.precipitation` (SEEPS and its climatology),
:mod:`~wpeft.metrics.significance` (paired tests over time with the AR(1) effective sample size).
"""

from wpeft.metrics.deterministic import acc, bias, rmse
from wpeft.metrics.precipitation import seeps, seeps_climatology
from wpeft.metrics.probabilistic import (
    crps_ensemble,
    crps_gaussian,
    twcrps_ensemble,
    twcrps_gaussian,
)
from wpeft.metrics.significance import ar1_effective_sample_size, paired_ttest_ar1
from wpeft.metrics.weights import latitude_weights

__all__ = [
    "acc",
    "ar1_effective_sample_size",
    "bias",
    "crps_ensemble",
    "crps_gaussian",
    "latitude_weights",
    "paired_ttest_ar1",
    "rmse",
    "seeps",
    "seeps_climatology",
    "twcrps_ensemble",
    "twcrps_gaussian",
]
