"""Reading ERA5 / WeatherBench2 stores at scale: lazy windows, sharded over ranks, prefetched.

:class:`WindowDataset` opens a store lazily (zarr through dask, via
:func:`~wpeft.data.era5.open_era5`) in each DataLoader worker and reads one sample — ``history``
input steps and the target ``lead`` steps after the last one — per ``__getitem__``; nothing else
is loaded, so the store may be far larger than memory. :func:`make_loader` shards the samples
over the ranks of a torchrun job with a ``DistributedSampler`` (disjoint, reshuffled per epoch
from one seed) and prefetches with worker processes.

    ds = WindowDataset("era5.zarr", surf_vars=("2t", "10u"), atmos_vars=("z", "t"), history=2)
    loader = make_loader(ds, batch_size=1, env=wpeft.distributed.runtime.current(), workers=4)
    for epoch in range(n):
        loader.sampler.set_epoch(epoch)
        for inputs, targets in loader: ...    # aurora.Batch, {wb2 name: (B, [C,] H, W)}
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask
import numpy as np
import torch
import xarray as xr
from aurora import Batch, Metadata
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from wpeft.data.batch import Fields, wb2_name
from wpeft.data.era5 import open_era5
from wpeft.data.schema import check_time_axis, describe_steps, regular_step, regular_windows
from wpeft.distributed.runtime import DistEnv
from wpeft.errors import DataError

__all__ = ["WindowDataset", "collate_windows", "make_loader"]


class WindowDataset(Dataset):
    """Samples of ``history`` consecutive steps plus the step ``lead`` after the last one.

    Args:
        source: A store path for :func:`~wpeft.data.era5.open_era5` (opened lazily, once per
            worker process), or an already opened (lazy) dataset.
        surf_vars / atmos_vars / static_vars: Aurora short names (``2t``, ``z``, ``lsm``, ...).
        history: Input steps per sample (Aurora uses 2).
        lead: Target offset after the last input step, in time steps.
        open_kwargs: Passed to ``open_era5`` (``levels``, ``time`` slice, ``chunks``).

    Item ``i`` is a :class:`~wpeft.data.batch.Fields` of ``history + 1`` steps (the inputs, then
    the target), read from the store when asked for.

    The time axis must be strictly increasing (duplicate or decreasing times raise
    :class:`DataError`). Where its step is not constant (a gap), the windows that would cross it
    are not built: every sample's inputs are one regular step apart and its target ``lead``
    regular steps after the last input. The number left out is :attr:`skipped_windows`, and a
    warning names the gaps.
    """

    def __init__(
        self,
        source: str | Path | xr.Dataset,
        *,
        surf_vars: Sequence[str],
        atmos_vars: Sequence[str] = (),
        static_vars: Sequence[str] = (),
        history: int = 2,
        lead: int = 1,
        open_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if history < 1 or lead < 1:
            raise DataError(f"history ({history}) and lead ({lead}) must be >= 1.")
        self.source = source
        self.surf_vars, self.atmos_vars = tuple(surf_vars), tuple(atmos_vars)
        self.static_vars = tuple(static_vars)
        self.history, self.lead = history, lead
        self.open_kwargs = dict(open_kwargs or {})
        self._ds: xr.Dataset | None = source if isinstance(source, xr.Dataset) else None
        times = np.asarray(self.dataset["time"].values)
        check_time_axis(times)
        step, breaks = regular_step(times)
        span = history + lead  # times a window covers, from its first input to its target
        self._starts = regular_windows(times.size, breaks, span)
        #: Windows left out because they would cross a gap in the time axis.
        self.skipped_windows = max(times.size - span + 1, 0) - self._starts.size
        gaps = describe_steps(times, breaks, step) if breaks.size else ""
        if self._starts.size == 0:
            raise DataError(
                f"{times.size} time steps hold no sample of history {history} and lead {lead}"
                + (f" that crosses no gap ({gaps})" if gaps else "")
                + "; open a longer (regular) time range."
            )
        if self.skipped_windows:
            src = self.dataset.attrs.get("source_path")
            warnings.warn(
                f"The time axis{f' of {src}' if src else ''} has {gaps}; {self.skipped_windows} of "
                f"{self.skipped_windows + self._starts.size} windows (history {history}, lead "
                f"{lead}) would cross them and are skipped.",
                stacklevel=2,
            )

    @property
    def dataset(self) -> xr.Dataset:
        """The lazy dataset (opened on first use in each process)."""
        if self._ds is None:
            variables = [wb2_name(v, "surface") for v in self.surf_vars]
            variables += [wb2_name(v, "atmos") for v in self.atmos_vars]
            variables += [wb2_name(v, "static") for v in self.static_vars]
            self._ds = open_era5(self.source, variables=variables, **self.open_kwargs)
        return self._ds

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if not isinstance(self.source, xr.Dataset):
            state["_ds"] = None  # each worker opens the store itself
        return state

    def __len__(self) -> int:
        return int(self._starts.size)

    def __getitem__(self, i: int) -> Fields:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range 0..{len(self) - 1}")
        s = int(self._starts[i])
        steps = list(range(s, s + self.history)) + [s + self.history - 1 + self.lead]
        window = self.dataset.isel(time=steps)  # only these steps are read
        # DataLoader workers are the parallelism: dask reads in the calling thread (its thread
        # pool and forked workers deadlock).
        with dask.config.set(scheduler="synchronous"):
            return Fields.from_dataset(
                window, surf_vars=self.surf_vars, atmos_vars=self.atmos_vars,
                static_vars=self.static_vars,
            )


def collate_windows(samples: Sequence[Fields]) -> tuple[Batch, dict[str, torch.Tensor]]:
    """Stack windows into an ``aurora.Batch`` of the input steps (surface ``(B, T, H, W)``,
    atmospheric ``(B, T, C, H, W)``) and targets by WB2 name (``(B, H, W)`` / ``(B, C, H, W)``)."""
    first = samples[0]
    surf = {k: torch.stack([s.surf[k] for s in samples]) for k in first.surf}
    atmos = {k: torch.stack([s.atmos[k] for s in samples]) for k in first.atmos}
    inputs = Batch(
        surf_vars={k: v[:, :-1] for k, v in surf.items()},
        static_vars=dict(first.static),
        atmos_vars={k: v[:, :-1] for k, v in atmos.items()},
        metadata=Metadata(
            lat=first.lat, lon=first.lon,
            time=tuple(_datetime(s.times[-2]) for s in samples),
            atmos_levels=first.levels,
        ),
    )
    targets = {wb2_name(k, "surface"): v[:, -1] for k, v in surf.items()}
    targets.update({wb2_name(k, "atmos"): v[:, -1] for k, v in atmos.items()})
    return inputs, targets


def _datetime(t: np.datetime64) -> Any:
    import pandas as pd

    return pd.Timestamp(t).to_pydatetime()


def make_loader(
    dataset: WindowDataset,
    batch_size: int,
    *,
    env: DistEnv | None = None,
    seed: int = 0,
    shuffle: bool = True,
    workers: int = 0,
    prefetch_factor: int = 2,
) -> DataLoader:
    """A DataLoader over this rank's share of ``dataset``.

    ``batch_size`` is per rank. Samples are split over ``env.world_size`` ranks by a
    ``DistributedSampler`` (every rank gets the same number; call ``loader.sampler.set_epoch``
    each epoch); ``workers`` processes read ahead ``prefetch_factor`` batches each.
    """
    env = env or DistEnv()
    sampler = DistributedSampler(
        dataset, num_replicas=env.world_size, rank=env.rank, shuffle=shuffle, seed=seed,
        drop_last=True,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        prefetch_factor=prefetch_factor if workers > 0 else None,
        persistent_workers=workers > 0,
        collate_fn=collate_windows,
        drop_last=True,
    )
