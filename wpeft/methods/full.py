"""Full-Tuning: every backbone, encoder and decoder parameter trains (the reference)."""

from __future__ import annotations

from wpeft.backbones.aurora_adapter import WpeftAurora
from wpeft.methods.base import PEFTMethod, register

__all__ = ["FullTuning"]


@register
class FullTuning(PEFTMethod):
    name = "full"
    summary = "all parameters train"
    default_lr = 3e-4  # Full-Tuning is usually run with a smaller learning rate

    def _apply(self, model: WpeftAurora) -> None:
        model.requires_grad_(True)
