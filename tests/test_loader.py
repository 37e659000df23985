"""The scalable reader: lazy windows from a zarr store, sharded over ranks, prefetched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from wpeft.data.loader import WindowDataset, collate_windows, make_loader
from wpeft.distributed.runtime import DistEnv
from wpeft.errors import DataError

TIMES = pd.date_range("2020-01-01", periods=12, freq="6h")
LATS = np.linspace(-60.0, 60.0, 4)
LONS = np.arange(0.0, 360.0, 45.0)
LEVELS = np.array([500, 850])


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A zarr store whose values encode their time index, one chunk per time step."""
    t = np.arange(len(TIMES), dtype="f4")
    t2m = np.broadcast_to(t[:, None, None], (len(TIMES), LATS.size, LONS.size)) + 250.0
    z = np.broadcast_to(t[:, None, None, None], (len(TIMES), 2, LATS.size, LONS.size)) * 10.0
    ds = xr.Dataset(
        {
            "2m_temperature": (("time", "latitude", "longitude"), t2m.copy()),
            "geopotential": (("time", "level", "latitude", "longitude"), z.copy()),
        },
        coords={"time": TIMES, "level": LEVELS, "latitude": LATS, "longitude": LONS},
    ).chunk({"time": 1})
    path = tmp_path / "era5.zarr"
    ds.to_zarr(path, zarr_format=2, consolidated=True)
    return path


def test_windows_are_read_lazily_with_the_right_steps(store: Path) -> None:
    data = WindowDataset(store, surf_vars=("2t",), atmos_vars=("z",), history=2, lead=2)
    assert len(data) == 12 - 2 - 2 + 1
    # the store stays on disk: dask-backed variables, nothing loaded by opening or by a sample
    assert data.dataset["2m_temperature"].chunks is not None
    sample = data[3]
    assert data.dataset["2m_temperature"].chunks is not None
    assert sample.surf["2t"].shape == (3, 4, 8) and sample.atmos["z"].shape == (3, 2, 4, 8)
    # inputs are steps 3 and 4, the target is step 4 + lead = 6 (values encode the step)
    assert sample.surf["2t"][:, 0, 0].tolist() == [253.0, 254.0, 256.0]
    with pytest.raises(IndexError):
        data[len(data)]


def test_collate_builds_aurora_batches_and_targets(store: Path) -> None:
    data = WindowDataset(store, surf_vars=("2t",), atmos_vars=("z",), history=2, lead=1)
    inputs, targets = collate_windows([data[0], data[5]])
    assert inputs.surf_vars["2t"].shape == (2, 2, 4, 8)
    assert inputs.atmos_vars["z"].shape == (2, 2, 2, 4, 8)
    assert targets["2m_temperature"].shape == (2, 4, 8)
    assert targets["geopotential"][:, 0, 0, 0].tolist() == [20.0, 70.0]
    assert inputs.metadata.time[1] == TIMES[6].to_pydatetime()


def test_ranks_get_disjoint_shares_that_cover_the_samples(store: Path) -> None:
    data = WindowDataset(store, surf_vars=("2t",), history=2, lead=1)  # 10 samples
    seen = []
    for rank in range(2):
        loader = make_loader(data, batch_size=1, env=DistEnv(rank=rank, world_size=2), seed=3)
        loader.sampler.set_epoch(0)
        seen.append([int(t[0, 0, 0]) - 250 for _, t in ((i, b[1]["2m_temperature"]) for i, b in enumerate(loader))])
    assert len(seen[0]) == len(seen[1]) == 5
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(2, 12))  # targets of samples 0..9


def test_worker_processes_read_the_same_batches(store: Path) -> None:
    data = WindowDataset(store, surf_vars=("2t",), atmos_vars=("z",), history=2, lead=1)
    plain = [b[1]["geopotential"] for b in make_loader(data, 2, seed=1)]
    workers = [b[1]["geopotential"] for b in make_loader(data, 2, seed=1, workers=2)]
    assert len(plain) == 5
    for a, b in zip(plain, workers, strict=True):
        assert torch.equal(a, b)


def test_bad_windows_are_refused(store: Path) -> None:
    with pytest.raises(DataError, match="hold no sample"):
        WindowDataset(store, surf_vars=("2t",), history=8, lead=8)
    with pytest.raises(DataError, match="must be >= 1"):
        WindowDataset(store, surf_vars=("2t",), history=0)
    with pytest.raises(DataError):
        WindowDataset(store, surf_vars=("msl",))  # not in the store
