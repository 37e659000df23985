"""Ensemble post-processing (METHOD.md §4): a calibrated Gaussian from a raw ensemble.

Why this task: raw ensembles are biased and under-dispersive (the embedded world's members run a
perturbed model, like real ones). Post-processing turns the ensemble mean and spread into a
calibrated predictive distribution, scored with the CRPS. The paper's heads are kept: per
variable (and level) a Gaussian

    μ = m · σ_ens + μ_ens,        σ = exp(s) · σ_ens,

whose loss is the closed-form Gaussian CRPS ``σ [z (2Φ(z) − 1) + 2φ(z) − 1/√π]``,
``z = (μ − y)/σ``, divided by the variable's normalisation std (so it is in normalised units) and
averaged over all variable-level channels.

How it maps onto Aurora:

* Inputs are the ensemble mean ``μ_ens`` and spread ``σ_ens`` (std over members, ``ddof=1``,
  floored at ``sigma_floor`` times the variable's climatological std of the train split) of the
  surface (2t, 10u, 10v, msl) and atmospheric (z, u, v, t, q) variables, fed as the backbone's two
  history steps: **step 0 = μ_ens − σ_ens, step 1 = μ_ens**. Both steps are physical states in
  the range the pretrained encoder knows (a raw spread of 0.5 K fed as "2 m temperature" would sit
  15 standard deviations from its mean), and their difference -- the "tendency" the backbone reads
  -- is the spread.
* ``m`` is the variable's own pretrained decoder head: with the residual ``tiny`` backbone the
  output is ``μ_ens`` plus the decoder's normalised increment ``δ``; we take ``m = δ``, i.e.
  ``m = (output − μ_ens) / std`` with the backbone's normalisation std (for a non-residual
  backbone this is the same formula on the full-state output).
* ``s`` comes from NEW pseudo-variables ``"<aurora name>_logscale"`` (``2t_logscale``, ...,
  ``t_logscale`` at every level): each gets a new embedding kernel, fed with the normalised log
  spread ``log(σ_ens / climatological std)`` at both history steps (standardised with train-split
  statistics registered in the backbone), and a new decoder head; ``s`` is the head's normalised
  departure from that input (its increment). This uses nothing but Aurora's variable mechanism:
  the encoder embeds whatever variables the batch has, the decoder predicts each of them.
  Kernels and heads start at **zero**: at initialisation the pretrained forward pass is exactly
  unchanged and ``σ = σ_ens``, i.e. training starts from the raw ensemble.

``s`` is clamped to ``[-10, 10]`` before ``exp``. Samples are the ensemble forecasts (one per
init time, lead ``ensemble_lead_hours``); splits are contiguous blocks of init times (2/3, 1/6,
1/6: 32/8/8 of the default 48), dropping forecasts whose ``[init, valid]`` window overlaps the
previous block's.

Real ensembles (the paper's set-up: ENS-10, 10 members, +48 h, ERA5 truth). ``data=`` describes
the ensemble store (WB2 IFS ENS zarr, ENS-10 folder; :func:`~wpeft.data.era5.open_era5` gives it
a ``member`` dim, a ``lead_time`` dim and ``time`` = init time), ``truth_path=`` an ERA5 store
with the truth, ``lead_hours`` the lead (default 48). The backbone decides what is read, so the
data is opened in :meth:`Postprocessing.setup`:

* Inputs as above for every surface and atmospheric variable the backbone embeds, at
  ``data.levels`` or else the store's levels the backbone has statistics for (ENS-10 has 11,
  Aurora 13); inputs and statics the store lacks (statics may come from ``data.statics``) are
  refused unless ``data.fill_missing`` (then fed as constants, recorded).
* Targets ``data.variables``, default T2m, temperature and geopotential (METHOD.md §4: T850,
  Z500, T2m), trained and scored at every level read: the ``paper-postprocessing`` recipe reads
  ``levels: [500, 850]``. The other inputs get log-scale heads too (their spread is an input)
  but no loss.
* The truth is read at init + lead; missing valid times, another grid (after the region crop)
  and a store without members, with one member or without the lead are refused by name.
  Splits are by init time: periods (a forecast belongs to a period when its init and valid
  times lie inside) or ``split_fractions``.
* Everything stays lazy: the ensemble mean and spread are dask graphs over the store, one init
  per chunk, read per batch (the spread floored then). Reading happens up front only for
  ``data.check_finite`` (one pass over the selected ensemble and truth) and for the train-split
  statistics: the climatological std of the truth (of the ensemble mean for inputs the truth
  lacks, e.g. ENS-10's ERA5 files with the targets only) and then the log-spread statistics.
  :meth:`Postprocessing.describe` records them with the paths, lead, members, levels and the
  filled inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
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
from wpeft.data.batch import Fields, load_t, wb2_name
from wpeft.data.era5 import check_finite
from wpeft.data.headline import BUILTIN_HEADLINES
from wpeft.data.schema import VARIABLES
from wpeft.data.source import DataSource, open_source, open_store, select_region
from wpeft.data.stats import compute_stats
from wpeft.data.world import WorldConfig, open_world, open_world_ensemble
from wpeft.errors import ConfigError, DataError
from wpeft.metrics import crps_gaussian, rmse
from wpeft.tasks.base import Split, Task, TaskBatch, TaskConfig, register_task
from wpeft.tasks.common import (
    ATMOS_VARS,
    SPLITS,
    STATIC_VARS,
    SURF_VARS,
    ConstantInputs,
    TaskHead,
    add_variable,
    backbone_inputs,
    channel_std,
    check_fractions,
    check_patch_grid,
    check_split,
    coerce_world,
    index_batches,
    make_batch,
    missing_inputs,
    per_level_scores,
    refuse_fixed_grid,
    register_norm,
    require_stats,
    split_by_time,
    split_samples,
    var_attrs,
)

__all__ = ["LOGSCALE_SUFFIX", "Postprocessing", "PostprocessingConfig", "gaussian_crps"]

#: Suffix of the pseudo-variables whose heads predict the log scale ``s``.
LOGSCALE_SUFFIX = "_logscale"
_S_CLAMP = 10.0
#: The paper's lead (ENS-10 forecasts at +48 h) and targets (T2m, T850, Z500: METHOD.md §4, the
#: ENS-10 benchmark's). Atmospheric targets are trained and scored at every level read, so the
#: paper's set-up reads ``data.levels: [500, 850]`` (as the ``paper-postprocessing`` recipe does).
DEFAULT_LEAD_HOURS = 48
DEFAULT_TARGETS: tuple[str, ...] = ("2m_temperature", "temperature", "geopotential")
_INV_SQRT_PI = 1.0 / math.sqrt(math.pi)


def gaussian_crps(mu: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pointwise CRPS of N(mu, sigma²) at ``y``: ``σ [z (2Φ(z) − 1) + 2φ(z) − 1/√π]``,
    ``z = (μ − y)/σ`` (even in z). Differentiable in ``mu`` and ``sigma``; any shape."""
    z = (mu - y) / sigma
    cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return sigma * (z * (2.0 * cdf - 1.0) + 2.0 * pdf - _INV_SQRT_PI)


@dataclass
class PostprocessingConfig(TaskConfig):
    """Settings of the ensemble post-processing task.

    ``source="world"`` (default) post-processes the embedded world's ensemble; ``data=`` (a
    :class:`~wpeft.data.source.DataSource` of an ensemble store) with ``truth_path`` a real one
    (see "Real ensembles" in the module docstring).
    """

    #: Embedded world whose ensemble forecasts (``ensemble_*`` fields) are post-processed.
    world: WorldConfig = field(default_factory=WorldConfig)
    #: Train, val, test fractions of the time-ordered forecasts (default 32/8/8 of 48); real
    #: data with periods (``data.train`` ...) split by init time instead.
    split_fractions: tuple[float, float, float] = (2 / 3, 1 / 6, 1 / 6)
    #: Floor of the ensemble spread, as a fraction of the variable's climatological std
    #: (train split), so that ``σ = exp(s) σ_ens`` and ``log σ_ens`` stay finite.
    sigma_floor: float = 0.01
    #: Cache directory of the embedded world (default: ``$WPEFT_CACHE_DIR`` or the user cache).
    cache_dir: str | None = None
    #: Real data: an ERA5 store or file with the truth at the forecasts' valid times (the
    #: target variables at the same levels, on the same grid once the region is cropped).
    truth_path: str | None = None
    #: Real data: the lead (hours) to post-process, one of the store's leads (``None``: 48, the
    #: paper's). The embedded world has one lead, ``world.ensemble_lead_hours``; a different
    #: value is refused.
    lead_hours: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source not in ("world", "data"):
            raise ConfigError(
                f"source={self.source!r}: post-processing reads the embedded world ('world') "
                "or a real ensemble store given as data= (with truth_path=)."
            )
        self.world = coerce_world(self.world)
        self.split_fractions = check_fractions(self.split_fractions)  # type: ignore[assignment]
        f = self.sigma_floor
        if not isinstance(f, (int, float)) or not math.isfinite(f) or not 0 < f < 1:
            raise ConfigError(f"sigma_floor={f!r} must be a number in (0, 1).")
        lead = self.lead_hours
        if lead is not None and (not isinstance(lead, int) or isinstance(lead, bool) or lead < 1):
            raise ConfigError(f"lead_hours={lead!r} must be a positive integer (hours).")
        if self.data is None:
            if self.truth_path is not None:
                raise ConfigError(
                    "truth_path= is the truth of a real ensemble store: give data= (the store) "
                    "too, or drop truth_path for the embedded world."
                )
            if lead is not None and lead != self.world.ensemble_lead_hours:
                raise ConfigError(
                    f"lead_hours={lead}: the embedded world's ensemble has one lead, "
                    f"world.ensemble_lead_hours={self.world.ensemble_lead_hours}; set that instead."
                )
            return
        if not isinstance(self.truth_path, str) or not self.truth_path.strip():
            raise ConfigError(
                f"truth_path={self.truth_path!r}: a real ensemble needs the truth at its valid "
                "times, an ERA5 store or file (same variables, levels and region as data)."
            )
        if lead is None:
            self.lead_hours = DEFAULT_LEAD_HOURS
        bad = [n for n in self.targets if VARIABLES[n].kind not in ("surface", "atmos")]
        if bad:
            raise ConfigError(
                f"data variables {bad} are static fields; the targets of post-processing are "
                "surface or atmospheric variables (default: "
                f"{list(DEFAULT_TARGETS)})."
            )

    @property
    def targets(self) -> tuple[str, ...]:
        """WB2 names of the variables post-processed, scored and trained on: ``data.variables``
        (default :data:`DEFAULT_TARGETS`) for real data, every ensemble variable for the world."""
        if self.data is None:
            return tuple(wb2_name(v, "surface") for v in SURF_VARS) + tuple(
                wb2_name(v, "atmos") for v in ATMOS_VARS
            )
        return self.data.variables or DEFAULT_TARGETS


@dataclass
class _Data:
    """Ensemble statistics and truth (surface ``(N, H, W)``, atmos ``(N, C, H, W)``), in memory
    for the embedded world, :class:`~wpeft.data.batch.LazyVariable` views for real stores.

    Attributes:
        mean / spread: Ensemble mean and spread of the inputs the store holds (the world's
            spread is floored already; real spreads are floored per batch).
        truth: Truth of the targets at the valid times (the world's: every variable).
        static: Static fields ``(H, W)`` by Aurora name (those the data holds).
        levels: Pressure levels of the atmospheric variables.
        logscale: ``{pseudo name: (mean, std)}`` of the log-spread input per stats key.
        clim_std: Climatological std (train split) per stats key (``"2t"``, ``"z_500"``): the
            unit of the log spread and of the floor.
        init_times: ``(N,)`` init times; ``truth.times`` are the valid times.
        splits: Forecast positions per split.
        lacking: Backbone inputs the data lacks, fed as constants (``data.fill_missing``).
        info: What :meth:`Postprocessing.describe` records about the data.
    """

    mean: Fields
    spread: Fields
    truth: Fields
    static: dict[str, torch.Tensor]
    levels: tuple[int, ...]
    logscale: dict[str, tuple[float, float]]
    clim_std: dict[str, float]
    init_times: np.ndarray
    splits: dict[Split, np.ndarray]
    lacking: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)


@register_task
class Postprocessing(Task):
    """Raw ensemble (mean, spread) -> Gaussian (μ, σ) per variable; see the module docstring."""

    name: ClassVar[str] = "postprocessing"
    Config: ClassVar[type[TaskConfig]] = PostprocessingConfig
    headline: ClassVar[tuple[str, ...]] = BUILTIN_HEADLINES["postprocessing"]
    num_prompts: ClassVar[int] = 5  # TADP prompt tokens (the paper's P for this task)
    config: PostprocessingConfig

    def __init__(self, config: TaskConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._data: _Data | None = None
        self._std: dict[str, float] | None = None
        self._fill: ConstantInputs | None = None
        #: What the real data was read for: the backbone's inputs and levels (set by setup).
        self._reads: tuple[dict[str, tuple[str, ...]], tuple[int, ...]] | None = None

    # --- data -------------------------------------------------------------------------------

    @property
    def data(self) -> _Data:
        if self._data is None:
            if self.config.data is not None:
                if self._reads is None:
                    raise ConfigError(
                        "Call task.setup(model) first: on a real store the backbone decides which "
                        "inputs and levels are read."
                    )
                self._data = self._load_store(*self._reads)
            else:
                self._data = self._load_world()
        return self._data

    def _load_world(self) -> _Data:
        cfg = self.config
        cache = Path(cfg.cache_dir) if cfg.cache_dir else None
        ens = open_world_ensemble(cfg.world, cache_dir=cache, progress=False)
        if ens.sizes["member"] < 2:
            raise DataError(
                f"The ensemble has {ens.sizes['member']} member(s); a spread needs at least 2 "
                "(WorldConfig(ensemble_members=...))."
            )
        truth_ds = open_world(cfg.world, cache_dir=cache, progress=False).sel(time=ens["time"])
        names = list(cfg.targets)
        init_times = np.asarray(ens["init_time"].values)
        valid_times = np.asarray(ens["time"].values)
        splits = split_by_time(init_times, valid_times, cfg.split_fractions, "ensemble forecasts")

        # climatological std of the truth on the train forecasts' valid times: the spread floor
        train_times = valid_times[splits["train"]]
        clim = compute_stats(truth_ds[names].sel(time=train_times))
        ens_mean = ens[names].mean("member")
        spread = ens[names].std("member", ddof=1)
        mean = Fields.from_dataset(ens_mean, surf_vars=SURF_VARS, atmos_vars=ATMOS_VARS)
        spread_f = Fields.from_dataset(spread, surf_vars=SURF_VARS, atmos_vars=ATMOS_VARS)
        truth = Fields.from_dataset(
            truth_ds, surf_vars=SURF_VARS, atmos_vars=ATMOS_VARS, static_vars=STATIC_VARS
        )
        levels = truth.levels
        floor = cfg.sigma_floor
        logscale: dict[str, tuple[float, float]] = {}
        train = torch.as_tensor(splits["train"])
        for k, x in spread_f.surf.items():
            c = clim.std[norm_key(k)]
            x.clamp_(min=floor * c)
            lg = torch.log(x[train] / c)
            logscale[norm_key(k + LOGSCALE_SUFFIX)] = _mean_std(lg)
        for k, x in spread_f.atmos.items():
            for i, lv in enumerate(levels):
                c = clim.std[norm_key(k, lv)]
                x[:, i].clamp_(min=floor * c)
                lg = torch.log(x[train, i] / c)
                logscale[norm_key(k + LOGSCALE_SUFFIX, lv)] = _mean_std(lg)
        return _Data(
            mean=mean,
            spread=spread_f,
            truth=truth,
            static=dict(truth.static),
            levels=levels,
            logscale=logscale,
            clim_std=dict(clim.std),
            init_times=init_times,
            splits=splits,
        )

    def _load_store(
        self, inputs: dict[str, tuple[str, ...]], backbone_levels: tuple[int, ...]
    ) -> _Data:
        """Open the ensemble store and the truth lazily, select the lead, check and split them,
        and compute the train-split statistics (one pass over the truth, one over the ensemble).

        Args:
            inputs: WB2 names the backbone embeds, by kind (:func:`backbone_inputs`).
            backbone_levels: Levels the backbone has statistics for (used when
                ``data.levels`` is not set: the store's levels among them).
        """
        cfg = self.config
        src = cfg.data
        assert src is not None and cfg.truth_path is not None and cfg.lead_hours is not None
        targets = cfg.targets
        not_embedded = [
            n
            for n in targets
            if n not in inputs[VARIABLES[n].kind]  # type: ignore[index]
        ]
        if not_embedded:
            raise ConfigError(
                f"data variables {not_embedded} are not inputs of the backbone, whose decoder "
                "heads give μ; post-process variables it embeds: "
                f"{[*inputs['surface'], *inputs['atmos']]}."
            )
        optional = [
            n for n in (*inputs["surface"], *inputs["atmos"], *inputs["static"]) if n not in targets
        ]
        ens, lacking = open_source(src, required=targets, optional=optional)
        where = src.path
        if "member" not in ens.dims:
            raise DataError(
                f"{where} needs a member dimension (number / member) for an ensemble spread; it "
                f"has dims {sorted(map(str, ens.dims))}. Point data.path at an ensemble store "
                "(WB2 IFS ENS zarr, ENS-10 folder)."
            )
        members = int(ens.sizes["member"])
        if members < 2:
            raise DataError(f"{where} has {members} ensemble member; a spread needs at least 2.")
        ens = _select_lead(ens, cfg.lead_hours, where)
        ens = _select_levels(ens, src.levels, backbone_levels, where)
        if "level" in ens.dims:
            levels = tuple(int(x) for x in ens["level"].values)
        else:  # no atmospheric variable in the store: those filled are fed at these levels
            levels = src.levels or backbone_levels
        lead = np.timedelta64(cfg.lead_hours, "h")
        init_times = np.asarray(ens["time"].values, dtype="datetime64[ns]")
        valid_times = init_times + lead
        others = [n for n in optional if n in ens.data_vars]
        truth = _open_truth(cfg.truth_path, src, targets, others, levels, ens, valid_times)
        splits = split_samples(init_times, valid_times, cfg, "ensemble forecasts")
        used = np.unique(np.concatenate(list(splits.values())))
        ens_vars = [n for n in ens.data_vars if VARIABLES[str(n)].kind != "static"]
        truth_vars = [n for n in truth.data_vars if VARIABLES[str(n)].kind != "static"]
        if src.check_finite:  # one pass over the selected forecasts and truth, before training
            check_finite(ens[ens_vars].isel(time=used).chunk({"time": 1}))
            check_finite(truth[truth_vars].isel(time=used).chunk({"time": _TRUTH_CHUNK}))

        # lazy mean and spread: dask graphs over the store, one init per chunk, read per batch
        forecast = ens[ens_vars].chunk({"time": 1})
        mean_ds = forecast.mean("member")
        spread_ds = forecast.std("member", ddof=1)
        surf = [VARIABLES[str(n)].aurora for n in ens_vars if VARIABLES[str(n)].kind == "surface"]
        atmos = [VARIABLES[str(n)].aurora for n in ens_vars if VARIABLES[str(n)].kind == "atmos"]
        statics = [str(n) for n in ens.data_vars if VARIABLES[str(n)].kind == "static"]

        # climatological std (train split): the truth's where it holds the variable, else the
        # ensemble mean's; then the log-spread statistics with it
        train = splits["train"]
        in_truth = [str(n) for n in truth_vars]
        from_mean = [str(n) for n in ens_vars if str(n) not in in_truth]

        def train_statistics() -> dict[str, Any]:
            truth_train = truth[in_truth].isel(time=train).chunk({"time": _TRUTH_CHUNK})
            clim = dict(compute_stats(truth_train).std)
            if from_mean:
                clim |= compute_stats(mean_ds[from_mean].isel(time=train)).std
            logscale = _logscale_stats(spread_ds.isel(time=train), clim, cfg.sigma_floor)
            return {
                "clim_std": {k: float(v) for k, v in clim.items()},
                "logscale": {k: [float(m), float(sd)] for k, (m, sd) in logscale.items()},
            }

        cached = self.cached_statistics("train", train_statistics)
        clim = {k: float(v) for k, v in cached["clim_std"].items()}
        logscale = {k: (float(m), float(sd)) for k, (m, sd) in cached["logscale"].items()}

        truth_sel = truth[truth_vars]
        t_surf = [VARIABLES[n].aurora for n in targets if VARIABLES[n].kind == "surface"]
        t_atmos = [VARIABLES[n].aurora for n in targets if VARIABLES[n].kind == "atmos"]
        static = {VARIABLES[n].aurora: load_t(ens, n, ("latitude", "longitude")) for n in statics}
        info = {
            "data_path": where,
            "truth_path": cfg.truth_path,
            "lead_hours": cfg.lead_hours,
            "members": members,
            "levels": list(levels),
            "targets": list(targets),
            "filled": list(lacking),
            "forecasts": len(init_times),
            "init_times": [str(init_times[0]), str(init_times[-1])],
            "clim_std_from_ensemble_mean": from_mean,
        }
        return _Data(
            mean=Fields.from_dataset(mean_ds, surf_vars=surf, atmos_vars=atmos, lazy=True),
            spread=Fields.from_dataset(spread_ds, surf_vars=surf, atmos_vars=atmos, lazy=True),
            truth=Fields.from_dataset(truth_sel, surf_vars=t_surf, atmos_vars=t_atmos, lazy=True),
            static=static,
            levels=levels,
            logscale=logscale,
            clim_std=dict(clim),
            init_times=init_times,
            splits=splits,
            lacking=tuple(lacking),
            info=info,
        )

    # --- the Task API -----------------------------------------------------------------------

    def setup(self, model: WpeftAurora) -> nn.Module:
        """Install one ``<name>_logscale`` pseudo-variable per surface and atmospheric input
        (zero-initialised embedding kernel + zero-initialised decoder head) and register the
        log-spread statistics; take the other statistics from the backbone. On a real store this
        first reads the data for the backbone's inputs and levels.

        Returns:
            A :class:`TaskHead` with one kernel and head per ensemble input (the world: 9).
        """
        if self.config.data is not None:
            refuse_fixed_grid(model, "Post-processing")
            reads = (backbone_inputs(model), _backbone_levels(model))
            if self._reads != reads:
                self._reads, self._data = reads, None
        data = self.data
        check_patch_grid(model, *data.truth.grid)
        missing = missing_inputs(model, data.mean.surf, data.mean.atmos)
        if missing:
            raise ConfigError(
                f"The backbone has no embedding for {missing}; it cannot read the ensemble."
            )
        std: dict[str, float] = {}
        for k in data.mean.surf:
            std[norm_key(k)] = require_stats(model, k)[1]
        for k in data.mean.atmos:
            for lv in data.levels:
                std[norm_key(k, lv)] = require_stats(model, k, lv)[1]
        self._fill = ConstantInputs(model, data.lacking, data.levels) if data.lacking else None
        head = TaskHead()
        for k in data.mean.surf:
            add_variable(
                model, head, k + LOGSCALE_SUFFIX, "surface", embed_init="zeros", head_init="zeros"
            )
        for k in data.mean.atmos:
            add_variable(
                model, head, k + LOGSCALE_SUFFIX, "atmos", embed_init="zeros", head_init="zeros"
            )
        for key, (m, s) in data.logscale.items():
            register_norm(model, key, m, s)
            std[key] = s
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

        Inputs: ``<v>`` = (μ_ens − σ_ens, μ_ens) and ``<v>_logscale`` = log(σ_ens / clim std)
        twice, surface ``(B, 2, H, W)``, atmos ``(B, 2, C, H, W)``, for every input the data
        holds (real stores: missing ones as constants, see ``data.fill_missing``). Targets: truth
        at the valid times, ``(B, H, W)`` / ``(B, C, H, W)``. Extra: ``<wb2>_ens_mean`` and
        ``<wb2>_ens_spread`` (floored) of the targets, same shapes, physical units.
        """
        data = self.data
        positions = data.splits[check_split(split)]
        shuffle = split == "train" if shuffle is None else shuffle
        for chunk in index_batches(positions, batch_size, shuffle=shuffle, seed=seed, shard=shard):
            yield self._batch(chunk)

    def _batch(self, positions: np.ndarray) -> TaskBatch:
        data = self.data
        idx = torch.as_tensor(positions, dtype=torch.long)
        levels = data.levels
        floor = self.config.sigma_floor  # the world's spreads are floored at load, real ones here
        surf: dict[str, torch.Tensor] = {}
        atmos: dict[str, torch.Tensor] = {}
        targets: dict[str, torch.Tensor] = {}
        extra: dict[str, torch.Tensor] = {}
        for kind, means, spreads, truths, out in (
            ("surface", data.mean.surf, data.spread.surf, data.truth.surf, surf),
            ("atmos", data.mean.atmos, data.spread.atmos, data.truth.atmos, atmos),
        ):
            for k in means:
                lvs = levels if kind == "atmos" else None
                mu = means[k][idx]
                sd = torch.maximum(spreads[k][idx], self._clim_tensor(k, lvs, scale=floor))
                out[k] = torch.stack([mu - sd, mu], dim=1)
                log_ratio = torch.log(sd / self._clim_tensor(k, lvs))
                out[k + LOGSCALE_SUFFIX] = torch.stack([log_ratio, log_ratio], dim=1)
                if k in truths:
                    name = wb2_name(k, kind)  # type: ignore[arg-type]
                    targets[name] = truths[k][idx]
                    extra[f"{name}_ens_mean"] = mu
                    extra[f"{name}_ens_spread"] = sd
        static = dict(data.static)
        if self._fill is not None:
            surf, atmos, static = self._fill.complete(
                surf, atmos, static, (len(positions), 2), data.truth.grid
            )
        times = data.truth.times[positions]
        inputs = make_batch(surf, atmos, static, data.truth.lat, data.truth.lon, levels, times)
        return TaskBatch(inputs=inputs, targets=targets, times=times, extra=extra)

    def _clim_tensor(
        self, k: str, levels: tuple[int, ...] | None, scale: float = 1.0
    ) -> torch.Tensor:
        """``scale`` times the climatological std of ``k``: a scalar tensor, or ``(C, 1, 1)``
        over ``levels`` (float32 of the float64 product, as a clamp to it gives)."""
        clim = self.data.clim_std
        if levels is None:
            return torch.tensor(scale * clim[norm_key(k)])
        return torch.tensor([scale * clim[norm_key(k, lv)] for lv in levels]).view(-1, 1, 1)

    def predict(self, model: WpeftAurora, batch: TaskBatch) -> dict[str, torch.Tensor]:
        """Gaussian parameters per target, physical units: ``<wb2>`` = μ and
        ``<wb2>_sigma`` = σ, surface ``(B, H, W)``, atmos ``(B, C, H, W)``."""
        std = self._require_std()
        out = model(batch.inputs)
        levels = batch.inputs.metadata.atmos_levels
        pred: dict[str, torch.Tensor] = {}
        for name in self._names():
            kind = VARIABLES[name].kind
            k = VARIABLES[name].aurora
            outputs, inputs = (
                (out.surf_vars, batch.inputs.surf_vars)
                if kind == "surface"
                else (out.atmos_vars, batch.inputs.atmos_vars)
            )
            x = outputs[k][:, 0]
            mu_ens = inputs[k][:, -1].to(x.device)
            ls = k + LOGSCALE_SUFFIX
            xs, ls_in = outputs[ls][:, 0], inputs[ls][:, -1].to(x.device)
            if kind == "surface":
                s_m, s_s = std[norm_key(k)], std[norm_key(ls)]
            else:
                s_m = channel_std([std[norm_key(k, lv)] for lv in levels], x)
                s_s = channel_std([std[norm_key(ls, lv)] for lv in levels], x)
            sd = batch.extra[f"{name}_ens_spread"].to(x.device)
            m = (x - mu_ens) / s_m
            s = ((xs - ls_in) / s_s).clamp(-_S_CLAMP, _S_CLAMP)
            pred[name] = mu_ens + m * sd
            pred[f"{name}_sigma"] = torch.exp(s) * sd
        return pred

    def loss(self, prediction: dict[str, torch.Tensor], batch: TaskBatch) -> torch.Tensor:
        """Mean over variable-level channels of the mean Gaussian CRPS in normalised units."""
        std = self._require_std()
        levels = batch.inputs.metadata.atmos_levels
        terms: list[torch.Tensor] = []
        for name, target in batch.targets.items():
            mu, sigma = prediction[name], prediction[f"{name}_sigma"]
            y = target.to(mu.device)
            crps = gaussian_crps(mu, sigma, y)
            k = VARIABLES[name].aurora
            if mu.dim() == 3:
                terms.append(crps.mean() / std[norm_key(k)])
            else:
                s = channel_std([std[norm_key(k, lv)] for lv in levels], mu)
                terms.extend((crps / s).mean(dim=(0, 2, 3)).unbind())
        return torch.stack(terms).mean()

    def _require_std(self) -> dict[str, float]:
        if self._std is None:
            raise ConfigError("Call task.setup(model) first: it installs the log-scale heads.")
        return self._std

    @torch.no_grad()
    def evaluate(
        self, model: WpeftAurora, split: Split = "test", batch_size: int = 8
    ) -> tuple[xr.Dataset, dict[str, float]]:
        """Gaussian forecasts, raw ensemble statistics and truth of ``split``, and scores.

        Returns:
            A Dataset on (``time`` = valid time, [``level``,] ``latitude``, ``longitude``) with
            ``init_time`` along ``time`` and, per variable, ``<wb2>`` (μ), ``<wb2>_sigma`` (σ),
            ``<wb2>_target``, ``<wb2>_ens_mean``, ``<wb2>_ens_spread``; scores (latitude
            weighted) ``"crps/<name>"``, ``"rmse/<name>"`` of μ and the raw ensemble's
            ``"crps_raw/<name>"`` (N(μ_ens, σ_ens²)) and ``"rmse_raw/<name>"``, with names like
            ``"temperature_850"`` for levels.
        """
        self._require_std()
        data = self.data
        was_training = model.training
        model.eval()
        suffixes = {
            "": "(post-processed mean)",
            "_sigma": "(post-processed std)",
            "_target": "(truth)",
            "_ens_mean": "(raw ensemble mean)",
            "_ens_spread": "(raw ensemble spread, floored)",
        }
        parts: dict[tuple[str, str], list[np.ndarray]] = {}
        try:
            for batch in self.batches(split, batch_size, shuffle=False):
                pred = self.predict(model, batch)
                for name, y in batch.targets.items():
                    values = {
                        "": pred[name],
                        "_sigma": pred[f"{name}_sigma"],
                        "_target": y,
                        "_ens_mean": batch.extra[f"{name}_ens_mean"],
                        "_ens_spread": batch.extra[f"{name}_ens_spread"],
                    }
                    for suffix, value in values.items():
                        parts.setdefault((name, suffix), []).append(value.float().cpu().numpy())
        finally:
            model.train(was_training)
        positions = data.splits[split]
        coords: dict[str, Any] = {
            "time": data.truth.times[positions],
            "init_time": ("time", data.init_times[positions]),
            "latitude": data.truth.lat.numpy().astype(np.float64),
            "longitude": data.truth.lon.numpy().astype(np.float64),
        }
        if data.levels:
            coords["level"] = np.asarray(data.levels, dtype=np.int64)
        variables = {}
        for (name, suffix), arrays in parts.items():
            dims = ("time", "latitude", "longitude")
            if VARIABLES[name].kind == "atmos":
                dims = ("time", "level", "latitude", "longitude")
            variables[name + suffix] = xr.DataArray(
                np.concatenate(arrays), dims=dims, attrs=var_attrs(name, suffixes[suffix])
            )
        ds = xr.Dataset(variables, coords=coords, attrs={"task": self.name, "split": split})
        scores: dict[str, float] = {}
        for name in self._names():
            y = ds[f"{name}_target"]
            scores |= per_level_scores(
                "crps", name, crps_gaussian(ds[name], ds[f"{name}_sigma"], y)
            )
            scores |= per_level_scores("rmse", name, rmse(ds[name], y))
            scores |= per_level_scores(
                "crps_raw", name, crps_gaussian(ds[f"{name}_ens_mean"], ds[f"{name}_ens_spread"], y)
            )
            scores |= per_level_scores("rmse_raw", name, rmse(ds[f"{name}_ens_mean"], y))
        return ds, scores

    def _names(self) -> tuple[str, ...]:
        """The targets (WB2 names): every ensemble variable for the world, the data's targets
        for a real store."""
        return self.config.targets

    def describe(self) -> dict[str, Any]:
        """The task config, samples per split and, for a real store, what was read: paths,
        lead, members, levels, targets, filled inputs and the train-split statistics."""
        out = super().describe()
        if self._data is not None:
            out["samples"] = {s: self.num_samples(s) for s in SPLITS}
            if self._data.info:
                out["data"] = {
                    **self._data.info,
                    "clim_std": dict(self._data.clim_std),
                    "logscale": {k: list(v) for k, v in self._data.logscale.items()},
                }
        return out


def _mean_std(x: torch.Tensor) -> tuple[float, float]:
    """Mean and std (std 1 for a constant) of a tensor, as floats."""
    m = float(x.double().mean())
    s = float(x.double().std()) if x.numel() > 1 else 0.0
    return m, s if s > 1e-12 else 1.0


# --- real ensemble stores ----------------------------------------------------------------------

#: Valid times per dask chunk when the truth is checked or its statistics computed.
_TRUTH_CHUNK = 8


def _backbone_levels(model: WpeftAurora) -> tuple[int, ...]:
    """Pressure levels at which the backbone has statistics for every atmospheric variable it
    embeds (its own ``norm_mean``, or Aurora's ERA5 tables for a released checkpoint)."""
    keys = model.norm_mean.keys() if model.norm_mean else aurora_norm.locations.keys()
    atmos = model.config.atmos_vars
    found: dict[str, set[int]] = {v: set() for v in atmos}
    for key in keys:
        name, _, level = str(key).rpartition("_")
        if name in found and level.isdigit():
            found[name].add(int(level))
    common = set.intersection(*found.values()) if found else set()
    return tuple(sorted(common, reverse=True))


def _select_lead(ens: xr.Dataset, lead_hours: int, where: str) -> xr.Dataset:
    """The forecasts at ``lead_hours`` (``time`` stays the init time), or :class:`DataError`
    naming the store's leads."""
    if "lead_time" not in ens.dims:
        raise DataError(
            f"{where} has no lead axis (lead_time, from prediction_timedelta / step); it has "
            f"dims {sorted(map(str, ens.dims))}. Post-processing reads forecasts by init time "
            "and lead."
        )
    leads = np.asarray(ens["lead_time"].values).astype("timedelta64[ns]")
    lead = np.timedelta64(lead_hours, "h").astype("timedelta64[ns]")
    hits = np.nonzero(leads == lead)[0]
    if hits.size == 0:
        have = [f"{x / np.timedelta64(1, 'h'):g}" for x in leads]
        shown = ", ".join(have[:20]) + (f", ... ({len(have)} leads)" if len(have) > 20 else "")
        raise DataError(
            f"lead_hours={lead_hours} is not a lead of {where}; it has leads (hours): {shown}."
        )
    return ens.isel(lead_time=int(hits[0]), drop=True)


def _select_levels(
    ens: xr.Dataset,
    wanted: tuple[int, ...] | None,
    backbone_levels: tuple[int, ...],
    where: str,
) -> xr.Dataset:
    """``data.levels`` as given (open_source checked them), else the store's levels that the
    backbone knows (ENS-10 has 11, Aurora 13, the tiny backbone 3)."""
    if wanted is not None or "level" not in ens.dims:
        return ens
    have = [int(x) for x in ens["level"].values]
    keep = [lv for lv in have if lv in backbone_levels]
    if not keep:
        raise DataError(
            f"{where} has levels {have} hPa and the backbone knows {list(backbone_levels)}: none "
            "in common. Use a backbone trained on the store's levels."
        )
    return ens.sel(level=keep)


def _grid_text(ds: xr.Dataset) -> str:
    lat, lon = ds["latitude"].values, ds["longitude"].values
    return (
        f"{lat.size} x {lon.size} (latitudes {lat[0]:g}..{lat[-1]:g}, longitudes "
        f"{lon[0]:g}..{lon[-1]:g})"
    )


def _open_truth(
    path: str,
    source: DataSource,
    targets: tuple[str, ...],
    optional: list[str],
    levels: tuple[int, ...],
    ens: xr.Dataset,
    valid_times: np.ndarray,
) -> xr.Dataset:
    """The truth at ``valid_times``, lazily: the targets (required) and those of the ensemble's
    other inputs it holds (their climatological std), at ``levels``, on the ensemble's grid.

    Raises:
        DataError: Targets or levels missing (named), another grid (both named), valid times
            missing (the first few named).
    """
    truth = open_store(path)
    have = set(map(str, truth.data_vars))
    missing = [n for n in targets if n not in have]
    if missing:
        raise DataError(
            f"The truth {path} lacks {missing}; it has {sorted(have)}. truth_path must hold the "
            "targets (data.variables) at the forecasts' valid times."
        )
    if "member" in truth.dims or "lead_time" in truth.dims:
        raise DataError(
            f"The truth {path} is a forecast store (dims {sorted(map(str, truth.dims))}); "
            "truth_path must be an analysis (ERA5) at valid times."
        )
    names = [*targets, *(n for n in optional if n in have and VARIABLES[n].kind != "static")]
    truth = truth[names]
    if levels and "level" in truth.dims:
        available = [int(x) for x in truth["level"].values]
        absent = [lv for lv in levels if lv not in available]
        if absent:
            raise DataError(
                f"The truth {path} has no level(s) {absent} hPa; it has {available}, the "
                f"ensemble is read at {list(levels)}."
            )
        truth = truth.sel(level=list(levels))
    if source.region is not None:
        truth = select_region(truth, source.region, where=f"the truth {path}")
    same = all(
        truth[c].size == ens[c].size
        and np.allclose(truth[c].values, ens[c].values, rtol=0, atol=1e-6)
        for c in ("latitude", "longitude")
    )
    if not same:
        raise DataError(
            f"The truth {path} is on grid {_grid_text(truth)}, the ensemble {source.path} on "
            f"{_grid_text(ens)} (after the region crop); they must match exactly. Regrid the "
            "truth to the ensemble's grid."
        )
    times = np.asarray(truth["time"].values, dtype="datetime64[ns]")
    absent_t = valid_times[~np.isin(valid_times, times)]
    if absent_t.size:
        first = ", ".join(str(t)[:19] for t in absent_t[:3])
        raise DataError(
            f"The truth {path} lacks {absent_t.size} of the {valid_times.size} valid times "
            f"(init + lead), first {first}; it covers {str(times[0])[:19]} .. "
            f"{str(times[-1])[:19]}. Give a truth that covers them, or periods inside it."
        )
    truth = truth.sel(time=valid_times)
    return truth.assign_coords(latitude=ens["latitude"], longitude=ens["longitude"])


def _logscale_stats(
    spread: xr.Dataset, clim: dict[str, float], floor: float
) -> dict[str, tuple[float, float]]:
    """Mean and std (ddof 1; 1 for a constant) of ``log(max(σ_ens, floor c) / c)`` per variable
    and level over the given forecasts and the grid, in one lazy pass."""
    lazy: dict[str, Any] = {}
    for name in map(str, spread.data_vars):
        da = spread[name].astype(np.float64)
        k = VARIABLES[name].aurora
        if "level" in da.dims:
            levels = [int(lv) for lv in da["level"].values]
            c = xr.DataArray(
                [clim[norm_key(k, lv)] for lv in levels], dims="level", coords={"level": levels}
            )
        else:
            levels, c = [None], xr.DataArray(clim[norm_key(k)])
        lg = np.log(np.maximum(da, floor * c) / c)
        reduce = [d for d in lg.dims if d != "level"]
        lazy[name] = (levels, lg.mean(reduce).data, lg.std(reduce, ddof=1).data)
    (computed,) = dask.compute({n: (m, s) for n, (_, m, s) in lazy.items()})
    out: dict[str, tuple[float, float]] = {}
    for name, (levels, _, _) in lazy.items():
        means, stds = (np.atleast_1d(np.asarray(a, dtype=np.float64)) for a in computed[name])
        pseudo = VARIABLES[name].aurora + LOGSCALE_SUFFIX
        for i, level in enumerate(levels):
            s = float(stds[i])
            out[norm_key(pseudo, level)] = (
                float(means[i]),
                s if math.isfinite(s) and s > 1e-12 else 1.0,
            )
    return out
