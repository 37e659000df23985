"""From schema Datasets (and WB2 stores on disk) to aurora.Batch, and the errors on bad input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from aurora import Metadata

from wpeft.backbones.aurora_adapter import build_backbone
from wpeft.data.batch import Fields, check_grid, wb2_name
from wpeft.data.era5 import open_era5
from wpeft.errors import DataError
from wpeft.tasks import TaskBatch
from wpeft.tasks.common import make_batch

LEVELS = [250, 500, 850]
SURF = ("2t", "10u", "10v", "msl")
ATMOS = ("z", "u", "v", "t", "q")
STATIC = ("lsm", "z", "slt")


def wb2_store(path: Path, nt: int = 4, nlat: int = 32, nlon: int = 64) -> Path:
    """A tiny store in WeatherBench2 layout (latitude increasing, as WB2's grids have it)."""
    rng = np.random.default_rng(0)
    lat = np.linspace(-87.1875, 87.1875, nlat)
    lon = np.arange(nlon) * 360 / nlon
    time = pd.date_range("2020-01-01", periods=nt, freq="6h")
    data = {}
    for a in SURF:
        data[wb2_name(a, "surface")] = (("time", "latitude", "longitude"), rng.normal(size=(nt, nlat, nlon)))
    for a in ATMOS:
        data[wb2_name(a, "atmos")] = (
            ("time", "level", "latitude", "longitude"),
            rng.normal(size=(nt, len(LEVELS), nlat, nlon)),
        )
    for a in STATIC:
        data[wb2_name(a, "static")] = (("latitude", "longitude"), rng.normal(size=(nlat, nlon)))
    ds = xr.Dataset(data, coords={"time": time, "level": LEVELS, "latitude": lat, "longitude": lon})
    ds.to_zarr(path, mode="w", consolidated=False)
    return path


def test_wb2_store_to_batch_to_backbone(tmp_path) -> None:
    ds = open_era5(wb2_store(tmp_path / "wb2.zarr"))
    fields = Fields.from_dataset(ds, surf_vars=SURF, atmos_vars=ATMOS, static_vars=STATIC)
    assert fields.grid == (32, 64) and len(fields) == 4
    assert fields.levels == (250, 500, 850)
    batch = fields.batch([1, 3], history=2)
    assert batch.surf_vars["2t"].shape == (2, 2, 32, 64)
    assert batch.atmos_vars["t"].shape == (2, 2, 3, 32, 64)
    assert batch.static_vars["z"].shape == (32, 64)
    # sample 1's history is steps 2 and 3, and latitude was flipped to decreasing with the data
    raw = xr.open_zarr(tmp_path / "wb2.zarr", consolidated=False)
    expect = raw["2m_temperature"].isel(time=[2, 3]).sortby("latitude", ascending=False).values
    np.testing.assert_allclose(batch.surf_vars["2t"][1].numpy(), expect, rtol=1e-6)
    assert batch.metadata.time[1] == pd.Timestamp("2020-01-01T18").to_pydatetime()
    assert batch.metadata.lat[0] > batch.metadata.lat[-1]
    # Aurora's own statistics (empty norm_mean) cover these levels: the forward pass runs.
    model = build_backbone("tiny")
    with torch.no_grad():
        pred = model(batch)
    assert pred.atmos_vars["z"].shape == (2, 1, 3, 32, 64)


def test_bad_inputs_name_the_problem(tmp_path) -> None:
    ds = open_era5(wb2_store(tmp_path / "wb2.zarr"))
    with pytest.raises(DataError, match="'tcwv'"):
        Fields.from_dataset(ds, surf_vars=("tcwv",), atmos_vars=())
    with pytest.raises(DataError, match="lacks required variable.*'specific_humidity'"):
        Fields.from_dataset(ds.drop_vars("specific_humidity"), surf_vars=(), atmos_vars=("q",))
    broken = ds.load()
    broken["temperature"][0, 1, 5, 5] = np.nan
    with pytest.raises(DataError, match="'temperature' has 1 NaN"):
        Fields.from_dataset(broken, surf_vars=(), atmos_vars=("t",))
    with pytest.raises(DataError, match="Grid 33 x 49 does not fit.*patch size 4"):
        check_grid(33, 49, 4)
    check_grid(33, 48, 4)  # one extra latitude row is fine (Aurora crops it)
    fields = Fields.from_dataset(ds, surf_vars=("2t",), atmos_vars=())
    with pytest.raises(DataError, match="outside the 4 available steps"):
        fields.batch([0], history=2)


SAMPLE = Path(os.environ.get("WPEFT_ERA5_SAMPLE", Path(__file__).resolve().parents[2] / "shared/data/era5-sample"))


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"ERA5 sample folder {SAMPLE} is absent")
def test_real_era5_grib_to_batch() -> None:
    ds = open_era5(SAMPLE / "era5-2mt-2019-03-uk.grib", time=slice("2019-03-01", "2019-03-02"))
    # 33 x 49 at 0.25 degrees does not fit a patch size of 4 ...
    with pytest.raises(DataError, match="does not fit"):
        check_grid(ds.sizes["latitude"], ds.sizes["longitude"], 4)
    # ... a 32 x 48 crop does, and becomes a batch of real 2 m temperatures.
    crop = ds.isel(latitude=slice(0, 32), longitude=slice(0, 48))
    fields = Fields.from_dataset(crop, surf_vars=("2t",), atmos_vars=())
    batch = fields.batch([6, 12], history=2)
    assert batch.surf_vars["2t"].shape == (2, 2, 32, 48)
    assert 250 < float(batch.surf_vars["2t"].mean()) < 295


# --- TaskBatch: the contract between a task and the training loop -----------------------------


def _task_batch(size: int = 2, **overrides) -> TaskBatch:
    """A TaskBatch of ``size`` samples on a 4 x 8 grid with one level (surface, atmos, extra)."""
    times = pd.date_range("2020-01-01", periods=size, freq="6h").values
    inputs = make_batch(
        {"2t": torch.zeros(size, 2, 4, 8)},
        {"t": torch.zeros(size, 2, 1, 4, 8)},
        {"lsm": torch.zeros(4, 8)},
        torch.linspace(80, -80, 4),
        torch.arange(8) * 45.0,
        (850,),
        times,
    )
    fields = {
        "inputs": inputs,
        "targets": {"2m_temperature": torch.ones(size, 4, 8)},
        "times": times,
        "extra": {"2m_temperature_ens_spread": torch.ones(size, 4, 8)},
    }
    return TaskBatch(**{**fields, **overrides})


def test_task_batch_refuses_what_does_not_fit_its_batch_size() -> None:
    assert _task_batch(3).size == 3
    with pytest.raises(DataError, match=r"targets\['2m_temperature'\] has shape \(3, 4, 8\).*batch size 2"):
        _task_batch(targets={"2m_temperature": torch.ones(3, 4, 8)})
    with pytest.raises(DataError, match=r"extra\['spread'\] has shape \(\).*batch size 2"):
        _task_batch(extra={"spread": torch.tensor(1.0)})
    with pytest.raises(DataError, match=r"targets\['tp'\] must be a tensor, got ndarray"):
        _task_batch(targets={"tp": np.ones((2, 4, 8))})
    with pytest.raises(DataError, match=r"times has shape \(1,\); it must be \(2,\)"):
        _task_batch(times=_task_batch().times[:1])
    with pytest.raises(DataError, match="must be an aurora.Batch, got dict"):
        _task_batch(inputs={"2t": torch.zeros(2, 2, 4, 8)})
    inputs = _task_batch().inputs
    inputs.atmos_vars["t"] = torch.zeros(1, 2, 1, 4, 8)
    with pytest.raises(DataError, match=r"inputs.atmos_vars\['t'\] has shape \(1, 2, 1, 4, 8\)"):
        _task_batch(inputs=inputs)


def test_task_batch_to_moves_every_tensor(monkeypatch) -> None:
    batch = _task_batch()
    # Aurora's Metadata checks coordinate values, which meta tensors do not have.
    monkeypatch.setattr(Metadata, "__post_init__", lambda self: None)
    assert batch.to("cpu") is batch and batch.to(torch.device("cpu")) is batch
    moved = batch.to(torch.device("meta"))
    assert moved is not batch and moved.times is batch.times
    tensors = list(moved._tensors())
    assert len(tensors) == 7 and all(t.device.type == "meta" for t in tensors)
    assert moved.targets["2m_temperature"].shape == (2, 4, 8)
    assert moved.inputs.atmos_vars["t"].shape == (2, 2, 1, 4, 8)
    assert moved.to("meta") is moved
    assert all(t.device.type == "cpu" for t in batch._tensors())  # the original stays put
