"""Tests of the downstream tasks (wpeft.tasks.downscaling / postprocessing / precipitation).

One small embedded world (16 x 32, 20 days, 12 ensemble forecasts of 4 members at 24 h lead) is
generated once per module into a temporary cache; the pretrained ``tiny`` backbone runs on it
(patch 4 fits 16 x 32 and the 12 x 16 precipitation crop). The real-data variant of downscaling
runs on the ERA5 UK sample when the shared folder is present and is skipped otherwise.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from wpeft.backbones.pretrain import load_pretrained
from wpeft.data.batch import random_batch
from wpeft.data.regrid import upsample_bilinear
from wpeft.data.schema import VARIABLES
from wpeft.data.world import WorldConfig, open_world, open_world_ensemble
from wpeft.errors import ConfigError, DataError
from wpeft.methods import create_method
from wpeft.tasks import TASKS, TaskBatch, create_task
from wpeft.tasks.common import split_by_time, time_step
from wpeft.tasks.downscaling import Downscaling
from wpeft.tasks.postprocessing import Postprocessing, gaussian_crps
from wpeft.tasks.precipitation import TARGET, Precipitation

WORLD = WorldConfig(
    nlat=16,
    nlon=32,
    days=20,
    spinup_days=1,
    ensemble_inits=12,
    ensemble_members=4,
    ensemble_lead_hours=24,
)
CROP = (12, 16)  # precipitation crop of the small world: multiples of patch 4, >= 3 patches
# The tiny backbone (by hand): D = 64, history T = 2, patch P = 4, decoder width 2D = 128.
KERNEL = 64 * 1 * 2 * 4 * 4  # one patch-embedding kernel (D, 1, T, P, P)
HEAD = 128 * 16 + 16  # one LinearPatchReconstruction(2D -> P*P) with bias
SIX_H = np.timedelta64(6, "h")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("tasks-cache"))


@pytest.fixture(scope="module")
def downscaling(cache: str) -> Downscaling:
    return Downscaling(world=WORLD, cache_dir=cache)


@pytest.fixture(scope="module")
def postprocessing(cache: str) -> Postprocessing:
    return Postprocessing(world=WORLD, cache_dir=cache)


@pytest.fixture(scope="module")
def precipitation(cache: str) -> Precipitation:
    return Precipitation(world=WORLD, cache_dir=cache, crop_size=CROP)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def prepared(task):
    """A fresh pretrained backbone with the task's head installed."""
    model = load_pretrained("tiny")
    head = task.setup(model)
    return model, head


def overfit(task, steps: int = 4) -> list[float]:
    """Losses of a few WeatherPEFT steps (AdamW on the selected entries) on one batch."""
    model, head = prepared(task)
    method = create_method("weatherpeft")
    method.apply(model, head)
    opt = method.optimizer(lr=1e-3)
    batch = next(task.batches("train", 2, seed=0))
    model.train()
    losses = []
    for step in range(steps):
        loss = task.loss(task.predict(model, batch), batch)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        method.after_backward(step, steps)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def check_netcdf(ds: xr.Dataset, path: Path) -> None:
    """The evaluate Dataset survives netCDF (the training loop writes it as fields.nc)."""
    ds.to_netcdf(path)
    with xr.open_dataset(path) as back:
        xr.testing.assert_identical(back.load(), ds)


def check_splits_disjoint(touched: dict[str, np.ndarray]) -> None:
    """Every split non-empty, the blocks in time order, and no time step in two splits."""
    for split in ("train", "val", "test"):
        assert touched[split].size > 0
    assert touched["train"].max() < touched["val"].min()
    assert touched["val"].max() < touched["test"].min()
    for a, b in (("train", "val"), ("val", "test"), ("train", "test")):
        assert not set(touched[a].tolist()) & set(touched[b].tolist())


# ------------------------------------------------------------------------------- shared parts


def test_tasks_are_registered() -> None:
    assert {"downscaling", "postprocessing", "precipitation"} <= set(TASKS)
    task = create_task("downscaling", world=WORLD)
    assert isinstance(task, Downscaling)


def test_split_by_time_drops_samples_that_reach_into_the_previous_block() -> None:
    starts = np.arange(20) - 2  # windows of 3 steps: t - 2 .. t
    splits = split_by_time(starts, starts + 2, (0.5, 0.25, 0.25))
    assert splits["train"].tolist() == list(range(10))
    assert splits["val"].tolist() == [12, 13, 14]  # 10 and 11 would share steps with train
    assert splits["test"].tolist() == [17, 18, 19]
    with pytest.raises(DataError, match="val split is empty"):
        split_by_time(starts, starts + 8, (0.5, 0.25, 0.25))


def test_time_step_refuses_a_gap_naming_it() -> None:
    times = np.datetime64("2020-01-01T00", "ns") + SIX_H * np.array([0, 1, 2, 7, 8])
    assert time_step(times[:3]) == SIX_H
    with pytest.raises(DataError, match=r"2020-01-01T12:00:00 -> 2020-01-02T18:00:00 \(30 h\)"):
        time_step(times)
    with pytest.raises(DataError, match="decreases"):
        time_step(times[::-1])


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (Downscaling, {"split_fractions": (0.5, 0.5, 0.5)}, "split_fractions"),
        (Downscaling, {"source": "era5-uk"}, "data="),
        (Downscaling, {"source": "data"}, "data="),
        (Downscaling, {"source": "nowhere"}, "nowhere"),
        (Downscaling, {"coarse_factor": 4}, "world.coarse_factor"),
        (Downscaling, {"data": "store.zarr"}, "coarse_path= .* or coarse_factor="),
        (Downscaling, {"data": "s.zarr", "coarse_factor": 4, "coarse_path": "c.zarr"}, "exactly one"),
        (Downscaling, {"data": "store.zarr", "coarse_factor": 1}, "coarse_factor=1"),
        (Downscaling, {"era5_crop": (30, 40)}, "era5_crop"),
        (Downscaling, {"surface_weight": -1.0}, "surface_weight"),
        (Downscaling, {"bogus": 1}, "bogus"),
        (Postprocessing, {"sigma_floor": 0.0}, "sigma_floor"),
        (Postprocessing, {"source": "era5-uk"}, "era5-uk"),
        (Precipitation, {"crop_size": (0, 16)}, "crop_size"),
        (Precipitation, {"leads_hours": (24, 12)}, "leads_hours"),
        (Precipitation, {"input_gap_hours": 7}, "input_gap_hours"),
    ],
)
def test_bad_configs_name_the_value(cls, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        cls(**kwargs)


def test_setup_twice_on_one_backbone_is_refused(postprocessing: Postprocessing) -> None:
    model, _ = prepared(postprocessing)
    with pytest.raises(ConfigError, match="already has"):
        postprocessing.setup(model)


# ------------------------------------------------------------------------------- downscaling


def test_downscaling_batches(downscaling: Downscaling, cache: str) -> None:
    batch = next(downscaling.batches("val", 3))
    x = batch.inputs
    assert x.surf_vars["2t"].shape == (3, 2, 16, 32)
    assert x.atmos_vars["z"].shape == (3, 2, 3, 16, 32)
    assert set(x.static_vars) == {"lsm", "z", "slt"}
    assert batch.targets["2m_temperature"].shape == (3, 16, 32)
    assert batch.targets["geopotential"].shape == (3, 3, 16, 32)
    # physical units: kelvin and m2 s-2 (z500 ~ 5.5e4)
    assert 200 < float(batch.targets["2m_temperature"].mean()) < 330
    assert 4e4 < float(batch.targets["geopotential"][:, 1].mean()) < 7e4

    fine = open_world(WORLD, cache_dir=Path(cache), progress=False)
    coarse = open_world(WORLD, resolution="coarse", cache_dir=Path(cache), progress=False)
    up = upsample_bilinear(coarse, fine)
    t1 = batch.times[0]  # t + 6 h, the target time
    assert float(x.surf_vars["2t"][0, 1, 5, 7]) == pytest.approx(
        float(up["2m_temperature"].sel(time=t1).values[5, 7]), rel=1e-6
    )
    assert float(x.atmos_vars["t"][0, 0, 0, 9, 3]) == pytest.approx(
        float(up["temperature"].sel(time=t1 - SIX_H, level=850).values[9, 3]), rel=1e-6
    )
    assert float(batch.targets["2m_temperature"][0, 5, 7]) == pytest.approx(
        float(fine["2m_temperature"].sel(time=t1).values[5, 7]), rel=1e-6
    )


def test_downscaling_splits_do_not_overlap(downscaling: Downscaling) -> None:
    touched = {}
    for split in ("train", "val", "test"):
        times = np.concatenate([b.times for b in downscaling.batches(split, 16)])
        assert times.size == downscaling.num_samples(split)
        touched[split] = np.concatenate([times - SIX_H, times]).astype("datetime64[h]").astype(int)
    check_splits_disjoint(touched)


def test_downscaling_setup_adds_nothing(downscaling: Downscaling) -> None:
    model = load_pretrained("tiny")
    before = n_params(model)
    head = downscaling.setup(model)
    assert n_params(head) == 0 and n_params(model) == before


def test_downscaling_predict_loss_and_overfit(downscaling: Downscaling) -> None:
    model, _ = prepared(downscaling)
    batch = next(downscaling.batches("train", 2, seed=0))
    with torch.no_grad():
        pred = downscaling.predict(model, batch)
    assert set(pred) == set(batch.targets)
    for name, y in batch.targets.items():
        assert pred[name].shape == y.shape
    losses = overfit(downscaling)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


def test_downscaling_evaluate(downscaling: Downscaling, tmp_path: Path) -> None:
    model, _ = prepared(downscaling)
    ds, scores = downscaling.evaluate(model, "test", batch_size=8)
    check_netcdf(ds, tmp_path / "fields.nc")
    assert ds.sizes["time"] == downscaling.num_samples("test")
    assert ds["2m_temperature"].dims == ("time", "latitude", "longitude")
    assert ds["temperature_target"].dims == ("time", "level", "latitude", "longitude")
    assert ds["level"].values.tolist() == [850, 500, 250]
    assert ds.sizes["latitude"] == 16 and ds.sizes["longitude"] == 32
    for name in Downscaling.headline:
        assert math.isfinite(scores[f"rmse/{name}"]) and scores[f"rmse/{name}"] >= 0
        assert f"rmse_bilinear/{name}" in scores
    # the untrained residual backbone starts near the bilinear baseline
    assert scores["rmse/2m_temperature"] < 3 * scores["rmse_bilinear/2m_temperature"]


# ------------------------------------------------------------------------------- post-processing


def test_postprocessing_batches(postprocessing: Postprocessing, cache: str) -> None:
    assert [postprocessing.num_samples(s) for s in ("train", "val", "test")] == [8, 2, 2]
    batch = next(postprocessing.batches("val", 2))
    x = batch.inputs
    assert x.surf_vars["2t"].shape == (2, 2, 16, 32)
    assert x.surf_vars["2t_logscale"].shape == (2, 2, 16, 32)
    assert x.atmos_vars["t_logscale"].shape == (2, 2, 3, 16, 32)
    assert batch.targets["temperature"].shape == (2, 3, 16, 32)
    mean, spread = batch.extra["2m_temperature_ens_mean"], batch.extra["2m_temperature_ens_spread"]
    torch.testing.assert_close(x.surf_vars["2t"][:, 1], mean)
    torch.testing.assert_close(x.surf_vars["2t"][:, 0], mean - spread)
    assert bool((spread > 0).all())

    ens = open_world_ensemble(WORLD, cache_dir=Path(cache), progress=False)
    truth = open_world(WORLD, cache_dir=Path(cache), progress=False)
    t = batch.times[1]
    members = ens["2m_temperature"].sel(time=t).values[:, 4, 6]
    assert float(mean[1, 4, 6]) == pytest.approx(float(members.mean()), rel=1e-6)
    assert float(spread[1, 4, 6]) == pytest.approx(float(members.std(ddof=1)), rel=1e-4, abs=1e-4)
    assert float(batch.targets["2m_temperature"][1, 4, 6]) == pytest.approx(
        float(truth["2m_temperature"].sel(time=t).values[4, 6])
    )


def test_postprocessing_splits_do_not_overlap(postprocessing: Postprocessing) -> None:
    data = postprocessing.data
    touched = {}
    for split, pos in data.splits.items():
        hours = [
            np.arange(i, v + SIX_H, SIX_H).astype("datetime64[h]").astype(int)
            for i, v in zip(data.init_times[pos], data.truth.times[pos], strict=True)
        ]
        touched[split] = np.concatenate(hours)
    check_splits_disjoint(touched)


def test_postprocessing_setup_adds_logscale_heads(postprocessing: Postprocessing) -> None:
    model = load_pretrained("tiny")
    before = n_params(model)
    head = postprocessing.setup(model)
    expected = 9 * (KERNEL + HEAD)  # 4 surface + 5 atmospheric pseudo-variables
    assert n_params(head) == expected
    assert n_params(model) == before + expected
    assert set(head.surf_embeds) == {"2t_logscale", "10u_logscale", "10v_logscale", "msl_logscale"}
    assert set(head.atmos_heads) == {f"{v}_logscale" for v in ("z", "u", "v", "t", "q")}
    model_params = {id(p) for p in model.parameters()}
    assert all(id(p) in model_params for p in head.parameters())
    method = create_method("weatherpeft")
    method.apply(model, head)
    assert all(p.requires_grad for p in head.parameters())
    assert method.trainable()["head"] == expected


def test_postprocessing_predict_starts_from_the_raw_ensemble(
    postprocessing: Postprocessing,
) -> None:
    model, _ = prepared(postprocessing)
    batch = next(postprocessing.batches("train", 2, seed=1))
    with torch.no_grad():
        pred = postprocessing.predict(model, batch)
    names = set(batch.targets)
    assert set(pred) == names | {f"{n}_sigma" for n in names}
    for name, y in batch.targets.items():
        assert pred[name].shape == y.shape == pred[f"{name}_sigma"].shape
        # zero-initialised log-scale heads: sigma is exactly the (floored) ensemble spread
        torch.testing.assert_close(pred[f"{name}_sigma"], batch.extra[f"{name}_ens_spread"])


def test_gaussian_crps_closed_form() -> None:
    value = gaussian_crps(torch.tensor(0.0), torch.tensor(1.0), torch.tensor(0.0))
    assert float(value) == pytest.approx((math.sqrt(2) - 1) / math.sqrt(math.pi))
    # scale equivariance: CRPS(a mu, a sigma, a y) = a CRPS(mu, sigma, y)
    mu, sigma, y = torch.tensor(1.5), torch.tensor(0.7), torch.tensor(-0.2)
    assert float(gaussian_crps(3 * mu, 3 * sigma, 3 * y)) == pytest.approx(
        3 * float(gaussian_crps(mu, sigma, y)), rel=1e-6
    )


def test_postprocessing_crps_loss_equals_hand_value(postprocessing: Postprocessing) -> None:
    """mu = y + a std_k, sigma = b std_k in every channel: the normalised CRPS is the same
    everywhere, b [z (2 Phi(z) - 1) + 2 phi(z) - 1/sqrt(pi)] with z = a / b."""
    postprocessing.setup(load_pretrained("tiny"))
    std = postprocessing._std
    assert std is not None
    batch = next(postprocessing.batches("train", 2, seed=0))
    levels = batch.inputs.metadata.atmos_levels
    a, b = 0.8, 0.5
    pred = {}
    for name, y in batch.targets.items():
        aurora = VARIABLES[name].aurora
        if y.dim() == 3:
            s = torch.tensor(std[aurora])
        else:
            s = torch.tensor([std[f"{aurora}_{lv}"] for lv in levels]).view(-1, 1, 1)
        pred[name] = y + a * s
        pred[f"{name}_sigma"] = (b * s).expand_as(y)
    z = a / b
    cdf = 0.5 * (1 + math.erf(z / math.sqrt(2)))
    pdf = math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    expected = b * (z * (2 * cdf - 1) + 2 * pdf - 1 / math.sqrt(math.pi))
    loss = postprocessing.loss(pred, batch)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_postprocessing_overfit_and_evaluate(
    postprocessing: Postprocessing, tmp_path: Path
) -> None:
    losses = overfit(postprocessing)
    assert losses[-1] < losses[0]
    model, _ = prepared(postprocessing)
    ds, scores = postprocessing.evaluate(model, "test", batch_size=4)
    check_netcdf(ds, tmp_path / "fields.nc")
    assert ds.sizes["time"] == 2 and "init_time" in ds.coords
    for suffix in ("", "_sigma", "_target", "_ens_mean", "_ens_spread"):
        assert ds[f"temperature{suffix}"].dims == ("time", "level", "latitude", "longitude")
        assert ds[f"2m_temperature{suffix}"].dims == ("time", "latitude", "longitude")
    assert bool((ds["2m_temperature_sigma"] > 0).all())
    for name in Postprocessing.headline:
        for prefix in ("crps", "crps_raw", "rmse", "rmse_raw"):
            assert math.isfinite(scores[f"{prefix}/{name}"])
    # at initialisation sigma = spread, so the CRPS is close to the raw ensemble's
    assert scores["crps/2m_temperature"] == pytest.approx(
        scores["crps_raw/2m_temperature"], rel=0.2
    )


# ------------------------------------------------------------------------------- precipitation


def test_precipitation_batches(precipitation: Precipitation, cache: str) -> None:
    batch = next(precipitation.batches("val", 2))
    x = batch.inputs
    assert x.surf_vars["2t"].shape == (2, 2, *CROP)
    assert set(x.surf_vars) == {"2t", "10u", "10v", "msl", "tp_12h", "tp_24h", "tp_36h"}
    assert x.atmos_vars["q"].shape == (2, 2, 3, *CROP)
    assert x.static_vars["lsm"].shape == CROP
    y = batch.targets[TARGET]
    assert y.shape == (2, 3, *CROP)
    assert bool((y >= 0).all())  # mm of rain

    region = precipitation.data.fields
    world = open_world(WORLD, cache_dir=Path(cache), progress=False)
    tp = world[TARGET].sel(
        latitude=region.lat.numpy(), longitude=region.lon.numpy(), method="nearest"
    )
    t = batch.times[0]
    np.testing.assert_allclose(y[0, 1].numpy(), tp.sel(time=t + 4 * SIX_H).values, rtol=1e-6)
    np.testing.assert_allclose(
        x.surf_vars["tp_24h"][0, 0].numpy(), tp.sel(time=t - 2 * SIX_H).values, rtol=1e-6
    )
    np.testing.assert_allclose(
        x.surf_vars["tp_12h"][0, 1].numpy(), tp.sel(time=t).values, rtol=1e-6
    )


def test_precipitation_splits_do_not_overlap(precipitation: Precipitation) -> None:
    touched = {}
    for split in ("train", "val", "test"):
        times = np.concatenate([b.times for b in precipitation.batches(split, 16)])
        hours = times.astype("datetime64[h]").astype(int)
        touched[split] = np.concatenate([hours + h for h in range(-12, 37, 6)])
    check_splits_disjoint(touched)


def test_precipitation_setup_adds_three_heads(precipitation: Precipitation) -> None:
    model = load_pretrained("tiny")
    before = n_params(model)
    head = precipitation.setup(model)
    assert set(head.surf_embeds) == set(head.surf_heads) == {"tp_12h", "tp_24h", "tp_36h"}
    assert n_params(head) == 3 * (KERNEL + HEAD)
    assert n_params(model) == before + 3 * (KERNEL + HEAD)
    assert model.norm_std["tp_24h"] == pytest.approx(precipitation.data.tp_stats[1])
    method = create_method("weatherpeft")
    method.apply(model, head)
    assert method.trainable()["head"] == 3 * (KERNEL + HEAD)


def test_precipitation_crop_must_fit_the_patch(cache: str) -> None:
    task = Precipitation(world=WORLD, cache_dir=cache, crop_size=(10, 16))
    with pytest.raises(DataError, match="patch size"):
        task.setup(load_pretrained("tiny"))


def test_precipitation_predict_overfit(precipitation: Precipitation) -> None:
    model, _ = prepared(precipitation)
    batch = next(precipitation.batches("train", 2, seed=0))
    with torch.no_grad():
        pred = precipitation.predict(model, batch)
    assert set(pred) == {TARGET} and pred[TARGET].shape == (2, 3, *CROP)
    losses = overfit(precipitation)
    assert losses[-1] < losses[0]


def test_precipitation_evaluate_clips_at_zero(precipitation: Precipitation, tmp_path: Path) -> None:
    model, head = prepared(precipitation)
    with torch.no_grad():  # force negative raw predictions at +12 h
        head.surf_heads["tp_12h"].bias.fill_(-50.0)
    batch = next(precipitation.batches("test", 2))
    with torch.no_grad():
        raw = precipitation.predict(model, batch)[TARGET]
    assert bool((raw[:, 0] < 0).any())
    ds, scores = precipitation.evaluate(model, "test", batch_size=4)
    check_netcdf(ds, tmp_path / "fields.nc")
    assert ds[TARGET].dims == ("time", "prediction_timedelta", "latitude", "longitude")
    assert ds[f"{TARGET}_target"].shape == ds[TARGET].shape
    assert ds.sizes["time"] == precipitation.num_samples("test")
    assert (ds["prediction_timedelta"].values / np.timedelta64(1, "h")).tolist() == [12, 24, 36]
    assert ds["valid_time"].dims == ("time", "prediction_timedelta")
    assert float(ds[TARGET].min()) >= 0.0
    assert float(abs(ds[TARGET].isel(prediction_timedelta=0)).max()) == 0.0
    for name in Precipitation.headline:
        assert math.isfinite(scores[f"rmse/{name}"])
        assert math.isfinite(scores[f"rmse_persistence/{name}"])
        # ACC is a correlation; SEEPS is >= 0 (NaN only if every point is masked)
        assert -1.0 <= scores[f"acc_persistence/{name}"] <= 1.0
        assert math.isnan(scores[f"seeps/{name}"]) or scores[f"seeps/{name}"] >= 0.0


# ------------------------------------------------------------------------------- ERA5 (real data)


def _era5_sample() -> Path:
    env = os.environ.get("WPEFT_ERA5_SAMPLE")
    folder = Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/era5-sample"
    path = folder / "era5-2mt-2019-03-uk.grib"
    if not path.is_file():
        pytest.skip(f"ERA5 sample {path} is absent (set WPEFT_ERA5_SAMPLE to its folder)")
    return path


def test_downscaling_era5_uk_runs_one_forward_pass() -> None:
    # the UK sample spans 10W-2E; a region cannot cross 0 deg, so take 350-359.75 E (32 x 40)
    uk = {"path": str(_era5_sample()), "region": [50.25, 58.0, 350.0, 359.75]}
    task = Downscaling(data=uk, coarse_factor=4)
    with pytest.raises(DataError, match=r"lacks \['10m_u_component_of_wind'.*fill_missing"):
        task.setup(load_pretrained("tiny"))  # only 2 m temperature: the other inputs are refused
    task = Downscaling(data={**uk, "fill_missing": True}, coarse_factor=4)
    with pytest.raises(ConfigError, match="setup"):
        next(task.batches("train", 2))
    model, head = prepared(task)
    assert n_params(head) == 0
    assert all(task.num_samples(s) > 50 for s in ("train", "val", "test"))
    batch = next(task.batches("train", 2, seed=0))
    x = batch.inputs
    assert x.surf_vars["2t"].shape == (2, 2, 32, 40)
    assert x.atmos_vars["t"].shape == (2, 2, 3, 32, 40)
    assert set(x.static_vars) == {"lsm", "z", "slt"}
    # absent variables: constant fields at the backbone's normalisation mean
    assert x.surf_vars["msl"].unique().numel() == 1
    assert float(x.surf_vars["msl"][0, 0, 0, 0]) == pytest.approx(model.norm_mean["msl"])
    assert float(x.atmos_vars["z"][0, 0, 1, 0, 0]) == pytest.approx(model.norm_mean["z_500"])
    assert x.metadata.lon[0] == 350.0 and float(x.metadata.lat[0]) == 58.0
    y = batch.targets["2m_temperature"]
    assert y.shape == (2, 32, 40) and 250 < float(y.mean()) < 300  # kelvin, UK in March
    with torch.no_grad():
        pred = task.predict(model, batch)
        loss = task.loss(pred, batch)
    assert set(pred) == {"2m_temperature"} and pred["2m_temperature"].shape == (2, 32, 40)
    assert torch.isfinite(pred["2m_temperature"]).all() and torch.isfinite(loss)
    # the bilinear input is a good first guess of the 0.25 degree field (RMSE well under 3 K)
    bilinear = x.surf_vars["2t"][:, 1]
    assert float((bilinear - y).pow(2).mean().sqrt()) < 3.0
    assert isinstance(batch, TaskBatch) and isinstance(task.describe()["task_config"], dict)
    data = task.describe()["data"]
    assert data["variables"] == ["2m_temperature"] and data["grid"] == [32, 40]
    assert "mean_sea_level_pressure" in data["filled"] and "land_sea_mask" in data["filled"]


def test_evaluate_returns_dataset(downscaling: Downscaling) -> None:
    """The evaluate output is a plain xarray Dataset with schema coordinates."""
    model, _ = prepared(downscaling)
    ds, _ = downscaling.evaluate(model, "val", batch_size=16)
    assert isinstance(ds, xr.Dataset)
    assert np.all(np.diff(ds["latitude"].values) < 0)
    assert np.all(np.diff(ds["longitude"].values) > 0)
    assert ds["2m_temperature"].attrs["units"] == "K"


def test_a_released_style_backbone_takes_new_variables_and_keeps_aurora_tables_for_the_rest() -> None:
    """A backbone without its own statistics (as built for a released Aurora checkpoint) gets a
    task's new variable registered; every other key still uses Aurora's ERA5 tables."""
    from aurora import normalisation as aurora_norm

    from wpeft.backbones.aurora_adapter import build_backbone
    from wpeft.tasks.common import backbone_stats, register_norm

    model = build_backbone("tiny")
    assert not model.own_stats and model.norm_mean == {}
    before = backbone_stats(model, "t", 850)
    assert before == (float(aurora_norm.locations["t_850"]), float(aurora_norm.scales["t_850"]))
    register_norm(model, "tp_12h", 0.5, 2.0)
    assert backbone_stats(model, "tp_12h") == (0.5, 2.0)
    assert backbone_stats(model, "t", 850) == before  # unchanged by the registration
    c = model.config
    batch = random_batch(c.surf_vars, c.static_vars, c.atmos_vars, batch_size=1, grid=(8, 16), levels=(850,))
    tp = torch.full((1, 2, 8, 16), 4.5)
    batch = dataclasses.replace(batch, surf_vars=batch.surf_vars | {"tp_12h": tp})
    mapped = model._remap(batch, forward=True)
    torch.testing.assert_close(mapped.surf_vars["tp_12h"], (tp - 0.5) / 2.0)
    torch.testing.assert_close(mapped.surf_vars["2t"], batch.surf_vars["2t"])
