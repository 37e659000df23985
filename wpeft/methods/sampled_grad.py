"""Weight gradients of linear layers at a few selected entries only (lean SFAS).

Between two mask refreshes SFAS (METHOD.md §3) needs dL/dW only at the k selected entries of
each backbone weight. For a linear layer y = x Wᵀ + b with x ``(..., in)`` and the gradient of
the output g ``(..., out)``,

    dL/dW[r, c] = Σ_t g[t, r] · x[t, c]      (t over all T leading positions),

so the entries at k flat indices are a *sampled* dense-dense product: O(k·T) work instead of
O(out·in·T), and no dense ``(out, in)`` gradient is ever formed.

* :func:`sampled_weight_grad` computes those k values (in chunks of indices, so the temporaries
  are ``(T, chunk)``; accumulated in float32).
* :class:`SampledLinearGrads` installs a custom autograd function in place of the ``forward``
  of given ``nn.Linear`` instances. While it holds indices, each weight's gradient is computed
  only there and handed to a sink (the weight's ``.grad`` stays None); input and bias gradients
  stay exact and dense. Without indices the weight gradient is the dense one, bitwise as
  ``nn.Linear``'s. The indices in force are those at *backward* time, so a graph built before a
  refresh is differentiated with the new mask. Works under ``torch.utils.checkpoint``
  (``use_reentrant=False``: the forward runs twice, the backward once, so the sink is called once
  per backward use of a module) and under autocast (the inputs are cast as ``F.linear`` would be
  cast; the sampled values are accumulated in float32 all the same).

A weight used outside its module's ``forward`` (e.g. ``nn.MultiheadAttention.out_proj``, whose
weight the attention function reads directly) is not seen by the function and keeps getting a
dense gradient; Aurora's Swin3D blocks call all their linears as modules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wpeft.errors import ConfigError

__all__ = ["DEFAULT_TEMP_NUMEL", "SampledLinearGrads", "sampled_weight_grad"]

Sink = Callable[[str, torch.Tensor], None]

#: Default cap on the entries of one ``(T, chunk)`` temporary of :class:`SampledLinearGrads`
#: (16M float32 = 64 MB): with many positions T (a full-resolution backbone has ~10⁵ tokens) a
#: fixed chunk of 2^14 indices would need gigabytes per temporary.
DEFAULT_TEMP_NUMEL = 1 << 24


# --- the sampled product ------------------------------------------------------------------------


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs (never less precise than the inputs)."""
    return torch.promote_types(dtype, torch.float32)


def _sampled_weight_grad(
    grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, chunk: int
) -> torch.Tensor:
    """:func:`sampled_weight_grad` without the checks (the autograd function's hot path)."""
    n_out, n_in = grad_out.shape[-1], x.shape[-1]
    acc = _accumulation_dtype(torch.promote_types(grad_out.dtype, x.dtype))
    g = grad_out.reshape(-1, n_out)  # (T, out)
    a = x.reshape(-1, n_in)  # (T, in)
    out = torch.empty(indices.numel(), dtype=acc, device=grad_out.device)
    for start in range(0, indices.numel(), chunk):
        idx = indices[start : start + chunk]
        rows = torch.div(idx, n_in, rounding_mode="floor")
        cols = idx - rows * n_in
        g_r = g.index_select(1, rows).to(acc)  # (T, chunk)
        x_c = a.index_select(1, cols).to(acc)  # (T, chunk)
        torch.sum(g_r.mul_(x_c), dim=0, out=out[start : start + chunk])
    return out


def sampled_weight_grad(
    grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, chunk: int = 1 << 14
) -> torch.Tensor:
    """dL/dW at flat ``indices`` of W ``(out, in)`` for y = x Wᵀ + b.

    Args:
        grad_out: dL/dy, ``(..., out)``.
        x: The layer's input, ``(..., in)``, same leading shape as ``grad_out``.
        indices: ``(k,)`` int64 flat indices into ``(out, in)``: rows ``idx // in``, columns
            ``idx % in``.
        chunk: Indices per chunk; the temporaries are ``(T, chunk)`` with T the number of
            leading positions.

    Returns:
        ``(k,)`` float32 (float64 when an input is float64), accumulated in that dtype whatever
        the inputs' dtype (bf16 inputs are cast chunk by chunk).

    Raises:
        ConfigError: ``chunk`` < 1.
        ValueError: Mismatched leading shapes, or indices that are not 1-D int64 in
            ``[0, out·in)`` on the inputs' device.
    """
    if chunk < 1:
        raise ConfigError(f"chunk must be >= 1 index, got {chunk}; use e.g. 1 << 14.")
    if grad_out.dim() < 1 or x.dim() < 1 or grad_out.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"grad_out {tuple(grad_out.shape)} and x {tuple(x.shape)} must be (..., out) and "
            "(..., in) with the same leading shape (the layer's output gradient and input)."
        )
    _check_indices(indices, grad_out.shape[-1] * x.shape[-1], grad_out.device, "indices")
    return _sampled_weight_grad(grad_out, x, indices, chunk)


def _check_form(indices: torch.Tensor, device: torch.device, what: str) -> None:
    """Refuse indices that are not a 1-D int64 tensor on ``device`` (no host sync)."""
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64 or indices.dim() != 1:
        desc = (
            f"{indices.dtype} {tuple(indices.shape)}"
            if isinstance(indices, torch.Tensor)
            else type(indices).__name__
        )
        raise ValueError(
            f"{what} must be a 1-D int64 tensor of flat indices, got {desc}; "
            "pass mask.reshape(-1).nonzero().squeeze(1)."
        )
    if indices.device != device:
        raise ValueError(
            f"{what} are on {indices.device} but the weight is on {device}; move them."
        )


def _out_of_range(indices: torch.Tensor, numel: int) -> torch.Tensor:
    """0-d bool on the indices' device: some index lies outside ``[0, numel)``."""
    if not indices.numel():
        return torch.zeros((), dtype=torch.bool, device=indices.device)
    return (indices.min() < 0) | (indices.max() >= numel)


def _not_increasing(indices: torch.Tensor) -> torch.Tensor:
    """0-d bool on the indices' device: the indices are not strictly increasing."""
    if indices.numel() < 2:
        return torch.zeros((), dtype=torch.bool, device=indices.device)
    return (indices[1:] <= indices[:-1]).any()


def _range_error(indices: torch.Tensor, numel: int, what: str) -> ValueError:
    lo, hi = int(indices.min()), int(indices.max())
    return ValueError(
        f"{what} range over [{lo}, {hi}] but must lie in [0, {numel}) (flat indices into the "
        "weight); take them from a mask shaped like the weight."
    )


def _check_indices(indices: torch.Tensor, numel: int, device: torch.device, what: str) -> None:
    """Refuse indices that are not 1-D int64 in ``[0, numel)`` on ``device`` (one host sync)."""
    _check_form(indices, device, what)
    if bool(_out_of_range(indices, numel)):
        raise _range_error(indices, numel, what)


# --- the autograd function ----------------------------------------------------------------------


@dataclass(eq=False)
class _Slot:
    """One installed module: its name, its indices (None: dense) and where values go."""

    name: str
    owner: SampledLinearGrads
    indices: torch.Tensor | None = None


class _SampledLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)``; the weight gradient sampled at the slot's indices."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, slot: _Slot
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.slot = slot
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        slot: _Slot = ctx.slot
        n_out = weight.shape[0]
        g = grad_out.reshape(-1, n_out)  # (T, out)
        grad_x = grad_w = grad_b = None
        # The same products autograd takes for nn.Linear (addmm/mm backward), so the dense
        # gradients are bitwise equal to nn.Linear's.
        if ctx.needs_input_grad[0]:
            grad_x = g.mm(weight).view(x.shape)
        if ctx.needs_input_grad[1]:
            if slot.indices is None:
                grad_w = g.t().mm(x.reshape(-1, x.shape[-1]))
            else:
                values = _sampled_weight_grad(grad_out, x, slot.indices, slot.owner.chunk_for(g))
                slot.owner.sink(slot.name, values)
        if ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, None


def _cast_like_autocast(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The casts autocast would apply to ``F.linear``'s arguments (none outside autocast)."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device)

    def cast(t: torch.Tensor) -> torch.Tensor:  # autocast leaves float64 alone
        return t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t

    return cast(x), cast(weight), None if bias is None else cast(bias)


# --- installing it on modules -------------------------------------------------------------------


class SampledLinearGrads:
    """While active, the weight gradient of each given ``nn.Linear`` is computed only at that
    module's indices and handed to ``sink(name, values)`` (``(k,)`` float32, once per backward
    use of the module: a module used twice in one forward gives two calls, to be summed); the
    weight's ``.grad`` then stays None (no dense ``(out, in)`` gradient). Input and bias
    gradients are exact and dense as usual. Inactive (indices None), each module's weight
    gradient is the dense one, exactly as ``nn.Linear`` (bitwise equal gradients).

    Each module's ``forward`` is replaced on the *instance* (the class is untouched); modules
    whose weight does not require grad are left alone (see :attr:`names` for those installed).

    Args:
        modules: ``{name: nn.Linear}``; ``name`` is what the sink receives.
        sink: ``sink(name, values)``, called during backward.
        chunk: Indices per chunk of :func:`sampled_weight_grad` (at most; see ``temp_numel``).
        temp_numel: Cap on the entries of one ``(T, chunk)`` temporary: a backward with T
            positions uses ``min(chunk, temp_numel // T)`` indices per chunk (at least 1).

    Raises:
        TypeError: A module is not an ``nn.Linear`` or overrides its ``forward``.
        ValueError: A module already has a forward of its own on the instance (installed twice).
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Linear],
        sink: Sink,
        *,
        chunk: int = 1 << 14,
        temp_numel: int = DEFAULT_TEMP_NUMEL,
    ) -> None:
        if chunk < 1 or temp_numel < 1:
            raise ConfigError(
                f"chunk and temp_numel must be >= 1, got chunk={chunk}, temp_numel={temp_numel}; "
                f"use e.g. chunk=1 << 14, temp_numel={DEFAULT_TEMP_NUMEL}."
            )
        self.sink, self.chunk, self.temp_numel = sink, chunk, temp_numel
        self._slots: dict[str, tuple[nn.Linear, _Slot]] = {}
        self._frozen: set[str] = set()
        for name, module in modules.items():
            if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
                raise TypeError(
                    f"Module {name!r} is a {type(module).__name__}, not a plain nn.Linear; only "
                    "nn.Linear modules (with nn.Linear's forward) can have sampled gradients."
                )
            if "forward" in vars(module):
                raise ValueError(
                    f"Module {name!r} already has a forward of its own on the instance (sampled "
                    "gradients installed twice?); call remove() on the other installation first."
                )
            if not module.weight.requires_grad:
                self._frozen.add(name)
                continue
            self._slots[name] = (module, _Slot(name, self))
        for module, slot in self._slots.values():
            module.forward = self._forward_of(module, slot)

    @staticmethod
    def _forward_of(module: nn.Linear, slot: _Slot) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(input: torch.Tensor) -> torch.Tensor:
            x, weight, bias = _cast_like_autocast(input, module.weight, module.bias)
            return _SampledLinear.apply(x, weight, bias, slot)

        forward.__sampled_slot__ = slot  # type: ignore[attr-defined]
        return forward

    def chunk_for(self, grad_out: torch.Tensor) -> int:
        """Indices per chunk for ``grad_out`` ``(T, out)``: ``chunk``, fewer when T is large."""
        return max(1, min(self.chunk, self.temp_numel // max(1, grad_out.shape[0])))

    @property
    def names(self) -> list[str]:
        """Names of the modules installed (those whose weight requires grad)."""
        return list(self._slots)

    @property
    def active(self) -> bool:
        """Whether indices are set (sampled weight gradients)."""
        return any(slot.indices is not None for _, slot in self._slots.values())

    def set_indices(self, indices: Mapping[str, torch.Tensor] | None) -> None:
        """Per-module sorted int64 flat indices, or None = inactive (dense gradients).

        Every installed module must be given (an empty tensor is allowed: its sink then gets an
        empty ``(0,)`` tensor); entries for modules left alone because their weight is frozen
        are accepted and ignored. Nothing changes unless all are valid.

        Raises:
            KeyError: A module is missing, or a name is not one of ``modules``.
            ValueError: Indices of a module are not 1-D int64 on the weight's device, out of
                ``[0, out·in)``, or not strictly increasing.
        """
        if indices is None:
            for _, slot in self._slots.values():
                slot.indices = None
            return
        missing = [n for n in self._slots if n not in indices]
        if missing:
            raise KeyError(
                f"set_indices got no indices for module(s) {missing}; give every module "
                "(an empty int64 tensor selects nothing), or None for dense gradients."
            )
        unknown = [n for n in indices if n not in self._slots and n not in self._frozen]
        if unknown:
            raise KeyError(
                f"set_indices got indices for {unknown}, which are not among the modules given "
                f"to SampledLinearGrads ({len(self._slots)} installed, e.g. {self.names[:3]})."
            )
        flags: dict[torch.device, list[torch.Tensor]] = {}  # per device: (range, order) pairs
        where: dict[str, tuple[torch.device, int]] = {}
        for name, (module, _) in self._slots.items():
            idx, weight = indices[name], module.weight
            _check_form(idx, weight.device, f"Indices of {name!r}")
            pairs = flags.setdefault(weight.device, [])
            where[name] = (weight.device, len(pairs))
            pairs.append(torch.stack([_out_of_range(idx, weight.numel()), _not_increasing(idx)]))
        bad = {dev: torch.stack(pairs).tolist() for dev, pairs in flags.items()}  # 1 sync/device
        for name, (dev, i) in where.items():
            out_of_range, unsorted = bad[dev][i]
            module = self._slots[name][0]
            what = f"Indices of {name!r}"
            if out_of_range:
                raise _range_error(indices[name], module.weight.numel(), what)
            if unsorted:
                raise ValueError(
                    f"{what} must be strictly increasing (sorted, no duplicates); sort them "
                    "(torch.unique does both)."
                )
        for name, (_, slot) in self._slots.items():
            slot.indices = indices[name]

    def remove(self) -> None:
        """Give every module its own forward back (idempotent). A graph built before still
        differentiates, with dense weight gradients."""
        for module, slot in self._slots.values():
            slot.indices = None
            forward = vars(module).get("forward")
            if getattr(forward, "__sampled_slot__", None) is slot:
                del module.forward
        self._slots.clear()
