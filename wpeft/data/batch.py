"""From schema Datasets to ``aurora.Batch``: validated, indexable by time step.

:class:`Fields` holds a dataset's variables under Aurora's short names: as tensors in memory
(the embedded world), or -- with ``lazy=True``, for stores larger than memory -- as
:class:`LazyVariable` views that read only the time steps a batch indexes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime

import numpy as np
import pandas as pd
import torch
import xarray as xr
from aurora import Batch, Metadata

from wpeft.data.schema import VARIABLES, Kind, validate_dataset
from wpeft.errors import DataError

__all__ = ["Fields", "LazyVariable", "check_grid", "random_batch", "wb2_name"]

_BY_AURORA: dict[tuple[str, str], str] = {(s.kind, s.aurora): s.name for s in VARIABLES.values()}


def wb2_name(aurora_name: str, kind: Kind) -> str:
    """WB2 variable name of an Aurora short name of a given kind (``("z", "static")``...)."""
    try:
        return _BY_AURORA[(kind, aurora_name)]
    except KeyError:
        known = sorted(a for k, a in _BY_AURORA if k == kind)
        raise DataError(
            f"Unknown {kind} variable {aurora_name!r}; Aurora names of that kind: {known}."
        ) from None


def check_grid(height: int, width: int, patch_size: int) -> None:
    """Raise :class:`DataError` unless an ``(height, width)`` grid fits the patch size."""
    if width % patch_size or height % patch_size not in (0, 1):
        raise DataError(
            f"Grid {height} x {width} does not fit the backbone's patch size {patch_size}: the "
            f"width must be a multiple of {patch_size} and the height a multiple (or one more). "
            f"Regrid or crop the data (e.g. ds.isel(latitude=slice(0, {height // patch_size * patch_size})))."
        )


class LazyVariable:
    """One variable of a lazily opened dataset, indexed along time like a tensor.

    ``var[index]`` with an integer tensor / array of time positions (any shape, e.g. ``(B, 2)``)
    or a slice reads just those steps (each distinct step once) and returns a float32 tensor of
    shape ``index.shape + rest``, e.g. ``(B, 2, H, W)``. Non-finite values raise
    :class:`DataError` naming the variable and the first bad time, as the eager path does.

    Args:
        da: A ``(time, ...)`` DataArray (dask- or lazily indexed); other dims in schema order.
    """

    def __init__(self, da: xr.DataArray) -> None:
        self.da = da
        self.shape = tuple(int(n) for n in da.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: torch.Tensor | np.ndarray | slice | int) -> torch.Tensor:
        if isinstance(index, slice):
            index = np.arange(self.shape[0])[index]
        idx = np.asarray(index.cpu() if torch.is_tensor(index) else index, dtype=np.int64)
        flat = idx.reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= self.shape[0]):
            raise DataError(
                f"Time index {int(flat.min())}..{int(flat.max())} outside {self.da.name!r}'s "
                f"{self.shape[0]} steps."
            )
        steps, inverse = np.unique(flat, return_inverse=True)
        values = np.asarray(self.da.isel(time=steps).values, dtype=np.float32)
        bad = ~np.isfinite(values)
        if bad.any():
            first = int(steps[np.nonzero(bad.reshape(len(steps), -1).any(axis=1))[0][0]])
            raise DataError(
                f"Variable {self.da.name!r} has NaN/inf values at time "
                f"{self.da['time'].values[first]}. Fill or mask them, or exclude that time from "
                "the data's periods; wpeft does not guess."
            )
        out = torch.from_numpy(np.ascontiguousarray(values[inverse]))
        return out.reshape(*idx.shape, *self.shape[1:])


@dataclasses.dataclass
class Fields:
    """A dataset's variables as tensors, keyed by Aurora short name.

    Attributes:
        surf: ``(N, H, W)`` per surface variable (a tensor, or a :class:`LazyVariable`).
        atmos: ``(N, C, H, W)`` per atmospheric variable, C = ``len(levels)`` (likewise).
        static: ``(H, W)`` per static variable.
        lat, lon: ``(H,)`` and ``(W,)`` coordinates (lat decreasing).
        levels: Pressure levels (hPa).
        times: ``(N,)`` datetime64 time axis.
    """

    surf: dict[str, torch.Tensor]
    atmos: dict[str, torch.Tensor]
    static: dict[str, torch.Tensor]
    lat: torch.Tensor
    lon: torch.Tensor
    levels: tuple[int, ...]
    times: np.ndarray

    @classmethod
    def from_dataset(
        cls,
        ds: xr.Dataset,
        *,
        surf_vars: Sequence[str],
        atmos_vars: Sequence[str],
        static_vars: Sequence[str] = (),
        lazy: bool = False,
    ) -> Fields:
        """Load the named Aurora variables of ``ds`` into memory (float32), with checks.

        With ``lazy=True`` surface and atmospheric variables stay in the store as
        :class:`LazyVariable` (read per batch, checked for NaN/inf then); statics, coordinates
        and times are loaded.

        Raises :class:`DataError` for missing variables or NaN/inf values, naming them.
        """
        names = (
            [(v, wb2_name(v, "surface")) for v in surf_vars]
            + [(v, wb2_name(v, "atmos")) for v in atmos_vars]
            + [(v, wb2_name(v, "static")) for v in static_vars]
        )
        validate_dataset(ds, require=[w for _, w in names])

        n_surf, n_atmos = len(surf_vars), len(atmos_vars)

        def read(name: str, dims: tuple[str, ...]) -> torch.Tensor | LazyVariable:
            return LazyVariable(ds[name].transpose(*dims)) if lazy else load_t(ds, name, dims)

        surf = {v: read(w, ("time", "latitude", "longitude")) for v, w in names[:n_surf]}
        atmos = {
            v: read(w, ("time", "level", "latitude", "longitude"))
            for v, w in names[n_surf : n_surf + n_atmos]
        }
        static = {
            v: load_t(ds, w, ("latitude", "longitude"))
            for v, w in names[n_surf + n_atmos :]
        }
        levels = tuple(int(x) for x in ds["level"].values) if atmos_vars else ()
        return cls(
            surf=surf,
            atmos=atmos,
            static=static,
            lat=torch.tensor(np.array(ds["latitude"].values), dtype=torch.float32),
            lon=torch.tensor(np.array(ds["longitude"].values), dtype=torch.float32),
            levels=levels,
            times=np.asarray(ds["time"].values),
        )

    def __len__(self) -> int:
        return len(self.times)

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.lat.numel()), int(self.lon.numel())

    def batch(self, indices: Sequence[int], history: int = 1) -> Batch:
        """An ``aurora.Batch`` whose sample b holds steps ``indices[b] - history + 1 .. indices[b]``.

        Shapes: surface ``(B, T, H, W)``, atmospheric ``(B, T, C, H, W)``, static ``(H, W)``.
        """
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        if idx.numel() == 0:
            raise DataError("Empty batch: no time indices given.")
        if int(idx.min()) - history + 1 < 0 or int(idx.max()) >= len(self):
            raise DataError(
                f"Time indices {int(idx.min())}..{int(idx.max())} with history {history} fall "
                f"outside the {len(self)} available steps."
            )
        window = idx[:, None] + torch.arange(-history + 1, 1)[None, :]  # (B, T)
        return Batch(
            surf_vars={k: v[window] for k, v in self.surf.items()},
            static_vars=dict(self.static),
            atmos_vars={k: v[window] for k, v in self.atmos.items()},
            metadata=Metadata(
                lat=self.lat,
                lon=self.lon,
                time=tuple(_to_datetime(self.times[i]) for i in idx.tolist()),
                atmos_levels=self.levels,
            ),
        )


def load_t(ds: xr.Dataset, name: str, dims: tuple[str, ...]) -> torch.Tensor:
    """One variable as a float32 tensor with ``dims`` order; NaN/inf raise :class:`DataError`."""
    arr = np.ascontiguousarray(ds[name].transpose(*dims).values, dtype=np.float32)
    bad = int((~np.isfinite(arr)).sum())
    if bad:
        raise DataError(
            f"Variable {name!r} has {bad} NaN/inf value(s). Fill or mask them before training "
            "(e.g. ds.fillna, or crop to where data exist); wpeft does not guess."
        )
    return torch.from_numpy(arr)


def _to_datetime(t: np.datetime64) -> datetime:
    return pd.Timestamp(t).to_pydatetime()


def random_batch(
    surf_vars: Sequence[str],
    static_vars: Sequence[str],
    atmos_vars: Sequence[str],
    *,
    batch_size: int = 2,
    history: int = 2,
    grid: tuple[int, int] = (32, 64),
    levels: tuple[int, ...] = (850, 500, 250),
    seed: int = 1,
) -> Batch:
    """A standard-normal ``aurora.Batch`` on a regular global grid, for shape tests and
    benchmarks (values are already in normalised units for a backbone without statistics)."""
    g = torch.Generator().manual_seed(seed)
    B, T, (H, W) = batch_size, history, grid
    return Batch(
        surf_vars={k: torch.randn(B, T, H, W, generator=g) for k in surf_vars},
        static_vars={k: torch.randn(H, W, generator=g) for k in static_vars},
        atmos_vars={k: torch.randn(B, T, len(levels), H, W, generator=g) for k in atmos_vars},
        metadata=Metadata(
            lat=torch.linspace(90 - 90 / H, -90 + 90 / H, H),
            lon=torch.arange(W) * (360 / W),
            time=(datetime(2000, 1, 1),) * B,
            atmos_levels=levels,
        ),
    )
