"""wpeft's one internal data schema: WeatherBench2-style xarray Datasets.

Every data source (the embedded world, ERA5 zarr/netCDF/GRIB) is mapped to this layout, so tasks,
metrics and the backbone see one thing:

* dims ``time`` (strictly increasing, see :func:`check_time_axis`), ``level`` (hPa, int),
  ``latitude`` (degrees north, strictly decreasing), ``longitude`` (degrees east, strictly
  increasing in [0, 360)); ensembles add ``member``, and forecast stores (WB2 IFS ENS, ENS-10)
  add ``lead_time`` (timedelta64), in which case ``time`` is the initialisation time. Dims come
  in the order of :data:`DIM_ORDER`;
* variables named as in WeatherBench2 (``2m_temperature``, ``geopotential`` with a ``level`` axis,
  ...), each with the ``kind`` Aurora gives it: ``surface`` (time, lat, lon), ``atmos``
  (time, level, lat, lon) or ``static`` (lat, lon);
* ``units`` and ``long_name`` attributes on every variable.

The table below is the single place where WB2 names meet Aurora's short names.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import xarray as xr

from wpeft.errors import DataError

__all__ = [
    "DIM_ORDER",
    "EXTRA_DIMS",
    "VARIABLES",
    "Kind",
    "VariableSpec",
    "check_time_axis",
    "describe_steps",
    "duplicated",
    "regular_step",
    "regular_windows",
    "spec",
    "validate_dataset",
    "variables_of_kind",
]

Kind = Literal["surface", "atmos", "static"]

#: Dims a variable may carry besides those of its kind: ensemble member, forecast lead time.
EXTRA_DIMS = ("member", "lead_time")
#: The order of dims in every variable (WB2's, with ``member`` first and ``lead_time`` after the
#: init ``time``, as WB2 forecast stores put ``prediction_timedelta``).
DIM_ORDER = ("member", "time", "lead_time", "level", "latitude", "longitude")


@dataclass(frozen=True)
class VariableSpec:
    """One variable of the schema.

    Attributes:
        name: WeatherBench2 name, used as the xarray variable name.
        aurora: Aurora's short name (the key of ``aurora.Batch`` dicts and of the patch embedding).
        kind: ``surface``, ``atmos`` (has a ``level`` axis) or ``static`` (no time axis).
        units: CF units string.
        long_name: Human-readable name for axes and legends.
        positive: The variable is non-negative (precipitation, humidity).
    """

    name: str
    aurora: str
    kind: Kind
    units: str
    long_name: str
    positive: bool = False


VARIABLES: dict[str, VariableSpec] = {
    v.name: v
    for v in (
        VariableSpec("2m_temperature", "2t", "surface", "K", "2 metre temperature"),
        VariableSpec("10m_u_component_of_wind", "10u", "surface", "m s-1", "10 metre U wind"),
        VariableSpec("10m_v_component_of_wind", "10v", "surface", "m s-1", "10 metre V wind"),
        VariableSpec("mean_sea_level_pressure", "msl", "surface", "Pa", "Mean sea level pressure"),
        VariableSpec(
            "total_precipitation_6hr", "tp", "surface", "mm", "6-hour accumulated precipitation",
            positive=True,
        ),
        # Hourly stores (ARCO-ERA5, WeatherBench v1) hold this; sum six of them (the hours ending
        # at t) to get total_precipitation_6hr at t. Not an Aurora variable: "tp1h" only keeps
        # the (kind, short name) pairs unique.
        VariableSpec(
            "total_precipitation", "tp1h", "surface", "mm", "1-hour accumulated precipitation",
            positive=True,
        ),
        VariableSpec("geopotential", "z", "atmos", "m2 s-2", "Geopotential"),
        VariableSpec("u_component_of_wind", "u", "atmos", "m s-1", "U component of wind"),
        VariableSpec("v_component_of_wind", "v", "atmos", "m s-1", "V component of wind"),
        VariableSpec("temperature", "t", "atmos", "K", "Temperature"),
        VariableSpec(
            "specific_humidity", "q", "atmos", "kg kg-1", "Specific humidity", positive=True
        ),
        VariableSpec("land_sea_mask", "lsm", "static", "1", "Land-sea mask"),
        VariableSpec("geopotential_at_surface", "z", "static", "m2 s-2", "Surface geopotential"),
        VariableSpec("soil_type", "slt", "static", "1", "Soil type"),
    )
}


def spec(name: str) -> VariableSpec:
    """Look up a variable by its WB2 name; unknown names get the list of known ones."""
    try:
        return VARIABLES[name]
    except KeyError:
        raise DataError(
            f"Unknown variable {name!r}. wpeft knows: {', '.join(sorted(VARIABLES))}. "
            "Rename it to its WeatherBench2 name (see wpeft.data.schema.VARIABLES)."
        ) from None


def variables_of_kind(names: Iterable[str], kind: Kind) -> tuple[str, ...]:
    """The names in ``names`` of one kind, in the order given."""
    return tuple(n for n in names if spec(n).kind == kind)


def validate_dataset(ds: xr.Dataset, *, require: Iterable[str] = ()) -> xr.Dataset:
    """Check that ``ds`` follows the schema; return it unchanged or raise :class:`DataError`.

    Checks: required variables present, every variable known, dims per kind (plus any of
    :data:`EXTRA_DIMS`; a ``lead_time`` axis must hold timedeltas), latitude strictly decreasing
    within [-90, 90], longitude strictly increasing within [0, 360). The time axis is checked
    where stores are opened (:func:`check_time_axis`); dim order is not checked.
    """
    missing = [n for n in require if n not in ds.data_vars]
    if missing:
        raise DataError(
            f"Dataset lacks required variable(s) {missing}; it has {sorted(map(str, ds.data_vars))}."
        )
    for coord in ("latitude", "longitude"):
        if coord not in ds.coords:
            raise DataError(
                f"Dataset has no {coord!r} coordinate (coords: {sorted(map(str, ds.coords))}). "
                "Open it with wpeft.data.era5.open_era5, which renames lat/lon."
            )
    lat = np.asarray(ds["latitude"].values, dtype=float)
    lon = np.asarray(ds["longitude"].values, dtype=float)
    if lat.size > 1 and not np.all(np.diff(lat) < 0):
        raise DataError("Latitude must be strictly decreasing (north to south); use ds.sortby('latitude', ascending=False).")
    if np.any(np.abs(lat) > 90):
        raise DataError(f"Latitude outside [-90, 90]: min {lat.min()}, max {lat.max()}.")
    if lon.size > 1 and not np.all(np.diff(lon) > 0):
        raise DataError("Longitude must be strictly increasing; sort it with ds.sortby('longitude').")
    if np.any(lon < 0) or np.any(lon >= 360):
        raise DataError(
            f"Longitude outside [0, 360): min {lon.min()}, max {lon.max()}. "
            "Convert with ds.assign_coords(longitude=ds.longitude % 360).sortby('longitude')."
        )
    if "lead_time" in ds.dims and not np.issubdtype(ds["lead_time"].dtype, np.timedelta64):
        raise DataError(
            f"The lead_time axis must hold timedeltas (numpy timedelta64); it has dtype "
            f"{ds['lead_time'].dtype}."
        )
    for name in ds.data_vars:
        s = spec(str(name))
        dims = set(ds[name].dims) - set(EXTRA_DIMS)
        expected = {
            "surface": {"time", "latitude", "longitude"},
            "atmos": {"time", "level", "latitude", "longitude"},
            "static": {"latitude", "longitude"},
        }[s.kind]
        if dims != expected:
            raise DataError(
                f"Variable {name!r} ({s.kind}) has dims {sorted(dims)}; expected {sorted(expected)}."
            )
    return ds


# --- coordinate axes ---------------------------------------------------------------------------


def duplicated(values: np.ndarray) -> np.ndarray:
    """The values that occur more than once in ``values``, sorted."""
    unique, counts = np.unique(np.asarray(values), return_counts=True)
    return unique[counts > 1]


def _fmt(value: object) -> str:
    """A coordinate value or step for a message: ISO times, steps in hours, plain numbers."""
    if isinstance(value, np.datetime64):
        return str(np.datetime_as_string(value, unit="s"))
    if isinstance(value, np.timedelta64):
        return f"{value / np.timedelta64(1, 'h'):g} h"
    return str(value.item() if isinstance(value, np.generic) else value)


def _fmt_list(items: list[str], limit: int = 5) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_time_axis(times: np.ndarray, *, where: str = "") -> None:
    """Raise :class:`DataError` unless ``times`` is strictly increasing.

    Missing (NaT), duplicate and decreasing times are refused, naming them and the fix; a gap
    (a step longer or shorter than the others) is allowed here: see :func:`regular_windows`.
    ``where`` (e.g. ``" of era5.zarr"``) is put into the message.
    """
    times = np.asarray(times)
    if np.issubdtype(times.dtype, np.datetime64) and np.isnat(times).any():
        raise DataError(
            f"The time axis{where} has {int(np.isnat(times).sum())} missing (NaT) value(s); "
            "drop them, e.g. ds.sel(time=ds.time.notnull())."
        )
    if times.size < 2 or bool(np.all(times[1:] > times[:-1])):
        return
    dup = duplicated(times)
    if dup.size:
        raise DataError(
            f"Duplicate time(s){where}: {_fmt_list([_fmt(t) for t in dup])}. Keep one of each, "
            "e.g. ds.drop_duplicates('time') with xarray, and save the store again."
        )
    back = np.nonzero(times[1:] < times[:-1])[0]
    pairs = [f"{_fmt(times[i])} -> {_fmt(times[i + 1])}" for i in back]
    raise DataError(
        f"The time axis{where} decreases at {_fmt_list(pairs)}; it must be strictly increasing. "
        "Sort it, e.g. ds.sortby('time') with xarray, and save the store again."
    )


def regular_step(times: np.ndarray) -> tuple[Any, np.ndarray]:
    """The regular step of a strictly increasing time axis and where the axis departs from it.

    Returns:
        ``(step, breaks)``: the most common step (ties: the shortest; ``None`` for fewer than
        two times) and the indices ``i`` whose step ``times[i] -> times[i + 1]`` differs from
        it (a gap, or a shorter step).
    """
    steps = np.diff(np.asarray(times))
    if steps.size == 0:
        return None, np.zeros(0, dtype=np.int64)
    values, counts = np.unique(steps, return_counts=True)
    step = values[int(np.argmax(counts))]
    return step, np.nonzero(steps != step)[0]


def describe_steps(times: np.ndarray, breaks: np.ndarray, step: Any) -> str:
    """``"2020-01-02T00:00:00 -> 2020-01-03T06:00:00 (30 h), ..."`` for the irregular steps."""
    times = np.asarray(times)
    pairs = [f"{_fmt(times[i])} -> {_fmt(times[i + 1])} ({_fmt(times[i + 1] - times[i])})"
             for i in breaks]
    return f"{len(pairs)} irregular step(s) (regular step {_fmt(step)}): {_fmt_list(pairs, 3)}"


def regular_windows(n: int, breaks: np.ndarray, span: int) -> np.ndarray:
    """First indices of the windows of ``span`` consecutive times that cross no break.

    A window starting at ``s`` covers the times ``s .. s + span - 1``; it is kept only if each
    of its ``span - 1`` steps is the regular one (no index of ``breaks`` in ``s .. s + span - 2``),
    so its last time is exactly ``span - 1`` regular steps after its first.
    """
    count = n - span + 1
    if count < 1:
        return np.zeros(0, dtype=np.int64)
    bad = np.zeros(max(n - 1, 0), dtype=np.int64)
    bad[np.asarray(breaks, dtype=np.int64)] = 1
    crossed = np.concatenate([[0], np.cumsum(bad)])  # crossed[j]: breaks among steps 0..j-1
    starts = np.arange(count, dtype=np.int64)
    return starts[crossed[starts + span - 1] == crossed[starts]]
