"""Small stores in the on-disk layouts real ERA5 and ensemble data come in.

Users meet ERA5 and ensemble forecasts in a handful of layouts (WeatherBench2 zarr stores, the
WeatherBench v1 folder of yearly netCDF files, ARCO-ERA5, WB2 IFS ENS, ENS-10).
:func:`write_layout` writes a schema dataset — usually the embedded world,
:func:`wpeft.data.world.open_world` or :func:`~wpeft.data.world.open_world_ensemble` — in one of
them, so that tests and users can try :func:`wpeft.data.era5.open_era5` and the recipes on every
layout offline. Names, dim order, latitude order, units spellings, ``short_name`` attributes,
time encoding and chunking follow ``docs/DATA-LAYOUTS.md`` of the shared folder, whose sources
each writer names; where that document marks a fact unconfirmed, the writer says what it chose.

What no writer changes: the grid (the world's cell-centred grid is written as it is, e.g. 32 x 64
without poles, where the real 0.25 degree stores have 721 x 1440 with poles), the pressure levels
and the values (only units are converted, e.g. precipitation mm -> m; ARCO's hourly axis is
interpolated, see :func:`_write_arco`). The stores are marked as the world is (``synthetic=1``
and the world's ``title`` in the attributes).

Zarr stores are written in zarr format 2 with consolidated metadata (``.zmetadata``), as the
public WB2 stores are (assumed for ARCO's, which DATA-LAYOUTS.md does not say);
:func:`~wpeft.data.era5.open_era5` reads zarr format 3 as well.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from wpeft.data.schema import VARIABLES, validate_dataset
from wpeft.errors import DataError

__all__ = ["LAYOUTS", "write_layout"]

#: Layout name -> one-line description.
LAYOUTS: dict[str, str] = {
    "wb2": "WeatherBench2 ERA5 0.25 deg-style zarr: (time, level, latitude 90->-90, longitude), "
    "statics (latitude, longitude)",
    "wb2-regridded": "WeatherBench2 regridded ERA5 zarr (64x32, 240x121 style): "
    "(time, [level], longitude, latitude), latitude ascending",
    "wb1": "WeatherBench v1 folder: {res}deg/{variable}/{variable}_{year}_{res}deg.nc, short "
    "names, lat/lon ascending, statics in constants/",
    "arco": "ARCO-ERA5 zarr: hourly (interpolated), statics with a time axis, hourly "
    "total_precipitation in m, latitude 90->-90",
    "ifs-ens": "WeatherBench2 IFS ENS zarr: (time=init, number 1..M, prediction_timedelta, "
    "[level], latitude ascending, longitude)",
    "ens10": "ENS-10 folder: output.{pl,sfc}.2018MMDD.nc with cfgrib names (number, time=init, "
    "step, isobaricInhPa descending)",
}

# ERA5 spellings of the schema's units (WB2/ARCO attrs; lsm/slt as ERA5 GRIB gives them).
_ERA5_UNITS = {"m s-1": "m s**-1", "m2 s-2": "m**2 s**-2", "kg kg-1": "kg kg**-1", "mm": "m"}
_ERA5_UNITS_BY_NAME = {"land_sea_mask": "(0 - 1)", "soil_type": "~"}
# ERA5 short names (the ``short_name`` attrs of WB2, the names inside WB1/cfgrib files).
_SHORT_NAMES = {
    "2m_temperature": "t2m",
    "10m_u_component_of_wind": "u10",
    "10m_v_component_of_wind": "v10",
    "mean_sea_level_pressure": "msl",
    "total_precipitation_6hr": "tp",
    "total_precipitation": "tp",
    "geopotential": "z",
    "temperature": "t",
    "u_component_of_wind": "u",
    "v_component_of_wind": "v",
    "specific_humidity": "q",
    "land_sea_mask": "lsm",
    "geopotential_at_surface": "z",
    "soil_type": "slt",
}
# GRIB parameter ids of the ENS-10 variables (ECMWF parameter database).
_PARAM_IDS = {"z": 129, "t": 130, "u": 131, "v": 132, "q": 133,
              "msl": 151, "u10": 165, "v10": 166, "t2m": 167}
_ENS10_PL = ("geopotential", "temperature", "specific_humidity", "u_component_of_wind",
             "v_component_of_wind")
_ENS10_SFC = ("2m_temperature", "mean_sea_level_pressure", "10m_u_component_of_wind",
              "10m_v_component_of_wind")
_ENS10_YEAR = "2018"  # ENS-10 files are named after the 2018 IFS cycle that made the reforecasts
_HOUR = np.timedelta64(1, "h")


def write_layout(ds: xr.Dataset, layout: str, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write a schema dataset to ``path`` in one of the :data:`LAYOUTS`.

    Args:
        ds: A dataset in the schema: a truth such as ``open_world(WorldConfig())`` for ``wb2``,
            ``wb2-regridded``, ``wb1`` and ``arco``; an ensemble from ``open_world_ensemble``
            (``member`` dim, ``init_time`` along ``time``) for ``ifs-ens`` and ``ens10``.
            Slice it first: the stores are meant to be small (``arco`` has 6 times as many
            times as a 6-hourly input).
        layout: A key of :data:`LAYOUTS`.
        path: The zarr store (``wb2``, ``wb2-regridded``, ``arco``, ``ifs-ens``) or folder
            (``wb1``, ``ens10``) to create.
        overwrite: Replace an existing ``path``; otherwise an existing path is refused.

    Returns:
        ``path``, which :func:`wpeft.data.era5.open_era5` reads back into the schema.

    Raises:
        DataError: Unknown layout, ``path`` exists, a truth given where an ensemble is needed
            (or the reverse), or data the layout cannot hold (e.g. an irregular time axis).
    """
    try:
        writer = _WRITERS[layout]
    except KeyError:
        raise DataError(f"Unknown layout {layout!r}; known: {', '.join(LAYOUTS)}.") from None
    validate_dataset(ds)
    path = Path(path)
    if path.exists():
        if not overwrite:
            raise DataError(f"{path} exists; pass overwrite=True to replace it.")
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    writer(_fresh(ds), path)
    return path


# --- helpers ------------------------------------------------------------------------------------


def _fresh(ds: xr.Dataset) -> xr.Dataset:
    """A shallow copy without the source's encodings (stale chunks break ``to_zarr``)."""
    out = ds.copy()
    for name in out.variables:
        out[name].encoding = {}
    out.attrs.pop("source_path", None)
    return out


def _require(ds: xr.Dataset, layout: str, *, ensemble: bool) -> None:
    has = "member" in ds.dims and "init_time" in ds.coords
    if ensemble and not has:
        raise DataError(
            f"Layout {layout!r} holds ensemble forecasts: pass open_world_ensemble(...) (a "
            "'member' dim and an 'init_time' coordinate along 'time')."
        )
    if not ensemble and "member" in ds.dims:
        raise DataError(
            f"Layout {layout!r} holds one trajectory, not an ensemble: pass open_world(...) or "
            "select one member."
        )


def _era5_units(da: xr.DataArray, name: str) -> xr.DataArray:
    """``da`` in ERA5 units (precipitation mm -> m) with ERA5 ``units``/``short_name`` attrs."""
    s = VARIABLES[name]
    out = da.copy(data=da.data / np.asarray(1000.0, da.dtype)) if s.units == "mm" else da.copy()
    out.attrs = dict(da.attrs) | {
        "units": _ERA5_UNITS_BY_NAME.get(name, _ERA5_UNITS.get(s.units, s.units)),
        "long_name": s.long_name,
        "short_name": _SHORT_NAMES[name],
    }
    return out


def _static(name: str) -> bool:
    return VARIABLES[name].kind == "static"


def _era5_dataset(ds: xr.Dataset) -> xr.Dataset:
    """Every variable in ERA5 units, levels ascending (as WB2/ARCO store them)."""
    out = ds.assign({str(n): _era5_units(ds[n], str(n)) for n in ds.data_vars})
    return out.sortby("level") if "level" in out.dims else out


def _time_encoding(epoch: str) -> dict[str, str]:
    return {"units": f"hours since {epoch}", "dtype": "int64"}


def _write_zarr(
    ds: xr.Dataset, path: Path, *, epoch: str, chunks: dict[str, int] | None = None
) -> None:
    """Zarr format 2, consolidated; ``chunks`` per dim (the rest whole), time as int64 hours.

    Dask chunks are made whole along every dim but ``time``, so that each zarr chunk lies in
    one dask chunk (``chunks`` only ever splits ``time``).
    """
    chunks = chunks or {}
    encoding: dict[str, dict] = {
        str(n): {"chunks": tuple(min(chunks.get(str(d), s), s) for d, s in da.sizes.items())}
        for n, da in ds.data_vars.items()
    }
    if "time" in ds.coords:
        encoding["time"] = _time_encoding(epoch)
    if any(v.chunks for v in ds.data_vars.values()):
        ds = ds.chunk({d: -1 for d in ds.dims if d != "time"})
    ds.to_zarr(path, mode="w-", encoding=encoding, zarr_format=2, consolidated=True)


# --- WeatherBench2 ------------------------------------------------------------------------------


def _write_wb2(ds: xr.Dataset, path: Path) -> None:
    """WeatherBench2 ERA5, 0.25 degree style (``1959-2023_01_10-wb13-6h-1440x721...zarr``).

    Source: WB2 data guide (DATA-LAYOUTS.md section 1). Dims (time, level, latitude, longitude)
    with latitude 90 -> -90, statics (latitude, longitude) without time; ``level`` int64 hPa
    ascending; long names with ERA5 ``units`` (``m**2 s**-2``, precipitation in m) and
    ``short_name`` attrs. Chunks of one time step (unconfirmed for WB2; ARCO's ``chunk-1``);
    ``time`` as int64 hours since 1959-01-01, the store's first time.
    """
    _require(ds, "wb2", ensemble=False)
    out = _era5_dataset(ds).sortby("latitude", ascending=False)
    out = out.transpose(*[d for d in ("time", "level", "latitude", "longitude") if d in out.dims])
    _write_zarr(out, path, epoch="1959-01-01", chunks={"time": 1})


def _write_wb2_regridded(ds: xr.Dataset, path: Path) -> None:
    """WeatherBench2 regridded ERA5 (``...-6h-64x32_equiangular_conservative.zarr`` style).

    Source: WB2 ``scripts/regrid.py`` and earth2studio's WB2 reader (DATA-LAYOUTS.md section 1):
    the regridded stores are written (time, [level], longitude, latitude) with latitude
    ascending (-90 -> 90). Otherwise as :func:`_write_wb2`.
    """
    _require(ds, "wb2-regridded", ensemble=False)
    out = _era5_dataset(ds).sortby("latitude")
    out = out.transpose(*[d for d in ("time", "level", "longitude", "latitude") if d in out.dims])
    _write_zarr(out, path, epoch="1959-01-01", chunks={"time": 1})


# --- ARCO-ERA5 ----------------------------------------------------------------------------------


def _hourly(ds: xr.Dataset) -> xr.Dataset:
    """An hourly version of a 6-hourly truth, honestly derived from it.

    * Surface and atmospheric fields: linear interpolation in time between consecutive states
      (exact at the 6-hourly times). The world has no hourly states, so the hours in between
      are smooth, without the diurnal detail real hourly data have.
    * ``total_precipitation_6hr`` (the 6 h ending at ``t``) -> hourly ``total_precipitation``:
      each hour of ``(t - 6 h, t]`` gets a sixth of it, so the six hours ending at ``t`` sum to
      the 6-hourly value again.
    * Statics: repeated along the hourly axis (ARCO stores them with a time dim).
    """
    times = ds["time"].values
    steps = np.unique(np.diff(times))
    if times.size < 2 or steps.size != 1 or steps[0] != 6 * _HOUR:
        raise DataError(
            "Layout 'arco' makes an hourly axis from a regular 6-hourly one; the time axis "
            f"has steps {sorted({str(s) for s in steps}) or 'none (one time)'}."
        )
    hourly = np.arange(times[0], times[-1] + _HOUR, _HOUR)
    before = ds.reindex(time=hourly, method="ffill")
    after = ds.reindex(time=hourly, method="bfill")
    prev_time = pd.Series(times, index=times).reindex(hourly, method="ffill").values
    out = {}
    for name, da in ds.data_vars.items():
        name = str(name)
        if _static(name):
            out[name] = da.expand_dims(time=hourly).assign_attrs(da.attrs)
        elif name == "total_precipitation_6hr":
            tp = (after[name] / np.asarray(6.0, dtype=da.dtype)).assign_attrs(da.attrs)
            out["total_precipitation"] = tp
        else:
            w = xr.DataArray(((hourly - prev_time) / (6 * _HOUR)).astype(da.dtype), dims="time")
            out[name] = (before[name] + (after[name] - before[name]) * w).assign_attrs(da.attrs)
    result = xr.Dataset(out, coords={"time": hourly}, attrs=ds.attrs)
    return result.assign_coords({c: ds[c] for c in ds.coords if c != "time"})


def _write_arco(ds: xr.Dataset, path: Path) -> None:
    """ARCO-ERA5 (``gs://gcp-public-data-arco-era5/ar/full_37-1h-0p25deg-chunk-1.zarr-v3``).

    Source: arco-era5 README and ``src/ar-to-zarr.py``, earth2studio's ARCO reader
    (DATA-LAYOUTS.md section 2): hourly, dims as WB2 0.25 degree with latitude 90 -> -90, static
    fields WITH a time dim, WB2 long names except precipitation, which is hourly
    ``total_precipitation`` in m (no ``_6hr`` sums). The world is 6-hourly, so the hourly axis
    is derived from it as :func:`_hourly` describes (linear interpolation, precipitation split
    evenly over the six hours). Chunks of one hour (``chunk-1``); ``time`` as int64 hours since
    1900-01-01 and ``valid_time_start``/``valid_time_stop`` attrs. The real v3 store pads its
    axis back to 1900 with empty times; this one starts at the data.
    """
    _require(ds, "arco", ensemble=False)
    out = _era5_dataset(_hourly(ds)).sortby("latitude", ascending=False)
    out = out.transpose(*[d for d in ("time", "level", "latitude", "longitude") if d in out.dims])
    first, last = (np.datetime_as_string(out["time"].values[i], unit="s") for i in (0, -1))
    out.attrs.update(
        valid_time_start=first,
        valid_time_stop=last,
        wpeft_time_interpolation="hourly values interpolated linearly between the 6-hourly "
        "states; total_precipitation = total_precipitation_6hr / 6 over each 6 h window",
    )
    _write_zarr(out, path, epoch="1900-01-01", chunks={"time": 1})


# --- WeatherBench v1 ----------------------------------------------------------------------------


def _resolution(ds: xr.Dataset) -> str:
    """``"5.625"`` for a 32 x 64 grid: the longitude spacing, as WB1 folder names write it."""
    lon = np.asarray(ds["longitude"].values, dtype=float)
    spacing = np.unique(np.round(np.diff(lon), 9))
    if spacing.size != 1:
        raise DataError("Layout 'wb1' needs a regular longitude spacing (it names the folders).")
    return f"{spacing[0]:g}"


def _wb1_variable(da: xr.DataArray, name: str) -> xr.Dataset:
    """One variable as WB1 files hold it: short name, ``lat``/``lon``, latitude ascending."""
    short = _SHORT_NAMES[name]
    da = _era5_units(da, name).sortby("latitude").rename(latitude="lat", longitude="lon")
    return da.to_dataset(name=short)


def _write_wb1(ds: xr.Dataset, path: Path) -> None:
    """WeatherBench (v1): ``{path}/{res}deg/{variable}/{variable}_{year}_{res}deg.nc``.

    Source: the WeatherBench README and OpenSTL's ``download_weatherbench.sh`` (folder and
    file naming), WeatherBench ``src/regrid.py`` (``lat``/``lon`` coordinates, latitude
    ascending) (DATA-LAYOUTS.md section 0). One netCDF per variable and year with the ERA5 short
    name inside (``t2m``, ``z`` with a ``level`` dim...); statics in
    ``constants/constants_{res}deg.nc`` (``lsm``, ``slt``, and ``z`` for the surface geopotential,
    where WB1 has orography in m). ``res`` is the longitude spacing (``5.625`` for 32 x 64).
    The time axis is the input's (6-hourly for the world; WB1's own is hourly, unconfirmed), so
    precipitation goes to ``total_precipitation_6hr/`` (``tp``, m per 6 h), not WB1's hourly
    ``total_precipitation/``.
    """
    _require(ds, "wb1", ensemble=False)
    res = _resolution(ds)
    root = path / f"{res}deg"
    statics = [str(n) for n in ds.data_vars if _static(str(n))]
    for name in (str(n) for n in ds.data_vars if not _static(str(n))):
        folder = root / name
        folder.mkdir(parents=True)
        da = ds[name].sortby("level") if "level" in ds[name].dims else ds[name]
        for year, part in da.groupby("time.year"):
            data = _wb1_variable(part, name)
            data.attrs = dict(ds.attrs)
            data.to_netcdf(folder / f"{name}_{year}_{res}deg.nc")
    if statics:
        folder = root / "constants"
        folder.mkdir(parents=True)
        data = xr.merge([_wb1_variable(ds[n], n) for n in statics])
        data.attrs = dict(ds.attrs)
        data.to_netcdf(folder / f"constants_{res}deg.nc")


# --- ensembles ----------------------------------------------------------------------------------


def _lead(ds: xr.Dataset, layout: str) -> np.timedelta64:
    """The one lead time of a world ensemble (``time`` is valid time, ``init_time`` along it)."""
    leads = np.unique(ds["time"].values - ds["init_time"].values)
    if leads.size != 1:
        raise DataError(f"Layout {layout!r} needs one lead time; the ensemble has {leads}.")
    return leads[0]


def _by_init(da: xr.DataArray, ds: xr.Dataset) -> xr.DataArray:
    """``time`` = init time, ``member`` -> ``number`` counted from 1 (ECMWF perturbed members)."""
    da = da.assign_coords(time=("time", ds["init_time"].values)).drop_vars("init_time")
    da = da.rename(member="number")
    return da.assign_coords(number=np.arange(1, da.sizes["number"] + 1, dtype=np.int64))


def _write_ifs_ens(ds: xr.Dataset, path: Path) -> None:
    """WeatherBench2 IFS ENS (``gs://weatherbench2/datasets/ifs_ens/...zarr``).

    Source: WB2 data guide (DATA-LAYOUTS.md section 3): variables (time, number,
    prediction_timedelta, [level], latitude, longitude) with ``time`` the init time, ``number``
    1..M, latitude ascending, names as in WB2 ERA5. The world ensemble has one lead (its
    ``time - init_time``), so ``prediction_timedelta`` has one value, where WB2 has 0-15 days.
    Statics are left out (not listed for the real store). Precipitation is written as
    ``total_precipitation_6hr`` (m): the world's accumulation over the 6 h ending at the lead,
    not the real store's ``total_precipitation`` (accumulated since the start of the forecast,
    which the world does not keep).
    """
    _require(ds, "ifs-ens", ensemble=True)
    lead = _lead(ds, "ifs-ens")
    order = ("time", "number", "prediction_timedelta", "level", "latitude", "longitude")
    out = {}
    for name in (str(n) for n in ds.data_vars if not _static(str(n))):
        da = _by_init(_era5_units(ds[name], name), ds)
        da = da.expand_dims(prediction_timedelta=[lead])
        out[name] = da.transpose(*[d for d in order if d in da.dims])
    data = xr.Dataset(out, attrs=ds.attrs).sortby("latitude")
    data = data.sortby("level") if "level" in data.dims else data
    _write_zarr(data, path, epoch="1959-01-01", chunks={"time": 1})


def _cfgrib_coords(data: xr.Dataset, lead: np.timedelta64) -> xr.Dataset:
    """cfgrib's coordinate names and attrs (``step``, ``valid_time``, ``isobaricInhPa``)."""
    data = data.expand_dims(step=[lead], axis=2)
    data = data.assign_coords(
        valid_time=(("time", "step"), data["time"].values[:, None] + data["step"].values[None])
    )
    data["number"].attrs = {"long_name": "ensemble member numerical id", "units": "1",
                            "standard_name": "realization"}
    data["time"].attrs = {"long_name": "initial time of forecast",
                          "standard_name": "forecast_reference_time"}
    data["step"].attrs = {"long_name": "time since forecast_reference_time",
                          "standard_name": "forecast_period"}
    data["latitude"].attrs = {"units": "degrees_north", "standard_name": "latitude",
                              "long_name": "latitude", "stored_direction": "decreasing"}
    data["longitude"].attrs = {"units": "degrees_east", "standard_name": "longitude",
                               "long_name": "longitude"}
    if "level" in data.dims:
        data = data.sortby("level", ascending=False).rename(level="isobaricInhPa")
        data = data.assign_coords(isobaricInhPa=data["isobaricInhPa"].astype(np.float64))
        data["isobaricInhPa"].attrs = {"long_name": "pressure", "units": "hPa",
                                       "positive": "down", "stored_direction": "decreasing",
                                       "standard_name": "air_pressure"}
    else:
        data = data.assign_coords(surface=0.0)
    return data


def _ens10_file(ds: xr.Dataset, names: tuple[str, ...], lead: np.timedelta64) -> xr.Dataset:
    out = {}
    for name in (n for n in names if n in ds.data_vars):
        short = _SHORT_NAMES[name]
        da = _by_init(_era5_units(ds[name], name), ds).sortby("latitude", ascending=False)
        units = da.attrs["units"]
        da.attrs = {"GRIB_paramId": _PARAM_IDS[short], "GRIB_shortName": short,
                    "GRIB_units": units, "GRIB_name": da.attrs["long_name"], "units": units,
                    "long_name": da.attrs["long_name"]}
        out[short] = da
    attrs = {"Conventions": "CF-1.7", "GRIB_edition": 1,
             "wpeft_layout": "ENS-10 as netCDF with the names cfgrib gives its GRIB1 files"}
    attrs |= {k: ds.attrs[k] for k in ("title", "synthetic") if k in ds.attrs}
    data = _cfgrib_coords(xr.Dataset(out, attrs=attrs), lead)
    order = ("number", "time", "step", "isobaricInhPa", "latitude", "longitude")
    return data.transpose(*[d for d in order if d in data.dims])


def _write_ens10(ds: xr.Dataset, path: Path) -> None:
    """ENS-10 (``output.pl.2018MMDD``, ``output.sfc.2018MMDD``), as netCDF with cfgrib's names.

    Source: the ENS-10 paper, spcl/ens10 baselines, climetlab-maelstrom-ens10
    (DATA-LAYOUTS.md section 4). One file per init day of year and kind, named with the 2018
    model cycle as ENS-10 does (the file holds that day's inits of every year), variables
    (number 1..M, time = init, step, [isobaricInhPa descending], latitude 90 -> -90,
    longitude) with the names cfgrib gives GRIB1: ``z t q u v`` in ``pl``, ``t2m msl u10 v10``
    in ``sfc`` (scalar ``surface`` coordinate), ``valid_time`` (time, step).

    netCDF rather than GRIB1: cfgrib's ``xarray_to_grib`` fails with the installed xarray
    (``xarray.backends.api`` lost ``_validate_dataset_names``), and GRIB1 stores coordinates in
    millidegrees, so the world's latitudes (87.1875...) would not survive. Files end in ``.nc``;
    :func:`~wpeft.data.era5.open_era5` reads real GRIB ones in the same folder layout. The world
    ensemble has one lead (ENS-10: 0/24/48 h) and no accumulation since the start of the
    forecast, so ``tp`` and the other ENS-10 variables the world lacks are not written.
    """
    _require(ds, "ens10", ensemble=True)
    lead = _lead(ds, "ens10")
    path.mkdir(parents=True)
    days = pd.DatetimeIndex(ds["init_time"].values).strftime("%m%d")
    for day in dict.fromkeys(days):
        part = ds.isel(time=np.flatnonzero(days == day))
        for kind, names in (("pl", _ENS10_PL), ("sfc", _ENS10_SFC)):
            if any(n in part.data_vars for n in names):
                data = _ens10_file(part, names, lead)
                data.to_netcdf(path / f"output.{kind}.{_ENS10_YEAR}{day}.nc")


_WRITERS: dict[str, Callable[[xr.Dataset, Path], None]] = {
    "wb2": _write_wb2,
    "wb2-regridded": _write_wb2_regridded,
    "wb1": _write_wb1,
    "arco": _write_arco,
    "ifs-ens": _write_ifs_ens,
    "ens10": _write_ens10,
}
