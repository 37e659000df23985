"""Pretraining a small backbone (``tiny`` Aurora, ``prithvi-tiny``) on 6-hour forecasting of the
embedded world.

This is what makes the default backbone a *foundation* model worth fine-tuning: it learns the
world's dynamics (one 6-hour step from two history steps) on the first part of the trajectory and
is scored against persistence on a held-out later part. The result ships with the package as
safetensors plus a JSON card (config, world config and seed, normalisation statistics, sha256,
held-out skill), read back by :func:`wpeft.backbones.pretrain.load_pretrained`.

Checkpoints hold model, optimiser, scheduler, RNG states and the step; they are written
atomically, so a killed run resumes from the last one with ``resume=True``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from aurora import Batch
from tqdm.auto import tqdm

from wpeft.backbones.aurora_adapter import WpeftAurora, build_backbone, file_sha256, norm_key
from wpeft.backbones.configs import BackboneConfig, PrithviConfig, get_config
from wpeft.data.batch import Fields, check_grid
from wpeft.data.world import WorldConfig, open_world
from wpeft.errors import CheckpointError, ConfigError
from wpeft.training.common import lr_factor, save_torch_atomic

__all__ = [
    "PretrainConfig",
    "forecast_skill",
    "normalised_mse",
    "pretrain",
    "split_indices",
    "world_fields",
]


@dataclass
class PretrainConfig:
    """Settings of a pretraining run (stored in its checkpoint and in the shipped card)."""

    backbone: str = "tiny"
    world: WorldConfig = field(default_factory=WorldConfig)
    steps: int = 1500  # optimiser steps
    batch_size: int = 8
    lr: float = 1e-3  # peak learning rate (linear warm-up, cosine decay)
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    holdout_fraction: float = 0.2  # last part of the trajectory, never trained on
    seed: int = 0
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError(
                f"steps ({self.steps}) and batch_size ({self.batch_size}) must be >= 1."
            )
        if not 0.0 < self.holdout_fraction < 0.9:
            raise ConfigError(f"holdout_fraction must be in (0, 0.9), got {self.holdout_fraction}.")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["world"] = self.world.to_dict()
        return d


# --- data ------------------------------------------------------------------------------------


def world_fields(config: BackboneConfig | PrithviConfig, world: WorldConfig, progress: bool = True) -> Fields:
    """The embedded world's fine-grid truth as :class:`Fields` for a backbone config."""
    ds = open_world(world, progress=progress)
    fields = Fields.from_dataset(
        ds, surf_vars=config.surf_vars, atmos_vars=config.atmos_vars, static_vars=config.static_vars
    )
    check_grid(*fields.grid, config.patch_size)
    return fields


def split_indices(n: int, holdout_fraction: float, history: int = 2) -> tuple[range, range]:
    """Valid target indices of the training and held-out parts (a gap of ``history`` between)."""
    n_hold = round(n * holdout_fraction)
    first_hold = n - n_hold
    train = range(history, first_hold - 1)  # target t+1 < first_hold
    hold = range(first_hold + history, n)  # inputs and target inside the held-out part
    return train, hold


def _pairs(fields: Fields, targets: np.ndarray, history: int) -> tuple[Batch, Batch]:
    """(input batch ending one step before each target, target batch)."""
    return fields.batch(targets - 1, history=history), fields.batch(targets, history=1)


# --- loss and skill --------------------------------------------------------------------------


def normalised_mse(pred: Batch, target: Batch, mean: dict, std: dict) -> torch.Tensor:
    """Mean over variables (and levels) of the MSE in normalised units.

    ``pred`` and ``target``: surface ``(B, 1, H, W)``, atmospheric ``(B, 1, C, H, W)``.
    """
    terms = []
    for k, p in pred.surf_vars.items():
        s = std[norm_key(k, None)]
        terms.append(((p - target.surf_vars[k]) / s).pow(2).mean())
    for k, p in pred.atmos_vars.items():
        s = torch.tensor(
            [std[norm_key(k, lvl)] for lvl in pred.metadata.atmos_levels], dtype=p.dtype
        ).view(1, 1, -1, 1, 1)
        terms.append((((p - target.atmos_vars[k]) / s).pow(2).mean(dim=(0, 1, 3, 4))).sum())
    n = len(pred.surf_vars) + sum(v.shape[2] for v in pred.atmos_vars.values())
    return torch.stack(terms).sum() / n


def _lat_weights(lat: torch.Tensor) -> torch.Tensor:
    w = torch.cos(torch.deg2rad(lat))
    return (w / w.mean()).view(-1, 1)


@torch.no_grad()
def forecast_skill(
    model: WpeftAurora, fields: Fields, targets: range, batch_size: int = 16, history: int = 2
) -> dict[str, dict[str, float]]:
    """Latitude-weighted RMSE of the model and of persistence per variable (and level).

    Returns ``{key: {"model": rmse, "persistence": rmse, "ratio": model / persistence}}`` with
    keys such as ``"2t"`` and ``"z_500"``, in physical units.
    """
    model.eval()
    w = _lat_weights(fields.lat)
    sq_model: dict[str, float] = {}
    sq_pers: dict[str, float] = {}
    idx = np.asarray(list(targets))
    for start in range(0, len(idx), batch_size):
        chunk = idx[start : start + batch_size]
        x, y = _pairs(fields, chunk, history)
        pred = model(x)

        def add(key: str, p: torch.Tensor, last: torch.Tensor, t: torch.Tensor) -> None:
            # p, last, t: (B, H, W)
            sq_model[key] = sq_model.get(key, 0.0) + float(
                ((p - t) ** 2 * w).mean(dim=(1, 2)).sum()
            )
            sq_pers[key] = sq_pers.get(key, 0.0) + float(
                ((last - t) ** 2 * w).mean(dim=(1, 2)).sum()
            )

        for k in pred.surf_vars:
            add(k, pred.surf_vars[k][:, 0], x.surf_vars[k][:, -1], y.surf_vars[k][:, 0])
        for k in pred.atmos_vars:
            for c, lvl in enumerate(fields.levels):
                add(
                    norm_key(k, lvl),
                    pred.atmos_vars[k][:, 0, c],
                    x.atmos_vars[k][:, -1, c],
                    y.atmos_vars[k][:, 0, c],
                )
    out = {}
    for key, sq in sq_model.items():
        m, p = math.sqrt(sq / len(idx)), math.sqrt(sq_pers[key] / len(idx))
        out[key] = {"model": m, "persistence": p, "ratio": m / p if p > 0 else float("nan")}
    return out


# --- checkpoints -----------------------------------------------------------------------------


@dataclass
class _Checkpoint:
    """A pretraining run's state in ``path``: model, optimiser, scheduler, both RNG states and
    the step, tied to the run's config."""

    path: Path
    config: PretrainConfig
    model: WpeftAurora
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    rng: np.random.Generator

    def save(self, step: int) -> None:
        """Write the state after ``step`` optimiser steps, atomically."""
        save_torch_atomic(
            {
                "config": self.config.to_dict(),
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "rng": self.rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
                "step": step,
            },
            self.path,
        )

    def load(self) -> int:
        """Restore the saved state in place and return its step.

        Raises:
            CheckpointError: the file is corrupt or was written by another config.
        """
        try:
            state = torch.load(self.path, weights_only=True)
        except Exception as e:
            raise CheckpointError(
                f"Cannot resume from corrupt {self.path} ({e}); delete it."
            ) from e
        if state["config"] != self.config.to_dict():
            raise CheckpointError(
                f"{self.path} was written by a different pretraining config; use another --out "
                "directory or delete the checkpoint."
            )
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        return state["step"]


# --- training --------------------------------------------------------------------------------


def pretrain(
    config: PretrainConfig, out_dir: str | Path, *, resume: bool = True, progress: bool = True
) -> dict[str, Any]:
    """Train the backbone; write ``checkpoint.pt``, ``<backbone>.safetensors`` and the card.

    Returns the card (a dict, also written as ``<backbone>.json``).
    """
    from safetensors.torch import save_file

    from wpeft.data.stats import compute_stats

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bcfg = get_config(config.backbone)
    history = bcfg.max_history_size
    ds = open_world(config.world, progress=progress)
    fields = world_fields(bcfg, config.world, progress=progress)
    train_idx, hold_idx = split_indices(len(fields), config.holdout_fraction, history)
    stats = compute_stats(ds.isel(time=slice(0, train_idx.stop + 1)))
    model = build_backbone(bcfg, norm_mean=stats.mean, norm_std=stats.std, seed=config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, config.warmup_steps, config.steps)
    )
    rng = np.random.default_rng(config.seed)
    step = 0
    ckpt = _Checkpoint(out / "checkpoint.pt", config, model, opt, sched, rng)
    if resume and ckpt.path.exists():
        step = ckpt.load()

    model.train()
    train_targets = np.asarray(list(train_idx)) + 1
    bar = tqdm(total=config.steps, initial=step, disable=not progress, desc="pretrain", unit="step")
    t0, samples = time.perf_counter(), 0
    while step < config.steps:
        x, y = _pairs(fields, rng.choice(train_targets, size=config.batch_size), history)
        loss = normalised_mse(model(x), y, stats.mean, stats.std)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        sched.step()
        step += 1
        samples += config.batch_size
        bar.update(1)
        bar.set_postfix(
            loss=f"{loss.item():.4f}", samples_s=f"{samples / (time.perf_counter() - t0):.1f}"
        )
        if step % config.checkpoint_every == 0 or step == config.steps:
            ckpt.save(step)
    bar.close()

    skill = forecast_skill(model, fields, hold_idx)
    weights = out / f"{bcfg.name}.safetensors"
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.weights_state().items()}, str(tmp))
    os.replace(tmp, weights)
    card = {
        "backbone": bcfg.to_dict(),
        "fingerprint": bcfg.fingerprint(),
        "weights": weights.name,
        "sha256": file_sha256(weights),
        "pretrain": config.to_dict(),
        "world_hash": config.world.hash(),
        "norm_mean": stats.mean,
        "norm_std": stats.std,
        "heldout_skill": skill,
        "heldout_samples": len(hold_idx),
        "description": f"{bcfg.model_name} ({bcfg.name} config) pretrained on "
        "6-hour forecasting of wpeft's synthetic shallow-water world (not Earth).",
    }
    (out / f"{bcfg.name}.json").write_text(json.dumps(card, indent=2))
    return card
