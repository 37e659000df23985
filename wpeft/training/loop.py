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
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from tqdm.auto import tqdm

from wpeft.backbones.aurora_adapter import WpeftAurora, build_backbone
from wpeft.backbones.pretrain import load_pretrained
from wpeft.distributed.runtime import DistEnv, init_from_env, shard_batch
from wpeft.distributed.strategy import STRATEGIES, TrainingModule, resolve_strategy, wrap
from wpeft.errors import CheckpointError, ConfigError
from wpeft.methods import create_method
from wpeft.methods.adapter_file import save_adapter
from wpeft.methods.base import PEFTMethod, plain_name
from wpeft.methods.budget import match_budget
from wpeft.runs import attach_recorders
from wpeft.runs.layout import RunLayout, partial
from wpeft.runs.store import write_json_atomic
from wpeft.tasks import TaskBatch, create_task
from wpeft.tasks.base import Task
from wpeft.training.common import lr_factor, save_torch_atomic

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
        strategy: Data parallelism under torchrun: ``auto`` (DDP when world size > 1),
            ``none``, ``ddp`` or ``fsdp`` (FSDP2, per Swin block). ``batch_size`` is the global
            batch, split evenly over the ranks.
        shard_optimizer: Under DDP, shard the optimiser state over the ranks (ZeRO-1,
            ``torch.distributed.optim.ZeroRedundancyOptimizer``) instead of replicating it.
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
    strategy: str = "auto"
    shard_optimizer: bool = False

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
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"strategy {self.strategy!r} is unknown; choose one of {', '.join(STRATEGIES)}."
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return cls(**d)

    def same_run(self, other: dict[str, Any]) -> bool:
        """Whether ``other`` (a checkpoint's config) describes this run; the parallel layout
        may differ (a checkpoint resumes on another world size or strategy)."""
        layout = ("strategy", "shard_optimizer")
        mine = {k: v for k, v in self.to_dict().items() if k not in layout}
        theirs = {k: v for k, v in other.items() if k not in layout}
        return mine == theirs


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


def _device_for(cfg: TrainConfig) -> tuple[torch.device, DistEnv]:
    """The device and process group of this rank (GPU ``LOCAL_RANK`` under torchrun)."""
    device = _device(cfg.device)
    env = init_from_env(device.type)
    if device.type == "cuda" and env.distributed:
        device = torch.device("cuda", env.local_rank)
    if cfg.batch_size % env.world_size:
        raise ConfigError(
            f"batch_size {cfg.batch_size} (the global batch) is not divisible by the world size "
            f"{env.world_size}; use a multiple of the number of processes."
        )
    return device, env


def train(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    on_trained: Callable[[PEFTMethod, DistEnv, torch.optim.Optimizer], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune, evaluate on the test split, and write the run directory. Returns the summary.

    Under ``torchrun`` every rank calls this with the same arguments; rank 0 writes the run
    directory, and every rank returns the same summary. ``on_trained(method, env, optimizer)`` is called on
    every rank after the last step, before evaluation (to inspect the trained state).
    """
    run = Path(run_dir)
    layout = RunLayout(run)
    ckpt_path = layout.checkpoint
    if run.exists() and layout.finished and not resume:
        raise ConfigError(f"Run directory {run} already holds a finished run; choose another.")
    device, env = _device_for(cfg)
    if env.is_main:
        run.mkdir(parents=True, exist_ok=True)
    env.barrier()
    model, task, method, reference, budget_info = prepare_run(cfg)
    strategy = resolve_strategy(cfg.strategy, env, method)
    model.to(device)
    method.added.to(device)
    if device.type == "cuda":
        model.autocast_backbone = True  # bf16 on the backbone, as Aurora fine-tunes
        model.configure_activation_checkpointing()

    if hasattr(method, "prepare"):  # static Fisher masks are chosen before training, on the
        # global batches and before wrapping, so every rank computes the same mask alone
        def prep_loss(batch: TaskBatch) -> torch.Tensor:
            return task.loss(task.predict(model, batch), batch)

        prep = [_to(b, device) for _, b in zip(range(8), _batches(task, cfg, 0, 0))]
        method.prepare(prep_loss, prep, len(prep))

    step, epoch, in_epoch = 0, 0, 0
    state: dict[str, Any] | None = None
    if resume and ckpt_path.exists():
        try:
            with warnings.catch_warnings():  # torch's note that it validates sparse tensors
                warnings.filterwarnings("ignore", message="Validating sparse tensor")
                state = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        except Exception as e:
            raise CheckpointError(f"Checkpoint {ckpt_path} is corrupt ({e}); delete it to restart.") from e
        if not cfg.same_run(state["config"]):
            raise CheckpointError(
                f"{ckpt_path} belongs to a run with another config; use a new run directory."
            )
        if "full_state" in state:  # written by an FSDP run: loaded once the model is wrapped
            if strategy == "ddp":
                raise CheckpointError(
                    f"{ckpt_path} was written by an FSDP run; resume it with --strategy fsdp or "
                    "in one process."
                )
        else:
            method.load_adapter_state(state["adapter"])
        if state.get("selection") is not None:
            method.selection.load_state_dict(_unpack_bools(state["selection"]))
        torch.set_rng_state(state["torch_rng"])
        step, epoch, in_epoch = state["step"], state["epoch"], state["in_epoch"]
    elif not resume and env.is_main:
        layout.metrics.unlink(missing_ok=True)

    # DDP / FSDP see the backbone (with the task's heads) and the method's added modules.
    unwrapped = TrainingModule(model, method.added)
    net = wrap(unwrapped, strategy, env, device)
    method.on_wrapped()  # FSDP2 replaced the parameters with shards: the method follows

    def loss_on(batch: TaskBatch) -> torch.Tensor:
        return task.loss(task.predict(net, batch), batch)

    opt = _optimizer(method, cfg, strategy)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps)
    )
    if state is not None and "full_state" in state:
        _load_full_state(unwrapped, opt, state["full_state"], state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    elif state is not None:
        if strategy == "fsdp":
            raise CheckpointError(
                f"{ckpt_path} was written by a {state.get('strategy', 'DDP or one-process')} run; "
                "resume it with that strategy (FSDP resumes FSDP checkpoints)."
            )
        opt.load_state_dict(_optimizer_state_from_disk(state["optimizer"]))
        sched.load_state_dict(state["scheduler"])
    if env.is_main:
        write_json_atomic(layout.config, cfg.to_dict())
    # Recorders write on rank 0; other ranks record into scratch (an FSDP forward of the
    # attention recorder needs every rank).
    scratch = None if env.is_main else tempfile.TemporaryDirectory(prefix="wpeft-rank")
    if scratch is not None and step > 0 and layout.fisher_masks.exists():
        # A resumed record compares with past masks, and under FSDP2 every rank's shard takes
        # part: every rank starts from rank 0's mask history.
        shutil.copytree(layout.fisher_masks, RunLayout(scratch.name).fisher_masks)
    recorders = attach_recorders(
        run if scratch is None else scratch.name, method, model, task,
        every=cfg.record_every, start_step=step,
    )

    selection = getattr(method, "selection", None)

    def checkpoint() -> tuple[dict[str, torch.Tensor], dict[str, Any] | None] | None:
        """Write the checkpoint; under FSDP return what it gathered (trainable tensors and
        selection state on rank 0, empty elsewhere)."""
        if strategy == "fsdp":  # every rank takes part in gathering the shards
            full_state, full_optim = _gather_full_state(unwrapped, opt)
            selected = selection.state_dict() if selection is not None else None
            if env.is_main:
                save_torch_atomic(
                    {
                        "config": cfg.to_dict(),
                        "full_state": full_state,
                        "optimizer": full_optim,
                        "selection": _pack_bools(selected) if selected is not None else None,
                        "scheduler": sched.state_dict(),
                        "torch_rng": torch.get_rng_state(),
                        "step": step,
                        "epoch": epoch,
                        "in_epoch": in_epoch,
                        "world_size": env.world_size,
                        "strategy": strategy,
                    },
                    ckpt_path,
                )
            return full_state, selected
        if isinstance(opt, ZeroRedundancyOptimizer):
            opt.consolidate_state_dict(to=0)  # every rank sends its shard to rank 0
        if not env.is_main:
            return None
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
                "world_size": env.world_size,
            },
            ckpt_path,
        )
        return None

    params = method.trainable_parameters()
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress or not env.is_main,
               unit="step", desc=f"{cfg.task}/{cfg.method}")
    batches = _batches(task, cfg, epoch, in_epoch)
    started, seen = time.perf_counter(), 0
    net.train()
    while step < cfg.steps:
        batch = next(batches, None)
        if batch is None:
            epoch, in_epoch = epoch + 1, 0
            batches = _batches(task, cfg, epoch, 0)
            continue
        batch = _to(shard_batch(batch, env), device)
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
        seen += cfg.batch_size
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", samples_s=f"{seen / (time.perf_counter() - started):.1f}")
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            scores = _evaluate(task, model, "val", cfg, env, strategy)[1]
            if env.is_main:
                with open(layout.metrics, "a") as f:
                    f.write(json.dumps({"step": step, "split": "val", "loss": loss.item(), **scores}) + "\n")
            net.train()
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            checkpoint()
    bar.close()
    recorders.close(step)
    if scratch is not None:
        scratch.cleanup()
    gathered = checkpoint()
    if on_trained is not None:
        on_trained(method, env, opt)

    evaluated_as = strategy
    if gathered is not None:  # FSDP: rank 0 continues on an unsharded copy of the trained model
        model, task, method, evaluated_as = _unsharded_copy(cfg, env, device, task, *gathered)
    fields, scores = _evaluate(task, model, "test", cfg, env, evaluated_as)
    summary: dict[str, Any] = {}
    if env.is_main:
        tmp = partial(layout.fields)
        fields.to_netcdf(tmp, encoding={v: {"zlib": True, "complevel": 1} for v in fields.data_vars})
        os.replace(tmp, layout.fields)
        adapter_path = save_adapter(
            method, reference, layout.adapter, task=cfg.task, budget=cfg.budget,
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
            "world_size": env.world_size,
            "strategy": strategy,
        }
        write_json_atomic(layout.summary, summary)
    if env.distributed:
        box = [summary]
        torch.distributed.broadcast_object_list(box, src=0)
        summary = box[0]
    return summary


def _optimizer(method: PEFTMethod, cfg: TrainConfig, strategy: str) -> torch.optim.Optimizer:
    """The method's optimiser, or under ``shard_optimizer`` a ZeRO-1 wrapper of it that keeps
    each parameter's state on one rank only (the method's masks bound to the local shard)."""
    if not cfg.shard_optimizer:
        return method.optimizer(cfg.lr, cfg.weight_decay)
    if strategy != "ddp":
        raise ConfigError(
            f"shard_optimizer needs the ddp strategy (got {strategy!r}); FSDP shards the "
            "optimiser state by itself and one process has nothing to shard over."
        )
    cls, kwargs = method.optimizer_recipe(cfg.lr, cfg.weight_decay)
    opt = ZeroRedundancyOptimizer(method.trainable_parameters(), optimizer_class=cls, **kwargs)
    method.bind_optimizer(opt.optim)
    return opt


def _gather_full_state(
    module: nn.Module, opt: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full (unsharded) trainable tensors and optimiser state of an FSDP-wrapped module, keyed by
    parameter name, on CPU; a collective call (rank 0 gets the data, other ranks empty dicts).
    Frozen backbone tensors are left out: they are the pretrained weights."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(module, opt, options=options)
    # state-dict keys carry no activation-checkpoint wrapper names; match them without
    trainable = {plain_name(n) for n, p in module.named_parameters() if p.requires_grad}
    return {k: v for k, v in model_sd.items() if k in trainable}, optim_sd


def _load_full_state(
    module: nn.Module, opt: torch.optim.Optimizer, model_sd: dict, optim_sd: dict
) -> None:
    """Load :func:`_gather_full_state`'s output into a module wrapped with any world size (FSDP
    shards it again) or into a plain one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(module, opt, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True, strict=False))


def _unsharded_copy(
    cfg: TrainConfig,
    env: DistEnv,
    device: torch.device,
    task: Task,
    trained: dict[str, torch.Tensor],
    selection_state: dict[str, Any] | None,
) -> tuple[Any, Task, Any, str]:
    """Rank 0 continues on a freshly built, unsharded model with the same method applied (FSDP2
    replaced the parameter objects, so the method's per-parameter bookkeeping is done on the
    copy), loaded with what the final checkpoint gathered: the trained tensors (the frozen ones
    are the pretrained weights) and the selection's full masks. Other ranks keep only ``task``."""
    if not env.is_main:
        return None, task, None, "none"
    model, task, method, _, _ = prepare_run(cfg)
    module = TrainingModule(model, method.added)
    missing, unexpected = module.load_state_dict(trained, strict=False)
    params = dict(module.named_parameters())
    untrained = [n for n in missing if n in params and params[n].requires_grad]
    if unexpected or untrained:
        raise CheckpointError(
            f"The gathered state does not fit the model: unexpected {unexpected[:3]}, trainable "
            f"but missing {untrained[:3]}."
        )
    if selection_state is not None:
        method.selection.load_state_dict(selection_state)
    model.to(device)
    method.added.to(device)
    return model, task, method, "none"


def _evaluate(
    task: Task, model: WpeftAurora, split: str, cfg: TrainConfig, env: DistEnv, strategy: str
) -> tuple[Any, dict[str, Any]]:
    """Evaluate on rank 0 (DDP, one process) or on every rank in lockstep (FSDP needs all ranks
    in each forward); the other ranks wait and return ``(None, {})``."""
    if env.is_main or strategy == "fsdp":
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = task.evaluate(model, split, cfg.batch_size)
        model.train(was_training)
    else:
        out = (None, {})
    env.barrier()
    return out if env.is_main else (None, {})
