"""Tests for wpeft.data.layouts (writers of real on-disk layouts) and open_era5 reading them back.

Each layout is written from a tiny embedded world (16 x 32, 3 days, 3 members; generated once
per session in about a second), its on-disk facts are checked with plain xarray, then
``open_era5`` must give the world's values back in the schema.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from wpeft.data.era5 import open_era5
from wpeft.data.layouts import LAYOUTS, write_layout
from wpeft.data.schema import DIM_ORDER, validate_dataset
from wpeft.data.world import WorldConfig, open_world, open_world_ensemble
from wpeft.errors import DataError

CONFIG = WorldConfig(
    nlat=16, nlon=32, days=3.0, spinup_days=2.0, ensemble_inits=3, ensemble_members=3,
    ensemble_lead_hours=12,
)
RES = "11.25"  # 360 / 32
SURFACE_NAMES = ["2m_temperature", "mean_sea_level_pressure", "10m_u_component_of_wind"]
ATMOS_NAMES = ["geopotential", "temperature", "specific_humidity"]
STATIC_NAMES = ["land_sea_mask", "geopotential_at_surface", "soil_type"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("layout-world")


@pytest.fixture(scope="module")
def truth(cache: Path) -> xr.Dataset:
    return open_world(CONFIG, cache_dir=cache, progress=False).load()


@pytest.fixture(scope="module")
def ensemble(cache: Path) -> xr.Dataset:
    return open_world_ensemble(CONFIG, cache_dir=cache, progress=False).load()


def _assert_schema_order(ds: xr.Dataset) -> None:
    validate_dataset(ds)
    for name in ds.data_vars:
        dims = ds[name].dims
        assert dims == tuple(d for d in DIM_ORDER if d in dims), (name, dims)
    assert np.all(np.diff(ds["latitude"].values) < 0)
    if "level" in ds.dims:
        assert ds["level"].dtype == np.int64
        assert np.all(np.diff(ds["level"].values) > 0)


def _assert_values(back: xr.Dataset, src: xr.Dataset, names: list[str]) -> None:
    """``back[name]`` equals the source at the same coordinates; precipitation float32-close."""
    for name in names:
        got = back[name]
        want = src[name].sel({d: got[d].values for d in got.dims if d in src[name].dims})
        want = want.transpose(*[d for d in got.dims if d in want.dims])
        if "precipitation" in name:  # mm -> m -> mm
            np.testing.assert_allclose(got.values, want.values, rtol=1e-6, atol=1e-9)
        else:
            np.testing.assert_array_equal(got.values, want.values, err_msg=name)


# --- WeatherBench2 ------------------------------------------------------------------------------


def test_wb2(truth: xr.Dataset, tmp_path: Path) -> None:
    path = write_layout(truth, "wb2", tmp_path / "era5.zarr")
    assert (path / ".zmetadata").is_file()  # zarr format 2, consolidated
    raw = xr.open_zarr(path)
    assert raw["geopotential"].dims == ("time", "level", "latitude", "longitude")
    assert raw["2m_temperature"].dims == ("time", "latitude", "longitude")
    assert raw["land_sea_mask"].dims == ("latitude", "longitude")
    assert np.all(np.diff(raw["latitude"].values) < 0)
    assert raw["level"].dtype == np.int64 and raw["level"].values.tolist() == [250, 500, 850]
    assert raw["geopotential"].attrs["units"] == "m**2 s**-2"
    assert raw["geopotential"].attrs["short_name"] == "z"
    assert raw["10m_u_component_of_wind"].attrs["short_name"] == "u10"
    assert raw["total_precipitation_6hr"].attrs["units"] == "m"
    np.testing.assert_allclose(
        raw["total_precipitation_6hr"].values, truth["total_precipitation_6hr"].values / 1000,
        rtol=1e-6,
    )
    assert raw["time"].encoding["units"] == "hours since 1959-01-01"
    assert raw["time"].encoding["dtype"] == np.int64
    assert raw["2m_temperature"].encoding["chunks"] == (1, 16, 32)

    back = open_era5(path)
    _assert_schema_order(back)
    assert set(back.data_vars) == set(truth.data_vars)
    _assert_values(back, truth, list(map(str, truth.data_vars)))
    assert back["total_precipitation_6hr"].attrs["units"] == "mm"


def test_wb2_regridded(truth: xr.Dataset, tmp_path: Path) -> None:
    path = write_layout(truth, "wb2-regridded", tmp_path / "64x32.zarr")
    raw = xr.open_zarr(path)
    assert raw["geopotential"].dims == ("time", "level", "longitude", "latitude")
    assert raw["2m_temperature"].dims == ("time", "longitude", "latitude")
    assert raw["soil_type"].dims == ("longitude", "latitude")
    assert np.all(np.diff(raw["latitude"].values) > 0)

    back = open_era5(path, variables=ATMOS_NAMES + ["2m_temperature", "soil_type"])
    _assert_schema_order(back)
    _assert_values(back, truth, ATMOS_NAMES + ["2m_temperature", "soil_type"])


# --- WeatherBench v1 ----------------------------------------------------------------------------


def test_wb1_folder(truth: xr.Dataset, tmp_path: Path) -> None:
    shifted = truth.assign_coords(time=truth["time"].values - np.timedelta64(1, "D"))  # 1999/2000
    root = write_layout(shifted, "wb1", tmp_path / "weatherbench")
    folder = root / f"{RES}deg"
    t2m = sorted(p.name for p in (folder / "2m_temperature").iterdir())
    assert t2m == [f"2m_temperature_1999_{RES}deg.nc", f"2m_temperature_2000_{RES}deg.nc"]
    assert (folder / "constants" / f"constants_{RES}deg.nc").is_file()
    raw = xr.open_dataset(folder / "geopotential" / f"geopotential_2000_{RES}deg.nc")
    assert list(raw.data_vars) == ["z"] and raw["z"].dims == ("time", "level", "lat", "lon")
    assert np.all(np.diff(raw["lat"].values) > 0)
    raw_t2m = xr.open_dataset(folder / "2m_temperature" / f"2m_temperature_1999_{RES}deg.nc")
    assert list(raw_t2m.data_vars) == ["t2m"] and raw_t2m.sizes["time"] == 4
    constants = xr.open_dataset(folder / "constants" / f"constants_{RES}deg.nc")
    assert sorted(constants.data_vars) == ["lsm", "slt", "z"]

    back = open_era5(root)  # the tree (one resolution), read with open_mfdataset
    _assert_schema_order(back)
    assert set(back.data_vars) == set(truth.data_vars)
    np.testing.assert_array_equal(back["time"].values, shifted["time"].values)
    _assert_values(back, shifted, list(map(str, truth.data_vars)))


def test_wb1_opens_only_requested_folders(truth: xr.Dataset, tmp_path: Path) -> None:
    root = write_layout(truth, "wb1", tmp_path / "weatherbench")
    folder = root / f"{RES}deg"
    (folder / "temperature" / f"temperature_2000_{RES}deg.nc").write_bytes(b"not netCDF" * 10)
    back = open_era5(folder, variables=["2m_temperature", "land_sea_mask"])
    assert list(back.data_vars) == ["2m_temperature", "land_sea_mask"]
    _assert_values(back, truth, ["2m_temperature", "land_sea_mask"])
    with pytest.raises(DataError, match=r"temperature_2000_11\.25deg\.nc"):
        open_era5(folder, variables=["temperature"])
    with pytest.raises(DataError, match=r"\['relative_humidity'\].*2m_temperature"):
        open_era5(folder, variables=["relative_humidity"])
    one = open_era5(folder / "geopotential", levels=[500])  # a single variable folder
    assert list(one.data_vars) == ["geopotential"] and one["level"].values.tolist() == [500]
    _assert_values(one, truth, ["geopotential"])


def test_wb1_folder_without_netcdf(tmp_path: Path) -> None:
    folder = tmp_path / "wb1" / "5.625deg"
    (folder / "2m_temperature").mkdir(parents=True)
    (folder / "2m_temperature" / "README.txt").write_text("unzip the archives here")
    with pytest.raises(DataError, match=f"{folder.parent}.*no .nc files"):
        open_era5(folder.parent)


# --- ARCO-ERA5 ----------------------------------------------------------------------------------


def test_arco(truth: xr.Dataset, tmp_path: Path) -> None:
    src = truth.isel(time=slice(0, 4))
    path = write_layout(src, "arco", tmp_path / "arco.zarr")
    raw = xr.open_zarr(path)
    steps = np.unique(np.diff(raw["time"].values))
    assert list(steps) == [np.timedelta64(1, "h")] and raw.sizes["time"] == 19
    assert raw["land_sea_mask"].dims == ("time", "latitude", "longitude")
    assert raw["geopotential"].dims == ("time", "level", "latitude", "longitude")
    assert np.all(np.diff(raw["latitude"].values) < 0)
    assert "total_precipitation_6hr" not in raw and raw["total_precipitation"].attrs["units"] == "m"
    assert raw.attrs["valid_time_start"] == "2000-01-01T00:00:00"
    assert raw["time"].encoding["units"] == "hours since 1900-01-01"

    back = open_era5(path)
    _assert_schema_order(back)
    assert back["land_sea_mask"].dims == ("latitude", "longitude")
    names = [n for n in map(str, truth.data_vars) if n != "total_precipitation_6hr"]
    _assert_values(back.sel(time=src["time"]), src, names)  # exact at the 6-hourly times
    mid = back["temperature"].sel(time="2000-01-01T03")  # halfway: the mean of its neighbours
    np.testing.assert_allclose(mid, src["temperature"].isel(time=[0, 1]).mean("time")
                               .sel(level=back["level"]).values, rtol=1e-6)
    tp = back["total_precipitation"]
    assert tp.attrs["units"] == "mm"
    six = tp.rolling(time=6).sum().sel(time=src["time"].values[1:])  # the 6 h ending at t
    np.testing.assert_allclose(six.values, src["total_precipitation_6hr"].values[1:],
                               rtol=1e-5, atol=1e-6)


# --- ensembles ----------------------------------------------------------------------------------


def _by_init(ensemble: xr.Dataset) -> xr.Dataset:
    """The world ensemble indexed by init time, as forecast stores are."""
    return ensemble.assign_coords(time=ensemble["init_time"].values).drop_vars("init_time")


def _assert_ensemble(back: xr.Dataset, ensemble: xr.Dataset, names: list[str]) -> None:
    _assert_schema_order(back)
    assert back["member"].values.tolist() == [1, 2, 3]  # ECMWF numbering, as stored
    assert list(back["lead_time"].values) == [np.timedelta64(12, "h")]
    np.testing.assert_array_equal(back["time"].values, ensemble["init_time"].values)
    src = _by_init(ensemble).assign_coords(member=back["member"].values)
    _assert_values(back.isel(lead_time=0), src, names)


def test_ifs_ens(ensemble: xr.Dataset, tmp_path: Path) -> None:
    path = write_layout(ensemble, "ifs-ens", tmp_path / "ifs_ens.zarr")
    raw = xr.open_zarr(path)
    assert raw["geopotential"].dims == (
        "time", "number", "prediction_timedelta", "level", "latitude", "longitude"
    )
    assert raw["2m_temperature"].dims == (
        "time", "number", "prediction_timedelta", "latitude", "longitude"
    )
    assert raw["number"].values.tolist() == [1, 2, 3]
    assert np.all(np.diff(raw["latitude"].values) > 0)
    np.testing.assert_array_equal(raw["time"].values, ensemble["init_time"].values)

    back = open_era5(path)
    assert back["geopotential"].dims == (
        "member", "time", "lead_time", "level", "latitude", "longitude"
    )
    assert "land_sea_mask" not in back
    _assert_ensemble(back, ensemble, SURFACE_NAMES + ATMOS_NAMES + ["total_precipitation_6hr"])
    first = open_era5(path, variables=["2m_temperature"], time=slice(None, "2000-01-01T06"))
    assert first.sizes["time"] == 1  # time= selects init times


def test_ens10(ensemble: xr.Dataset, tmp_path: Path) -> None:
    folder = write_layout(ensemble, "ens10", tmp_path / "ens10")
    days = pd.DatetimeIndex(ensemble["init_time"].values).strftime("%m%d")
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(f"output.{k}.2018{d}.nc" for d in days for k in ("pl", "sfc"))
    pl = xr.open_dataset(folder / f"output.pl.2018{days[0]}.nc")
    assert sorted(pl.data_vars) == ["q", "t", "u", "v", "z"]
    assert pl["t"].dims == ("number", "time", "step", "isobaricInhPa", "latitude", "longitude")
    assert pl["isobaricInhPa"].values.tolist() == [850.0, 500.0, 250.0]  # descending
    assert np.all(np.diff(pl["latitude"].values) < 0)
    assert list(pl["step"].values) == [np.timedelta64(12, "h")]
    assert pl["valid_time"].dims == ("time", "step")
    sfc = xr.open_dataset(folder / f"output.sfc.2018{days[0]}.nc")
    assert sorted(sfc.data_vars) == ["msl", "t2m", "u10", "v10"]
    assert "surface" in sfc.coords

    back = open_era5(folder)
    assert set(back.data_vars) == {
        "geopotential", "temperature", "specific_humidity", "u_component_of_wind",
        "v_component_of_wind", "2m_temperature", "mean_sea_level_pressure",
        "10m_u_component_of_wind", "10m_v_component_of_wind",
    }
    _assert_ensemble(back, ensemble, SURFACE_NAMES + ATMOS_NAMES)
    one = open_era5(folder / f"output.sfc.2018{days[1]}.nc")  # a single file reads too
    assert one.sizes["time"] == 1 and one["2m_temperature"].dims[:3] == (
        "member", "time", "lead_time"
    )
    squeezed = tmp_path / "squeezed.nc"  # cfgrib squeezes a single init and step to scalars
    xr.open_dataset(folder / f"output.sfc.2018{days[1]}.nc").isel(time=0, step=0).to_netcdf(
        squeezed
    )
    xr.testing.assert_identical(open_era5(squeezed).drop_attrs(deep=False),
                                one.drop_attrs(deep=False))


# --- bad input ----------------------------------------------------------------------------------


def test_write_layout_refusals(truth: xr.Dataset, ensemble: xr.Dataset, tmp_path: Path) -> None:
    assert set(LAYOUTS) == {"wb2", "wb2-regridded", "wb1", "arco", "ifs-ens", "ens10"}
    with pytest.raises(DataError, match="Unknown layout 'wb3'.*wb2-regridded"):
        write_layout(truth, "wb3", tmp_path / "x")
    with pytest.raises(DataError, match="open_world_ensemble"):
        write_layout(truth, "ifs-ens", tmp_path / "x.zarr")
    with pytest.raises(DataError, match="not an ensemble"):
        write_layout(ensemble, "wb2", tmp_path / "x.zarr")
    with pytest.raises(DataError, match="6-hourly"):
        write_layout(truth.isel(time=[0, 2, 3]), "arco", tmp_path / "x.zarr")
    path = write_layout(truth[["2m_temperature"]], "wb2", tmp_path / "t.zarr")
    with pytest.raises(DataError, match="exists"):
        write_layout(truth, "wb2", path)
    write_layout(truth[["land_sea_mask"]], "wb2", path, overwrite=True)
    assert list(open_era5(path).data_vars) == ["land_sea_mask"]
