"""Data-parallel strategies on PyTorch's own engine: DDP and FSDP2 (``fully_shard``).

* ``ddp``: every rank holds the whole backbone; gradients of trainable parameters (the backbone's
  selected ones, adapters, prompt generators, heads) are all-reduced during backward. Parameters
  with ``requires_grad=False`` are neither synchronised nor given gradient buckets, so a frozen
  backbone costs no communication. Every method works under DDP, SFAS included: the Fisher
  information is accumulated from the all-reduced gradient, which is the gradient of the global
  batch, so the mask is the same on every rank (and the same as a one-process run's).
* ``fsdp``: FSDP2 shards each Swin block, the rest of the backbone and the method's added modules
  (each a unit of its own) across ranks.
  FSDP2 shards parameter by parameter, so frozen and trainable tensors may share a block — the
  pitfall of FSDP1's flat parameters does not arise. Methods that pick single *entries* of
  backbone tensors (SFAS, Fish mask, Child-Tuning_D, WeatherPEFT's SFAS part) select on each
  rank's shards with one global top-k (counts summed over ranks, the noise of each entry as in
  one process; :mod:`wpeft.methods.shards`), after ``method.on_wrapped()`` rebinds them.

The model that is wrapped is :class:`TrainingModule`: the backbone (with the task's heads inside)
*and* the method's added modules (TADP generators, ...), so that DDP/FSDP see every trainable
parameter, including those that live outside the backbone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from wpeft.distributed.runtime import DistEnv
from wpeft.errors import ConfigError

if TYPE_CHECKING:
    from wpeft.methods.base import PEFTMethod

__all__ = ["STRATEGIES", "TrainingModule", "resolve_strategy", "wrap"]

STRATEGIES = ("auto", "none", "ddp", "fsdp")


class TrainingModule(nn.Module):
    """Backbone + the method's added modules as one module; ``forward`` is the backbone's."""

    def __init__(self, model: nn.Module, added: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.added = added

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


def resolve_strategy(strategy: str, env: DistEnv, method: PEFTMethod) -> str:
    """``auto`` -> ``none`` for one process, ``ddp`` otherwise; checks the method fits."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"Unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}.")
    if strategy == "auto":
        strategy = "ddp" if env.distributed else "none"
    method.check_strategy(strategy)
    if strategy == "none" and env.distributed:
        raise ConfigError(
            f"strategy 'none' with world size {env.world_size}: ranks would train apart. "
            "Use ddp or fsdp."
        )
    return strategy


def _block_modules(model: nn.Module) -> list[nn.Module]:
    """The Swin3D blocks, outermost wrapper (activation-checkpoint wrapper if present)."""
    blocks = [b.block for b in model.blocks]
    ids = {id(b) for b in blocks}
    out: list[nn.Module] = []
    for module in model.modules():  # a checkpoint wrapper holds its block as a child
        children = list(module.children())
        if len(children) == 1 and id(children[0]) in ids and module is not model:
            out.append(module)
            ids.discard(id(children[0]))
    for b in blocks:
        if id(b) in ids:
            out.append(b)
    return out


def _callable_units(container: nn.Module) -> list[nn.Module]:
    """The outermost modules with a ``forward`` and parameters inside a container of containers
    (``ModuleDict`` / ``ModuleList`` cannot be FSDP units: they are never called)."""
    units: list[nn.Module] = []
    for child in container.children():
        if isinstance(child, (nn.ModuleDict, nn.ModuleList)):
            units += _callable_units(child)
        elif any(True for _ in child.parameters()):
            units.append(child)
    return units


def wrap(
    module: TrainingModule, strategy: str, env: DistEnv, device: torch.device
) -> nn.Module:
    """Wrap for data-parallel training; returns the module to call in the training step.

    ``none`` returns ``module`` itself; ``ddp`` a ``DistributedDataParallel``; ``fsdp`` shards
    ``module`` in place (each Swin block, then the root) and returns it.
    """
    if strategy == "none":
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            module,
            device_ids=[device.index] if device.type == "cuda" else None,
            # Every trainable parameter takes part in every step of the wpeft tasks (a task
            # feeds all the variables it embeds); the equivalence tests check this.
            find_unused_parameters=False,
            # Gradients live in the all-reduce buckets instead of beside them: one copy of the
            # trainable gradients less (for SFAS the whole backbone's).
            gradient_as_bucket_view=True,
        )
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (env.world_size,))
        for block in _block_modules(module.model):
            fully_shard(block, mesh=mesh)
        # The backbone and the added modules are roots of their own, so that calling the
        # backbone directly (evaluation, the attention recorder) or a generator from a block's
        # hook (TADP) gathers what it needs.
        for unit in _callable_units(module.added):
            fully_shard(unit, mesh=mesh)
        fully_shard(module.model, mesh=mesh)
        return module
    raise ConfigError(f"Unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}.")
