"""Tests for wpeft.data.stats: area-weighted normalisation statistics and their JSON form."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from wpeft.data.stats import NormStats, compute_stats, stats_key
from wpeft.errors import DataError

LATS = np.array([60.0, 0.0])  # weights 0.5 and 1: an unweighted mean would differ
LONS = np.array([0.0, 180.0])
TIMES = pd.date_range("2020-01-01", periods=3, freq="6h")


def _dataset() -> xr.Dataset:
    rng = np.random.default_rng(0)
    t2m = 270.0 + 10 * rng.random((3, 2, 2))
    z = np.stack([5.4e4 + 100 * rng.random((3, 2, 2)), 1.4e4 + 50 * rng.random((3, 2, 2))], axis=1)
    return xr.Dataset(
        {
            "2m_temperature": (("time", "latitude", "longitude"), t2m),
            "geopotential": (("time", "level", "latitude", "longitude"), z),
            "land_sea_mask": (("latitude", "longitude"), np.ones((2, 2))),
            "geopotential_at_surface": (
                ("latitude", "longitude"), np.array([[1.0, 3.0], [5.0, 9.0]])
            ),
        },
        coords={"time": TIMES, "level": [500, 850], "latitude": LATS, "longitude": LONS},
    )


def _weighted(x: np.ndarray, lat_axis: int) -> tuple[float, float]:
    shape = [1] * x.ndim
    shape[lat_axis] = LATS.size
    w = np.broadcast_to(np.cos(np.deg2rad(LATS)).reshape(shape), x.shape)
    mean = float((w * x).sum() / w.sum())
    return mean, float(np.sqrt((w * (x - mean) ** 2).sum() / w.sum()))


@pytest.mark.parametrize("chunked", [False, True], ids=["numpy", "dask"])
def test_area_weighted_against_numpy(chunked: bool) -> None:
    ds = _dataset()
    if chunked:
        ds = ds.chunk({"time": 1})
    stats = compute_stats(ds)
    assert set(stats.mean) == {"2t", "z_500", "z_850", "lsm", "z"}
    t2m = ds["2m_temperature"].values
    mean, std = _weighted(t2m, lat_axis=1)
    assert stats.mean["2t"] == pytest.approx(mean, rel=1e-12)
    assert stats.std["2t"] == pytest.approx(std, rel=1e-9)
    assert abs(mean - t2m.mean()) > 1e-6  # the weights matter
    for i, level in enumerate((500, 850)):
        mean, std = _weighted(ds["geopotential"].values[:, i], lat_axis=1)
        assert stats.mean[f"z_{level}"] == pytest.approx(mean, rel=1e-12)
        assert stats.std[f"z_{level}"] == pytest.approx(std, rel=1e-7)
    mean, std = _weighted(ds["geopotential_at_surface"].values, lat_axis=0)
    assert stats.mean["z"] == pytest.approx(mean) and stats.std["z"] == pytest.approx(std)


def test_constant_field_gets_unit_std() -> None:
    stats = compute_stats(_dataset())
    assert stats.mean["lsm"] == 1.0
    assert stats.std["lsm"] == 1.0


def test_large_mean_small_spread_is_accurate() -> None:
    """One-pass variance must not cancel for fields like pressure (mean 1e5, spread 0.1)."""
    x = (1.0e5 + 0.1 * np.random.default_rng(1).standard_normal((4, 2, 2))).astype("f4")
    ds = xr.Dataset(
        {"mean_sea_level_pressure": (("time", "latitude", "longitude"), x)},
        coords={"time": range(4), "latitude": LATS, "longitude": LONS},
    )
    mean, std = _weighted(x.astype(np.float64), lat_axis=1)
    stats = compute_stats(ds.chunk({"time": 2}))
    assert stats.std["msl"] == pytest.approx(std, rel=1e-9)
    assert stats.mean["msl"] == pytest.approx(mean, rel=1e-12)


def test_nan_is_an_error() -> None:
    ds = _dataset()
    ds["2m_temperature"][0, 0, 0] = np.nan
    with pytest.raises(DataError, match=r"'2m_temperature': 1 values"):
        compute_stats(ds.chunk({"time": 1}))


def test_extra_dim_is_an_error() -> None:
    ds = _dataset()[["2m_temperature"]].expand_dims(member=2)
    with pytest.raises(DataError, match="member"):
        compute_stats(ds)
    assert "2t" in compute_stats(ds, dims=("member", "time", "latitude", "longitude")).mean


def test_json_round_trip(tmp_path: Path) -> None:
    stats = compute_stats(_dataset())
    path = stats.to_json(tmp_path / "stats.json")
    back = NormStats.from_json(path)
    assert back == stats
    assert NormStats.from_dict(stats.to_dict()) == stats
    assert back.as_aurora_stats()["z_500"] == (stats.mean["z_500"], stats.std["z_500"])


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"mean": {"2t": 280.0}}),
        json.dumps({"mean": {"2t": 280.0}, "std": {"10u": 1.0}}),
        json.dumps({"mean": {"2t": "hot"}, "std": {"2t": 1.0}}),
        json.dumps({"mean": {"2t": 280.0}, "std": {"2t": 0.0}}),
    ],
    ids=["syntax", "list", "no-std", "key-mismatch", "string", "zero-std"],
)
def test_bad_json_is_a_data_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "stats.json"
    path.write_text(content)
    with pytest.raises(DataError, match="stats.json"):
        NormStats.from_json(path)


def test_missing_json_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="absent.json"):
        NormStats.from_json(tmp_path / "absent.json")


def test_stats_key_matches_aurora() -> None:
    assert stats_key("2m_temperature") == "2t"
    assert stats_key("geopotential", 500) == "z_500"
    assert stats_key("geopotential_at_surface") == "z"
    assert stats_key("temperature", 1.5) == "t_1_5"
