"""Lean SFAS: the selection's state is k-sized and no dense gradient set is ever alive.

:class:`LeanSelection` is the :class:`~wpeft.methods.sfas.EntrySelection` of SFAS / WeatherPEFT
with ``lean=True``. Per step it costs (N eligible entries, k selected):

* **State**: the selected entries as sorted int64 flat indices per tensor (8k bytes), the union
  of every mask bit-packed (N/8 bytes), and the optimiser's compact Adam state
  (:class:`~wpeft.methods.compact.CompactAdamW`, 20k bytes). Today's dense selection keeps a bool
  mask and union (2N bytes), an fp32 importance buffer (4N) and dense moments plus an int32 step
  per entry (12N): at k = 0.3 % of N the lean state is ~1.6 % of the dense one.
* **Gradients**: a ``register_post_accumulate_grad_hook`` on every eligible tensor consumes its
  gradient the moment backward has accumulated it and sets ``.grad`` back to None, so at most
  one backbone tensor's gradient is alive at a time.

  - At a *refresh* step (every ``refresh_every`` steps) the hook feeds the gradient to
    :class:`~wpeft.methods.streaming.StreamingTopK`, which keeps a few candidates per tensor
    and, after backward, takes the global top-k of the perturbed,
    max-normalised importance over them: always exactly k entries, and provably the dense
    path's top-k whenever the bound check holds (counted in ``describe()['selection']``).
  - Between refreshes the mask is fixed: the hook gathers the gradient at the selected entries
    only, and the weight matrices of the backbone's linear layers never form a dense gradient
    at all (:class:`~wpeft.methods.sampled_grad.SampledLinearGrads` computes dL/dW only at the
    selected entries, a sampled dense-dense product).

The compact gradient values (k float32) are what :class:`CompactAdamW` steps on and what
:meth:`LeanSelection.clip_grad_norm_` includes in the global norm. A training step must call
``method.before_backward(step, total_steps)`` before ``loss.backward()`` (the hooks need to know
whether the step refreshes) and ``method.after_backward(step, total_steps)`` after it.

Runs on one process only (DDP all-reduces gradients after the hooks have fired; FSDP2 shards
them): the dense selection serves data-parallel runs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from wpeft.errors import ConfigError
from wpeft.methods.compact import CompactGrad
from wpeft.methods.fisher import DEFAULT_CHUNK_NUMEL
from wpeft.methods.sampled_grad import SampledLinearGrads
from wpeft.methods.sfas import EntrySelection
from wpeft.methods.streaming import StreamedSelection, StreamingTopK

__all__ = ["LeanSelection", "clip_grad_norm_", "pack_bits", "set_bits_", "unpack_bits"]

#: Set bits per byte value (popcount table for the bit-packed union).
_POPCOUNT = torch.tensor([i.bit_count() for i in range(256)], dtype=torch.int64)


def pack_bits(indices: torch.Tensor, numel: int) -> torch.Tensor:
    """``(ceil(numel / 8),)`` uint8 bit set of flat ``indices`` (bit ``i % 8`` of byte ``i // 8``)."""
    bits = torch.zeros((numel + 7) // 8, dtype=torch.uint8, device=indices.device)
    set_bits_(bits, indices)
    return bits


def set_bits_(bits: torch.Tensor, indices: torch.Tensor) -> int:
    """Set the bits of unique flat ``indices`` in place; returns how many were not set before."""
    if indices.numel() == 0:
        return 0
    byte = indices >> 3
    bit = torch.bitwise_left_shift(torch.ones_like(indices), indices & 7).to(torch.uint8)
    new = (bits.index_select(0, byte) & bit) == 0
    # distinct indices of one byte carry distinct bits, so adding the new ones is an OR
    bits.index_put_((byte[new],), bit[new], accumulate=True)
    return int(new.sum())


def unpack_bits(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """``(numel,)`` bool from a bit set made by :func:`pack_bits`."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits.unsqueeze(1) >> shifts) & 1).bool().reshape(-1)[:numel]


def _bool_from_indices(indices: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    mask = torch.zeros(shape.numel(), dtype=torch.bool, device=indices.device)
    mask[indices] = True
    return mask.view(shape)


class LeanSelection(EntrySelection):
    """An :class:`EntrySelection` held as index lists, fed by gradient hooks (module docstring).

    ``masks`` / ``union_masks`` (bool per tensor) are built on demand for the records and mask
    callbacks, cached until the next step, never kept.

    Args:
        named_params: ``(name, parameter)`` of the eligible tensors (tie order, noise index).
        k: Entries per mask.
        linears: The backbone's ``nn.Linear`` modules by name whose weights are eligible: their
            weight gradients are sampled at the selected entries between refreshes.
        refresh_every: Steps between refreshes (SFAS), or None: one fixed mask, given once
            through :meth:`set_masks` (FISH, Child-Tuning_D: their ``prepare``).
        stream: The streaming top-k of a refreshing selection (None for a fixed mask).
    """

    lean: ClassVar[bool] = True

    def __init__(
        self,
        named_params: Sequence[tuple[str, nn.Parameter]],
        k: int,
        *,
        linears: dict[str, nn.Linear],
        refresh_every: int | None,
        stream: StreamingTopK | None,
        chunk_numel: int = DEFAULT_CHUNK_NUMEL,
    ) -> None:
        if (refresh_every is None) != (stream is None):
            raise ConfigError("A refreshing lean selection needs a stream, a fixed one none.")
        self._indices: list[torch.Tensor] | None = None
        #: The union of every mask, bit-packed: one buffer, tensor i's bits from byte
        #: ``_union_starts[i] // 8`` on (``_union_bits[i]`` is that view).
        self._union_flat: torch.Tensor | None = None
        self._union_bits: list[torch.Tensor] | None = None
        self._union_count = 0
        self._mask_cache: list[torch.Tensor] | None = None
        self._union_cache: list[torch.Tensor] | None = None
        super().__init__(named_params, k, chunk_numel)
        self.shapes = [p.shape for p in self.params]
        self._union_bytes = [(s.numel() + 7) // 8 for s in self.shapes]
        #: Bit position of each tensor's first entry in the union buffer (a multiple of 8).
        self._union_starts = torch.tensor(
            [0, *self._union_bytes[:-1]], dtype=torch.int64, device=self.device
        ).cumsum_(0).mul_(8)
        self.refresh_every = refresh_every
        self.stream = stream
        self._passive = False
        self.exact_refreshes = 0
        self.candidates = 0
        self.last: StreamedSelection | None = None
        self._values: list[torch.Tensor | None] = [None] * len(self.params)
        self._seen = [False] * len(self.params)
        self._step: int | None = None
        self._total_steps = 1
        self._refresh = False
        self._started = self._scoring = 0.0
        #: Seconds the last refresh spent selecting: the draws of Z at ``begin_step``, scoring in
        #: the hooks and the final top-k.
        self.refresh_seconds = 0.0
        #: ``(step, total_steps) -> bool``: whether a step's gradients' Σg² are wanted (the
        #: Fisher records set it; a refresh then takes one more pass over each gradient).
        self.square_sums_due: Callable[[int, int], bool] | None = None
        weight_index = {id(p): i for i, p in enumerate(self.params)}
        self._linear_index = {n: weight_index[id(m.weight)] for n, m in linears.items()}
        self.sampled = SampledLinearGrads(linears, self._sink) if linears else None
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._hook_for(i))
            for i, p in enumerate(self.params)
        ]

    # --- the masks as the records see them ---------------------------------------------------

    @property
    def masks(self) -> list[torch.Tensor] | None:  # type: ignore[override]
        if self._indices is None:
            return None
        if self._mask_cache is None:
            self._mask_cache = [
                _bool_from_indices(i, s) for i, s in zip(self._indices, self.shapes)
            ]
        return self._mask_cache

    @masks.setter
    def masks(self, value: Any) -> None:
        if value is not None:
            raise AttributeError("Set a lean selection's masks with set_indices().")

    @property
    def union_masks(self) -> list[torch.Tensor] | None:  # type: ignore[override]
        if self._union_bits is None:
            return None
        if self._union_cache is None:
            self._union_cache = [
                unpack_bits(b, s.numel()).view(s) for b, s in zip(self._union_bits, self.shapes)
            ]
        return self._union_cache

    @union_masks.setter
    def union_masks(self, value: Any) -> None:
        if value is not None:
            raise AttributeError("A lean selection's union follows its masks.")

    @property
    def indices(self) -> list[torch.Tensor] | None:
        """Per tensor, the sorted int64 flat indices of the current mask (None before any)."""
        return self._indices

    def counts(self) -> list[int]:
        if self._indices is None:
            return self.planned_counts()
        return [int(i.numel()) for i in self._indices]

    def union_size(self) -> int:
        """Entries in the union of every mask so far (counted as bits are set)."""
        return self._union_count

    def _count_union(self) -> int:
        """The union's size by a popcount of its bits (after a checkpoint installs them)."""
        if self._union_bits is None:
            return 0  # tensor by tensor: a byte becomes an int64 index here
        return int(sum(int(_POPCOUNT[b.long().cpu()].sum()) for b in self._union_bits))

    def _set_union(self, flat: torch.Tensor) -> None:
        """Hold ``flat`` ((Σ ceil(n_i / 8),) uint8) as the union, with its per-tensor views."""
        self._union_flat = flat
        self._union_bits = list(flat.split(self._union_bytes))

    def state_bytes(self) -> int:
        """Bytes of the selection's own state: the k int64 indices of the mask (counted before
        the first one too, so the planner sees them) and the bit-packed union."""
        return 8 * self.k + sum((s.numel() + 7) // 8 for s in self.shapes)

    def set_indices(self, indices: list[torch.Tensor], step: int, seconds: float = 0.0) -> None:
        """Install a new mask (per tensor sorted int64 flat indices), grow the union, log, and run
        the callbacks."""
        if self._union_flat is None:
            self._set_union(
                torch.zeros(sum(self._union_bytes), dtype=torch.uint8, device=self.device)
            )
        assert self._union_flat is not None
        counts = torch.tensor([i.numel() for i in indices], device=self.device)
        # every tensor's indices as bits of the one buffer: one update for all of them
        at = torch.cat(indices).add_(self._union_starts.repeat_interleave(counts))
        new = set_bits_(self._union_flat, at)
        self._union_count += new
        self._indices = indices
        self._mask_cache = self._union_cache = None
        self.refreshes += 1
        self.log.append(
            {"step": step, "seconds": seconds, "new_entries": new, "union": self.union_size()}
        )
        if self.callbacks:
            named = dict(zip(self.names, self.masks or []))
            for fn in self.callbacks:
                fn(step, named)

    # --- one training step --------------------------------------------------------------------

    def set_masks(self, buckets: list[torch.Tensor], step: int, seconds: float = 0.0) -> None:
        """Install a mask given as bool buckets in ``layout`` (a fixed mask's selection)."""
        indices = [m.reshape(-1).nonzero().squeeze(1) for m in self.layout.split(buckets)]
        self.set_indices(indices, step, seconds)

    @contextlib.contextmanager
    def dense_gradients(self) -> Iterator[None]:
        """Inside, the hooks leave ``.grad`` alone (a static mask's Fisher pass reads it)."""
        self._passive = True
        try:
            yield
        finally:
            self._passive = False

    def begin_step(self, step: int, total_steps: int) -> None:
        """Before ``loss.backward()``: is this a refresh step, and which gradients to gather."""
        if self.stream is None and self._indices is None:
            raise ConfigError(
                "This lean selection has a fixed mask that was never selected: call "
                "method.prepare(loss_fn, batches, n_batches) once before training."
            )
        self._step, self._total_steps = step, total_steps
        self._refresh = self.stream is not None and (
            self._indices is None or step % self.refresh_every == 0  # type: ignore[operator]
        )
        self._values = [None] * len(self.params)
        self._seen = [False] * len(self.params)
        self._mask_cache = self._union_cache = None
        self._started = time.perf_counter()
        self._scoring = 0.0
        if self._refresh:
            assert self.stream is not None
            due = self.square_sums_due
            t0 = time.perf_counter()
            self.stream.begin(step, total_steps,
                              square_sums=due is not None and due(step, total_steps))
            self._scoring = time.perf_counter() - t0  # drawing Z is part of the refresh
        if self.sampled is not None:
            assert self._indices is not None or self._refresh
            self.sampled.set_indices(
                None if self._refresh
                else {n: self._indices[i] for n, i in self._linear_index.items()}  # type: ignore[index]
            )

    def _hook_for(self, i: int):
        def hook(p: torch.Tensor) -> None:
            if self._passive:
                return
            if self._step is None:
                raise RuntimeError(
                    "Lean SFAS consumes gradients during backward: call "
                    "method.before_backward(step, total_steps) before loss.backward()."
                )
            g = p.grad
            if g is None:  # a sampled weight: autograd accumulated nothing (values went to _sink)
                return
            if self._refresh:
                assert self.stream is not None
                if self._seen[i]:
                    raise RuntimeError(
                        f"Lean SFAS got a second gradient for {self.names[i]!r} in refresh step "
                        f"{self._step}: it takes one backward per step (no gradient accumulation)."
                    )
                t0 = time.perf_counter()
                self.stream.add(i, g.detach())
                self._scoring += time.perf_counter() - t0
            else:
                assert self._indices is not None
                self._add_values(i, g.detach().reshape(-1).index_select(0, self._indices[i]))
            self._seen[i] = True
            p.grad = None

        return hook

    def _sink(self, name: str, values: torch.Tensor) -> None:
        i = self._linear_index[name]
        self._add_values(i, values)
        self._seen[i] = True

    def _add_values(self, i: int, values: torch.Tensor) -> None:
        v = values.to(torch.float32)
        self._values[i] = v if self._values[i] is None else self._values[i] + v

    def finish_step(self) -> None:
        """After ``loss.backward()``: at a refresh, the new mask (exactly k entries) and the
        gradient at it; otherwise the gathered values (zeros where a tensor got no gradient)."""
        if self._step is None:
            raise RuntimeError(
                "Lean SFAS: call method.before_backward(step, total_steps) before "
                "loss.backward() and method.after_backward(step, total_steps) after it."
            )
        if self._refresh:
            assert self.stream is not None
            for i, seen in enumerate(self._seen):
                if not seen:  # a tensor the loss does not depend on: zero gradient
                    p = self.params[i]
                    self.stream.add(i, torch.zeros(p.shape, dtype=p.dtype, device=self.device))
            t0 = time.perf_counter()
            result = self.stream.finish()
            self.refresh_seconds = self._scoring + time.perf_counter() - t0
            self.last = result
            self.exact_refreshes += int(result.exact)
            self.candidates = result.candidates
            self._values = list(result.values)
            self.set_indices(list(result.indices), self._step,
                             time.perf_counter() - self._started)
        else:
            assert self._indices is not None
            for i, v in enumerate(self._values):
                if v is None:
                    self._values[i] = torch.zeros(
                        self._indices[i].numel(), dtype=torch.float32, device=self.device
                    )
        self._step = None

    def compact_grad_of(self, p: torch.Tensor) -> CompactGrad | None:
        """The gradient of an eligible tensor at its selected entries (None for other tensors or
        before any backward)."""
        i = self._index.get(id(p))
        if i is None or self._indices is None or self._values[i] is None:
            return None
        return CompactGrad(self._indices[i], self._values[i])  # type: ignore[arg-type]

    def compact_values(self) -> list[torch.Tensor]:
        """This step's gradient values at the selected entries (empty before any)."""
        return [v for v in self._values if v is not None]

    def grad_square_sums(self, masks: Sequence[torch.Tensor] | None) -> torch.Tensor:
        """``(n_tensors,)`` float64 Σ g²: over all entries (``masks`` None; known at refresh
        steps only, NaN otherwise) or over the selected ones (any ``masks``: the current)."""
        if masks is None:
            if self.last is None or not self._refresh:
                return torch.full((len(self.params),), float("nan"), dtype=torch.float64)
            return self.last.square_sums.to(torch.float64).cpu()
        return torch.stack([
            torch.zeros((), dtype=torch.float64) if v is None
            else v.double().square().sum().cpu()
            for v in self._values
        ])

    def grads(self) -> list[torch.Tensor | None]:
        """The ``.grad`` of the eligible tensors: all None after a lean backward (the hooks
        consumed them), the dense gradients inside :meth:`dense_gradients`."""
        return [p.grad for p in self.params]

    def zero_unselected_grads(self) -> None:
        """Nothing to zero: only the selected entries' gradients exist."""

    def remove_hooks(self) -> None:
        """Detach the gradient hooks and give the linear layers their forward back."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.sampled is not None:
            self.sampled.remove()

    # --- checkpoints ----------------------------------------------------------------------------

    def rebind(self, named_params: Mapping[str, nn.Parameter]) -> None:
        """Nothing to follow on one process; parameters replaced by a data-parallel wrapper
        are refused (the hooks sit on the originals)."""
        if any(named_params.get(n) is not p for n, p in zip(self.names, self.params)):
            raise ConfigError(
                "Lean SFAS runs on one process: data-parallel wrapping replaced its parameters "
                "(use lean=False for ddp / fsdp)."
            )

    def _full_state(self) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        if self._indices is None or self.union_masks is None:
            return None
        out = []
        for per_tensor in (self.masks, self.union_masks):
            buckets = self.full_layout.zeros(torch.bool, self.device)
            for view, m in zip(self.full_layout.split(buckets), per_tensor or []):
                view.copy_(m)
            out.append(buckets)
        return out[0], out[1]

    def _install(self, masks: list[torch.Tensor], union: list[torch.Tensor]) -> None:
        self._indices = [
            m.reshape(-1).nonzero().squeeze(1) for m in self.full_layout.split(masks)
        ]
        self._set_union(torch.cat([
            pack_bits(u.reshape(-1).nonzero().squeeze(1), u.numel())
            for u in self.full_layout.split(union)
        ]))
        self._union_count = self._count_union()
        self._mask_cache = self._union_cache = None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "stream": self.stream_state(),
                "exact_refreshes": self.exact_refreshes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.exact_refreshes = int(state.get("exact_refreshes", 0))
        if state.get("stream") is not None:
            self.load_stream_state(state["stream"])

    _STREAM_CARRY = ("_tau_score", "_tau_importance", "_tau_factor", "_m_floor")

    def stream_state(self) -> dict[str, float] | None:
        """What the streaming top-k carries from one refresh to the next (its threshold τ), so
        a resumed run keeps the same candidates (None for a fixed mask)."""
        if self.stream is None:
            return None
        return {name: float(getattr(self.stream, name)) for name in self._STREAM_CARRY}

    def load_stream_state(self, state: dict[str, float]) -> None:
        if self.stream is not None:
            for name in self._STREAM_CARRY:
                setattr(self.stream, name, float(state.get(name, 0.0)))


def clip_grad_norm_(
    dense: Iterable[torch.Tensor], compact: Sequence[torch.Tensor], max_norm: float
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the dense ``.grad`` of ``dense`` and the compact
    gradient values ``compact`` together: one global L2 norm, both scaled by
    ``max_norm / (norm + 1e-6)`` when it is below 1. Returns the norm before clipping."""
    grads = [p.grad for p in dense if p.grad is not None] + list(compact)
    if not grads:
        return torch.zeros(())
    norms = torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads])
    total = torch.linalg.vector_norm(norms)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.detach().mul_(coef.to(g.device, g.dtype))
    return total
