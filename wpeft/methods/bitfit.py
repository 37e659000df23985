"""BitFit: only the bias vectors of the backbone train."""

from __future__ import annotations

import torch

from wpeft.backbones.aurora_adapter import WpeftAurora
from wpeft.methods.base import PEFTMethod, register

__all__ = ["BitFit"]


@register
class BitFit(PEFTMethod):
    name = "bitfit"
    summary = "backbone biases only"

    def _apply(self, model: WpeftAurora) -> None:
        for module in model.backbone.modules():
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.nn.Parameter):
                bias.requires_grad_(True)
