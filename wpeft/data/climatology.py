"""Climatology files in Prithvi-WxC's MERRA-2 layout, read as ``(V, H, W)`` tensors.

The released Prithvi-WxC 2.3B (``residual="climate"``) predicts increments over a climatology at
the target time, and its static embedding reads that climatology too. The package's own MERRA-2
loader (``PrithviWxC.dataloaders.merra2.Merra2Dataset``) keeps one pair of netCDF files per day
of year and hour of day,

* ``climate_surface_doy{DOY:03}_hour{HH:02}.nc``: one ``(lat, lon)`` variable per surface
  variable (``T2M``, ``SLP``, ...);
* ``climate_vertical_doy{DOY:03}_hour{HH:02}.nc``: one ``(lev, lat, lon)`` variable per vertical
  variable (``T``, ``U``, ...) and the coordinate ``lev`` (model levels, ``34.0`` ... ``72.0``),

and picks the pair of a sample's target time with the day of year capped at 365
(``SampleSpec.climatology_info``). :class:`Climatology` reads the same files with xarray (the
loader's readers are methods of a dataset that needs the whole MERRA-2 archive) into the
channel order of a wpeft config (:attr:`~wpeft.backbones.configs.PrithviConfig.variables`:
surface variables, then every vertical variable at every level in the config's level order,
selected by value; the loader itself flips its levels). A file with one latitude more than the
model's grid (MERRA-2's 361 for Prithvi's 360) loses its last one, as the package's examples
crop it (latitude padding ``(0, -1)``). A leading length-1 dimension (a time axis) is dropped.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from wpeft.errors import DataError

if TYPE_CHECKING:
    import xarray as xr

    from wpeft.backbones.configs import PrithviConfig

__all__ = ["SURFACE_FILE", "VERTICAL_FILE", "Climatology", "climatology_key"]

#: File names of the package's MERRA-2 loader (``data_file_surface_climate`` and
#: ``data_file_vertical_climate``).
SURFACE_FILE = "climate_surface_doy{doy:03}_hour{hour:02}.nc"
VERTICAL_FILE = "climate_vertical_doy{doy:03}_hour{hour:02}.nc"


def climatology_key(time: datetime) -> tuple[int, int]:
    """``(day of year, hour)`` of the climatology for a target ``time``; the day of year is
    capped at 365 (31 December of a leap year reads day 365), as the package does."""
    return min(time.timetuple().tm_yday, 365), time.hour


class Climatology:
    """A directory of climatology files -> ``(V, H, W)`` float32 tensors at a target time.

    Args:
        surface_dir: Directory of the ``climate_surface_*`` files.
        vertical_dir: Directory of the ``climate_vertical_*`` files (default: ``surface_dir``).
        surf_vars / atmos_vars: Variable names in the files, in channel order.
        levels: Levels of every vertical variable, in channel order (values of ``lev``).
        grid: ``(H, W)`` of the model.
        cache_size: Time pairs kept in memory (a 2.3B climatology is 133 MB per time).

    Errors (:class:`~wpeft.errors.DataError`) name the file and the fix: a missing file, a
    variable or level a file lacks, a grid other than the model's.
    """

    def __init__(
        self,
        surface_dir: str | Path,
        vertical_dir: str | Path | None = None,
        *,
        surf_vars: Sequence[str],
        atmos_vars: Sequence[str],
        levels: Sequence[float],
        grid: tuple[int, int],
        cache_size: int = 2,
    ) -> None:
        self.surface_dir = Path(surface_dir)
        self.vertical_dir = Path(vertical_dir) if vertical_dir is not None else self.surface_dir
        for d in {self.surface_dir, self.vertical_dir}:
            if not d.is_dir():
                raise DataError(
                    f"Climatology directory {str(d)!r} does not exist; give the directory of the "
                    f"{SURFACE_FILE.split('_doy')[0]}_doyDOY_hourHH.nc files."
                )
        self.surf_vars = tuple(surf_vars)
        self.atmos_vars = tuple(atmos_vars)
        self.levels = tuple(levels)
        self.grid = (int(grid[0]), int(grid[1]))
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()

    @classmethod
    def for_config(
        cls, config: PrithviConfig, surface_dir: str | Path, vertical_dir: str | Path | None = None
    ) -> Climatology:
        """The climatology of ``config``'s channels and grid."""
        return cls(
            surface_dir,
            vertical_dir,
            surf_vars=config.surf_vars,
            atmos_vars=config.atmos_vars,
            levels=config.levels,
            grid=config.grid,
        )

    @property
    def variables(self) -> tuple[str, ...]:
        """Channel names, as :attr:`PrithviConfig.variables` (``"T_72"`` for T at level 72)."""
        return self.surf_vars + tuple(
            f"{v}_{_level_name(lv)}" for v in self.atmos_vars for lv in self.levels
        )

    def paths(self, time: datetime) -> tuple[Path, Path]:
        """The surface and vertical files for target ``time``."""
        doy, hour = climatology_key(time)
        return (
            self.surface_dir / SURFACE_FILE.format(doy=doy, hour=hour),
            self.vertical_dir / VERTICAL_FILE.format(doy=doy, hour=hour),
        )

    def read(self, time: datetime) -> torch.Tensor:
        """The climatology at target ``time``: ``(V, H, W)`` float32 in channel order (cached;
        do not modify it in place)."""
        key = climatology_key(time)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        surface, vertical = self.paths(time)
        channels = self._surface(surface) + self._vertical(vertical)
        out = torch.from_numpy(np.stack(channels).astype(np.float32, copy=False))
        self._cache[key] = out
        while len(self._cache) > max(self.cache_size, 0):
            self._cache.popitem(last=False)
        return out

    def stack(self, times: Sequence[datetime]) -> torch.Tensor:
        """``(B, V, H, W)``: :meth:`read` for each target time (a new tensor)."""
        return torch.stack([self.read(t) for t in times])

    # --- reading -------------------------------------------------------------------------

    def _surface(self, path: Path) -> list[np.ndarray]:
        with _open(path) as ds:
            return [self._field(ds[_variable(ds, v, path)], path, v) for v in self.surf_vars]

    def _vertical(self, path: Path) -> list[np.ndarray]:
        if not self.atmos_vars:
            return []
        out = []
        with _open(path) as ds:
            if "lev" not in ds.variables:
                raise DataError(
                    f"Climatology file {str(path)!r} has no 'lev' coordinate; a vertical "
                    "climatology gives its levels in 'lev' (as MERRA-2's files do)."
                )
            lev = np.asarray(ds["lev"].values, dtype=float)
            index = []
            for level in self.levels:
                hit = np.flatnonzero(np.isclose(lev, float(level)))
                if hit.size == 0:
                    raise DataError(
                        f"Climatology file {str(path)!r} lacks level {level} (its 'lev': "
                        f"{[_level_name(x) for x in lev]}); use files holding every level of "
                        "the config."
                    )
                index.append(int(hit[0]))
            for v in self.atmos_vars:
                data = ds[_variable(ds, v, path)]
                if "lev" not in data.dims:
                    raise DataError(
                        f"Variable {v!r} in climatology file {str(path)!r} has no 'lev' "
                        f"dimension (dims {data.dims}); a vertical variable is (lev, lat, lon)."
                    )
                spatial = [d for d in data.dims if d != "lev"][-2:]
                data = data.isel(lev=index).transpose(..., "lev", *spatial)
                field = self._field(data, path, v, extra=1)
                out += list(field)
        return out

    def _field(self, data: xr.DataArray, path: Path, name: str, extra: int = 0) -> np.ndarray:
        """Values ``(..., H, W)`` with leading length-1 dims dropped and the grid checked."""
        values = np.asarray(data.values)
        while values.ndim > 2 + extra and values.shape[0] == 1:
            values = values[0]
        if values.ndim != 2 + extra:
            raise DataError(
                f"Variable {name!r} in climatology file {str(path)!r} has shape {data.shape} "
                f"(dims {data.dims}); expected {'(lev, ' if extra else '('}lat, lon)."
            )
        h, w = values.shape[-2:]
        H, W = self.grid
        if (h, w) == (H + 1, W):  # MERRA-2's 361 latitudes for a 360-row model
            values = values[..., :H, :]
        elif (h, w) != (H, W):
            raise DataError(
                f"Variable {name!r} in climatology file {str(path)!r} is on a {h} x {w} grid; "
                f"the model takes {H} x {W} (or one latitude more, dropped). Regrid the "
                "climatology to the model's grid."
            )
        return values


def _open(path: Path) -> xr.Dataset:
    import xarray as xr

    if not path.is_file():
        raise DataError(
            f"Climatology file {str(path)!r} does not exist; the climatology needs a file for "
            "every day of year (1-365) and hour of the target times."
        )
    try:
        return xr.open_dataset(path)
    except Exception as e:  # netCDF / HDF5 backends raise many types for corrupt files
        raise DataError(
            f"Could not read climatology file {str(path)!r} ({type(e).__name__}: {e})."
        ) from e


def _variable(ds: xr.Dataset, name: str, path: Path) -> str:
    if name not in ds.data_vars:
        raise DataError(
            f"Climatology file {str(path)!r} lacks variable {name!r}; it has "
            f"{sorted(map(str, ds.data_vars))}. Use files holding every variable of the config."
        )
    return name


def _level_name(level: float) -> str:
    """``72.0`` -> ``"72"``, ``0.5`` -> ``"0.5"``."""
    return str(int(level)) if float(level).is_integer() else str(level)
