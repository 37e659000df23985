"""Normalisation statistics (per-variable mean and std) computed from schema datasets.

A backbone such as Aurora normalises each input with a fixed location and scale per variable (and
per pressure level). Fine-tuning on a new region, period or variable needs those numbers for the
new data; :func:`compute_stats` computes them the same way for every source: area-weighted by
cos(latitude) so that the crowded polar rows of an equiangular grid do not dominate, in a single
lazy dask pass over the data. Keys follow Aurora's convention (``aurora.normalisation``):
``"2t"`` for surface and static variables, ``"z_500"`` (short name, underscore, level) for
atmospheric ones, so the result plugs into Aurora's ``locations``/``scales`` dictionaries.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np
import xarray as xr

from wpeft.data.schema import spec
from wpeft.errors import DataError

__all__ = ["NormStats", "compute_stats", "stats_key"]


def stats_key(name: str, level: float | None = None) -> str:
    """The Aurora-style key of a variable: ``"2t"``, or ``"z_500"`` for an atmospheric level.

    Levels are written as integers when whole, with ``.`` replaced by ``_`` otherwise, as
    Aurora's ``level_to_str`` does.
    """
    short = spec(name).aurora
    if level is None:
        return short
    value = round(float(level), 3)
    text = str(int(value)) if value % 1 == 0 else str(value).replace(".", "_")
    return f"{short}_{text}"


@dataclass
class NormStats:
    """Per-variable means and standard deviations, keyed as Aurora keys them.

    Attributes:
        mean: Location per key (``"2t"``, ``"z_500"``, static ``"z"``...).
        std: Scale per key; always positive (constant fields get 1.0).
    """

    mean: dict[str, float]
    std: dict[str, float]

    def __post_init__(self) -> None:
        if set(self.mean) != set(self.std):
            raise DataError(
                f"NormStats mean and std have different keys: only in mean "
                f"{sorted(set(self.mean) - set(self.std))}, only in std "
                f"{sorted(set(self.std) - set(self.mean))}."
            )
        for key in self.mean:
            m, s = self.mean[key], self.std[key]
            if not (math.isfinite(m) and math.isfinite(s) and s > 0):
                raise DataError(
                    f"NormStats[{key!r}] needs a finite mean and a positive std; got {m}, {s}."
                )

    def to_dict(self) -> dict[str, dict[str, float]]:
        """``{"mean": {...}, "std": {...}}``, JSON-ready."""
        return {"mean": dict(self.mean), "std": dict(self.std)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NormStats:
        """Inverse of :meth:`to_dict`; raises :class:`DataError` on a malformed mapping."""
        if not isinstance(data, Mapping) or not {"mean", "std"} <= set(data):
            got = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise DataError(f"NormStats needs a mapping with 'mean' and 'std'; got {got}.")
        parts = {}
        for part in ("mean", "std"):
            values = data[part]
            if not isinstance(values, Mapping):
                raise DataError(f"NormStats {part!r} must map keys to numbers; got {values!r}.")
            for key, value in values.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise DataError(f"NormStats {part}[{key!r}] is not a number: {value!r}.")
            parts[part] = {str(k): float(v) for k, v in values.items()}
        return cls(mean=parts["mean"], std=parts["std"])

    def to_json(self, path: str | Path) -> Path:
        """Write the statistics to ``path`` as JSON; returns the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> NormStats:
        """Read statistics written by :meth:`to_json`; :class:`DataError` names a bad file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"Cannot read normalisation statistics from {path}: {e}") from e
        try:
            return cls.from_dict(data)
        except DataError as e:
            raise DataError(f"Bad normalisation statistics in {path}: {e}") from e

    def as_aurora_stats(self) -> dict[str, tuple[float, float]]:
        """``{key: (mean, std)}``, the ``stats`` argument of ``aurora.normalisation``."""
        return {key: (self.mean[key], self.std[key]) for key in self.mean}


def compute_stats(
    ds: xr.Dataset, *, dims: Sequence[Hashable] = ("time", "latitude", "longitude")
) -> NormStats:
    """Area-weighted mean and std of every variable in a schema dataset.

    Each variable is reduced over those of ``dims`` it has (static fields over latitude and
    longitude only); atmospheric variables keep their ``level`` axis and give one entry per
    level. Weights are cos(latitude). All sums are built lazily and computed in one pass; values
    are shifted by each field's first value before squaring, so the one-pass variance stays
    accurate for fields with a large mean (geopotential, pressure).

    Raises:
        DataError: The data holds NaN/inf (named per variable), a variable keeps a dimension
            that is neither reduced nor ``level``, or ``level`` is in ``dims``.
    """
    dims = tuple(dims)
    if "level" in dims:
        raise DataError("Statistics are per pressure level; remove 'level' from dims.")
    lazy: dict[str, tuple[Any, ...]] = {}
    totals: dict[str, float] = {}
    for name in map(str, ds.data_vars):
        da = ds[name]
        kind = spec(name).kind
        reduce = [d for d in da.dims if d in dims]
        kept = [d for d in da.dims if d not in dims]
        if not reduce or kept not in ([], ["level"]) or (kept and kind != "atmos"):
            raise DataError(
                f"Cannot reduce {name!r} (dims {list(da.dims)}) over {list(dims)}: only "
                "'level' may remain, for atmospheric variables. Add the other dims to dims=."
            )
        x = da.astype(np.float64)
        shift = x.isel({d: 0 for d in reduce})  # lazy: read with the rest in the one pass
        x = x - shift
        weights = _weights(da) if "latitude" in reduce else None
        if weights is not None:
            totals[name] = float(weights.sum()) * _count(da, [d for d in reduce if d != "latitude"])
            wx = (x * weights).sum(reduce)
            wx2 = (x * x * weights).sum(reduce)
        else:
            totals[name] = float(_count(da, reduce))
            wx, wx2 = x.sum(reduce), (x * x).sum(reduce)
        bad = (~np.isfinite(da)).sum()
        lazy[name] = (bad.data, shift.data, wx.data, wx2.data)
    empty = [n for n, total in totals.items() if not total > 0]
    if empty:
        raise DataError(f"No weight to average {empty} over (empty axis or only polar rows).")
    (computed,) = dask.compute(lazy)

    bad_counts = {n: int(v[0]) for n, v in computed.items() if int(v[0]) > 0}
    if bad_counts:
        detail = ", ".join(f"{n!r}: {c} values" for n, c in bad_counts.items())
        raise DataError(
            f"Cannot compute statistics: NaN/inf in {detail}. Fill or mask them first "
            "(wpeft.data.era5.check_finite finds them)."
        )
    mean: dict[str, float] = {}
    std: dict[str, float] = {}
    for name, (_, shift, wx, wx2) in computed.items():
        levels = ds[name]["level"].values if "level" in ds[name].dims else [None]
        shift, wx, wx2 = (np.atleast_1d(np.asarray(a, dtype=np.float64)) for a in (shift, wx, wx2))
        first = wx / totals[name]
        var = np.maximum(wx2 / totals[name] - first**2, 0.0)
        for i, level in enumerate(levels):
            key = stats_key(name, level)
            m, s = float(shift[i] + first[i]), float(np.sqrt(var[i]))
            mean[key] = m
            std[key] = 1.0 if s <= 1e-12 * abs(m) or s == 0.0 else s  # constant field
    return NormStats(mean=mean, std=std)


def _weights(da: xr.DataArray) -> xr.DataArray:
    """cos(latitude) weights (clipped at 0 for rounding at the poles)."""
    lat = da["latitude"].astype(np.float64)
    return np.cos(np.deg2rad(lat)).clip(min=0.0)


def _count(da: xr.DataArray, dims: Sequence[Hashable]) -> int:
    return int(np.prod([da.sizes[d] for d in dims], dtype=np.int64))
