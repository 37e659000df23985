"""A toy method, written as docs/ARCHITECTURE.md says a new method is: LayerNorm tuning (only
the backbone's LayerNorm scales and shifts train). Registered on import."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from wpeft.backbones.aurora_adapter import WpeftAurora
from wpeft.methods.base import MethodConfig, PEFTMethod, register


@dataclass
class NormTuningConfig(MethodConfig):
    biases: bool = field(default=True, metadata={"help": "Also train the LayerNorm shifts."})


@register
class NormTuning(PEFTMethod):
    name = "toy_norm_tuning"
    summary = "backbone LayerNorm scales (and shifts) only"
    Config = NormTuningConfig
    default_lr = 5e-3

    def _apply(self, model: WpeftAurora) -> None:
        for module in model.backbone.modules():
            if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                module.weight.requires_grad_(True)
                if module.bias is not None:
                    module.bias.requires_grad_(self.config.biases)
