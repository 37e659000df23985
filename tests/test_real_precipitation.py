"""Regional precipitation on real ERA5 stores (``data=``), built here from the embedded world.

Two stores hold the first 10 days of the default world (32 x 64, 6-hourly):

* a WeatherBench2-like store: ``total_precipitation_6hr`` in metres (units ``m``, so the reader's
  conversion to mm is exercised), the whole grid;
* an ARCO-ERA5-like hourly store: ``total_precipitation`` in metres, each 6-hour total spread
  evenly over its six hours (so the task's 6-hour sums must give the totals back), the other
  variables interpolated linearly in time; a 16 x 24 part of the grid, to stay small.

Training runs on a 12 x 16 box given in degrees (west of the prime meridian as negative
longitudes); periods are dates: train Jan 1-3, val Jan 4-6, test Jan 7-9 of 2000.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from wpeft.backbones.pretrain import load_pretrained
from wpeft.data.era5 import write_wb2_zarr
from wpeft.data.world import open_world
from wpeft.errors import ConfigError, DataError
from wpeft.tasks.precipitation import HOURLY, TARGET, Precipitation
from wpeft.training.loop import TrainConfig, train

REGION = (
    25.0,
    87.5,
    -124.0,
    -39.0,
)  # 12 x 16 points of the 5.625° grid: 87.19..25.31N, 236.25..320.625E
GRID = (12, 16)
PERIODS = {
    "train": ("2000-01-01", "2000-01-03"),
    "val": ("2000-01-04", "2000-01-06"),
    "test": ("2000-01-07", "2000-01-09"),
}
HOUR = np.timedelta64(1, "h")


@pytest.fixture(scope="module")
def world() -> xr.Dataset:
    return open_world(progress=False).isel(time=slice(0, 40)).load()


def write(ds: xr.Dataset, path: Path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr v3 / consolidation notes
        write_wb2_zarr(ds, path)
    return str(path)


def in_metres(ds: xr.Dataset, name: str, units: str = "m") -> xr.Dataset:
    out = ds.copy()
    out[name] = (ds[name] / 1000.0).astype(np.float32).assign_attrs(units=units)
    return out


def hourly(world: xr.Dataset) -> xr.Dataset:
    """Hourly times from 01:00 of the first day to the world's last time: each 6-hour total
    spread evenly over the six hours ending at its time, the rest interpolated linearly."""
    times = np.arange(world.time.values[0] + HOUR, world.time.values[-1] + HOUR, HOUR)
    ds = world.drop_vars(TARGET).interp(time=times).astype(np.float32)
    ending = np.ceil((times - world.time.values[0]) / np.timedelta64(6, "h")).astype(int)
    tp = world[TARGET].isel(time=ending).values / 6.0
    ds[HOURLY] = (("time", "latitude", "longitude"), tp.astype(np.float32), {"units": "mm"})
    return ds


@pytest.fixture(scope="module")
def part(world: xr.Dataset) -> xr.Dataset:
    """16 x 24 points around the training box (87.19..2.81N, 225..354.375E)."""
    return world.isel(latitude=slice(0, 16), longitude=slice(40, 64))


@pytest.fixture(scope="module")
def wb2_store(world: xr.Dataset, tmp_path_factory: pytest.TempPathFactory) -> str:
    return write(in_metres(world, TARGET), tmp_path_factory.mktemp("wb2") / "era5-6h.zarr")


@pytest.fixture(scope="module")
def hourly_store(part: xr.Dataset, tmp_path_factory: pytest.TempPathFactory) -> str:
    return write(in_metres(hourly(part), HOURLY), tmp_path_factory.mktemp("arco") / "era5-1h.zarr")


@pytest.fixture(scope="module")
def pristine():
    return load_pretrained("tiny")


@pytest.fixture
def model(pristine):
    return copy.deepcopy(pristine)


def data(path: str, **kw) -> dict:
    return {"path": path, "region": list(REGION), **PERIODS, **kw}


def world_tp(world: xr.Dataset, times: np.ndarray) -> np.ndarray:
    """The world's 6-hour totals (mm) on the training box at ``times``."""
    box = world[TARGET].isel(latitude=slice(0, 12), longitude=slice(42, 58))
    return box.sel(time=times).values


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("store", ["wb2_store", "hourly_store"])
def test_trains_and_scores_on_a_real_store(store: str, request, tmp_path: Path) -> None:
    path = request.getfixturevalue(store)
    options = {"data": data(path, time_step_hours=6)}
    cfg = TrainConfig(
        task="precipitation",
        method="weatherpeft",
        steps=2,
        batch_size=2,
        warmup_steps=1,
        checkpoint_every=0,
        device="cpu",
        task_options=options,
    )
    summary = train(cfg, tmp_path / "run", progress=False)
    scores = summary["scores"]
    for lead in (12, 24, 36):
        name = f"{TARGET}_{lead}h"
        assert math.isfinite(scores[f"rmse/{name}"])
        assert -1.0 <= scores[f"acc/{name}"] <= 1.0
        assert math.isfinite(scores[f"seeps/{name}"]) and scores[f"seeps/{name}"] >= 0.0
        assert math.isfinite(scores[f"seeps_persistence/{name}"])
    assert summary["grid"] == list(GRID)
    assert summary["precipitation"]["variable"] == (HOURLY if store == "hourly_store" else TARGET)
    assert summary["filled_inputs"] == []
    assert summary["tp_stats"]["std"] > 0
    assert summary["tp_stats"]["period"][0].startswith("2000-01-01")
    assert summary["tp_stats"]["period"][1].startswith("2000-01-03")
    assert summary["samples"]["test"] > 0
    fields = xr.open_dataset(tmp_path / "run" / "fields.nc")
    assert fields.sizes["latitude"] == 12 and fields.sizes["longitude"] == 16
    assert float(fields.longitude[0]) == 236.25


def test_both_stores_give_the_worlds_six_hour_totals(
    wb2_store: str, hourly_store: str, world: xr.Dataset, model
) -> None:
    """m -> mm by the units attribute, and the hourly sums over (t - 6 h, t] are the totals."""
    batches = {}
    for path in (wb2_store, hourly_store):
        task = Precipitation(data=data(path, time_step_hours=6))
        task.setup(copy.deepcopy(model))
        batches[path] = batch = next(task.batches("val", 8, shuffle=False))
        t = batch.times
        assert (np.asarray(t) >= np.datetime64("2000-01-04T12")).all()
        target = batch.targets[TARGET].numpy()
        assert target.shape == (len(t), 3, *GRID)
        for i, lead in enumerate((12, 24, 36)):
            np.testing.assert_allclose(
                target[:, i], world_tp(world, t + lead * HOUR), rtol=1e-5, atol=1e-6
            )
        history = batch.inputs.surf_vars["tp_24h"].numpy()
        np.testing.assert_allclose(
            history[:, 0], world_tp(world, t - 12 * HOUR), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(history[:, 1], world_tp(world, t), rtol=1e-5, atol=1e-6)
        assert batch.inputs.atmos_vars["q"].shape == (len(t), 2, 3, *GRID)
        assert batch.inputs.metadata.atmos_levels == (850, 500, 250)
        assert set(batch.inputs.static_vars) == {"lsm", "z", "slt"}
    a, b = batches.values()
    np.testing.assert_array_equal(a.times, b.times)
    # the other inputs agree at the 6-hourly times (interpolation is exact there)
    torch.testing.assert_close(a.inputs.surf_vars["2t"], b.inputs.surf_vars["2t"])


def test_hourly_sums_end_at_the_valid_time(hourly_store: str, world: xr.Dataset, model) -> None:
    """Without thinning every hour is a sample time; the sum at 03:00 takes 22:00..03:00: half
    of the total ending at 00:00 and half of the one ending at 06:00."""
    task = Precipitation(data=data(hourly_store))
    task.setup(model)
    assert task.describe()["time_step_hours"] == 1
    times = task.data.fields.times
    pos = int(np.nonzero(times == np.datetime64("2000-01-02T03:00", "ns"))[0][0])
    got = task.data.tp[torch.tensor([pos])][0].numpy()
    half = 0.5 * (
        world_tp(world, np.array(["2000-01-02T00"], "datetime64[ns]"))[0]
        + world_tp(world, np.array(["2000-01-02T06"], "datetime64[ns]"))[0]
    )
    np.testing.assert_allclose(got, half, rtol=1e-5, atol=1e-6)
    batch = next(task.batches("train", 4, shuffle=False))
    assert np.diff(batch.times).tolist() == [np.timedelta64(3_600_000_000_000, "ns")] * 3


def test_real_data_needs_the_backbone_before_batches(wb2_store: str) -> None:
    task = Precipitation(data=data(wb2_store))
    assert task.config.source == "data"
    with pytest.raises(ConfigError, match="setup"):
        task.num_samples("train")


def test_missing_input_is_refused_unless_filled(
    part: xr.Dataset, tmp_path: Path, model, pristine
) -> None:
    path = write(in_metres(part.drop_vars("specific_humidity"), TARGET), tmp_path / "no-q.zarr")
    with pytest.raises(DataError, match=r"lacks \['specific_humidity'\].*fill_missing"):
        Precipitation(data=data(path)).setup(model)
    task = Precipitation(data=data(path, fill_missing=True))
    task.setup(model)
    assert task.describe()["filled_inputs"] == ["specific_humidity"]
    batch = next(task.batches("train", 2))
    q = batch.inputs.atmos_vars["q"]
    assert q.shape == (2, 2, 3, *GRID)
    assert float(q[0, 0, 0, 0, 0]) == pytest.approx(pristine.norm_mean["q_850"])
    assert torch.isfinite(task.loss(task.predict(model, batch), batch))


# --------------------------------------------------------------------------- refusals


def refused(path: str, pristine, match: str, **kw) -> None:
    """``setup`` refuses the store with a message matching ``match`` and leaves the backbone
    as it was."""
    before = len(pristine.encoder.surf_token_embeds.weights)
    with pytest.raises((DataError, ConfigError), match=match):
        Precipitation(data=data(path, **kw)).setup(pristine)
    assert len(pristine.encoder.surf_token_embeds.weights) == before


def test_no_precipitation_variable(part: xr.Dataset, tmp_path: Path, pristine) -> None:
    path = write(part.drop_vars(TARGET), tmp_path / "dry.zarr")
    refused(path, pristine, f"holds no precipitation: neither '{TARGET}'.*nor '{HOURLY}'")


def test_metres_labelled_mm(part: xr.Dataset, tmp_path: Path, pristine) -> None:
    path = write(in_metres(part, TARGET, units="mm"), tmp_path / "metres-as-mm.zarr")
    refused(path, pristine, r"wettest 6 hours .* bring only 0\.0\d+ mm.*metres.*'m'")


def test_mm_labelled_metres(part: xr.Dataset, tmp_path: Path, pristine) -> None:
    ds = part.copy()
    ds[TARGET] = ds[TARGET].assign_attrs(units="m")  # mm values, converted once more
    path = write(ds, tmp_path / "mm-as-m.zarr")
    refused(path, pristine, r"more than 1000 mm.*mm labelled 'm'")


def test_unknown_units(part: xr.Dataset, tmp_path: Path, pristine) -> None:
    ds = part.copy()
    ds[TARGET] = ds[TARGET].assign_attrs(units="inches")
    path = write(ds, tmp_path / "inches.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reader's "left unconverted"
        refused(path, pristine, r"units 'inches'.*'m'.*or 'mm'")


def test_region_outside_the_grid(hourly_store: str, pristine) -> None:
    refused(hourly_store, pristine, "reaches outside the grid", region=[-30.0, 40.0, 240.0, 300.0])


def test_region_not_divisible_by_the_patch(wb2_store: str, pristine) -> None:
    refused(
        wb2_store,
        pristine,
        r"region \[25.0, 87.5, 236.0, 326.5\].* 12 x 17 grid.*patch size 4.*"
        r"region \[25.3125, 87.1875, 236.25, 320.625\] \(12 x 16 points\)",
        region=[25.0, 87.5, 236.0, 326.5],
    )


def test_periods_outside_the_store(wb2_store: str, pristine) -> None:
    refused(
        wb2_store,
        pristine,
        "train period 1999-12-01 .. 1999-12-31 lies outside",
        train=("1999-12-01", "1999-12-31"),
    )


def test_nan_in_precipitation(part: xr.Dataset, tmp_path: Path, pristine) -> None:
    ds = in_metres(part, TARGET)
    ds[TARGET][5, 3, 4] = np.nan  # 2000-01-02T06, inside the training box
    path = write(ds, tmp_path / "nan.zarr")
    refused(path, pristine, f"NaN/inf.*'{TARGET}': 1 of")


def test_hourly_precipitation_needs_an_hourly_store(
    part: xr.Dataset, tmp_path: Path, pristine
) -> None:
    ds = in_metres(part, TARGET).rename({TARGET: HOURLY})
    path = write(ds, tmp_path / "6h-named-hourly.zarr")
    refused(path, pristine, "hourly 'total_precipitation' but its time step is 6 h")


def test_precipitation_variable_must_be_one_of_the_two() -> None:
    with pytest.raises(ConfigError, match="learns 'total_precipitation_6hr'"):
        Precipitation(data={"path": "x.zarr", "variables": ["2m_temperature"]})
