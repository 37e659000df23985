"""Regional precipitation (METHOD.md §4): 6-hour rain at +12/+24/+36 h over a region.

Why this task: precipitation is a variable the backbone never saw (the ``tiny`` backbone was
pretrained without ``tp``), sparse, skewed and non-negative -- the hardest kind of new output for a
foundation model -- and the region is a crop of the grid it was trained on, so positional
knowledge must transfer to a smaller domain.

Two sources of data:

* the embedded world (default): a ``crop_size`` crop (default 16 x 32, centred on ``crop_lat`` =
  45°N, western edge ``crop_lon`` = 0°E; moved inside the grid if it would leave it) of the fine
  world grid, held in memory;
* a real ERA5 store, ``data=DataSource(...)`` (the paper's set-up: ERA5 0.25°, the China box of
  240 x 240 points, e.g. ``region=(15.0, 74.75, 70.0, 129.75)``; bounds are inclusive). The region
  is ``data.region`` (``crop_*`` are ignored); the store is read lazily, batch by batch.

Inputs: two steps ``input_gap_hours`` apart (``t − 12 h``, ``t``) of every variable the backbone
embeds (surface 2t, 10u, 10v, msl; atmospheric z, u, v, t, q at the backbone's pressure levels or
``data.levels``; the statics lsm, z, slt), plus the precipitation history. Targets: the 6-hour
accumulation ``total_precipitation_6hr`` (mm) at ``t + 12 h``, ``t + 24 h``, ``t + 36 h``
(``leads_hours``).

Precipitation in a real store, in this order of preference:

* ``total_precipitation_6hr`` (WeatherBench2): read as is;
* ``total_precipitation`` (ARCO-ERA5 hourly): summed to 6 hours. ERA5's hourly value at ``t`` is
  the accumulation over the hour ending at ``t`` (ECMWF's documentation of ERA5 accumulations),
  so the 6-hour accumulation at ``t`` is the sum of the six hourly values at ``t − 5 h .. t``,
  i.e. rain over ``(t − 6 h, t]``: the trailing window WeatherBench2 uses for its own
  ``total_precipitation_6hr`` (a rolling sum labelled at its end). The sums are formed per batch
  (and lazily with dask for the statistics), from the hourly data, *before* any thinning:
  ``data.time_step_hours`` only chooses which times serve as inputs and targets.

``data.variables`` may name one of the two to choose; every other variable is the backbone's.

Units. The reader (:func:`wpeft.data.era5.open_era5`) converts by the store's ``units``
attribute (``m`` -> mm; WeatherBench2 and ARCO-ERA5 store metres). Before training the task
refuses precipitation

* whose units attribute is neither ``m`` nor ``mm`` after reading (e.g. ``kg m-2``, ``inches``);
* whose 6-hour accumulations over the training period are implausible for mm: a maximum below
  1 mm (metres labelled ``mm``, or no units attribute -- which the reader takes as mm -- on data
  in metres: ERA5's wettest 6 hours are far below 1 m, while any region's training period has some
  6 hours with more than 1 mm; a region that dry could not be scored by SEEPS either), a maximum
  above 1000 mm (mm labelled ``m``, i.e. multiplied by 1000 once too often) or a minimum below
  −0.1 mm (rounding aside, accumulations are not negative).

A percentile rule (e.g. the 99.9th percentile below 0.01) was not used: it needs a sort of the
whole training record, and in metres a wet region's 99.9th percentile (~0.02 m) passes it.

How it maps onto Aurora: the decoder predicts exactly the variables in the batch, one head each,
so each lead is a pseudo-variable ``"tp_12h"``, ``"tp_24h"``, ``"tp_36h"`` with a NEW embedding
kernel and a NEW decoder head (initialised as Aurora initialises its own). Each pseudo-variable
is fed the precipitation history ``(tp(t − 12 h), tp(t))``: that is how precipitation enters the
encoder (no separate ``"tp"`` input, which would need a fourth head that nothing trains), and with
the residual ``tiny`` backbone each output is ``tp(t)`` (persistence) plus a learned correction.
The pseudo-variables are normalised with the train split's ``tp`` statistics (plain
normalisation, as in the paper; no log transform; computed once, when the data are loaded)
registered in the backbone; the other variables keep the backbone's statistics. The backbone
also predicts its usual variables from the batch; they are ignored.

Loss: L1 on normalised precipitation, averaged over leads. Predictions are clipped at 0 in
:meth:`Precipitation.evaluate` (not in training, where the clip would kill gradients).
Scores: area-weighted RMSE per lead (``"rmse/total_precipitation_6hr_12h"``...), ACC against the
training period's mean and SEEPS with the training period's climatology (dry < 0.1 mm; points
with a dry fraction outside (0.1, 0.85) masked), and the same for the persistence baseline
(``"rmse_persistence/..."``); the Dataset keeps the fields.

Splits: ``data``'s periods when given (a sample belongs to a split when every time it touches,
``t − 12 h`` .. ``t + 36 h``, lies in its period; accumulations are labelled by the end of their
window), else contiguous time blocks (``split_fractions``, 70/15/15) from which samples reaching
into the previous block are dropped, so no time step serves two splits.

Real data are set up by :meth:`Precipitation.setup`, which needs the backbone (its inputs and
levels decide what is read): the store is opened, the region checked against the patch size, the
data checked for NaN (``data.check_finite``) and the units, and the statistics computed, before
anything trains. Inputs the store lacks are refused by name unless ``data.fill_missing`` (then
fed as constant fields at the backbone's normalisation mean and listed in :meth:`describe`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import dask
import numpy as np
import torch
import xarray as xr
from aurora import normalisation as aurora_norm
from torch import nn

from wpeft.backbones.aurora_adapter import WpeftAurora, norm_key
from wpeft.data.batch import Fields, LazyVariable
from wpeft.data.era5 import check_finite
from wpeft.data.headline import BUILTIN_HEADLINES
from wpeft.data.schema import regular_step, spec
from wpeft.data.source import DataSource, open_source, open_store
from wpeft.data.stats import compute_stats
from wpeft.data.world import WorldConfig, open_world
from wpeft.errors import ConfigError, DataError
from wpeft.metrics import acc, rmse, seeps, seeps_climatology
from wpeft.tasks.base import Split, Task, TaskBatch, TaskConfig, register_task
from wpeft.tasks.common import (
    ATMOS_VARS,
    SIX_HOURS,
    SPLITS,
    STATIC_VARS,
    SURF_VARS,
    ConstantInputs,
    TaskHead,
    add_variable,
    backbone_inputs,
    check_fractions,
    check_patch_grid,
    check_split,
    coerce_world,
    index_batches,
    make_batch,
    missing_inputs,
    refuse_fixed_grid,
    register_norm,
    split_samples,
    time_step,
    var_attrs,
)

__all__ = ["HOURLY", "TARGET", "Precipitation", "PrecipitationConfig"]

#: WB2 name of the predicted variable (6-hour accumulations, mm).
TARGET = "total_precipitation_6hr"
#: WB2 / ARCO-ERA5 name of hourly accumulations, summed to 6 hours by the task.
HOURLY = "total_precipitation"
#: Prefix of the per-lead pseudo-variables (``"tp_12h"``).
PSEUDO_PREFIX = "tp_"
#: Hours summed into one accumulation.
WINDOW_HOURS = 6
#: Plausible 6-hour accumulations (mm): the training period's maximum must lie in
#: [MIN_WETTEST, MAX_WETTEST] and its minimum be at least MIN_VALUE (see the module docstring).
MIN_WETTEST, MAX_WETTEST, MIN_VALUE = 1.0, 1000.0, -0.1
#: Elements of one dask chunk when the store is read for checks and statistics (~64 MB).
_CHUNK_ELEMENTS = 2**24


@dataclass
class PrecipitationConfig(TaskConfig):
    """Settings of the regional precipitation task.

    ``data`` (a :class:`~wpeft.data.source.DataSource` or a mapping of its fields) reads a real
    ERA5 store over ``data.region``; without it the embedded ``world`` is cropped by
    ``crop_size`` / ``crop_lat`` / ``crop_lon``.
    """

    #: Embedded world to crop.
    world: WorldConfig = field(default_factory=WorldConfig)
    #: Crop size (latitudes, longitudes): multiples of the backbone's patch size, >= 3 patches.
    crop_size: tuple[int, int] = (16, 32)
    #: Latitude (°N) the crop is centred on (the storm track).
    crop_lat: float = 45.0
    #: Western edge of the crop (°E); the first grid longitude at or east of it.
    crop_lon: float = 0.0
    #: Hours between the two input steps.
    input_gap_hours: int = 12
    #: Lead times (hours after the latest input) of the predicted 6-hour accumulations.
    leads_hours: tuple[int, ...] = (12, 24, 36)
    #: Train, val, test fractions of the time-ordered samples (contiguous blocks); used when
    #: ``data`` gives no periods.
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    #: Cache directory of the embedded world (default: ``$WPEFT_CACHE_DIR`` or the user cache).
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source not in ("world", "data"):
            raise ConfigError(
                f"source={self.source!r}: the precipitation task reads the embedded world "
                "('world') or a real store (data=...)."
            )
        if self.data is not None and self.data.variables is not None:
            names = self.data.variables
            if len(names) != 1 or names[0] not in (TARGET, HOURLY):
                raise ConfigError(
                    f"data variables={list(names)}: the precipitation task learns {TARGET!r} "
                    f"(6-hour accumulations) or sums {HOURLY!r} (hourly ones) to it; name one of "
                    "them, or leave variables out (the store's is found)."
                )
        self.world = coerce_world(self.world)
        self.split_fractions = check_fractions(self.split_fractions)  # type: ignore[assignment]
        crop = tuple(self.crop_size)
        if len(crop) != 2 or any(
            not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in crop
        ):
            raise ConfigError(f"crop_size={self.crop_size!r} must be two positive integers.")
        if self.data is None and (crop[0] > self.world.nlat or crop[1] > self.world.nlon):
            raise ConfigError(
                f"crop_size={crop} is larger than the world's {self.world.nlat} x {self.world.nlon} grid."
            )
        self.crop_size = crop  # type: ignore[assignment]
        if not math.isfinite(self.crop_lat) or abs(self.crop_lat) > 90:
            raise ConfigError(f"crop_lat={self.crop_lat!r} must be a latitude in [-90, 90].")
        if not math.isfinite(self.crop_lon):
            raise ConfigError(f"crop_lon={self.crop_lon!r} must be a longitude.")
        self.crop_lon = float(self.crop_lon) % 360.0
        gap = self.input_gap_hours
        if not isinstance(gap, int) or isinstance(gap, bool) or gap < 6 or gap % 6:
            raise ConfigError(f"input_gap_hours={gap!r} must be a positive multiple of 6.")
        leads = tuple(self.leads_hours)
        if (
            not leads
            or any(not isinstance(x, int) or isinstance(x, bool) or x < 6 or x % 6 for x in leads)
            or list(leads) != sorted(set(leads))
        ):
            raise ConfigError(
                f"leads_hours={self.leads_hours!r} must be increasing positive multiples of 6."
            )
        self.leads_hours = leads

    @property
    def pseudo_variables(self) -> tuple[str, ...]:
        """Aurora names of the per-lead outputs: ``("tp_12h", "tp_24h", "tp_36h")``."""
        return tuple(f"{PSEUDO_PREFIX}{h}h" for h in self.leads_hours)


@dataclass
class _Data:
    """The region's fields (in memory for the world, read per batch for a real store).

    Attributes:
        fields: Surface ``(N, H, W)`` and atmospheric ``(N, C, H, W)`` inputs, statics ``(H, W)``
            (the world's ``fields.surf`` also holds ``tp``, which :attr:`tp` serves).
        tp: ``(N, H, W)`` 6-hour accumulations (mm) by time position: a tensor, a
            :class:`~wpeft.data.batch.LazyVariable` or :class:`_HourlySums`.
        inputs: ``(S, 2)`` time positions of the two inputs ``t − gap``, ``t`` of each sample.
        targets: ``(S, L)`` time positions of the targets ``t + lead``.
        splits: Positions into the S samples per split.
        tp_stats: Area-weighted mean and std of ``tp`` over the times the train split touches.
        climate: ``(time, latitude, longitude)`` 6-hour accumulations of the training record
            (numpy- or dask-backed), for ACC's mean and SEEPS' climatology.
        lat, lon: ``(H,)``, ``(W,)`` float64 coordinates of the outputs.
        levels: Pressure levels of the atmospheric inputs.
        fill: Constant inputs for variables the store lacks (``data.fill_missing``), or None.
        info: What :meth:`Precipitation.describe` records about a real store.
    """

    fields: Fields
    tp: Any
    inputs: np.ndarray
    targets: np.ndarray
    splits: dict[Split, np.ndarray]
    tp_stats: tuple[float, float]
    climate: xr.DataArray
    lat: np.ndarray
    lon: np.ndarray
    levels: tuple[int, ...]
    fill: ConstantInputs | None = None
    info: dict[str, Any] = field(default_factory=dict)


class _HourlySums:
    """6-hour accumulations from hourly ones, read per batch.

    ``sums[index]`` (integer tensor or array of time positions, any shape) is the sum of the
    hourly values at positions ``p − 5 .. p`` (the six hours ending at time ``p``), in float64,
    returned as float32 of shape ``index.shape + (H, W)``. The caller guarantees that these
    positions are the six consecutive hours (see :func:`_sample_positions`).
    """

    def __init__(self, hourly: LazyVariable, hours: int = WINDOW_HOURS) -> None:
        self.hourly = hourly
        self.hours = hours
        self.shape = hourly.shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: torch.Tensor | np.ndarray) -> torch.Tensor:
        idx = torch.as_tensor(np.asarray(index.cpu() if torch.is_tensor(index) else index))
        offsets = torch.arange(-(self.hours - 1), 1, dtype=idx.dtype)
        values = self.hourly[idx.unsqueeze(-1) + offsets]  # (*idx, hours, H, W)
        return values.double().sum(dim=idx.dim()).float()


@register_task
class Precipitation(Task):
    """(t − 12 h, t) -> 6-hour precipitation at t + 12/24/36 h; see the module docstring."""

    name: ClassVar[str] = "precipitation"
    Config: ClassVar[type[TaskConfig]] = PrecipitationConfig
    headline: ClassVar[tuple[str, ...]] = BUILTIN_HEADLINES["precipitation"]
    num_prompts: ClassVar[int] = 20  # TADP prompt tokens (the paper's P for this task)
    config: PrecipitationConfig

    def __init__(self, config: TaskConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._data: _Data | None = None
        self._std: float | None = None
        self._climatology: tuple[xr.DataArray, xr.DataArray, xr.DataArray] | None = None

    # --- data -------------------------------------------------------------------------------

    @property
    def data(self) -> _Data:
        if self._data is None:
            if self.config.data is not None:
                raise ConfigError(
                    "Call task.setup(model) first: with data= the inputs read from the store "
                    "depend on the backbone (its variables and pressure levels)."
                )
            self._data = self._load_world()
        return self._data

    def _load_world(self) -> _Data:
        cfg = self.config
        cache = Path(cfg.cache_dir) if cfg.cache_dir else None
        ds = open_world(cfg.world, cache_dir=cache, progress=False)
        ds = ds.isel(_crop_slices(ds, cfg.crop_size, cfg.crop_lat, cfg.crop_lon))
        fields = Fields.from_dataset(
            ds, surf_vars=SURF_VARS + ("tp",), atmos_vars=ATMOS_VARS, static_vars=STATIC_VARS
        )
        step = time_step(fields.times)
        gap = np.timedelta64(cfg.input_gap_hours, "h") / step
        leads = [np.timedelta64(h, "h") / step for h in cfg.leads_hours]
        if step > SIX_HOURS or gap != int(gap) or any(x != int(x) for x in leads):
            raise DataError(f"The data's time step {step} does not divide the input gap and leads.")
        gap, leads = int(gap), tuple(int(x) for x in leads)
        anchors = np.arange(gap, len(fields) - leads[-1], dtype=np.int64)
        if anchors.size == 0:
            raise DataError(f"{len(fields)} time steps are too few for the input gap and leads.")
        splits = split_samples(anchors - gap, anchors + leads[-1], cfg)
        train = anchors[splits["train"]]
        steps = slice(int(train.min()) - gap, int(train.max()) + leads[-1] + 1)
        tp_stats = self.cached_statistics("tp", lambda: _mean_std(ds[[TARGET]].isel(time=steps)))
        lat = fields.lat.numpy().astype(np.float64)
        lon = fields.lon.numpy().astype(np.float64)
        tp = fields.surf["tp"]
        # Climatology of the training record: every step up to the last training anchor.
        climate = xr.DataArray(
            tp[: int(train.max()) + 1].numpy(),
            dims=("time", "latitude", "longitude"),
            coords={"latitude": lat, "longitude": lon},
        )
        return _Data(
            fields=fields,
            tp=tp,
            inputs=np.stack([anchors - gap, anchors], axis=1),
            targets=np.stack([anchors + lead for lead in leads], axis=1),
            splits=splits,
            tp_stats=(tp_stats["mean"], tp_stats["std"]),
            climate=climate,
            lat=lat,
            lon=lon,
            levels=fields.levels,
        )

    def _load_data(self, model: WpeftAurora) -> _Data:
        """Open ``config.data`` for ``model``'s inputs and run every check before training."""
        cfg = self.config
        source: DataSource = cfg.data  # type: ignore[assignment]
        inputs = backbone_inputs(model)
        levels = _levels(model, source)
        precip = _precipitation_variable(source)
        hourly = precip == HOURLY
        # Thinning comes after summing: open every time step, choose the sample times below.
        ds, lacking = open_source(
            dataclasses.replace(source, time_step_hours=None),
            required=[precip],
            optional=[*inputs["surface"], *inputs["atmos"], *inputs["static"]],
            levels=levels,
        )
        where = ds.attrs.get("source_path", source.path)
        _check_units(ds[precip], where)
        grid = (ds.sizes["latitude"], ds.sizes["longitude"])
        _check_region_grid(model, grid, ds, source)
        times = np.asarray(ds["time"].values, dtype="datetime64[ns]")
        step_hours = _time_step_hours(times, source, cfg, hourly, where)
        window, targets = _sample_positions(times, step_hours, cfg, hourly, where)
        splits = split_samples(times[window[:, 0]], times[targets[:, -1]], cfg)
        back = WINDOW_HOURS - 1 if hourly else 0  # hourly steps read before each tp time

        if source.check_finite:
            used = np.concatenate([_touched(window[s], targets[s], back) for s in splits.values()])
            check_finite(_chunked(ds.isel(time=np.unique(used))))

        train = splits["train"]
        record = np.unique(np.concatenate([window[train].ravel(), targets[train].ravel()]))
        climate = _accumulations(ds[precip], record, hourly)

        def train_statistics() -> dict[str, float]:
            _check_plausible(climate, precip, where, times[record[[0, -1]]])
            return _mean_std(xr.Dataset({TARGET: climate}))

        tp_stats = self.cached_statistics("tp", train_statistics)

        def names(kind: str) -> list[str]:
            return [spec(n).aurora for n in inputs[kind] if n in ds.data_vars]

        fields = Fields.from_dataset(
            ds,
            surf_vars=names("surface"),
            atmos_vars=names("atmos"),
            static_vars=names("static"),
            lazy=True,
        )
        lazy_tp = LazyVariable(ds[precip].transpose("time", "latitude", "longitude"))
        levels = fields.levels or levels
        fill = ConstantInputs(model, lacking, levels) if lacking else None
        mean, std = tp_stats["mean"], tp_stats["std"]
        info = {
            "store": where,
            "precipitation": {
                "variable": precip,
                "accumulation": (
                    f"sum of the {WINDOW_HOURS} hourly values ending at each valid time"
                    if hourly
                    else "6-hour accumulations as stored"
                ),
                "units": "mm",
            },
            "time_step_hours": step_hours,
            "grid": list(grid),
            "levels": list(levels),
            "filled_inputs": list(lacking),
            "tp_stats": {
                "mean": mean,
                "std": std,
                "period": [str(t) for t in times[record[[0, -1]]]],
            },
        }
        return _Data(
            fields=fields,
            tp=_HourlySums(lazy_tp) if hourly else lazy_tp,
            inputs=window,
            targets=targets,
            splits=splits,
            tp_stats=(mean, std),
            climate=climate,
            lat=np.asarray(ds["latitude"].values, dtype=np.float64),
            lon=np.asarray(ds["longitude"].values, dtype=np.float64),
            levels=tuple(levels),
            fill=fill,
            info=info,
        )

    # --- the Task API -----------------------------------------------------------------------

    def setup(self, model: WpeftAurora) -> nn.Module:
        """Install one pseudo-variable per lead (``"tp_12h"``...: Aurora-initialised embedding
        kernel and decoder head) normalised with the train split's ``tp`` statistics.

        With ``data=`` this first opens and checks the store for ``model``'s inputs (see the
        module docstring); every refusal happens here, before the backbone is changed.

        Returns:
            A :class:`TaskHead` with ``len(leads_hours)`` kernels and heads.
        """
        if self.config.data is not None:
            refuse_fixed_grid(model, "Precipitation")
        if self._data is None and self.config.data is not None:
            self._data = self._load_data(model)
        data = self.data
        check_patch_grid(model, *data.fields.grid)
        if self.config.data is None:
            missing = missing_inputs(model, SURF_VARS, ATMOS_VARS)
            if missing:
                raise ConfigError(f"The backbone has no embedding for {missing}.")
        head = TaskHead()
        mean, std = data.tp_stats
        for name in self.config.pseudo_variables:
            add_variable(model, head, name, "surface", embed_init="aurora", head_init="aurora")
            register_norm(model, norm_key(name), mean, std)
        self._std = std
        return head

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
        """Batches of ``split``.

        Inputs: surface/atmos variables and each ``tp_<lead>h`` at (t − 12 h, t), surface
        ``(B, 2, H, W)``, atmos ``(B, 2, C, H, W)``. Target ``total_precipitation_6hr``:
        ``(B, L, H, W)`` for the L leads, mm. ``times``: ``(B,)`` the latest input time ``t``
        (valid times are ``t + leads_hours``).
        """
        data = self.data
        positions = data.splits[check_split(split)]
        shuffle = split == "train" if shuffle is None else shuffle
        for chunk in index_batches(positions, batch_size, shuffle=shuffle, seed=seed, shard=shard):
            yield self._batch(chunk)

    def _batch(self, samples: np.ndarray) -> TaskBatch:
        data, f = self.data, self.data.fields
        window = torch.as_tensor(data.inputs[samples], dtype=torch.long)  # (B, 2)
        surf = {k: v[window] for k, v in f.surf.items() if k != "tp"}
        tp_history = data.tp[window]
        for name in self.config.pseudo_variables:
            surf[name] = tp_history
        atmos = {k: v[window] for k, v in f.atmos.items()}
        static = dict(f.static)
        if data.fill is not None:
            surf, atmos, static = data.fill.complete(
                surf, atmos, static, tuple(window.shape), f.grid
            )
        target = data.tp[torch.as_tensor(data.targets[samples], dtype=torch.long)]
        times = f.times[data.inputs[samples, 1]]
        inputs = make_batch(surf, atmos, static, f.lat, f.lon, data.levels, times)
        return TaskBatch(inputs=inputs, targets={TARGET: target}, times=times)

    def predict(self, model: WpeftAurora, batch: TaskBatch) -> dict[str, torch.Tensor]:
        """``{"total_precipitation_6hr": (B, L, H, W)}`` in mm, one channel per lead (not
        clipped: the L1 loss needs gradients where the prediction is negative)."""
        out = model(batch.inputs)
        return {
            TARGET: torch.stack(
                [out.surf_vars[n][:, 0] for n in self.config.pseudo_variables], dim=1
            )
        }

    def loss(self, prediction: dict[str, torch.Tensor], batch: TaskBatch) -> torch.Tensor:
        """Mean absolute error in normalised units (divided by the train-split ``tp`` std)."""
        if self._std is None:
            raise ConfigError("Call task.setup(model) first: it installs the precipitation heads.")
        p = prediction[TARGET]
        return (p - batch.targets[TARGET].to(p.device)).abs().mean() / self._std

    @torch.no_grad()
    def evaluate(
        self, model: WpeftAurora, split: Split = "test", batch_size: int = 8
    ) -> tuple[xr.Dataset, dict[str, float]]:
        """Clipped predictions and targets of ``split``, and area-weighted RMSE per lead.

        Returns:
            A Dataset on (``time`` = latest input time, ``prediction_timedelta``, ``latitude``,
            ``longitude``) -- WeatherBench2's forecast layout -- with ``valid_time`` =
            ``time + prediction_timedelta`` and the variables ``total_precipitation_6hr``
            (prediction clipped at 0) and ``total_precipitation_6hr_target``; scores
            ``"rmse|acc|seeps/total_precipitation_6hr_<lead>h"`` and the same for persistence
            (``tp(t)``) as ``"rmse_persistence/..."`` etc. ACC and SEEPS use the climatology of
            the training record (mean; dry fraction and wet threshold per grid point).
        """
        if self._std is None:
            raise ConfigError("Call task.setup(model) first: it installs the precipitation heads.")
        data = self.data
        was_training = model.training
        model.eval()
        preds, targets, persistence, times = [], [], [], []
        try:
            for batch in self.batches(split, batch_size, shuffle=False):
                preds.append(self.predict(model, batch)[TARGET].clamp(min=0).float().cpu().numpy())
                targets.append(batch.targets[TARGET].numpy())
                persistence.append(
                    batch.inputs.surf_vars[self.config.pseudo_variables[0]][:, -1].numpy()
                )
                times.append(np.asarray(batch.times))
        finally:
            model.train(was_training)
        time = np.concatenate(times)
        leads = np.asarray(
            [np.timedelta64(h, "h") for h in self.config.leads_hours], dtype="timedelta64[ns]"
        )
        dims = ("time", "prediction_timedelta", "latitude", "longitude")
        coords = {
            "time": time,
            "prediction_timedelta": leads,
            "valid_time": (("time", "prediction_timedelta"), time[:, None] + leads[None, :]),
            "latitude": data.lat,
            "longitude": data.lon,
        }
        pred = xr.DataArray(
            np.concatenate(preds), dims=dims, attrs=var_attrs(TARGET, "(predicted, clipped at 0)")
        )
        target = xr.DataArray(
            np.concatenate(targets), dims=dims, attrs=var_attrs(TARGET, "(truth)")
        )
        ds = xr.Dataset(
            {TARGET: pred, f"{TARGET}_target": target},
            coords=coords,
            attrs={"task": self.name, "split": split},
        )
        pers = xr.DataArray(
            np.concatenate(persistence),
            dims=dims[:1] + dims[2:],
            coords={k: coords[k] for k in ("time", "latitude", "longitude")},
        ).broadcast_like(ds[TARGET])
        p1, wet, mean_climate = self._climate()
        target_da = ds[f"{TARGET}_target"]
        scores: dict[str, float] = {}
        by_lead = {"preserve_dims": ["prediction_timedelta"]}
        for prefix, forecast in (("", ds[TARGET]), ("_persistence", pers)):
            results = {
                f"rmse{prefix}": rmse(forecast, target_da, **by_lead),
                f"acc{prefix}": acc(forecast, target_da, mean_climate, **by_lead),
                f"seeps{prefix}": seeps(forecast, target_da, p1, wet, **by_lead),
            }
            for name, result in results.items():
                for h, lead in zip(self.config.leads_hours, leads):
                    value = result.sel(prediction_timedelta=lead)
                    scores[f"{name}/{TARGET}_{h}h"] = float(value)
        return ds, scores

    def _climate(self) -> tuple[xr.DataArray, xr.DataArray, xr.DataArray]:
        """SEEPS' dry fraction and wet threshold and ACC's mean, per grid point, of the training
        record (computed once; a real store's record is read with dask, whole in time)."""
        if self._climatology is None:
            data = self.data
            climate = data.climate.astype(np.float64).assign_coords(
                latitude=data.lat, longitude=data.lon
            )
            if climate.chunks is not None:  # quantiles over time need the time axis whole
                n, _, w = climate.shape
                rows = max(1, _CHUNK_ELEMENTS // max(1, n * w))
                climate = climate.chunk({"time": -1, "latitude": rows, "longitude": -1})
            p1, wet = seeps_climatology(climate)
            mean = climate.mean("time")
            self._climatology = dask.compute(p1, wet, mean)
        return self._climatology  # type: ignore[return-value]

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        if self._data is not None:
            d = self._data
            out["samples"] = {s: self.num_samples(s) for s in SPLITS}
            out["region"] = {
                "lat": [float(d.lat[0]), float(d.lat[-1])],
                "lon": [float(d.lon[0]), float(d.lon[-1])],
            }
            out.update(d.info)
        return out


# --- real stores -------------------------------------------------------------------------------


def _levels(model: WpeftAurora, source: DataSource) -> tuple[int, ...]:
    """The pressure levels to read: ``data.levels`` if given, else every level the backbone has
    statistics for (all its atmospheric variables); levels it lacks are refused."""
    keys = model.norm_mean if model.norm_mean else aurora_norm.locations
    known: set[int] | None = None
    for v in model.config.atmos_vars:
        lv = {
            int(k[len(v) + 1 :])
            for k in keys
            if k.startswith(f"{v}_") and k[len(v) + 1 :].isdigit()
        }
        known = lv if known is None else known & lv
    backbone = tuple(sorted(known or (), reverse=True))
    if not backbone:
        raise ConfigError(
            "The backbone has no pressure levels with statistics for all of "
            f"{list(model.config.atmos_vars)}; use a backbone trained on levels."
        )
    if source.levels is None:
        return backbone
    unknown = [x for x in source.levels if x not in backbone]
    if unknown:
        raise ConfigError(
            f"data levels {unknown} hPa are not levels of the backbone ({list(backbone)}); "
            "choose data.levels among them, or leave levels out."
        )
    return tuple(source.levels)


def _precipitation_variable(source: DataSource) -> str:
    """``total_precipitation_6hr`` if the store has it, else ``total_precipitation``
    (``data.variables`` decides when given); refused when the store has neither."""
    if source.variables is not None:
        return source.variables[0]
    with warnings.catch_warnings():  # units are checked by this task (_check_units)
        warnings.filterwarnings("ignore", message=".*unconverted")
        have = set(map(str, open_store(source.path).data_vars))
    for name in (TARGET, HOURLY):
        if name in have:
            return name
    raise DataError(
        f"{source.path} holds no precipitation: neither {TARGET!r} (6-hour accumulations, "
        f"WeatherBench2) nor {HOURLY!r} (hourly, ARCO-ERA5); it has {sorted(have)}. Point "
        "data.path at a store with one of them (WeatherBench2 names)."
    )


def _check_units(da: xr.DataArray, where: str) -> None:
    """The reader converted precipitation to mm; any other units attribute is refused."""
    units = str(da.attrs.get("units", ""))
    if units.strip() != "mm":
        raise DataError(
            f"{da.name!r} in {where} has units {units!r}, which wpeft cannot convert to mm; set "
            "the variable's units attribute to 'm' (ERA5, WeatherBench2) or 'mm', as the values are."
        )


def _check_region_grid(
    model: WpeftAurora, grid: tuple[int, int], ds: xr.Dataset, source: DataSource
) -> None:
    """The region's grid fits the patch size; else the region, its grid and a box that fits."""
    try:
        check_patch_grid(model, *grid)
    except DataError:
        p = model.patch_size
        h, w = (max(3, n // p) * p for n in grid)
        lat, lon = ds["latitude"].values, ds["longitude"].values
        what = f"region {list(source.region)}" if source.region else "the whole grid"
        fix = (
            f"e.g. region [{lat[h - 1]:g}, {lat[0]:g}, {lon[0]:g}, {lon[w - 1]:g}] "
            f"({h} x {w} points)"
            if h <= grid[0] and w <= grid[1]
            else f"a larger region (at least {3 * p} x {3 * p} points)"
        )
        raise DataError(
            f"The {what} of {source.path} gives a {grid[0]} x {grid[1]} grid, which does not fit "
            f"the backbone's patch size {p}: rows and columns must be multiples of {p}, at least "
            f"3 patches each way. Set data.region to a box that fits, {fix}."
        ) from None


def _time_step_hours(
    times: np.ndarray, source: DataSource, cfg: PrecipitationConfig, hourly: bool, where: str
) -> int:
    """The hours between sample times: ``data.time_step_hours`` or the store's step. It must be
    a multiple of the store's step and divide the input gap and the leads; hourly
    precipitation needs an hourly store."""
    step, _ = regular_step(times)
    if step is None:
        raise DataError(f"{where} has a single time; the task needs a time series.")
    store = np.timedelta64(step, "ns")
    hour = np.timedelta64(1, "h")
    if hourly and store != hour:
        raise DataError(
            f"{where} holds hourly {HOURLY!r} but its time step is "
            f"{store / hour:g} h: 6-hour sums need every hour. Use the hourly store, or one with "
            f"{TARGET!r}."
        )
    wanted = source.time_step_hours
    if wanted is not None:
        if np.timedelta64(wanted, "h") % store:
            raise DataError(
                f"data.time_step_hours={wanted} is not a multiple of {where}'s step "
                f"{store / hour:g} h."
            )
        hours = wanted
    else:
        if store % hour:
            raise DataError(
                f"{where}'s time step {store / hour:g} h is not whole hours; set "
                "data.time_step_hours."
            )
        hours = int(store // hour)
    spans = (cfg.input_gap_hours, *cfg.leads_hours)
    if any(s % hours for s in spans):
        raise DataError(
            f"The time step {hours} h does not divide input_gap_hours={cfg.input_gap_hours} and "
            f"leads_hours={list(cfg.leads_hours)}; set data.time_step_hours to 6 (or another "
            "divisor of them)."
        )
    return hours


def _lookup(times: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Positions of ``wanted`` in the sorted ``times`` (-1 where absent)."""
    pos = np.minimum(np.searchsorted(times, wanted), len(times) - 1)
    return np.where(times[pos] == wanted, pos, -1)


def _sample_positions(
    times: np.ndarray, step_hours: int, cfg: PrecipitationConfig, hourly: bool, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """``(S, 2)`` input and ``(S, L)`` target time positions of every complete sample.

    A sample's latest input ``t`` is a store time on the ``step_hours`` grid (hours since
    1970-01-01 divisible by it); it is kept when ``t − gap`` and every ``t + lead`` are in the
    store, and, for hourly precipitation, the five hours before each of these times too (a time
    series with gaps is fine: samples across a gap are left out).
    """
    hour = np.timedelta64(1, "h")
    ns = times.astype("datetime64[ns]").astype(np.int64)
    anchors = np.nonzero(ns % (step_hours * 3_600_000_000_000) == 0)[0]
    t = times[anchors]
    inputs = np.stack([_lookup(times, t - cfg.input_gap_hours * hour), anchors], axis=1)
    targets = np.stack([_lookup(times, t + h * hour) for h in cfg.leads_hours], axis=1)
    ok = (inputs >= 0).all(axis=1) & (targets >= 0).all(axis=1)
    if hourly:
        for pos in (*inputs.T, *targets.T):
            first = _lookup(times, times[pos] - (WINDOW_HOURS - 1) * hour)
            ok &= (pos >= 0) & (first >= 0) & (pos - first == WINDOW_HOURS - 1)
    if not ok.any():
        need = f"t − {cfg.input_gap_hours} h .. t + {cfg.leads_hours[-1]} h"
        if hourly:
            need += f" (and the {WINDOW_HOURS - 1} hours before each precipitation time)"
        raise DataError(
            f"{where} ({len(times)} times, {times[0]} .. {times[-1]}) holds no complete sample: "
            f"each needs the times {need} on a {step_hours}-hourly step. Use a longer stretch."
        )
    return inputs[ok].astype(np.int64), targets[ok].astype(np.int64)


def _touched(inputs: np.ndarray, targets: np.ndarray, back: int) -> np.ndarray:
    """Every time position the samples read (from ``back`` steps before their first time to
    their last), as a contiguous range per block of samples."""
    lo, hi = int(inputs.min()) - back, int(targets.max())
    return np.arange(lo, hi + 1)


def _chunked(ds: xr.Dataset | xr.DataArray, dim: str = "time") -> Any:
    """``ds`` as dask arrays of about 64 MB along ``dim`` (read once, streamed)."""
    arrays = ds.data_vars.values() if isinstance(ds, xr.Dataset) else [ds]
    per_step = max(
        (int(np.prod([a.sizes[d] for d in a.dims if d != dim])) for a in arrays if dim in a.dims),
        default=1,
    )
    return ds.chunk({dim: max(1, _CHUNK_ELEMENTS // max(1, per_step))})


def _accumulations(da: xr.DataArray, positions: np.ndarray, hourly: bool) -> xr.DataArray:
    """Lazy (dask) ``(time, latitude, longitude)`` 6-hour accumulations at time ``positions``:
    the stored values, or the sums of the six hourly values ending there."""
    da = da.transpose("time", "latitude", "longitude")
    base = _chunked(da.isel(time=positions))
    if hourly:
        parts = [
            _chunked(da.isel(time=positions - k)).data.astype(np.float64)
            for k in range(WINDOW_HOURS)
        ]
        total = functools.reduce(operator.add, parts).astype(np.float32)
        base = base.copy(data=total)
    return base.rename(TARGET).assign_attrs(var_attrs(TARGET))


def _check_plausible(
    climate: xr.DataArray, precip: str, where: str, period: Sequence[np.datetime64]
) -> None:
    """Refuse accumulations implausible for mm (see the module docstring), naming the values."""
    high, low = (float(v) for v in dask.compute(climate.max(), climate.min()))
    span = f"{np.datetime_as_string(period[0], 'h')} .. {np.datetime_as_string(period[1], 'h')}"
    if not math.isfinite(high):
        return  # all NaN: the finite checks name it
    fix = (
        "Set the store's units attribute of the precipitation to what the values are: 'm' "
        "(ERA5 and WeatherBench2 store metres) or 'mm'."
    )
    if high < MIN_WETTEST:
        raise DataError(
            f"{precip!r} in {where}: the wettest 6 hours of the training period ({span}) bring "
            f"only {high:.3g} mm; values this small look like metres read as mm (a units "
            f"attribute 'mm', or none, on data in metres). {fix}"
        )
    if high > MAX_WETTEST:
        raise DataError(
            f"{precip!r} in {where}: the training period ({span}) has {high:.4g} mm in 6 hours, "
            f"more than {MAX_WETTEST:g} mm: values this large look like mm labelled 'm' (converted "
            f"to mm a second time). {fix}"
        )
    if low < MIN_VALUE:
        raise DataError(
            f"{precip!r} in {where}: the training period ({span}) has accumulations down to "
            f"{low:.3g} mm; precipitation is not negative. Check the store's sign and units. {fix}"
        )


# --- the embedded world --------------------------------------------------------------------------


def _crop_slices(ds: xr.Dataset, size: tuple[int, int], lat: float, lon: float) -> dict[str, slice]:
    """Index slices of a ``size`` crop centred on latitude ``lat`` with western edge ``lon``,
    moved inside the grid where it would leave it (no wrap: the schema's longitudes increase)."""
    lats = np.asarray(ds["latitude"].values, dtype=np.float64)
    lons = np.asarray(ds["longitude"].values, dtype=np.float64)
    h, w = size
    if h > lats.size or w > lons.size:
        raise DataError(f"Crop {size} is larger than the {lats.size} x {lons.size} grid.")
    centre = int(np.argmin(np.abs(lats - lat)))
    i0 = min(max(centre - h // 2, 0), lats.size - h)
    east = np.nonzero(lons >= lon - 1e-9)[0]
    j0 = min(int(east[0]) if east.size else lons.size - w, lons.size - w)
    return {"latitude": slice(i0, i0 + h), "longitude": slice(j0, j0 + w)}


def _mean_std(ds: xr.Dataset) -> dict[str, float]:
    """Area-weighted mean and std of the precipitation in ``ds`` (one pass)."""
    stats = compute_stats(ds)
    return {"mean": float(stats.mean["tp"]), "std": float(stats.std["tp"])}
