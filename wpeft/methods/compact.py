"""AdamW whose state covers only the selected entries of each backbone tensor (lean SFAS).

:class:`~wpeft.methods.fisher.MaskedAdamW` keeps dense moments and an int32 step count for every
entry of every masked tensor (12 bytes per entry, 1.5x Full-Tuning's optimiser state) and reads a
dense gradient. :class:`CompactAdamW` instead receives, per parameter, the gradient at the
selected entries only (:class:`CompactGrad`: sorted flat indices and their values) and keeps state
for those entries only: int64 index, float32 first and second moments and an int32 Adam step
count ("age") per entry — 20 bytes per selected entry, nothing of the parameter's size.

State policy. An entry's Adam state lives only while it stays selected. When the selection of a
parameter changes, the state is carried over to the new index set with :func:`remap_entries`: an
entry in both keeps its moments and age; an entry that leaves the selection loses them; an entry
that (re-)enters starts fresh (zero moments, age 0), so its first update is bias-corrected as
Adam's step 1, i.e. ``p ← p(1 − lr·wd) − lr·g/(|g| + eps)``. (MaskedAdamW instead keeps the
moments of deselected entries and resumes them when they return; the two agree exactly while the
selection does not change.)

Per entry the arithmetic is that of ``MaskedAdamW._sparse_update`` (decoupled weight decay on the
updated entries only, bias correction with the entry's own age), in float32 whatever the
parameter's dtype; the result is written back in the parameter's dtype. A parameter that gets a
:class:`CompactGrad` is updated from it alone: any dense ``p.grad`` it also has is ignored (and
left as it is). Parameters that get no compact gradient but have a dense ``p.grad`` (heads, prompt
generators) get plain AdamW through ``MaskedAdamW._dense_update``, as ``torch.optim.AdamW``.

Indices are flat indices into the parameter's local tensor (the shard, for an FSDP2 DTensor).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from wpeft.errors import ConfigError
from wpeft.methods.fisher import MaskedAdamW, adamw_entries_
from wpeft.methods.shards import local_tensor

__all__ = ["COMPACT_STATE_BYTES_PER_ENTRY", "CompactAdamW", "CompactGrad", "remap_entries"]

#: Bytes of compact state per selected entry: int64 index + two float32 moments + int32 age.
COMPACT_STATE_BYTES_PER_ENTRY = 8 + 4 + 4 + 4

#: Compact state keys and the dtype each must have (load_state_dict restores them).
_COMPACT_DTYPES = {
    "indices": torch.int64,
    "exp_avg": torch.float32,
    "exp_avg_sq": torch.float32,
    "age": torch.int32,
}


@dataclass
class CompactGrad:
    """Gradient of one parameter at its selected entries."""

    indices: torch.Tensor  # (k_p,) int64, strictly increasing flat indices into the parameter
    values: torch.Tensor  # (k_p,) float32, dL/dp at those indices


@dataclass
class _FlatState:
    """One parameter group's compact moments and ages, flat; ``views``: per parameter the
    slices its state holds (``exp_avg``, ``exp_avg_sq``, ``age``)."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    age: torch.Tensor
    views: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def remap_entries(
    old: torch.Tensor, new: torch.Tensor, *values: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Carry per-entry values from one sorted index set to another.

    Args:
        old: ``(n,)`` int64, strictly increasing indices the ``values`` are aligned with.
        new: ``(m,)`` int64, strictly increasing indices to align with.
        values: Tensors ``(n,)`` each (any dtype), aligned with ``old``.

    Returns:
        One ``(m,)`` tensor per ``values`` (same dtype and device): an entry in both sets keeps its
        value, an entry only in ``new`` gets 0. Only ``(m,)``-sized temporaries (searchsorted); no
        tensor of the parameter's size. Sortedness is a precondition, not checked.
    """
    for name, t in (("old", old), ("new", new)):
        if t.dim() != 1 or t.dtype != torch.int64:
            raise ValueError(
                f"remap_entries: {name} indices must be 1-D int64, got {tuple(t.shape)} {t.dtype}."
            )
    for i, v in enumerate(values):
        if v.shape != old.shape:
            raise ValueError(
                f"remap_entries: values[{i}] has shape {tuple(v.shape)}, but must be aligned with "
                f"old {tuple(old.shape)}."
            )
    m = new.numel()
    if old.numel() == 0 or m == 0:
        return tuple(torch.zeros(m, dtype=v.dtype, device=v.device) for v in values)
    pos = torch.searchsorted(old, new).clamp_max_(old.numel() - 1)  # (m,) candidate slots in old
    missing = old.index_select(0, pos) != new  # (m,) True where the entry is new
    return tuple(v.index_select(0, pos).masked_fill_(missing, 0) for v in values)


class CompactAdamW(torch.optim.Optimizer):
    """AdamW with state only at the selected entries of each parameter (see the module docstring).

    Per parameter ``p`` at each :meth:`step`: ``grad_of(p)`` returning a :class:`CompactGrad`
    gives a compact update of those entries (state ``indices`` (k,) int64, ``exp_avg`` and
    ``exp_avg_sq`` (k,) float32, ``age`` (k,) int32); otherwise a dense ``p.grad`` gives plain
    AdamW; otherwise nothing happens. All compact gradients of a step are validated (one host
    synchronisation) before any parameter is touched, so a bad one leaves everything unchanged.

    Args:
        params: Parameters or parameter groups.
        lr, betas, eps, weight_decay: As ``torch.optim.AdamW`` (decoupled weight decay).
        grad_of: ``param -> CompactGrad or None``; public attribute, may be set later.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        grad_of: Callable[[torch.Tensor], CompactGrad | None] | None = None,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ConfigError(
                f"CompactAdamW: lr, eps and weight_decay must be >= 0, got lr={lr}, eps={eps}, "
                f"weight_decay={weight_decay}; pass non-negative values."
            )
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"CompactAdamW: betas must be two values in [0, 1), got {betas}.")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        #: ``param -> CompactGrad or None``; may be set after construction.
        self.grad_of = grad_of
        # per parameter, what _validate last passed: (indices given, its version, the state's
        # indices, their version); the same again skips the checks (between refreshes)
        self._checked: dict[int, tuple[torch.Tensor, int, torch.Tensor, int]] = {}
        # per (group, device): the flat moments and ages whose slices are the states' tensors
        self._flat: dict[tuple[int, torch.device], _FlatState] = {}

    # --- stepping -------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        compact: list[tuple[torch.Tensor, CompactGrad, dict[str, Any]]] = []
        dense: list[tuple[torch.Tensor, dict[str, Any]]] = []
        for group in self.param_groups:
            for p in group["params"]:
                cg = self.grad_of(p) if self.grad_of is not None else None
                if cg is not None:
                    compact.append((p, cg, group))
                elif p.grad is not None:
                    dense.append((p, group))
        same = self._validate(compact)
        groups: dict[tuple[int, torch.device],
                      tuple[dict[str, Any], list[tuple[torch.Tensor, CompactGrad]]]] = {}
        moved: list[tuple[torch.Tensor, CompactGrad]] = []  # a state to carry to new indices
        for (p, cg, group), unchanged in zip(compact, same, strict=True):
            if self.state[p] and not unchanged:
                moved.append((p, cg))
            else:
                self._align_state(p, cg, self.state[p], unchanged)
        self._carry_states(moved)
        for (p, cg, group) in compact:
            self._remember_checked(p, cg)
            if cg.indices.numel():
                key = (id(group), cg.indices.device)
                groups.setdefault(key, (group, []))[1].append((p, cg))
        for key, (group, entries) in groups.items():
            self._compact_update(key, entries, group)
        for key in [k for k in self._flat if k not in groups]:  # groups gone or idle
            del self._flat[key]
        for p, group in dense:
            if p.grad.is_sparse:
                raise RuntimeError("CompactAdamW does not support sparse (torch.sparse) gradients.")
            state = self.state[p]
            if "indices" in state:
                raise RuntimeError(
                    f"CompactAdamW: parameter {tuple(p.shape)} was updated from compact gradients "
                    "and now has only a dense p.grad; switching to dense updates is not supported "
                    "(its state covers the selected entries only). Keep returning a CompactGrad "
                    "from grad_of (an empty one to update nothing)."
                )
            MaskedAdamW._dense_update(p, local_tensor(p.grad), state, group)
        return loss

    def _validate(
        self, compact: list[tuple[torch.Tensor, CompactGrad, dict[str, Any]]]
    ) -> list[bool]:
        """Check every compact gradient; return, per entry of ``compact``, whether its indices
        equal the stored ones (no remap needed). One host synchronisation for all of them."""
        unchecked: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []  # numel, new, old
        known: list[bool] = []  # passed before, unchanged since: no checks
        for p, cg, _ in compact:
            lp, idx, val = local_tensor(p), cg.indices, cg.values
            where = f"CompactAdamW: parameter {tuple(lp.shape)}"
            if not isinstance(idx, torch.Tensor) or not isinstance(val, torch.Tensor):
                raise TypeError(f"{where}: CompactGrad indices and values must be tensors.")
            if idx.dtype != torch.int64 or idx.dim() != 1:
                raise ValueError(
                    f"{where}: indices must be 1-D int64, got {tuple(idx.shape)} {idx.dtype}; "
                    "pass flat indices as torch.int64."
                )
            if val.dim() != 1 or val.numel() != idx.numel() or not val.is_floating_point():
                raise ValueError(
                    f"{where}: values must be a 1-D float tensor as long as the {idx.numel()} "
                    f"indices, got {tuple(val.shape)} {val.dtype}."
                )
            if idx.device != lp.device or val.device != lp.device:
                raise ValueError(
                    f"{where}: indices ({idx.device}) and values ({val.device}) must be on the "
                    f"parameter's device {lp.device}."
                )
            state = self.state[p]
            if state and "indices" not in state:
                raise RuntimeError(
                    f"{where} was updated densely before (its state is shaped like it); switching "
                    "to compact updates is not supported. Return a CompactGrad for it from the "
                    "first step on, or None every step."
                )
            old = state.get("indices")
            last = self._checked.get(id(p))
            if (last is not None and old is not None and last[0] is idx
                    and last[1] == idx._version and last[2] is old and last[3] == old._version):
                known.append(True)  # the very indices checked last step, equal to the state's
                continue
            known.append(False)
            unchecked.append((lp.numel(), idx, old))
        checked = self._flags(unchecked)  # the one sync
        problems = ("are not strictly increasing", "has a negative index", "has an index >= numel")
        rows = iter(checked)
        same_flags = []
        for (p, cg, _), skip in zip(compact, known, strict=True):
            if skip:
                same_flags.append(True)
                continue
            row = next(rows)
            for good, problem in zip(row[:3], problems):
                if not good:
                    n = local_tensor(p).numel()
                    raise ValueError(
                        f"CompactAdamW: parameter {tuple(local_tensor(p).shape)}: CompactGrad "
                        f"indices {problem} (need sorted unique flat indices in [0, {n})); got "
                        f"min {int(cg.indices.min())}, max {int(cg.indices.max())}."
                    )
            same_flags.append(bool(row[3]))
        return same_flags

    @staticmethod
    def _flags(
        unchecked: list[tuple[int, torch.Tensor, torch.Tensor | None]],
    ) -> list[list[bool]]:
        """Per ``(numel, indices, stored indices or None)``: [strictly increasing, all >= 0,
        all < numel, equal to the stored ones], for all of them in a few operations over their
        concatenation (a refresh changes every parameter's indices at once) and one host
        synchronisation (on the first one's device: indices elsewhere are copied there)."""
        if not unchecked:
            return []
        device = unchecked[0][1].device
        n = len(unchecked)
        sizes = torch.tensor([idx.numel() for _, idx, _ in unchecked], device=device)
        owner = torch.arange(n, device=device).repeat_interleave(sizes)  # parameter of each entry
        idx = torch.cat([i.to(device) for _, i, _ in unchecked])
        numel = torch.tensor([m for m, _, _ in unchecked], dtype=torch.int64, device=device)
        # entries breaking each rule, counted per parameter
        falls = (idx[1:] <= idx[:-1]).logical_and_(owner[1:] == owner[:-1])
        bad = [
            owner[1:][falls],
            owner[idx < 0],
            owner[idx >= numel[owner]],
        ]
        pairs = [j for j, (_, i, old) in enumerate(unchecked)
                 if old is not None and old.shape == i.shape]
        same = torch.zeros(n, dtype=torch.bool, device=device)
        if pairs:
            new = torch.cat([unchecked[j][1].to(device) for j in pairs])
            old = torch.cat([unchecked[j][2].to(device) for j in pairs])  # type: ignore[union-attr]
            at = torch.tensor(pairs, device=device)
            differ = torch.bincount(
                at.repeat_interleave(sizes[at])[new != old], minlength=n
            )
            same[at] = differ[at] == 0
        counts = torch.stack([torch.bincount(b, minlength=n) == 0 for b in bad] + [same], 1)
        return counts.tolist()

    def _remember_checked(self, p: torch.Tensor, cg: CompactGrad) -> None:
        """After ``p``'s state was aligned with ``cg.indices``: the same indices next step (same
        tensor, unmodified, the state's indices unmodified) need no checks."""
        idx, old = cg.indices, self.state[p]["indices"]
        self._checked[id(p)] = (idx, idx._version, old, old._version)

    @staticmethod
    def _align_state(
        p: torch.Tensor, cg: CompactGrad, state: dict[str, Any], unchanged: bool
    ) -> None:
        """Make ``p``'s compact state cover ``cg.indices`` (zeros for a new entry; see
        :func:`remap_entries`)."""
        CompactAdamW._check_contiguous([p])
        lp = local_tensor(p)
        idx = cg.indices
        if not state:
            k = idx.numel()
            state["indices"] = idx.clone()
            state["exp_avg"] = torch.zeros(k, dtype=torch.float32, device=lp.device)
            state["exp_avg_sq"] = torch.zeros(k, dtype=torch.float32, device=lp.device)
            state["age"] = torch.zeros(k, dtype=torch.int32, device=lp.device)
        elif not unchanged:
            m, v, age = remap_entries(
                state["indices"], idx, state["exp_avg"], state["exp_avg_sq"], state["age"]
            )
            state.update(indices=idx.clone(), exp_avg=m, exp_avg_sq=v, age=age)

    def _carry_states(self, moved: list[tuple[torch.Tensor, CompactGrad]]) -> None:
        """Carry each ``p``'s compact state to its new ``cg.indices`` as :func:`remap_entries`
        does, for all of them at once: the parameters' index sets laid end to end (each shifted
        by the entries of those before it) are one sorted set, so one search aligns them all.
        Per device (a parameter's state lives with it)."""
        by_device: dict[torch.device, list[tuple[torch.Tensor, CompactGrad]]] = {}
        for p, cg in moved:
            by_device.setdefault(cg.indices.device, []).append((p, cg))
        for device, items in by_device.items():
            self._check_contiguous([p for p, _ in items])
            states = [self.state[p] for p, _ in items]
            shift = torch.tensor(
                [0] + [local_tensor(p).numel() for p, _ in items[:-1]], device=device
            ).cumsum_(0)
            old_sizes = torch.tensor([st["indices"].numel() for st in states], device=device)
            new_sizes = [cg.indices.numel() for _, cg in items]
            old = torch.cat([st["indices"] for st in states]).add_(
                shift.repeat_interleave(old_sizes)
            )
            new = torch.cat([cg.indices for _, cg in items])
            carried = remap_entries(
                old,
                new + shift.repeat_interleave(torch.tensor(new_sizes, device=device)),
                *(torch.cat([st[key] for st in states]) for key in ("exp_avg", "exp_avg_sq", "age")),
            )
            # the states hold slices of these: their own copies of the indices, not the caller's
            parts = zip(new.split(new_sizes), *(t.split(new_sizes) for t in carried), strict=True)
            for st, (i, m, v, age) in zip(states, parts, strict=True):
                st.update(indices=i, exp_avg=m, exp_avg_sq=v, age=age)

    @staticmethod
    def _check_contiguous(params: list[torch.Tensor]) -> None:
        for p in params:
            lp = local_tensor(p)
            if not lp.is_contiguous():
                raise ValueError(
                    f"CompactAdamW: parameter {tuple(lp.shape)} is not contiguous; compact "
                    "updates scatter into p.view(-1). Make it contiguous "
                    "(p.data = p.data.contiguous())."
                )

    def _compact_update(
        self,
        key: tuple[int, torch.device],
        entries: list[tuple[torch.Tensor, CompactGrad]],
        group: dict[str, Any],
    ) -> None:
        """AdamW on the entries ``cg.indices`` of each ``p`` of one parameter group on one
        device (gather, update in float32, scatter back): each term one op over the flat
        (Σk_p,) state of all of them (:meth:`_flat_state`)."""
        lr, (beta1, beta2) = group["lr"], group["betas"]
        eps, wd = group["eps"], group["weight_decay"]
        m, v, age = self._flat_state(key, [self.state[p] for p, _ in entries])
        g = torch.cat([cg.values.to(torch.float32) for _, cg in entries])
        age.add_(1)  # in place: the new ages
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        flat = [local_tensor(p).view(-1) for p, _ in entries]
        x = torch.cat([f.index_select(0, cg.indices).to(torch.float32)
                       for f, (_, cg) in zip(flat, entries)])
        adamw_entries_([x], [m], [v], [age], lr=lr, betas=(beta1, beta2), eps=eps,
                       weight_decay=wd)
        sizes = [cg.indices.numel() for _, cg in entries]
        for f, (_, cg), xi in zip(flat, entries, x.split(sizes)):
            f.index_copy_(0, cg.indices, xi.to(f.dtype))

    def _flat_state(
        self, key: tuple[int, torch.device], states: list[dict[str, Any]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The moments and ages of ``states`` as three flat ``(Σk_p,)`` tensors, each state's
        ``exp_avg`` / ``exp_avg_sq`` / ``age`` a slice of them. Made again (one copy) when a
        state's tensors were replaced since (a changed selection, a loaded state dict);
        between refreshes the same flat tensors serve every step."""
        now = [(st["exp_avg"], st["exp_avg_sq"], st["age"]) for st in states]
        flat = self._flat.get(key)
        if flat is None or len(flat.views) != len(now) or not all(
            a is b for old, new in zip(flat.views, now) for a, b in zip(old, new)
        ):
            sizes = [t[0].numel() for t in now]
            m, v, age = (torch.cat([t[j] for t in now]) for j in range(3))
            for st, mi, vi, ai in zip(states, m.split(sizes), v.split(sizes), age.split(sizes)):
                st.update(exp_avg=mi, exp_avg_sq=vi, age=ai)
            flat = self._flat[key] = _FlatState(
                m, v, age, [(st["exp_avg"], st["exp_avg_sq"], st["age"]) for st in states]
            )
        return flat.exp_avg, flat.exp_avg_sq, flat.age

    # --- state ----------------------------------------------------------------------------------

    def state_bytes(self) -> int:
        """Bytes of every state tensor (compact and dense; a DTensor counts its local shard)."""
        total = 0
        for state in self.state.values():
            for t in state.values():
                if isinstance(t, torch.Tensor):
                    t = local_tensor(t)
                    total += t.numel() * t.element_size()
        return total

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as ``torch.optim.Optimizer`` does, then restore the compact states exactly.

        Torch casts every state tensor of a floating parameter to the parameter's dtype, which
        would turn int64 indices and int32 ages into floats (indices above 2^24 — 256 in bfloat16 —
        rounded) and bfloat16-parameter moments into bfloat16. The compact states are therefore
        taken from ``state_dict`` with their own dtypes (int64, float32, float32, int32), copied
        onto the parameter's device.
        """
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        compact = {pid: st for pid, st in state_dict["state"].items() if "indices" in st}
        rest = {pid: st for pid, st in state_dict["state"].items() if pid not in compact}
        super().load_state_dict({**state_dict, "state": rest})
        self._flat.clear()  # new param groups, new state tensors: both caches start afresh
        self._checked.clear()
        for pid, p in zip(saved_ids, params):
            saved = compact.get(pid)
            if saved is None:
                continue
            device = local_tensor(p).device
            missing = sorted(set(_COMPACT_DTYPES) - set(saved))
            k = saved["indices"].numel()
            if missing or any(saved[key].shape != (k,) for key in _COMPACT_DTYPES):
                raise ValueError(
                    f"CompactAdamW.load_state_dict: compact state of parameter {tuple(p.shape)} "
                    f"is malformed (missing {missing}, or its tensors are not all ({k},)); load a "
                    "state dict saved by CompactAdamW.state_dict()."
                )
            self.state[p] = {
                key: saved[key].to(device=device, dtype=dtype, copy=True)
                for key, dtype in _COMPACT_DTYPES.items()
            }
