"""SSF baseline: Scale-and-Shift Features (Lian et al. 2022).

Every chosen linear of every backbone block gets a learnable per-channel affine map on its output,
``y -> y · γ + β`` with ``γ, β`` of shape ``(out_features,)``, initialised to ``γ = 1, β = 0`` so
the model starts exactly as the pretrained one. The original SSF also rescales after norms and the
patch embedding; here it covers the backbone's attention (qkv, proj) and MLP (fc1, fc2) outputs,
the same layers the LoRA/DoRA baselines adapt, so the comparison is between update forms.

Installed with forward hooks on those ``nn.Linear`` modules (no library fork); ``γ, β`` live in
``method.added``. The size is fixed by the architecture: ``2 · out_features`` per linear, i.e.
``18 · D_b`` per block with all four sublayers and MLP ratio 4.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from wpeft.backbones.aurora_adapter import WpeftAurora
from wpeft.methods.base import MethodConfig, PEFTMethod, register
from wpeft.methods.lora import SUBLAYERS, block_linears, validate_sublayers

__all__ = ["SSF", "SSFConfig", "ScaleShift"]


class ScaleShift(nn.Module):
    """Per-channel ``x · scale + shift`` over the last axis; identity at init.

    Args:
        channels: Size C of the last axis.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))  # (C,)
        self.shift = nn.Parameter(torch.zeros(channels))  # (C,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(..., C)`` -> ``(..., C)``."""
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


@dataclass
class SSFConfig(MethodConfig):
    """SSF settings."""

    sublayers: tuple[str, ...] = field(
        default=SUBLAYERS,
        metadata={"help": "Which linears of every backbone block get a scale and shift on their "
                          "output (qkv, proj: window attention; fc1, fc2: MLP)."},
    )

    def __post_init__(self) -> None:
        self.sublayers = validate_sublayers(self.sublayers, field="sublayers")


@register
class SSF(PEFTMethod):
    """Scale-and-shift of the backbone blocks' linear outputs (forward hooks)."""

    name = "ssf"
    Config = SSFConfig
    size_knob = None  # fixed by the architecture
    summary = "per-channel scale and shift after the backbone's attention and MLP linears"
    config: SSFConfig

    def __init__(self, config: SSFConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._handles: list[Any] = []

    def _apply(self, model: WpeftAurora) -> None:
        for info, sub, linear in block_linears(model, self.config.sublayers).values():
            assert isinstance(linear, nn.Linear), f"{info.name}.{sub} is {type(linear).__name__}"
            key = info.name.replace(".", "_")  # "encoder0_1": module names cannot hold dots
            if key not in self.added:
                self.added[key] = nn.ModuleDict()
            affine = ScaleShift(linear.out_features).to(linear.weight.device)
            self.added[key][sub] = affine
            self._handles.append(linear.register_forward_hook(_output_hook(affine)))


def _output_hook(affine: ScaleShift):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return affine(output)

    return hook
