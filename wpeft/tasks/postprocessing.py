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
from wpeft.data.batch import Fields, wb2_name
from wpeft.data.schema import VARIABLES
from wpeft.data.stats import compute_stats
from wpeft.data.world import WorldConfig, open_world, open_world_ensemble
from wpeft.errors import ConfigError, DataError
from wpeft.metrics import crps_gaussian, rmse
from wpeft.tasks.base import Split, Task, TaskBatch, TaskConfig, register_task
from wpeft.tasks.common import (
    ATMOS_VARS,
    GLOBAL_HEADLINE,
    SPLITS,
    STATIC_VARS,
    SURF_VARS,
    TaskHead,
    add_variable,
    channel_std,
    check_fractions,
    check_patch_grid,
    check_split,
    coerce_world,
    index_batches,
    make_batch,
    per_level_scores,
    register_norm,
    require_stats,
    split_by_time,
    var_attrs,
)

__all__ = ["LOGSCALE_SUFFIX", "Postprocessing", "PostprocessingConfig", "gaussian_crps"]

#: Suffix of the pseudo-variables whose heads predict the log scale ``s``.
LOGSCALE_SUFFIX = "_logscale"
_S_CLAMP = 10.0
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
    """Settings of the ensemble post-processing task (``source`` must be ``"world"``)."""

    #: Embedded world whose ensemble forecasts (``ensemble_*`` fields) are post-processed.
    world: WorldConfig = field(default_factory=WorldConfig)
    #: Train, val, test fractions of the time-ordered forecasts (default 32/8/8 of 48).
    split_fractions: tuple[float, float, float] = (2 / 3, 1 / 6, 1 / 6)
    #: Floor of the ensemble spread, as a fraction of the variable's climatological std
    #: (train split), so that ``σ = exp(s) σ_ens`` and ``log σ_ens`` stay finite.
    sigma_floor: float = 0.01
    #: Cache directory of the embedded world (default: ``$WPEFT_CACHE_DIR`` or the user cache).
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source != "world":
            raise ConfigError(
                f"source={self.source!r}: post-processing needs ensemble forecasts; only the "
                "embedded world ('world') provides them."
            )
        self.world = coerce_world(self.world)
        self.split_fractions = check_fractions(self.split_fractions)  # type: ignore[assignment]
        f = self.sigma_floor
        if not isinstance(f, (int, float)) or not math.isfinite(f) or not 0 < f < 1:
            raise ConfigError(f"sigma_floor={f!r} must be a number in (0, 1).")


@dataclass
class _Data:
    """Ensemble statistics and truth in memory (surface ``(N, H, W)``, atmos ``(N, C, H, W)``).

    Attributes:
        mean / spread: Ensemble mean and floored spread (``spread`` has no statics).
        truth: Truth at the valid times, with the statics.
        logscale: ``{pseudo name: (mean, std)}`` of the log-spread input per stats key.
        clim_std: Climatological std of the truth (train split) per stats key (``"2t"``,
            ``"z_500"``): the unit of the log spread and of the floor.
        init_times: ``(N,)`` init times; ``truth.times`` are the valid times.
        splits: Forecast positions per split.
    """

    mean: Fields
    spread: Fields
    truth: Fields
    logscale: dict[str, tuple[float, float]]
    clim_std: dict[str, float]
    init_times: np.ndarray
    splits: dict[Split, np.ndarray]


@register_task
class Postprocessing(Task):
    """Raw ensemble (mean, spread) -> Gaussian (μ, σ) per variable; see the module docstring."""

    name: ClassVar[str] = "postprocessing"
    Config: ClassVar[type[TaskConfig]] = PostprocessingConfig
    headline: ClassVar[tuple[str, ...]] = GLOBAL_HEADLINE
    config: PostprocessingConfig

    def __init__(self, config: TaskConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._data: _Data | None = None
        self._std: dict[str, float] | None = None

    # --- data -------------------------------------------------------------------------------

    @property
    def data(self) -> _Data:
        if self._data is None:
            self._data = self._load()
        return self._data

    def _load(self) -> _Data:
        cfg = self.config
        cache = Path(cfg.cache_dir) if cfg.cache_dir else None
        ens = open_world_ensemble(cfg.world, cache_dir=cache, progress=False)
        if ens.sizes["member"] < 2:
            raise DataError(
                f"The ensemble has {ens.sizes['member']} member(s); a spread needs at least 2 "
                "(WorldConfig(ensemble_members=...))."
            )
        truth_ds = open_world(cfg.world, cache_dir=cache, progress=False).sel(time=ens["time"])
        names = [wb2_name(v, "surface") for v in SURF_VARS] + [
            wb2_name(v, "atmos") for v in ATMOS_VARS
        ]
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
            logscale=logscale,
            clim_std=dict(clim.std),
            init_times=init_times,
            splits=splits,
        )

    # --- the Task API -----------------------------------------------------------------------

    def setup(self, model: WpeftAurora) -> nn.Module:
        """Install one ``<name>_logscale`` pseudo-variable per surface and atmospheric variable
        (zero-initialised embedding kernel + zero-initialised decoder head) and register the
        log-spread statistics; take the other statistics from the backbone.

        Returns:
            A :class:`TaskHead` with ``len(SURF_VARS) + len(ATMOS_VARS)`` kernels and heads.
        """
        data = self.data
        check_patch_grid(model, *data.truth.grid)
        missing = [v for v in SURF_VARS if v not in model.encoder.surf_token_embeds.weights]
        missing += [v for v in ATMOS_VARS if v not in model.encoder.atmos_token_embeds.weights]
        if missing:
            raise ConfigError(
                f"The backbone has no embedding for {missing}; it cannot read the ensemble."
            )
        std: dict[str, float] = {}
        for k in SURF_VARS:
            std[norm_key(k)] = require_stats(model, k)[1]
        for k in ATMOS_VARS:
            for lv in data.truth.levels:
                std[norm_key(k, lv)] = require_stats(model, k, lv)[1]
        head = TaskHead()
        for k in SURF_VARS:
            add_variable(
                model, head, k + LOGSCALE_SUFFIX, "surface", embed_init="zeros", head_init="zeros"
            )
        for k in ATMOS_VARS:
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
        self, split: Split, batch_size: int, *, seed: int = 0, shuffle: bool | None = None
    ) -> Iterator[TaskBatch]:
        """Batches of ``split``.

        Inputs: ``<v>`` = (μ_ens − σ_ens, μ_ens) and ``<v>_logscale`` = log(σ_ens / clim std)
        twice, surface ``(B, 2, H, W)``, atmos ``(B, 2, C, H, W)``. Targets: truth at the
        valid times, ``(B, H, W)`` / ``(B, C, H, W)``. Extra: ``<wb2>_ens_mean`` and
        ``<wb2>_ens_spread`` (floored), same shapes, physical units.
        """
        data = self.data
        positions = data.splits[check_split(split)]
        shuffle = split == "train" if shuffle is None else shuffle
        for chunk in index_batches(positions, batch_size, shuffle=shuffle, seed=seed):
            yield self._batch(chunk)

    def _batch(self, positions: np.ndarray) -> TaskBatch:
        data = self.data
        idx = torch.as_tensor(positions, dtype=torch.long)
        levels = data.truth.levels
        surf: dict[str, torch.Tensor] = {}
        atmos: dict[str, torch.Tensor] = {}
        targets: dict[str, torch.Tensor] = {}
        extra: dict[str, torch.Tensor] = {}
        for kind, means, spreads, truths, out in (
            ("surface", data.mean.surf, data.spread.surf, data.truth.surf, surf),
            ("atmos", data.mean.atmos, data.spread.atmos, data.truth.atmos, atmos),
        ):
            for k in means:
                mu, sd = means[k][idx], spreads[k][idx]
                out[k] = torch.stack([mu - sd, mu], dim=1)
                log_ratio = torch.log(
                    sd / self._clim_tensor(k, levels if kind == "atmos" else None)
                )
                out[k + LOGSCALE_SUFFIX] = torch.stack([log_ratio, log_ratio], dim=1)
                name = wb2_name(k, kind)  # type: ignore[arg-type]
                targets[name] = truths[k][idx]
                extra[f"{name}_ens_mean"] = mu
                extra[f"{name}_ens_spread"] = sd
        times = data.truth.times[positions]
        inputs = make_batch(
            surf, atmos, dict(data.truth.static), data.truth.lat, data.truth.lon, levels, times
        )
        return TaskBatch(inputs=inputs, targets=targets, times=times, extra=extra)

    def _clim_tensor(self, k: str, levels: tuple[int, ...] | None) -> torch.Tensor | float:
        """Climatological std of ``k``: a float, or ``(C, 1, 1)`` over ``levels``."""
        clim = self.data.clim_std
        if levels is None:
            return clim[norm_key(k)]
        return torch.tensor([clim[norm_key(k, lv)] for lv in levels]).view(-1, 1, 1)

    def predict(self, model: WpeftAurora, batch: TaskBatch) -> dict[str, torch.Tensor]:
        """Gaussian parameters per variable, physical units: ``<wb2>`` = μ and
        ``<wb2>_sigma`` = σ, surface ``(B, H, W)``, atmos ``(B, C, H, W)``."""
        std = self._require_std()
        out = model(batch.inputs)
        levels = batch.inputs.metadata.atmos_levels
        pred: dict[str, torch.Tensor] = {}
        for kind, outputs, inputs in (
            ("surface", out.surf_vars, batch.inputs.surf_vars),
            ("atmos", out.atmos_vars, batch.inputs.atmos_vars),
        ):
            for k in SURF_VARS if kind == "surface" else ATMOS_VARS:
                x = outputs[k][:, 0]
                mu_ens = inputs[k][:, -1].to(x.device)
                ls = k + LOGSCALE_SUFFIX
                xs, ls_in = outputs[ls][:, 0], inputs[ls][:, -1].to(x.device)
                if kind == "surface":
                    s_m, s_s = std[norm_key(k)], std[norm_key(ls)]
                else:
                    s_m = channel_std([std[norm_key(k, lv)] for lv in levels], x)
                    s_s = channel_std([std[norm_key(ls, lv)] for lv in levels], x)
                name = wb2_name(k, kind)  # type: ignore[arg-type]
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
            "level": np.asarray(data.truth.levels, dtype=np.int64),
            "latitude": data.truth.lat.numpy().astype(np.float64),
            "longitude": data.truth.lon.numpy().astype(np.float64),
        }
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

    @staticmethod
    def _names() -> tuple[str, ...]:
        return tuple(wb2_name(v, "surface") for v in SURF_VARS) + tuple(
            wb2_name(v, "atmos") for v in ATMOS_VARS
        )

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        if self._data is not None:
            out["samples"] = {s: self.num_samples(s) for s in SPLITS}
        return out


def _mean_std(x: torch.Tensor) -> tuple[float, float]:
    """Mean and std (std 1 for a constant) of a tensor, as floats."""
    m = float(x.double().mean())
    s = float(x.double().std()) if x.numel() > 1 else 0.0
    return m, s if s > 1e-12 else 1.0
