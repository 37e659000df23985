"""Downscaling on real stores (``data=``): two stores or one store and a coarsening factor,
periods, lazy reading, and the bad input that must be refused before training.

The stores are written at test time from the embedded world (fine 32 x 64, 6-hourly; its
``resolution="coarse"`` grid is the 4x conservative coarsening), 40 time steps, with
:func:`~wpeft.data.era5.write_wb2_zarr`, so they are real zarr stores read through
:func:`~wpeft.data.source.open_source` like a WeatherBench2 one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from wpeft.backbones.pretrain import load_pretrained
from wpeft.data.batch import Fields, LazyVariable
from wpeft.data.era5 import write_wb2_zarr
from wpeft.data.regrid import coarsen_conservative, upsample_bilinear
from wpeft.data.world import open_world
from wpeft.errors import ConfigError, DataError
from wpeft.tasks import downscaling as ds_module
from wpeft.tasks.downscaling import Downscaling
from wpeft.training.loop import TrainConfig, train

STEPS = 40  # 10 days, 6-hourly
SIX_H = np.timedelta64(6, "h")
STATIC = ["land_sea_mask", "geopotential_at_surface", "soil_type"]
# half the globe, on coarse cell edges: fine 16 x 32 (0..174.375 E), coarse 4 x 8
NORTH_EAST = [0.0, 90.0, 0.0, 177.0]


@pytest.fixture(scope="module")
def world() -> tuple[xr.Dataset, xr.Dataset]:
    fine = open_world(progress=False).isel(time=slice(0, STEPS)).load()
    coarse = open_world(resolution="coarse", progress=False).isel(time=slice(0, STEPS)).load()
    return fine, coarse


@pytest.fixture(scope="module")
def stores(world, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    fine, coarse = world
    root = tmp_path_factory.mktemp("real-downscaling")
    out = {}

    def write(name: str, ds: xr.Dataset) -> None:
        out[name] = str(write_wb2_zarr(ds, root / f"{name}.zarr"))

    write("fine", fine)
    write("coarse", coarse)
    # a coarse store whose centres sit 2 degrees east of the blocks of fine cells
    write("shifted", coarse.assign_coords(longitude=coarse["longitude"] + 2.0))
    # a regional store: the north-western quarter of the globe
    write("regional", fine.isel(latitude=slice(0, 16), longitude=slice(0, 32)))
    # no mean sea level pressure, no specific humidity, no statics
    write("thin", fine.drop_vars(["mean_sea_level_pressure", "specific_humidity", *STATIC]))
    bad = fine.copy(deep=True)
    bad["2m_temperature"][20, 3, 5] = np.nan
    write("nan", bad)
    return out


@pytest.fixture(scope="module")
def model():
    return load_pretrained("tiny")  # downscaling installs nothing: one backbone serves all


def run(tmp_path: Path, **task_options) -> dict:
    cfg = TrainConfig(
        task="downscaling", method="weatherpeft", steps=2, batch_size=2, warmup_steps=1,
        checkpoint_every=2, device="cpu", task_options=task_options,
    )
    return train(cfg, tmp_path, progress=False)


def check_fields(run_dir: Path, grid: tuple[int, int], variables: list[str]) -> xr.Dataset:
    fields = xr.open_dataset(run_dir / "fields.nc").load()
    assert (fields.sizes["latitude"], fields.sizes["longitude"]) == grid
    for name in variables:
        assert fields[name].shape == fields[f"{name}_target"].shape
        assert fields[name].sizes["latitude"] == grid[0]
    return fields


# ------------------------------------------------------------------------------- end to end


def test_train_on_a_fine_and_a_coarse_store(stores, tmp_path: Path) -> None:
    summary = run(tmp_path, data={"path": stores["fine"]}, coarse_path=stores["coarse"])
    data = summary["data"]
    assert data["path"] == stores["fine"] and data["coarse_path"] == stores["coarse"]
    assert data["coarse_factor"] == 4 and data["grid"] == [32, 64] and data["coarse_grid"] == [8, 16]
    assert data["levels"] == [850, 500, 250] and data["filled"] == []
    # default: every surface and atmospheric variable of the backbone that the store has
    assert "mean_sea_level_pressure" in data["variables"] and "geopotential" in data["variables"]
    assert sum(data["samples"].values()) <= STEPS - 1
    fields = check_fields(tmp_path, (32, 64), ["2m_temperature", "temperature"])
    assert fields["temperature"].dims == ("time", "level", "latitude", "longitude")
    assert json.loads((tmp_path / "summary.json").read_text())["data"] == data


def test_train_on_one_store_coarsened_in_a_region(stores, tmp_path: Path) -> None:
    variables = ["2m_temperature", "temperature", "geopotential"]
    summary = run(
        tmp_path,
        data={"path": stores["fine"], "region": NORTH_EAST, "variables": variables},
        coarse_factor=4,
    )
    data = summary["data"]
    assert data["coarse_path"] is None and data["coarse_factor"] == 4
    assert data["grid"] == [16, 32] and data["coarse_grid"] == [4, 8]
    assert data["variables"] == variables and data["region"] == NORTH_EAST
    assert not data["periodic_longitude"]  # a regional grid is clamped, not wrapped
    fields = check_fields(tmp_path, (16, 32), variables)
    assert set(fields.data_vars) == {*variables, *(f"{v}_target" for v in variables)}
    assert float(fields["longitude"].max()) == pytest.approx(174.375)


def test_train_with_periods_given_as_dates(stores, tmp_path: Path) -> None:
    periods = {
        "train": ["2000-01-01", "2000-01-07"],
        "val": ["2000-01-08", "2000-01-08"],
        "test": ["2000-01-10", "2000-01-10"],  # 2000-01-09 is in no period
    }
    data = {"path": stores["fine"], "region": NORTH_EAST, **periods}
    summary = run(tmp_path, data=data, coarse_path=stores["coarse"])
    # a sample belongs to the period that holds both t and t + 6 h
    assert summary["samples"] == {"train": 27, "val": 3, "test": 3}
    assert summary["data"]["samples"] == summary["samples"]
    fields = check_fields(tmp_path, (16, 32), ["2m_temperature"])
    expected = np.datetime64("2000-01-10T06") + SIX_H * np.arange(3)
    np.testing.assert_array_equal(fields["time"].values, expected.astype("datetime64[ns]"))


# ------------------------------------------------------------------------------- inputs


def test_inputs_are_the_coarse_steps_upsampled(world, stores, model) -> None:
    fine, coarse = world
    task = Downscaling(data=stores["fine"], coarse_path=stores["coarse"])
    task.setup(model)
    batch = next(task.batches("val", 3))
    up = upsample_bilinear(coarse, fine)
    for b, t1 in enumerate(batch.times):
        for step, t in enumerate((t1 - SIX_H, t1)):
            torch.testing.assert_close(
                batch.inputs.surf_vars["2t"][b, step],
                torch.from_numpy(up["2m_temperature"].sel(time=t).values),
                rtol=1e-6, atol=1e-4,
            )
            torch.testing.assert_close(
                batch.inputs.atmos_vars["z"][b, step],
                torch.from_numpy(up["geopotential"].sel(time=t).values),
                rtol=1e-6, atol=1e-2,
            )
        torch.testing.assert_close(
            batch.targets["temperature"][b],
            torch.from_numpy(fine["temperature"].sel(time=t1).values),
        )
    assert set(batch.inputs.static_vars) == {"lsm", "z", "slt"}


def test_inputs_of_a_coarsening_factor_match_coarsen_then_upsample(world, stores, model) -> None:
    fine = world[0].isel(latitude=slice(0, 16), longitude=slice(0, 32))  # = NORTH_EAST
    task = Downscaling(data={"path": stores["fine"], "region": NORTH_EAST}, coarse_factor=4)
    task.setup(model)
    batch = next(task.batches("test", 2))
    up = upsample_bilinear(coarsen_conservative(fine, 4), fine)
    for b, t1 in enumerate(batch.times):
        for step, t in enumerate((t1 - SIX_H, t1)):
            torch.testing.assert_close(
                batch.inputs.atmos_vars["t"][b, step],
                torch.from_numpy(up["temperature"].sel(time=t).values),
                rtol=1e-6, atol=1e-4,
            )
        torch.testing.assert_close(
            batch.targets["2m_temperature"][b],
            torch.from_numpy(fine["2m_temperature"].sel(time=t1).values),
        )


def test_lazy_reading_gives_the_eager_batch(stores, model, monkeypatch) -> None:
    def options():
        return {"data": {"path": stores["fine"], "region": NORTH_EAST}, "coarse_path": stores["coarse"]}

    lazy = Downscaling(**options())
    lazy.setup(model)
    assert isinstance(lazy.data.inputs.surf["2t"], LazyVariable)
    assert isinstance(lazy.data.truth.atmos["t"], LazyVariable)
    real = Fields.from_dataset.__func__  # type: ignore[attr-defined]

    def eager(cls, ds, **kw):
        return real(cls, ds, **{**kw, "lazy": False})

    monkeypatch.setattr(ds_module.Fields, "from_dataset", classmethod(eager))
    loaded = Downscaling(**options())
    loaded.setup(model)
    assert torch.is_tensor(loaded.data.inputs.surf["2t"])
    a = next(lazy.batches("train", 4, seed=3))
    b = next(loaded.batches("train", 4, seed=3))
    np.testing.assert_array_equal(a.times, b.times)
    for group in ("surf_vars", "atmos_vars", "static_vars"):
        x, y = getattr(a.inputs, group), getattr(b.inputs, group)
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0)
    for k in a.targets:
        torch.testing.assert_close(a.targets[k], b.targets[k], rtol=0, atol=0)


def test_missing_inputs_are_refused_unless_filled(stores, model) -> None:
    thin = {"path": stores["thin"], "variables": ["2m_temperature", "temperature"]}
    with pytest.raises(DataError, match=r"mean_sea_level_pressure.*fill_missing"):
        Downscaling(data=thin, coarse_factor=4).setup(model)
    task = Downscaling(data={**thin, "fill_missing": True}, coarse_factor=4)
    task.setup(model)
    # in the backbone's order: surface, atmospheric, static
    assert task.describe()["data"]["filled"] == [
        "mean_sea_level_pressure", "specific_humidity", *STATIC
    ]
    batch = next(task.batches("train", 2))
    msl = batch.inputs.surf_vars["msl"]
    assert msl.unique().numel() == 1 and float(msl[0, 0, 0, 0]) == pytest.approx(model.norm_mean["msl"])
    q = batch.inputs.atmos_vars["q"]
    assert float(q[0, 1, 1, 3, 3]) == pytest.approx(model.norm_mean["q_500"])
    assert batch.inputs.static_vars["lsm"].unique().numel() == 1
    assert set(batch.targets) == {"2m_temperature", "temperature"}


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"data": {"variables": ["mean_sea_level_pressure"], "path": "thin"}}, DataError,
         r"lacks \['mean_sea_level_pressure'\]"),
        ({"data": {"variables": ["total_precipitation_6hr"]}}, ConfigError,
         "total_precipitation_6hr"),
        ({"data": {"levels": [850, 925]}}, DataError, r"no level\(s\) \[925\]"),
        ({"data": {"train": ["1999-01-01", "1999-06-30"], "val": ["1999-07-01", "1999-07-31"],
                   "test": ["2000-01-02", "2000-01-05"]}}, DataError,
         "train period 1999-01-01 .. 1999-06-30 lies outside"),
        ({"data": {"train": ["2000-01-01", "2000-01-02"], "val": ["2000-01-03", "2000-01-03"],
                   "test": ["2000-01-11", "2000-01-11"]}}, DataError, "test period 2000-01-11"),
        ({"data": {"path": "regional", "region": [-60.0, -20.0, 0.0, 90.0]}}, DataError,
         r"region \[-60.0, -20.0, 0.0, 90.0\] reaches outside the grid"),
        ({"data": {"region": [0.0, 90.0, 0.0, 180.0]}}, DataError,
         r"16 x 33 .* data.region \[0.0, 90.0, 0.0, 180.0\] .* e.g. \[2.8125, 87.1875, 0.0, 177.1875\]"),
        ({"data": {"region": [0.0, 90.0, 0.0, 177.0]}, "coarse_factor": 3}, DataError,
         "coarse factor 3 must divide"),
        ({"coarse_path": "shifted"}, DataError,
         r"coarse grid .*shifted.zarr \(8 x 16.* does not nest in the fine grid .*fine.zarr \(32 x 64"),
        ({"data": {"path": "nan"}, "coarse_factor": 4}, DataError,
         r"NaN/inf.*'2m_temperature': 1 of"),
        ({"data": {"time_step_hours": 12}}, DataError, "12 h, which does not divide 6 hours"),
    ],
)
def test_bad_input_is_refused_at_setup_naming_it(stores, model, options, error, match) -> None:
    data = {"path": "fine", **options.get("data", {})}
    data["path"] = stores[data["path"]]
    kw = {"data": data, **{k: v for k, v in options.items() if k != "data"}}
    if "coarse_path" in kw:
        kw["coarse_path"] = stores[kw["coarse_path"]]
    elif "coarse_factor" not in kw:
        kw["coarse_path"] = stores["coarse"]
    with pytest.raises(error, match=match) as info:
        Downscaling(**kw).setup(model)
    assert "\n" not in str(info.value)


def test_bad_data_stops_a_run_before_its_first_step(stores, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="2m_temperature"):
        run(tmp_path / "run", data={"path": stores["nan"]}, coarse_factor=4)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    # with the up-front pass off the NaN is still caught, by the batch that reads it
    task = Downscaling(data={"path": stores["nan"], "check_finite": False}, coarse_factor=4)
    task.setup(load_pretrained("tiny"))
    with pytest.raises(DataError, match="'2m_temperature' has NaN/inf values at time 2000-01-06"):
        for split in ("train", "val", "test"):
            for _ in task.batches(split, 8):
                pass
