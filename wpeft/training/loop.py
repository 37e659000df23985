"""The fine-tuning loop: one task, one method, one budget, one seed -> one run directory.

AdamW (or the method's sparse-safe variant) with linear warm-up and cosine decay, gradient
clipping, bf16 autocast and activation checkpointing on a GPU, a progress bar with loss and
throughput, evaluation at intervals, and atomic checkpoints that hold only what fine-tuning
trains (adapter tensors, their optimiser state, the method's selection state, RNG and data
position). ``resume=True`` continues a killed run to the same result as an uninterrupted one.

A run directory holds ``config.json``, ``metrics.jsonl`` (one JSON line per evaluation),
``summary.json`` (trainable / changed counts, budget, encoder-decoder policy, final scores),
``adapter.safetensors`` + ``adapter.json`` and ``fields.nc`` (test predictions and targets).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from wpeft.backbones.aurora_adapter import WpeftAurora, build_backbone
from wpeft.backbones.pretrain import load_pretrained
from wpeft.errors import CheckpointError, ConfigError
from wpeft.methods import create_method
from wpeft.methods.adapter_file import save_adapter
from wpeft.methods.base import PEFTMethod
from wpeft.methods.budget import match_budget
from wpeft.runs import attach_recorders
from wpeft.runs.store import write_json_atomic
from wpeft.tasks import TaskBatch, create_task
from wpeft.training.common import lr_factor, save_torch_atomic
from wpeft.tasks.base import Task

__all__ = ["TrainConfig", "train"]


@dataclass
class TrainConfig:
    """One fine-tuning run.

    Attributes:
        task / method: Registered names (``wpeft methods`` lists the methods).
        budget: Target fraction of backbone parameters for the method's size knob (e.g.
            0.003, 0.04); None keeps the method's default size.
        method_options / task_options: Further config fields of the method / task.
        backbone: Pretrained backbone name (``tiny`` ships with wpeft).
        steps, batch_size, lr, weight_decay, warmup_steps, grad_clip: Optimisation.
        eval_every / checkpoint_every: Intervals in optimiser steps (0: only at the end).
        seed: Seeds data order, new modules and the method's noise.
        device: ``cpu``, ``cuda`` or ``auto``.
        record_every: Interval of the Fisher-mask records (selection methods), in steps.
    """

    task: str = "downscaling"
    method: str = "weatherpeft"
    budget: float | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)
    backbone: str = "tiny"
    steps: int = 200
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 10
    grad_clip: float = 1.0
    eval_every: int = 0
    checkpoint_every: int = 50
    seed: int = 0
    device: str = "auto"
    record_every: int = 10

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError(f"steps ({self.steps}) and batch_size ({self.batch_size}) must be >= 1.")
        if self.budget is not None and not 0.0 < self.budget <= 1.0:
            raise ConfigError(
                f"budget {self.budget!r} is out of range: a fraction of backbone parameters in "
                "(0, 1], e.g. 0.003 for 0.3%."
            )
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return cls(**d)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _to(batch: TaskBatch, device: torch.device) -> TaskBatch:
    if device.type == "cpu":
        return batch
    return dataclasses.replace(
        batch,
        inputs=batch.inputs.to(device),
        targets={k: v.to(device) for k, v in batch.targets.items()},
        extra={k: v.to(device) for k, v in batch.extra.items()},
    )


def _batches(task: Task, cfg: TrainConfig, epoch: int, skip: int) -> Iterator[TaskBatch]:
    """The training batches of one epoch (reproducible from seed and epoch), after ``skip``."""
    for i, batch in enumerate(task.batches("train", cfg.batch_size, seed=cfg.seed * 100_003 + epoch)):
        if i >= skip:
            yield batch


def _sparse_if_worth_it(t: torch.Tensor) -> torch.Tensor:
    """Optimiser state of selection methods is mostly zeros: store it sparse."""
    if t.dim() > 0 and t.numel() > 1024 and int((t != 0).sum()) < t.numel() // 4:
        return t.to_sparse()
    return t


def _optimizer_state_for_disk(opt: torch.optim.Optimizer) -> dict:
    sd = opt.state_dict()
    sd["state"] = {
        k: {n: _sparse_if_worth_it(v) if torch.is_tensor(v) else v for n, v in s.items()}
        for k, s in sd["state"].items()
    }
    return sd


def _optimizer_state_from_disk(sd: dict) -> dict:
    sd["state"] = {
        k: {n: v.to_dense() if torch.is_tensor(v) and v.is_sparse else v for n, v in s.items()}
        for k, s in sd["state"].items()
    }
    return sd


def _pack_bools(obj: Any) -> Any:
    """Bool tensors (selection masks, one byte per entry) packed to one bit per entry."""
    if torch.is_tensor(obj) and obj.dtype == torch.bool:
        flat = obj.reshape(-1).to(torch.uint8)
        pad = (-flat.numel()) % 8
        bits = torch.cat([flat, flat.new_zeros(pad)]).view(-1, 8)
        weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
        return {"packed_bits": (bits * weights).sum(1).to(torch.uint8), "shape": list(obj.shape)}
    if isinstance(obj, dict):
        return {k: _pack_bools(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_pack_bools(v) for v in obj]
    return obj


def _unpack_bools(obj: Any) -> Any:
    if isinstance(obj, dict) and set(obj) == {"packed_bits", "shape"}:
        shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
        bits = (obj["packed_bits"][:, None] >> shifts) & 1
        n = 1
        for d in obj["shape"]:
            n *= d
        return bits.reshape(-1)[:n].bool().reshape(obj["shape"])
    if isinstance(obj, dict):
        return {k: _unpack_bools(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unpack_bools(v) for v in obj]
    return obj


def prepare_run(cfg: TrainConfig) -> tuple[WpeftAurora, Task, PEFTMethod, dict, dict[str, Any]]:
    """Backbone, task (with its head installed), applied method and the pristine reference."""
    torch.manual_seed(cfg.seed)
    model = load_pretrained(cfg.backbone)
    task = create_task(cfg.task, seed=cfg.seed, **cfg.task_options)
    head = task.setup(model)
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, p in head.named_parameters():
        reference.setdefault(f"head.{name}", p.detach().clone())
    options = dict(cfg.method_options)
    budget_info: dict[str, Any] = {}
    if cfg.budget is not None:
        match = match_budget(
            cfg.method, cfg.budget, lambda: build_backbone(model.config), **options
        )
        if match.knob is not None:
            options[match.knob] = match.value
        budget_info = match.to_dict()
    from wpeft.methods import METHODS

    cls = METHODS.get(cfg.method)
    if cls is not None and "seed" in {f.name for f in dataclasses.fields(cls.Config)}:
        options.setdefault("seed", cfg.seed)  # methods with their own randomness (SFAS noise)
    method = create_method(cfg.method, **options)
    method.apply(model, head)
    return model, task, method, reference, budget_info


def train(
    cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Fine-tune, evaluate on the test split, and write the run directory. Returns the summary."""
    run = Path(run_dir)
    ckpt_path = run / "checkpoint.pt"
    if run.exists() and (run / "summary.json").exists() and not resume:
        raise ConfigError(f"Run directory {run} already holds a finished run; choose another.")
    run.mkdir(parents=True, exist_ok=True)
    device = _device(cfg.device)
    model, task, method, reference, budget_info = prepare_run(cfg)
    model.to(device)
    method.added.to(device)
    if device.type == "cuda":
        model.autocast_backbone = True  # bf16 on the backbone, as Aurora fine-tunes
        model.configure_activation_checkpointing()

    def loss_on(batch: TaskBatch) -> torch.Tensor:
        return task.loss(task.predict(model, batch), batch)

    if hasattr(method, "prepare"):  # static Fisher masks are chosen before training
        prep = [_to(b, device) for _, b in zip(range(8), _batches(task, cfg, 0, 0))]
        method.prepare(loss_on, prep, len(prep))
    opt = method.optimizer(cfg.lr, cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps)
    )
    step, epoch, in_epoch = 0, 0, 0
    if resume and ckpt_path.exists():
        try:
            with warnings.catch_warnings():  # torch's note that it validates sparse tensors
                warnings.filterwarnings("ignore", message="Validating sparse tensor")
                state = torch.load(ckpt_path, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"Checkpoint {ckpt_path} is corrupt ({e}); delete it to restart.") from e
        if state["config"] != cfg.to_dict():
            raise CheckpointError(
                f"{ckpt_path} belongs to a run with another config; use a new run directory."
            )
        method.load_adapter_state(state["adapter"])
        opt.load_state_dict(_optimizer_state_from_disk(state["optimizer"]))
        sched.load_state_dict(state["scheduler"])
        if state.get("selection") is not None:
            method.selection.load_state_dict(_unpack_bools(state["selection"]))
        torch.set_rng_state(state["torch_rng"])
        step, epoch, in_epoch = state["step"], state["epoch"], state["in_epoch"]
    elif not resume:
        (run / "metrics.jsonl").unlink(missing_ok=True)
    write_json_atomic(run / "config.json", cfg.to_dict())
    recorders = attach_recorders(
        run, method, model, task, every=cfg.record_every, start_step=step
    )

    def checkpoint() -> None:
        selection = getattr(method, "selection", None)
        save_torch_atomic(
            {
                "config": cfg.to_dict(),
                "adapter": method.adapter_state(reference),
                "optimizer": _optimizer_state_for_disk(opt),
                "scheduler": sched.state_dict(),
                "selection": _pack_bools(selection.state_dict()) if selection is not None else None,
                "torch_rng": torch.get_rng_state(),
                "step": step,
                "epoch": epoch,
                "in_epoch": in_epoch,
            },
            ckpt_path,
        )

    params = method.trainable_parameters()
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, unit="step",
               desc=f"{cfg.task}/{cfg.method}")
    batches = _batches(task, cfg, epoch, in_epoch)
    started, seen = time.perf_counter(), 0
    model.train()
    while step < cfg.steps:
        batch = next(batches, None)
        if batch is None:
            epoch, in_epoch = epoch + 1, 0
            batches = _batches(task, cfg, epoch, 0)
            continue
        batch = _to(batch, device)
        loss = loss_on(batch)
        if not torch.isfinite(loss):
            checkpoint()
            raise FloatingPointError(
                f"Loss became {loss.item()} at step {step}; the last good state is in "
                f"{ckpt_path}. Lower --lr or check the inputs for NaNs."
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        method.after_backward(step, cfg.steps)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        step, in_epoch = step + 1, in_epoch + 1
        recorders.on_step(step)
        seen += batch.targets[next(iter(batch.targets))].shape[0]
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", samples_s=f"{seen / (time.perf_counter() - started):.1f}")
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            model.eval()
            with torch.no_grad():
                _, scores = task.evaluate(model, "val", cfg.batch_size)
            model.train()
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "split": "val", "loss": loss.item(), **scores}) + "\n")
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            checkpoint()
    bar.close()
    recorders.close(step)
    checkpoint()

    model.eval()
    with torch.no_grad():
        fields, scores = task.evaluate(model, "test", cfg.batch_size)
    tmp = run / "fields.nc.tmp"
    fields.to_netcdf(tmp, encoding={v: {"zlib": True, "complevel": 1} for v in fields.data_vars})
    os.replace(tmp, run / "fields.nc")
    adapter_path = save_adapter(
        method, reference, run / "adapter", task=cfg.task, budget=cfg.budget,
        seed=cfg.seed, variables=list(getattr(task, "headline", ())),
    )
    summary = {
        "task": cfg.task,
        "method": cfg.method,
        "budget": cfg.budget,
        "budget_match": budget_info,
        "seed": cfg.seed,
        "encoder_decoder_policy": "train" if method.config.train_encoder_decoder else "frozen",
        "method_config": method.config.to_dict(),
        "trainable": method.trainable(),
        "changed": method.changed(reference),
        "budget_fraction": method.budget_fraction(),
        "backbone_parameters": method.backbone_size,
        "scores": scores,
        "adapter_bytes": adapter_path.stat().st_size,
        "steps": cfg.steps,
        "train_seconds": time.perf_counter() - started,
    }
    write_json_atomic(run / "summary.json", summary)
    return summary
