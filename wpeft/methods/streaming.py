"""SFAS's global top-k selected one gradient at a time, during backward.

The dense refresh of SFAS (``SFAS.after_backward`` with :class:`~wpeft.methods.sfas.EntrySelection`)
needs every backbone gradient alive at once: importance F (g² or |g|) of all entries, their global
max M, the perturbed score F̃ = perturb(F / M) and one exact top-k over everything. Here each
tensor's gradient is scored as soon as backward produces it (e.g. from a
``register_post_accumulate_grad_hook``), a few candidates are kept as
``(position, F, U, g)`` and the caller frees the gradient at once. The selection is the same
function of the gradients as the dense path's (same importance helper, same noise draws, same
float32 arithmetic), made on the candidates only.

Why it is right. M is not known until the last tensor, so :meth:`StreamingTopK.add` ranks a
tensor's entries by a *key* computed with the running max M_run (max over the tensors added so
far, M_run <= M): key = perturb(F / M_run). For every noise kind the key is an upper bound of the
true score perturb(F / M) (F/M_run >= F/M; additive adds the same a·U >= 0; multiplicative
multiplies by the same U >= 0; float32 rounding is monotone, so the bound holds bit for bit). A
dropped entry's true score is therefore at most the largest key dropped (``bound``).
:meth:`StreamingTopK.finish` recomputes the true scores of the candidates exactly as the dense
path does (divide by M clamped as :func:`~wpeft.methods.fisher.normalise_by_global_max_` does,
then the same ``add_``/``mul_`` with the same U: bitwise the dense numbers), takes their exact
top-k with :func:`~wpeft.methods.fisher.topk_masks` (ties in tensor order, then flat index, as
the dense path), and calls the result ``exact`` when the k-th selected score is strictly above
every bound: then no dropped entry can be in the dense top-k, so the two selections are equal.
Otherwise (rare with the defaults) the selection is still exactly k entries, the best among the
candidates.

What is kept, per tensor t of n_t entries (N in all, budget B = Σ cap_t with
cap_t = min(n_t, ceil(oversample·k·n_t/N) + 64)):

* the entries with key >= τ, but at least the best cap_t (the tensor's share of the budget; more
  than the proportional share ceil(k·n_t/N), so the candidates always number >= k) and at most the
  best min(n_t, B) by key; key ties are taken in flat-index order, as the dense top-k takes them;
* plus the caller's ``keep`` entries (e.g. the current mask), never dropped.

Improvements over keeping between ceil(k·n_t/N) and cap_t per tensor: every tensor keeps at
least its cap_t (the budget is held anyway, and a lower per-tensor bound makes ``exact`` far more
frequent when τ is off), and the cap is *global*. A tensor may contribute up to B
candidates (the top-k often sits in a few tensors), and whenever the pool of candidates (``keep``
entries aside) exceeds B it is pruned back to the best B by keys recomputed with the current
running max (tighter bounds than the keys at add time). To keep that cheap the pool is pruned
only when it exceeds 2B (so each prune drops at least B candidates), and once more, to B, in
:meth:`StreamingTopK.finish`, where the recomputed keys are the true scores. So at most
2B + |keep| candidates are held between calls (plus min(n_t, B) inside one ``add``) and B + |keep|
reach the final top-k; B is about oversample·k + 64·T.

The threshold τ carries over between refreshes: after a refresh it is the true score at rank
r = ceil((oversample + 1/2) · k) of the candidates (halved when the refresh was not exact), so
that a tensor's entries above τ usually outnumber its cap_t: it then keeps exactly those, found
by the comparison with τ alone (the top-m would select the same set; no top-m is run). At the
next :meth:`StreamingTopK.begin`, for additive noise, it is lowered by the drop of the factor
a = γ(1 − n_s/t_s) since then (every additive score loses at most that much) but not below the
rank-r value of F/M among the candidates (every additive score is at least F/M; this keeps τ
useful at the last steps, where a reaches 0). It is 0 at the first refresh. Within a refresh,
after a prune, entries whose key is below the smallest key the prune kept (rescaled by the
running max then over the running max now) are not kept either: for noise "none" or
multiplicative they could not survive the next prune anyway; for additive it is a heuristic
(the bound still records whatever is dropped, so ``exact`` stays a proof). This makes the first
refresh cost about what later ones cost.

Costs per tensor: the key (F turned into the key in place) and U, two float32 temporaries of the
tensor, plus bool masks; a top-(m+1) of the key, two comparison passes, and Σg² accumulated in
float64 by chunks. F, U and g of the kept entries are gathered (F recomputed from g there, the
same bits). Nothing of size N is ever allocated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from wpeft.errors import ConfigError
from wpeft.methods.fisher import add_importance_, anneal_factor, noise_generator, topk_masks

__all__ = ["StreamedSelection", "StreamingTopK"]

_FLOAT32_MAX = torch.finfo(torch.float32).max
_FLOAT32_TINY = torch.finfo(torch.float32).tiny


@dataclass
class StreamedSelection:
    """The exact-k selection of one refresh, as sparse per-tensor indices.

    Attributes:
        indices: Per tensor, ``(k_t,)`` int64 strictly increasing flat indices; Σ k_t == k.
        values: Per tensor, ``(k_t,)`` float32: the gradient g at those indices.
        square_sums: ``(T,)`` float64: Σ g² over all entries of each tensor (NaN/inf gradients
            give NaN/inf here: the records show them).
        max_importance: M, the global max of the importance F this step.
        candidates: Entries kept as candidates over all tensors for the final top-k (``keep``
            entries included; at most the budget B plus the ``keep`` entries).
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
    index), ``F``/``U``/``g`` (c,) float32 (``U`` None without noise draws), ``forced`` (c,) bool
    (a ``keep`` entry, never pruned)."""

    pos: torch.Tensor
    F: torch.Tensor
    U: torch.Tensor | None
    g: torch.Tensor
    forced: torch.Tensor

    @staticmethod
    def cat(parts: Sequence[_Pool]) -> _Pool:
        return _Pool(
            torch.cat([p.pos for p in parts]),
            torch.cat([p.F for p in parts]),
            None if parts[0].U is None else torch.cat([p.U for p in parts]),  # type: ignore[misc]
            torch.cat([p.g for p in parts]),
            torch.cat([p.forced for p in parts]),
        )

    def take(self, where: torch.Tensor) -> _Pool:
        return _Pool(
            self.pos[where],
            self.F[where],
            None if self.U is None else self.U[where],
            self.g[where],
            self.forced[where],
        )

    def __len__(self) -> int:
        return self.pos.numel()


def _top_m(
    key: torch.Tensor, m: int, order: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """The m largest of a 1-D ``key`` and the largest left out.

    Ties at the cut are taken in index order, or in increasing ``order`` ((n,) int64, distinct)
    when given.

    Returns:
        A ``(n,)`` bool mask with exactly m True, and the max key not selected (-inf if none).
    """
    n = key.numel()
    if m >= n:
        return torch.ones(n, dtype=torch.bool, device=key.device), -math.inf
    if m == 0:
        return torch.zeros(n, dtype=torch.bool, device=key.device), float(key.max())
    vals = torch.topk(key, m + 1, sorted=True).values
    cut, left_out = vals[m - 1], float(vals[m])
    mask = key > cut
    need = m - int(torch.count_nonzero(mask))
    if need:
        ties = torch.nonzero(key == cut).squeeze(1)
        if order is not None and ties.numel() > need:
            ties = ties[torch.argsort(order[ties])]
        mask[ties[:need]] = True
    return mask, left_out


def _square_sum(g: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """Σ g² of a 1-D ``g`` in float64 (0-d), in chunks (no float64 copy of a large tensor)."""
    total = torch.zeros((), dtype=torch.float64, device=g.device)
    for start in range(0, g.numel(), chunk):
        part = g[start : start + chunk].to(torch.float64)
        total += torch.dot(part, part)
    return total


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
        seed: Noise seed (as :func:`noise_generator`).
        oversample: Candidate budget over k (>= 1): B = Σ min(n_t, ceil(oversample·k·n_t/N) + 64).
    """

    def __init__(
        self,
        shapes: Sequence[torch.Size],
        k: int,
        *,
        importance: str = "fisher",
        noise: str = "additive",
        gamma: float = 0.2,
        seed: int = 0,
        oversample: float = 2.0,
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
        if not oversample >= 1:
            raise ConfigError(
                f"oversample must be >= 1 (candidates per selected entry), got {oversample!r}."
            )
        self.k, self.importance, self.noise = k, importance, noise
        self.gamma, self.seed, self.oversample = gamma, seed, oversample
        self.total = total
        self.caps = [min(n, math.ceil(oversample * k * n / total) + 64) for n in self.numels]
        #: Candidates held at most (``keep`` entries aside): Σ cap_t.
        self.budget = sum(self.caps)
        self.offsets = [0]
        for n in self.numels[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        # τ's ingredients from the last refresh: a score, the same rank of F/M, the noise factor.
        self._tau_score, self._tau_importance, self._tau_factor = 0.0, 0.0, 0.0
        #: The threshold τ of this refresh (before the cut of the pool, see :meth:`add`).
        self.tau = 0.0
        self._step: int | None = None

    # --- one refresh ----------------------------------------------------------------------------

    def begin(self, step: int, total_steps: int) -> None:
        """Start a refresh at 0-based optimiser ``step`` (discards one left unfinished)."""
        self.factor = anneal_factor(step, total_steps, self.gamma)
        self._draws = self.noise == "multiplicative" or (
            self.noise == "additive" and self.factor != 0.0
        )
        tau = self._tau_score
        if self.noise == "additive":  # every score loses at most the drop of the factor, and
            # is at least F/M
            shifted = self._tau_score - max(0.0, self._tau_factor - self.factor)
            tau = max(shifted, self._tau_importance)
        self.tau = max(0.0, tau)
        self._step = step
        self._added = [False] * len(self.shapes)
        self._sq: list[torch.Tensor | None] = [None] * len(self.shapes)
        self._m_run: torch.Tensor | None = None
        self._parts: list[_Pool] = []
        self._loose = 0  # candidates that may be pruned (not forced)
        self._bound = -math.inf
        self._cut: tuple[float, float] | None = None  # (min key kept, running max) of last prune

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

    def add(self, index: int, grad: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Score tensor ``index``'s gradient and keep its candidates (see the module docstring).

        Args:
            index: Position of the tensor in ``shapes``.
            grad: Its gradient, shaped like the tensor (any float dtype). Not referenced after
                the call: the caller may free it.
            keep: ``(m,)`` int64 flat indices that must stay candidates (e.g. the current mask),
                or None.
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
        if keep is not None:
            if keep.dim() != 1 or keep.dtype != torch.int64:
                raise ValueError(
                    f"keep of tensor {index} must be (m,) int64 flat indices, got "
                    f"{tuple(keep.shape)} {keep.dtype}."
                )
            if keep.numel() and (int(keep.min()) < 0 or int(keep.max()) >= n):
                raise ValueError(
                    f"keep of tensor {index} holds indices outside [0, {n}): "
                    f"[{int(keep.min())}, {int(keep.max())}]."
                )
        self._added[index] = True
        self._sq[index] = _square_sum(g)
        if n == 0:
            return
        key = self._importance(g)  # F now, the key below (in place: one (n,) float32 buffer)
        top = key.max()
        self._m_run = top if self._m_run is None else torch.maximum(self._m_run, top)
        U = None
        if self._draws:  # drawn exactly as perturb_ draws tensor `index`'s noise
            gen = noise_generator(self.seed, self._step, index, g.device)
            U = torch.rand(self.shapes[index], generator=gen, device=g.device, dtype=torch.float32)
            U = U.reshape(-1)
        self._score(key, self._m_run, U, inplace=True)
        tau = self.tau
        if self._cut is not None:  # below the pool's cut, rescaled to this running max
            tau = max(tau, self._cut[0] * self._cut[1] / max(float(self._m_run), _FLOAT32_TINY))
        above = key >= tau
        passing = int(torch.count_nonzero(above))
        if min(self.caps[index], n) <= passing <= min(n, self.budget) and passing < n:
            # the top-m below would keep exactly the entries >= τ: take them by the comparison
            # already made (no top-m), the bound is the largest key below τ
            chosen = above
            left_out = float(key.masked_fill_(above, -math.inf).max())
        else:
            m = min(max(passing, self.caps[index]), min(n, self.budget))
            chosen, left_out = _top_m(key, m)
        self._bound = max(self._bound, left_out)
        del key, above
        if keep is not None and keep.numel():
            keep = keep.to(g.device)
            chosen[keep] = True
            where = torch.nonzero(chosen).squeeze(1)
            forced = torch.isin(where, keep)
        else:
            where = torch.nonzero(chosen).squeeze(1)
            forced = torch.zeros(where.shape, dtype=torch.bool, device=g.device)
        gw = g[where]
        part = _Pool(
            where + self.offsets[index],
            self._importance(gw),  # elementwise: the same bits as the full tensor's F
            None if U is None else U[where],
            gw.to(torch.float32),
            forced,
        )
        self._parts.append(part)
        self._loose += len(part) - int(torch.count_nonzero(part.forced))
        if self._loose > 2 * self.budget:  # amortised: each prune drops >= budget candidates
            self._prune()

    def _prune(self) -> None:
        """Cut the pool to the best ``budget`` non-forced candidates by keys recomputed with the
        current running max (ties at the cut in (tensor, index) order); the best key cut
        becomes a bound. Once every tensor is added, these keys are the true scores."""
        pool = _Pool.cat(self._parts)
        assert self._m_run is not None
        loose = torch.nonzero(~pool.forced).squeeze(1)
        key = self._score(pool.F[loose], self._m_run, None if pool.U is None else pool.U[loose])
        kept, left_out = _top_m(key, self.budget, pool.pos[loose])
        self._bound = max(self._bound, left_out)
        self._cut = (float(key[kept].min()), max(float(self._m_run), _FLOAT32_TINY))
        survive = pool.forced.clone()
        survive[loose[kept]] = True
        self._parts = [pool.take(survive)]
        self._loose = self.budget

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
        assert self._m_run is not None  # k >= 1 implies a non-empty tensor
        if self._loose > self.budget:
            self._prune()
        pool = _Pool.cat(self._parts)
        pool = pool.take(torch.argsort(pool.pos))  # (tensor, flat index) order: dense tie order
        score = self._score(pool.F, self._m_run, pool.U)
        chosen = topk_masks([score], self.k)[0]
        chosen_scores = score[chosen]
        kth = float(chosen_scores.min())
        exact = kth > self._bound
        # τ for the next refresh: a score a little below this refresh's k-th.
        rank = min(len(pool), math.ceil((self.oversample + 0.5) * self.k))
        tau = float(torch.topk(score, rank, sorted=True).values[-1])
        importance = float(torch.topk(pool.F, rank, sorted=True).values[-1]) / max(
            float(self._m_run), _FLOAT32_TINY
        )
        self._tau_score = tau if exact else 0.5 * min(tau, kth)
        self._tau_importance = importance if exact else 0.5 * importance
        self._tau_factor = self.factor
        pos = pool.pos[chosen]
        values = pool.g[chosen]
        offsets = torch.tensor(self.offsets, dtype=torch.int64, device=pos.device)
        tensor_of = torch.searchsorted(offsets, pos, right=True) - 1
        counts = torch.bincount(tensor_of, minlength=len(self.shapes)).tolist()
        indices, vals, start = [], [], 0
        for i, c in enumerate(counts):
            indices.append(pos[start : start + c] - self.offsets[i])
            vals.append(values[start : start + c])
            start += c
        square_sums = torch.stack([s for s in self._sq if s is not None])  # type: ignore[misc]
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
        return result
