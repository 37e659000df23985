"""The data description of real sources: opening, regions, periods, statics and lazy fields."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from wpeft.data.batch import Fields, LazyVariable
from wpeft.data.era5 import write_wb2_zarr
from wpeft.data.source import (
    DataSource,
    coerce_source,
    open_source,
    select_region,
    split_by_period,
)
from wpeft.data.world import open_world
from wpeft.errors import ConfigError, DataError

SURF = ["2m_temperature", "10m_u_component_of_wind"]
STATIC = ["land_sea_mask", "geopotential_at_surface", "soil_type"]


@pytest.fixture(scope="module")
def world() -> xr.Dataset:
    return open_world(progress=False).isel(time=slice(0, 40)).load()


@pytest.fixture(scope="module")
def store(world: xr.Dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A zarr store of the world without precipitation and statics (those go to a separate file)."""
    root = tmp_path_factory.mktemp("source")
    write_wb2_zarr(world.drop_vars([*STATIC, "total_precipitation_6hr"]), root / "era5.zarr")
    write_wb2_zarr(world[STATIC], root / "static.zarr")
    return root


def test_open_source_reads_what_is_asked_and_crops_the_region(world, store) -> None:
    src = DataSource(path=str(store / "era5.zarr"), region=(20.0, 60.0, 30.0, 120.0))
    ds, lacking = open_source(src, required=SURF, optional=["temperature"], levels=[850])
    assert lacking == ()
    assert sorted(ds.data_vars) == sorted([*SURF, "temperature"])
    assert ds["level"].values.tolist() == [850]
    lat, lon = ds["latitude"].values, ds["longitude"].values
    assert lat.min() >= 20 and lat.max() <= 60 and lon.min() >= 30 and lon.max() <= 120
    expected = world["2m_temperature"].sel(latitude=lat, longitude=lon)
    np.testing.assert_array_equal(ds["2m_temperature"].values, expected.values)


def test_region_in_minus_180_convention_is_wrapped(world) -> None:
    a = select_region(world, (-30.0, 30.0, -60.0, -20.0))
    b = select_region(world, (-30.0, 30.0, 300.0, 340.0))
    assert a["longitude"].values.tolist() == b["longitude"].values.tolist()
    assert a["longitude"].values.min() >= 300 and a["longitude"].values.max() <= 340


def test_region_across_the_prime_meridian_is_refused_with_the_reason(world) -> None:
    with pytest.raises(DataError, match="crosses the prime meridian"):
        select_region(world, (-30.0, 30.0, -10.0, 10.0))


def test_region_outside_a_regional_grid_is_refused(world) -> None:
    regional = world.isel(latitude=slice(0, 8), longitude=slice(0, 16))
    with pytest.raises(DataError, match="outside the grid"):
        select_region(regional, (-60.0, -20.0, 0.0, 30.0))


def test_missing_variables_are_named_and_fill_is_opt_in(store) -> None:
    path = str(store / "era5.zarr")
    with pytest.raises(DataError, match="total_precipitation_6hr"):
        open_source(DataSource(path=path), required=["total_precipitation_6hr"])
    with pytest.raises(DataError, match=r"land_sea_mask.*fill_missing"):
        open_source(DataSource(path=path), required=SURF, optional=STATIC)
    ds, lacking = open_source(DataSource(path=path, fill_missing=True), required=SURF, optional=STATIC)
    assert lacking == tuple(STATIC)
    assert not set(STATIC) & set(ds.data_vars)


def test_statics_come_from_a_separate_file(world, store) -> None:
    src = DataSource(path=str(store / "era5.zarr"), statics=str(store / "static.zarr"))
    ds, lacking = open_source(src, required=SURF, optional=STATIC)
    assert lacking == ()
    np.testing.assert_array_equal(ds["land_sea_mask"].values, world["land_sea_mask"].values)


def test_statics_on_another_grid_are_refused(world, store, tmp_path) -> None:
    other = world[STATIC].isel(latitude=slice(0, 16))
    write_wb2_zarr(other, tmp_path / "static.zarr")
    src = DataSource(path=str(store / "era5.zarr"), statics=str(tmp_path / "static.zarr"))
    with pytest.raises(DataError, match="another grid"):
        open_source(src, required=SURF, optional=STATIC)


def test_missing_level_is_named(store) -> None:
    src = DataSource(path=str(store / "era5.zarr"), levels=(850, 123))
    with pytest.raises(DataError, match=r"no level\(s\) \[123\]"):
        open_source(src, required=["temperature"])


def test_periods_outside_the_store_are_refused(world, store) -> None:
    src = DataSource(
        path=str(store / "era5.zarr"),
        train=("1990-01-01", "1990-01-03"),
        val=("1990-01-04", "1990-01-05"),
        test=("1990-01-06", "1990-01-07"),
    )
    with pytest.raises(DataError, match="outside"):
        open_source(src, required=SURF)


def test_time_step_thins_the_axis(store) -> None:
    ds, _ = open_source(DataSource(path=str(store / "era5.zarr"), time_step_hours=12), required=SURF)
    hours = pd.DatetimeIndex(ds["time"].values).hour
    assert set(hours) <= {0, 12}
    assert np.all(np.diff(ds["time"].values) == np.timedelta64(12, "h"))
    with pytest.raises(DataError, match="not a multiple"):
        open_source(DataSource(path=str(store / "era5.zarr"), time_step_hours=9), required=SURF)


def test_split_by_period_keeps_whole_samples_only() -> None:
    t = np.arange("2020-01-01T00", "2020-01-05T00", np.timedelta64(6, "h"), dtype="datetime64[ns]")
    starts, ends = t[:-1], t[1:]  # samples touching two consecutive steps
    periods = DataSource(
        path="x",
        train=("2020-01-01", "2020-01-02"),
        val=("2020-01-03", "2020-01-03"),
        test=("2020-01-04", "2020-01-04"),
    ).periods
    out = split_by_period(starts, ends, periods)
    # steps t[0] = 01T00 .. t[15] = 04T18; sample i touches t[i], t[i + 1].
    # train: t[i + 1] <= 02T18 = t[7] -> i <= 6; sample 7 (02T18 -> 03T00) straddles and is dropped
    assert out["train"].tolist() == list(range(7))
    # val: t[i] >= 03T00 = t[8] and t[i + 1] <= 03T18 = t[11]
    assert out["val"].tolist() == [8, 9, 10]
    assert out["test"].tolist() == [12, 13, 14]
    for a in out.values():
        assert np.all(ends[a] >= starts[a])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"path": ""}, "non-empty"),
        ({"path": "x", "variables": ["2t"]}, "unknown"),
        ({"path": "x", "levels": [850.5]}, "integer hPa"),
        ({"path": "x", "region": [60, 20, 0, 10]}, "south < north"),
        ({"path": "x", "region": [0, 10, 0]}, "four numbers"),
        ({"path": "x", "train": ["2020-01-01", "2020-02-01"]}, "give all of"),
        (
            {
                "path": "x",
                "train": ["2020-01-01", "2020-02-01"],
                "val": ["2020-01-15", "2020-03-01"],
                "test": ["2020-04-01", "2020-05-01"],
            },
            "overlap",
        ),
        ({"path": "x", "time_step_hours": 0}, "positive integer"),
        ({"path": "x", "colour": "red"}, r"unknown field\(s\) \['colour'\]"),
        ({"variables": ["2m_temperature"]}, "'path'"),
    ],
)
def test_bad_descriptions_are_refused_in_one_line(fields, message) -> None:
    with pytest.raises(ConfigError, match=message):
        coerce_source(fields)


def test_coerce_source_accepts_a_path_and_a_mapping() -> None:
    assert coerce_source("a.zarr") == DataSource(path="a.zarr")
    src = coerce_source({"path": "a.zarr", "levels": [500, 850], "region": [0, 10, 20, 30]})
    assert src.levels == (500, 850) and src.region == (0.0, 10.0, 20.0, 30.0)
    assert coerce_source(None) is None


def test_lazy_fields_equal_eager_fields_and_read_only_the_indexed_steps(world, store) -> None:
    ds, _ = open_source(DataSource(path=str(store / "era5.zarr")), required=SURF, optional=["temperature"])
    eager = Fields.from_dataset(ds, surf_vars=("2t", "10u"), atmos_vars=("t",))
    lazy = Fields.from_dataset(ds, surf_vars=("2t", "10u"), atmos_vars=("t",), lazy=True)
    assert isinstance(lazy.surf["2t"], LazyVariable)
    window = torch.tensor([[3, 5], [5, 9], [0, 1]])
    torch.testing.assert_close(lazy.surf["2t"][window], eager.surf["2t"][window], rtol=0, atol=0)
    torch.testing.assert_close(lazy.atmos["t"][window], eager.atmos["t"][window], rtol=0, atol=0)
    torch.testing.assert_close(lazy.surf["10u"][2:7], eager.surf["10u"][2:7], rtol=0, atol=0)
    assert lazy.surf["2t"][window].shape == (3, 2, *eager.grid)
    b1, b2 = lazy.batch([4, 6], history=2), eager.batch([4, 6], history=2)
    torch.testing.assert_close(b1.surf_vars["2t"], b2.surf_vars["2t"], rtol=0, atol=0)


def test_lazy_variable_names_the_time_of_a_nan(world) -> None:
    da = world["2m_temperature"].copy()
    da[7, 3, 3] = np.nan
    var = LazyVariable(da)
    var[torch.tensor([1, 2])]  # clean steps read fine
    with pytest.raises(DataError, match=str(da["time"].values[7])[:13]):
        var[torch.tensor([[6, 7]])]


def test_on_earth_tells_real_data_from_the_world() -> None:
    from wpeft.data.source import on_earth

    assert not on_earth({})
    assert not on_earth({"source": "world", "split_fractions": [0.7, 0.15, 0.15]})
    assert on_earth({"data": {"path": "era5.zarr"}})
    assert on_earth({"source": "data", "data": "era5.zarr"})
