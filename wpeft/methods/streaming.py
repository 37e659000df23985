"""SFAS's global top-k selected one gradient at a time, during backward.

The dense refresh of SFAS (``SFAS.after_backward`` with :class:`~wpeft.methods.sfas.EntrySelection`)
needs every backbone gradient alive at once: importance F (g² or |g|) of all entries, their global
max M, the perturbed score F̃ = perturb(F / M) and one exact top-k over everything. Here each
tensor's gradient is scored as soon as backward produces it (e.g. from a
``register_post_accumulate_grad_hook``), a few candidates are kept as
``(position, F, U, g)`` and the caller frees the gradient at once. The selection is the same
function of the gradients as the dense path's (same importance helper, same draws U of
:class:`~wpeft.methods.noise.TensorNoise`, same float32 arithmetic), made on the candidates only.

What makes it cheap. Each tensor's draws U are defined so that the *large* ones, the set Z of
entries with U >= 1 − c (about 2k entries over all tensors), are drawn without touching the
others, and every other draw is at most ``ceiling`` = fl32(1 − c). An entry outside Z with
importance F therefore scores at most F/M + a·ceiling (additive, a = γ(1 − n_s/t_s)), F/M·ceiling
(multiplicative) or F/M (none). With a threshold τ carried over from the last refresh, the
entries outside Z that can still reach τ are those with F >= F_thr, where F_thr is τ solved for F
(with the estimate M_est of M below, and a slack: entries within a factor ``_SLACK`` of F_thr
pass too, as gradients change between refreshes). Per tensor, :meth:`StreamingTopK.add` costs:

* Σg² (the records' gradient norm, as the dense path takes it) and the min and max of g per
  block of 256 entries (``amin``/``amax``): the tensor's largest importance (F is monotone in
  |g|), which raises the running max M_run, and which blocks hold an entry reaching F_thr;
* only in those blocks (few: Fisher information is heavy-tailed), a comparison |g| >= √F_thr
  (or F_thr for |g|); a tensor without such a block costs nothing more over its entries;
* gathering g at Z and at the entries found, which wait (with the small tensors below) to be
  scored in one batch at :meth:`finish` or when a million entries wait: there, with additive
  noise, each entry found is held to its own draw U (hashed by position and its tensor's key):
  it needs F >= max(F_thr, s·M_est·(τ − a·U)) with a smaller slack s = ``_DRAW_SLACK`` (F_thr
  and M_est as they stand then: at least what they were at :meth:`add`). When the noise
  dominates the scores (early in the annealing τ sits just above a·ceiling and F_thr is tiny)
  this keeps a few in a hundred of them. One batch costs the same few operations for 40 or 200
  tensors; tensor by tensor they were most of a refresh's time.

Tensors of at most ``small_numel`` entries (norms, biases: most tensors of a backbone, a small
share of its entries) are copied aside whole instead and scored in the same batches by the same
rule (importance against F_thr, Z always); their draws are read by position and per-tensor key
at once.

Why it is right. Every entry of Z becomes a candidate, so the candidates always number >= k (Σ|Z| is checked at :meth:`begin`; in the astronomically rare
refresh where it is below k every entry becomes a candidate). An entry dropped by the
threshold has F < F_thr (or, in a tensor with no block reaching F_thr, at most the tensor's
largest F), so its true score is at most ``perturb(F / M)`` of that F with U at the ceiling;
:meth:`finish` turns the largest such F into a bound with the final M. An entry dropped for its
own draw has F below max(F_thr, s·M_est·(τ − a·U)), so its score F/M + a·U is below the larger
of that bound's values at U = 0 and U = ceiling at the final M: both are bounded. Candidates past the
pool's limit are pruned: first those beaten by k others at any M (no bound needed), then, if
the pool is still large, by their keys at the running max; a key prune leaves a bound on what
it cut as a function of the final M (the upper envelope of their scores, one line each in
1/M). :meth:`finish` recomputes the true scores of the candidates exactly as the dense
path does, takes their exact top-k (ties in tensor order, then flat index, as the dense
path's :func:`~wpeft.methods.fisher.topk_masks`) and calls the result ``exact`` when the k-th
selected score is strictly above every bound: then no dropped entry can be in the dense top-k,
so the two selections are equal. Otherwise (rare) it is still exactly k entries, the best among
the candidates.

The threshold. After a refresh τ is the true score at rank min(B, candidates) (B the pool budget
below), or, for additive noise, the rank-B value of a·U over Z if that is larger (a prune may
have dropped entries of Z, and every score in Z is at least a·U): below the k-th (the +64 in B
keeps small selections clear of the rank noise between steps) and, at real sizes, inside the
band of Z's scores (|Z| ≈ 2k > B ≈ 1.5k); halved when the refresh was not exact because of the
threshold's drops. At the next :meth:`begin`, for additive noise, it follows the fall of the
factor a since then: a score F/M + a·U falls by at most the drop of a and to at least its
a_new/a_old share, so τ becomes the larger of the two (and not below the rank-B value of F/M
among the candidates, as every additive score is at least F/M). At the first refresh it is
the rank-B value of a·U over Z with additive noise (nothing else is known yet; the ranks
of Z are read from a sample of 65,536 of its draws), and 0 otherwise
(every entry a candidate). M_est = max(M_run, M_floor / 2) with M_floor a floor of the recent
refreshes' M (the last M, or 1.5x the previous floor if that is lower): the first tensors of a
backward pass then do not pass wholesale for want of a running max. The bound stays a bound
whatever M turns out to be, but it is only tight (the refresh proven exact) when M >= M_est: the
max of a gradient is spiky (10-50x up and down between steps while a prompt trains), and a floor
follows its low level where the last M did not. After a key prune the threshold also rises to
the importance an entry outside Z needs to reach the smallest key kept: an entry below it could
not survive the next prune. The prunes rely on M >= M_est (their keys and bounds are taken
there); a refresh whose final M is below the M_est a prune used is not called exact.

Pool. Candidates are held between calls up to a limit; B = min(N, ceil(oversample·k) + 64) is
the budget. When the pool passes 3B it is pruned: first safely
(:meth:`StreamingTopK._prune_safely`, with additive noise: only entries that cannot be in the
top-k at any final M go), then, if more than 4B remain, by keys to the best B. After a safe
prune the next runs when the pool has grown by B more, so at most about 5B candidates are
held. :meth:`finish` selects from what is held (one selection, no sort of the pool). Nothing
of size N is allocated: per tensor the block extremes (n/128 numbers), the compared blocks and
the gathered candidates; a whole tensor becomes candidates only at the first refresh (τ = 0) or
with NaN/inf gradients, then chunk by chunk. """

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from wpeft.errors import ConfigError
from wpeft.methods.fisher import add_importance_, anneal_factor
from wpeft.methods.noise import (
    EXCEEDANCE_PER_SELECTED,
    TensorNoise,
    draws_at,
    draws_outside_z,
    exceedance_fraction,
    z_on_one_axis,
)

__all__ = ["StreamedSelection", "StreamingTopK"]

_FLOAT32_MAX = torch.finfo(torch.float32).max
_FLOAT32_TINY = torch.finfo(torch.float32).tiny
_MAX_OVERSAMPLE = EXCEEDANCE_PER_SELECTED - 0.5
_SLACK = 0.5
#: The slack of the per-draw rule (:meth:`StreamingTopK._held_to_draws`): an entry outside Z needs
#: F >= max(F_thr, _DRAW_SLACK·M_est·(τ − a·U)). Its U = 0 end bounds what it drops by
#: _DRAW_SLACK·M_est·τ / M: below the k-th score (≈ τ) unless M falls ~16x below M_est.
_DRAW_SLACK = 1 / 16
_CHUNK = 1 << 20  # entries per part when a whole tensor becomes candidates
_BLOCK = 256  # entries per block of the blockwise max |g|
_GRID = 12  # points 1/M_est, 1/(2 M_est), ... of a key prune's bound (and 1/M = 0)


@dataclass
class StreamedSelection:
    """The exact-k selection of one refresh, as sparse per-tensor indices.

    Attributes:
        indices: Per tensor, ``(k_t,)`` int64 strictly increasing flat indices; Σ k_t == k.
        values: Per tensor, ``(k_t,)`` float32: the gradient g at those indices.
        square_sums: ``(T,)`` float64: Σ g² over all entries of each tensor (NaN unless
            asked for at :meth:`StreamingTopK.begin`), the float32 norm
            squared as the dense records take it (NaN/inf gradients give NaN/inf here: the
            records show them).
        max_importance: M, the global max of the importance F this step.
        candidates: Entries kept as candidates over all tensors for the final top-k.
        exact: True when proven equal to the dense top-k (k-th selected score > every bound).
    """

    indices: list[torch.Tensor]
    values: list[torch.Tensor]
    square_sums: torch.Tensor
    max_importance: float
    candidates: int
    exact: bool


@dataclass
class _Pool:
    """Candidates, concatenated: ``pos`` (c,) int64 global position (offset of the tensor + flat
    index), ``F``/``U``/``g`` (c,) float32 (``U`` None without noise draws)."""

    pos: torch.Tensor
    F: torch.Tensor
    U: torch.Tensor | None
    g: torch.Tensor

    @staticmethod
    def cat(parts: Sequence[_Pool]) -> _Pool:
        if len(parts) == 1:  # one part: itself, not a copy (no field is changed in place)
            return parts[0]
        return _Pool(
            torch.cat([p.pos for p in parts]),
            torch.cat([p.F for p in parts]),
            None if parts[0].U is None else torch.cat([p.U for p in parts]),  # type: ignore[misc]
            torch.cat([p.g for p in parts]),
        )

    def take(self, where: torch.Tensor | slice) -> _Pool:
        if isinstance(where, torch.Tensor) and where.dtype == torch.bool:
            where = torch.nonzero(where).squeeze(1)  # once, not once per field
        return _Pool(
            self.pos[where],
            self.F[where],
            None if self.U is None else self.U[where],
            self.g[where],
        )

    def __len__(self) -> int:
        return self.pos.numel()


def _top_m(
    key: torch.Tensor, m: int, order: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """The m largest of a 1-D ``key`` (1 <= m; no sort: one selection).

    Ties at the cut are taken in index order, or in increasing ``order`` ((n,) int64, distinct)
    when given.

    Returns:
        A ``(n,)`` bool mask with exactly min(m, n) True, and the smallest key selected.
    """
    n = key.numel()
    if m >= n:
        return torch.ones(n, dtype=torch.bool, device=key.device), float(key.min())
    cut = torch.kthvalue(key, n - m + 1).values  # the m-th largest
    mask = key > cut
    ties = torch.nonzero(key == cut).squeeze(1)
    need = m - int(torch.count_nonzero(mask))
    if ties.numel() > need and order is not None:  # the (m+1)-th largest is a tie at the cut
        ties = ties[torch.argsort(order[ties])]
    mask[ties[:need]] = True
    return mask, float(cut)


def _block_ends(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of a 1-D ``g`` per block of ``_BLOCK`` entries (the last may be shorter):
    two ``(ceil(n / _BLOCK),)`` tensors."""
    full = g.numel() // _BLOCK * _BLOCK
    blocks = g[:full].view(-1, _BLOCK)
    lo, hi = blocks.amin(1), blocks.amax(1)  # 4x faster than aminmax(dim=1) on a CPU
    if full < g.numel():
        t_lo, t_hi = torch.aminmax(g[full:])
        lo, hi = torch.cat([lo, t_lo.reshape(1)]), torch.cat([hi, t_hi.reshape(1)])
    return lo, hi


def _member(x: torch.Tensor, sorted_set: torch.Tensor) -> torch.Tensor:
    """(len(x),) bool: which entries of ``x`` lie in the strictly increasing ``sorted_set``."""
    if sorted_set.numel() == 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    idx = torch.searchsorted(sorted_set, x).clamp_(max=sorted_set.numel() - 1)
    return sorted_set[idx] == x


def _kth_largest(x: torch.Tensor, r: int, sample: int = 1 << 16) -> float:
    """The r-th largest entry of a 1-D ``x`` (1 <= r <= x.numel()), estimated from every s-th
    entry when ``x`` holds more than ``sample`` (s = len(x) // sample; deterministic)."""
    stride = max(1, x.numel() // sample)
    y = x[::stride]
    rank = min(y.numel(), max(1, round(r / stride)))
    return float(torch.kthvalue(y, y.numel() - rank + 1).values)


def _square_sum(g: torch.Tensor) -> torch.Tensor:
    """Σ g² of a 1-D ``g`` as the dense path's records take it: the float32 L2 norm, squared in
    float64 (0-d)."""
    return torch.linalg.vector_norm(g.float()).double().square()


class StreamingTopK:
    """SFAS's exact global top-k, fed one gradient at a time (see the module docstring).

    Usage per refresh: :meth:`begin`, then :meth:`add` once per tensor in any order (e.g. from
    post-accumulate-grad hooks; free each gradient after), then :meth:`finish`.

    Args:
        shapes: Shape of each eligible tensor, in the dense path's order (tensor ``i`` draws the
            noise of index ``i``).
        k: Entries to select, in [1, N] (N = total entries).
        importance: ``"fisher"`` (g²) or ``"abs_grad"`` (|g|).
        noise: ``"additive"``, ``"multiplicative"`` or ``"none"`` (as :func:`perturb_`).
        gamma: Noise scale γ (>= 0).
        seed: Noise seed (as :class:`~wpeft.methods.noise.TensorNoise`).
        oversample: Candidate budget over k, in [1, 1.5]: B = min(N, ceil(oversample·k) + 64);
            τ sits at rank B, inside the ~2k large draws.
        small_numel: Tensors of at most this many entries (norms, biases) are scored together in
            batches (fewer small operations). 0: none.
    """

    #: A prune runs when the pool passes this many B (or, after a
    #: prune that left more than that, its size then plus B).
    prune_at: ClassVar[int] = 3
    #: A safe prune (:meth:`_prune_safely`) that leaves more than this many B is followed by the
    #: key prune to the best B: the pool stays O(k) however M moves.
    hold_at: ClassVar[int] = 4

    def __init__(
        self,
        shapes: Sequence[torch.Size],
        k: int,
        *,
        importance: str = "fisher",
        noise: str = "additive",
        gamma: float = 0.2,
        seed: int = 0,
        oversample: float = 1.5,
        small_numel: int = 1 << 14,
    ) -> None:
        self.shapes = [torch.Size(s) for s in shapes]
        self.numels = [s.numel() for s in self.shapes]
        total = sum(self.numels)
        if not 1 <= k <= total:
            raise ConfigError(
                f"k={k} is outside [1, {total}] (the entries of the {len(self.shapes)} tensors); "
                "give a k in that range (keep_ratio · total, at least 1)."
            )
        if importance not in ("fisher", "abs_grad"):
            raise ConfigError(f"importance must be 'fisher' or 'abs_grad', got {importance!r}.")
        if noise not in ("additive", "multiplicative", "none"):
            raise ConfigError(
                f"noise must be 'additive', 'multiplicative' or 'none', got {noise!r}."
            )
        if not gamma >= 0:
            raise ConfigError(f"gamma must be >= 0, got {gamma!r}.")
        if not 1 <= oversample <= _MAX_OVERSAMPLE:
            raise ConfigError(
                f"oversample must be in [1, {_MAX_OVERSAMPLE}] (candidates per selected entry; "
                f"the threshold's rank must stay inside the ~2k large draws), got {oversample!r}."
            )
        self.k, self.importance, self.noise = k, importance, noise
        self.gamma, self.seed, self.oversample = gamma, seed, oversample
        self.small_numel = small_numel
        self.total = total
        #: Exceedance fraction c of the draws (:func:`~wpeft.methods.noise.exceedance_fraction`).
        self.fraction = exceedance_fraction(k, total)
        #: Candidates held at most after a prune.
        self.budget = min(total, math.ceil(oversample * k) + 64)
        self.offsets = [0]
        for n in self.numels[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        self._offsets = torch.tensor(self.offsets, dtype=torch.int64)
        # Carried from the last refresh: a score, the same rank of F/M, the noise factor, M.
        self._tau_score, self._tau_importance, self._tau_factor = 0.0, 0.0, 0.0
        self._m_floor = 0.0
        #: The threshold τ of this refresh (before the rise after a prune, see :meth:`add`).
        self.tau = 0.0
        self._step: int | None = None

    def pool_entries(self) -> int:
        """The most candidates held at once during a refresh: the pool at its limit
        (``hold_at`` + 1)·B and one part being added (``_CHUNK``). A prune briefly holds a
        second copy of them; :meth:`pool_bytes` counts both."""
        return min(self.total, (self.hold_at + 1) * self.budget + _CHUNK)

    def pool_bytes(self) -> int:
        """Bytes of the candidate pool at its largest, twice (a prune concatenates it): per
        candidate an int64 position and float32 F, U and g."""
        return 2 * (8 + 4 + 4 + 4) * self.pool_entries()

    # --- one refresh ----------------------------------------------------------------------------

    def begin(self, step: int, total_steps: int, *, square_sums: bool = True) -> None:
        """Start a refresh at 0-based optimiser ``step`` (discards one left unfinished): sets τ
        and draws every tensor's large draws Z. ``square_sums``: take each gradient's Σg² (a
        pass over it; the records read them) or leave them NaN."""
        self.factor = anneal_factor(step, total_steps, self.gamma)
        self._draws = self.noise == "multiplicative" or (
            self.noise == "additive" and self.factor != 0.0
        )
        tau = self._tau_score
        if self.noise == "additive" and self.factor < self._tau_factor:
            # a score F/M + a·U falls by at most the drop of a, to at least its a_new/a_old
            # share (F/M >= 0), and stays at least F/M
            drop = self._tau_factor - self.factor
            tau = max(tau - drop, tau * self.factor / self._tau_factor, self._tau_importance)
        self.tau = max(0.0, tau)
        self._step = step
        self._noise, self._z_all = TensorNoise.draw_all_on_one_axis(
            self.seed, step, self.numels, self.fraction
        )
        self._keys = torch.tensor([z.key for z in self._noise], dtype=torch.int64)
        # Z guarantees >= k candidates; if it is short (never at real sizes), take every entry
        self._everything = sum(z.positions.numel() for z in self._noise) < self.k
        self._draw_ranks: dict[int, float | None] = {}  # see _draw_at_rank
        if self._tau_score == 0.0 and self.noise == "additive" and self._draws:
            # nothing carried (the first refresh): every score in Z is at least a·U, so the
            # rank-B a·U over Z is a τ already (without it every entry would be a candidate)
            u_b = self._draw_at_rank(self.budget)
            if u_b is not None:
                self.tau = self.factor * u_b
        self._added = [False] * len(self.shapes)
        self._sq: list[torch.Tensor | None] = [None] * len(self.shapes)
        self._want_sq = square_sums
        self._m_run: torch.Tensor | None = None
        self._parts: list[_Pool] = []
        self._loose = 0  # candidates held
        self._limit = self.prune_at * self.budget  # a prune runs when _loose passes it
        self._envelopes: list[tuple[torch.Tensor, torch.Tensor]] = []  # of the key prunes
        self._m_assumed = 0.0  # the largest M_est a prune relied on (M >= it)
        self._dropped = -math.inf  # the largest importance F of a dropped entry (a bound)
        # additive noise: F of an entry dropped by its own draw U is below (1 − t)·this + t·F_thr
        # at t = U / ceiling (this: F_thr at U = 0); see _held_to_draws
        self._dropped_at_zero = -math.inf
        self._cut_importance = 0.0  # F below which an entry outside Z misses the last key prune
        self._small: list[tuple[int, torch.Tensor]] = []  # (index, g) whole, float32
        # large tensors: (index, g at Z, the entries found or None, g at them or None)
        self._waiting: list[
            tuple[int, torch.Tensor, torch.Tensor | None, torch.Tensor | None]
        ] = []
        self._waiting_entries = 0

    def _draw_at_rank(self, rank: int) -> float | None:
        """The rank-th largest draw U over this refresh's Z (read from a sample, as
        :func:`_kth_largest`), None when Z holds fewer; made once per refresh and rank (the
        first refresh asks at :meth:`begin` and at :meth:`finish`)."""
        if rank not in self._draw_ranks:
            u = torch.cat([z.values for z in self._noise])
            self._draw_ranks[rank] = _kth_largest(u, rank) if u.numel() >= rank else None
        return self._draw_ranks[rank]

    def _importance(self, g: torch.Tensor) -> torch.Tensor:
        """F of ``g`` ((n,) any float dtype) as the dense accumulator makes it: (n,) float32,
        NaN -> 0, +inf -> float32 max (one batch: the mean is the value itself)."""
        F = torch.zeros(g.shape, dtype=torch.float32, device=g.device)
        add_importance_(F, g, self.importance)  # type: ignore[arg-type]
        return torch.nan_to_num_(F, nan=0.0, posinf=_FLOAT32_MAX)

    def _score(
        self, F: torch.Tensor, top: torch.Tensor, U: torch.Tensor | None, inplace: bool = False
    ) -> torch.Tensor:
        """perturb(F / max(top, tiny)) with the dense path's float32 ops (in ``F`` if
        ``inplace``, else a new tensor)."""
        divisor = top.clamp_min(_FLOAT32_TINY)
        s = F.div_(divisor) if inplace else F / divisor
        if U is not None:
            if self.noise == "additive":
                s.add_(U, alpha=self.factor)
            else:
                s.mul_(U)
        return s

    def _ceiling_term(self, x: float, ceiling: float) -> float:
        """The largest score of an entry outside Z with F/M = ``x`` (real arithmetic)."""
        if not self._draws:
            return x
        return x + self.factor * ceiling if self.noise == "additive" else x * ceiling

    def _threshold(self, ceiling: float) -> float:
        """F_thr: an entry outside Z with importance below it cannot reach τ (given M >= M_est),
        times ``_SLACK`` (gradients change between refreshes: entries within that factor of
        reaching the last refresh's τ stay candidates)."""
        return max(
            _SLACK * self._importance_at(self.tau, ceiling) * self._m_est, self._cut_importance
        )

    @property
    def _m_est(self) -> float:
        """M_est = max(M_run, M_floor / 2) as a Python float (no assumption recorded)."""
        assert self._m_run is not None
        return max(float(self._m_run), _FLOAT32_TINY, 0.5 * self._m_floor)

    def _importance_at(self, score: float, ceiling: float) -> float:
        """F/M an entry outside Z needs to score ``score`` (U at the ``ceiling``)."""
        if not self._draws:
            return score
        if self.noise == "additive":
            return score - self.factor * ceiling
        return score / ceiling if ceiling > 0 else 0.0

    def _m_assume(self) -> torch.Tensor:
        """M_est (:attr:`_m_est`) as a float32 0-d tensor, for a prune about to rely on
        M >= M_est: :meth:`finish` calls the refresh exact only if it holds."""
        assert self._m_run is not None
        m_est = torch.tensor(self._m_est, dtype=torch.float32, device=self._m_run.device)
        self._m_assumed = max(self._m_assumed, float(m_est))
        return m_est

    def _cutoff(self, threshold: float) -> float:
        """|g| below which an entry's importance is below ``threshold`` (> 0), a little low: the
        margin covers the rounding of g² and of the cutoff in g's dtype."""
        t = math.sqrt(threshold) if self.importance == "fisher" else threshold
        return t * (1 - 2.0**-6)

    def add(self, index: int, grad: torch.Tensor) -> None:
        """Score tensor ``index``'s gradient and keep its candidates (see the module docstring).

        Args:
            index: Position of the tensor in ``shapes``.
            grad: Its gradient, shaped like the tensor (any float dtype). Not referenced after
                the call: the caller may free it.
        """
        if self._step is None:
            raise RuntimeError(f"add({index}) before begin(): call begin(step, total_steps) first.")
        if not 0 <= index < len(self.shapes):
            raise ValueError(f"Tensor index {index} is out of range [0, {len(self.shapes)}).")
        if self._added[index]:
            raise RuntimeError(
                f"Tensor {index} was already added in this refresh (step {self._step}); add each "
                "tensor once between begin() and finish()."
            )
        if grad.shape != self.shapes[index]:
            raise ValueError(
                f"Gradient of tensor {index} has shape {tuple(grad.shape)}, expected "
                f"{tuple(self.shapes[index])}."
            )
        n = self.numels[index]
        g = grad.detach().reshape(-1)
        self._added[index] = True
        if self._want_sq:
            self._sq[index] = _square_sum(g)
        if n == 0:
            return
        if n <= self.small_numel:  # scored with the other small tensors at once
            self._small.append((index, g.to(torch.float32, copy=True)))
            self._wait(n)
            return
        noise = self._noise_on(index, g.device)
        everything, top = self._everything, None
        if not everything:
            lo, hi = _block_ends(g)  # F is monotone in |g|: a block's max F is at an end
            size = torch.maximum(hi, -lo)  # (blocks,) max |g| per block
            largest = size.max()
            if math.isfinite(float(largest)):  # NaN and inf reach the max
                top = self._importance(largest.reshape(1))[0]
                self._m_run = top if self._m_run is None else torch.maximum(self._m_run, top)
                threshold = self._threshold(noise.ceiling)
                everything = not threshold > 0  # nothing can be dropped
            else:
                everything = True  # NaN/inf: every entry, F mapped as the dense path maps it
        if everything:  # chunk by chunk, pruning as the pool fills
            for start in range(0, n, _CHUNK):
                where = torch.arange(start, min(n, start + _CHUNK), device=g.device)
                U = noise.span(start, where.numel()) if self._draws else None
                self._append(index, g, where, U)
            return
        # Z (every entry a candidate) and the entries outside it found in the blocks whose
        # largest |g| reaches F_thr wait, with g read at them, to be held to their draws in one
        # batch with the other waiting tensors' (_flush_found)
        found = self._found(g, size, threshold)
        # what was dropped scores at most F_thr, or the tensor's top if no block reached it
        self._dropped = max(self._dropped, float(top) if found is None else threshold)
        g_found = None if found is None else g[found].to(torch.float32)
        self._waiting.append((index, g[noise.positions].to(torch.float32), found, g_found))
        self._wait(noise.positions.numel() + (0 if found is None else found.numel()))

    def _wait(self, entries: int) -> None:
        """Count ``entries`` more waiting (small tensors, large tensors' Z and found entries);
        score them all once a million wait."""
        self._waiting_entries += entries
        if self._waiting_entries >= _CHUNK:
            self._flush()

    def _flush(self) -> None:
        """Score everything waiting: the small tensors (:meth:`_flush_small`) and the large
        tensors' Z and found entries (:meth:`_flush_found`)."""
        self._flush_small()
        self._flush_found()
        self._waiting_entries = 0

    def _found(self, g: torch.Tensor, size: torch.Tensor, threshold: float) -> torch.Tensor | None:
        """The entries of ``g`` whose |g| reaches ``threshold`` (F_thr, taken with U at the
        ceiling): ``(p,)`` int64 flat indices, increasing; None when no block of ``g`` reaches
        it (every entry outside Z is then dropped). Searched only in the blocks whose largest
        |g| (``size``) reaches it. Entries of Z among them are told apart at
        :meth:`_flush_found`."""
        cut = self._cutoff(threshold)
        whole = g.numel() // _BLOCK  # whole blocks; a short last one is read apart
        rows = g[: whole * _BLOCK].view(-1, _BLOCK)
        blocks = torch.nonzero(size[:whole] >= cut).squeeze(1)
        tail = whole < size.numel() and bool(size[whole] >= cut)
        if blocks.numel() == 0 and not tail:
            return None
        found = []
        shift = _BLOCK.bit_length() - 1  # entry e of the gathered rows: row e >> shift
        for first in range(0, blocks.numel(), max(1, _CHUNK // _BLOCK)):  # bounded temporaries
            part = blocks[first : first + max(1, _CHUNK // _BLOCK)]
            hit = torch.nonzero(rows[part].abs_().view(-1) >= cut).squeeze(1)
            row = part[hit >> shift]
            found.append(row.mul_(_BLOCK).add_(hit.bitwise_and_(_BLOCK - 1)))
        if tail:
            rest = torch.nonzero(g[whole * _BLOCK :].abs() >= cut).squeeze(1)
            found.append(rest.add_(whole * _BLOCK))
        return found[0] if len(found) == 1 else torch.cat(found)

    def _flush_found(self) -> None:
        """Score the waiting large tensors in one batch: every entry of their Z with its draw
        (:meth:`_score_z`), and the entries found in their blocks (:meth:`_found`) held to
        their own draws (:meth:`_score_found`)."""
        if not self._waiting:
            return
        waiting, self._waiting = self._waiting, []
        device = waiting[0][1].device
        self._score_z([i for i, _, _, _ in waiting], torch.cat([gz for _, gz, _, _ in waiting]))
        parts = [(i, f, gf) for i, _, f, gf in waiting if f is not None and gf is not None]
        if parts:
            tensor = torch.tensor([i for i, _, _ in parts], device=device).repeat_interleave(
                torch.tensor([f.numel() for _, f, _ in parts], device=device)
            )
            local = torch.cat([f for _, f, _ in parts])
            self._score_found(tensor, local, torch.cat([gf for _, _, gf in parts]))

    def _score_z(self, tensors: Sequence[int], g: torch.Tensor) -> None:
        """Every entry of the Z of ``tensors`` a candidate, with its draw; ``g`` ``(Σ|Z|,)``
        float32: g at them, the tensors' Z end to end in that order."""
        device = g.device
        noises = [self._noise_on(i, device) for i in tensors]
        sizes = torch.tensor([z.positions.numel() for z in noises], device=device)
        offsets = self._offsets.to(device)[torch.tensor(tensors, device=device)]
        at = torch.cat([z.positions for z in noises]).add_(offsets.repeat_interleave(sizes))
        U = torch.cat([z.values for z in noises]) if self._draws else None
        self._add_part(_Pool(at, self._importance(g), U, g))

    def _score_found(self, tensor: torch.Tensor, local: torch.Tensor, g: torch.Tensor) -> None:
        """Candidates from entries found outside Z by the threshold: ``tensor`` ``(p,)`` int64
        the index of each one's tensor, ``local`` ``(p,)`` int64 its flat index there (changed
        in place), ``g`` ``(p,)`` float32 its gradient.

        Their draws are hashed as if outside Z, each with its tensor's key. With additive noise
        each is then held to its own draw (:meth:`_held_to_draws`). An entry of Z among them is
        dropped: it is a candidate as one of Z (:meth:`_score_z`)."""
        device = g.device
        if self._keys.device != device:  # moved once per refresh (the offsets once for all)
            self._keys, self._z_all = self._keys.to(device), self._z_all.to(device)
            self._offsets = self._offsets.to(device)
        F = self._importance(g)
        U = None
        if self._draws:
            U = draws_outside_z(local, self._keys[tensor], self._noise[0].ceiling)  # one c
            if self.noise == "additive":
                keep = self._held_to_draws(F, U)
                tensor, local, F, U, g = (x[keep] for x in (tensor, local, F, U, g))
        at = local.add_(self._offsets[tensor])
        outside = torch.nonzero(~_member(at, self._z_all)).squeeze(1)
        self._add_part(
            _Pool(at[outside], F[outside], None if U is None else U[outside], g[outside])
        )

    def _held_to_draws(self, F: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        """Additive noise: the entries (importance ``F``, draws ``U`` outside Z, both ``(p,)``)
        with F >= max(F_thr, F_U), F_U = ``_DRAW_SLACK``·M_est·(τ − a·U) (F_thr and M_est as
        they stand now: at least what :meth:`add` found them with), as ``(q,)`` int64 indices.

        F_U lies far above F_thr for most of them as U lies far below the ceiling. What this
        drops scores F/M + a·U below a convex function of U, so below the larger of its ends:
        max(F_thr, F_0)/M at U = 0 (F_0 = ``_DRAW_SLACK``·M_est·τ) and F_thr/M + a·ceiling;
        both are recorded for :meth:`dropped_bound`."""
        threshold = self._threshold(self._noise[0].ceiling)
        m_est = self._m_est
        need = (self.tau - self.factor * U).mul_(_DRAW_SLACK * m_est)
        keep = torch.nonzero(F >= need.clamp_min_(threshold)).squeeze(1)
        self._dropped = max(self._dropped, threshold)
        self._dropped_at_zero = max(
            self._dropped_at_zero, _DRAW_SLACK * m_est * self.tau, threshold
        )
        return keep

    def _flush_small(self) -> None:
        """Score the buffered small tensors (float32 copies, laid end to end) in one batch, as
        :meth:`add` scores a large tensor: its blocks' largest |g| raise M_run and give F_thr,
        Z is held whole (:meth:`_score_z`) and the entries found in the blocks reaching F_thr
        (:meth:`_found`; a block may span two tensors) are mapped to their tensors and held to
        their draws (:meth:`_score_found`). When nothing can be dropped (F_thr = 0, Z short of
        k) or with NaN/inf, every entry's importance is taken as the dense path takes it and
        the candidates are Z and the entries reaching F_thr, their draws read for all tensors
        at once (:func:`draws_at`)."""
        if not self._small:
            return
        device = self._small[0][1].device
        noises = [self._noise_on(i, device) for i, _ in self._small]
        g = torch.cat([g for _, g in self._small])  # the tensors whole, end to end
        tensors = [i for i, _ in self._small]
        self._small = []
        start, z_at = z_on_one_axis(noises)  # each tensor's first entry in g, Z's entries in g
        if not self._everything:  # as a large tensor's blocks (a block may span two tensors)
            lo, hi = _block_ends(g)
            size = torch.maximum(hi, -lo)
            largest = size.max()
            if math.isfinite(float(largest)):
                top = self._importance(largest.reshape(1))[0]
                self._m_run = top if self._m_run is None else torch.maximum(self._m_run, top)
                threshold = self._threshold(noises[0].ceiling)  # one c: one ceiling for all
                if threshold > 0:
                    self._score_z(tensors, g[z_at])
                    found = self._found(g, size, threshold)
                    self._dropped = max(self._dropped, threshold)  # F < F_thr if not found
                    if found is not None:
                        j = torch.searchsorted(start, found, right=True) - 1
                        tensor = torch.tensor(tensors, device=device)[j]
                        self._score_found(tensor, found - start[j], g[found])
                    return
        # every entry (nothing can be dropped, Z short of k) or NaN/inf (F maps them)
        F = self._importance(g)
        top = F.max()
        self._m_run = top if self._m_run is None else torch.maximum(self._m_run, top)
        threshold = self._threshold(noises[0].ceiling)  # one fraction c: one ceiling for all
        in_z: torch.Tensor | None = None  # whether each candidate lies in Z
        if threshold > 0 and not self._everything:
            in_z = torch.zeros(g.numel(), dtype=torch.bool, device=device)
            in_z[z_at] = True
            idx = torch.nonzero((F >= threshold).logical_or_(in_z)).squeeze(1)
            if idx.numel() < g.numel():
                self._dropped = max(self._dropped, threshold)
            g, F, in_z = g[idx], F[idx], in_z[idx]
        else:
            idx = torch.arange(g.numel(), device=device)
        which = torch.searchsorted(start, idx, right=True) - 1  # the batch's tensor of each
        local = idx - start[which]  # index in its own tensor
        offsets = torch.tensor([self.offsets[i] for i in tensors], dtype=torch.int64,
                               device=device)
        U = draws_at(noises, local, which) if self._draws else None
        if in_z is not None and U is not None and self.noise == "additive":
            # outside Z, each entry held to its own draw (the rule of the entries found)
            out = torch.nonzero(~in_z).squeeze(1)
            held = out[self._held_to_draws(F[out], U[out])]
            keep = torch.cat([torch.nonzero(in_z).squeeze(1), held])
            local, which, F, U, g = (x[keep] for x in (local, which, F, U, g))
        self._add_part(_Pool(local + offsets[which], F, U, g))

    def _append(
        self,
        index: int,
        g: torch.Tensor,
        where: torch.Tensor,
        U: torch.Tensor | None,
    ) -> None:
        """Add the distinct entries ``where`` ((c,) int64) of tensor ``index`` (flat gradient
        ``g``) to the pool with their draws ``U``."""
        if where.numel() == 0:
            return
        gw = g[where]
        F = self._importance(gw)  # elementwise: the same bits as the full tensor's F
        top = F.max()
        self._m_run = top if self._m_run is None else torch.maximum(self._m_run, top)
        self._add_part(_Pool(where + self.offsets[index], F, U, gw.to(torch.float32)))

    def _add_part(self, part: _Pool) -> None:
        """Hold ``part``'s candidates, ``_CHUNK`` at a time, pruning whenever the pool passes its
        limit (amortised: a prune drops >= B candidates), so the pool never
        holds more than :meth:`pool_entries`."""
        for lo in range(0, len(part), _CHUNK):
            piece = part if len(part) <= _CHUNK else part.take(slice(lo, lo + _CHUNK))
            self._parts.append(piece)
            self._loose += len(piece)
            if self._loose > self._limit:
                self._prune()

    def _noise_on(self, index: int, device: torch.device) -> TensorNoise:
        """Tensor ``index``'s draws with Z moved to ``device`` (kept there for this refresh)."""
        noise = self._noise[index]
        if noise.positions.device != device:
            noise = dataclasses.replace(
                noise, positions=noise.positions.to(device), values=noise.values.to(device)
            )
            self._noise[index] = noise
        return noise

    def _prune(self) -> None:
        """Cut the pool back (see :meth:`_prune_safely` first): to the best ``budget``
        candidates by keys at M_est (additive noise) or the running max (their order
        is the same at any M), ties at the cut in (tensor, index) order. What was cut leaves a
        bound that :meth:`finish` evaluates at the final M (:meth:`_envelope`)."""
        if self._prune_safely():
            self._limit = max(self.prune_at * self.budget, self._loose + self.budget)
            return
        self._limit = self.prune_at * self.budget
        pool = _Pool.cat(self._parts)
        self._parts = []  # the parts' memory goes back before the keys are made
        assert self._m_run is not None
        # keys at M_est where their order depends on M (additive), else at M_run (same order)
        additive = self.noise == "additive" and self._draws
        m_est = self._m_assume() if additive else self._m_run.clamp_min(_FLOAT32_TINY)
        key = self._score(pool.F, m_est, pool.U)
        kept, smallest = _top_m(key, self.budget, pool.pos)
        cut = torch.nonzero(~kept).squeeze(1)
        self._envelopes.append(
            self._envelope(pool.F[cut], None if pool.U is None else pool.U[cut], float(m_est))
        )
        # an entry outside Z whose key cannot reach the smallest kept one would be cut next time
        ceiling = self._noise[0].ceiling  # one fraction c: one ceiling for every tensor
        low = self._importance_at(smallest, ceiling) * float(m_est)
        self._cut_importance = max(self._cut_importance, low)
        self._parts = [pool.take(kept)]
        self._loose = self.budget

    def _envelope(
        self, F: torch.Tensor, U: torch.Tensor | None, m_est: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A bound on the best score among cut candidates (importance ``F``, draws ``U``,
        (c,)) whatever the final M >= ``m_est``.

        As a function of x = 1/M, every score is linear (F·x + a·U, F·x·U or F·x), so their max
        is convex in x and lies below its chords: it is evaluated at x_j = 2^-j / M_est
        (j < ``_GRID``) and at x = 0, and :meth:`_bound_at` interpolates. (Keys at one M
        alone overrate every entry when M ends far above it, as when the gradient's max
        arrives late in the backward pass.)

        Returns:
            ``(G,)`` float64 grid x (decreasing, last 0) and ``(G,)`` the max score there.
        """
        x = torch.tensor(
            [2.0**-j for j in range(_GRID)] + [0.0], dtype=torch.float64, device=F.device
        ) / m_est
        if F.numel() == 0:
            return x, torch.full_like(x, -math.inf)
        f = F.double()
        u = U.double() if U is not None and self._draws else None
        top = []
        for xj in x.tolist():  # one (c,) float64 vector at a time: no (c, G) temporary
            s = f * xj
            if u is not None:
                s = s.add_(u, alpha=self.factor) if self.noise == "additive" else s.mul_(u)
            top.append(float(s.max()))
        return x, torch.tensor(top, dtype=torch.float64, device=F.device)

    @staticmethod
    def _bound_at(x: float, grid: torch.Tensor, top: torch.Tensor) -> float:
        """The chord bound of :meth:`_envelope`'s ``(grid, top)`` at x = 1/M."""
        xs, ys = grid.tolist(), top.tolist()
        if x >= xs[0]:
            return ys[0]
        j = next(i for i in range(1, len(xs)) if xs[i] <= x)
        w = (x - xs[j]) / (xs[j - 1] - xs[j])
        return ys[j] + w * (ys[j - 1] - ys[j])

    def _prune_safely(self) -> bool:
        """Drop the candidates that cannot be in the top-k whatever the final M turns out to be,
        and say whether that was enough (the pool's loose part now at most ``hold_at``·B).

        With additive noise the order of the scores F/M + a·U depends on M, which is known only
        once every tensor is in: keys at the running max M_run <= M overrate the entries with a
        large F, and cutting by them can drop an entry of the final top-k (the gradient's max
        moves by 10-50x between steps while a prompt trains). Every score is at least a·U and at
        most F/M_run + a·U, so an entry whose upper end is below the k-th largest lower end in
        the pool is beaten by k candidates at any M (those k have upper ends >= their lower ends
        and are never dropped here). No bound is needed for it: it is outside the dense top-k
        as long as those k stay, and a later key prune that drops one of them records a bound
        above it. Without noise or with multiplicative noise the order (F, or F·U) does not
        depend on M: the key prune is already safe. The upper ends are taken at M_run first,
        and at M_est (relying on M >= M_est) only if that leaves more than ``hold_at``·B.
        """
        if not (self.noise == "additive" and self._draws):
            return False
        pool = _Pool.cat(self._parts)
        self._parts = [pool]  # the parts' memory goes back before the scores are made
        assert self._m_run is not None and pool.U is not None
        if len(pool) <= self.k:
            return False
        lower = pool.U * self.factor  # a·U: the bits of 0/M + a·U in _score
        floor = torch.kthvalue(lower, len(pool) - self.k + 1).values  # the k-th largest
        for assume in (False, True):  # at M_run (no assumption), then at M_est if need be
            m_low = self._m_assume() if assume else self._m_run
            survive = self._score(pool.F, m_low, pool.U) >= floor
            self._loose = int(torch.count_nonzero(survive))
            if self._loose <= self.hold_at * self.budget or assume:
                break
        self._parts = [pool.take(survive)]
        return self._loose <= self.hold_at * self.budget

    def dropped_bound(self, m: float) -> float:
        """The best score at the final max ``m`` of an entry dropped in this refresh by the
        threshold or by its own draw (:meth:`_held_to_draws`), with a float32 margin; -inf if none
        was. (What the prunes cut is bounded apart.)"""
        dropped = -math.inf
        if self._dropped > -math.inf:  # F < F_thr, U at most the ceiling
            ceiling = max(z.ceiling for z in self._noise)
            dropped = self._ceiling_term(self._dropped / m, ceiling) * (1 + 1e-5)
        if self._dropped_at_zero > -math.inf:  # the U = 0 end of the per-draw rule
            dropped = max(dropped, self._dropped_at_zero / m * (1 + 1e-5))
        return dropped

    def finish(self) -> StreamedSelection:
        """The exact-k selection of this refresh (every tensor added once since :meth:`begin`)."""
        if self._step is None:
            raise RuntimeError("finish() before begin(): call begin(step, total_steps) first.")
        missing = [i for i, done in enumerate(self._added) if not done]
        if missing:
            raise RuntimeError(
                f"finish() at step {self._step} with tensors {missing[:10]} not added "
                f"({len(missing)} missing); add every tensor once before finish()."
            )
        self._flush()
        assert self._m_run is not None  # k >= 1 implies a non-empty tensor
        pool = _Pool.cat(self._parts)  # at most ~5B: one selection over it
        score = self._score(pool.F, self._m_run, pool.U)
        # ties in (tensor, index) order, as dense; kth: the k-th largest score
        chosen, kth = _top_m(score, self.k, pool.pos)
        m = max(float(self._m_run), _FLOAT32_TINY)
        dropped = self.dropped_bound(m)
        cut = max(
            (self._bound_at(1.0 / m, *e) * (1 + 1e-5) for e in self._envelopes), default=-math.inf
        )
        exact = kth > max(cut, dropped) and m >= self._m_assumed
        # τ for the next refresh: a score a little below this refresh's k-th.
        rank = min(len(pool), self.budget)
        tau = _kth_largest(score, rank)
        if self.noise == "additive" and self._draws:  # the pool may have lost Z entries to a
            # prune; every score in Z is at least a·U, so its rank-B a·U bounds τ from below too
            u_r = self._draw_at_rank(rank)
            if u_r is not None:
                tau = max(tau, self.factor * u_r)
        importance = _kth_largest(pool.F, rank) / m
        # halved when the threshold dropped too much (not when a key prune did: a lower τ
        # would only fill the pool faster)
        lower = kth <= dropped
        self._tau_score = 0.5 * min(tau, kth) if lower else tau
        self._tau_importance = 0.5 * importance if lower else importance
        self._tau_factor = self.factor
        m_now = float(self._m_run)
        self._m_floor = m_now if not self._m_floor > 0 else min(m_now, 1.5 * self._m_floor)
        pos = pool.pos[chosen]
        order = torch.argsort(pos)
        pos, values = pos[order], pool.g[chosen][order]
        offsets = torch.tensor(self.offsets, dtype=torch.int64, device=pos.device)
        tensor_of = torch.searchsorted(offsets, pos, right=True) - 1
        counts = torch.bincount(tensor_of, minlength=len(self.shapes)).tolist()
        local = pos - offsets[tensor_of]  # flat index in its own tensor
        indices, vals = list(local.split(counts)), list(values.split(counts))
        square_sums = (
            torch.stack([s for s in self._sq if s is not None])  # type: ignore[misc]
            if self._want_sq
            else torch.full((len(self.shapes),), math.nan, dtype=torch.float64)
        )
        result = StreamedSelection(
            indices=indices,
            values=vals,
            square_sums=square_sums,
            max_importance=float(self._m_run),
            candidates=len(pool),
            exact=exact,
        )
        self._step = None
        self._parts = []
        self._noise = []
        return result
