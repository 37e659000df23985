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


def _write_store(path: Path, times: pd.DatetimeIndex = TIMES) -> Path:
    """A zarr store whose values encode their time (6-hour steps since TIMES[0]), one chunk per
    time step."""
    t = ((times - TIMES[0]) / pd.Timedelta(6, "h")).to_numpy("f4")
    t2m = np.broadcast_to(t[:, None, None], (len(times), LATS.size, LONS.size)) + 250.0
    z = np.broadcast_to(t[:, None, None, None], (len(times), 2, LATS.size, LONS.size)) * 10.0
    ds = xr.Dataset(
        {
            "2m_temperature": (("time", "latitude", "longitude"), t2m.copy()),
            "geopotential": (("time", "level", "latitude", "longitude"), z.copy()),
        },
        coords={"time": times, "level": LEVELS, "latitude": LATS, "longitude": LONS},
    ).chunk({"time": 1})
    ds.to_zarr(path, zarr_format=2, consolidated=True)
    return path


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return _write_store(tmp_path / "era5.zarr")


def test_windows_are_read_lazily_with_the_right_steps(store: Path) -> None:
    data = WindowDataset(store, surf_vars=("2t",), atmos_vars=("z",), history=2, lead=2)
    assert len(data) == 12 - 2 - 2 + 1 and data.skipped_windows == 0
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


# 6-hourly steps 0..4 and 9..11: a 30 h gap between 2020-01-02T00 and 2020-01-03T06.
GAP_TIMES = TIMES.delete([5, 6, 7, 8])


@pytest.mark.parametrize(
    ("history", "lead", "skipped", "built"),
    # windows (span history + lead of the 8 times) that hold the 30 h step, counted by hand
    [(1, 1, 1, 6), (2, 1, 2, 4), (2, 2, 3, 2), (3, 2, 3, 1)],
)
def test_windows_across_a_time_gap_are_skipped_and_counted(
    tmp_path: Path, history: int, lead: int, skipped: int, built: int
) -> None:
    path = _write_store(tmp_path / "gap.zarr", GAP_TIMES)
    with pytest.warns(
        UserWarning,
        match=r"1 irregular step\(s\) \(regular step 6 h\): 2020-01-02T00:00:00 -> "
        rf"2020-01-03T06:00:00 \(30 h\); {skipped} of {skipped + built} windows .*skipped",
    ):
        data = WindowDataset(path, surf_vars=("2t",), history=history, lead=lead)
    assert data.skipped_windows == skipped and len(data) == built
    six = np.timedelta64(6, "h")
    for i in range(len(data)):
        sample = data[i]
        assert np.all(np.diff(sample.times[:-1]) == six)  # inputs one step apart
        assert sample.times[-1] - sample.times[-2] == lead * six  # target: lead steps on
        # the values read are those of these times (they encode 6-hour steps since TIMES[0])
        expected = (sample.times - TIMES[0].to_datetime64()) / six + 250.0
        assert sample.surf["2t"][:, 0, 0].tolist() == expected.tolist()


def test_no_window_without_a_gap_is_refused(tmp_path: Path) -> None:
    path = _write_store(tmp_path / "gaps.zarr", TIMES[[0, 1, 3, 4]])
    with pytest.raises(DataError, match=r"hold no sample .* crosses no gap .*12 h"):
        WindowDataset(path, surf_vars=("2t",), history=2, lead=1)


@pytest.mark.parametrize(
    ("order", "match"),
    [
        ([0, 1, 1, 2, 3], r"Duplicate time\(s\).*: 2020-01-01T06:00:00\. .*drop_duplicates"),
        ([0, 2, 1, 3, 4], r"decreases at 2020-01-01T12:00:00 -> 2020-01-01T06:00:00.*sortby"),
    ],
    ids=["duplicate", "decreasing"],
)
def test_bad_time_axis_is_refused(tmp_path: Path, order: list[int], match: str) -> None:
    path = _write_store(tmp_path / "bad.zarr", TIMES[order])
    with pytest.raises(DataError, match=match):
        WindowDataset(path, surf_vars=("2t",), history=2, lead=1)
    opened = xr.open_zarr(path)  # an opened dataset, not only a path, is checked too
    with pytest.raises(DataError, match=match):
        WindowDataset(opened, surf_vars=("2t",), history=2, lead=1)
