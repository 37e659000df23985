"""The fine-tuning loop: one task, one method, one budget, one seed -> one run directory.

AdamW (or the method's sparse-safe variant) with linear warm-up and cosine decay, gradient
clipping, bf16 autocast and activation checkpointing on a GPU, a progress bar with loss and
throughput, evaluation at intervals, and atomic checkpoints that hold only what fine-tuning
trains (adapter tensors, their optimiser state, the method's selection state, RNG and data
position). ``resume=True`` continues a killed run to the same result as an uninterrupted one.

A run directory holds ``config.json``, ``metrics.jsonl`` (one JSON line per evaluation and,
with ``log_every``, per logged training loss),
``summary.json`` (trainable / changed counts, the three sizes of
:func:`wpeft.runs.store.run_sizes`, budget target and achieved fraction with the knob value in
``budget_match``, encoder-decoder policy, final scores),
``adapter.safetensors`` + ``adapter.json`` and ``fields.nc`` (test predictions and targets).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from wpeft.backbones.aurora_adapter import (
    GET_WEIGHTS,
    WpeftAurora,
    build_backbone,
    check_weights_file,
    file_sha256,
)
from wpeft.backbones.configs import get_config
from wpeft.backbones.pretrain import load_pretrained, pretrained_card
from wpeft.distributed.inventory import params_on_meta
from wpeft.distributed.runtime import DistEnv, init_from_env
from wpeft.distributed.strategy import STRATEGIES, TrainingModule, resolve_strategy, wrap
from wpeft.errors import CheckpointError, ConfigError, WpeftError
from wpeft.methods import create_method
from wpeft.methods.adapter_file import save_adapter
from wpeft.methods.base import PEFTMethod, Preparation, method_class, plain_name
from wpeft.methods.budget import BudgetMatch, describe_budget, match_budget
from wpeft.options import check_settings
from wpeft.paths import package_data_dir
from wpeft.runs.layout import RunFileError, RunLayout, partial, read_json_object
from wpeft.runs.recorders import Recorders, attach_recorders
from wpeft.runs.store import run_sizes, write_json_atomic
from wpeft.tasks import TaskBatch, create_task
from wpeft.tasks.base import Task
from wpeft.tasks.common import copy_task_variables
from wpeft.training.common import lr_factor, save_torch_atomic

__all__ = [
    "RESUMABLE_CHANGES",
    "Checkpointer",
    "TrainConfig",
    "TrainingDiverged",
    "TrainingInterrupted",
    "backbone_weights",
    "check_run_dir",
    "load_backbone",
    "match_run_budget",
    "probe_budget",
    "probe_setup",
    "run_method_options",
    "train",
]


@dataclass
class TrainConfig:
    """One fine-tuning run.

    Attributes:
        task / method: Registered names (``wpeft methods`` lists the methods).
        budget: Target fraction of backbone parameters for the method's size knob (e.g.
            0.04); None keeps the method's default size. A budget the method cannot reach
            (below its smallest size; for WeatherPEFT below TADP's share) is refused.
        method_options / task_options: Further config fields of the method / task. Values
            may nest (``{"world": {"nlat": 16}}``: a mapping for a dataclass-typed field).
        backbone: Backbone architecture (``tiny``, ``small``, ``1.3b``). Without ``checkpoint``
            its pretrained weights ship with wpeft (only ``tiny`` has them).
        checkpoint: A local weights file (safetensors, or a released Aurora ``.ckpt``) of the
            ``backbone`` architecture, e.g. Aurora 1.3B downloaded once from its model card;
            None uses the shipped weights. Such a backbone normalises with Aurora's own ERA5
            statistics (``aurora.normalisation``: ``WpeftAurora`` without ``norm_mean`` /
            ``norm_std`` leaves Aurora's normalisation as it is), not the world's. Stored as
            an absolute path; the run records it with its sha256 (``backbone_weights`` in
            ``summary.json``), hashed once per start or resume, and a resume refuses another
            path or a file whose content changed.
        steps, batch_size, lr, weight_decay, warmup_steps, grad_clip: Optimisation.
        eval_every / checkpoint_every: Intervals in optimiser steps (0: only at the end);
            validation also runs at the last step when ``eval_every`` is set.
        log_every: Every N optimiser steps append the training loss of that step (rank 0's
            share of the batch under data parallelism) to ``metrics.jsonl`` as
            ``{"step": s, "split": "train", "loss": value}``; 0: never.
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
    checkpoint: str | None = None
    steps: int = 200
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 10
    grad_clip: float = 1.0
    eval_every: int = 0
    log_every: int = 0
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
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr}.")
        for name in ("eval_every", "checkpoint_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0: only at the end), got {getattr(self, name)}.")
        if self.log_every < 0:
            raise ConfigError(
                f"log_every must be >= 0 (0: no training-loss lines), got {self.log_every}."
            )
        if self.record_every < 1:
            raise ConfigError(f"record_every must be >= 1, got {self.record_every}.")
        if not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise ConfigError(f"grad_clip must be a finite number > 0, got {self.grad_clip}.")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}.")
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"strategy {self.strategy!r} is unknown; choose one of {', '.join(STRATEGIES)}."
            )
        _check_device(self.device)
        self._check_backbone()
        self._check_names_and_settings()

    def _check_backbone(self) -> None:
        """The architecture is known and its weights are there: a checkpoint that is a file, or
        weights shipped with wpeft. Whether the file is readable is checked by :func:`train`
        before the run directory is made (reading it is not a config check)."""
        get_config(self.backbone)
        if self.checkpoint is None:
            if not (package_data_dir() / f"{self.backbone}.json").is_file():
                raise ConfigError(
                    f"backbone {self.backbone!r} has no weights shipped with wpeft (only tiny "
                    f"has); give --checkpoint PATH: {GET_WEIGHTS}."
                )
            return
        if not isinstance(self.checkpoint, (str, os.PathLike)) or not str(self.checkpoint):
            raise ConfigError(f"checkpoint={self.checkpoint!r} must be the path of a weights file.")
        self.checkpoint = os.path.abspath(os.path.expanduser(os.fspath(self.checkpoint)))
        path = Path(self.checkpoint)
        if not path.is_file():
            what = "is a directory, not a weights file" if path.is_dir() else "does not exist"
            raise CheckpointError(f"--checkpoint {path} {what}; {GET_WEIGHTS}.")

    def _check_names_and_settings(self) -> None:
        """Task, method and their settings are checked before anything is built."""
        from wpeft.tasks import TASKS

        if self.task not in TASKS:
            raise ConfigError(f"Unknown task {self.task!r}; available: {', '.join(sorted(TASKS))}.")
        method_cls, task_cls = method_class(self.method), TASKS[self.task]
        method_cls.Config.refuse_removed(self.method_options, f"method {self.method!r}")
        check_settings(method_cls.Config, self.method_options, f"method {self.method!r}")
        check_settings(task_cls.Config, self.task_options, f"task {self.task!r}")
        if "seed" in self.task_options:
            raise ConfigError(
                f"task option seed={self.task_options['seed']!r}: a task is seeded by the run's "
                "seed; give --seed (TrainConfig.seed) instead."
            )
        try:  # the configs' own checks (ranges, paths, ...)
            task_cls.Config(**self.task_options)
            method_cls.Config(**self.method_options)
        except TypeError as e:
            raise ConfigError(f"{self.task} / {self.method} settings: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return cls(**d)

    def same_run(self, other: dict[str, Any]) -> bool:
        """Whether ``other`` (a checkpoint's config) describes this run: everything that shapes
        the model, data or method agrees; the parallel layout and :data:`RESUMABLE_CHANGES`
        may differ."""
        return not self.differences(other)

    def differences(self, other: dict[str, Any]) -> list[str]:
        """The fields (sorted) in which ``other`` describes another run (see :meth:`same_run`).
        A run written before a field existed ran with its default; tuples read back from JSON
        are lists: both sides are compared as JSON values."""
        free = ("strategy", "shard_optimizer", *RESUMABLE_CHANGES)
        defaults = {f.name: _field_default(f) for f in dataclasses.fields(self)}
        mine = _as_json({k: v for k, v in self.to_dict().items() if k not in free})
        theirs = _as_json({k: v for k, v in {**defaults, **other}.items() if k not in free})
        return sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))

    def changes_from(self, other: dict[str, Any]) -> dict[str, list[Any]]:
        """``{field: [old, new]}`` of the :data:`RESUMABLE_CHANGES` between ``other`` (a
        checkpoint's config) and this config."""
        mine = self.to_dict()
        return {k: [other.get(k), mine[k]] for k in RESUMABLE_CHANGES if other.get(k) != mine[k]}


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


#: Settings a resumed run may change (recorded in its summary under ``resumes``): the learning
#: rate, the schedule's length and the checkpoint / evaluation / training-loss intervals.
RESUMABLE_CHANGES = ("lr", "steps", "checkpoint_every", "eval_every", "log_every")


def _check_device(name: str) -> None:
    """Refuse a device torch cannot parse or this machine does not have, before any set-up."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {name!r} is not a torch device; use auto, cpu or cuda[:N].") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but no CUDA GPU is visible; use --device cpu or auto.")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported; use auto, cpu or cuda[:N].")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _batches(
    task: Task, cfg: TrainConfig, epoch: int, skip: int, env: DistEnv | None = None
) -> Iterator[TaskBatch]:
    """The training batches of one epoch (reproducible from seed and epoch), after ``skip``;
    with a distributed ``env`` this rank's share of each global batch, the only samples it
    reads."""
    shard = (env.rank, env.world_size) if env is not None and env.distributed else None
    seed = _epoch_seed(cfg, epoch)
    for i, batch in enumerate(task.batches("train", cfg.batch_size, seed=seed, shard=shard)):
        if i >= skip:
            yield batch


def _epoch_seed(cfg: TrainConfig, epoch: int) -> int:
    """The seed of the training split's order in ``epoch``."""
    return cfg.seed * 100_003 + epoch


_END = object()


def _prefetched(items: Iterator[TaskBatch]) -> Iterator[TaskBatch]:
    """``items`` with the next one read in a background thread while the caller computes, so
    a real store is read from disk (or the network) while the model trains on the last batch.
    The order is unchanged; an error while reading is raised where that item is taken."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wpeft-prefetch")
    try:
        pending = pool.submit(next, items, _END)
        while (item := pending.result()) is not _END:
            pending = pool.submit(next, items, _END)
            yield item
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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


def load_backbone(cfg: TrainConfig) -> WpeftAurora:
    """The run's pristine backbone in eval mode: the shipped pretrained ``cfg.backbone``, or
    that architecture with the weights of ``cfg.checkpoint`` and Aurora's own normalisation."""
    if cfg.checkpoint is None:
        return load_pretrained(cfg.backbone)
    model = build_backbone(get_config(cfg.backbone), checkpoint=cfg.checkpoint)
    model.eval()
    return model


def backbone_weights(cfg: TrainConfig) -> dict[str, Any]:
    """What the run's backbone weights are, as recorded in ``summary.json``, the adapter's
    metadata and the run's checkpoints: architecture name, file and sha256. A ``checkpoint``
    file is checked to be readable and hashed here (once; a few seconds per GB); the shipped
    weights are named by their card's sha256, which :func:`load_pretrained` verifies."""
    if cfg.checkpoint is None:
        card = pretrained_card(cfg.backbone)
        return {"name": cfg.backbone, "source": "shipped", "file": card["weights"],
                "sha256": card["sha256"]}
    path = check_weights_file(cfg.checkpoint)
    return {"name": cfg.backbone, "source": "checkpoint", "file": str(path),
            "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def run_method_options(cfg: TrainConfig, task: Task) -> dict[str, Any]:
    """The method's settings of a run: ``cfg.method_options``, plus the task's
    (:meth:`PEFTMethod.task_settings`, TADP's prompt count) where those leave a key unset or None."""
    options = dict(cfg.method_options)
    for key, value in method_class(cfg.method).task_settings(task).items():
        if options.get(key) is None:
            options[key] = value
    return options


def match_run_budget(cfg: TrainConfig, task: Task, model: WpeftAurora) -> BudgetMatch | None:
    """The budget match of ``cfg`` (None without ``cfg.budget``), probed on fresh backbones of
    ``model``'s config with the variables ``task.setup(model)`` installed, at the run's method
    settings (:func:`run_method_options`). Raises :class:`BudgetInfeasible` for a budget the
    method cannot reach."""
    if cfg.budget is None:
        return None

    def probe() -> tuple[WpeftAurora, nn.Module]:  # a fresh backbone with the task's variables
        fresh = build_backbone(model.config)
        return fresh, copy_task_variables(model, fresh)

    return match_budget(cfg.method, cfg.budget, probe, **run_method_options(cfg, task))


def probe_setup(cfg: TrainConfig) -> tuple[Task, WpeftAurora]:
    """``cfg``'s task set up on a backbone of ``cfg.backbone``'s architecture, for budget
    probes (:func:`match_run_budget`) before a run: no weights are read (the task reads its
    data)."""
    model = build_backbone(get_config(cfg.backbone))
    task = create_task(cfg.task, seed=cfg.seed, **cfg.task_options)
    task.setup(model)
    return task, model


def probe_budget(cfg: TrainConfig) -> BudgetMatch | None:
    """The budget match of ``cfg`` without reading weights or data (``wpeft train --dry-run``):
    probed on backbones of ``cfg.backbone``'s architecture on the meta device, at the run's
    method settings (the task's prompt count included), but without the variables a task adds
    when it is set up (TADP's generators grow with them; the run matches again, with them).
    None without ``cfg.budget``; refuses a budget the method cannot reach."""
    if cfg.budget is None:
        return None
    task = create_task(cfg.task, seed=cfg.seed, **cfg.task_options)
    config = get_config(cfg.backbone)
    with params_on_meta():
        return match_budget(cfg.method, cfg.budget, lambda: build_backbone(config),
                            **run_method_options(cfg, task))


def prepare_run(
    cfg: TrainConfig, statistics: dict[str, Any] | None = None
) -> tuple[WpeftAurora, Task, PEFTMethod, dict, dict[str, Any]]:
    """Backbone, task (with its head installed), applied method and the pristine reference.
    ``statistics``: the task's training-period statistics of a resumed run (not recomputed)."""
    torch.manual_seed(cfg.seed)
    model = load_backbone(cfg)
    task = create_task(cfg.task, seed=cfg.seed, **cfg.task_options)
    if statistics:
        task.restore_statistics(statistics)
    head = task.setup(model)
    reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, p in head.named_parameters():
        reference.setdefault(f"head.{name}", p.detach().clone())
    method_cls = method_class(cfg.method)
    options = run_method_options(cfg, task)
    match = match_run_budget(cfg, task, model)
    budget_info: dict[str, Any] = {}
    if match is not None:
        if match.knob is not None:
            options[match.knob] = match.value
        budget_info = match.to_dict()
    if "seed" in {f.name for f in dataclasses.fields(method_cls.Config)}:
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
    overwrite: bool = False,
    progress: bool = True,
    on_trained: Callable[[PEFTMethod, DistEnv, torch.optim.Optimizer], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune, evaluate on the test split, and write the run directory. Returns the summary.

    Args:
        cfg: The run.
        run_dir: Its directory. One that already holds a run is refused unless ``resume``
            (continue it from its checkpoint; the learning rate, length and intervals may
            change, see :data:`RESUMABLE_CHANGES`) or ``overwrite`` (remove it and start again).
        progress: Show a progress bar.
        on_trained: ``on_trained(method, env, optimizer)`` is called on every rank after the last
            step, before evaluation (to inspect the trained state).

    Under ``torchrun`` every rank calls this with the same arguments; rank 0 writes the run
    directory, and every rank returns the same summary. SIGINT / SIGTERM stop training at the
    next step boundary with a checkpoint (:class:`TrainingInterrupted`); a non-finite loss or
    state stops it keeping the last finite checkpoint (:class:`TrainingDiverged`).
    """
    out = Path(run_dir)
    layout = RunLayout(out)
    check_run_dir(out, cfg, resume=resume, overwrite=overwrite)
    if cfg.checkpoint is not None:  # a missing or corrupt file is refused before any folder
        check_weights_file(cfg.checkpoint)
    device, env = _device_for(cfg)
    weights = _agreed(env, backbone_weights(cfg) if env.is_main else None)
    ckpt_path = layout.checkpoint  # a resume with another config is refused before any set-up
    state = _read_checkpoint(ckpt_path, cfg, weights) if resume and ckpt_path.exists() else None
    # Data, task and method are checked before the run directory is touched: a refused run
    # (a missing variable, a bad period...) leaves no half-made run behind.
    statistics = _read_task_statistics(layout) if state is not None else None
    model, task, method, reference, budget_info = prepare_run(cfg, statistics)
    preparation = method.preparation(task.num_samples("train"), cfg.batch_size)
    if env.is_main and progress and budget_info:
        tqdm.write(describe_budget(budget_info))
    if env.is_main:
        if overwrite and out.exists():
            _remove_run_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        if task.statistics():
            write_json_atomic(layout.task_statistics, task.statistics())
    env.barrier()
    strategy = resolve_strategy(cfg.strategy, env, method)
    _to_device(model, method, device)
    if state is not None:  # a resumed run has its static mask in the checkpoint
        _check_strategy(ckpt_path, state, strategy)
        _restore_method_state(method, state)
    else:
        _prepare_static_selection(method, preparation, task, model, cfg, device, env, progress)
        if env.is_main:  # a fresh start: metrics of an earlier attempt go
            layout.metrics.unlink(missing_ok=True)
    position = _Position.of(state)
    if state is not None and env.is_main:  # the steps after the checkpoint are logged again
        _forget_train_lines(layout.metrics, after=position.step)
    resumes = _resume_history(cfg, state, position.step)

    # DDP / FSDP see the backbone (with the task's heads) and the method's added modules.
    unwrapped = TrainingModule(model, method.added)
    net = wrap(unwrapped, strategy, env, device)
    method.on_wrapped()  # FSDP2 replaced the parameters with shards: the method follows
    opt = _optimizer(method, cfg, strategy)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps)
    )
    if state is not None:
        _restore_optimizer(unwrapped, opt, sched, state, cfg)
    if env.is_main:
        write_json_atomic(layout.config, cfg.to_dict())
    checkpointer = Checkpointer(
        ckpt_path, cfg, env, strategy, method, reference, unwrapped, opt, sched, resumes,
        last_step=position.step if state is not None else None, backbone_weights=weights,
    )
    run = _Run(cfg, layout, env, device, strategy, task, model, method, weights)
    started = time.perf_counter()
    with _StopOnSignal(env) as stop, _recording(run, position.step) as recorders:
        _run_steps(run, net, opt, sched, checkpointer, position, stop, recorders, progress)
    gathered = checkpointer.save(position)
    if on_trained is not None:
        on_trained(method, env, opt)
    return _finish(run, reference, budget_info, gathered, resumes, time.perf_counter() - started)


def _read_task_statistics(layout: RunLayout) -> dict[str, Any] | None:
    """The task statistics a run wrote when it started; ``None`` (computed again) when the file
    is missing or unreadable, which costs a pass over the training period, not the run."""
    if not layout.task_statistics.exists():
        return None
    try:
        return read_json_object(layout.task_statistics)
    except RunFileError as e:
        warnings.warn(f"{e}; the task's statistics are computed again.", stacklevel=2)
        return None


class TrainingDiverged(WpeftError, FloatingPointError):
    """The loss or the trained state became non-finite; the last finite checkpoint is kept."""


class TrainingInterrupted(WpeftError):
    """SIGINT / SIGTERM stopped training at a step boundary, after writing a checkpoint.

    Attributes:
        step: The step the checkpoint holds.
        checkpoint: Its path.
    """

    def __init__(self, message: str, step: int, checkpoint: Path) -> None:
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


def check_run_dir(run: Path, cfg: TrainConfig, *, resume: bool, overwrite: bool) -> None:
    """Refuse a run directory that cannot be written or that holds something this run would
    destroy, before any model is built or folder created."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; give one of them.")
    layout = RunLayout(run)
    if run.exists() and not run.is_dir():
        raise ConfigError(f"--out {run} is a file, not a directory; choose a directory path.")
    existing = run
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--out {run}: {existing} is a file, so no directory can be made there.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--out {run}: {existing} is not writable (read-only file system or permissions); "
            "choose a writable path."
        )
    if not run.exists() or not any(run.iterdir()) or overwrite and _is_run_dir(run):
        return
    if not _is_run_dir(run):
        raise ConfigError(
            f"--out {run} is not empty and holds no wpeft run; choose a new or empty directory."
        )
    if layout.finished and not resume:
        raise ConfigError(
            f"Run directory {run} already holds a finished run; choose another, or give "
            "--overwrite to replace it."
        )
    if not resume:
        raise ConfigError(
            f"Run directory {run} holds an unfinished run; give --resume to continue it from its "
            "last checkpoint or --overwrite to start it again."
        )
    if not layout.checkpoint.exists():  # killed before its first checkpoint
        try:
            previous = read_json_object(layout.config)
        except RunFileError:
            previous = None
        if previous is not None and not cfg.same_run(previous):
            raise ConfigError(
                f"Run directory {run} holds a run with another config; use a new run directory "
                "or --overwrite."
            )


def _is_run_dir(run: Path) -> bool:
    """Whether ``run`` holds a run's files (a config, or files only training writes)."""
    layout = RunLayout(run)
    return layout.has_config or layout.has_run_files


def _remove_run_dir(run: Path) -> None:
    """Remove a run directory atomically: renamed aside in one step, then deleted."""
    aside = Path(tempfile.mkdtemp(prefix=f".{run.name}.old-", dir=run.parent))
    os.replace(run, aside / run.name)
    shutil.rmtree(aside)


def _to_device(model: WpeftAurora, method: PEFTMethod, device: torch.device) -> None:
    model.to(device)
    method.added.to(device)
    if device.type == "cuda":
        model.autocast_backbone = True  # bf16 on the backbone, as Aurora fine-tunes
        model.configure_activation_checkpointing()


def _prepare_static_selection(
    method: PEFTMethod,
    preparation: Preparation | None,
    task: Task,
    model: WpeftAurora,
    cfg: TrainConfig,
    device: torch.device,
    env: DistEnv,
    progress: bool,
) -> None:
    """Static Fisher masks (FISH, Child-Tuning_D) are chosen before training from the training
    batches ``preparation`` asks for (the first epoch's order at its batch size), streamed: each
    is read (one ahead, in the background), moved to the device when used and dropped.

    Distributed runs: every rank makes the whole pass on the same global batches with its own
    replica, before wrapping, so every rank computes the same mask alone (no collective in the
    pass; the cost is that every rank does the whole pass)."""
    if preparation is None:
        return

    def prep_loss(batch: TaskBatch) -> torch.Tensor:
        return task.loss(task.predict(model, batch), batch)

    seed = _epoch_seed(cfg, 0)
    read = itertools.islice(task.batches("train", preparation.batch_size, seed=seed),
                            preparation.batches)
    batches = tqdm((b.to(device) for b in _prefetched(read)), total=preparation.batches,
                   disable=not progress or not env.is_main, unit="batch",
                   desc=f"{cfg.method} Fisher", leave=False)
    method.prepare(prep_loss, batches, preparation.batches)


def _agreed(env: DistEnv, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a collective call under torchrun)."""
    if not env.distributed:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _read_checkpoint(
    path: Path, cfg: TrainConfig, weights: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A checkpoint of this run, checked against the config and the backbone weights (their
    sha256, when the checkpoint records it)."""
    try:
        with warnings.catch_warnings():  # torch's note that it validates sparse tensors
            warnings.filterwarnings("ignore", message="Validating sparse tensor")
            state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise CheckpointError(f"Checkpoint {path} is corrupt ({e}); delete it to restart.") from e
    if not cfg.same_run(state["config"]):
        raise CheckpointError(
            f"{path} belongs to a run with another config (only {', '.join(RESUMABLE_CHANGES)} "
            "may change on --resume); use a new run directory."
        )
    was = state.get("backbone_weights") or {}
    if weights is not None and was.get("sha256") and was["sha256"] != weights["sha256"]:
        raise CheckpointError(
            f"{path} belongs to a run on backbone weights {was.get('file')} with sha256 "
            f"{was['sha256'][:12]}..., but {weights['file']} now has {weights['sha256'][:12]}...: "
            "the file changed since the run started; restore it or use a new run directory."
        )
    return state


def _check_strategy(path: Path, state: dict[str, Any], strategy: str) -> None:
    """Refuse to resume a checkpoint under a strategy that cannot read it."""
    fsdp_written = "full_state" in state
    if fsdp_written and strategy == "ddp":
        raise CheckpointError(
            f"{path} was written by an FSDP run; resume it with --strategy fsdp or in one process."
        )
    if not fsdp_written and strategy == "fsdp":
        raise CheckpointError(
            f"{path} was written by a {state.get('strategy', 'DDP or one-process')} run; "
            "resume it with that strategy (FSDP resumes FSDP checkpoints)."
        )


def _restore_method_state(method: PEFTMethod, state: dict[str, Any]) -> None:
    """Adapter tensors (one-process / DDP checkpoints; FSDP ones load after wrapping), the
    selection's masks, and the RNG."""
    if "full_state" not in state:
        method.load_adapter_state(state["adapter"])
    if state.get("selection") is not None:
        method.selection.load_state_dict(_unpack_bools(state["selection"]))
    torch.set_rng_state(state["torch_rng"])


def _restore_optimizer(
    module: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LambdaLR,
    state: dict[str, Any],
    cfg: TrainConfig,
) -> None:
    """Optimiser and schedule state; a changed learning rate or length takes effect from the
    resumed step on (the schedule's factor at that step times the new rate)."""
    if "full_state" in state:
        _load_full_state(module, opt, state["full_state"], state["optimizer"])
    else:
        opt.load_state_dict(_optimizer_state_from_disk(state["optimizer"]))
    sched.load_state_dict(state["scheduler"])
    ratio = cfg.lr / state["config"]["lr"]
    sched.base_lrs = [base * ratio for base in sched.base_lrs]
    for group, base, factor in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * factor(sched.last_epoch)


def _resume_history(cfg: TrainConfig, state: dict[str, Any] | None, step: int) -> list[dict]:
    """The run's resumes that changed a setting: ``[{"step": 40, "changed": {"lr": [old, new]}}]``."""
    if state is None:
        return []
    history = list(state.get("resumes", []))
    changed = cfg.changes_from(state["config"])
    if changed:
        history.append({"step": step, "changed": changed})
    return history


@dataclass
class _Position:
    """Where training is: optimiser steps done, epoch, and batches consumed in that epoch."""

    step: int = 0
    epoch: int = 0
    in_epoch: int = 0

    @classmethod
    def of(cls, state: dict[str, Any] | None) -> _Position:
        if state is None:
            return cls()
        return cls(state["step"], state["epoch"], state["in_epoch"])


def _all_finite(tensors: Iterable[torch.Tensor], env: DistEnv) -> bool:
    """Whether every entry of ``tensors`` (local shards under FSDP) is finite, on every rank."""
    ok = all(bool(torch.isfinite(_local(t)).all()) for t in tensors)
    if env.distributed:
        flag = torch.tensor([int(ok)], device=_collective_device(env))
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        ok = bool(flag.item())
    return ok


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t.detach()


def _collective_device(env: DistEnv) -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


class Checkpointer:
    """Writes a run's checkpoint: only what fine-tuning trains (adapter tensors or, under FSDP,
    the gathered trainable tensors), optimiser and schedule state, the selection's masks, RNG,
    data position and the resume history; only from a finite state.

    ``last_step`` is the step of the newest checkpoint on disk (None: none yet).
    """

    def __init__(
        self,
        path: Path,
        cfg: TrainConfig,
        env: DistEnv,
        strategy: str,
        method: PEFTMethod,
        reference: dict[str, torch.Tensor],
        module: nn.Module,
        opt: torch.optim.Optimizer,
        sched: torch.optim.lr_scheduler.LRScheduler,
        resumes: list[dict],
        last_step: int | None = None,
        backbone_weights: dict[str, Any] | None = None,
    ) -> None:
        self.path, self.cfg, self.env, self.strategy = path, cfg, env, strategy
        self.method, self.reference, self.module = method, reference, module
        self.opt, self.sched, self.resumes = opt, sched, resumes
        self.last_step = last_step
        self.backbone_weights = backbone_weights

    def last_good(self) -> str:
        """Where the last finite state is, in words (for messages)."""
        if self.last_step is None:
            return f"no checkpoint was written before (the first was due at step {self.cfg.checkpoint_every or self.cfg.steps})"
        return f"the last finite checkpoint, step {self.last_step}, is in {self.path}"

    def save(self, position: _Position) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None] | None:
        """Write the checkpoint of ``position``; under FSDP return what it gathered (trainable
        tensors and selection state on rank 0, empty elsewhere). A collective call.

        Raises:
            TrainingDiverged: a trainable tensor is non-finite (nothing is written).
        """
        if not _all_finite(self.method.trainable_parameters(), self.env):
            raise TrainingDiverged(
                f"Training diverged: the trained state is non-finite at step {position.step}; "
                f"{self.last_good()}. Lower --lr and resume it (--resume --lr ...) or start again "
                "(--overwrite)."
            )
        selection = self.method.selection
        common = {
            "config": self.cfg.to_dict(),
            "scheduler": self.sched.state_dict(),
            "torch_rng": torch.get_rng_state(),
            **dataclasses.asdict(position),
            "world_size": self.env.world_size,
            "resumes": self.resumes,
            "backbone_weights": self.backbone_weights,
        }
        gathered = None
        if self.strategy == "fsdp":  # every rank takes part in gathering the shards
            full_state, full_optim = _gather_full_state(self.module, self.opt)
            selected = selection.state_dict() if selection is not None else None
            gathered = (full_state, selected)
            state = {"full_state": full_state, "optimizer": full_optim, "strategy": "fsdp",
                     "selection": _pack_bools(selected) if selected is not None else None}
        else:
            if isinstance(self.opt, ZeroRedundancyOptimizer):
                self.opt.consolidate_state_dict(to=0)  # every rank sends its shard to rank 0
            if not self.env.is_main:
                self.last_step = position.step
                return None
            state = {
                "adapter": self.method.adapter_state(self.reference),
                "optimizer": _optimizer_state_for_disk(self.opt),
                "selection": _pack_bools(selection.state_dict()) if selection is not None else None,
            }
        if self.env.is_main:
            save_torch_atomic({**common, **state}, self.path)
        self.last_step = position.step
        return gathered


class _StopOnSignal:
    """Turns SIGINT / SIGTERM into a request to stop at the next step boundary (a second
    SIGINT aborts at once). Installed only in the main thread; restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, env: DistEnv) -> None:
        self.env = env
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        self.received = signum

    def requested(self) -> bool:
        """Whether any rank received a signal (a collective call under torchrun)."""
        asked = self.received is not None
        if self.env.distributed:
            flag = torch.tensor([int(asked)], device=_collective_device(self.env))
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            asked = bool(flag.item())
        return asked

    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal on another rank"


@dataclass
class _Run:
    """What the parts of one training run share (this rank's view)."""

    cfg: TrainConfig
    layout: RunLayout
    env: DistEnv
    device: torch.device
    strategy: str
    task: Task
    model: WpeftAurora
    method: PEFTMethod
    backbone_weights: dict[str, Any]


@contextlib.contextmanager
def _recording(run: _Run, start_step: int) -> Iterator[Recorders]:
    """The run's recorders, attached from ``start_step``. They write on rank 0; other ranks
    record into a scratch folder (an FSDP forward of the attention recorder needs every rank),
    removed on any exit."""
    layout = run.layout
    scratch = None if run.env.is_main else tempfile.TemporaryDirectory(prefix="wpeft-rank")
    if scratch is not None and start_step > 0 and layout.fisher_masks.exists():
        # A resumed record compares with past masks, and under FSDP2 every rank's shard takes
        # part: every rank starts from rank 0's mask history.
        shutil.copytree(layout.fisher_masks, RunLayout(Path(scratch.name)).fisher_masks)
    try:
        yield attach_recorders(
            layout.path if scratch is None else scratch.name, run.method, run.model, run.task,
            every=run.cfg.record_every, start_step=start_step,
        )
    finally:
        if scratch is not None:
            scratch.cleanup()


def _run_steps(
    run: _Run,
    net: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LambdaLR,
    checkpointer: Checkpointer,
    position: _Position,
    stop: _StopOnSignal,
    recorders: Recorders,
    progress: bool,
) -> None:
    """The optimiser steps from ``position`` to ``cfg.steps`` (``position`` advances in place):
    stop requests, divergence, records, evaluations and checkpoints at their intervals."""
    cfg, env, method, task = run.cfg, run.env, run.method, run.task
    params = method.trainable_parameters()
    bar = tqdm(total=cfg.steps, initial=position.step, disable=not progress or not env.is_main,
               unit="step", desc=f"{cfg.task}/{cfg.method}")
    batches = _prefetched(_batches(task, cfg, position.epoch, position.in_epoch, env))
    started, seen = time.perf_counter(), 0
    net.train()
    while position.step < cfg.steps:
        if stop.requested():
            checkpointer.save(position)
            recorders.close(position.step)
            raise TrainingInterrupted(
                f"Training stopped by {stop.name()} at step {position.step} of {cfg.steps}; the "
                f"state is saved in {checkpointer.path}. Continue with the same command plus "
                "--resume.",
                position.step, checkpointer.path,
            )
        batch = next(batches, None)
        if batch is None:
            position.epoch, position.in_epoch = position.epoch + 1, 0
            batches = _prefetched(_batches(task, cfg, position.epoch, 0, env))
            continue
        batch = batch.to(run.device)  # this rank's share, read by _batches
        loss = task.loss(task.predict(net, batch), batch)
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"Training diverged: the loss became {loss.item()} at step {position.step}; "
                f"{checkpointer.last_good()}. Lower --lr and resume (--resume --lr ...), start "
                "again (--overwrite), or check the inputs for NaNs."
            )
        opt.zero_grad(set_to_none=True)
        method.before_backward(position.step, cfg.steps)
        loss.backward()
        method.after_backward(position.step, cfg.steps)
        method.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        position.step, position.in_epoch = position.step + 1, position.in_epoch + 1
        recorders.on_step(position.step)
        seen += cfg.batch_size
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", samples_s=f"{seen / (time.perf_counter() - started):.1f}")
        if cfg.log_every and position.step % cfg.log_every == 0 and env.is_main:
            row = {"step": position.step, "split": "train", "loss": loss.item()}
            _append_line(run.layout.metrics, row)
        # every eval_every steps and at the last one, so a curve ends on the final weights
        if cfg.eval_every and (position.step % cfg.eval_every == 0 or position.step == cfg.steps):
            scores = _evaluate(task, run.model, "val", cfg, env, run.strategy)[1]
            if env.is_main:
                _append_line(run.layout.metrics,
                             {"step": position.step, "split": "val", "loss": loss.item(), **scores})
            net.train()
        if cfg.checkpoint_every and position.step % cfg.checkpoint_every == 0:
            checkpointer.save(position)
    bar.close()
    recorders.close(position.step)


def _append_line(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line to ``metrics.jsonl`` (rank 0 only)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _forget_train_lines(path: Path, after: int) -> None:
    """Drop the ``split == "train"`` lines of steps > ``after`` from ``metrics.jsonl``: a resumed
    run does those steps again and logs them again (the records of :class:`RecordStore` are
    truncated the same way). Every other line is kept as it is (validation lines of a re-done
    step are superseded by the new ones on reading, :func:`wpeft.runs.curves.val_lines`); a last
    line cut off by a kill is ended with a newline, or dropped if it is not JSON, so the next
    line does not run into it. The file is replaced atomically, and only if something changes."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return
    lines = raw.split(b"\n")
    keep, changed = [], False
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None
        if number == len(lines):  # after the last newline
            if not line.strip():
                break
            changed = True  # a cut-off last line
            if row is None:
                break
        step = row.get("step") if isinstance(row, dict) else None
        if isinstance(row, dict) and row.get("split") == "train" and isinstance(step, int) \
                and step > after:
            changed = True
            continue
        keep.append(line)
    if changed:
        tmp = partial(path)
        tmp.write_bytes(b"".join(line + b"\n" for line in keep))
        os.replace(tmp, path)


def _finish(
    run: _Run,
    reference: dict[str, torch.Tensor],
    budget_info: dict[str, Any],
    gathered: tuple[dict[str, torch.Tensor], dict[str, Any] | None] | None,
    resumes: list[dict],
    train_seconds: float,
) -> dict[str, Any]:
    """Evaluate on the test split and write ``fields.nc``, the adapter and ``summary.json``
    (rank 0); every rank returns the summary."""
    cfg, layout, env, strategy = run.cfg, run.layout, run.env, run.strategy
    task, model, method = run.task, run.model, run.method
    evaluated_as = strategy
    if gathered is not None:  # FSDP: rank 0 continues on an unsharded copy of the trained model
        model, task, method, evaluated_as = _unsharded_copy(cfg, env, run.device, task, *gathered)
    fields, scores = _evaluate(task, model, "test", cfg, env, evaluated_as)
    summary: dict[str, Any] = {}
    if env.is_main:
        tmp = partial(layout.fields)
        fields.to_netcdf(tmp, encoding={v: {"zlib": True, "complevel": 1} for v in fields.data_vars})
        os.replace(tmp, layout.fields)
        adapter_path = save_adapter(
            method, reference, layout.adapter, task=cfg.task, budget=cfg.budget,
            seed=cfg.seed, variables=list(task.headline), backbone_weights=run.backbone_weights,
        )
        summary = {
            **task.describe(),
            **method.describe(reference),
            "backbone_weights": run.backbone_weights,
            "budget": cfg.budget,
            "budget_match": budget_info,
            "seed": cfg.seed,
            "scores": scores,
            "adapter_bytes": adapter_path.stat().st_size,
            "steps": cfg.steps,
            "train_seconds": train_seconds,
            "world_size": env.world_size,
            "strategy": strategy,
            "resumes": resumes,
        }
        sizes = run_sizes(summary)  # the sizes besides budget_fraction and adapter_bytes
        summary.update(changed_fraction=sizes["changed_fraction"],
                       adapter_fraction=sizes["adapter_fraction"])
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
