"""VPT-deep baseline: learned prompt tokens in every backbone block (Jia et al. 2022).

Every Swin3D block owns P free prompt vectors ``(P, D_b)``. As in VPT's Swin variant (and as TADP
injects its generated prompts), the block's P prompts are prepended to every attention window,
take part in the attention, and their outputs are dropped again (``PromptInjector``); they never
enter the MLP. This makes VPT the static counterpart of TADP: same injection, prompts that do not
depend on the task's variables.

Init follows VPT: uniform in ``±sqrt(6 / (fan_in + D_b))`` where fan_in is the patch embedding's
(V·T·P_h·P_w inputs per token; ViT's 3·16·16 in the original). Unlike the additive baselines, VPT
is not the identity at init: the extra keys change every window's softmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from wpeft.backbones.aurora_adapter import BlockInfo, WpeftAurora
from wpeft.errors import ConfigError
from wpeft.methods.base import MethodConfig, PEFTMethod, register
from wpeft.methods.prompt_injection import PromptInjector

__all__ = ["VPTConfig", "VPTDeep"]


@dataclass
class VPTConfig(MethodConfig):
    """VPT-deep settings."""

    num_prompts: int = field(
        default=10,
        metadata={"help": "Prompt tokens P per block (the size knob); each block adds P · D_b."},
    )

    def __post_init__(self) -> None:
        n = self.num_prompts
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"num_prompts must be an integer >= 1, got {n!r}.")


@register
class VPTDeep(PEFTMethod):
    """Learned per-block prompt tokens prepended to every attention window."""

    name = "vpt"
    Config = VPTConfig
    size_knob = "num_prompts"
    summary = "learned prompt tokens in every window of every backbone block (VPT-deep)"
    config: VPTConfig

    def __init__(self, config: VPTConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.injector: PromptInjector | None = None

    @staticmethod
    def key(info: BlockInfo) -> str:
        """Name of a block's prompts in ``added["prompts"]`` (``"encoder0_1"``)."""
        return info.name.replace(".", "_")

    def _apply(self, model: WpeftAurora) -> None:
        cfg = model.config
        fan_in = len(cfg.variables) * cfg.max_history_size * cfg.patch_size**2
        device = next(model.backbone.parameters()).device
        prompts = nn.ParameterDict()
        for info in model.blocks:
            bound = math.sqrt(6.0 / (fan_in + info.dim))
            p = torch.empty(self.config.num_prompts, info.dim, device=device)  # (P, D_b)
            prompts[self.key(info)] = nn.Parameter(p.uniform_(-bound, bound))
        self.added["prompts"] = prompts
        self.injector = PromptInjector(model.blocks, self.prompts).install()

    @property
    def num_prompts(self) -> int:
        return self.config.num_prompts

    def prompts(self, info: BlockInfo) -> torch.Tensor:
        """The block's prompt tokens ``(P, D_b)``."""
        return self.added["prompts"][self.key(info)]
