"""Process-group runtime: who am I, how many of us, and which slice of a batch is mine.

wpeft runs on PyTorch's own distributed engine: start it with ``torchrun`` and the training loop
picks up ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` from the environment, initialises the
process group (NCCL on GPUs, gloo on CPUs) and wraps the model with DDP or FSDP2
(:mod:`wpeft.distributed.strategy`). A plain ``python -m wpeft train`` is world size 1 and
touches nothing distributed.

    torchrun --nproc_per_node=8 -m wpeft train --task downscaling --method weatherpeft ...
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
        -m wpeft train ...

``TrainConfig.batch_size`` is the **global** batch: every rank draws the same global batch (the
order depends on the seed only) and keeps its contiguous slice, so a run on N ranks follows
the same data as a run on one, and a checkpoint resumes on any world size that divides it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from wpeft.errors import ConfigError

__all__ = ["DistEnv", "current", "env_int", "init_from_env", "shutdown"]


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job.

    Attributes:
        rank / world_size / local_rank: As set by torchrun (0 / 1 / 0 for a single process).
        backend: The process group's backend (``nccl`` / ``gloo``), None for a single process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def env_int(name: str, default: int) -> int:
    """An integer environment variable (torchrun's ``RANK``, ``WORLD_SIZE``, ...)."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"Environment variable {name}={raw!r} is not an integer.") from None


def current() -> DistEnv:
    """The running process group, or world size 1 if none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return DistEnv(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=env_int("LOCAL_RANK", 0),
            backend=dist.get_backend(),
        )
    return DistEnv()


def init_from_env(device_type: str, timeout_minutes: float = 30.0) -> DistEnv:
    """Initialise the process group from torchrun's variables if ``WORLD_SIZE`` > 1.

    Uses NCCL when ``device_type`` is ``cuda`` (and pins this process to GPU ``LOCAL_RANK``),
    gloo otherwise. Idempotent: an already initialised group is returned as is.
    """
    if dist.is_available() and dist.is_initialized():
        return current()
    world_size = env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return DistEnv()
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed.")
    local_rank = env_int("LOCAL_RANK", 0)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                "set --nproc_per_node to the number of GPUs."
            )
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    return current()


def shutdown() -> None:
    """Destroy the process group if this module's caller created one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
