"""Fisher-guided entry selection: importance, annealed noise, exact global top-k, sparse AdamW.

SFAS (METHOD.md §3) and the static Fisher-mask baselines (FISH mask, Child-Tuning_D) all pick
the k most important scalars out of every backbone parameter and update only those. This module
holds that machinery on plain lists of tensors, independent of the method API, so it can be
tested on synthetic parameters and reused by any method.

Why it is written the way it is (the released research code's pitfalls, each avoided here):

* **Scale.** A backbone can have more than 2^31 eligible scalars (Aurora 1.3B is ~1.1e9 and
  other backbones are larger). One flat ``torch.topk`` over a concatenation overflows int32
  indices and costs several full copies of all gradients. :func:`topk_masks` instead
  binary-searches the threshold on the *bit patterns* of the non-negative float32 scores (for
  non-negative IEEE floats the int32 bit pattern is monotonic in the value), counting entries
  at or above a candidate threshold chunk by chunk with int64 counts; once the entries still
  undecided fit in a small fraction of the total they are gathered once and the search ends on
  them alone (11-13 full counting passes instead of 31 on the tiny backbone's SFAS scores). No
  sort, no concatenation of all scores; memory is the bool masks plus chunk-sized temporaries.
  Ties at the threshold are taken in a deterministic order (tensor order, then flat index) until
  exactly k entries are selected.
* **Data parallelism.** Every rank must select the same mask, or replicas silently diverge. With
  gradients all-reduced (as DDP does) the importance is identical on every rank, and the noise
  U is a function of ``(seed, step, tensor index, entry)`` alone
  (:class:`~wpeft.methods.noise.TensorNoise`), never of the global RNG, so every rank draws the
  same U. :func:`broadcast_mask` is the
  belt-and-braces alternative (rank ``src``'s mask wins). Under FSDP2 each rank holds only
  shards of the tensors: the same functions take a sharded
  :class:`~wpeft.methods.shards.Collective`, sum their counts (and take the max) over the ranks
  and select one global top-k, each rank marking its shards.
* **Sparse updates.** Zeroing the gradients of unselected entries does not stop AdamW from
  moving them: stale momentum and decoupled weight decay still act, so the final delta is
  dense. :class:`MaskedAdamW` updates (moments, weight decay, step) only the selected entries,
  with per-entry step counts for the bias correction. ``dense=True`` reproduces the released
  code's behaviour for comparison.

Storage: one float32 score per eligible entry in total, kept in flat *buckets*
(:class:`FlatLayout`) of at most ``chunk_numel`` entries each (a larger tensor gets its own
bucket), so the per-pass kernel launches scale with the number of buckets rather than the number
of parameter tensors, and the same buffer serves as the accumulator across batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from wpeft.methods.noise import TensorNoise, exceedance_fraction
from wpeft.methods.shards import LOCAL, Collective, Span, local_tensor

__all__ = [
    "DEFAULT_CHUNK_NUMEL",
    "FlatLayout",
    "ImportanceAccumulator",
    "ImportanceKind",
    "MaskedAdamW",
    "NoiseKind",
    "adamw_entries_",
    "add_importance_",
    "all_reduce_mean_",
    "anneal_factor",
    "broadcast_mask",
    "capped_topk_masks",
    "count_at_least",
    "distributed_ready",
    "normalise_by_global_max_",
    "perturb_",
    "search_threshold",
    "topk_masks",
]

ImportanceKind = Literal["fisher", "abs_grad"]
NoiseKind = Literal["additive", "multiplicative", "none"]

#: Entries per bucket / per counting chunk: 16M entries = 64 MB of float32 scores, 16 MB of
#: comparison temporaries per chunk.
DEFAULT_CHUNK_NUMEL = 1 << 24

_INT32_LIMIT = 1 << 31  # exclusive upper bound of a non-negative int32 bit pattern


# --- bucketed flat storage ----------------------------------------------------------------------


@dataclass(frozen=True)
class FlatLayout:
    """Consecutive tensors packed into a few flat buckets of at most ``bucket_numel`` entries.

    A tensor never straddles two buckets; a tensor larger than ``bucket_numel`` gets a bucket of
    its own. The order of entries (tensor order, then flat index) is preserved, so selections over
    the buckets are selections over the original tensors in the same order.

    Attributes:
        shapes: Shape of each tensor.
        bucket_of: Bucket index of each tensor.
        offset: Start of each tensor inside its bucket.
        bucket_numels: Entries per bucket.
    """

    shapes: tuple[torch.Size, ...]
    bucket_of: tuple[int, ...]
    offset: tuple[int, ...]
    bucket_numels: tuple[int, ...]

    @classmethod
    def plan(
        cls, shapes: Iterable[Sequence[int]], bucket_numel: int = DEFAULT_CHUNK_NUMEL
    ) -> FlatLayout:
        if bucket_numel < 1:
            raise ValueError(f"bucket_numel must be >= 1, got {bucket_numel}.")
        shapes = tuple(torch.Size(s) for s in shapes)
        bucket_of, offset, sizes = [], [], []
        for shape in shapes:
            n = shape.numel()
            if not sizes or (sizes[-1] > 0 and sizes[-1] + n > bucket_numel):
                sizes.append(0)
            bucket_of.append(len(sizes) - 1)
            offset.append(sizes[-1])
            sizes[-1] += n
        return cls(shapes, tuple(bucket_of), tuple(offset), tuple(sizes))

    @classmethod
    def per_tensor(cls, shapes: Iterable[Sequence[int]]) -> FlatLayout:
        """One bucket per tensor (empty tensors included), so bucket ``i`` is tensor ``i``.

        Used for the local shards of FSDP2-sharded tensors: every rank then has the same list
        of buckets, each a shard of the same tensor, which the global top-k relies on.
        """
        shapes = tuple(torch.Size(s) for s in shapes)
        n = len(shapes)
        return cls(shapes, tuple(range(n)), (0,) * n, tuple(s.numel() for s in shapes))

    @property
    def numel(self) -> int:
        """Entries in total (a Python int: no int32 limit)."""
        return sum(self.bucket_numels)

    def zeros(self, dtype: torch.dtype, device: torch.device | str) -> list[torch.Tensor]:
        """Zeroed buckets, each 1-D ``(bucket_numel,)``."""
        return [torch.zeros(n, dtype=dtype, device=device) for n in self.bucket_numels]

    def split(self, buckets: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-tensor views into ``buckets``, shaped like the original tensors (no copies)."""
        return [
            buckets[b].narrow(0, o, shape.numel()).view(shape)
            for shape, b, o in zip(self.shapes, self.bucket_of, self.offset, strict=True)
        ]


# --- importance ---------------------------------------------------------------------------------


def add_importance_(
    out: torch.Tensor, grad: torch.Tensor | None, kind: ImportanceKind, scale: float = 1.0
) -> None:
    """``out += importance(scale · grad)`` entry-wise, in float32, in place.

    Args:
        out: float32 accumulator shaped like the parameter.
        grad: The parameter's gradient (any float dtype), or None (no contribution).
        kind: ``"fisher"``: g² (diagonal empirical Fisher, the paper); ``"abs_grad"``: |g| (the
            released code).
        scale: Factor applied to the gradient first (per-tensor gradient clipping).
    """
    if grad is None:
        return
    if grad.is_sparse:
        raise ValueError("Sparse gradients are not supported by Fisher selection.")
    g = grad.detach()
    if kind == "fisher":
        out.addcmul_(g, g, value=scale * scale)
    elif kind == "abs_grad":
        out.add_(g.abs(), alpha=scale)
    else:
        raise ValueError(f"importance must be 'fisher' or 'abs_grad', got {kind!r}.")


class ImportanceAccumulator:
    """Sum of per-entry importance over batches, stored in bucketed float32 buffers.

    Holds exactly one float32 copy of the eligible entries; :meth:`mean_` turns it into the
    average in place and returns the buckets (the caller may normalise/perturb them in place;
    call :meth:`reset` before accumulating again).

    Args:
        layout: Bucket layout of the eligible tensors.
        device: Where the buffers live (the parameters' device).
        kind: ``"fisher"`` or ``"abs_grad"``.
        clip_norm: If set, each tensor's gradient is scaled to L2 norm at most ``clip_norm``
            before its importance is taken (Child-Tuning_D's per-tensor clipping).
    """

    def __init__(
        self,
        layout: FlatLayout,
        device: torch.device | str,
        kind: ImportanceKind = "fisher",
        clip_norm: float | None = None,
    ) -> None:
        if kind not in ("fisher", "abs_grad"):
            raise ValueError(f"importance must be 'fisher' or 'abs_grad', got {kind!r}.")
        self.layout, self.kind, self.clip_norm = layout, kind, clip_norm
        self.buckets = layout.zeros(torch.float32, device)
        self.views = layout.split(self.buckets)
        self.count = 0

    def reset(self) -> None:
        for b in self.buckets:
            b.zero_()
        self.count = 0

    def add(self, grads: Sequence[torch.Tensor | None]) -> None:
        """Accumulate the importance of one batch's gradients (aligned with the layout)."""
        if len(grads) != len(self.views):
            raise ValueError(f"Expected {len(self.views)} gradients, got {len(grads)}.")
        for out, g in zip(self.views, grads):
            scale = 1.0
            if g is not None and self.clip_norm is not None:
                norm = float(g.detach().float().norm())
                if norm > self.clip_norm:
                    scale = self.clip_norm / (norm + 1e-6)
            add_importance_(out, g, self.kind, scale)
        self.count += 1

    def mean_(self) -> list[torch.Tensor]:
        """The buckets divided by the batch count, NaN mapped to 0 and +inf to float32 max."""
        if self.count == 0:
            raise RuntimeError("No gradients were accumulated.")
        for b in self.buckets:
            b.div_(self.count)
            torch.nan_to_num_(b, nan=0.0, posinf=torch.finfo(torch.float32).max)
        return self.buckets


def normalise_by_global_max_(
    scores: Sequence[torch.Tensor], collective: Collective = LOCAL
) -> torch.Tensor:
    """Divide non-negative scores in place by their global max (all zeros stay zeros).

    Args:
        scores: float32 score tensors (this rank's shards when ``collective`` is sharded).
        collective: The ranks sharing the tensors; the max is taken over all of them.

    Returns:
        The max as a 0-d tensor (no host synchronisation without a sharded collective).
    """
    nonempty = [s for s in scores if s.numel()]
    if not nonempty:
        top = torch.zeros((), dtype=torch.float32, device=collective.device)
    else:
        top = torch.stack([s.max() for s in nonempty]).max()
    top = collective.max_(top.to(collective.device) if collective.sharded else top)
    if not nonempty:
        return top
    top = top.to(nonempty[0].device)
    divisor = top.clamp_min(torch.finfo(torch.float32).tiny)
    for s in nonempty:
        s.div_(divisor)
    return top


# --- annealed noise -----------------------------------------------------------------------------


def anneal_factor(step: int, total_steps: int, gamma: float) -> float:
    """γ·(1 − n_s/t_s), clamped to [0, γ], with n_s = ``step`` + 1.

    ``step`` is the 0-based index of the optimiser step (as a ``for step in range(total)`` loop
    passes it), so n_s counts steps from 1: the first step explores with γ(1 − 1/t_s) and the
    last step (``step = total_steps − 1``) has factor exactly 0, i.e. pure Fisher selection.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}.")
    return gamma * min(1.0, max(0.0, 1.0 - (step + 1) / total_steps))


def perturb_(
    views: Sequence[torch.Tensor],
    *,
    step: int,
    total_steps: int,
    gamma: float,
    kind: NoiseKind,
    seed: int,
    k: int,
    spans: Sequence[Span] | None = None,
) -> float:
    """Add the annealed random term to normalised scores in place, per tensor.

    * ``"additive"`` (paper): F̃ = F̂ + γ(1 − n/N)·U. Early steps explore, late steps converge to
      pure Fisher selection; at factor 0 no noise is drawn at all.
    * ``"multiplicative"`` (released code): F̃ = F̂ · γ(1 − n/N) · U. The factor is a positive
      constant that cannot change the ranking, so it is not applied: the ranking is that of
      F̂·U at every step (applying it literally would make the last step's scores all zero, a
      degenerate selection).
    * ``"none"``: F̃ = F̂.

    U ~ Uniform[0, 1) per entry is tensor ``i``'s :class:`~wpeft.methods.noise.TensorNoise` of
    ``draw_all(seed, step, numels)``, at exceedance fraction c = min(1, 2k/N): it does not
    depend on bucketing, sharding, the device or the global RNG. A shard (FSDP2) computes the
    draws of its span only, the numbers an unsharded run gives those entries.

    Args:
        views: Per-tensor score views (float32), in a fixed order.
        k: Entries the top-k will select (sets c; the streamed selection uses the same).
        spans: Where each view sits in its full tensor (None: the views are whole tensors).

    Returns:
        The annealing factor γ(1 − n/N) of this step.
    """
    factor = anneal_factor(step, total_steps, gamma)
    if kind == "none" or (kind == "additive" and factor == 0.0):
        return factor
    if kind not in ("additive", "multiplicative"):
        raise ValueError(f"noise must be 'additive', 'multiplicative' or 'none', got {kind!r}.")
    full = [s.full_numel for s in spans] if spans is not None else [v.numel() for v in views]
    fraction = exceedance_fraction(k, sum(full))
    device = views[0].device if views else "cpu"
    for i, (v, noise) in enumerate(
        zip(views, TensorNoise.draw_all(seed, step, full, fraction, device), strict=True)
    ):
        if v.numel() == 0:
            continue
        start = spans[i].start if spans is not None else 0
        u = noise.span(start, v.numel()).view(v.shape)
        if kind == "additive":
            v.add_(u, alpha=factor)
        else:
            v.mul_(u)
    return factor


# --- exact global top-k -------------------------------------------------------------------------


def _bit_chunks(
    scores: Sequence[torch.Tensor],
    chunk_numel: int,
    allowed: Sequence[torch.Tensor] | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(tensor index, start, int32 bit-pattern chunk)`` over all scores, in order.

    With ``allowed`` (bool masks shaped like ``scores``) a chunk is a masked copy: allowed
    entries keep their pattern with negatives raised to 0, the others become -1 (below every
    threshold, and told apart from the allowed zeros at a tie at 0).
    """
    for i, s in enumerate(scores):
        bits = s.reshape(-1).view(torch.int32)
        keep = None if allowed is None else allowed[i].reshape(-1)
        n = bits.numel()
        for start in range(0, n, chunk_numel):
            chunk = bits[start : start + chunk_numel]
            if keep is not None:
                chunk = torch.where(keep[start : start + chunk_numel], chunk.clamp_min(0), -1)
            yield i, start, chunk


class _Scratch:
    """One reusable bool buffer per device for comparison results (avoids re-allocating a
    chunk-sized temporary in every counting pass)."""

    def __init__(self, size: int) -> None:
        self.size, self._buffers = size, {}

    def __call__(self, bits: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(bits.device)
        if buf is None:
            buf = self._buffers[bits.device] = torch.empty(
                self.size, dtype=torch.bool, device=bits.device
            )
        return buf[: bits.numel()]


def count_at_least(
    scores: Sequence[torch.Tensor],
    threshold: int,
    chunk_numel: int,
    scratch: Callable[[torch.Tensor], torch.Tensor] | None = None,
    allowed: Sequence[torch.Tensor] | None = None,
) -> int:
    """Entries whose float32 bit pattern is >= ``threshold`` (an int in [1, 2^31)), among the
    ``allowed`` ones (bool masks shaped like ``scores``; None: all).

    Counts per chunk with ``torch.count_nonzero`` (int64) into one int64 accumulator per
    device, summed into a Python int: no int32 overflow however many entries there are.
    """
    totals: dict[torch.device, torch.Tensor] = {}
    for _, _, bits in _bit_chunks(scores, chunk_numel, allowed):
        ge = bits >= threshold if scratch is None else torch.ge(bits, threshold, out=scratch(bits))
        c = torch.count_nonzero(ge)
        if bits.device in totals:
            totals[bits.device].add_(c)
        else:
            totals[bits.device] = c
    return sum(int(t) for t in totals.values())


def search_threshold(
    count_at_least_fn: Callable[[int], int],
    k: int,
    lo: int = 0,
    hi: int = _INT32_LIMIT,
    *,
    above: int = 0,
    lo_count: int | None = None,
    stop_below: int = 0,
) -> tuple[int, int, int, int]:
    """Binary search for the largest bit-pattern threshold t with count(>= t) >= k.

    Invariant: count(>= lo) >= k > count(>= hi) = ``above``. Starting from [0, 2^31) (negative
    patterns count as 0, so count(>= 0) is the total) it takes 31 calls of the count function.

    Args:
        count_at_least_fn: ``t -> number of entries with bit pattern >= t`` for t in (lo, hi).
        k: Entries to select, >= 1 and at most count(>= lo).
        lo, hi, above: A bracket already known (``above`` = count(>= hi)).
        lo_count: count(>= lo) if known (enables ``stop_below``).
        stop_below: Stop early once count(>= lo) - count(>= hi), the entries still undecided,
            is at most this (the caller then finishes on those entries alone).

    Returns:
        ``(lo, hi, count(>= lo) or None, count(>= hi))``. When the search ran to the end,
        ``hi == lo + 1``: t = lo and count(>= hi) is the number of entries strictly above t
        (``above < k <= above + ties at t``).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    while hi - lo > 1:
        if lo_count is not None and lo_count - above <= stop_below:
            break
        mid = (lo + hi) // 2
        c = count_at_least_fn(mid)
        if c >= k:
            lo, lo_count = mid, c
        else:
            hi, above = mid, c
    return lo, hi, lo_count, above


def _candidates(
    scores: Sequence[torch.Tensor],
    lo: int,
    hi: int,
    chunk_numel: int,
    allowed: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Bit patterns in [lo, hi) (negative patterns as 0; entries outside ``allowed`` left
    out), one small tensor per device."""
    parts: dict[torch.device, list[torch.Tensor]] = {}
    floor = lo if lo > 0 or allowed is not None else None  # masked chunks: excluded are -1
    for _, _, bits in _bit_chunks(scores, chunk_numel, allowed):
        if hi >= _INT32_LIMIT:  # no upper bound (2^31 itself does not fit an int32 compare)
            inside = bits >= floor if floor is not None else torch.ones_like(bits, dtype=torch.bool)
        else:
            inside = bits < hi if floor is None else (bits >= floor) & (bits < hi)
        parts.setdefault(bits.device, []).append(bits[inside])
    return [torch.cat(p).clamp_min_(0) for p in parts.values()]


def topk_masks(
    scores: Sequence[torch.Tensor],
    k: int,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
    compact_fraction: float = 1 / 32,
    collective: Collective = LOCAL,
    allowed: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Boolean masks marking exactly the k largest entries over all ``scores``.

    The threshold is found by bisection on the bit patterns, counting over all entries chunk by
    chunk; once the entries between the bracket's ends fit in ``compact_fraction`` of the total
    (and in one chunk), they are gathered once and the bisection finishes on them alone (cheap
    passes). A final pass writes the masks: entries above the threshold, then ties at it.

    With a sharded ``collective`` (FSDP2), ``scores[i]`` on every rank is that rank's shard of
    the same tensor ``i``, in rank order (see :mod:`wpeft.methods.shards`); every count is summed
    over the ranks, so all of them follow the same bisection and select one global top-k: each
    rank returns the masks of its shards, exactly k True over all ranks.

    Args:
        scores: float32 contiguous tensors of non-negative scores (negative values and -0.0 count
            as 0; NaN would rank above +inf, so map NaN first). Any shapes, any number of
            entries (counts are Python ints / int64).
        k: Entries to select, 0 <= k <= total (over all ranks).
        chunk_numel: Entries processed per kernel (bounds temporaries).
        compact_fraction: When to gather the undecided entries (0: never, pure bisection).
        collective: The ranks sharing the tensors (default: none).
        allowed: Bool masks shaped like ``scores``: only these entries may be selected (the
            k largest among them; k must not exceed their number). None: every entry. Costs
            one masked chunk copy per counting pass.

    Returns:
        One bool tensor per score tensor, same shape. Entries tied at the threshold are taken in
        tensor order, then flat-index order of the full tensor (for shards: rank order).
    """
    for s in scores:
        if s.dtype != torch.float32 or not s.is_contiguous():
            raise ValueError("topk_masks needs contiguous float32 scores.")
    if allowed is None:
        total = collective.sum_ints([sum(s.numel() for s in scores)])[0]
    else:
        if len(allowed) != len(scores) or any(
            a.shape != s.shape or a.dtype != torch.bool for a, s in zip(allowed, scores)
        ):
            raise ValueError("allowed must be one bool mask per score tensor, of its shape.")
        local = sum(int(torch.count_nonzero(a)) for a in allowed)
        total = collective.sum_ints([local])[0]
    if not 0 <= k <= total:
        raise ValueError(f"k must be in [0, {total}] (the {'allowed ' * (allowed is not None)}"
                         f"entries), got {k}.")
    masks = [torch.zeros(s.shape, dtype=torch.bool, device=s.device) for s in scores]
    if k == 0:
        return masks
    scratch = _Scratch(max(1, min(chunk_numel, max((s.numel() for s in scores), default=1))))

    def count(
        candidates: Sequence[torch.Tensor], th: int, scratch: Any = None, allowed: Any = None
    ) -> int:
        n = count_at_least(candidates, th, chunk_numel, scratch, allowed)
        return collective.sum_ints([n])[0]

    lo, hi, _, above = search_threshold(
        lambda th: count(scores, th, scratch, allowed),
        k,
        lo_count=total,
        stop_below=min(chunk_numel, int(total * compact_fraction)),
    )
    if hi - lo > 1:  # finish on the few undecided entries
        cand = _candidates(scores, lo, hi, chunk_numel, allowed)
        lo, hi, _, cand_above = search_threshold(
            lambda th: count(cand, th), k - above, lo, hi
        )
        above += cand_above
    t = lo
    remaining = k - above  # ties at t to take, in (tensor, rank, flat index) order

    def ties_of(bits: torch.Tensor) -> torch.Tensor:
        buf = scratch(bits)
        if t > 0 or allowed is not None:  # masked chunks: allowed zeros are 0, the others -1
            return torch.eq(bits, t, out=buf)
        return torch.le(bits, 0, out=buf)

    # Ties per tensor on every rank, then this rank's quota of each tensor's ties.
    quota = [0] * len(scores)
    if remaining:
        local_ties = [0] * len(scores)
        for i, _, bits in _bit_chunks(scores, chunk_numel, allowed):
            local_ties[i] += int(torch.count_nonzero(ties_of(bits)))
        per_rank = collective.gather_ints(local_ties)
        if any(len(r) != len(scores) for r in per_rank):
            raise ValueError("Sharded top-k needs the same number of score tensors on every rank.")
        for i in range(len(scores)):
            for r, ties in enumerate(per_rank):
                take = min(remaining, ties[i])
                if r == collective.rank:
                    quota[i] = take
                remaining -= take
    if remaining != 0:  # cannot happen for valid input; guards against NaN/concurrent writes
        raise RuntimeError(f"top-k selection left {remaining} ties unfilled; scores contain NaN?")
    flat_masks = [m.view(-1) for m in masks]
    for i, start, bits in _bit_chunks(scores, chunk_numel, allowed):
        out = flat_masks[i][start : start + bits.numel()]
        torch.gt(bits, t, out=out)
        if quota[i] == 0:
            continue
        ties = ties_of(bits)
        n_ties = int(torch.count_nonzero(ties))
        if n_ties > quota[i]:
            ties = ties & (ties.cumsum(0, dtype=torch.int64) <= quota[i])
            n_ties = quota[i]
        out |= ties
        quota[i] -= n_ties
    return masks


def capped_topk_masks(
    scores: Sequence[torch.Tensor],
    k: int,
    union: Sequence[torch.Tensor],
    cap: int,
    chunk_numel: int = DEFAULT_CHUNK_NUMEL,
    compact_fraction: float = 1 / 32,
    collective: Collective = LOCAL,
) -> list[torch.Tensor]:
    """The k largest ``scores`` such that ``union`` grown by them holds at most ``cap`` entries.

    With u = |union| (over all ranks) and room = cap − u: if room >= k the plain top-k (it adds
    at most k entries); otherwise only the ``room`` best entries outside the union may enter
    (an exact top-``room`` among them), every other entry outside is excluded, and the exact
    top-k is taken over the union and those. So the union never exceeds ``cap`` and exactly k
    entries are selected; once the union is full (room = 0) every mask lies inside it. Both
    top-k passes are :func:`topk_masks` with ``allowed`` masks, so the sharded path sums the
    same counts over the ranks.

    Args:
        scores: As :func:`topk_masks`.
        k: Entries to select.
        union: Bool masks shaped like ``scores``: the entries selected so far.
        cap: Largest union allowed, ``k <= cap``.

    Returns:
        One bool mask per score tensor, exactly k True over all ranks.
    """
    if len(union) != len(scores):
        raise ValueError(f"Expected {len(scores)} union masks, got {len(union)}.")
    u = collective.sum_ints([sum(int(torch.count_nonzero(m)) for m in union)])[0]
    if not k <= cap or u > cap:
        raise ValueError(f"Need k <= cap and |union| <= cap, got k={k}, cap={cap}, |union|={u}.")
    room = cap - u
    kw: dict[str, Any] = dict(
        chunk_numel=chunk_numel, compact_fraction=compact_fraction, collective=collective
    )
    if room >= k:
        return topk_masks(scores, k, **kw)
    allowed = [m.clone() for m in union]
    if room > 0:
        entering = topk_masks(scores, room, allowed=[~m for m in union], **kw)
        for a, e in zip(allowed, entering):
            a |= e
    return topk_masks(scores, k, allowed=allowed, **kw)


# --- data parallelism ---------------------------------------------------------------------------


def distributed_ready() -> bool:
    """Whether a default process group is initialised (and has more than one rank)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_mask(
    masks: Sequence[torch.Tensor], src: int = 0, group: Any = None
) -> list[torch.Tensor]:
    """Overwrite every rank's bool masks in place with rank ``src``'s (no-op without a group).

    Costs one byte per entry per call, so per-step use on a large backbone is not free; with
    all-reduced gradients and a shared noise seed the masks agree without it.
    """
    if not distributed_ready():
        return list(masks)
    for m in masks:
        if m.dtype != torch.bool or not m.is_contiguous():
            raise ValueError("broadcast_mask needs contiguous bool masks.")
        dist.broadcast(m.view(torch.uint8), src=src, group=group)
    return list(masks)


def all_reduce_mean_(tensors: Sequence[torch.Tensor], group: Any = None) -> None:
    """Average float tensors in place over ranks (no-op without a process group)."""
    if not distributed_ready():
        return
    world = dist.get_world_size(group)
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        t.div_(world)


# --- sparse-safe AdamW --------------------------------------------------------------------------


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW that updates only the selected entries of masked parameters.

    For a parameter with a current bool mask M (same shape), each step touches only entries in
    M: their first/second moments, their decoupled weight decay and their step counts. Entries
    outside M keep their moments untouched and do not move at all: no stale-momentum drift, no
    decay. Bias correction is per entry: an entry selected for the c-th time uses
    ``1 − β1^c`` and ``1 − β2^c`` (the per-entry counts live in ``state["step"]`` as an int32
    tensor shaped like the parameter; the key ``step`` is exempt from the dtype cast of
    ``load_state_dict``, so the counts survive checkpoints). Parameters without a mask (heads,
    added modules) get plain AdamW (scalar ``state["step"]``), matching ``torch.optim.AdamW``.

    With ``dense=True`` every parameter gets plain AdamW on its gradient with entries outside the
    mask zeroed — the released code's behaviour, where momentum and weight decay still move
    unselected entries. Kept for reproduction and for the tests that show the pitfall.

    Masks come from ``mask_of(param)`` (called at every step; None = no mask) or, when that is
    not given, from :meth:`set_masks`.

    Args:
        params: Parameters or parameter groups.
        lr, betas, eps, weight_decay: As ``torch.optim.AdamW``.
        dense: Released-code behaviour (see above).
        mask_of: ``param -> bool mask or None``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        dense: bool = False,
        mask_of: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(
                f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}."
            )
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}.")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.dense = dense
        #: ``param -> bool mask or None``; may be set after construction.
        self.mask_of = mask_of
        self._masks: dict[int, torch.Tensor] = {}

    def set_masks(self, masks: Mapping[torch.Tensor, torch.Tensor | None]) -> None:
        """Masks by parameter (used when no ``mask_of`` was given); None removes a mask."""
        for p, m in masks.items():
            if m is None:
                self._masks.pop(id(p), None)
            else:
                if m.shape != local_tensor(p).shape or m.dtype != torch.bool:
                    raise ValueError(
                        f"Mask {tuple(m.shape)} {m.dtype} does not fit parameter "
                        f"{tuple(p.shape)}."
                    )
                self._masks[id(p)] = m

    def mask_for(self, p: torch.Tensor) -> torch.Tensor | None:
        return self.mask_of(p) if self.mask_of is not None else self._masks.get(id(p))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MaskedAdamW does not support sparse gradients.")
                mask = self.mask_for(p)
                state = self.state[p]
                if not self.dense and (mask is not None or _has_entry_steps(state)):
                    if mask is None:  # a parameter that had a mask and lost it: all entries
                        mask = torch.ones_like(local_tensor(p), dtype=torch.bool)
                    self._sparse_update(p, mask, state, group)
                else:
                    grad = local_tensor(p.grad)
                    grad = grad if mask is None else grad.masked_fill(~mask, 0)
                    self._dense_update(p, grad, state, group)
        return loss

    @staticmethod
    def _dense_update(
        p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> None:
        """Plain AdamW (decoupled weight decay), as torch's single-tensor implementation.
        ``grad`` is the local gradient (the shard's, for a DTensor parameter)."""
        lr, (beta1, beta2) = group["lr"], group["betas"]
        eps, wd = group["eps"], group["weight_decay"]
        if not state:  # state shaped (and, under FSDP2, sharded) like the parameter
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        t = float(state["step"])
        exp_avg, exp_avg_sq = local_tensor(state["exp_avg"]), local_tensor(state["exp_avg_sq"])
        p = local_tensor(p)
        p.mul_(1 - lr * wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**t
        bias_correction2_sqrt = math.sqrt(1 - beta2**t)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)

    @staticmethod
    def _sparse_update(
        p: torch.Tensor, mask: torch.Tensor, state: dict[str, Any], group: dict[str, Any]
    ) -> None:
        """AdamW on the entries of ``mask`` only (gather, update, scatter back). For a DTensor
        parameter (FSDP2) ``mask`` is its local shard's and the update is local."""
        lr, (beta1, beta2) = group["lr"], group["betas"]
        eps, wd = group["eps"], group["weight_decay"]
        if not state:  # state shaped (and, under FSDP2, sharded) like the parameter
            state["step"] = torch.zeros_like(p, dtype=torch.int32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        elif not _has_entry_steps(state):
            raise RuntimeError(
                "A parameter updated densely before cannot switch to masked updates "
                "(its step count is not per entry); give it a mask from the first step."
            )
        grad, p = local_tensor(p.grad), local_tensor(p)
        if mask.shape != p.shape:
            raise ValueError(f"Mask {tuple(mask.shape)} does not fit parameter {tuple(p.shape)}.")
        if not p.is_contiguous():
            raise ValueError("MaskedAdamW needs contiguous parameters for masked updates.")
        idx = mask.reshape(-1).nonzero().squeeze(1)  # (k_p,) int64 flat indices
        if idx.numel() == 0:
            return
        flat_p, flat_g = p.view(-1), grad.reshape(-1)
        flat_step = local_tensor(state["step"]).view(-1)
        flat_m = local_tensor(state["exp_avg"]).view(-1)
        flat_v = local_tensor(state["exp_avg_sq"]).view(-1)

        g = flat_g.index_select(0, idx).to(flat_m.dtype)
        count = flat_step.index_select(0, idx) + 1
        flat_step.index_copy_(0, idx, count)
        m = flat_m.index_select(0, idx).lerp_(g, 1 - beta1)
        v = flat_v.index_select(0, idx).mul_(beta2).addcmul_(g, g, value=1 - beta2)
        flat_m.index_copy_(0, idx, m)
        flat_v.index_copy_(0, idx, v)

        x = flat_p.index_select(0, idx)
        adamw_entries_([x], [m], [v], [count], lr=lr, betas=(beta1, beta2), eps=eps,
                       weight_decay=wd)
        flat_p.index_copy_(0, idx, x)


def adamw_entries_(
    x: Sequence[torch.Tensor],
    exp_avg: Sequence[torch.Tensor],
    exp_avg_sq: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """AdamW's parameter update of gathered entries, in place, with per-entry bias correction:
    x ← x(1 − lr·wd) − lr · (m / (1 − β1^t)) / (√(v / (1 − β2^t)) + eps).

    Each argument lists one tensor per parameter (several parameters' entries at once: one
    ``torch._foreach_*`` op per term, the same arithmetic as tensor by tensor).

    Args:
        x: ``(n_i,)`` the entries' values (float32).
        exp_avg, exp_avg_sq: ``(n_i,)`` their moments, already updated with this step's gradient.
        steps: ``(n_i,)`` integer Adam step count t of each entry, this step included.
    """
    if not x:
        return
    beta1, beta2 = betas
    c = [t.to(torch.float32) for t in steps]
    bias_correction1 = torch._foreach_pow(beta1, c)  # 1 − β1^t, as 1 + (−β1^t)
    torch._foreach_neg_(bias_correction1)
    torch._foreach_add_(bias_correction1, 1.0)
    bias_correction2_sqrt = torch._foreach_pow(beta2, c)
    torch._foreach_neg_(bias_correction2_sqrt)
    torch._foreach_add_(bias_correction2_sqrt, 1.0)
    torch._foreach_sqrt_(bias_correction2_sqrt)
    torch._foreach_mul_(list(x), 1 - lr * weight_decay)
    denom = torch._foreach_sqrt(list(exp_avg_sq))
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    step = torch._foreach_div(list(exp_avg), bias_correction1)
    torch._foreach_addcdiv_(list(x), step, denom, value=-lr)


def _has_entry_steps(state: dict[str, Any]) -> bool:
    step = state.get("step")
    return isinstance(step, torch.Tensor) and step.dim() > 0
