"""Tests of the embedded world (wpeft.data.world) and the regridding helpers (wpeft.data.regrid).

A small world (16 x 32, a few days) keeps every test at a second or less; one generation is
shared per session through a cache directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

import wpeft.data.world as world
from wpeft.data.regrid import cell_area_weights, coarsen_conservative, upsample_bilinear
from wpeft.data.schema import VARIABLES, validate_dataset
from wpeft.data.world import WorldConfig, WorldModel, open_world, open_world_ensemble
from wpeft.errors import ConfigError, DataError

SMALL = dict(
    nlat=16,
    nlon=32,
    days=5.0,
    spinup_days=5.0,
    ensemble_inits=4,
    ensemble_members=5,
    ensemble_lead_hours=24,
)
# Every schema variable but the hourly precipitation of hourly stores (the world is 6-hourly).
ALL_VARS = tuple(n for n in VARIABLES if n != "total_precipitation")


def small(**kw: object) -> WorldConfig:
    return WorldConfig(**(SMALL | kw))  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("world-cache")


@pytest.fixture(scope="session")
def truth(cache: Path) -> xr.Dataset:
    return open_world(small(), cache_dir=cache, progress=False).load()


@pytest.fixture(scope="session")
def ensemble(cache: Path) -> xr.Dataset:
    return open_world_ensemble(small(), cache_dir=cache, progress=False).load()


def area_mean(da: xr.DataArray) -> xr.DataArray:
    w = xr.DataArray(cell_area_weights(da["latitude"].values), dims="latitude")
    return (da * w).mean(("latitude", "longitude"))


# ------------------------------------------------------------------------------- config


def test_config_hash_is_stable_and_sensitive() -> None:
    a, b = small(), small()
    assert a.hash() == b.hash() and len(a.hash()) == 16
    assert small(seed=1).hash() != a.hash()
    assert small(relax_days=4.0).hash() != a.hash()
    assert WorldConfig.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    assert WorldConfig(levels=[850, 500]).levels == (850, 500)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        (dict(nlat=18, nlon=36), "coarse_factor"),
        (dict(nlat=16, nlon=16), "nlon"),
        (dict(days=0.0), "days"),
        (dict(days=-3.0), "days"),
        (dict(days=1.1), "days"),
        (dict(ensemble_lead_hours=5), "ensemble_lead_hours"),
        (dict(ensemble_inits=500), "ensemble_inits"),
        (dict(days=1.0), "too short"),
        (dict(levels=()), "levels"),
        (dict(land_fraction=1.5), "land_fraction"),
        (dict(dt_seconds=1000.0), "dt_seconds"),
        (dict(relax_days=0.0), "relax_days"),
    ],
)
def test_bad_config_raises(kw: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        small(**kw)


def test_bad_resolution_and_unknown_fields() -> None:
    with pytest.raises(ConfigError, match="resolution"):
        open_world(small(), resolution="medium", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="bogus"):
        WorldConfig.from_dict({"bogus": 1})


# ------------------------------------------------------------------------------- dataset


def test_schema_coords_and_attrs(truth: xr.Dataset) -> None:
    validate_dataset(truth, require=ALL_VARS)
    assert set(truth.data_vars) == set(ALL_VARS)
    np.testing.assert_allclose(truth.latitude.values, 90 - (np.arange(16) + 0.5) * 180 / 16)
    assert truth.latitude.values[0] == 84.375 and np.all(np.diff(truth.latitude.values) < 0)
    np.testing.assert_allclose(truth.longitude.values, np.arange(32) * 11.25)
    assert truth.level.values.tolist() == [850, 500, 250]
    assert np.issubdtype(truth.level.dtype, np.integer)
    assert truth.time.dtype == np.dtype("datetime64[ns]")
    assert truth.time.values[0] == np.datetime64("2000-01-01T00:00")
    assert np.all(np.diff(truth.time.values) == np.timedelta64(6, "h"))
    assert truth.sizes["time"] == 20
    for name in ALL_VARS:
        assert truth[name].dtype == np.float32
        assert truth[name].attrs["units"] == VARIABLES[name].units
        assert truth[name].attrs["long_name"] == VARIABLES[name].long_name
    assert truth.attrs["synthetic"] == 1
    assert "not Earth" in truth.attrs["title"]
    assert json.loads(truth.attrs["wpeft_world_config"])["nlat"] == 16
    assert truth.attrs["config_hash"] == small().hash()


def test_fields_are_finite_and_physical(truth: xr.Dataset) -> None:
    for name in ALL_VARS:
        assert np.isfinite(truth[name].values).all(), name
    t2m = truth["2m_temperature"]
    assert 200 < float(t2m.min()) and float(t2m.max()) < 330
    # equator-pole gradient
    tropics = float(t2m.sel(latitude=slice(20, -20)).mean())
    assert tropics > float(t2m.sel(latitude=slice(90, 60)).mean()) + 20
    msl = truth["mean_sea_level_pressure"]
    assert 9.0e4 < float(msl.min()) and float(msl.max()) < 1.1e5
    z = truth["geopotential"].mean(("time", "latitude", "longitude")).values
    assert np.all(np.diff(z) > 0)  # 850 < 500 < 250 hPa
    np.testing.assert_allclose(z, [1.45e4, 5.5e4, 1.02e5], rtol=0.08)
    assert float(truth["specific_humidity"].min()) >= 0
    lsm = truth["land_sea_mask"].values
    assert set(np.unique(lsm)) <= {0.0, 1.0}
    assert 0.2 < float(area_mean(truth["land_sea_mask"])) < 0.4
    soil = truth["soil_type"].values
    assert np.all(soil[lsm == 0] == 0) and np.all(soil[lsm == 1] >= 1) and soil.max() <= 7
    assert float(truth["geopotential_at_surface"].where(truth["land_sea_mask"] == 0).max()) == 0


def test_precipitation_is_sparse_and_non_negative(truth: xr.Dataset) -> None:
    tp = truth["total_precipitation_6hr"].values
    assert tp.min() >= 0
    dry = (tp == 0).mean()
    assert 0.3 < dry < 0.95, dry
    assert (tp > 1.0).sum() > 10 and tp.max() > 5.0  # some real rain


# ------------------------------------------------------------------------------- physics


def run_model(config: WorldConfig, steps: int) -> tuple[WorldModel, world.WorldState, list]:
    model = WorldModel(config)
    st = model.initial_state()
    record = [(model.mass(st).item(), model.total_water(st).item())]
    with world._Threads(1), torch.inference_mode():  # tiny tensors: threads only add overhead
        for _ in range(steps):
            model.step(st)
            record.append((model.mass(st).item(), model.total_water(st).item()))
    return model, st, record


@pytest.mark.parametrize("forcing", [False, True])
def test_mass_is_conserved(forcing: bool) -> None:
    """Global-mean fluid depth is conserved to 1e-12 (relative) with and without forcing."""
    model, st, record = run_model(small(forcing=forcing), steps=200)
    mass = np.array([r[0] for r in record])
    assert abs(mass[0] - small().mean_depth_m) < 1e-6
    assert np.max(np.abs(mass - mass[0])) / mass[0] < 1e-12
    assert torch.isfinite(st.spec).all()


def test_moisture_budget_closes() -> None:
    """d(total water) = evaporation - precipitation to rounding (global means, mm)."""
    model, st, record = run_model(small(), steps=200)
    water = np.array([r[1] for r in record])
    evap, precip = st.evap_total.item(), st.precip_total.item()
    assert evap > 0 and precip > 0
    assert abs((water[-1] - water[0]) - (evap - precip)) < 1e-9 * water[0]


def test_output_grid_spectral_evaluation_is_exact() -> None:
    """The off-grid inverse SHT reproduces a band-limited field at the cell centres."""
    model = WorldModel(small())
    lat_g = model.lat_s[:, None]
    lon = torch.arange(32, dtype=torch.float64) * 2 * np.pi / 32
    field = (
        torch.sin(lat_g)
        + torch.cos(lat_g) ** 2 * torch.cos(2 * lon)
        + 0.3 * torch.cos(lat_g) * torch.sin(lon)
    )
    spec = model.solver.sht(field)
    out = model.isht_out(spec).numpy()
    la = np.deg2rad(model.lat_out)[:, None]
    lo = lon.numpy()[None]
    expect = np.sin(la) + np.cos(la) ** 2 * np.cos(2 * lo) + 0.3 * np.cos(la) * np.sin(lo)
    np.testing.assert_allclose(out, expect, atol=1e-10)
    # vector: solid-body rotation u = u0 cos(lat), v = 0
    zeros = torch.zeros(16, 32, dtype=torch.float64)
    uv = torch.stack([20 * torch.cos(lat_g).expand(16, 32), zeros])
    vd = model.solver.vrtdivspec(uv)
    uv_out = model.ivsht_out(model.solver.invlap * vd / world.RADIUS).numpy()
    np.testing.assert_allclose(uv_out[0], 20 * np.cos(la) * np.ones((1, 32)), atol=1e-8)
    np.testing.assert_allclose(uv_out[1], 0, atol=1e-8)


def test_generation_restores_thread_count(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    open_world(small(days=2.0, ensemble_inits=1), cache_dir=tmp_path, progress=False)
    assert torch.get_num_threads() == before


# ------------------------------------------------------------------------------- determinism, cache


def test_determinism(tmp_path: Path, truth: xr.Dataset, ensemble: xr.Dataset) -> None:
    again = open_world(small(), cache_dir=tmp_path / "a", progress=False).load()
    for name in ALL_VARS:
        np.testing.assert_array_equal(again[name].values, truth[name].values, err_msg=name)
    ens_again = open_world_ensemble(small(), cache_dir=tmp_path / "a", progress=False).load()
    xr.testing.assert_identical(ens_again, ensemble)
    other = open_world(small(seed=1), cache_dir=tmp_path / "b", progress=False).load()
    assert not np.array_equal(other["2m_temperature"].values, truth["2m_temperature"].values)
    assert not np.array_equal(other["land_sea_mask"].values, truth["land_sea_mask"].values)


def test_cache_hit_and_regeneration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[WorldConfig] = []
    real = world._generate_truth

    def counting(config: WorldConfig, progress: bool):  # type: ignore[no-untyped-def]
        calls.append(config)
        return real(config, progress)

    monkeypatch.setattr(world, "_generate_truth", counting)
    cfg = small(days=2.0, ensemble_inits=2)
    first = open_world(cfg, cache_dir=tmp_path, progress=False).load()
    second = open_world(cfg, cache_dir=tmp_path, progress=False).load()
    assert len(calls) == 1
    xr.testing.assert_identical(first, second)
    assert (tmp_path / f"world-{cfg.hash()}" / "truth" / "data.zarr").is_dir()
    open_world(small(days=2.0, ensemble_inits=2, seed=3), cache_dir=tmp_path, progress=False)
    assert len(calls) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_crash_leaves_no_valid_looking_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = small(days=2.0, ensemble_inits=1)

    def boom(ds: xr.Dataset, path: Path) -> None:
        path.mkdir(parents=True)
        (path / "partial").write_text("half written")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(world, "_to_zarr", boom)
        with pytest.raises(KeyboardInterrupt):
            open_world(cfg, cache_dir=tmp_path, progress=False)
    world_dir = tmp_path / f"world-{cfg.hash()}"
    assert not (world_dir / "truth").exists()
    assert not [p for p in world_dir.iterdir() if p.name.startswith(".tmp")]
    ds = open_world(cfg, cache_dir=tmp_path, progress=False)  # regenerates cleanly
    assert ds.sizes["time"] == 8


# ------------------------------------------------------------------------------- coarse grid


def test_coarse_world(cache: Path, truth: xr.Dataset) -> None:
    coarse = open_world(small(), resolution="coarse", cache_dir=cache, progress=False).load()
    validate_dataset(coarse, require=ALL_VARS)
    assert coarse.sizes["latitude"] == 4 and coarse.sizes["longitude"] == 8
    np.testing.assert_allclose(coarse.latitude.values, [67.5, 22.5, -22.5, -67.5])
    np.testing.assert_allclose(coarse.longitude.values, 16.875 + 45 * np.arange(8))
    for name in ("2m_temperature", "total_precipitation_6hr", "geopotential"):
        np.testing.assert_allclose(
            area_mean(coarse[name]).values, area_mean(truth[name]).values, rtol=1e-5
        )
    assert set(np.unique(coarse["soil_type"].values)) <= set(range(8))


# ------------------------------------------------------------------------------- ensemble


def test_ensemble_shape_and_skill(ensemble: xr.Dataset, truth: xr.Dataset) -> None:
    cfg = small()
    validate_dataset(ensemble)
    assert ensemble.sizes["member"] == 5 and ensemble.sizes["time"] == 4
    assert ensemble["geopotential"].dims == ("time", "member", "level", "latitude", "longitude")
    assert ensemble["2m_temperature"].dims == ("time", "member", "latitude", "longitude")
    assert ensemble.attrs["lead_hours"] == 24
    lead = np.timedelta64(24, "h")
    assert np.all(ensemble.time.values - ensemble.init_time.values == lead)
    assert np.all(np.isin(ensemble.time.values, truth.time.values))
    np.testing.assert_array_equal(
        ensemble.init_time.values,
        truth.time.values[cfg.init_indices()],
    )
    valid = truth.sel(time=ensemble.time)
    for name, level in [("geopotential", 500), ("2m_temperature", None),
                        ("u_component_of_wind", 250), ("mean_sea_level_pressure", None)]:
        e = ensemble[name] if level is None else ensemble[name].sel(level=level)
        t = valid[name] if level is None else valid[name].sel(level=level)
        assert np.isfinite(e.values).all()
        assert float(e.std("member").mean()) > 0  # members differ
        rmse = float(np.sqrt(((e.mean("member") - t) ** 2).mean()))
        spread = float(np.sqrt(e.var("member", ddof=1).mean()))
        assert rmse > 0
        assert spread < rmse, (name, spread, rmse)  # under-dispersive, like raw ensembles


# ------------------------------------------------------------------------------- regrid


def grid(nlat: int, nlon: int) -> tuple[np.ndarray, np.ndarray]:
    return 90 - (np.arange(nlat) + 0.5) * 180 / nlat, np.arange(nlon) * 360 / nlon


def test_cell_area_weights() -> None:
    lat, _ = grid(4, 8)
    w = cell_area_weights(lat)
    edges = np.deg2rad([90, 45, 0, -45, -90])
    expect = np.sin(edges[:-1]) - np.sin(edges[1:])
    np.testing.assert_allclose(w, expect / expect.mean())
    with pytest.raises(DataError):
        cell_area_weights(np.array([10.0]))


def test_coarsen_matches_hand_computation() -> None:
    lat, lon = grid(4, 4)  # 67.5, 22.5, -22.5, -67.5
    values = np.arange(16, dtype=np.float64).reshape(4, 4)
    ds = xr.Dataset({"x": (("latitude", "longitude"), values, {"units": "K"})},
                    coords={"latitude": lat, "longitude": lon}, attrs={"title": "t"})
    out = coarsen_conservative(ds, 2)
    a_hi = np.sin(np.pi / 2) - np.sin(np.pi / 4)  # 45..90
    a_lo = np.sin(np.pi / 4)  # 0..45
    top_left = (a_hi * (0 + 1) + a_lo * (4 + 5)) / (2 * a_hi + 2 * a_lo)
    bottom_right = (a_lo * (10 + 11) + a_hi * (14 + 15)) / (2 * a_hi + 2 * a_lo)
    np.testing.assert_allclose(out["x"].values[0, 0], top_left)
    np.testing.assert_allclose(out["x"].values[1, 1], bottom_right)
    np.testing.assert_allclose(out.latitude.values, [45.0, -45.0])
    np.testing.assert_allclose(out.longitude.values, [45.0, 225.0])
    assert out["x"].attrs == {"units": "K"} and out.attrs == {"title": "t"}


def test_coarsen_preserves_global_mean_and_is_lazy() -> None:
    rng = np.random.default_rng(0)
    lat, lon = grid(32, 64)
    data = rng.gamma(0.5, 2.0, size=(3, 32, 64)).astype(np.float32)
    ds = xr.Dataset({"tp": (("time", "latitude", "longitude"), data)},
                    coords={"latitude": lat, "longitude": lon, "time": np.arange(3)})
    for factor in (2, 4, 8):
        out = coarsen_conservative(ds, factor)
        assert out["tp"].dtype == np.float32
        np.testing.assert_allclose(area_mean(out["tp"]).values, area_mean(ds["tp"]).values,
                                   rtol=1e-6)
    lazy = coarsen_conservative(ds.chunk({"time": 1}), 4)
    assert lazy["tp"].chunks is not None
    np.testing.assert_allclose(lazy["tp"].values, coarsen_conservative(ds, 4)["tp"].values)
    with pytest.raises(DataError, match="divisible"):
        coarsen_conservative(ds, 5)


def test_upsample_bilinear_exact_for_linear_fields() -> None:
    lat_c, lon_c = grid(8, 16)
    lat_f, lon_f = grid(32, 64)
    lon2, lat2 = np.meshgrid(lon_c, lat_c)
    ds = xr.Dataset(
        {
            "a": (("latitude", "longitude"), 2.0 * lon2 + 1.0),
            "b": (("latitude", "longitude"), 3.0 * lat2),
        },
        coords={"latitude": lat_c, "longitude": lon_c},
    )
    like = xr.Dataset(coords={"latitude": lat_f, "longitude": lon_f})
    out = upsample_bilinear(ds, like)
    assert out.sizes == {"latitude": 32, "longitude": 64}
    inside = (lon_f >= lon_c[0]) & (lon_f <= lon_c[-1])  # away from the 360 -> 0 wrap
    expect_a = np.broadcast_to(2.0 * lon_f[inside] + 1.0, (32, inside.sum()))
    np.testing.assert_allclose(out["a"].values[:, inside], expect_a)
    interior = (lat_f <= lat_c[0]) & (lat_f >= lat_c[-1])
    expect_b = np.broadcast_to((3.0 * lat_f[interior])[:, None], (interior.sum(), 64))
    np.testing.assert_allclose(out["b"].values[interior], expect_b)
    # latitude clamped beyond the outermost centres
    np.testing.assert_allclose(out["b"].values[0], 3.0 * lat_c[0])
    # periodic: between the last column (337.5) and 360, interpolate towards the first column
    wrap = lon_f > lon_c[-1]
    frac = (lon_f[wrap] - lon_c[-1]) / (360.0 - lon_c[-1])
    expect = (1 - frac) * (2.0 * lon_c[-1] + 1.0) + frac * (2.0 * lon_c[0] + 1.0)
    np.testing.assert_allclose(out["a"].values[5, wrap], expect)


def test_upsample_bilinear_clamps_a_regional_grid_instead_of_wrapping() -> None:
    """A regional source (longitudes that do not close the circle) must not borrow from its
    opposite edge: beyond the outermost columns the values are those columns'."""
    lon_c = 350.375 + np.arange(10.0)  # 1 degree cells over 350..360
    lon_f = 350.125 + 0.25 * np.arange(40)  # 0.25 degree cells, the same box
    lat = np.array([55.0, 54.0])
    values = np.broadcast_to(2.0 * lon_c + 1.0, (2, 10))
    ds = xr.Dataset({"a": (("latitude", "longitude"), values)},
                    coords={"latitude": lat, "longitude": lon_c})
    like = xr.Dataset(coords={"latitude": lat, "longitude": lon_f})
    out = upsample_bilinear(ds, like)["a"].values[0]
    inside = (lon_f >= lon_c[0]) & (lon_f <= lon_c[-1])
    np.testing.assert_allclose(out[inside], 2.0 * lon_f[inside] + 1.0)
    np.testing.assert_allclose(out[lon_f > lon_c[-1]], 2.0 * lon_c[-1] + 1.0)
    np.testing.assert_allclose(out[lon_f < lon_c[0]], 2.0 * lon_c[0] + 1.0)
    wrapped = upsample_bilinear(ds, like, periodic=True)["a"].values[0]
    assert wrapped[-1] < 2.0 * lon_c[-1] + 1.0  # forced periodic: pulled towards 350.375
