"""Readers for real ERA5 data (WeatherBench2 / ARCO-ERA5 zarr, netCDF, GRIB), mapped to the schema.

ERA5 reaches users in many spellings: WeatherBench2 and ARCO-ERA5 zarr stores use long names and
latitude increasing; CDS netCDF uses short names (``t2m``), ``valid_time`` and ``pressure_level``;
cfgrib gives ``time`` + ``step`` + ``valid_time``, ``isobaricInhPa`` and longitudes in [-180, 180);
WeatherBench v1 is a folder of yearly netCDF files per variable; ensembles (WB2 IFS ENS, ENS-10)
add ``number`` and a lead axis. :mod:`wpeft.data.layouts` writes small stores in each layout.
:func:`open_era5` turns all of them into the one layout of :mod:`wpeft.data.schema`, so nothing
downstream has to care where the data came from. Everything stays lazy (xarray + dask): only
coordinates are read when opening, so a multi-terabyte store costs nothing until it is indexed.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Hashable, Sequence
from pathlib import Path

import dask
import numpy as np
import xarray as xr

from wpeft.data.schema import (
    DIM_ORDER,
    EXTRA_DIMS,
    VARIABLES,
    check_time_axis,
    duplicated,
    spec,
    validate_dataset,
)
from wpeft.errors import DataError

__all__ = ["check_finite", "open_era5", "write_wb2_zarr"]

# Coordinate spellings seen in ERA5 files -> schema names.
_COORD_ALIASES = {
    "lat": "latitude",
    "lon": "longitude",
    "pressure_level": "level",
    "isobaricInhPa": "level",
    "plev": "level",
}

# Short names (ERA5 CDS netCDF, cfgrib, ERA-Interim, ARCO) -> WeatherBench2 names. ``z`` is
# handled apart: it is ``geopotential`` with a level axis and ``geopotential_at_surface`` without.
_SHORT_NAMES = {
    "t2m": "2m_temperature",
    "2t": "2m_temperature",
    "u10": "10m_u_component_of_wind",
    "10u": "10m_u_component_of_wind",
    "v10": "10m_v_component_of_wind",
    "10v": "10m_v_component_of_wind",
    "msl": "mean_sea_level_pressure",
    "t": "temperature",
    "u": "u_component_of_wind",
    "v": "v_component_of_wind",
    "q": "specific_humidity",
    "lsm": "land_sea_mask",
    "slt": "soil_type",
}
_ATMOS_SOURCE_NAMES = {"z", "t", "u", "v", "q"} | {
    n for n, s in VARIABLES.items() if s.kind == "atmos"
}

# Why some common variables are not mapped; added to the "dropped" warning.
_NOT_MAPPED_NOTES = {
    "tp": "ERA5 'tp' is an hourly accumulation (in forecasts: accumulated since the start); "
    "rename an hourly one to 'total_precipitation', or sum it to 6 hours and name it "
    "'total_precipitation_6hr'",
}

# Unit conversions to the schema's units: (file units, schema units) -> (scale, offset).
_CONVERSIONS = {
    ("m", "mm"): (1000.0, 0.0),
    ("hPa", "Pa"): (100.0, 0.0),
    ("degC", "K"): (1.0, 273.15),
}
_UNIT_ALIASES = {"m/s": "m s-1", "(0 - 1)": "1", "~": "1", "dimensionless": "1", "": "1"}

_SCHEMA_COORDS = ("time", "level", "latitude", "longitude", *EXTRA_DIMS)
# Forecast lead axes: WB2 forecast stores, cfgrib (``step``, kept only for ensembles).
_LEAD_AXES = ("prediction_timedelta", "step")
_WB1_STATIC_FOLDER = "constants"
_ZARR_SUFFIXES = {".zarr"}
_NETCDF_SUFFIXES = {".nc", ".nc4", ".netcdf", ".cdf"}
_GRIB_SUFFIXES = {".grib", ".grb", ".grib1", ".grib2", ".grb2"}


def open_era5(
    path: str | Path,
    *,
    variables: Sequence[str] | None = None,
    levels: Sequence[int] | None = None,
    time: slice | None = None,
    chunks: dict | str | None = "auto",
) -> xr.Dataset:
    """Open an ERA5 store or file lazily, in the layout of :mod:`wpeft.data.schema`.

    Args:
        path: A ``.zarr`` directory (zarr v2 or v3; a ``scheme://`` URL is passed to
            :func:`xarray.open_zarr` as is), a netCDF file, a GRIB file, a WeatherBench v1
            folder (``{res}deg/{variable}/{variable}_{year}_{res}deg.nc``; the ``{res}deg``
            folder itself or its parent, if that holds one resolution) or an ENS-10 folder
            (``output.{pl,sfc}.2018MMDD[.nc]``). The format is taken from the suffix, else from
            the content.
        variables: WeatherBench2 names to keep; ``None`` keeps every schema variable in the
            file and drops the rest with a warning.
        levels: Pressure levels (hPa) to keep, in this order; ``None`` keeps all, ascending.
        time: A ``slice`` of times (datetimes or strings such as ``"2019-03-02"``).
        chunks: Passed to xarray; ``"auto"`` gives dask arrays, ``None`` lazily indexed ones.

    Returns:
        A dataset that passes :func:`~wpeft.data.schema.validate_dataset`, with ``units`` and
        ``long_name`` on every variable and ``attrs["source_path"]``. Ensembles have a
        ``member`` dim (cfgrib/WB2 ``number``, values kept as stored: 1..M for ECMWF
        perturbed members). Forecast stores keep their lead axis as ``lead_time``
        (timedelta64; WB2 ``prediction_timedelta`` always, cfgrib ``step`` when the data has
        members) and ``time`` is then the initialisation time, which ``time=`` selects;
        a deterministic cfgrib forecast is flattened to valid times instead. Dims follow
        :data:`~wpeft.data.schema.DIM_ORDER`. Static fields stored with a time axis (ARCO-ERA5)
        keep their first time; ERA5's hourly ``total_precipitation`` (m) becomes the schema's
        ``total_precipitation`` (mm per hour, not summed).

    Raises:
        DataError: Missing or unreadable path, unknown variable or level requested, empty time
            selection, coordinates that cannot be mapped to the schema, a time axis that is not
            strictly increasing (duplicate or decreasing times), or duplicate latitudes or
            longitudes (also after wrapping longitudes to [0, 360), e.g. both -180 and 180).
            A time axis with gaps is accepted; :class:`~wpeft.data.loader.WindowDataset` builds
            no window across them.
    """
    source, engine = _resolve(path)
    if engine == "wb1":
        ds = _open_wb1(source, variables, chunks)
    elif engine == "ens10":
        ds = _open_ens10(source, chunks)
    else:
        ds = _open(source, engine, chunks)
    ds = _normalise_coords(ds)
    ds = _normalise_time(ds)
    ds = _promote_scalar_level(ds)
    ds = _select_variables(ds, variables, source)
    ds = _drop_foreign_coords(ds)
    ds = _squeeze_static_time(ds)
    ds = _normalise_levels(ds, levels)
    ds = _normalise_grid(ds)
    if "time" in ds.dims:
        check_time_axis(ds["time"].values, where=f" of {source}")
    if time is not None:
        ds = _select_time(ds, time)
    ds = _fix_units(ds)
    ds = ds.transpose(*[d for d in DIM_ORDER if d in ds.dims], ...)
    ds.attrs["source_path"] = source
    return validate_dataset(ds)


def check_finite(ds: xr.Dataset) -> None:
    """Raise :class:`DataError` naming each variable with NaN/inf values and how many.

    The counts are lazy per variable and computed together in one pass over the data.
    """
    names = [str(n) for n in ds.data_vars if np.issubdtype(ds[n].dtype, np.inexact)]
    counts = dask.compute(*[(~np.isfinite(ds[n].data)).sum() for n in names])
    bad = [(n, int(c), ds[n].size) for n, c in zip(names, counts, strict=True) if int(c) > 0]
    if bad:
        where = ds.attrs.get("source_path")
        detail = "; ".join(f"{n!r}: {c} of {size} values" for n, c, size in bad)
        raise DataError(
            f"Non-finite values (NaN/inf) in {len(bad)} variable(s) — {detail}"
            + (f" (from {where})" if where else "")
            + ". Fill or mask them (e.g. ds.fillna / interpolate_na) before using the data."
        )


def write_wb2_zarr(ds: xr.Dataset, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write a schema dataset to a zarr store that :func:`open_era5` reads back unchanged.

    Useful to cache a subset of a GRIB/netCDF archive for training. Encodings inherited from the
    source (chunk sizes, compressors) are dropped and dask chunks made regular, because stale
    encodings are the usual reason ``to_zarr`` fails on data that was sliced or reordered.
    """
    validate_dataset(ds)
    path = Path(path)
    if path.exists() and not overwrite:
        raise DataError(f"{path} exists; pass overwrite=True to replace it.")
    out = ds.copy()
    for name in out.variables:
        out[name].encoding = {}
    for name in out.data_vars:
        chunks = out[name].chunks
        if chunks is not None:
            out[name] = out[name].chunk({d: max(c) for d, c in zip(out[name].dims, chunks)})
    out.attrs.pop("source_path", None)
    # Consolidated metadata is not part of the zarr v3 spec; a local store does not need it.
    out.to_zarr(path, mode="w" if overwrite else "w-", consolidated=False)
    return path


# --- opening -----------------------------------------------------------------------------------


def _resolve(path: str | Path) -> tuple[str, str]:
    """The source string and the format (``zarr``, ``netcdf`` or ``grib``) of ``path``."""
    text = os.fspath(path)
    if "://" in text:
        return text, "zarr"
    p = Path(text).expanduser()
    if not p.exists():
        raise DataError(f"ERA5 path {text!r} does not exist.")
    source = str(p.resolve())
    suffix = p.suffix.lower()
    if p.is_dir():
        if suffix in _ZARR_SUFFIXES or any(
            (p / m).exists() for m in ("zarr.json", ".zgroup", ".zmetadata")
        ):
            return source, "zarr"
        if _ens10_files(p):
            return source, "ens10"
        if any(p.rglob("*.nc")):
            return source, "wb1"
        raise DataError(
            f"{source} is a directory but neither a zarr store (no zarr.json/.zgroup), an ENS-10 "
            "folder (output.pl.*/output.sfc.* files) nor a WeatherBench folder: no .nc files "
            "under it (expected {res}deg/{variable}/{variable}_{year}_{res}deg.nc)."
        )
    if suffix in _NETCDF_SUFFIXES:
        return source, "netcdf"
    if suffix in _GRIB_SUFFIXES:
        return source, "grib"
    with open(p, "rb") as f:
        magic = f.read(8)
    if magic.startswith((b"\x89HDF", b"CDF")):
        return source, "netcdf"
    if magic.startswith(b"GRIB"):
        return source, "grib"
    raise DataError(
        f"Cannot tell the format of {source}: use a .zarr, .nc or .grib suffix, "
        "or pass a zarr store, netCDF or GRIB file."
    )


def _zarr_is_consolidated(path: str) -> bool | None:
    """Whether a local store has consolidated metadata (``None``: unknown, let xarray try)."""
    p = Path(path)
    if "://" in path or not p.is_dir():
        return None
    if (p / ".zmetadata").is_file():
        return True
    meta = p / "zarr.json"
    if meta.is_file():
        try:
            return json.loads(meta.read_text()).get("consolidated_metadata") is not None
        except (OSError, ValueError):
            return None
    return False


def _open(source: str, fmt: str, chunks: dict | str | None) -> xr.Dataset:
    if fmt == "zarr":
        engine = "zarr"
        opener = lambda: xr.open_zarr(  # noqa: E731
            source, chunks=chunks, consolidated=_zarr_is_consolidated(source)
        )
    elif fmt == "netcdf":
        engine = _netcdf_engine()
        opener = lambda: xr.open_dataset(source, engine=engine, chunks=chunks)  # noqa: E731
    else:
        engine = "cfgrib"
        try:
            import cfgrib  # noqa: F401
        except ImportError as e:
            raise DataError(
                f"Reading GRIB ({source}) needs cfgrib and eccodes: pip install 'wpeft[grib]'."
            ) from e
        opener = lambda: xr.open_dataset(  # noqa: E731
            source, engine="cfgrib", chunks=chunks, backend_kwargs={"indexpath": ""}
        )
    try:
        return opener()
    except DataError:
        raise
    except Exception as e:  # every backend has its own exception types
        hint = (
            " If the GRIB file mixes level types or steps, split it (e.g. grib_copy) first."
            if engine == "cfgrib"
            else ""
        )
        raise DataError(
            f"Could not read {source} with engine {engine!r}: {type(e).__name__}: {e}.{hint}"
        ) from e


def _file_format(path: Path) -> str:
    """``netcdf`` or ``grib`` for one file of a folder layout, from its suffix or content."""
    suffix = path.suffix.lower()
    if suffix in _NETCDF_SUFFIXES:
        return "netcdf"
    if suffix in _GRIB_SUFFIXES:
        return "grib"
    with open(path, "rb") as f:
        return "grib" if f.read(4) == b"GRIB" else "netcdf"


def _open_files(
    files: Sequence[Path], chunks: dict | str | None, where: str, **combine: object
) -> xr.Dataset:
    """Open several netCDF (or GRIB) files as one dataset with :func:`xarray.open_mfdataset`."""
    fmt = _file_format(files[0])
    if fmt == "grib":
        try:
            import cfgrib  # noqa: F401
        except ImportError as e:
            raise DataError(
                f"Reading GRIB ({files[0]}) needs cfgrib and eccodes: pip install 'wpeft[grib]'."
            ) from e
        engine, kwargs = "cfgrib", {"backend_kwargs": {"indexpath": ""}}
    else:
        engine, kwargs = _netcdf_engine(), {}
    try:
        return xr.open_mfdataset(
            [str(f) for f in files], engine=engine, chunks=chunks, data_vars="minimal",
            coords="minimal", compat="override", join="exact", **combine, **kwargs,
        )
    except Exception as e:  # every backend has its own exception types
        raise DataError(
            f"Could not read the {len(files)} file(s) of {where} with engine {engine!r} "
            f"(first: {files[0].name}): {type(e).__name__}: {e}"
        ) from e


def _merge_parts(parts: Sequence[xr.Dataset], where: str) -> xr.Dataset:
    try:
        return xr.merge(parts, join="exact", compat="override", combine_attrs="drop_conflicts")
    except ValueError as e:
        raise DataError(
            f"The files of {where} do not share their coordinates (times, levels or grid): {e}"
        ) from e


# WeatherBench v1: {res}deg/{variable}/{variable}_{year}_{res}deg.nc, statics in constants/.


def _wb1_variable_folders(root: Path) -> tuple[Path, dict[str, list[Path]], bool]:
    """The ``{res}deg`` folder of a WeatherBench v1 tree, its ``{variable: files}`` and whether
    ``root`` is one variable folder.

    ``root`` may be the tree (holding one ``{res}deg`` folder), a ``{res}deg`` folder, or one
    variable folder (files directly inside, e.g. ``5.625deg/2m_temperature``).
    """
    resolutions = sorted(
        d for d in root.iterdir() if d.is_dir() and d.name.endswith("deg") and any(d.rglob("*.nc"))
    )
    if len(resolutions) > 1:
        raise DataError(
            f"The WeatherBench folder {root} holds several resolutions "
            f"({', '.join(d.name for d in resolutions)}); pass one of them, e.g. {resolutions[0]}."
        )
    folder = resolutions[0] if resolutions else root
    variables = {
        d.name: sorted(d.glob("*.nc")) for d in sorted(folder.iterdir()) if d.is_dir()
    }
    variables = {name: files for name, files in variables.items() if files}
    if not variables and any(folder.glob("*.nc")):  # a single variable folder
        return folder, {folder.name: sorted(folder.glob("*.nc"))}, True
    if not variables:
        raise DataError(
            f"No .nc files in the variable folders of the WeatherBench folder {folder} "
            "(expected {variable}/{variable}_{year}_{res}deg.nc)."
        )
    return folder, variables, False


def _open_wb1(
    source: str, variables: Sequence[str] | None, chunks: dict | str | None
) -> xr.Dataset:
    """Open the yearly files of the requested variable folders (all schema ones by default).

    Inside the files variables have short names (``t2m``, ``z``); a folder named after a schema
    variable gives its one data variable that name (``total_precipitation/tp`` -> hourly
    ``total_precipitation``). Statics come from ``constants/``.
    """
    folder, available, single = _wb1_variable_folders(Path(source))
    if single:  # its files' variables are selected by name later, like those of one file
        wanted = list(available)
    elif variables is not None:
        wanted, missing = [], []
        for name in [variables] if isinstance(variables, str) else variables:
            if name in available:
                wanted.append(name)
            elif name in VARIABLES and VARIABLES[name].kind == "static" and (
                _WB1_STATIC_FOLDER in available
            ):
                wanted.append(_WB1_STATIC_FOLDER)
            else:
                missing.append(name)
        if missing:
            raise DataError(
                f"Variable(s) {missing} not found in the WeatherBench folder {folder}; its "
                f"variable folders: {sorted(available)}."
            )
    else:
        wanted = [n for n in available if n in VARIABLES or n == _WB1_STATIC_FOLDER]
        skipped = sorted(set(available) - set(wanted))
        if skipped:
            warnings.warn(
                f"Skipping {len(skipped)} folder(s) of {folder} not named after a wpeft schema "
                f"variable: {_short_list(skipped)}.",
                stacklevel=3,
            )
        if not wanted:
            raise DataError(
                f"No folder of the WeatherBench folder {folder} is named after a variable wpeft "
                f"knows (it has {_short_list(sorted(available))}); known: {sorted(VARIABLES)}."
            )
    parts = []
    for name in dict.fromkeys(wanted):
        part = _open_files(available[name], chunks, f"{folder / name}", combine="by_coords")
        if name in VARIABLES and len(part.data_vars) == 1:
            (inner,) = part.data_vars
            part = part.rename({inner: name}) if inner != name else part
        parts.append(part)
    return _merge_parts(parts, str(folder))


# ENS-10: output.pl.2018MMDD / output.sfc.2018MMDD (GRIB1, or netCDF written by cfgrib names).

_ENS10_FILE = re.compile(r"^output\.(pl|sfc)\.\d{8}(\.nc|\.grib|\.grb)?$")


def _ens10_files(folder: Path) -> dict[str, list[Path]]:
    """``{"pl": [...], "sfc": [...]}`` of an ENS-10 folder (empty if it is not one)."""
    out: dict[str, list[Path]] = {}
    for f in sorted(folder.iterdir()):
        match = _ENS10_FILE.match(f.name)
        if match and f.is_file():
            out.setdefault(match.group(1), []).append(f)
    return out


def _open_ens10(source: str, chunks: dict | str | None) -> xr.Dataset:
    """Pressure-level and surface files, each concatenated along ``time`` (init) and merged.

    One file per day of year holds that date's inits of every year, so the files' times
    interleave: they are concatenated, then sorted.
    """
    parts = [
        _open_files(files, chunks, f"{source} ({kind})", combine="nested", concat_dim="time")
        .sortby("time")
        for kind, files in _ens10_files(Path(source)).items()
    ]
    return _merge_parts(parts, source)


def _netcdf_engine() -> str:
    for engine, module in (("netcdf4", "netCDF4"), ("h5netcdf", "h5netcdf"), ("scipy", "scipy")):
        try:
            __import__(module)
            return engine
        except ImportError:
            continue
    raise DataError("Reading netCDF needs netCDF4 (pip install netCDF4).")


# --- coordinates -------------------------------------------------------------------------------


def _normalise_coords(ds: xr.Dataset) -> xr.Dataset:
    """Rename coordinate spellings to the schema's (``lat`` -> ``latitude``, ...)."""
    renames = {k: v for k, v in _COORD_ALIASES.items() if k in ds.variables or k in ds.dims}
    clashes = [f"{k}->{v}" for k, v in renames.items() if v in ds.variables or v in ds.dims]
    if len(set(renames.values())) != len(renames) or clashes:
        raise DataError(
            f"Ambiguous coordinates {sorted(renames)} (renames {clashes or renames}): the file has "
            "more than one spelling of the same axis."
        )
    ds = ds.rename(renames)
    if "number" in ds.dims and "member" not in ds.dims:
        ds = ds.rename(number="member")
    return ds


def _lead_axis(ds: xr.Dataset) -> str | None:
    """The forecast lead axis kept as ``lead_time``: WB2's, or cfgrib's ``step`` in ensembles."""
    for name in _LEAD_AXES:
        if (name in ds.coords or name in ds.dims) and (name != "step" or "member" in ds.dims):
            return name
    return None


def _keep_lead_axis(ds: xr.Dataset, lead: str) -> xr.Dataset:
    """A forecast store: ``time`` is the init time, the lead axis becomes ``lead_time``."""
    if "time" not in ds.coords:
        raise DataError(
            f"The forecast data has a {lead!r} axis but no 'time' (initialisation time) "
            f"coordinate (coords: {sorted(map(str, ds.coords))})."
        )
    ds = ds.drop_vars("valid_time", errors="ignore")
    for dim in (lead, "time"):  # cfgrib squeezes a single step or init to a scalar
        if dim not in ds.dims:
            ds = ds.expand_dims(dim)
    ds = ds.rename({lead: "lead_time"})
    if not np.issubdtype(ds["lead_time"].dtype, np.timedelta64):
        raise DataError(
            f"The lead axis {lead!r} holds {ds['lead_time'].dtype} values, not timedeltas; "
            "give it CF units (e.g. 'hours') so that it decodes to timedelta64."
        )
    return ds


def _normalise_time(ds: xr.Dataset) -> xr.Dataset:
    """Make ``time`` the valid time, or the init time of a forecast store with a lead axis."""
    lead = _lead_axis(ds)
    if lead is not None:
        return _keep_lead_axis(ds, lead)
    if "time" in ds.dims and "step" in ds.dims:
        # Forecast-style GRIB (e.g. accumulations): flatten (time, step) to valid times.
        if "valid_time" not in ds.coords:
            raise DataError("Dataset has time and step axes but no valid_time coordinate.")
        valid = ds["valid_time"].transpose("time", "step").values.reshape(-1)
        ds = ds.stack(_valid=("time", "step"))
        ds = ds.drop_vars(["_valid", "time", "step", "valid_time"]).rename(_valid="time")
        ds = ds.assign_coords(time=("time", valid)).transpose("time", ...)
    elif "step" in ds.dims and "valid_time" in ds.coords and ds["valid_time"].dims == ("step",):
        # One forecast run (scalar time) with several steps: the steps become the time axis.
        ds = ds.drop_vars("time", errors="ignore").swap_dims(step="valid_time")
        ds = ds.drop_vars("step").rename(valid_time="time")
    elif "time" not in ds.dims and "valid_time" in ds.dims:
        ds = ds.drop_vars("time", errors="ignore").rename(valid_time="time")
    elif "time" in ds.dims and "valid_time" in ds.coords and ds["valid_time"].dims == ("time",):
        # cfgrib analyses: step is 0 so valid_time == time; with a non-zero step valid_time is
        # the time the field is valid at, which is what the schema's time means.
        ds = ds.assign_coords(time=("time", ds["valid_time"].values, ds["time"].attrs))
        ds = ds.drop_vars("valid_time")
    elif "time" not in ds.dims and "valid_time" in ds.coords and ds["valid_time"].ndim == 0:
        # A single time that cfgrib squeezed to a scalar: give it its axis back.
        ds = ds.drop_vars("time", errors="ignore").rename(valid_time="time").expand_dims("time")
    elif "time" not in ds.dims and "time" in ds.coords and ds["time"].ndim == 0:
        ds = ds.expand_dims("time")
    elif "time" not in ds.dims and "month" in ds.dims:
        warnings.warn(
            "The file has a 'month' axis (a monthly climatology) and no time axis; it is used as "
            "'time', whose values are then month numbers, not dates.",
            stacklevel=3,
        )
        ds = ds.rename(month="time")
    return ds


def _promote_scalar_level(ds: xr.Dataset) -> xr.Dataset:
    """A single pressure level stored as a scalar coordinate becomes a length-1 level axis."""
    if "level" not in ds.coords or ds["level"].ndim != 0:
        return ds
    level = ds["level"]
    ds = ds.drop_vars("level")
    for name in list(ds.data_vars):
        if name in _ATMOS_SOURCE_NAMES:
            ds[name] = ds[name].expand_dims(level=[level.values.item()])
    if "level" in ds.coords:
        ds["level"].attrs.update(level.attrs)
    return ds


def _schema_name(name: Hashable, da: xr.DataArray) -> str | None:
    """The WeatherBench2 name of a source variable, or ``None`` if the schema lacks it."""
    name = str(name)
    if name in VARIABLES:
        return name
    if name == "z":
        return "geopotential" if "level" in da.dims else "geopotential_at_surface"
    return _SHORT_NAMES.get(name)


def _select_variables(
    ds: xr.Dataset, variables: Sequence[str] | None, source: str
) -> xr.Dataset:
    """Keep schema variables (or the requested ones), renamed to their WB2 names."""
    mapping: dict[str, str] = {}
    unknown: list[str] = []
    for name, da in ds.data_vars.items():
        target = _schema_name(name, da)
        if target is None:
            unknown.append(str(name))
        elif target in mapping.values():
            other = next(k for k, v in mapping.items() if v == target)
            raise DataError(
                f"Both {other!r} and {name!r} in {source} map to {target!r}; keep one of them."
            )
        else:
            mapping[str(name)] = target
    available = sorted(mapping.values())
    if variables is not None:
        if isinstance(variables, str):
            variables = [variables]
        if not variables:
            raise DataError(f"variables=[] selects nothing; {source} has {available}.")
        missing = [v for v in variables if v not in available]
        if missing:
            foreign = f"; not in wpeft's schema: {_short_list(unknown)}" if unknown else ""
            raise DataError(
                f"Variable(s) {missing} not found in {source}. Available (WeatherBench2 names): "
                f"{available}{foreign}."
            )
        inverse = {v: k for k, v in mapping.items()}
        mapping = {inverse[v]: v for v in dict.fromkeys(variables)}
    elif unknown:
        notes = [f"{n} ({_NOT_MAPPED_NOTES[n]})" for n in unknown if n in _NOT_MAPPED_NOTES]
        warnings.warn(
            f"Dropping {len(unknown)} variable(s) not in wpeft's schema from {source}: "
            f"{_short_list(unknown)}."
            + (" Note: " + "; ".join(notes) + "." if notes else ""),
            stacklevel=3,
        )
    if not mapping:
        raise DataError(
            f"{source} holds no variable wpeft knows (it has {_short_list(unknown)}); "
            f"known: {sorted(VARIABLES)}."
        )
    return ds[list(mapping)].rename({k: v for k, v in mapping.items() if k != v})


def _short_list(names: Sequence[str], limit: int = 20) -> str:
    """At most ``limit`` names (ARCO-ERA5 stores hold hundreds of variables)."""
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _drop_foreign_coords(ds: xr.Dataset) -> xr.Dataset:
    """Drop coordinates that are not schema axes (cfgrib's number/step/surface, expver, ...)."""
    foreign = [c for c in ds.coords if c not in _SCHEMA_COORDS]
    return ds.drop_vars(foreign)


def _squeeze_static_time(ds: xr.Dataset) -> xr.Dataset:
    """Static fields that come with a time axis (ERA5 lsm often does) keep their first time."""
    for name in list(ds.data_vars):
        if spec(str(name)).kind == "static" and "time" in ds[name].dims:
            ds[name] = ds[name].isel(time=0, drop=True)
    return ds


def _normalise_levels(ds: xr.Dataset, levels: Sequence[int] | None) -> xr.Dataset:
    """Make ``level`` integer hPa (Pa converted), then select the requested levels."""
    if not any("level" in ds[n].dims for n in ds.data_vars):
        if "level" in ds.coords or "level" in ds.dims:
            ds = ds.drop_dims("level") if "level" in ds.dims else ds.drop_vars("level")
        if levels is not None:
            raise DataError(
                f"levels={list(levels)} was given but no selected variable has a pressure-level "
                f"axis (variables: {sorted(map(str, ds.data_vars))})."
            )
        return ds
    if "level" not in ds.coords:
        raise DataError("The pressure-level axis has no coordinate values; cannot tell levels.")
    values = np.asarray(ds["level"].values, dtype=float)
    if values.size and values.max() > 2000:  # no pressure level exceeds 1100 hPa: these are Pa
        values = values / 100.0
    rounded = np.round(values)
    if not np.allclose(values, rounded, atol=1e-6):
        raise DataError(f"Pressure levels {values.tolist()} are not whole hPa.")
    attrs = {"units": "hPa", "long_name": "pressure level"}
    ds = ds.assign_coords(level=("level", rounded.astype(np.int64), attrs))
    available = ds["level"].values.tolist()
    if levels is None:
        return ds.sortby("level") if available != sorted(available) else ds
    wanted = [int(level) for level in levels]
    missing = [level for level in wanted if level not in available]
    if missing:
        raise DataError(f"Level(s) {missing} hPa not in the data; available levels: {available}.")
    return ds.sel(level=wanted)


def _normalise_grid(ds: xr.Dataset) -> xr.Dataset:
    """Latitude north to south, longitude wrapped to [0, 360) and increasing.

    Duplicate latitudes, and longitudes that coincide once wrapped (-180 and 180, 0 and 360),
    are refused rather than one of them dropped: which column is the right one is the user's call.
    """
    for coord in ("latitude", "longitude"):
        if coord not in ds.dims or ds[coord].ndim != 1:
            raise DataError(
                f"Expected a regular lat/lon grid with a 1-D {coord!r} axis; got dims "
                f"{sorted(map(str, ds.dims))}. Regrid curvilinear/reduced grids first."
            )
    lat = np.asarray(ds["latitude"].values, dtype=float)
    dup = duplicated(lat)
    if dup.size:
        raise DataError(
            f"Duplicate latitude(s) {dup.tolist()}; keep one of each, "
            "e.g. ds.drop_duplicates('latitude') with xarray."
        )
    if lat.size > 1 and np.all(np.diff(lat) > 0):
        ds = ds.isel(latitude=slice(None, None, -1))  # WB2/ARCO equiangular grids: S -> N
    elif lat.size > 1 and not np.all(np.diff(lat) < 0):
        ds = ds.sortby("latitude", ascending=False)
    lon = np.asarray(ds["longitude"].values, dtype=float)
    wrapped = np.mod(lon, 360.0)
    dup = duplicated(wrapped)
    if dup.size:
        same = [sorted(set(lon[wrapped == d].tolist())) for d in dup]
        raise DataError(
            f"Duplicate longitude(s) in [0, 360): {dup.tolist()} (from {same}); drop the repeated "
            "(cyclic) column, e.g. ds.isel(longitude=slice(None, -1)) for a grid ending at 180 "
            "or 360."
        )
    if not np.array_equal(wrapped, lon):
        ds = ds.assign_coords(
            longitude=("longitude", wrapped.astype(ds["longitude"].dtype), ds["longitude"].attrs)
        )
    if wrapped.size > 1 and not np.all(np.diff(wrapped) > 0):
        ds = ds.isel(longitude=np.argsort(wrapped))
    return ds


def _select_time(ds: xr.Dataset, time: slice) -> xr.Dataset:
    if "time" not in ds.dims:
        raise DataError("time= was given but the data has no time axis (static fields only).")
    try:
        out = ds.sel(time=time)
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"Cannot select time={time!r}: {e}") from e
    if out.sizes["time"] == 0:
        times = ds["time"].values
        raise DataError(
            f"time={time!r} selects nothing; the data covers {times[0]} to {times[-1]}."
        )
    return out


# --- units -------------------------------------------------------------------------------------


def _canonical_units(units: str) -> str:
    units = " ".join(str(units).replace("**", "").replace("^", "").split())
    return _UNIT_ALIASES.get(units, units)


def _fix_units(ds: xr.Dataset) -> xr.Dataset:
    """Give every variable the schema's units and long_name, converting the known cases."""
    for name in list(ds.data_vars):
        s = spec(str(name))
        da = ds[name]
        attrs = dict(da.attrs)
        units = attrs.get("units")
        if units is not None and _canonical_units(units) != _canonical_units(s.units):
            conversion = _CONVERSIONS.get((_canonical_units(units), s.units))
            if conversion is None:
                warnings.warn(
                    f"{name!r} has units {units!r}, expected {s.units!r}; left unconverted.",
                    stacklevel=3,
                )
            else:
                scale, offset = conversion
                da = da * scale + offset if offset else da * scale
                attrs["units"] = s.units
        else:
            attrs["units"] = s.units
        attrs.setdefault("long_name", s.long_name)
        ds[name] = da.assign_attrs(attrs)
    return ds
