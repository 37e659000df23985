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

Two data sources:

* ``source="world"`` (default): the embedded world's fine grid (32 x 64) as truth and its
  conservatively coarsened grid (8 x 16, :func:`open_world` with ``resolution="coarse"``) as the
  coarse analysis; all surface (2t, 10u, 10v, msl) and atmospheric (z, u, v, t, q at the world's
  levels) variables are learned.
* ``source="era5-uk"`` with ``path=``: a regional ERA5 2 m temperature file (the UK GRIB sample,
  33 x 49 at 0.25°, hourly). Aurora (and the schema) need longitudes increasing within
  [0, 360); the sample spans 10°W-2°E across the prime meridian, so only its longest contiguous
  run (350°-359.75°E, 40 columns) can be fed with true coordinates. It is cropped to
  ``era5_crop`` (default 32 x 40 from the north-west corner, so that patch size 4 and the
  coarsening factor fit), coarsened conservatively by ``era5_coarse_factor`` (0.25° -> 1°) and
  upsampled back bilinearly. Samples are hourly (inputs at ``t`` and ``t + 6 h``). Only 2t is
  learned. Aurora still needs its other inputs: **every variable the file lacks (10u, 10v, msl,
  all atmospheric levels and the statics lsm, z, slt) is fed as a constant field equal to the
  backbone's normalisation mean**, i.e. zero anomaly in normalised units. That is an honest
  "no information" input, not a climatology of the region: the backbone sees 2 m temperature and
  nothing else. Bilinear upsampling is periodic in longitude (:func:`upsample_bilinear`), which on a
  regional grid gives the outermost half coarse cell at the east/west edges a weight of at most
  ~0.1 % from the opposite edge; we accept that rather than re-implement the interpolation.

Splits are contiguous time blocks (70/15/15 by default). A sample touches two time steps (its
inputs at ``t`` and ``t + 6 h``, target at ``t + 6 h``); the first samples of the val and test
blocks that would touch a time step of the previous block are dropped, so no time step is used
by two splits.

The helpers the tasks share (splits, batching, statistics, new variables) live in
:mod:`wpeft.tasks.common`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import xarray as xr
from torch import nn

from wpeft.backbones.aurora_adapter import WpeftAurora, norm_key
from wpeft.data.batch import Fields, wb2_name
from wpeft.data.era5 import open_era5
from wpeft.data.regrid import coarsen_conservative, upsample_bilinear
from wpeft.data.schema import VARIABLES
from wpeft.data.world import WorldConfig, open_world
from wpeft.errors import ConfigError, DataError
from wpeft.metrics import rmse
from wpeft.tasks.base import Split, Task, TaskBatch, TaskConfig, register_task
from wpeft.tasks.common import (
    ATMOS_VARS,
    GLOBAL_HEADLINE,
    SIX_HOURS,
    SPLITS,
    STATIC_VARS,
    SURF_VARS,
    TaskHead,
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
    time_step,
    var_attrs,
)

__all__ = ["Downscaling", "DownscalingConfig"]


@dataclass
class DownscalingConfig(TaskConfig):
    """Settings of the downscaling task (``source``: ``"world"`` or ``"era5-uk"``)."""

    #: Embedded world to downscale (``source="world"``); its ``coarse_factor`` sets the coarse grid.
    world: WorldConfig = field(default_factory=WorldConfig)
    #: ERA5 file or store with 2 m temperature (``source="era5-uk"``), e.g. the UK GRIB sample.
    path: str | None = None
    #: Train, val, test fractions of the time-ordered samples (contiguous blocks).
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    #: Loss weight of the surface MSE term (paper: 0.25).
    surface_weight: float = 0.25
    #: Loss weight of the atmospheric MSE term (paper: 1.0).
    atmos_weight: float = 1.0
    #: ERA5 crop (latitudes, longitudes) from the north-west corner of the longest run of
    #: increasing longitudes; multiples of the patch size and of ``era5_coarse_factor``. The UK
    #: sample's 10°W-2°E crosses the prime meridian, so 32 x 40 (10°W-0.25°W) is the most
    #: that fits the backbone's [0, 360) longitudes.
    era5_crop: tuple[int, int] = (32, 40)
    #: ERA5 coarsening factor (4: 0.25° -> 1°).
    era5_coarse_factor: int = 4
    #: Pressure levels of the constant atmospheric inputs fed for ERA5 (the backbone's levels).
    fill_levels: tuple[int, ...] = (850, 500, 250)
    #: Cache directory of the embedded world (default: ``$WPEFT_CACHE_DIR`` or the user cache).
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source not in ("world", "era5-uk"):
            raise ConfigError(
                f"source={self.source!r} must be 'world' or 'era5-uk' (with path= the ERA5 file)."
            )
        if self.source == "era5-uk" and not self.path:
            raise ConfigError("source='era5-uk' needs path= the ERA5 2 m temperature file.")
        self.world = coerce_world(self.world)
        self.split_fractions = check_fractions(self.split_fractions)  # type: ignore[assignment]
        for name in ("surface_weight", "atmos_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name}={value!r} must be a non-negative number.")
        if self.surface_weight == 0 and self.atmos_weight == 0:
            raise ConfigError("surface_weight and atmos_weight are both 0: nothing to learn.")
        crop = tuple(self.era5_crop)
        if len(crop) != 2 or any(not isinstance(c, int) or c < 1 for c in crop):
            raise ConfigError(f"era5_crop={self.era5_crop!r} must be two positive integers.")
        self.era5_crop = crop  # type: ignore[assignment]
        f = self.era5_coarse_factor
        if not isinstance(f, int) or isinstance(f, bool) or f < 2:
            raise ConfigError(f"era5_coarse_factor={f!r} must be an integer >= 2.")
        if crop[0] % f or crop[1] % f:
            raise ConfigError(
                f"era5_crop={crop} must be divisible by era5_coarse_factor={f} in both directions."
            )
        levels = tuple(self.fill_levels)
        if not levels or any(not isinstance(x, int) or x <= 0 for x in levels):
            raise ConfigError(f"fill_levels={self.fill_levels!r} must be positive integer hPa.")
        self.fill_levels = levels


@dataclass
class _Data:
    """Everything the task draws batches from, in memory.

    Attributes:
        inputs: Upsampled coarse fields (surface ``(N, H, W)``, atmos ``(N, C, H, W)``).
        truth: Fine fields (targets) and the fine statics (world only).
        lag: Time steps between the two inputs (6 hours).
        samples: ``(S,)`` target indices (``t + 6 h``) of all samples.
        splits: Positions into ``samples`` per split.
    """

    inputs: Fields
    truth: Fields
    lag: int
    samples: np.ndarray
    splits: dict[Split, np.ndarray]


@register_task
class Downscaling(Task):
    """Coarse (t, t + 6 h) upsampled -> fine t + 6 h; see the module docstring."""

    name: ClassVar[str] = "downscaling"
    Config: ClassVar[type[TaskConfig]] = DownscalingConfig
    headline: ClassVar[tuple[str, ...]] = GLOBAL_HEADLINE
    config: DownscalingConfig

    def __init__(self, config: TaskConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._data: _Data | None = None
        self._std: dict[str, float] | None = None  # normalisation std per stats key
        self._fill: dict[str, Any] | None = None  # constant inputs for absent variables (ERA5)

    # --- data -------------------------------------------------------------------------------

    @property
    def data(self) -> _Data:
        if self._data is None:
            self._data = (
                self._load_era5() if self.config.source == "era5-uk" else self._load_world()
            )
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
        return self._finish(inputs, truth)

    def _load_era5(self) -> _Data:
        cfg = self.config
        ds = _longest_run(open_era5(cfg.path, variables=["2m_temperature"]))  # type: ignore[arg-type]
        h, w = cfg.era5_crop
        if ds.sizes["latitude"] < h or ds.sizes["longitude"] < w:
            raise DataError(
                f"era5_crop={cfg.era5_crop} is larger than the data's {ds.sizes['latitude']} "
                f"latitudes x {ds.sizes['longitude']} contiguous longitudes (a region across the "
                "prime meridian is cut there: the backbone needs increasing longitudes in "
                "[0, 360)). Choose a smaller crop."
            )
        fine = ds.isel(latitude=slice(0, h), longitude=slice(0, w)).load()  # small: one field
        coarse = coarsen_conservative(fine, cfg.era5_coarse_factor)
        up = upsample_bilinear(coarse, fine)
        inputs = Fields.from_dataset(up, surf_vars=("2t",), atmos_vars=())
        truth = Fields.from_dataset(fine, surf_vars=("2t",), atmos_vars=())
        return self._finish(inputs, truth)

    def _finish(self, inputs: Fields, truth: Fields) -> _Data:
        step = time_step(truth.times)
        lag = SIX_HOURS / step
        if lag != int(lag) or lag < 1:
            raise DataError(f"The data's time step ({step}) does not divide 6 hours.")
        lag = int(lag)
        samples = np.arange(lag, len(truth), dtype=np.int64)
        splits = split_by_time(samples - lag, samples, self.config.split_fractions)
        return _Data(inputs=inputs, truth=truth, lag=lag, samples=samples, splits=splits)

    # --- the Task API -----------------------------------------------------------------------

    def setup(self, model: WpeftAurora) -> nn.Module:
        """Take the normalisation statistics from the backbone (and, for ERA5, the constant
        inputs of the absent variables). No new parameters: returns an empty :class:`TaskHead`."""
        data = self.data
        check_patch_grid(model, *data.truth.grid)
        std: dict[str, float] = {}
        for v in data.truth.surf:
            std[norm_key(v)] = require_stats(model, v)[1]
        for v in data.truth.atmos:
            for lv in data.truth.levels:
                std[norm_key(v, lv)] = require_stats(model, v, lv)[1]
        self._std = std
        if self.config.source == "era5-uk":
            levels = self.config.fill_levels
            self._fill = {
                "surf": {v: require_stats(model, v)[0] for v in model.config.surf_vars},
                "static": {v: require_stats(model, v)[0] for v in model.config.static_vars},
                "atmos": {
                    v: [require_stats(model, v, lv)[0] for lv in levels]
                    for v in model.config.atmos_vars
                },
                "levels": levels,
            }
        return TaskHead()

    def num_samples(self, split: Split) -> int:
        return int(self.data.splits[check_split(split)].size)

    def batches(
        self, split: Split, batch_size: int, *, seed: int = 0, shuffle: bool | None = None
    ) -> Iterator[TaskBatch]:
        """Batches of ``split``. Inputs: surface ``(B, 2, H, W)``, atmos ``(B, 2, C, H, W)``;
        targets (fine ``t + 6 h``): surface ``(B, H, W)``, atmos ``(B, C, H, W)``, physical."""
        data = self.data
        positions = data.splits[check_split(split)]
        shuffle = split == "train" if shuffle is None else shuffle
        for chunk in index_batches(positions, batch_size, shuffle=shuffle, seed=seed):
            yield self._batch(data.samples[chunk])

    def _batch(self, targets: np.ndarray) -> TaskBatch:
        data = self.data
        idx = torch.as_tensor(targets, dtype=torch.long)
        window = torch.stack([idx - data.lag, idx], dim=1)  # (B, 2): t, t + 6 h
        surf = {k: v[window] for k, v in data.inputs.surf.items()}
        atmos = {k: v[window] for k, v in data.inputs.atmos.items()}
        static = dict(data.truth.static)
        levels: Sequence[int] = data.truth.levels
        if self.config.source == "era5-uk":
            surf, atmos, static, levels = self._complete(surf)
        truth = {wb2_name(k, "surface"): v[idx] for k, v in data.truth.surf.items()}
        truth |= {wb2_name(k, "atmos"): v[idx] for k, v in data.truth.atmos.items()}
        times = data.truth.times[targets]
        inputs = make_batch(surf, atmos, static, data.truth.lat, data.truth.lon, levels, times)
        return TaskBatch(inputs=inputs, targets=truth, times=times)

    def _complete(self, surf: dict[str, torch.Tensor]) -> tuple[dict, dict, dict, Sequence[int]]:
        """ERA5: the backbone's other variables as constant fields at its normalisation mean."""
        if self._fill is None:
            raise ConfigError(
                "The ERA5 variant feeds absent variables at the backbone's normalisation mean: "
                "call task.setup(model) before drawing batches."
            )
        fill = self._fill
        shape = next(iter(surf.values())).shape  # (B, T, H, W)
        H, W = shape[-2:]
        out_surf = {
            v: surf[v] if v in surf else torch.full(shape, m, dtype=torch.float32)
            for v, m in fill["surf"].items()
        }
        levels = fill["levels"]
        atmos = {
            v: torch.tensor(ms, dtype=torch.float32)
            .view(1, 1, -1, 1, 1)
            .expand(*shape[:2], len(levels), H, W)
            .clone()
            for v, ms in fill["atmos"].items()
        }
        static = {v: torch.full((H, W), m, dtype=torch.float32) for v, m in fill["static"].items()}
        return out_surf, atmos, static, levels

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
                s = channel_std(
                    [std[norm_key(spec.aurora, lv)] for lv in self.data.truth.levels], p
                )
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
        if data.truth.levels:
            coords["level"] = np.asarray(data.truth.levels, dtype=np.int64)
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
        out = super().describe()
        if self._data is not None:
            out["samples"] = {s: self.num_samples(s) for s in SPLITS}
            out["grid"] = list(self._data.truth.grid)
        return out


def _longest_run(ds: xr.Dataset) -> xr.Dataset:
    """The longest run of regularly spaced, increasing longitudes of a regional grid.

    The schema (and Aurora's ``Metadata``) need longitudes increasing within [0, 360), so a
    region across the prime meridian (the UK: 10°W-2°E) comes as two pieces, 0..2 and
    350..359.75; only one of them can be fed to the backbone with its true coordinates. A global
    grid is one run.
    """
    lon = np.asarray(ds["longitude"].values, dtype=np.float64)
    if lon.size < 2:
        return ds
    steps = np.diff(lon)
    spacing = float(np.median(steps))
    breaks = np.nonzero(steps > 1.5 * spacing)[0]
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks + 1, [lon.size]])
    longest = int(np.argmax(ends - starts))
    return ds.isel(longitude=slice(int(starts[longest]), int(ends[longest])))
