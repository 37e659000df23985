"""AdaptFormer baseline: a parallel bottleneck adapter beside every block's MLP (Chen et al. 2022).

For MLP input ``x`` ``(B, L, D_b)`` the MLP branch becomes ``MLP(x) + s · Up(ReLU(Down(x)))`` with
``Down: D_b -> b``, ``Up: b -> D_b`` and a fixed scale ``s`` (0.1 in the paper). ``Up`` is zero at
init, so the model starts exactly as the pretrained one. Installed as a forward hook on the
block's ``mlp`` module (no library fork), reading the MLP's input.

Aurora's blocks are res-post-norm (``x + AdaLN(MLP(x))``) where the original ViT is pre-norm, so
here the adapter's output is added before the AdaLN, exactly like the MLP output it runs beside;
its input is the MLP's input, as in AdaptFormer. Each block adds ``2·D_b·b + b + D_b`` scalars.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from wpeft.backbones.aurora_adapter import WpeftAurora
from wpeft.errors import ConfigError
from wpeft.methods.base import MethodConfig, PEFTMethod, register

__all__ = ["AdaptFormer", "AdaptFormerConfig", "BottleneckAdapter"]


class BottleneckAdapter(nn.Module):
    """``s · Up(ReLU(Down(x)))``; zero at init.

    Args:
        dim: Width D_b of the input and output.
        bottleneck: Hidden width b.
        scale: Fixed output scale s.
    """

    def __init__(self, dim: int, bottleneck: int, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.down = nn.Linear(dim, bottleneck)  # weight: PyTorch's kaiming-uniform, as AdaptFormer
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(..., D_b)`` -> ``(..., D_b)``."""
        return self.scale * self.up(torch.relu(self.down(x)))


@dataclass
class AdaptFormerConfig(MethodConfig):
    """AdaptFormer settings."""

    bottleneck: int = field(
        default=16, metadata={"help": "Hidden width b of every adapter (the size knob)."}
    )
    scale: float = field(
        default=0.1, metadata={"help": "Fixed scale s of the adapter output (AdaptFormer's 0.1)."}
    )

    def __post_init__(self) -> None:
        b = self.bottleneck
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ConfigError(f"bottleneck must be an integer >= 1, got {b!r}.")
        s = self.scale
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < math.inf:
            raise ConfigError(f"scale must be a finite number > 0, got {s!r}.")


@register
class AdaptFormer(PEFTMethod):
    """A parallel bottleneck adapter beside every backbone block's MLP."""

    name = "adaptformer"
    Config = AdaptFormerConfig
    size_knob = "bottleneck"
    summary = "parallel bottleneck adapters beside the backbone's MLPs"
    config: AdaptFormerConfig

    def __init__(self, config: AdaptFormerConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._handles: list[Any] = []

    def _apply(self, model: WpeftAurora) -> None:
        device = next(model.backbone.parameters()).device
        for info in model.blocks:
            adapter = BottleneckAdapter(info.dim, self.config.bottleneck, self.config.scale)
            self.added[info.name.replace(".", "_")] = adapter.to(device)
            self._handles.append(info.mlp.register_forward_hook(_parallel_hook(adapter)))


def _parallel_hook(adapter: BottleneckAdapter):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        (x,) = args  # the MLP's input (B, L, D_b)
        return output + adapter(x).to(output.dtype)

    return hook
