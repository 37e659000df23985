"""Tests for wpeft.data.era5: ERA5 layouts (WB2, ARCO/CDS short names, cfgrib) -> the schema."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from wpeft.data.era5 import check_finite, open_era5, write_wb2_zarr
from wpeft.data.schema import validate_dataset
from wpeft.errors import DataError

TIMES = pd.date_range("2020-01-01", periods=4, freq="6h")
LATS = np.array([-60.0, -30.0, 0.0, 30.0, 60.0])  # increasing, as WB2 equiangular grids have it
LONS = np.array([0.0, 90.0, 180.0, 270.0])
LEVELS = np.array([500, 850, 1000])


def _sample(name: str) -> Path:
    """A real ERA5 sample file, or skip: the project must run without the shared folder."""
    env = os.environ.get("WPEFT_ERA5_SAMPLE")
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "era5-sample"
    folder = Path(env) if env else default
    path = folder / name
    if not path.is_file():
        pytest.skip(f"ERA5 sample {path} is absent (set WPEFT_ERA5_SAMPLE to its folder)")
    return path


def _field(*shape_dims: tuple[str, np.ndarray]) -> np.ndarray:
    """Values that encode their coordinates, so a test can tell where each one moved."""
    grids = np.meshgrid(*[v for _, v in shape_dims], indexing="ij")
    scales = {"time": 1.0, "level": 0.01, "latitude": 100.0, "longitude": 0.1}
    return sum(scales[d] * g for (d, _), g in zip(shape_dims, grids, strict=True)).astype("f4")


def _wb2_dataset(
    times: pd.DatetimeIndex = TIMES, lats: np.ndarray = LATS, lons: np.ndarray = LONS
) -> xr.Dataset:
    t = np.arange(len(times), dtype=float)
    t2m = 280.0 + _field(("time", t), ("latitude", lats), ("longitude", lons)) / 100
    z = _field(("time", t), ("level", LEVELS), ("latitude", lats), ("longitude", lons))
    lsm = (np.arange(lats.size * lons.size).reshape(lats.size, lons.size) % 2).astype("f4")
    return xr.Dataset(
        {
            "2m_temperature": (("time", "latitude", "longitude"), t2m),
            "geopotential": (("time", "level", "latitude", "longitude"), z),
            "land_sea_mask": (("latitude", "longitude"), lsm),
            "10m_wind_speed": (("time", "latitude", "longitude"), np.ones_like(t2m)),
        },
        coords={"time": times, "level": LEVELS, "latitude": lats, "longitude": lons},
    )


@pytest.fixture
def wb2_zarr(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    path = tmp_path / "wb2.zarr"
    fmt = getattr(request, "param", 3)
    _wb2_dataset().to_zarr(path, zarr_format=fmt, consolidated=fmt == 2)  # v2 consolidated, v3 not
    return path


@pytest.fixture
def wb2_nc(tmp_path: Path) -> Path:
    path = tmp_path / "wb2.nc"
    _wb2_dataset().to_netcdf(path)
    return path


@pytest.mark.parametrize("wb2_zarr", [2, 3], indirect=True, ids=["zarr2", "zarr3"])
def test_wb2_zarr_maps_to_schema(wb2_zarr: Path) -> None:
    with pytest.warns(UserWarning, match="10m_wind_speed"):
        ds = open_era5(wb2_zarr)
    validate_dataset(ds)
    assert sorted(ds.data_vars) == ["2m_temperature", "geopotential", "land_sea_mask"]
    assert ds["latitude"].values.tolist() == LATS[::-1].tolist()
    assert all(ds[v].chunks is not None for v in ds.data_vars)  # dask-backed, nothing loaded
    src = _wb2_dataset()
    for lat in (60.0, -30.0):  # data at lat=+x stays at lat=+x after the flip
        got = ds["2m_temperature"].sel(latitude=lat, longitude=90.0).values
        np.testing.assert_array_equal(got, src["2m_temperature"].sel(latitude=lat, longitude=90.0))
    assert ds["geopotential"].attrs["units"] == "m2 s-2"
    assert ds["land_sea_mask"].attrs["long_name"] == "Land-sea mask"
    assert ds.attrs["source_path"] == str(wb2_zarr.resolve())


def test_wb2_netcdf_levels_and_time(wb2_nc: Path) -> None:
    window = slice("2020-01-01T06", "2020-01-01T12")
    ds = open_era5(wb2_nc, variables=["geopotential"], levels=[850, 500], time=window)
    assert list(ds.data_vars) == ["geopotential"]
    assert ds["level"].values.tolist() == [850, 500]
    np.testing.assert_array_equal(ds["time"].values, TIMES[1:3].values)
    src = _wb2_dataset()["geopotential"].sel(level=[850, 500]).isel(time=slice(1, 3))
    expected = src.sortby("latitude", ascending=False)
    xr.testing.assert_equal(ds["geopotential"].drop_attrs(), expected)
    assert ds["geopotential"].chunks is not None


def test_arco_short_names_and_longitudes(tmp_path: Path) -> None:
    """CDS/ARCO style: short names, lat/lon, pressure_level in Pa, valid_time, lon -180..180."""
    lons = np.array([-180.0, -90.0, 0.0, 90.0])
    t = np.arange(len(TIMES), dtype=float)
    dims3 = ("valid_time", "lat", "lon")
    t2m = 280.0 + _field(("time", t), ("latitude", LATS), ("longitude", lons)) / 100
    z = _field(("time", t), ("level", LEVELS), ("latitude", LATS), ("longitude", lons))
    lsm = np.zeros((len(TIMES), LATS.size, lons.size), "f4")
    lsm[:, 3, 1] = 1.0  # land at lat 30, lon -90 (= 270)
    src = xr.Dataset(
        {
            "t2m": (dims3, t2m, {"units": "K"}),
            "z": (("valid_time", "pressure_level", "lat", "lon"), z, {"units": "m**2 s**-2"}),
            "lsm": (dims3, lsm),
            "tp": (dims3, np.zeros_like(t2m), {"units": "m"}),
        },
        coords={
            "valid_time": TIMES, "pressure_level": LEVELS * 100, "lat": LATS, "lon": lons,
            "number": 0, "expver": ("valid_time", ["0001"] * len(TIMES)),
        },
    )
    path = tmp_path / "cds.nc"
    src.to_netcdf(path)
    with pytest.warns(UserWarning, match="'tp'.*hourly"):
        ds = open_era5(path)
    validate_dataset(ds)
    assert sorted(ds.data_vars) == ["2m_temperature", "geopotential", "land_sea_mask"]
    assert ds["longitude"].values.tolist() == [0.0, 90.0, 180.0, 270.0]
    assert ds["level"].values.tolist() == [500, 850, 1000]
    assert ds["land_sea_mask"].dims == ("latitude", "longitude")  # static: first time kept
    assert float(ds["land_sea_mask"].sel(latitude=30.0, longitude=270.0)) == 1.0
    assert float(ds["land_sea_mask"].sum()) == 1.0
    np.testing.assert_array_equal(
        ds["2m_temperature"].sel(longitude=270.0, latitude=-60.0).values,
        src["t2m"].sel(lon=-90.0, lat=-60.0).values,
    )
    np.testing.assert_array_equal(
        ds["geopotential"].sel(longitude=180.0, level=850).values,
        src["z"].sel(lon=-180.0, pressure_level=85000).isel(lat=slice(None, None, -1)).values,
    )
    assert ds["geopotential"].attrs["units"] == "m2 s-2"
    assert set(ds.coords) == {"time", "level", "latitude", "longitude"}


def test_cfgrib_style_time_step_and_scalar_level(tmp_path: Path) -> None:
    """cfgrib forecasts: (time, step) with 2-D valid_time; a single level as a scalar coord."""
    init = pd.date_range("2020-01-01", periods=2, freq="12h")
    steps = pd.to_timedelta([6, 12], unit="h")
    valid = init.values[:, None] + steps.values[None, :]
    t = np.arange(4, dtype="f4").reshape(2, 2, 1, 1) * np.ones((1, 1, 2, 3), "f4")
    src = xr.Dataset(
        {"t": (("time", "step", "latitude", "longitude"), 250 + t)},
        coords={
            "time": init, "step": steps, "valid_time": (("time", "step"), valid),
            "isobaricInhPa": 500.0, "latitude": [10.0, -10.0], "longitude": [0.0, 1.0, 2.0],
        },
    )
    path = tmp_path / "fc.nc"
    src.to_netcdf(path)
    ds = open_era5(path)
    assert ds["temperature"].dims == ("time", "level", "latitude", "longitude")
    assert ds["level"].values.tolist() == [500]
    np.testing.assert_array_equal(ds["time"].values, valid.reshape(-1))
    assert ds["temperature"].isel(level=0, latitude=0, longitude=0).values.tolist() == [
        250.0, 251.0, 252.0, 253.0,
    ]


def test_single_run_steps_become_time(tmp_path: Path) -> None:
    """One forecast run: scalar time, a step axis and valid_time along step."""
    steps = pd.to_timedelta([0, 6, 12], unit="h")
    init = pd.Timestamp("2020-01-01")
    values = 270 + np.arange(6, dtype="f4").reshape(3, 1, 2) // 2
    src = xr.Dataset(
        {"2t": (("step", "latitude", "longitude"), values)},
        coords={
            "time": init, "step": steps, "valid_time": ("step", (init + steps).values),
            "latitude": [0.0], "longitude": [0.0, 1.0],
        },
    )
    path = tmp_path / "run.nc"
    src.to_netcdf(path)
    ds = open_era5(path)
    np.testing.assert_array_equal(ds["time"].values, (init + steps).values)
    assert ds["2m_temperature"].isel(latitude=0, longitude=1).values.tolist() == [270, 271, 272]


def test_precipitation_metres_to_mm(tmp_path: Path) -> None:
    tp = (("time", "latitude", "longitude"), np.full((2, 2, 2), 0.002), {"units": "m"})
    src = xr.Dataset(
        {"total_precipitation_6hr": tp},
        coords={"time": TIMES[:2], "latitude": [10.0, 0.0], "longitude": [0.0, 1.0]},
    )
    path = tmp_path / "tp.zarr"
    src.to_zarr(path, consolidated=False)
    ds = open_era5(path)
    assert ds["total_precipitation_6hr"].attrs["units"] == "mm"
    np.testing.assert_allclose(ds["total_precipitation_6hr"].values, 2.0)


def test_format_sniffed_from_content(wb2_nc: Path) -> None:
    path = wb2_nc.rename(wb2_nc.with_suffix(".dat"))
    ds = open_era5(path, variables=["2m_temperature"])
    assert list(ds.data_vars) == ["2m_temperature"]


def test_unknown_variable_request(wb2_nc: Path) -> None:
    with pytest.raises(DataError, match="temperature.*Available.*2m_temperature"):
        open_era5(wb2_nc, variables=["temperature"])
    with pytest.raises(DataError, match="10m_wind_speed"):  # in the file but not in the schema
        open_era5(wb2_nc, variables=["10m_wind_speed"])


def test_missing_level(wb2_nc: Path) -> None:
    with pytest.raises(DataError, match=r"\[700\].*500, 850, 1000"):
        open_era5(wb2_nc, variables=["geopotential"], levels=[500, 700])


def test_empty_time_slice(wb2_nc: Path) -> None:
    with pytest.raises(DataError, match="selects nothing"):
        open_era5(wb2_nc, variables=["2m_temperature"], time=slice("2030-01-01", "2030-02-01"))


def _hours(*hours: int) -> pd.DatetimeIndex:
    return TIMES[0] + pd.to_timedelta(list(hours), unit="h")


@pytest.mark.parametrize(
    ("times", "match"),
    [
        (
            _hours(0, 6, 6, 12),
            r"Duplicate time\(s\) of .*bad\.zarr: 2020-01-01T06:00:00\. .*drop_duplicates",
        ),
        (
            _hours(0, 12, 6, 18),
            r"bad\.zarr decreases at 2020-01-01T12:00:00 -> 2020-01-01T06:00:00; .*sortby",
        ),
    ],
    ids=["duplicate", "decreasing"],
)
def test_bad_time_axis_is_refused(tmp_path: Path, times: pd.DatetimeIndex, match: str) -> None:
    path = tmp_path / "bad.zarr"
    _wb2_dataset(times=times).to_zarr(path, consolidated=False)
    with pytest.raises(DataError, match=match) as info:
        open_era5(path, variables=["2m_temperature"])
    assert "\n" not in str(info.value) and "('time')" in str(info.value)
    with pytest.raises(DataError, match=match):  # a time= selection does not hide it
        open_era5(path, variables=["2m_temperature"], time=slice("2020-01-01", "2020-01-02"))


def test_time_gap_is_kept_as_is(tmp_path: Path) -> None:
    """open_era5 builds no windows: a gap is left for WindowDataset to skip (test_loader)."""
    path = tmp_path / "gap.zarr"
    _wb2_dataset(times=_hours(0, 6, 36, 42)).to_zarr(path, consolidated=False)
    ds = open_era5(path, variables=["2m_temperature"])
    np.testing.assert_array_equal(ds["time"].values, _hours(0, 6, 36, 42).values)


def test_duplicate_longitude_after_wrapping_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "lon.nc"
    _wb2_dataset(lons=np.array([-180.0, -90.0, 0.0, 90.0, 180.0])).to_netcdf(path)
    with pytest.raises(
        DataError, match=r"Duplicate longitude\(s\) in \[0, 360\): \[180\.0\] "
        r"\(from \[\[-180\.0, 180\.0\]\]\); drop the repeated"
    ):
        open_era5(path, variables=["2m_temperature"])


def test_duplicate_latitude_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "lat.nc"
    _wb2_dataset(lats=np.array([-60.0, -30.0, -30.0, 30.0])).to_netcdf(path)
    with pytest.raises(
        DataError, match=r"Duplicate latitude\(s\) \[-30\.0\].*drop_duplicates\('latitude'\)"
    ):
        open_era5(path, variables=["2m_temperature"])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere.zarr"):
        open_era5(tmp_path / "nowhere.zarr")


def test_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.nc"
    path.write_bytes(b"this is not netCDF\x00\x01\x02" * 100)
    with pytest.raises(DataError, match=r"broken\.nc.*netcdf4"):
        open_era5(path)


def test_check_finite(wb2_nc: Path) -> None:
    ds = open_era5(wb2_nc, variables=["2m_temperature", "geopotential"])
    check_finite(ds)
    bad = ds.copy()
    bad["geopotential"] = ds["geopotential"].where(ds["level"] != 850)
    with pytest.raises(DataError, match=r"'geopotential': 80 of 240") as info:
        check_finite(bad)
    assert "2m_temperature" not in str(info.value)


def test_write_wb2_zarr_round_trip(wb2_nc: Path, tmp_path: Path) -> None:
    names = ["2m_temperature", "geopotential", "land_sea_mask"]
    ds = open_era5(wb2_nc, variables=names, levels=[850])
    out = write_wb2_zarr(ds, tmp_path / "cache.zarr")
    back = open_era5(out)
    xr.testing.assert_identical(back.drop_attrs(deep=False), ds.drop_attrs(deep=False))
    with pytest.raises(DataError, match="exists"):
        write_wb2_zarr(ds, out)


# --- real samples (skipped when ../shared/data/era5-sample is absent) ---------------------------


def test_real_grib_2m_temperature() -> None:
    path = _sample("era5-2mt-2019-03-uk.grib")
    pytest.importorskip("cfgrib", reason="GRIB needs cfgrib (pip install 'wpeft[grib]')")
    ds = open_era5(path)
    da = ds["2m_temperature"]
    assert list(ds.data_vars) == ["2m_temperature"]
    assert da.dims == ("time", "latitude", "longitude")
    assert da.shape == (744, 33, 49)
    assert np.all(np.diff(ds["latitude"].values) < 0)
    assert da.chunks is not None
    values = da.values
    assert 260.0 < values.mean() < 300.0
    assert 240.0 < values.min() and values.max() < 310.0
    march_2nd = open_era5(path, time=slice("2019-03-02", "2019-03-02"))
    assert march_2nd.sizes["time"] == 24


@pytest.mark.filterwarnings("ignore:variable '.' has non-conforming '_FillValue'")
def test_real_eraint_uvz() -> None:
    path = _sample("eraint_uvz.nc")
    with pytest.warns(UserWarning, match="month"):
        ds = open_era5(path)
    assert sorted(ds.data_vars) == ["geopotential", "u_component_of_wind", "v_component_of_wind"]
    assert ds["level"].values.tolist() == [200, 500, 850]
    assert (ds.sizes["latitude"], ds.sizes["longitude"]) == (241, 480)
    z500 = ds["geopotential"].sel(level=500)
    weights = np.cos(np.deg2rad(ds["latitude"]))
    mean = float(z500.weighted(weights).mean().compute())
    assert 5.3e4 < mean < 5.7e4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_finite(ds)
