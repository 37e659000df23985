"""``wpeft train --dry-run``: what a launch would do, without loading data or weights."""

from __future__ import annotations

from typing import Any

import torch

from wpeft.distributed.runtime import DistEnv, env_int
from wpeft.distributed.strategy import resolve_strategy
from wpeft.errors import ConfigError
from wpeft.methods import create_method

__all__ = ["launch_plan"]


def _env_from_variables() -> DistEnv:
    """The layout torchrun set up for this process (no process group is created)."""
    world = env_int("WORLD_SIZE", 1)
    return DistEnv(rank=env_int("RANK", 0), world_size=world, local_rank=env_int("LOCAL_RANK", 0),
                   backend=None if world == 1 else "nccl or gloo")


def launch_plan(cfg: Any) -> dict[str, Any]:
    """The launch plan of a :class:`~wpeft.training.loop.TrainConfig` under the current
    torchrun environment: world size, per-rank batch, strategy, precision, checkpointing.

    Raises :class:`~wpeft.errors.ConfigError` for a layout that cannot run (global batch not
    divisible by the world size, FSDP with ``broadcast_masks``, ...).
    """
    env = _env_from_variables()
    wants_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    method = create_method(cfg.method, **cfg.method_options)
    strategy = resolve_strategy(cfg.strategy, env, method)
    if cfg.batch_size % env.world_size:
        raise ConfigError(
            f"batch_size {cfg.batch_size} (the global batch) is not divisible by the world size "
            f"{env.world_size}; use a multiple of the number of processes."
        )
    nodes = env_int("GROUP_WORLD_SIZE", 1)
    return {
        "world_size": env.world_size,
        "nodes": nodes,
        "backend": ("nccl" if wants_cuda else "gloo") if env.distributed else "none",
        "device": f"cuda:{env.local_rank}" if wants_cuda else "cpu",
        "global_batch": cfg.batch_size,
        "per_rank_batch": cfg.batch_size // env.world_size,
        "strategy": strategy,
        "sharding": {
            "none": "none (one process)",
            "ddp": "none: full replica per rank, gradients of trainable parameters all-reduced",
            "fsdp": "FSDP2 fully_shard per Swin block + root; parameters, gradients and "
                    "optimiser state sharded over ranks",
        }[strategy],
        "optimizer_state": "sharded over ranks (ZeRO-1)" if getattr(cfg, "shard_optimizer", False)
        and strategy == "ddp" else ("sharded with the parameters (selection masks and "
                                    "importance too)" if strategy == "fsdp"
                                    else "replicated on every rank" if env.distributed else "local"),
        "precision": "bf16 autocast on the backbone, fp32 weights and optimiser" if wants_cuda
        else "fp32",
        "activation_checkpointing": "per Swin block" if wants_cuda else "off (CPU)",
        "checkpoints": "rank 0 writes adapter-only checkpoints (full tensors, global data "
                       "position: resumable on another world size)" if strategy != "fsdp"
        else "trainable tensors, optimiser state and selection masks gathered on rank 0 "
             "(resharded on load, any world size)",
        "steps": cfg.steps,
        "samples": cfg.steps * cfg.batch_size,
    }
