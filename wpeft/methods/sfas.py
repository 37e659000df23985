"""SFAS and the static Fisher-mask baselines: methods that train a few backbone scalars.

* :class:`SFAS` (``"sfas"``) — Stochastic Fisher-guided Adaptive Selection (METHOD.md §3):
  after every ``loss.backward()`` the importance of every backbone scalar (g², or |g| as in the
  released code) is normalised by its global max, perturbed by annealed noise
  γ(1 − n/N)·U, and the global top-k becomes the mask; only masked entries are updated. The
  mask is redrawn every ``refresh_every`` steps, so the set of touched entries (the union of
  the masks, what the adapter stores) grows: at keep_ratio 0.3% the tiny backbone's union was
  3.5% after 12 steps and 25% after 100.

  ``union_cap`` (SFAS and WeatherPEFT; None = no cap) bounds that growth to
  ``cap = round(union_cap · N)`` entries (keep_ratio <= union_cap <= 1). At each refresh, with
  ``room = cap − |union|``: if room >= k the plain top-k is taken; otherwise only the ``room``
  best entries outside the union (by the perturbed score) may enter, all others outside are
  excluded, and the exact global top-k is taken over the union and those
  (:func:`~wpeft.methods.fisher.capped_topk_masks`). So |union| <= cap and |mask| = k at every
  refresh; once the union is full every later mask lies inside it (union_cap = keep_ratio: the
  first mask is kept for good). The union is checkpointed, so a resumed run keeps the cap.
* :class:`FishMask` (``"fish"``) — FISH mask (Sung et al., 2021): one fixed mask from the
  per-example empirical Fisher, g² of each sample's own gradient averaged over N training samples
  (``fisher_samples``, the paper's N = 1024) *before* training, sparse-safe updates.
* :class:`ChildTuningD` (``"child_tuning_d"``) — Child-Tuning_D (Xu et al., 2021): one fixed
  mask from g² of each batch's gradient (each tensor's gradient clipped to norm
  ``clip_grad_norm`` first) averaged over one pass of the whole training set at the run's batch
  size (``fisher_batches=None``; or over its first ``fisher_batches`` batches), before training. Its original optimiser multiplies the gradients by
  the mask inside a dense AdamW; that is the default here (``dense_update=True``) so the baseline
  is the published one. With a mask fixed from step 0 the Adam moments of unselected entries stay
  exactly zero, so the only leak is decoupled weight decay: with ``weight_decay=0`` the delta is
  exactly inside the mask, with ``weight_decay>0`` every backbone entry decays and
  :meth:`PEFTMethod.changed` reports that honestly. ``dense_update=False`` gives the sparse-safe
  variant.

Eligible entries are all parameters of ``model.backbone`` (the Swin3D U-Net; the encoder and
decoder follow ``train_encoder_decoder``, heads and added modules train whole). ``k`` =
round(keep_ratio · N) of the N eligible entries.

What a training loop must call (every method here):

1. ``method.apply(model, head)``;
2. static masks only: ``method.prepare(loss_fn, batches, n_batches)`` once before the first
   step (``loss_fn(batch) -> loss``; or ``method.prepare(closure, n_batches=n)`` with a
   zero-argument closure) — it runs forward/backward itself and leaves no gradients behind.
   ``method.preparation(train_samples, batch_size)`` says which batches: FISH one sample per
   batch, Child-Tuning_D batches of the run's size;
3. after data-parallel wrapping, ``method.on_wrapped()`` (under FSDP2 the selection follows the
   sharded parameters: each rank then keeps importance, masks and optimiser state of its
   shards only, and the top-k stays global, see :mod:`wpeft.methods.shards`);
   ``opt = method.optimizer(lr, weight_decay)`` (a :class:`MaskedAdamW`);
4. per step: ``opt.zero_grad()``, ``method.before_backward(step, total_steps)``,
   ``loss.backward()``, ``method.after_backward(step, total_steps)`` with ``step`` the 0-based
   optimiser step index (under DDP: after the gradients are all-reduced, i.e. after backward
   outside ``no_sync``), optional ``method.clip_grad_norm_(params, max_norm)``, ``opt.step()``.

``lean=True`` (SFAS / WeatherPEFT, one process) keeps state for the k selected entries only and
consumes the gradients during backward (:mod:`wpeft.methods.lean`); the dense path below is the
reference and serves data-parallel runs.

The current masks (``method.selection.masks``, per tensor, aligned with
``method.selection.names``), their union and a callback hook at every refresh
(``method.selection.add_callback``, e.g. :class:`MaskRecorder`) are exposed for the records.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from wpeft.backbones.aurora_adapter import WpeftAurora
from wpeft.errors import ConfigError
from wpeft.methods.base import MethodConfig, PEFTMethod, Preparation, register
from wpeft.methods.fisher import (
    DEFAULT_CHUNK_NUMEL,
    FlatLayout,
    ImportanceAccumulator,
    MaskedAdamW,
    all_reduce_mean_,
    broadcast_mask,
    capped_topk_masks,
    distributed_ready,
    normalise_by_global_max_,
    perturb_,
    topk_masks,
)
from wpeft.methods.shards import LOCAL, Collective, local_tensor, span_of

__all__ = [
    "ChildTuningD",
    "ChildTuningDConfig",
    "EntrySelection",
    "FishMask",
    "FishMaskConfig",
    "MaskRecorder",
    "SFAS",
    "SFASConfig",
    "budget_k",
]

MaskCallback = Callable[[int, dict[str, torch.Tensor]], None]


def budget_k(keep_ratio: float, total: int) -> int:
    """k = round(keep_ratio · total), at least 1 and at most ``total``."""
    return min(total, max(1, round(keep_ratio * total)))


def _check_keep_ratio(value: float) -> None:
    if not 0.0 < value <= 1.0:  # also rejects NaN
        raise ConfigError(
            f"keep_ratio must be in (0, 1] (a fraction of the backbone's entries), got {value!r}."
        )


def _check_lean_update(lean: bool, dense_update: bool) -> None:
    if lean and dense_update:
        raise ConfigError(
            "lean=True updates only the k selected entries; dense_update=True (a dense AdamW on "
            "masked gradients) contradicts it. Set dense_update=False, or lean=False."
        )


def _check_chunk(value: int) -> None:
    if value < 1:
        raise ConfigError(f"chunk_numel must be >= 1, got {value}.")


# --- configs ------------------------------------------------------------------------------------

_STATIC_LEAN_HELP = (
    "Lean state (one process): the fixed mask as k indices, Adam state for those k entries "
    "only, gradients gathered at the mask by hooks during backward (linear layers: computed "
    "only there) so no dense gradient set is alive during training. Needs dense_update=False."
)


@dataclass
class SFASConfig(MethodConfig):
    """SFAS settings (paper defaults; the released code's choices are one switch away)."""

    keep_ratio: float = field(
        default=0.003,
        metadata={"help": "Fraction of the eligible backbone entries selected per refresh, "
                          "k = round(ratio · N) (the size knob). The paper's budgets are ~0.3% "
                          "and ~4% of the backbone; the released code uses 0.1%."},
    )
    importance: Literal["fisher", "abs_grad"] = field(
        default="fisher",
        metadata={"help": "Per-entry importance: 'fisher' = g² (diagonal empirical Fisher, "
                          "paper) or 'abs_grad' = |g| (released code)."},
    )
    accumulate_batches: int = field(
        default=1,
        metadata={"help": "Steps whose importance is averaged for one selection: the refresh "
                          "step and the ones just before it (fewer at the start); "
                          "<= refresh_every."},
    )
    noise: Literal["additive", "multiplicative", "none"] = field(
        default="additive",
        metadata={"help": "Annealed noise: 'additive' F̂ + γ(1−n/N)U (paper), "
                          "'multiplicative' F̂·U ranking (released code; the positive annealing "
                          "factor cannot change the ranking), or 'none'."},
    )
    gamma: float = field(default=0.2, metadata={"help": "Noise scale γ."})
    refresh_every: int = field(
        default=1,
        metadata={"help": "Redraw the mask every this many optimiser steps (1 = every step, as "
                          "in the paper)."},
    )
    seed: int = field(
        default=0,
        metadata={"help": "Seed of the noise; shared by all data-parallel ranks so they draw the "
                          "same mask."},
    )
    dense_update: bool = field(
        default=False,
        metadata={"help": "False: sparse-safe AdamW (unselected entries never move). True: the "
                          "released code's dense AdamW on masked gradients (momentum and weight "
                          "decay still move unselected entries)."},
    )
    broadcast_masks: bool = field(
        default=False,
        metadata={"help": "Also broadcast rank 0's mask at every refresh (one byte per backbone "
                          "entry; redundant when gradients are all-reduced, since selection is "
                          "deterministic given the shared seed). Not under FSDP."},
    )
    chunk_numel: int = field(
        default=DEFAULT_CHUNK_NUMEL,
        metadata={"help": "Entries per score bucket / per top-k counting chunk (memory of "
                          "temporaries)."},
    )
    lean: bool = field(
        default=False,
        metadata={"help": "Lean state (one process): only the k selected entries hold state "
                          "(indices, Adam moments, age; an entry that leaves the mask loses its "
                          "moments), gradients are consumed by hooks during backward so no dense "
                          "gradient set is alive, and between refreshes the linear layers' "
                          "weight gradients are computed only at the selected entries. The "
                          "top-k is streamed (always exactly k; proven equal to the dense "
                          "top-k at most refreshes, counted in the summary). False: the dense "
                          "reference implementation (MaskedAdamW), needed for ddp / fsdp."},
    )
    union_cap: float | None = field(
        default=None,
        metadata={"help": "Largest fraction of the eligible backbone entries ever selected (the "
                          "union of the masks, what the adapter stores; same unit as "
                          "keep_ratio, keep_ratio <= union_cap <= 1). When a refresh would grow "
                          "the union past round(union_cap · N), only the best (by perturbed "
                          "score) cap − |union| entries outside it may enter and the top-k is "
                          "taken over the union and those; once full, masks stay inside it "
                          "(union_cap = keep_ratio: the first mask is kept). None: no cap."},
    )

    def __post_init__(self) -> None:
        _check_keep_ratio(self.keep_ratio)
        _check_chunk(self.chunk_numel)
        if self.union_cap is not None and not self.keep_ratio <= self.union_cap <= 1.0:
            raise ConfigError(
                f"union_cap={self.union_cap!r} must lie in [keep_ratio={self.keep_ratio!r}, 1]: "
                "the union of the masks holds at least one mask of keep_ratio. Raise union_cap "
                "(or lower keep_ratio), or leave it None for no cap."
            )
        if self.importance not in ("fisher", "abs_grad"):
            raise ConfigError(
                f"importance must be 'fisher' or 'abs_grad', got {self.importance!r}."
            )
        if self.noise not in ("additive", "multiplicative", "none"):
            raise ConfigError(
                f"noise must be 'additive', 'multiplicative' or 'none', got {self.noise!r}."
            )
        if not self.gamma >= 0.0:
            raise ConfigError(f"gamma must be >= 0, got {self.gamma!r}.")
        if self.refresh_every < 1:
            raise ConfigError(f"refresh_every must be >= 1, got {self.refresh_every}.")
        if self.lean:
            clashes = {
                "accumulate_batches": self.accumulate_batches != 1,
                "union_cap": self.union_cap is not None,
                "dense_update": self.dense_update,
                "broadcast_masks": self.broadcast_masks,
            }
            bad = [name for name, clash in clashes.items() if clash]
            if bad:
                raise ConfigError(
                    f"lean=True does not support {', '.join(bad)} (it scores one step's gradient "
                    "as backward produces it and keeps no dense buffer); leave them at their "
                    "defaults (accumulate_batches=1, union_cap=None, dense_update=False, "
                    "broadcast_masks=False) or use lean=False."
                )
        if not 1 <= self.accumulate_batches <= self.refresh_every:
            raise ConfigError(
                f"accumulate_batches must be in [1, refresh_every={self.refresh_every}], got "
                f"{self.accumulate_batches}; importance is averaged over the steps before a "
                "refresh."
            )


@dataclass
class FishMaskConfig(MethodConfig):
    """FISH mask settings."""

    keep_ratio: float = field(
        default=0.003,
        metadata={"help": "Fraction of the eligible backbone entries in the fixed mask (the "
                          "size knob)."},
    )
    removed_settings: ClassVar[dict[str, str]] = {
        "fisher_batches": "FISH's Fisher is now the per-example g² over fisher_samples training "
                          "samples (default 1024, the FISH paper's N), not batch-mean gradients "
                          "over batches. Give fisher_samples instead; a run started with "
                          "fisher_batches cannot be resumed by this version: start it again "
                          "(--overwrite) or in a new run directory.",
    }

    fisher_samples: int = field(
        default=1024,
        metadata={"help": "Training samples N whose per-example g² (one backward pass per "
                          "sample) is averaged into the Fisher (the FISH paper's N = 1024); the "
                          "whole training split when it holds fewer. The number used is "
                          "recorded in the run summary (selection.fisher_samples_used)."},
    )
    dense_update: bool = field(
        default=False,
        metadata={"help": "False: sparse-safe AdamW. True: dense AdamW on masked gradients "
                          "(weight decay moves unselected entries)."},
    )
    lean: bool = field(default=False, metadata={"help": _STATIC_LEAN_HELP})
    chunk_numel: int = field(
        default=DEFAULT_CHUNK_NUMEL,
        metadata={"help": "Entries per score bucket / per top-k counting chunk."},
    )

    def __post_init__(self) -> None:
        _check_keep_ratio(self.keep_ratio)
        _check_chunk(self.chunk_numel)
        _check_lean_update(self.lean, self.dense_update)
        if isinstance(self.fisher_samples, bool) or self.fisher_samples < 1:
            raise ConfigError(
                f"fisher_samples must be an integer >= 1 (training samples in the Fisher), got "
                f"{self.fisher_samples!r}."
            )


@dataclass
class ChildTuningDConfig(MethodConfig):
    """Child-Tuning_D settings."""

    keep_ratio: float = field(
        default=0.003,
        metadata={"help": "Fraction of the eligible backbone entries in the fixed mask "
                          "(Child-Tuning's reserve_p; the size knob)."},
    )
    fisher_batches: int | None = field(
        default=None,
        metadata={"help": "Training batches (of the run's batch size) whose g² is averaged "
                          "into the Fisher; None = one pass over the whole training split, as in "
                          "Child-Tuning_D. The number used is recorded (run summary: "
                          "selection.fisher_batches_used)."},
    )
    clip_grad_norm: float | None = field(
        default=1.0,
        metadata={"help": "Each tensor's gradient is scaled to this L2 norm at most before "
                          "squaring (the original's per-parameter clipping); None disables."},
    )
    dense_update: bool = field(
        default=True,
        metadata={"help": "True (the original ChildTuningAdamW): dense AdamW on masked "
                          "gradients; only weight decay can move unselected entries. False: "
                          "sparse-safe AdamW."},
    )
    lean: bool = field(default=False, metadata={"help": _STATIC_LEAN_HELP})
    chunk_numel: int = field(
        default=DEFAULT_CHUNK_NUMEL,
        metadata={"help": "Entries per score bucket / per top-k counting chunk."},
    )

    def __post_init__(self) -> None:
        _check_keep_ratio(self.keep_ratio)
        _check_chunk(self.chunk_numel)
        _check_lean_update(self.lean, self.dense_update)
        if self.fisher_batches is not None and self.fisher_batches < 1:
            raise ConfigError(f"fisher_batches must be >= 1 or None, got {self.fisher_batches}.")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ConfigError(f"clip_grad_norm must be > 0 or None, got {self.clip_grad_norm!r}.")


# --- selection state ----------------------------------------------------------------------------


class EntrySelection:
    """The eligible tensors, the current masks, their union and the refresh bookkeeping.

    Masks are stored in bucketed bool buffers (:class:`FlatLayout`); ``masks`` and
    ``union_masks`` are per-tensor views aligned with ``names`` / ``params``. A new set of
    buffers is allocated at every refresh, so a callback may keep the views it is given.

    Under FSDP2 (after :meth:`rebind` to the sharded parameters) every rank holds only its
    shard of each mask: ``masks``, ``union_masks``, :meth:`grads` and :meth:`counts` are local,
    ``layout`` has one bucket per tensor shard, and the selection itself is global (the top-k
    counts are summed over the ranks, :mod:`wpeft.methods.shards`). The calls marked
    *collective* must then be made on every rank.

    Args:
        named_params: ``(name, parameter)`` of the eligible tensors, in a fixed order (the tie
            order of the top-k and the index of each tensor's noise stream).
        k: Entries per mask.
        chunk_numel: Bucket / chunk size.
        cap: Largest union of the masks, in entries (``k <= cap``; None: no cap); see
            :func:`~wpeft.methods.fisher.capped_topk_masks` for the policy.
    """

    #: Whether the selection is a :class:`~wpeft.methods.lean.LeanSelection` (index lists fed
    #: by gradient hooks; no dense gradient after backward).
    lean: ClassVar[bool] = False

    def __init__(
        self,
        named_params: Sequence[tuple[str, nn.Parameter]],
        k: int,
        chunk_numel: int = DEFAULT_CHUNK_NUMEL,
        cap: int | None = None,
    ) -> None:
        if not named_params:
            raise ConfigError("No eligible parameters to select from.")
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        devices = {p.device for p in self.params}
        if len(devices) != 1:
            raise ConfigError(f"Eligible parameters span several devices {devices}; use one.")
        self.device = devices.pop()
        #: Layout of the full tensors (checkpoints and records use it whatever the sharding).
        self.full_layout = FlatLayout.plan([p.shape for p in self.params], chunk_numel)
        #: Layout of what this rank holds: ``full_layout``, or one bucket per shard (FSDP2).
        self.layout = self.full_layout
        self.spans = [span_of(p) for p in self.params]
        self.collective = LOCAL
        self.total = self.full_layout.numel
        if not 1 <= k <= self.total:
            raise ConfigError(f"k must be in [1, {self.total}], got {k}.")
        self.k = k
        if cap is not None and not k <= cap <= self.total:
            raise ConfigError(f"The union cap must be in [k={k}, {self.total}] entries, got {cap}.")
        self.cap = cap
        self.chunk_numel = chunk_numel
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._mask_buckets: list[torch.Tensor] | None = None
        self._union_buckets: list[torch.Tensor] | None = None
        self.masks: list[torch.Tensor] | None = None
        self.union_masks: list[torch.Tensor] | None = None
        self._counts: list[int] | None = None
        self.refreshes = 0
        #: One small record per refresh: step, seconds, new entries, union size.
        self.log: list[dict[str, Any]] = []
        self.callbacks: list[MaskCallback] = []
        #: What the Fisher of a static mask was estimated from (``{"fisher_samples_used": 1024}``,
        #: ``{"fisher_batches_used": 250}``), None for other selections; saved with the masks, so
        #: a resumed run reports it too.
        self.prepared: dict[str, int] | None = None

    @property
    def sharded(self) -> bool:
        """Whether every rank holds only a shard of each tensor (FSDP2)."""
        return self.collective.sharded

    def rebind(self, named_params: Mapping[str, nn.Parameter]) -> None:
        """Follow parameters that data-parallel wrapping replaced (FSDP2's ``fully_shard`` turns
        them into DTensor shards), looked up by name. For shards, switch to the local layout and
        keep this rank's shard of the masks selected so far (a prepared static mask, a resumed
        one). Call once, on every rank, right after wrapping."""
        missing = [n for n in self.names if n not in named_params]
        if missing:
            raise ConfigError(f"Cannot rebind the selection: parameters {missing[:3]} are gone.")
        params = [named_params[n] for n in self.names]
        for n, old, new in zip(self.names, self.params, params):
            if tuple(new.shape) != tuple(old.shape):
                raise ConfigError(
                    f"Parameter {n!r} changed shape from {tuple(old.shape)} to {tuple(new.shape)}."
                )
        spans = [span_of(p) for p in params]
        self.params = params
        self._index = {id(p): i for i, p in enumerate(params)}
        self.device = local_tensor(params[0]).device
        if all(sp.whole for sp in spans):
            return
        full = self._full_state()
        self.spans = spans
        self.collective = Collective.of_process_group(self.device, params[0].device_mesh.get_group())
        self.layout = FlatLayout.per_tensor([local_tensor(p).shape for p in params])
        if full is not None:
            self._install(*full)

    def __contains__(self, p: torch.Tensor) -> bool:
        return id(p) in self._index

    def add_callback(self, fn: MaskCallback) -> None:
        """``fn(step, {name: bool mask})`` after every refresh (views; copy what you keep)."""
        self.callbacks.append(fn)

    def mask_of(self, p: torch.Tensor) -> torch.Tensor | None:
        """The current mask of an eligible tensor (its local shard's under FSDP2; None for other
        tensors)."""
        i = self._index.get(id(p))
        if i is None:
            return None
        if self.masks is None:
            raise RuntimeError(
                "No mask has been selected yet: call method.after_backward(step, total_steps) "
                "after loss.backward() (static-mask methods: method.prepare(...) before training)."
            )
        return self.masks[i]

    def planned_counts(self) -> list[int]:
        """k spread over the tensors by size (largest remainder), before any mask exists."""
        shares = [s.numel() * self.k / self.total for s in self.full_layout.shapes]
        counts = [int(x) for x in shares]
        order = sorted(range(len(shares)), key=lambda i: counts[i] - shares[i])
        for i in order[: self.k - sum(counts)]:
            counts[i] += 1
        return counts

    def counts(self) -> list[int]:
        """Selected entries per tensor (the current mask, this rank's shards under FSDP2; the
        plan before the first mask)."""
        if self.masks is None:
            return self.planned_counts()
        if self._counts is None:
            self._counts = torch.stack([torch.count_nonzero(m) for m in self.masks]).tolist()
        return self._counts

    def count_of(self, p: torch.Tensor) -> int:
        return self.counts()[self._index[id(p)]]

    def union_size(self) -> int:
        """Entries selected at least once (over all ranks: collective under FSDP2)."""
        local = 0
        if self._union_buckets is not None:
            local = sum(int(torch.count_nonzero(b)) for b in self._union_buckets)
        return self.collective.sum_ints([local])[0]

    def set_masks(self, buckets: list[torch.Tensor], step: int, seconds: float = 0.0) -> None:
        """Install new bucketed masks (in ``layout``), grow the union, log, run the callbacks."""
        if self._union_buckets is None:
            new = sum(int(torch.count_nonzero(b)) for b in buckets)
            self._union_buckets = [b.clone() for b in buckets]
        else:
            new = sum(
                int(torch.count_nonzero(b & ~u)) for b, u in zip(buckets, self._union_buckets)
            )
            for u, b in zip(self._union_buckets, buckets):
                u |= b
        new = self.collective.sum_ints([new])[0]
        self._mask_buckets = buckets
        self.masks = self.layout.split(buckets)
        self.union_masks = self.layout.split(self._union_buckets)
        self._counts = None
        self.refreshes += 1
        self.log.append(
            {"step": step, "seconds": seconds, "new_entries": new, "union": self.union_size()}
        )
        if self.callbacks:
            named = dict(zip(self.names, self.masks))
            for fn in self.callbacks:
                fn(step, named)

    def zero_unselected_grads(self) -> None:
        """Gradients outside the current mask set to 0 (clipping and dense optimisers see only
        the selected entries)."""
        if self.masks is None:
            raise RuntimeError("No mask to apply yet.")
        for g, m in zip(self.grads(), self.masks):
            if g is not None:
                g.mul_(m)

    def grads(self) -> list[torch.Tensor | None]:
        """The gradients of the eligible tensors (local shards under FSDP2)."""
        return [None if p.grad is None else local_tensor(p.grad) for p in self.params]

    def select(
        self,
        scores: list[torch.Tensor],
        *,
        step: int,
        broadcast: bool = False,
        started: float | None = None,
    ) -> None:
        """Global top-k of bucketed ``scores`` (in ``layout``) becomes the mask, kept inside the
        union cap when there is one (collective under FSDP2)."""
        if self.cap is not None and self._union_buckets is not None:
            try:
                buckets = capped_topk_masks(
                    scores, self.k, self._union_buckets, self.cap, self.chunk_numel,
                    collective=self.collective,
                )
            except ValueError as e:  # a loaded union larger than the cap
                raise ConfigError(
                    f"Cannot keep the selection inside its union cap of {self.cap} entries: {e} "
                    "A run resumed with a smaller union_cap cannot shrink its union; resume with "
                    "the cap it was trained with."
                ) from None
        else:
            buckets = topk_masks(scores, self.k, self.chunk_numel, collective=self.collective)
        if broadcast:
            if self.sharded:
                raise ConfigError(
                    "broadcast_masks has no meaning for sharded tensors: every rank holds a "
                    "different shard of the one global mask. Turn it off under FSDP."
                )
            broadcast_mask(buckets)
        seconds = time.perf_counter() - started if started is not None else 0.0
        self.set_masks(buckets, step, seconds)

    def full_masks(self, which: str = "masks") -> list[torch.Tensor] | None:
        """The full per-tensor ``masks`` or ``union_masks`` (gathered from every rank's shards:
        collective under FSDP2); None before the first selection."""
        local = self.masks if which == "masks" else self.union_masks
        if local is None:
            return None
        return self.collective.gather_full(local, self.spans)

    def _full_state(self) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """Mask and union buckets in ``full_layout`` (collective under FSDP2)."""
        if self._mask_buckets is None or self._union_buckets is None:
            return None
        if not self.sharded:
            return self._mask_buckets, self._union_buckets
        out = []
        for which in ("masks", "union_masks"):
            buckets = self.full_layout.zeros(torch.bool, self.device)
            for view, full in zip(self.full_layout.split(buckets), self.full_masks(which)):
                view.copy_(full)
            out.append(buckets)
        return out[0], out[1]

    def local_parts(self, full: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's shard of each full per-tensor tensor (views, shaped like ``masks``)."""
        return [
            sp.narrow(f).view(shape) for sp, f, shape in zip(self.spans, full, self.layout.shapes)
        ]

    def _install(self, masks: list[torch.Tensor], union: list[torch.Tensor]) -> None:
        """Masks and union given as buckets in ``full_layout``: keep this rank's part."""
        if self.sharded:
            masks, union = (
                [part.reshape(-1).clone() for part in self.local_parts(self.full_layout.split(b))]
                for b in (masks, union)
            )
        self._mask_buckets, self._union_buckets = masks, union
        self.masks = self.layout.split(masks)
        self.union_masks = self.layout.split(union)
        self._counts = None

    def state_dict(self) -> dict[str, Any]:
        """Current masks and union as bucketed bool tensors of the full tensors (for resuming
        on any world size; collective under FSDP2)."""
        full = self._full_state()
        return {
            "masks": None if full is None else full[0],
            "union": None if full is None else full[1],
            "refreshes": self.refreshes,
            "prepared": self.prepared,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("masks") is not None:
            self._install(
                [m.to(self.device, torch.bool) for m in state["masks"]],
                [m.to(self.device, torch.bool) for m in state["union"]],
            )
        self.refreshes = int(state.get("refreshes", 0))
        self.prepared = state.get("prepared", self.prepared)  # absent in older checkpoints


class MaskRecorder:
    """A refresh callback that keeps every mask as int64 flat indices on the CPU (under FSDP2:
    of this rank's shards, indices within the shard).

    ``history[j] = (step, {name: indices})``. Costs 8 bytes per selected entry per refresh, so
    opt-in (``method.selection.add_callback(MaskRecorder())``).
    """

    def __init__(self) -> None:
        self.history: list[tuple[int, dict[str, torch.Tensor]]] = []

    def __call__(self, step: int, masks: dict[str, torch.Tensor]) -> None:
        self.history.append(
            (step, {n: m.reshape(-1).nonzero().squeeze(1).cpu() for n, m in masks.items()})
        )


# --- methods ------------------------------------------------------------------------------------


class _SelectionMethod(PEFTMethod):
    """Shared part: eligible = backbone parameters, masked counts, sparse adapter state,
    sparse-safe optimiser."""

    size_knob = "keep_ratio"

    def __init__(self, config: MethodConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._selection: EntrySelection | None = None

    @property
    def selection(self) -> EntrySelection | None:
        """The selection over every backbone entry (None before ``apply``)."""
        return self._selection

    @property
    def _lean(self) -> bool:
        """Whether the config asks for the lean selection (:mod:`wpeft.methods.lean`)."""
        return bool(self.config.lean)

    def state_bytes(self) -> int:
        """Dense: the mask and its union, one byte per eligible entry each. Lean: the selected
        indices (8 bytes each) and the bit-packed union."""
        sel = self.selection
        if sel is None:
            return 0
        return sel.state_bytes() if self._lean else 2 * sel.total

    def _apply(self, model: WpeftAurora) -> None:
        named = [(f"model.backbone.{n}", p) for n, p in model.backbone.named_parameters()]
        for _, p in named:
            p.requires_grad_(True)
        total = sum(p.numel() for _, p in named)
        k = budget_k(self.config.keep_ratio, total)
        if self._lean:
            from wpeft.methods.lean import LeanSelection

            self._named_eligible = [p for _, p in named]
            eligible = {id(p) for _, p in named}
            linears = {
                n: m for n, m in model.backbone.named_modules()
                if isinstance(m, nn.Linear) and id(m.weight) in eligible
            }
            every = self._refresh_every()
            self._selection = LeanSelection(
                named, k, linears=linears, refresh_every=every,
                stream=None if every is None else self._stream(k),
                chunk_numel=self.config.chunk_numel,
            )
            return
        ratio = self._union_cap()
        self._selection = EntrySelection(
            named, k, self.config.chunk_numel, cap=None if ratio is None else budget_k(ratio, total)
        )

    def _refresh_every(self) -> int | None:
        """Steps between mask refreshes (None: one fixed mask, selected by ``prepare``)."""
        return None

    def _stream(self, k: int) -> Any:
        """The streaming top-k of a refreshing lean selection."""
        raise NotImplementedError

    def check_strategy(self, strategy: str) -> None:
        """Lean runs on one process."""
        if self._lean and strategy != "none":
            raise ConfigError(
                f"Method {self.name!r} has lean=True, which runs on one process (its gradient "
                f"hooks fire before {strategy} reduces the gradients). Use --strategy none, or "
                "lean=False for data-parallel runs."
            )

    def before_backward(self, step: int, total_steps: int) -> None:
        """Lean: tell the gradient hooks what this step gathers (nothing otherwise)."""
        if self._lean:
            self._sel().begin_step(step, total_steps)

    def clip_grad_norm_(self, params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Lean: one global norm over the dense gradients and the selected entries' values."""
        if not self._lean:
            return super().clip_grad_norm_(params, max_norm)
        from wpeft.methods.lean import clip_grad_norm_

        return clip_grad_norm_(params, self._sel().compact_values(), max_norm)

    def _union_cap(self) -> float | None:
        """The cap on the union of the masks, as a fraction of the eligible entries (None: none;
        a fixed mask is its own union)."""
        return None

    def on_wrapped(self) -> None:
        """Follow the parameters FSDP2 replaced with shards (see :meth:`EntrySelection.rebind`)."""
        self._sel().rebind(dict(self.named_parameters()))

    def _sel(self) -> EntrySelection:
        if self._selection is None:
            raise ConfigError(f"Apply method {self.name!r} to a model first.")
        return self._selection

    @property
    def masks(self) -> list[torch.Tensor] | None:
        """Current per-tensor masks (aligned with ``selection.names``), None before selection."""
        return self._sel().masks

    @property
    def union_masks(self) -> list[torch.Tensor] | None:
        """Per-tensor union of every mask used so far."""
        return self._sel().union_masks

    def mask_dict(self) -> dict[str, torch.Tensor]:
        """``{name: current bool mask}`` of the backbone tensors (empty before selection)."""
        sel = self._sel()
        return dict(zip(sel.names, sel.masks)) if sel.masks is not None else {}

    def add_mask_callback(self, fn: MaskCallback) -> None:
        """``fn(step, {name: bool mask})`` after every (re)selection; static methods call it
        once with step -1. The masks are views: copy what you keep (see :class:`MaskRecorder`)."""
        self._sel().add_callback(fn)

    def trainable_in(self, p: nn.Parameter) -> int:
        sel = self.selection
        if sel is not None and p in sel:
            return sel.count_of(p)
        return super().trainable_in(p)

    def optimizer_recipe(
        self, lr: float, weight_decay: float = 0.0
    ) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
        if self._lean:
            from wpeft.methods.compact import CompactAdamW

            return CompactAdamW, {"lr": lr, "weight_decay": weight_decay}
        return MaskedAdamW, {"lr": lr, "weight_decay": weight_decay, "dense": self.config.dense_update}

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if self._lean:
            optimizer.grad_of = self._sel().compact_grad_of
        else:
            optimizer.mask_of = self._sel().mask_of

    def adapter_state(self, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Backbone entries that differ from ``reference`` as ``<name>.indices`` (int64 flat,
        increasing; adapter files store them compactly) + ``<name>.values`` (the parameter's
        dtype); other parameters as in the base class (whole, if changed)."""
        sel = self._sel()
        state: dict[str, torch.Tensor] = {}
        for name, p in self.named_parameters():
            group = self.group_of(p)
            if p in sel:
                ref = reference[self._pristine_name[id(p)]].to(p.device)
                idx = (p.detach() != ref).reshape(-1).nonzero().squeeze(1)
                if idx.numel():
                    state[f"{name}.indices"] = idx.to(torch.int64)
                    state[f"{name}.values"] = p.detach().reshape(-1)[idx].clone()
            elif group == "added":
                state[name] = p.detach().clone()
            elif bool((p.detach() != reference[self._pristine_name[id(p)]].to(p.device)).any()):
                state[name] = p.detach().clone()
        return state

    def describe(self, reference: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        out = super().describe(reference)
        sel = self.selection
        if sel is not None:
            out["selection"] = {
                "eligible": sel.total,
                "k": sel.k,
                "refreshes": sel.refreshes,
                "union": sel.union_size(),
                "union_cap": sel.cap,
                **(sel.prepared or {}),
            }
            if self._lean and self._refresh_every() is not None:
                out["selection"]["lean"] = {
                    "exact_refreshes": sel.exact_refreshes,
                    "candidates_last": sel.candidates,
                }
        return out


@register
class SFAS(_SelectionMethod):
    """Stochastic Fisher-guided Adaptive Selection: a fresh top-k mask every refresh."""

    name = "sfas"
    Config = SFASConfig
    summary = "top-k backbone entries by annealed noisy Fisher, redrawn every step"
    config: SFASConfig
    _accumulator: ImportanceAccumulator

    def _apply(self, model: WpeftAurora) -> None:
        super()._apply(model)
        if not self.config.lean:
            self._new_accumulator()

    def _stream(self, k: int) -> Any:
        from wpeft.methods.streaming import StreamingTopK

        cfg = self.config
        return StreamingTopK(
            [p.shape for p in self._named_eligible], k, importance=cfg.importance,
            noise=cfg.noise, gamma=cfg.gamma, seed=cfg.seed,
        )

    def _refresh_every(self) -> int | None:
        return self.config.refresh_every

    def _union_cap(self) -> float | None:
        return self.config.union_cap

    def state_bytes(self) -> int:
        """Dense: mask and union plus the fp32 importance accumulated between refreshes. Lean:
        the selected indices and the bit-packed union."""
        sel = self.selection
        if sel is None or self._lean:
            return super().state_bytes()
        return super().state_bytes() + 4 * sel.total

    def check_strategy(self, strategy: str) -> None:
        """Lean runs on one process; FSDP shards the mask: broadcasting rank 0's has no meaning
        there."""
        super().check_strategy(strategy)
        if strategy == "fsdp" and self.config.broadcast_masks:
            raise ConfigError(
                f"Method {self.name!r} has broadcast_masks=True, which has no meaning under FSDP: "
                "every rank holds a different shard of the one global mask. Turn it off."
            )

    def _new_accumulator(self) -> None:
        sel = self._sel()
        self._accumulator = ImportanceAccumulator(sel.layout, sel.device, self.config.importance)

    def on_wrapped(self) -> None:
        super().on_wrapped()
        if not self.config.lean:
            self._new_accumulator()  # in the layout of this rank's shards

    def after_backward(self, step: int, total_steps: int) -> None:
        """Accumulate importance, redraw the mask when due, zero gradients outside it (lean:
        finish the streamed selection, or the gathered values between refreshes).

        Args:
            step: 0-based index of this optimiser step.
            total_steps: Number of optimiser steps of the run (the annealing horizon).
        """
        sel, cfg = self._sel(), self.config
        if cfg.lean:
            sel.finish_step()
            return
        started = time.perf_counter()
        refresh = sel.masks is None or step % cfg.refresh_every == 0
        in_window = (-step) % cfg.refresh_every < cfg.accumulate_batches
        if refresh or in_window:
            self._accumulator.add(sel.grads())
        if refresh:
            scores = self._accumulator.mean_()
            normalise_by_global_max_(scores, sel.collective)
            perturb_(
                sel.layout.split(scores),
                step=step,
                total_steps=total_steps,
                gamma=cfg.gamma,
                kind=cfg.noise,
                seed=cfg.seed,
                k=sel.k,
                spans=sel.spans,
            )
            sel.select(scores, step=step, broadcast=cfg.broadcast_masks, started=started)
            self._accumulator.reset()
        sel.zero_unselected_grads()


class _StaticFisherMethod(_SelectionMethod):
    """A mask selected once before training from g² averaged over batches.

    Subclasses say which training batches that takes (:meth:`preparation`), how many
    :meth:`prepare` uses when not told (:meth:`_default_batches`) and how the count is recorded
    (:attr:`_used_key`)."""

    def __init__(self, config: MethodConfig | None = None, **kwargs: Any) -> None:
        if "union_cap" in kwargs:
            raise ConfigError(
                f"Method {self.name!r} selects one fixed mask before training, so the union of "
                f"its masks is that mask and union_cap={kwargs['union_cap']!r} has no meaning; "
                "union_cap bounds the changing masks of 'sfas' and 'weatherpeft'. Drop it."
            )
        super().__init__(config, **kwargs)

    #: Key of ``selection.prepared`` (and of ``summary.json``'s ``selection``) for the count.
    _used_key: ClassVar[str] = "fisher_batches_used"

    def _default_batches(self) -> int | None:
        """Batches :meth:`prepare` averages when not told ``n_batches`` (None: all given)."""
        raise NotImplementedError

    def fisher(
        self,
        loss_fn: Callable[..., torch.Tensor],
        batches: Iterable[Any] | None = None,
        n_batches: int | None = None,
    ) -> tuple[list[torch.Tensor], int]:
        """This process's Fisher estimate: g² of the backbone's gradient of ``loss_fn(batch)``
        (each tensor's gradient clipped first where the config has ``clip_grad_norm``), averaged
        over the first ``n_batches`` of ``batches`` (or ``loss_fn()`` called ``n_batches``
        times). Batches are consumed one at a time (stream them: nothing is kept); every
        gradient it produced is cleared.

        Returns:
            The mean importance as float32 buckets in ``selection.layout`` (per-tensor views:
            ``selection.layout.split(buckets)``, shaped like the parameters) and the number of
            batches it averaged.
        """
        sel = self._sel()
        n = n_batches if n_batches is not None else self._default_batches()
        if batches is None:
            if n is None:
                raise ConfigError("prepare() with a closure needs n_batches (how many calls).")
            batches = (None for _ in range(n))
        clip = getattr(self.config, "clip_grad_norm", None)
        acc = ImportanceAccumulator(sel.layout, sel.device, "fisher", clip_norm=clip)
        params = list(self.parameters())
        dense = sel.dense_gradients() if self._lean else contextlib.nullcontext()
        with dense:  # lean: its hooks leave the gradients alone for the Fisher pass
            for i, batch in enumerate(batches):
                if n is not None and i >= n:
                    break
                for p in params:
                    p.grad = None
                loss = loss_fn() if batch is None else loss_fn(batch)
                loss.backward()
                acc.add(sel.grads())
        for p in params:
            p.grad = None
        if acc.count == 0:
            raise ConfigError(f"prepare() of {self.name!r} got no batches.")
        return acc.mean_(), acc.count

    def prepare(
        self,
        loss_fn: Callable[..., torch.Tensor],
        batches: Iterable[Any] | None = None,
        n_batches: int | None = None,
    ) -> list[torch.Tensor]:
        """Select the fixed mask. Call once, after ``apply`` and before the first step.

        Takes :meth:`fisher` over the batches, averages it over data-parallel ranks (when a
        process group is up; the training loop gives every rank the same batches before
        wrapping, so the ranks agree without it), takes the global top-k, and records the count
        used in ``selection.prepared``.

        Args:
            loss_fn: ``batch -> scalar loss`` (or a zero-argument closure).
            batches: Iterable of batches (those :meth:`preparation` asks for); None to call
                ``loss_fn()`` without arguments.
            n_batches: Batches to use; default from the config (see the subclass).

        Returns:
            The per-tensor masks.
        """
        sel = self._sel()
        if sel.masks is not None:
            raise ConfigError(f"Method {self.name!r} already selected its mask; prepare() once.")
        scores, used = self.fisher(loss_fn, batches, n_batches)
        if not sel.sharded:  # replicas average their importance; shards hold reduced gradients
            all_reduce_mean_(scores)
        sel.select(scores, step=-1, broadcast=distributed_ready() and not sel.sharded)
        sel.prepared = {self._used_key: used}
        assert sel.masks is not None
        return sel.masks

    def after_backward(self, step: int, total_steps: int) -> None:
        """Zero the gradients outside the fixed mask (the mask never changes; lean: the
        gradients at the mask were gathered during backward)."""
        sel = self._sel()
        if sel.masks is None:
            raise ConfigError(
                f"Method {self.name!r} has no mask: call method.prepare(loss_fn, batches, "
                "n_batches) once before training."
            )
        if self._lean:
            sel.finish_step()
        else:
            sel.zero_unselected_grads()


@register
class FishMask(_StaticFisherMethod):
    """FISH mask: fixed top-k by the per-example empirical Fisher, sparse-safe AdamW.

    The Fisher is (1/N) Σ_n g_n² with g_n the gradient of sample n's own loss, over the first
    N = min(``fisher_samples``, training samples) samples of the first epoch's order. Per-example
    gradients are exact and simple: :meth:`preparation` asks for batches of one sample and each
    takes one forward/backward pass (N passes; no ``torch.func`` vmap over the backbone, so it is
    exact whatever the model does: activation checkpointing, autocast, hooks). A caller of :meth:`prepare` must give
    one-sample batches too; batches of B samples would average squared batch-mean gradients
    instead, which underweights per-sample disagreement by up to a factor B.
    """

    name = "fish"
    Config = FishMaskConfig
    summary = "fixed Fisher top-k mask of backbone entries (FISH), selected before training"
    config: FishMaskConfig
    _used_key = "fisher_samples_used"

    def _default_batches(self) -> int:
        return self.config.fisher_samples

    def preparation(self, train_samples: int, batch_size: int) -> Preparation:
        """One-sample batches, N = min(``fisher_samples``, ``train_samples``) of them."""
        return Preparation(batch_size=1, batches=min(self.config.fisher_samples, train_samples))


@register
class ChildTuningD(_StaticFisherMethod):
    """Child-Tuning_D: fixed top-k by clipped g² over the training set, the original's dense
    masked AdamW by default."""

    name = "child_tuning_d"
    Config = ChildTuningDConfig
    summary = "fixed Fisher child network of backbone entries, selected before training"
    config: ChildTuningDConfig

    def _default_batches(self) -> int | None:
        return self.config.fisher_batches

    def preparation(self, train_samples: int, batch_size: int) -> Preparation:
        """Batches of the run's ``batch_size``: all ceil(train_samples / batch_size) of one pass
        (``fisher_batches=None``), or the first ``fisher_batches`` of them.

        Raises:
            ConfigError: ``fisher_batches`` is more than the split's batches.
        """
        available = math.ceil(train_samples / batch_size)
        wanted = self.config.fisher_batches
        if wanted is not None and wanted > available:
            raise ConfigError(
                f"Method {self.name!r}: fisher_batches={wanted} is more than the {available} "
                f"batches of {batch_size} samples in the training split ({train_samples} "
                f"samples); give at most {available}, or None for one pass over the whole split."
            )
        return Preparation(batch_size=batch_size, batches=available if wanted is None else wanted)
