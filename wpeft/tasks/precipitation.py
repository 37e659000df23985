"""Regional precipitation (METHOD.md §4): 6-hour rain at +12/+24/+36 h over a region.

Why this task: precipitation is a variable the backbone never saw (the ``tiny`` backbone was
pretrained without ``tp``), sparse, skewed and non-negative -- the hardest kind of new output for a
foundation model -- and the region is a crop of the grid it was trained on, so positional
knowledge must transfer to a smaller domain.

Set-up (the paper's, on the embedded world): a ``crop_size`` crop (default 16 x 32, centred on
``crop_lat`` = 45°N, western edge ``crop_lon`` = 0°E; moved inside the grid if it would leave it)
of the fine world grid. Inputs: two steps 12 h apart (``t − 12 h``, ``t``) of the surface (2t,
10u, 10v, msl) and atmospheric (z, u, v, t, q) variables, precipitation and the statics.
Targets: ``total_precipitation_6hr`` (rain over the 6 h ending at the valid time) at
``t + 12 h``, ``t + 24 h``, ``t + 36 h`` (``leads_hours``).

How it maps onto Aurora: the decoder predicts exactly the variables in the batch, one head each,
so each lead is a pseudo-variable ``"tp_12h"``, ``"tp_24h"``, ``"tp_36h"`` with a NEW embedding
kernel and a NEW decoder head (initialised as Aurora initialises its own). Each pseudo-variable
is fed the precipitation history ``(tp(t − 12 h), tp(t))``: that is how precipitation enters the
encoder (no separate ``"tp"`` input, which would need a fourth head that nothing trains), and with
the residual ``tiny`` backbone each output is ``tp(t)`` (persistence) plus a learned correction.
The pseudo-variables are normalised with the train split's ``tp`` statistics (plain
normalisation, as in the paper; no log transform) registered in the backbone; the other
variables keep the backbone's statistics. The backbone also predicts its usual variables from the
batch; they are ignored.

Loss: L1 on normalised precipitation, averaged over leads. Predictions are clipped at 0 in
:meth:`Precipitation.evaluate` (not in training, where the clip would kill gradients).
Scores: area-weighted RMSE per lead (``"rmse/total_precipitation_6hr_12h"``...) and the
persistence baseline (``"rmse_persistence/..."``); the Dataset keeps the fields for ACC/SEEPS.

Splits are contiguous time blocks (70/15/15); a sample touches ``t − 12 h`` .. ``t + 36 h`` and
samples reaching into the previous block are dropped, so no time step serves two splits.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import xarray as xr
from torch import nn

from wpeft.backbones.aurora_adapter import WpeftAurora, norm_key
from wpeft.data.batch import Fields
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
    TaskHead,
    add_variable,
    check_fractions,
    check_patch_grid,
    check_split,
    coerce_world,
    index_batches,
    make_batch,
    register_norm,
    split_by_time,
    time_step,
    var_attrs,
)

__all__ = ["TARGET", "Precipitation", "PrecipitationConfig"]

#: WB2 name of the predicted variable.
TARGET = "total_precipitation_6hr"
#: Prefix of the per-lead pseudo-variables (``"tp_12h"``).
PSEUDO_PREFIX = "tp_"


@dataclass
class PrecipitationConfig(TaskConfig):
    """Settings of the regional precipitation task (``source`` must be ``"world"``)."""

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
    #: Train, val, test fractions of the time-ordered samples (contiguous blocks).
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    #: Cache directory of the embedded world (default: ``$WPEFT_CACHE_DIR`` or the user cache).
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source != "world":
            raise ConfigError(
                f"source={self.source!r}: the precipitation task reads the embedded world ('world')."
            )
        self.world = coerce_world(self.world)
        self.split_fractions = check_fractions(self.split_fractions)  # type: ignore[assignment]
        crop = tuple(self.crop_size)
        if len(crop) != 2 or any(
            not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in crop
        ):
            raise ConfigError(f"crop_size={self.crop_size!r} must be two positive integers.")
        if crop[0] > self.world.nlat or crop[1] > self.world.nlon:
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
    """The cropped fields in memory.

    Attributes:
        fields: Surface (incl. ``tp``) ``(N, H, W)``, atmos ``(N, C, H, W)``, statics ``(H, W)``.
        gap / leads: Input gap and leads in time steps.
        anchors: ``(S,)`` indices of the latest input ``t`` of all samples.
        splits: Positions into ``anchors`` per split.
        tp_stats: Area-weighted mean and std of ``tp`` over the train split's time steps.
    """

    fields: Fields
    gap: int
    leads: tuple[int, ...]
    anchors: np.ndarray
    splits: dict[Split, np.ndarray]
    tp_stats: tuple[float, float]


@register_task
class Precipitation(Task):
    """(t − 12 h, t) -> 6-hour precipitation at t + 12/24/36 h; see the module docstring."""

    name: ClassVar[str] = "precipitation"
    Config: ClassVar[type[TaskConfig]] = PrecipitationConfig
    headline: ClassVar[tuple[str, ...]] = tuple(f"{TARGET}_{h}h" for h in (12, 24, 36))
    config: PrecipitationConfig

    def __init__(self, config: TaskConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._data: _Data | None = None
        self._std: float | None = None

    # --- data -------------------------------------------------------------------------------

    @property
    def data(self) -> _Data:
        if self._data is None:
            self._data = self._load()
        return self._data

    def _load(self) -> _Data:
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
        splits = split_by_time(anchors - gap, anchors + leads[-1], cfg.split_fractions)
        train = anchors[splits["train"]]
        steps = slice(int(train.min()) - gap, int(train.max()) + leads[-1] + 1)
        stats = compute_stats(ds[[TARGET]].isel(time=steps))
        tp_stats = (stats.mean["tp"], stats.std["tp"])
        return _Data(
            fields=fields, gap=gap, leads=leads, anchors=anchors, splits=splits, tp_stats=tp_stats
        )

    # --- the Task API -----------------------------------------------------------------------

    def setup(self, model: WpeftAurora) -> nn.Module:
        """Install one pseudo-variable per lead (``"tp_12h"``...: Aurora-initialised embedding
        kernel and decoder head) normalised with the train split's ``tp`` statistics.

        Returns:
            A :class:`TaskHead` with ``len(leads_hours)`` kernels and heads.
        """
        data = self.data
        check_patch_grid(model, *data.fields.grid)
        missing = [v for v in SURF_VARS if v not in model.encoder.surf_token_embeds.weights]
        missing += [v for v in ATMOS_VARS if v not in model.encoder.atmos_token_embeds.weights]
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
        self, split: Split, batch_size: int, *, seed: int = 0, shuffle: bool | None = None
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
        for chunk in index_batches(positions, batch_size, shuffle=shuffle, seed=seed):
            yield self._batch(data.anchors[chunk])

    def _batch(self, anchors: np.ndarray) -> TaskBatch:
        data, f = self.data, self.data.fields
        idx = torch.as_tensor(anchors, dtype=torch.long)
        window = torch.stack([idx - data.gap, idx], dim=1)  # (B, 2)
        surf = {k: f.surf[k][window] for k in SURF_VARS}
        tp_history = f.surf["tp"][window]
        for name in self.config.pseudo_variables:
            surf[name] = tp_history
        atmos = {k: v[window] for k, v in f.atmos.items()}
        target = torch.stack([f.surf["tp"][idx + lead] for lead in data.leads], dim=1)
        times = f.times[anchors]
        inputs = make_batch(surf, atmos, dict(f.static), f.lat, f.lon, f.levels, times)
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
            "latitude": data.fields.lat.numpy().astype(np.float64),
            "longitude": data.fields.lon.numpy().astype(np.float64),
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
        # Climatology of the training record (every step up to the last training anchor):
        # its mean for ACC, its dry fraction and wet threshold per point for SEEPS.
        last = int(data.anchors[data.splits["train"]].max()) + 1
        climate = xr.DataArray(
            data.fields.surf["tp"][:last].numpy().astype(np.float64),
            dims=("time", "latitude", "longitude"),
            coords={k: coords[k] for k in ("latitude", "longitude")},
        )
        p1, wet = seeps_climatology(climate)
        mean_climate = climate.mean("time")
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

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        if self._data is not None:
            f = self._data.fields
            out["samples"] = {s: self.num_samples(s) for s in SPLITS}
            out["region"] = {
                "lat": [float(f.lat[0]), float(f.lat[-1])],
                "lon": [float(f.lon[0]), float(f.lon[-1])],
            }
        return out


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
