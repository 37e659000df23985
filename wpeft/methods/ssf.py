"""SSF baseline: Scale-and-Shift Features (Lian et al. 2022).

Every chosen linear of every backbone block gets a learnable per-channel affine map on its output,
``y -> y · γ + β`` with ``γ, β`` of shape ``(out_features,)``. ``init="paper"`` (the default)
draws ``γ ~ N(1, σ²)`` and ``β ~ N(0, σ²)`` with ``σ = init_std = 0.02``, as the SSF code does
(``nn.init.normal_(scale, mean=1, std=.02)``, ``nn.init.normal_(shift, std=.02)``), from a
generator seeded by ``seed`` (the run's seed), so runs reproduce; the model then starts slightly
off the pretrained one. ``init="identity"`` sets ``γ = 1, β = 0``: the model starts exactly as
the pretrained one. The original SSF also rescales after norms and the
patch embedding; here it covers the backbone's attention (qkv, proj) and MLP (fc1, fc2) outputs,
the same layers the LoRA/DoRA baselines adapt, so the comparison is between update forms.

Installed with forward hooks on those ``nn.Linear`` modules (no library fork); ``γ, β`` live in
``method.added``. The size is fixed by the architecture: ``2 · out_features`` per linear, i.e.
``18 · D_b`` per block with all four sublayers and MLP ratio 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from wpeft.backbones.aurora_adapter import WpeftAurora
from wpeft.errors import ConfigError
from wpeft.methods.base import MethodConfig, PEFTMethod, register
from wpeft.methods.lora import SUBLAYERS, block_linears, validate_sublayers

__all__ = ["SSF", "SSFConfig", "ScaleShift"]


class ScaleShift(nn.Module):
    """Per-channel ``x · scale + shift`` over the last axis.

    Args:
        channels: Size C of the last axis.
        std: 0: identity at init (scale 1, shift 0); > 0: scale ~ N(1, std²), shift ~ N(0, std²)
            (SSF's init), drawn on the CPU from ``generator``.
        generator: The random stream of the draws (needed when ``std > 0``).
    """

    def __init__(
        self, channels: int, std: float = 0.0, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        scale, shift = torch.ones(channels), torch.zeros(channels)  # (C,), (C,)
        if std > 0:
            scale.add_(std * torch.randn(channels, generator=generator))
            shift.add_(std * torch.randn(channels, generator=generator))
        self.scale = nn.Parameter(scale)
        self.shift = nn.Parameter(shift)

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

    init: Literal["paper", "identity"] = field(
        default="paper",
        metadata={"help": "'paper': scale ~ N(1, init_std²), shift ~ N(0, init_std²) as in the "
                          "SSF code (the model starts slightly off the pretrained one); "
                          "'identity': scale 1, shift 0 (starts exactly as the pretrained one)."},
    )
    init_std: float = field(
        default=0.02,
        metadata={"help": "σ of the 'paper' init (SSF's code: 0.02)."},
    )
    seed: int = field(
        default=0,
        metadata={"help": "Seed of the 'paper' init's draws (a run passes its own seed)."},
    )

    def __post_init__(self) -> None:
        self.sublayers = validate_sublayers(self.sublayers, field="sublayers")
        if self.init not in ("paper", "identity"):
            raise ConfigError(f"init must be 'paper' or 'identity', got {self.init!r}.")
        if not (math.isfinite(self.init_std) and self.init_std > 0):
            raise ConfigError(
                f"init_std must be a finite number > 0 (σ of the 'paper' init), got "
                f"{self.init_std!r}; use init='identity' for no noise."
            )


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
        cfg = self.config
        std = cfg.init_std if cfg.init == "paper" else 0.0
        generator = torch.Generator().manual_seed(cfg.seed)  # drawn in block, sublayer order
        for info, sub, linear in block_linears(model, cfg.sublayers).values():
            assert isinstance(linear, nn.Linear), f"{info.name}.{sub} is {type(linear).__name__}"
            key = info.name.replace(".", "_")  # "encoder0_1": module names cannot hold dots
            if key not in self.added:
                self.added[key] = nn.ModuleDict()
            affine = ScaleShift(linear.out_features, std, generator).to(linear.weight.device)
            self.added[key][sub] = affine
            self._handles.append(linear.register_forward_hook(_output_hook(affine)))


def _output_hook(affine: ScaleShift):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return affine(output)

    return hook
