"""Entry selection over FSDP2 shards: where a rank's shard sits, and the few collectives needed.

Under FSDP2 (``fully_shard``) every parameter is a DTensor sharded on dim 0 over a 1-D mesh:
with ``c = ceil(n0 / W)`` rows per chunk (``torch.chunk``'s split), rank ``r`` holds rows
``[r·c, min((r+1)·c, n0))``; trailing ranks may hold none. In a row-major tensor those rows are
one contiguous range of the flat index, so a rank's shard of a tensor is a :class:`Span`
``[start, start + numel)`` of the full tensor's entries.

Selection (SFAS, FISH mask, Child-Tuning_D) then runs on the local spans and agrees on one
*global* top-k with a handful of small collectives (:class:`Collective`): sums of counts for the
threshold search, the max for the normalisation, per-rank tie counts so that ties are taken in
the order of the unsharded tensors, and gathers of full masks for checkpoints and records.
Without a process group the same calls are local no-ops, so one code path serves every layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from wpeft.errors import ConfigError

__all__ = ["LOCAL", "Collective", "Span", "local_tensor", "span_of"]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: the local shard of a DTensor (sharing its storage), else ``t``."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        with torch.no_grad():
            return t.to_local()
    return t


@dataclass(frozen=True)
class Span:
    """Entries ``[start, start + numel)`` of a full tensor of ``shape`` that this rank holds."""

    shape: torch.Size
    start: int
    numel: int

    @property
    def full_numel(self) -> int:
        return self.shape.numel()

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.numel == self.full_numel

    def narrow(self, full: torch.Tensor) -> torch.Tensor:
        """This span of ``full`` (any tensor with ``full_numel`` entries), flat ``(numel,)``."""
        return full.reshape(-1).narrow(0, self.start, self.numel)


def span_of(p: torch.Tensor) -> Span:
    """Where this rank's shard of ``p`` sits in the full tensor (the whole of a plain tensor).

    Raises:
        ConfigError: for a DTensor sharded other than on dim 0 of a 1-D mesh (FSDP2's layout).
    """
    from torch.distributed.tensor import DTensor, Shard

    shape = torch.Size(p.shape)
    if not isinstance(p, DTensor):
        return Span(shape, 0, shape.numel())
    placements = tuple(p.placements)
    if p.device_mesh.ndim != 1 or len(placements) != 1 or placements[0] != Shard(0):
        raise ConfigError(
            f"Entry selection supports parameters sharded on dim 0 over a 1-D mesh (FSDP2's "
            f"fully_shard); got placements {placements} on a {p.device_mesh.ndim}-D mesh."
        )
    world, rank = p.device_mesh.size(), p.device_mesh.get_local_rank()
    rows = shape[0] if shape else 1
    row = shape.numel() // rows if rows else 0
    chunk = math.ceil(rows / world)
    first, last = min(rows, rank * chunk), min(rows, (rank + 1) * chunk)
    span = Span(shape, first * row, (last - first) * row)
    if local_tensor(p).numel() != span.numel:
        raise ConfigError(
            f"Shard of a {tuple(shape)} parameter on rank {rank}/{world} holds "
            f"{local_tensor(p).numel()} entries, expected {span.numel} (rows {first}:{last}); "
            "wpeft expects torch.chunk-style dim-0 sharding."
        )
    return span


class Collective:
    """Sums, maxima and gathers over the ranks that share the eligible tensors.

    ``Collective()`` (world size 1) is local: every call returns its input.
    :meth:`of_process_group` joins the running process group.

    Args:
        world / rank: Ranks taking part and this one's index.
        group: The process group (None: the default one).
        device: Where the communicated tensors live (the parameters' device; NCCL needs CUDA).
    """

    def __init__(
        self, world: int = 1, rank: int = 0, group: Any = None, device: torch.device | str = "cpu"
    ) -> None:
        self.world, self.rank, self.group = world, rank, group
        self.device = torch.device(device)

    @classmethod
    def of_process_group(cls, device: torch.device | str, group: Any = None) -> Collective:
        """The running process group (a local collective when none is initialised)."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls(device=device)
        return cls(dist.get_world_size(group), dist.get_rank(group), group, device)

    @property
    def sharded(self) -> bool:
        return self.world > 1

    def sum_ints(self, values: Sequence[int]) -> list[int]:
        """Element-wise sums over ranks of Python ints (int64, exact)."""
        if not self.sharded:
            return [int(v) for v in values]
        t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t.tolist()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (of a tensor on ``device``)."""
        if self.sharded:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place max over ranks."""
        if self.sharded:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t

    def gather_ints(self, values: Sequence[int]) -> list[list[int]]:
        """Every rank's ``values`` (same length on all ranks), indexed ``[rank][i]``."""
        if not self.sharded:
            return [[int(v) for v in values]]
        t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=self.device)
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t, group=self.group)
        return [o.tolist() for o in out]

    def gather_full(self, shards: Sequence[torch.Tensor], spans: Sequence[Span]) -> list[torch.Tensor]:
        """Full tensors from their dim-0 shards (one all-gather for all of them).

        Args:
            shards: This rank's shard of each tensor (any shape with ``span.numel`` entries).
            spans: Where each shard sits (:func:`span_of` of the parameter).

        Returns:
            The full tensors, shaped like ``span.shape``, on every rank. Bool tensors travel as
            uint8 (gloo has no bool).
        """
        if not self.sharded:
            return [s.reshape(sp.shape) for s, sp in zip(shards, spans, strict=True)]
        dtypes = {s.dtype for s in shards}
        if len(dtypes) > 1:
            raise ValueError(f"gather_full needs one dtype, got {dtypes}.")
        dtype = dtypes.pop() if dtypes else torch.uint8
        wire = torch.uint8 if dtype == torch.bool else dtype
        # Every rank's chunk of tensor i is padded to the same size: ceil(rows / W) rows.
        sizes = []
        for sp in spans:
            rows = sp.shape[0] if len(sp.shape) else 1
            row = sp.full_numel // rows if rows else 0
            sizes.append(math.ceil(rows / self.world) * row)
        mine = torch.zeros(sum(sizes), dtype=wire, device=self.device)
        at = 0
        for s, sp, n in zip(shards, spans, sizes, strict=True):
            mine[at : at + sp.numel] = s.reshape(-1).to(wire)
            at += n
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine, group=self.group)
        out, at = [], 0
        for sp, n in zip(spans, sizes, strict=True):
            full = torch.cat([p[at : at + n] for p in parts])[: sp.full_numel]
            out.append(full.to(dtype).reshape(sp.shape))
            at += n
        return out


#: The local (single-process or replicated) collective: every call is a no-op.
LOCAL = Collective()
