"""Ensemble post-processing on real stores: the embedded world's ensemble written in the WB2
IFS-ENS and ENS-10 layouts (12 forecasts, 10 members, +48 h, 32 x 64), its truth as a WB2 zarr.

End to end through ``train`` on both layouts, the inputs against the ensemble mean and spread
computed by hand, the train-split statistics, and one clear refusal per kind of bad input.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from wpeft.backbones.pretrain import load_pretrained
from wpeft.data.batch import LazyVariable
from wpeft.data.era5 import write_wb2_zarr
from wpeft.data.layouts import write_layout
from wpeft.data.stats import compute_stats
from wpeft.data.world import open_world, open_world_ensemble
from wpeft.errors import ConfigError, DataError
from wpeft.tasks.postprocessing import Postprocessing
from wpeft.training.loop import TrainConfig, train

STATIC = ["land_sea_mask", "geopotential_at_surface", "soil_type"]
TARGETS = ["2m_temperature", "temperature", "geopotential"]  # the default targets
N_FORECASTS = 12
#: A 12 x 32 box of the 32 x 64 grid (3 x 8 patches of the tiny backbone): a short run.
REGION = (-36.0, 36.0, 0.0, 174.375)


@pytest.fixture(scope="module")
def ens() -> xr.Dataset:
    """The world's first 12 ensemble forecasts (time = valid time, init_time along it)."""
    return open_world_ensemble(progress=False).isel(time=slice(0, N_FORECASTS)).load()


@pytest.fixture(scope="module")
def truth(ens: xr.Dataset) -> xr.Dataset:
    """The world's truth from the first init to the last valid time, with the statics."""
    world = open_world(progress=False)
    return world.sel(time=slice(ens["init_time"].values[0], ens["time"].values[-1])).load()


@pytest.fixture(scope="module")
def stores(ens: xr.Dataset, truth: xr.Dataset, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("real-pp")
    paths = {
        "ifs-ens": write_layout(ens, "ifs-ens", root / "ifs_ens.zarr"),
        "ens10": write_layout(ens, "ens10", root / "ens10"),
        "truth": write_wb2_zarr(truth, root / "era5.zarr"),
        # the truth of the targets only (as ENS-10's ERA5 files): other inputs' clim std then
        # comes from the ensemble mean
        "truth-targets": write_wb2_zarr(truth[TARGETS], root / "era5_targets.zarr"),
    }
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def backbone() -> torch.nn.Module:
    """One tiny backbone for the refusals: they happen while the data is read, before setup
    installs anything."""
    return load_pretrained("tiny")


def refused(backbone, **options) -> None:
    Postprocessing(**options).setup(backbone)


def source(stores: dict, layout: str = "ifs-ens", **fields) -> dict:
    """A data description of a layout's store, statics from the truth store."""
    return {"path": stores[layout], "statics": stores["truth"], **fields}


def ready(**options) -> tuple[Postprocessing, torch.nn.Module]:
    """The task set up on a fresh tiny backbone (this reads the store)."""
    task = Postprocessing(**options)
    model = load_pretrained("tiny")
    task.setup(model)
    return task, model


@pytest.fixture(scope="module")
def task(stores: dict) -> Postprocessing:
    return ready(data=source(stores), truth_path=stores["truth"])[0]


# ------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("layout", ["ifs-ens", "ens10"])
def test_train_on_a_real_ensemble_store(layout: str, stores: dict, tmp_path: Path) -> None:
    data = source(stores, layout, region=REGION)
    if layout == "ens10":  # the paper's recipe: targets at 500 and 850 hPa, periods by init
        data |= {
            "variables": ["2m_temperature", "temperature", "geopotential"],
            "levels": [500, 850],
            "train": ["2000-01-01", "2000-02-02"],
            "val": ["2000-02-03", "2000-02-14"],
            "test": ["2000-02-15", "2000-02-25"],
        }
    cfg = TrainConfig(
        task="postprocessing",
        method="weatherpeft",
        steps=2,
        batch_size=2,
        warmup_steps=1,
        checkpoint_every=0,
        device="cpu",
        task_options={"data": data, "truth_path": stores["truth"], "lead_hours": 48},
    )
    summary = train(cfg, tmp_path / "run", progress=False)
    for name in ("2m_temperature", "temperature_850", "geopotential_500"):
        for prefix in ("crps", "crps_raw", "rmse", "rmse_raw"):
            assert math.isfinite(summary["scores"][f"{prefix}/{name}"])
    assert not any("specific_humidity" in k or "wind" in k for k in summary["scores"])
    info = summary["data"]
    assert info["data_path"] == stores[layout] and info["truth_path"] == stores["truth"]
    assert info["lead_hours"] == 48 and info["members"] == 10 and info["filled"] == []
    if layout == "ens10":
        assert info["levels"] == [500, 850]
        # a forecast belongs to a period when init and valid time (init + 48 h) lie inside it
        assert summary["samples"] == {"train": 7, "val": 2, "test": 2}
    else:  # the store's levels the backbone knows (all three), fractions 2/3, 1/6, 1/6
        assert sorted(info["levels"]) == [250, 500, 850]
        assert summary["samples"] == {"train": 8, "val": 2, "test": 2}
    fields = xr.open_dataset(tmp_path / "run" / "fields.nc")
    assert fields.sizes["time"] == 2 and "init_time" in fields.coords
    assert (fields.sizes["latitude"], fields.sizes["longitude"]) == (12, 32)
    np.testing.assert_array_equal(
        fields["time"].values - fields["init_time"].values, np.timedelta64(48, "h")
    )


def test_inputs_are_the_ensemble_mean_and_spread(task: Postprocessing, ens, truth) -> None:
    data = task.data
    assert isinstance(data.mean.surf["2t"], LazyVariable)  # read per batch, not at load
    assert isinstance(data.truth.atmos["t"], LazyVariable)
    batch = next(task.batches("val", 2))
    levels = list(batch.inputs.metadata.atmos_levels)
    for b, valid in enumerate(batch.times):
        members = ens.sel(time=valid)
        assert members["init_time"].values == valid - np.timedelta64(48, "h")
        for wb2, short in (("2m_temperature", "2t"), ("temperature", "t")):
            x = members[wb2]
            if "level" in x.dims:
                x = x.sel(level=levels)
            mean = x.mean("member").values
            spread = x.std("member", ddof=1).values
            np.testing.assert_allclose(batch.extra[f"{wb2}_ens_mean"][b], mean, rtol=1e-5)
            np.testing.assert_allclose(
                batch.extra[f"{wb2}_ens_spread"][b], spread, rtol=1e-4, atol=1e-4
            )
            inputs = batch.inputs.atmos_vars if x.ndim == 4 else batch.inputs.surf_vars
            np.testing.assert_allclose(inputs[short][b, 1], mean, rtol=1e-5)
            y = truth[wb2].sel(time=valid)
            y = y.sel(level=levels) if "level" in y.dims else y
            np.testing.assert_allclose(batch.targets[wb2][b], y.values, rtol=1e-6)
    # every input the backbone embeds, with its log-spread companion; statics from data.statics
    assert set(batch.inputs.surf_vars) == {"2t", "10u", "10v", "msl"} | {
        f"{v}_logscale" for v in ("2t", "10u", "10v", "msl")
    }
    np.testing.assert_allclose(
        batch.inputs.static_vars["lsm"], truth["land_sea_mask"].values, rtol=1e-6
    )


def test_statistics_come_from_the_train_split(task: Postprocessing, truth) -> None:
    data = task.data
    valid = data.truth.times[data.splits["train"]]
    expected = compute_stats(truth[["2m_temperature", "temperature"]].sel(time=valid)).std
    for key in ("2t", "t_850", "t_250"):
        assert data.clim_std[key] == pytest.approx(expected[key], rel=1e-6)
    described = task.describe()["data"]
    assert described["clim_std"]["2t"] == data.clim_std["2t"]
    assert set(described["logscale"]) >= {"2t_logscale", "t_logscale_850", "q_logscale_500"}
    assert described["forecasts"] == N_FORECASTS


# ------------------------------------------------------------------------------- bad input


def test_a_store_without_members_is_refused(stores: dict, backbone) -> None:
    with pytest.raises(DataError, match=r"needs a member dimension \(number / member\)"):
        refused(backbone, data={"path": stores["truth"]}, truth_path=stores["truth"])


def test_a_single_member_is_refused(ens, stores: dict, backbone, tmp_path: Path) -> None:
    path = write_layout(ens[TARGETS].isel(member=[0]), "ifs-ens", tmp_path / "one.zarr")
    with pytest.raises(DataError, match="1 ensemble member; a spread needs at least 2"):
        refused(
            backbone, data={"path": str(path), "fill_missing": True}, truth_path=stores["truth"]
        )


def test_a_lead_the_store_lacks_is_refused_naming_its_leads(stores: dict, backbone) -> None:
    with pytest.raises(DataError, match=r"lead_hours=24 is not a lead .* leads \(hours\): 48"):
        refused(backbone, data=source(stores), truth_path=stores["truth"], lead_hours=24)


def test_truth_missing_valid_times_is_refused_naming_them(
    truth, stores, backbone, tmp_path
) -> None:
    short = truth[TARGETS].sel(time=slice(None, "2000-02-20"))
    path = write_wb2_zarr(short, tmp_path / "short.zarr")
    with pytest.raises(DataError, match=r"lacks 2 of the 12 valid times .* first 2000-02-22T12"):
        refused(backbone, data=source(stores), truth_path=str(path))


def test_truth_on_another_grid_is_refused_naming_both(truth, stores, backbone, tmp_path) -> None:
    half = write_wb2_zarr(truth[TARGETS].isel(longitude=slice(0, 32)), tmp_path / "half.zarr")
    with pytest.raises(DataError, match=r"grid 32 x 32 .* ensemble .* 32 x 64") as info:
        refused(backbone, data=source(stores), truth_path=str(half))
    assert "must match exactly" in str(info.value)


def test_nan_in_the_truth_is_refused_naming_the_variable(truth, stores, backbone, tmp_path) -> None:
    bad = truth[TARGETS].copy(deep=True)
    bad["temperature"][-1, 0, 3, 3] = np.nan  # the last forecast's valid time
    path = write_wb2_zarr(bad, tmp_path / "nan.zarr")
    with pytest.raises(DataError, match=r"Non-finite values .* 'temperature': 1 of"):
        refused(backbone, data=source(stores), truth_path=str(path))


def test_missing_inputs_are_refused_unless_filled(stores: dict, backbone) -> None:
    data = {"path": stores["ens10"], "region": REGION}  # ENS-10 has no static fields
    truth = stores["truth-targets"]
    with pytest.raises(DataError, match=r"lacks \['land_sea_mask'.*data.fill_missing"):
        refused(backbone, data=data, truth_path=truth)
    task, model = ready(data=data | {"fill_missing": True}, truth_path=truth)
    described = task.describe()["data"]
    assert set(described["filled"]) == set(STATIC)
    # the truth holds the targets only: the other inputs' unit is the ensemble mean's std
    assert set(described["clim_std_from_ensemble_mean"]) == {
        "10m_u_component_of_wind",
        "10m_v_component_of_wind",
        "mean_sea_level_pressure",
        "u_component_of_wind",
        "v_component_of_wind",
        "specific_humidity",
    }
    assert "q_850" in described["clim_std"] and "q_logscale_850" in described["logscale"]
    batch = next(task.batches("train", 2))
    lsm = batch.inputs.static_vars["lsm"]
    assert float(lsm.std()) == 0.0 and float(lsm[0, 0]) == pytest.approx(model.norm_mean["lsm"])
    with torch.no_grad():
        loss = task.loss(task.predict(model, batch), batch)
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"truth_path": "era5.zarr"}, "give data="),
        ({"data": {"path": "ens.zarr"}}, "needs the truth at its valid times"),
        ({"data": {"path": "e.zarr", "variables": ["land_sea_mask"]}, "truth_path": "t"}, "static"),
        ({"lead_hours": 24}, "world.ensemble_lead_hours=48"),
        ({"data": {"path": "e.zarr"}, "truth_path": "t", "lead_hours": 0}, "positive integer"),
    ],
)
def test_bad_settings_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Postprocessing(**options)


def test_a_real_store_is_read_at_setup(stores: dict) -> None:
    task = Postprocessing(data=source(stores), truth_path=stores["truth"])
    with pytest.raises(ConfigError, match="setup"):
        task.num_samples("train")


def test_restored_statistics_are_used_instead_of_a_new_pass(stores: dict, monkeypatch) -> None:
    """A resumed run hands the task the statistics its start computed: no pass over the
    training split (compute_stats / the log-spread pass) happens again, and they are the same."""
    import wpeft.tasks.postprocessing as pp

    options = {"data": source(stores), "truth_path": stores["truth"]}
    first, _ = ready(**options)
    saved = json.loads(json.dumps(first.statistics()))  # as written to and read from the file
    assert set(saved) == {"train"} and saved["train"]["clim_std"]

    def refuse(*args, **kwargs):
        raise AssertionError("the training split was read again")

    monkeypatch.setattr(pp, "compute_stats", refuse)
    monkeypatch.setattr(pp, "_logscale_stats", refuse)
    task = Postprocessing(**options)
    task.restore_statistics(saved)
    task.setup(load_pretrained("tiny"))
    assert task.data.clim_std == pytest.approx(first.data.clim_std)
    assert task.data.logscale.keys() == first.data.logscale.keys()
    for key, value in first.data.logscale.items():
        assert task.data.logscale[key] == pytest.approx(value), key
