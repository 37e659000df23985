"""Global downscaling (METHOD.md §4): coarse fields in, the fine field out.

Why this task: it asks a forecasting backbone to do something it was not trained for -- add the
small scales that a coarse (here 4x coarser) analysis lacks -- while the input already holds the
large scales. The paper's set-up is kept: the input is two coarse steps ``(t, t + 6 h)``
upsampled bilinearly to the fine grid and fed as the backbone's two history steps; the target is
the fine field at ``t + 6 h``. With the ``tiny`` backbone's residual mode the prediction is the
upsampled coarse ``t + 6 h`` field plus a learned correction, so the classic bilinear baseline is
where fine-tuning starts from. Loss: ``0.25 · MSE(surface) + 1.0 · MSE(atmos)`` in normalised
units (each term the mean over variables, and pressure levels, of the per-channel MSE);
normalisation uses the backbone's own statistics, so the pretrained model sees inputs scaled as
in pretraining. No variable is new, so the task installs nothing (an empty head).

Two kinds of data:

* ``source="world"`` (default): the embedded world's fine grid (32 x 64) as truth and its
  conservatively coarsened grid (8 x 16, :func:`open_world` with ``resolution="coarse"``) as the
  coarse analysis; all surface (2t, 10u, 10v, msl) and atmospheric (z, u, v, t, q at the world's
  levels) variables are learned. Held in memory; splits are contiguous time blocks.
* ``data=`` a real store (:class:`~wpeft.data.source.DataSource`: path, variables, levels,
  region, periods, step, statics, ``fill_missing``) holding the FINE analysis, with the coarse one
  either from ``coarse_path=`` -- a second store that the same description applies to (variables,
  levels, region and periods), e.g. WeatherBench's 5.625° files for its 1.40625° ones -- or
  from ``coarse_factor=`` (the fine fields coarsened conservatively by that factor,
  :func:`~wpeft.data.regrid.coarsen_conservative`). The paper's set-up::

      data: {path: .../1.40625deg.zarr, levels: [50, 100, ..., 1000],
             variables: [2m_temperature, 10m_u_component_of_wind, 10m_v_component_of_wind,
                         temperature, u_component_of_wind, v_component_of_wind,
                         specific_humidity, geopotential],
             train: [1979-01-01, 2015-12-31], val: [2016-01-01, 2016-12-31],
             test: [2017-01-01, 2018-12-31]}
      coarse_path: .../5.625deg.zarr

Real data, decided once here:

* **What is learned**: ``data.variables`` (WeatherBench2 names) must be surface or atmospheric
  variables the backbone embeds; by default every one of those the fine store has (for the
  paper's set-up list them, as above: it leaves out mean sea level pressure).
* **Inputs**: every variable the backbone embeds is read -- surface and atmospheric ones from the
  coarse store (or the fine store, to be coarsened), statics (lsm, z, slt) on the fine grid from
  the fine store or ``data.statics``. One that is absent is refused by name, unless
  ``data.fill_missing`` (then it is fed as a constant field at the backbone's normalisation mean,
  :class:`~wpeft.tasks.common.ConstantInputs`, and listed under ``data.filled`` in
  :meth:`Downscaling.describe`). Levels: ``data.levels``, else the backbone's (those it has
  statistics for).
* **Grids**: the fine grid (after ``data.region``) must fit the patch size (and be divisible by
  ``coarse_factor``); the coarse grid of ``coarse_path`` must nest in it: the same integer factor
  N >= 2 both ways, each coarse centre the mean of its N fine centres -- or, for grids regridded
  by sampling (WeatherBench's longitudes start at 0° at every resolution), the first of them.
  Both are checked at setup and refused naming the grids and the region.
* **Times**: a sample is a time ``t + 6 h`` that the fine store has, with ``t`` and ``t + 6 h``
  in the coarse one, so any step dividing 6 hours works (an hourly store lags 6 steps;
  ``data.time_step_hours`` thins it) and gaps only drop the samples that straddle them. Splits
  follow ``data``'s periods (a sample belongs to the period holding ``t`` and ``t + 6 h``), else
  ``split_fractions`` of the time-ordered samples.
* **Memory**: the stores stay lazy (:class:`~wpeft.data.batch.LazyVariable`): a batch reads only
  its ``2 B`` coarse steps (and ``B`` fine targets; with ``coarse_factor`` the fine ``t + 6 h``
  step it reads as input is the target, so each step is read once). Coarsening and upsampling are
  done per batch on the read tensors, with indices and weights computed once
  (:func:`~wpeft.data.regrid.bilinear_plan`): about four gathers and six multiply-adds per fine
  grid point and channel, small next to the backbone. Bilinear upsampling is periodic in
  longitude on a global grid and clamped at the edges of a regional one.
* **NaN/inf**: with ``data.check_finite`` (default) the fine and coarse data of every sample's
  times are read once at setup, in chunks, and a non-finite value is refused naming the
  variable -- before training. Batches are checked again as they are read.

The helpers the tasks share (splits, batching, statistics, new variables) live in
:mod:`wpeft.tasks.common`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import xarray as xr
from aurora import normalisation as aurora_norm
from torch import nn

from wpeft.backbones.aurora_adapter import WpeftAurora, norm_key
from wpeft.data.batch import Fields, wb2_name
from wpeft.data.era5 import check_finite
from wpeft.data.headline import BUILTIN_HEADLINES
from wpeft.data.regrid import bilinear_plan, cell_area_weights, upsample_bilinear
from wpeft.data.schema import VARIABLES
from wpeft.data.source import DataSource, open_source, open_store
from wpeft.data.world import WorldConfig, open_world
from wpeft.errors import ConfigError, DataError
from wpeft.metrics import rmse
from wpeft.tasks.base import Split, Task, TaskBatch, TaskConfig, register_task
from wpeft.tasks.common import (
    ATMOS_VARS,
    SIX_HOURS,
    SPLITS,
    STATIC_VARS,
    SURF_VARS,
    ConstantInputs,
    TaskHead,
    backbone_inputs,
    channel_std,
    check_fractions,
    check_patch_grid,
    check_split,
    coerce_world,
    index_batches,
    make_batch,
    per_level_scores,
    require_stats,
    split_by_time,
    split_samples,
    time_step,
    var_attrs,
)

__all__ = ["Downscaling", "DownscalingConfig"]


@dataclass
class DownscalingConfig(TaskConfig):
    """Settings of the downscaling task: the embedded world (default) or ``data=`` a real store
    with ``coarse_path=`` or ``coarse_factor=`` (see the module docstring)."""

    #: Embedded world to downscale (``source="world"``); its ``coarse_factor`` sets the coarse grid.
    world: WorldConfig = field(default_factory=WorldConfig)
    #: With ``data``: a second store holding the COARSE analysis (``data`` is the fine one); the
    #: description in ``data`` (variables, levels, region, periods, step) applies to both.
    coarse_path: str | None = None
    #: With ``data`` and no ``coarse_path``: make the coarse analysis by conservative coarsening
    #: of the fine store by this factor (4: 1.40625° -> 5.625°, 0.25° -> 1°).
    coarse_factor: int | None = None
    #: Train, val, test fractions of the time-ordered samples (contiguous blocks); used when
    #: ``data`` gives no periods.
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    #: Loss weight of the surface MSE term (paper: 0.25).
    surface_weight: float = 0.25
    #: Loss weight of the atmospheric MSE term (paper: 1.0).
    atmos_weight: float = 1.0
    #: Cache directory of the embedded world (default: ``$WPEFT_CACHE_DIR`` or the user cache).
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source == "era5-uk":
            raise ConfigError(
                "source='era5-uk' is gone: describe the file as data= (e.g. {path: FILE, region: "
                "[50.25, 58.0, 350.0, 359.75], fill_missing: true}) with coarse_factor=4."
            )
        if self.source not in ("world", "data"):
            raise ConfigError(
                f"source={self.source!r} must be 'world' (the embedded world) or 'data' (a real "
                "store, set by data=)."
            )
        self.world = coerce_world(self.world)
        self.split_fractions = check_fractions(self.split_fractions)  # type: ignore[assignment]
        for name in ("surface_weight", "atmos_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name}={value!r} must be a non-negative number.")
        if self.surface_weight == 0 and self.atmos_weight == 0:
            raise ConfigError("surface_weight and atmos_weight are both 0: nothing to learn.")
        if self.coarse_path is not None and (
            not isinstance(self.coarse_path, str) or not self.coarse_path.strip()
        ):
            raise ConfigError(f"coarse_path={self.coarse_path!r} must be a path or URL.")
        f = self.coarse_factor
        if f is not None and (not isinstance(f, int) or isinstance(f, bool) or f < 2):
            raise ConfigError(f"coarse_factor={f!r} must be an integer >= 2.")
        given = [n for n in ("coarse_path", "coarse_factor") if getattr(self, n) is not None]
        if self.data is None and given:
            raise ConfigError(
                f"{' and '.join(given)} apply to data= (a real store); the embedded world's "
                "coarse grid is set by world.coarse_factor."
            )
        if self.data is not None and len(given) != 1:
            raise ConfigError(
                "data= needs the coarse analysis from exactly one of coarse_path= (a second store "
                "on the coarse grid, e.g. WeatherBench 5.625deg for 1.40625deg data) or "
                f"coarse_factor= (coarsen data conservatively by it); got {given or 'neither'}."
            )


class _Regrid:
    """Per batch: the coarse fields bilinearly upsampled to the fine grid, coarsening the fine
    fields first when the coarse analysis is made by ``coarse_factor``.

    Tensors ``(..., h, w)`` (or ``(..., H, W)`` with a factor) in, ``(..., H, W)`` out, float32.
    Indices and weights come from :func:`~wpeft.data.regrid.bilinear_plan`, the same as
    :func:`~wpeft.data.regrid.upsample_bilinear`; the coarsening is
    :func:`~wpeft.data.regrid.coarsen_conservative`'s area-weighted block mean.
    """

    def __init__(
        self,
        coarse_lat: np.ndarray,
        coarse_lon: np.ndarray,
        fine_lat: np.ndarray,
        fine_lon: np.ndarray,
        factor: int | None,
    ) -> None:
        plan = bilinear_plan(coarse_lat, coarse_lon, fine_lat, fine_lon)
        self.j0, self.j1, self.i0, self.i1 = (
            torch.as_tensor(np.asarray(a, dtype=np.int64))
            for a in (plan.j0, plan.j1, plan.i0, plan.i1)
        )
        self.wy = torch.as_tensor(plan.wy, dtype=torch.float32).view(-1, 1)
        self.wx = torch.as_tensor(plan.wx, dtype=torch.float32)
        self.periodic = plan.periodic
        self.factor = factor
        if factor:
            area = torch.as_tensor(cell_area_weights(fine_lat), dtype=torch.float32)
            self.area = area.view(-1, factor, 1, 1)  # (h, f, 1, 1)
            self.area_sum = self.area.sum(dim=1) * factor  # (h, 1, 1)

    def coarsen(self, x: torch.Tensor) -> torch.Tensor:
        f = self.factor
        *lead, H, W = x.shape
        blocks = x.reshape(*lead, H // f, f, W // f, f)
        return (blocks * self.area).sum(dim=(-3, -1)) / self.area_sum.view(-1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.factor:
            x = self.coarsen(x)
        rows0, rows1 = x[..., self.j0, :], x[..., self.j1, :]
        top = rows0[..., self.i0] * (1 - self.wx) + rows0[..., self.i1] * self.wx
        bottom = rows1[..., self.i0] * (1 - self.wx) + rows1[..., self.i1] * self.wx
        return top * (1 - self.wy) + bottom * self.wy


@dataclass
class _Data:
    """Everything the task draws batches from.

    Attributes:
        inputs: The coarse analysis: upsampled in memory (world), or a store's surface and
            atmospheric fields read per batch (``regrid`` then puts them on the fine grid).
        truth: The fine grid: its coordinates, times, statics and (unless
            ``targets_in_inputs``) the target fields.
        targets: WB2 names of the learned variables.
        levels: Pressure levels of the atmospheric fields.
        first, second: ``(S,)`` indices into ``inputs`` of each sample's ``t`` and ``t + 6 h``.
        target: ``(S,)`` indices into ``truth`` of each sample's ``t + 6 h``.
        splits: Positions into the samples per split.
        regrid: Per-batch coarsening/upsampling; ``None`` when ``inputs`` are on the fine grid.
        targets_in_inputs: ``coarse_factor``: the targets are the fine ``t + 6 h`` step of the
            inputs (read once per batch).
        record: What :meth:`Downscaling.describe` records about real data.
        scan: The up-front NaN/inf pass over real data, run once by ``setup`` (``None``: done,
            or ``check_finite`` off).
    """

    inputs: Fields
    truth: Fields
    targets: tuple[str, ...]
    levels: tuple[int, ...]
    first: np.ndarray
    second: np.ndarray
    target: np.ndarray
    splits: dict[Split, np.ndarray]
    regrid: _Regrid | None = None
    targets_in_inputs: bool = False
    record: dict[str, Any] | None = None
    scan: Callable[[], None] | None = None


@register_task
class Downscaling(Task):
    """Coarse (t, t + 6 h) upsampled -> fine t + 6 h; see the module docstring."""

    name: ClassVar[str] = "downscaling"
    Config: ClassVar[type[TaskConfig]] = DownscalingConfig
    headline: ClassVar[tuple[str, ...]] = BUILTIN_HEADLINES["downscaling"]
    num_prompts: ClassVar[int] = 30  # TADP prompt tokens (the paper's P for this task)
    config: DownscalingConfig

    def __init__(self, config: TaskConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._data: _Data | None = None
        self._data_key: tuple | None = None  # the backbone inputs real data were read for
        self._std: dict[str, float] | None = None  # normalisation std per stats key
        self._fill: ConstantInputs | None = None  # constant inputs a real store lacks (opt-in)

    # --- data -------------------------------------------------------------------------------

    @property
    def data(self) -> _Data:
        if self._data is None:
            if self.config.data is not None:
                raise ConfigError(
                    f"Call task.setup(model) first: the backbone decides which inputs and levels "
                    f"are read from {self.config.data.path}."
                )
            self._data = self._load_world()
        return self._data

    def _load_world(self) -> _Data:
        cfg = self.config
        cache = Path(cfg.cache_dir) if cfg.cache_dir else None
        fine = open_world(cfg.world, cache_dir=cache, progress=False)
        coarse = open_world(cfg.world, resolution="coarse", cache_dir=cache, progress=False)
        names = [wb2_name(v, "surface") for v in SURF_VARS] + [
            wb2_name(v, "atmos") for v in ATMOS_VARS
        ]
        up = upsample_bilinear(coarse[names], fine)
        inputs = Fields.from_dataset(up, surf_vars=SURF_VARS, atmos_vars=ATMOS_VARS)
        truth = Fields.from_dataset(
            fine, surf_vars=SURF_VARS, atmos_vars=ATMOS_VARS, static_vars=STATIC_VARS
        )
        step = time_step(truth.times)
        lag = SIX_HOURS / step
        if lag != int(lag) or lag < 1:
            raise DataError(f"The data's time step ({step}) does not divide 6 hours.")
        lag = int(lag)
        samples = np.arange(lag, len(truth), dtype=np.int64)
        splits = split_by_time(samples - lag, samples, cfg.split_fractions)
        return _Data(
            inputs=inputs,
            truth=truth,
            targets=tuple(names),
            levels=truth.levels,
            first=samples - lag,
            second=samples,
            target=samples,
            splits=splits,
        )

    def _load_source(self, model: WpeftAurora) -> _Data:
        """Open the real store(s) lazily and check everything that can be checked before
        training: variables, levels, region, periods, grids, times and (opt-out) NaN/inf."""
        cfg = self.config
        src: DataSource = cfg.data  # type: ignore[assignment]
        embedded = backbone_inputs(model)
        dynamic = embedded["surface"] + embedded["atmos"]
        statics = embedded["static"]
        targets = _targets(src, dynamic)
        others = tuple(n for n in dynamic if n not in targets)
        levels = tuple(src.levels) if src.levels else _backbone_levels(model)
        two = cfg.coarse_path is not None
        fine, lack_fine = open_source(
            src, required=targets, optional=statics if two else others + statics, levels=levels
        )
        if two:
            coarse, lack_coarse = open_source(
                src, required=targets, optional=others, levels=levels, path=cfg.coarse_path
            )
        else:
            coarse, lack_coarse = fine, ()
        lacking = set(lack_fine) | set(lack_coarse)
        filled = tuple(n for n in dynamic + statics if n in lacking)
        factor = cfg.coarse_factor
        _check_fine_grid(model, fine, src, factor or _size_ratio(fine, coarse) or 1)
        if two:
            factor = _nest_factor(fine, coarse)
            coarse_lat, coarse_lon = coarse["latitude"].values, coarse["longitude"].values
        else:
            coarse_lat = fine["latitude"].values.reshape(-1, factor).mean(axis=1)
            coarse_lon = fine["longitude"].values.reshape(-1, factor).mean(axis=1)
        first, second, target = _pair_times(coarse, fine)
        starts = coarse["time"].values[first]
        ends = fine["time"].values[target]
        splits = split_samples(starts, ends, cfg)
        used = np.unique(np.concatenate(list(splits.values())))
        present = tuple(n for n in dynamic if n in coarse.data_vars)

        def scan() -> None:  # the one up-front pass over the data (setup runs it last)
            _check_finite_once(coarse[list(present)], np.concatenate([first[used], second[used]]))
            if two:
                _check_finite_once(fine[list(targets)], target[used])

        def aurora(names: Sequence[str], kind: str) -> tuple[str, ...]:
            return tuple(VARIABLES[n].aurora for n in names if VARIABLES[n].kind == kind)

        static_here = [n for n in statics if n in fine.data_vars]
        inputs = Fields.from_dataset(
            coarse,
            surf_vars=aurora(present, "surface"),
            atmos_vars=aurora(present, "atmos"),
            lazy=True,
        )
        truth = Fields.from_dataset(
            fine,
            surf_vars=aurora(targets, "surface") if two else (),
            atmos_vars=aurora(targets, "atmos") if two else (),
            static_vars=aurora(static_here, "static"),
            lazy=True,
        )
        fine_lat, fine_lon = fine["latitude"].values, fine["longitude"].values
        regrid = _Regrid(coarse_lat, coarse_lon, fine_lat, fine_lon, None if two else factor)
        step = (
            np.diff(fine["time"].values).min() / np.timedelta64(1, "h")
            if fine.sizes["time"] > 1
            else None
        )
        record = {
            "path": fine.attrs["source_path"],
            "coarse_path": coarse.attrs["source_path"] if two else None,
            "coarse_factor": int(factor),  # type: ignore[arg-type]
            "variables": list(targets),
            "levels": list(levels),
            "grid": [int(fine_lat.size), int(fine_lon.size)],
            "coarse_grid": [int(np.size(coarse_lat)), int(np.size(coarse_lon))],
            "region": list(src.region) if src.region is not None else None,
            "time_step_hours": float(step) if step is not None else None,
            "periodic_longitude": regrid.periodic,
            "filled": list(filled),
        }
        return _Data(
            inputs=inputs,
            truth=truth,
            targets=targets,
            levels=levels,
            first=first,
            second=second,
            target=target,
            splits=splits,
            regrid=regrid,
            targets_in_inputs=not two,
            record=record,
            scan=scan if src.check_finite else None,
        )

    # --- the Task API -----------------------------------------------------------------------

    def setup(self, model: WpeftAurora) -> nn.Module:
        """Read the data (real stores: opened, checked and -- unless ``check_finite`` is off --
        scanned for NaN/inf once), take the normalisation statistics from the backbone and build
        the constant inputs a real store lacks (``fill_missing``). No new parameters: returns an
        empty :class:`TaskHead`."""
        if self.config.data is not None:
            c = model.config
            key = (
                tuple(c.surf_vars),
                tuple(c.atmos_vars),
                tuple(c.static_vars),
                _backbone_levels(model),
            )
            if self._data is None or self._data_key != key:
                self._data, self._data_key = self._load_source(model), key
        data = self.data
        check_patch_grid(model, *data.truth.grid)
        std: dict[str, float] = {}
        for name in data.targets:
            spec = VARIABLES[name]
            if spec.kind == "surface":
                std[norm_key(spec.aurora)] = require_stats(model, spec.aurora)[1]
            else:
                for lv in data.levels:
                    std[norm_key(spec.aurora, lv)] = require_stats(model, spec.aurora, lv)[1]
        self._std = std
        filled = data.record["filled"] if data.record else []
        self._fill = ConstantInputs(model, filled, data.levels) if filled else None
        if data.scan is not None:  # last: the only step that reads the data
            data.scan()
            data.scan = None
        return TaskHead()

    def num_samples(self, split: Split) -> int:
        return int(self.data.splits[check_split(split)].size)

    def batches(
        self,
        split: Split,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool | None = None,
        shard: tuple[int, int] | None = None,
    ) -> Iterator[TaskBatch]:
        """Batches of ``split``. Inputs: surface ``(B, 2, H, W)``, atmos ``(B, 2, C, H, W)``;
        targets (fine ``t + 6 h``): surface ``(B, H, W)``, atmos ``(B, C, H, W)``, physical."""
        data = self.data
        positions = data.splits[check_split(split)]
        shuffle = split == "train" if shuffle is None else shuffle
        for chunk in index_batches(positions, batch_size, shuffle=shuffle, seed=seed, shard=shard):
            yield self._batch(chunk)

    def _batch(self, rows: np.ndarray) -> TaskBatch:
        data = self.data
        window = torch.stack(
            [torch.as_tensor(data.first[rows]), torch.as_tensor(data.second[rows])], dim=1
        )  # (B, 2): t, t + 6 h
        surf = {k: v[window] for k, v in data.inputs.surf.items()}
        atmos = {k: v[window] for k, v in data.inputs.atmos.items()}
        wanted = set(data.targets)
        if data.targets_in_inputs:  # fine fields read as inputs: the t + 6 h step is the truth
            truth = {wb2_name(k, "surface"): v[:, 1] for k, v in surf.items()}
            truth |= {wb2_name(k, "atmos"): v[:, 1] for k, v in atmos.items()}
            truth = {k: v for k, v in truth.items() if k in wanted}
        else:
            idx = torch.as_tensor(data.target[rows])
            truth = {wb2_name(k, "surface"): v[idx] for k, v in data.truth.surf.items()}
            truth |= {wb2_name(k, "atmos"): v[idx] for k, v in data.truth.atmos.items()}
        if data.regrid is not None:
            surf = {k: data.regrid(v) for k, v in surf.items()}
            atmos = {k: data.regrid(v) for k, v in atmos.items()}
        static = dict(data.truth.static)
        if self._fill is not None:
            surf, atmos, static = self._fill.complete(
                surf, atmos, static, leading=(len(rows), 2), grid=data.truth.grid
            )
        times = data.truth.times[data.target[rows]]
        inputs = make_batch(surf, atmos, static, data.truth.lat, data.truth.lon, data.levels, times)
        return TaskBatch(inputs=inputs, targets=truth, times=times)

    def predict(self, model: WpeftAurora, batch: TaskBatch) -> dict[str, torch.Tensor]:
        """Fine fields at ``t + 6 h`` keyed like ``batch.targets``: surface ``(B, H, W)``,
        atmos ``(B, C, H, W)``, physical units."""
        out = model(batch.inputs)
        pred: dict[str, torch.Tensor] = {}
        for k, v in out.surf_vars.items():
            name = wb2_name(k, "surface")
            if name in batch.targets:
                pred[name] = v[:, 0]
        for k, v in out.atmos_vars.items():
            name = wb2_name(k, "atmos")
            if name in batch.targets:
                pred[name] = v[:, 0]
        return pred

    def loss(self, prediction: dict[str, torch.Tensor], batch: TaskBatch) -> torch.Tensor:
        """``surface_weight · MSE(surface) + atmos_weight · MSE(atmos)`` in normalised units;
        each MSE is the mean over its channels (variables, and levels) of the per-channel MSE."""
        std = self._require_std()
        surf_terms, atmos_terms = [], []
        for name, target in batch.targets.items():
            spec = VARIABLES[name]
            p = prediction[name]
            y = target.to(p.device)
            if spec.kind == "surface":
                surf_terms.append(((p - y) / std[norm_key(spec.aurora)]).pow(2).mean())
            else:
                s = channel_std([std[norm_key(spec.aurora, lv)] for lv in self.data.levels], p)
                atmos_terms.extend(((p - y) / s).pow(2).mean(dim=(0, 2, 3)).unbind())
        loss = prediction[next(iter(batch.targets))].new_zeros(())
        if surf_terms:
            loss = loss + self.config.surface_weight * torch.stack(surf_terms).mean()
        if atmos_terms:
            loss = loss + self.config.atmos_weight * torch.stack(atmos_terms).mean()
        return loss

    def _require_std(self) -> dict[str, float]:
        if self._std is None:
            raise ConfigError(
                "Call task.setup(model) first: the loss uses the backbone's statistics."
            )
        return self._std

    @torch.no_grad()
    def evaluate(
        self, model: WpeftAurora, split: Split = "test", batch_size: int = 8
    ) -> tuple[xr.Dataset, dict[str, float]]:
        """Predictions and targets of ``split`` and latitude-weighted RMSEs.

        Returns:
            A Dataset on (``time``, [``level``,] ``latitude``, ``longitude``) with ``<wb2 name>``
            (prediction) and ``<wb2 name>_target`` per learned variable, and scores
            ``"rmse/<name>"`` (``"rmse/temperature_850"`` for levels) plus the bilinear
            baseline ``"rmse_bilinear/<name>"``.
        """
        self._require_std()
        data = self.data
        was_training = model.training
        model.eval()
        preds: dict[str, list[np.ndarray]] = {}
        targets: dict[str, list[np.ndarray]] = {}
        bilinear: dict[str, list[np.ndarray]] = {}
        times = []
        try:
            for batch in self.batches(split, batch_size, shuffle=False):
                pred = self.predict(model, batch)
                for name, y in batch.targets.items():
                    spec = VARIABLES[name]
                    src = (
                        batch.inputs.surf_vars
                        if spec.kind == "surface"
                        else batch.inputs.atmos_vars
                    )
                    preds.setdefault(name, []).append(pred[name].float().cpu().numpy())
                    targets.setdefault(name, []).append(y.numpy())
                    bilinear.setdefault(name, []).append(src[spec.aurora][:, -1].numpy())
                times.append(np.asarray(batch.times))
        finally:
            model.train(was_training)
        coords = {
            "time": np.concatenate(times),
            "latitude": data.truth.lat.numpy().astype(np.float64),
            "longitude": data.truth.lon.numpy().astype(np.float64),
        }
        if any(VARIABLES[n].kind == "atmos" for n in data.targets):
            coords["level"] = np.asarray(data.levels, dtype=np.int64)
        variables: dict[str, xr.DataArray] = {}
        scores: dict[str, float] = {}
        for name, pred_parts in preds.items():
            dims = ("time", "latitude", "longitude")
            if VARIABLES[name].kind == "atmos":
                dims = ("time", "level", "latitude", "longitude")
            p = xr.DataArray(
                np.concatenate(pred_parts), dims=dims, attrs=var_attrs(name, "(downscaled)")
            )
            y = xr.DataArray(
                np.concatenate(targets[name]), dims=dims, attrs=var_attrs(name, "(fine truth)")
            )
            b = xr.DataArray(np.concatenate(bilinear[name]), dims=dims, attrs=var_attrs(name))
            variables[name], variables[f"{name}_target"] = p, y
            ds_tmp = xr.Dataset({"p": p, "y": y, "b": b}, coords=coords)
            scores |= per_level_scores("rmse", name, rmse(ds_tmp["p"], ds_tmp["y"]))
            scores |= per_level_scores("rmse_bilinear", name, rmse(ds_tmp["b"], ds_tmp["y"]))
        ds = xr.Dataset(variables, coords=coords, attrs={"task": self.name, "split": split})
        return ds, scores

    def describe(self) -> dict[str, Any]:
        """The config, and once the data are read: samples per split, the fine grid and, for
        real data, ``data`` = paths, learned variables, levels, grids, time step and the inputs
        fed as constants (``filled``, empty when none)."""
        out = super().describe()
        if self._data is not None:
            out["samples"] = {s: self.num_samples(s) for s in SPLITS}
            out["grid"] = list(self._data.truth.grid)
            if self._data.record is not None:
                out["data"] = {**self._data.record, "samples": out["samples"]}
        return out


# --- real data ---------------------------------------------------------------------------------


def _targets(source: DataSource, dynamic: Sequence[str]) -> tuple[str, ...]:
    """The learned variables: ``source.variables``, else the backbone's surface and atmospheric
    variables that the fine store has."""
    if source.variables is not None:
        foreign = [n for n in source.variables if n not in dynamic]
        if foreign:
            raise ConfigError(
                f"data variables {foreign} are not among the backbone's surface and atmospheric "
                f"variables {list(dynamic)}; downscaling learns those (it adds no new heads)."
            )
        return tuple(source.variables)
    have = set(map(str, open_store(source.path).data_vars))
    targets = tuple(n for n in dynamic if n in have)
    if not targets:
        raise DataError(
            f"{source.path} holds none of the backbone's variables {list(dynamic)} (it has "
            f"{sorted(have)}); point data.path at a store with them."
        )
    return targets


def _backbone_levels(model: WpeftAurora) -> tuple[int, ...]:
    """Pressure levels the backbone has statistics for, for every atmospheric variable (its own
    statistics, else Aurora's table), in the order the statistics list them."""
    keys = list(model.norm_mean) or list(aurora_norm.locations)
    found: dict[str, list[int]] = {v: [] for v in model.config.atmos_vars}
    for key in keys:
        name, _, level = key.rpartition("_")
        if name in found and level.isdigit():
            found[name].append(int(level))
    if not found:
        return ()
    first = next(iter(found.values()))
    return tuple(lv for lv in dict.fromkeys(first) if all(lv in x for x in found.values()))


def _grid_text(ds: xr.Dataset) -> str:
    lat, lon = ds["latitude"].values, ds["longitude"].values
    return (
        f"{ds.attrs.get('source_path', 'the data')} ({lat.size} x {lon.size}, latitude "
        f"{lat[0]:g}..{lat[-1]:g}, longitude {lon[0]:g}..{lon[-1]:g})"
    )


def _size_ratio(fine: xr.Dataset, coarse: xr.Dataset) -> int | None:
    """The integer factor between the grids' sizes (the same both ways), or ``None``."""
    H, W = fine.sizes["latitude"], fine.sizes["longitude"]
    h, w = coarse.sizes["latitude"], coarse.sizes["longitude"]
    if h and w and not H % h and not W % w and H // h == W // w:
        return H // h
    return None


def _nest_factor(fine: xr.Dataset, coarse: xr.Dataset) -> int:
    """The factor N by which the coarse grid nests in the fine one, or a one-line DataError.

    Nesting: ``N >= 2``, the same both ways, and on each axis every coarse centre is the mean of
    its N fine centres (conservative coarsening: cells made of whole blocks) or the first of
    them (grids regridded by sampling: WeatherBench's longitudes start at 0° at every
    resolution), within 1e-3 fine spacings.
    """
    factor = _size_ratio(fine, coarse)
    ok = factor is not None and factor >= 2
    if ok:
        for coord in ("latitude", "longitude"):
            f = np.asarray(fine[coord].values, dtype=np.float64).reshape(-1, factor)
            c = np.asarray(coarse[coord].values, dtype=np.float64)
            spacing = float(np.abs(np.diff(f.ravel())).min()) if f.size > 1 else 1.0
            tol = 1e-3 * spacing
            if not (
                np.allclose(f.mean(axis=1), c, rtol=0, atol=tol)
                or np.allclose(f[:, 0], c, rtol=0, atol=tol)
            ):
                ok = False
    if not ok:
        raise DataError(
            f"The coarse grid {_grid_text(coarse)} does not nest in the fine grid "
            f"{_grid_text(fine)}: each coarse cell must be a block of N x N fine cells (one "
            "integer N >= 2, its centre the mean or the first of theirs). Use a coarse store made "
            "from the fine grid, region edges on coarse cell edges, or coarse_factor= instead."
        )
    return int(factor)  # type: ignore[arg-type]


def _check_fine_grid(model: WpeftAurora, fine: xr.Dataset, source: DataSource, factor: int) -> None:
    """The fine grid fits the patch size (and the coarsening factor), or a DataError that names
    the region and suggests one that fits."""
    lat, lon = fine["latitude"].values, fine["longitude"].values
    H, W = lat.size, lon.size
    patch = model.patch_size
    reasons = []
    try:
        check_patch_grid(model, H, W)
    except DataError:
        reasons.append(
            f"the backbone's patch size {patch} needs a width that is a multiple of {patch}, a "
            f"height that is a multiple (or one more) and at least 3 x 3 patches"
        )
    if H % factor or W % factor:
        reasons.append(f"the coarse factor {factor} must divide both sizes")
    if not reasons:
        return
    where = fine.attrs.get("source_path", source.path)
    cut = f" cut to data.region {list(source.region)}" if source.region is not None else ""
    block = math.lcm(patch, factor)
    h, w = H // block * block, W // block * block
    if h < 3 * patch or w < 3 * patch:
        fix = (
            f"Set data.region to a larger box: at least {max(3 * patch, block)} points each way, "
            f"in multiples of {block}."
        )
    else:
        south = (lat[h - 1] + lat[h]) / 2 if h < H else lat[-1]
        east = (lon[w - 1] + lon[w]) / 2 if w < W else lon[-1]
        box = [round(float(x), 6) for x in (south, lat[0], lon[0], east)]
        fix = (
            f"Set data.region to a box of multiples of {block} points each way, e.g. {box} "
            f"({h} x {w} points)."
        )
    raise DataError(
        f"The fine grid {H} x {W} of {where}{cut} does not fit: {'; '.join(reasons)}. {fix}"
    )


def _pair_times(coarse: xr.Dataset, fine: xr.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Samples: fine times ``T`` whose ``T - 6 h`` and ``T`` the coarse data have.

    Returns ``(first, second, target)``: indices of ``T - 6 h`` and ``T`` into the coarse times
    and of ``T`` into the fine times, ordered by ``T``.
    """
    for ds in (fine, coarse):
        times = ds["time"].values
        if times.size > 1:
            step = np.diff(times).min()
            if SIX_HOURS % step != np.timedelta64(0, "ns"):
                raise DataError(
                    f"{ds.attrs.get('source_path', 'the data')} has a time step of "
                    f"{step / np.timedelta64(1, 'h'):g} h, which does not divide 6 hours; the "
                    "inputs are 6 hours apart. Set data.time_step_hours to 1, 2, 3 or 6."
                )
    c = coarse["time"].values.astype("datetime64[ns]")
    f = fine["time"].values.astype("datetime64[ns]")

    def find(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.clip(np.searchsorted(c, values), 0, max(c.size - 1, 0))
        return pos, (c.size > 0) & (c[pos] == values)

    second, has_second = find(f)
    first, has_first = find(f - SIX_HOURS.astype("timedelta64[ns]"))
    ok = has_first & has_second
    if not ok.any():
        raise DataError(
            f"No sample: no time T of {fine.attrs.get('source_path')} ({f[0] if f.size else '-'} "
            f".. {f[-1] if f.size else '-'}) has T - 6 h and T in "
            f"{coarse.attrs.get('source_path')} ({c[0] if c.size else '-'} .. "
            f"{c[-1] if c.size else '-'}). Give stores that share 6-hourly times."
        )
    target = np.nonzero(ok)[0].astype(np.int64)
    return first[ok].astype(np.int64), second[ok].astype(np.int64), target


def _check_finite_once(ds: xr.Dataset, steps: np.ndarray) -> None:
    """One pass over the given time steps of ``ds``, in chunks of about 64 MB, refusing NaN/inf
    (:func:`~wpeft.data.era5.check_finite` names the variables)."""
    if not ds.data_vars:
        return
    sel = ds.isel(time=np.unique(steps))
    per_step = max(
        int(np.prod([n for d, n in sel[v].sizes.items() if d != "time"])) * sel[v].dtype.itemsize
        for v in sel.data_vars
    )
    chunk = max(1, (64 << 20) // max(per_step, 1))
    check_finite(sel.chunk({"time": chunk}))
