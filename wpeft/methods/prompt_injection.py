"""Prepending prompt tokens to every window of Aurora's Swin3D window attention (no fork), and
to every sequence of Prithvi-WxC's local (per mask unit) and global attention.

Used by TADP (prompts generated from the embedding kernels) and VPT-deep (learned prompts).
Two hooks on each chosen ``WindowAttention`` module do it:

* a forward pre-hook turns the windows ``(B·nW, N_w, D_b)`` into ``(B·nW, P + N_w, D_b)`` by
  prepending the block's P prompt tokens, and pads a shifted-window mask ``(nW, N_w, N_w)`` with
  zeros to ``(nW, P + N_w, P + N_w)`` (prompts attend and are attended everywhere);
* a forward hook drops the P prompt outputs, so the block sees exactly ``N_w`` tokens again.

Prithvi-WxC's ``MultiheadAttention`` takes one ``(x, mask)`` tuple, x ``[batch, units, tokens,
D]`` (local) or ``[batch, tokens, units, D]`` (global): the prompts are prepended along the
sequence axis (-2) of every row, and the mask (which Prithvi does not use) is passed on.

The attention itself stays Aurora's (fused ``scaled_dot_product_attention``); prompts never
enter the MLP.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wpeft.backbones.aurora_adapter import BlockInfo

__all__ = ["PromptInjector"]


class PromptInjector:
    """Installs prompt hooks on blocks; ``remove()`` restores the plain model.

    Args:
        blocks: Blocks to prompt (``model.blocks`` or a subset).
        prompts: ``prompts(block) -> (P, D_b)`` tensor for that block, called at every forward
            of the block's attention (so prompts follow the live parameters).
    """

    def __init__(
        self, blocks: Sequence[BlockInfo], prompts: Callable[[BlockInfo], torch.Tensor]
    ) -> None:
        self.blocks = list(blocks)
        self.prompts = prompts
        self._handles: list[Any] = []
        self._lengths: dict[int, int] = {}

    def install(self) -> PromptInjector:
        for info in self.blocks:
            attn = info.attention
            self._handles.append(
                attn.register_forward_pre_hook(self._pre_hook(info), with_kwargs=True)
            )
            self._handles.append(attn.register_forward_hook(self._post_hook(info)))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre_hook(self, info: BlockInfo) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            # Prithvi-WxC's attention takes one (x, mask) tuple and ignores the mask
            packed = bool(args) and isinstance(args[0], tuple)
            if packed:
                x, packed_mask = args[0]
            else:
                x = args[0] if args else kwargs.pop("x")
            prompt = self.prompts(info).to(dtype=x.dtype, device=x.device)  # (P, D_b)
            n_prompt = prompt.shape[0]
            if prompt.shape[1] != x.shape[-1]:
                raise ValueError(
                    f"Block {info.name} has width {x.shape[-1]}, its prompts {prompt.shape[1]}."
                )
            self._lengths[info.index] = n_prompt
            # (..., N, D_b) -> (..., P + N, D_b): every sequence (window, mask unit) gets them
            x = torch.cat([prompt.expand(*x.shape[:-2], -1, -1), x], dim=-2)
            if packed:
                return ((x, packed_mask), *args[1:]), kwargs
            mask = kwargs.get("mask")
            if mask is not None:
                # (nW, N, N) -> (nW, P + N, P + N): zeros for prompt rows and columns
                kwargs["mask"] = F.pad(mask, (n_prompt, 0, n_prompt, 0), value=0.0)
            return (x, *args[1:]), kwargs

        return hook

    def _post_hook(self, info: BlockInfo) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return output[..., self._lengths[info.index] :, :]

        return hook
