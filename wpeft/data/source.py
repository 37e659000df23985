"""One description of a task's real data: where it is, what to read, which region and periods.

A task reads either the embedded world (``data=None``, the default) or a :class:`DataSource`::

    DataSource(
        path="gs://weatherbench2/datasets/era5/1959-2023_01_10-6h-64x32_equiangular_conservative.zarr",
        variables=("2m_temperature", "temperature"), levels=(500, 850),
        region=(15.0, 75.0, 70.0, 140.0),                  # south, north, west, east (°)
        train=("1979-01-01", "2015-12-31"), val=("2016-01-01", "2016-12-31"),
        test=("2017-01-01", "2018-12-31"),
    )

The same fields come from a YAML file (``wpeft train --data FILE.yaml``, key ``data:``) or a
plain mapping. :func:`open_source` opens the store lazily (through
:func:`wpeft.data.era5.open_era5`, so WeatherBench2 / ARCO zarr, netCDF and GRIB all work and
``gs://`` URLs need only ``gcsfs``), checks that every variable a task needs is there, crops the
region, merges static fields from the store or a separate file, and thins the time axis to
``time_step_hours``. Nothing is read but coordinates until a batch is drawn.

Conventions that are easy to get wrong, decided once here:

* ``region`` longitudes may be given in [0, 360) or [-180, 180); they are wrapped to [0, 360).
  Aurora needs longitudes strictly increasing within [0, 360) (it computes patch areas from them),
  so a box that crosses the prime meridian (e.g. west -10, east 10) cannot be fed with its true
  coordinates and is refused with that reason rather than shifted silently.
* Periods are inclusive date ranges; a sample belongs to a split when every time it touches
  (inputs and targets) lies inside that split's period. Without periods, tasks fall back to
  their ``split_fractions`` (contiguous time blocks).
* A variable the backbone expects but the store lacks is refused by name. ``fill_missing=True``
  is the explicit opt-in to feed it as a constant field at the backbone's normalisation mean
  (zero anomaly); the filled names are recorded in the run's summary.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from wpeft.data.era5 import open_era5
from wpeft.data.schema import VARIABLES, spec
from wpeft.errors import ConfigError, DataError

__all__ = [
    "DataSource",
    "Period",
    "coerce_source",
    "on_earth",
    "open_source",
    "open_store",
    "select_region",
    "split_by_period",
]

SPLIT_NAMES = ("train", "val", "test")
Period = tuple[pd.Timestamp, pd.Timestamp]


@dataclass
class DataSource:
    """A real data store and what to read from it.

    Attributes:
        path: Zarr store, netCDF or GRIB file, WeatherBench (v1) folder of yearly netCDF files, or
            an fsspec URL (``gs://...`` needs ``pip install gcsfs``).
        variables: WeatherBench2 names to learn (``None``: the task's defaults). Inputs the
            backbone needs beyond these are read too when the store has them.
        levels: Pressure levels (hPa) to read (``None``: the backbone's levels).
        region: ``(south, north, west, east)`` in degrees, inclusive; ``None``: the whole grid.
        train / val / test: Inclusive periods ``(start, end)`` as dates (``"2016-01-01"``); all
            three or none (``None``: the task's ``split_fractions``).
        time_step_hours: Keep only times on this step (e.g. 6 for an hourly store); ``None``: the
            store's own step.
        statics: A separate file or store with ``land_sea_mask``, ``geopotential_at_surface`` and
            ``soil_type`` on the same grid, for stores that lack them.
        fill_missing: Feed inputs the store lacks as constant fields at the backbone's
            normalisation mean (recorded); ``False`` refuses them by name.
        check_finite: Read the selected data once before training and refuse NaN/inf values
            (named). Turn off for stores you do not want read twice: every batch is still checked
            as it is read.
    """

    path: str
    variables: tuple[str, ...] | None = None
    levels: tuple[int, ...] | None = None
    region: tuple[float, float, float, float] | None = None
    train: tuple[str, str] | None = None
    val: tuple[str, str] | None = None
    test: tuple[str, str] | None = None
    time_step_hours: int | None = None
    statics: str | None = None
    fill_missing: bool = False
    check_finite: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.strip():
            raise ConfigError(f"data path={self.path!r} must be a non-empty path or URL.")
        if self.variables is not None:
            names = _as_tuple(self.variables, "variables")
            unknown = [n for n in names if n not in VARIABLES]
            if unknown or not names:
                raise ConfigError(
                    f"data variables={list(names)}: unknown {unknown}; use WeatherBench2 names: "
                    f"{sorted(VARIABLES)}."
                )
            self.variables = names
        if self.levels is not None:
            levels = _as_tuple(self.levels, "levels")
            if not levels or any(
                not isinstance(x, int) or isinstance(x, bool) or x <= 0 for x in levels
            ):
                raise ConfigError(f"data levels={self.levels!r} must be positive integer hPa.")
            self.levels = levels
        if self.region is not None:
            self.region = _check_region(self.region)
        given = [s for s in SPLIT_NAMES if getattr(self, s) is not None]
        if given and len(given) != 3:
            raise ConfigError(
                f"data periods: {given} given; give all of train, val and test (or none, to "
                "use the task's split_fractions)."
            )
        for s in given:
            setattr(self, s, _check_period(getattr(self, s), s))
        periods = self.periods
        if periods:
            for a, b in itertools.pairwise(SPLIT_NAMES):
                if periods[b][0] <= periods[a][1]:
                    raise ConfigError(
                        f"data periods overlap or are out of order: {a} ends {periods[a][1].date()}"
                        f", {b} starts {periods[b][0].date()}; give train < val < test in time."
                    )
        step = self.time_step_hours
        if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 1):
            raise ConfigError(f"data time_step_hours={step!r} must be a positive integer.")
        if self.statics is not None and (not isinstance(self.statics, str) or not self.statics):
            raise ConfigError(f"data statics={self.statics!r} must be a path.")
        for flag in ("fill_missing", "check_finite"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"data {flag}={getattr(self, flag)!r} must be true or false.")

    @property
    def periods(self) -> dict[str, Period] | None:
        """``{split: (start, end)}`` as timestamps (end = the last instant of its day when
        given as a date), or ``None`` when the task's fractions apply."""
        if self.train is None:
            return None
        return {s: _period_bounds(getattr(self, s)) for s in SPLIT_NAMES}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def coerce_source(value: DataSource | Mapping[str, Any] | str | None) -> DataSource | None:
    """A :class:`DataSource` from itself, a mapping of its fields (YAML / JSON), or a bare path."""
    if value is None or isinstance(value, DataSource):
        return value
    if isinstance(value, str):
        return DataSource(path=value)
    if isinstance(value, Mapping):
        known = {f.name for f in dataclasses.fields(DataSource)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"data: unknown field(s) {unknown}; known: {sorted(known)}.")
        if "path" not in value:
            raise ConfigError("data: 'path' (the store, file or URL) is required.")
        return DataSource(**value)
    raise ConfigError(
        f"data must be a mapping of DataSource fields or a path, got {type(value).__name__}."
    )


def on_earth(task_options: Mapping[str, Any]) -> bool:
    """Whether a run's task options describe real data (a ``data`` store), not the embedded
    world: maps of such runs get coastlines and a projection."""
    return task_options.get("data") is not None or task_options.get("source", "world") != "world"


def open_store(path: str) -> xr.Dataset:
    """``open_era5(path)`` lazily with every schema variable, without the reader's warning about
    the variables outside the schema: a task takes what it needs from it and names what lacks."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Dropping")
        return open_era5(path, chunks=None)


def open_source(
    source: DataSource,
    *,
    required: Sequence[str],
    optional: Sequence[str] = (),
    levels: Sequence[int] | None = None,
    path: str | None = None,
) -> tuple[xr.Dataset, tuple[str, ...]]:
    """Open ``source`` lazily in the schema, cropped to its region and thinned to its step.

    Args:
        source: The data description.
        required: WB2 names the task cannot do without (its targets); missing ones are refused.
        optional: WB2 names the backbone also takes as inputs (other variables, statics);
            missing ones are refused unless ``source.fill_missing`` (then listed in the result).
        levels: Pressure levels for atmospheric variables (``source.levels`` wins when set).
        path: Read this store instead of ``source.path`` (a second store of the same
            description, e.g. the coarse one of downscaling).

    Returns:
        The dataset and the names of ``optional`` variables it lacks (to be filled by the task).

    Raises:
        DataError: Missing variables or levels (named, with what the store has), a region
            outside the grid, periods outside the store's time range, statics on another grid.
    """
    where = path or source.path
    wanted = list(dict.fromkeys([*required, *optional]))
    ds = open_store(where)
    have = set(map(str, ds.data_vars))
    missing_required = [n for n in required if n not in have]
    if missing_required:
        raise DataError(
            f"{where} lacks {missing_required}; it has {sorted(have)}. Point data.path at a store "
            "with these variables (WeatherBench2 names) or choose other data.variables."
        )
    statics_wanted = [n for n in optional if n not in have and spec(n).kind == "static"]
    if statics_wanted and source.statics:
        ds = _merge_statics(ds, source.statics, statics_wanted)
        have = set(map(str, ds.data_vars))
    lacking = tuple(n for n in optional if n not in have)
    if lacking and not source.fill_missing:
        raise DataError(
            f"{where} lacks {list(lacking)}, which the backbone takes as inputs. Add them to "
            "the store (static fields may come from data.statics: FILE), or set data.fill_missing"
            ": true to feed them as constant fields at the backbone's normalisation mean "
            "(recorded in the run)."
        )
    ds = ds[[n for n in wanted if n in ds.data_vars]]
    lv = source.levels or (tuple(levels) if levels is not None else None)
    if lv is not None and any(spec(n).kind == "atmos" for n in ds.data_vars):
        available = [int(x) for x in ds["level"].values]
        absent = [x for x in lv if x not in available]
        if absent:
            raise DataError(
                f"{where} has no level(s) {absent} hPa; it has {available}. Set data.levels to "
                "levels the store holds (and the backbone knows)."
            )
        ds = ds.sel(level=list(lv))
    if source.region is not None:
        ds = select_region(ds, source.region, where=where)
    if source.time_step_hours is not None:
        ds = _thin_time(ds, source.time_step_hours, where)
    if source.periods is not None:
        _check_periods_inside(ds, source.periods, where)
    ds.attrs["source_path"] = where
    return ds, lacking


def select_region(
    ds: xr.Dataset, region: Sequence[float], *, where: str = "the data"
) -> xr.Dataset:
    """Crop a schema dataset to ``(south, north, west, east)`` (inclusive, degrees).

    Longitudes may be given in [-180, 180); a box across the prime meridian is refused (see the
    module docstring). A box reaching outside the grid is refused, naming the grid's extent.
    """
    south, north, west, east = _check_region(region)
    lat = np.asarray(ds["latitude"].values, dtype=np.float64)
    lon = np.asarray(ds["longitude"].values, dtype=np.float64)
    dlat = float(np.abs(np.diff(lat)).max()) if lat.size > 1 else 0.0
    dlon = float(np.diff(lon).max()) if lon.size > 1 else 0.0
    full_circle = east - west >= 360 - 1e-9
    w, e = (0.0, 360.0) if full_circle else (west % 360.0, east % 360.0)
    if not full_circle and e == 0.0 and east > west:
        e = 360.0  # an eastern edge at 360° / 0° closes the last column
    if not full_circle and w > e:
        raise DataError(
            f"region {list(region)} crosses the prime meridian (west {west}°, east {east}°): the "
            "backbone needs longitudes increasing within [0, 360), so such a box cannot be fed "
            f"with its true coordinates. Use a box on one side, e.g. west {west % 360}° to east "
            "360°, or 0° to {east % 360}°."
        )
    extent = (
        f"{where} spans latitudes {lat.min():g}..{lat.max():g} and longitudes "
        f"{lon.min():g}..{lon.max():g}"
    )
    tol = 1e-6
    if south < lat.min() - dlat - tol or north > lat.max() + dlat + tol:
        raise DataError(f"region {list(region)} reaches outside the grid: {extent}.")
    covers_globe = lon.size > 1 and lon.max() + dlon >= 360 - tol and lon.min() <= tol
    if not full_circle and not covers_globe and (w < lon.min() - dlon - tol or e > lon.max() + dlon + tol):
        raise DataError(f"region {list(region)} reaches outside the grid: {extent}.")
    rows = np.nonzero((lat >= south - tol) & (lat <= north + tol))[0]
    cols = np.nonzero((lon >= w - tol) & (lon <= e + tol))[0]
    if rows.size == 0 or cols.size == 0:
        raise DataError(f"region {list(region)} holds no grid point: {extent}.")
    return ds.isel(latitude=rows, longitude=cols)


def split_by_period(
    starts: np.ndarray, ends: np.ndarray, periods: Mapping[str, Period], what: str = "samples"
) -> dict[str, np.ndarray]:
    """Positions of the samples inside each period.

    Args:
        starts, ends: ``(N,)`` datetime64 first and last time each sample touches.
        periods: ``{split: (start, end)}`` inclusive.

    Raises:
        DataError: a split holds no sample (names the period and the samples' range).
    """
    starts = np.asarray(starts, dtype="datetime64[ns]")
    ends = np.asarray(ends, dtype="datetime64[ns]")
    out: dict[str, np.ndarray] = {}
    for name in SPLIT_NAMES:
        lo, hi = (np.datetime64(t.to_datetime64(), "ns") for t in periods[name])
        inside = np.nonzero((starts >= lo) & (ends <= hi))[0]
        if inside.size == 0:
            raise DataError(
                f"The {name} period {periods[name][0]} .. {periods[name][1]} holds no complete "
                f"{what.removesuffix('s')} (the {len(starts)} {what} span "
                f"{starts.min() if len(starts) else '-'} .. {ends.max() if len(ends) else '-'}, "
                "inputs and targets included). Widen the period."
            )
        out[name] = inside.astype(np.int64)
    return out


# --- helpers -----------------------------------------------------------------------------------


def _as_tuple(value: Any, name: str) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"data {name}={value!r} must be a list.")
    return tuple(value)


def _check_region(region: Sequence[float]) -> tuple[float, float, float, float]:
    values = _as_tuple(region, "region")
    if len(values) != 4 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    ):
        raise ConfigError(
            f"data region={list(values)} must be four numbers: south, north, west, east (degrees)."
        )
    south, north, west, east = (float(v) for v in values)
    if not -90 <= south < north <= 90:
        raise ConfigError(
            f"data region latitudes south={south}, north={north} must satisfy "
            "-90 <= south < north <= 90."
        )
    if not (-180 <= west <= 360 and -180 <= east <= 360) or west == east:
        raise ConfigError(
            f"data region longitudes west={west}, east={east} must lie in [-180, 360] and differ."
        )
    return south, north, west, east


def _check_period(value: Any, name: str) -> tuple[str, str]:
    pair = _as_tuple(value, name)
    if len(pair) != 2:
        raise ConfigError(f"data {name}={list(pair)} must be [start, end] dates.")
    try:
        start, end = (pd.Timestamp(str(x)) for x in pair)
    except ValueError as e:
        raise ConfigError(f"data {name}={list(pair)}: {e}; use dates like '2016-01-01'.") from None
    if start > end:
        raise ConfigError(f"data {name} starts {start} after it ends {end}.")
    return str(pair[0]), str(pair[1])


def _period_bounds(pair: tuple[str, str]) -> Period:
    start, end = pd.Timestamp(pair[0]), pd.Timestamp(pair[1])
    if end == end.normalize() and len(str(pair[1])) <= 10:  # a bare date: the whole day
        end = end + pd.Timedelta(days=1) - pd.Timedelta(1, "ns")
    return start, end


def _thin_time(ds: xr.Dataset, hours: int, where: str) -> xr.Dataset:
    if "time" not in ds.dims:
        return ds
    times = pd.DatetimeIndex(ds["time"].values)
    if len(times) > 1:
        step = (times[1:] - times[:-1]).min()
        if pd.Timedelta(hours=hours) % step != pd.Timedelta(0):
            raise DataError(
                f"time_step_hours={hours} is not a multiple of {where}'s step {step}."
            )
    since = (times - times.normalize()) / pd.Timedelta(hours=1)
    keep = np.nonzero(np.isclose(np.mod(since, hours), 0))[0]
    if keep.size == 0:
        raise DataError(f"No time of {where} falls on a {hours}-hourly step.")
    return ds.isel(time=keep)


def _check_periods_inside(ds: xr.Dataset, periods: Mapping[str, Period], where: str) -> None:
    if "time" not in ds.dims:
        return
    times = ds["time"].values
    first, last = pd.Timestamp(times[0]), pd.Timestamp(times[-1])
    for name, (start, end) in periods.items():
        if start > last or end < first or start < first - pd.Timedelta(days=1) or end > last + pd.Timedelta(days=1):
            raise DataError(
                f"The {name} period {start.date()} .. {end.date()} lies outside {where}, which "
                f"covers {first} .. {last}. Choose periods inside the store."
            )


def _merge_statics(ds: xr.Dataset, path: str, names: Sequence[str]) -> xr.Dataset:
    """Add static fields from a separate file; its grid must equal the data's (before cropping)."""
    st = open_store(path)
    present = [n for n in names if n in st.data_vars]
    if not present:
        raise DataError(
            f"The statics file {path} has none of {list(names)}; it has "
            f"{sorted(map(str, st.data_vars))}."
        )
    for coord in ("latitude", "longitude"):
        a, b = np.asarray(ds[coord].values), np.asarray(st[coord].values)
        if a.shape != b.shape or not np.allclose(a, b, atol=1e-6):
            raise DataError(
                f"The statics file {path} is on another grid ({coord}: {b.size} points "
                f"{b.min():g}..{b.max():g}) than the data ({a.size} points {a.min():g}..{a.max():g}); "
                "regrid it to the data's grid first."
            )
    st = st.assign_coords(latitude=ds["latitude"], longitude=ds["longitude"])
    return ds.assign({n: st[n] for n in present})
