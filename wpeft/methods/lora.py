"""LoRA and DoRA baselines: low-rank updates of the backbone's attention and MLP linears.

Both come from Hugging Face ``peft`` (``inject_adapter_in_model`` on ``model.backbone``); wpeft
does not re-implement them. What wpeft adds is the choice of layers: the targets are listed as
full module names built from ``model.blocks`` (``encoder_layers.0.blocks.1.attn.qkv``, ...), so
a loose substring can never also hit the encoder/decoder Perceivers, and the injection is checked
to have wrapped exactly those modules.

LoRA on ``Linear(in, out)`` adds ``A (r, in)`` and ``B (out, r)``: ``r·(in + out)`` scalars, with
``B = 0`` at init so the model starts as the pretrained one. DoRA additionally learns a per-output
magnitude vector ``(out,)`` initialised to the column norms of the base weight (the same function
at init up to rounding).

peft wraps each target (``qkv`` -> ``qkv.base_layer`` + ``qkv.lora_A`` ...), which renames keys in
``model.state_dict()``; the method API groups and names pristine parameters by identity at apply
time, so ``trainable``, ``changed`` and ``adapter_state`` are unaffected (the reference state must
be the *pristine* model's, keyed as before wrapping).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from wpeft.backbones.aurora_adapter import BlockInfo, WpeftAurora
from wpeft.errors import ConfigError
from wpeft.methods.base import MethodConfig, PEFTMethod, register

__all__ = [
    "SUBLAYERS",
    "DoRA",
    "DoRAConfig",
    "LoRA",
    "LoRAConfig",
    "block_linears",
    "validate_sublayers",
]

#: The linear sublayers of a Swin3D block that LoRA-style baselines may target.
SUBLAYERS = ("qkv", "proj", "fc1", "fc2")


def _sublayer(info: BlockInfo, sublayer: str) -> nn.Module:
    """The block's linear ``sublayer``, as the backbone's block declares it (Aurora's Swin3D
    blocks and Prithvi-WxC's transformers name their linears differently)."""
    return info.linear(sublayer)


def block_linears(
    model: WpeftAurora, sublayers: tuple[str, ...] = SUBLAYERS
) -> dict[str, tuple[BlockInfo, str, nn.Module]]:
    """The chosen linears of every backbone block, selected by module.

    Returns:
        ``{name relative to model.backbone: (block, sublayer, module)}`` in execution order.
    """
    names = {id(m): n for n, m in model.backbone.named_modules()}
    out: dict[str, tuple[BlockInfo, str, nn.Module]] = {}
    for info in model.blocks:
        for sub in sublayers:
            module = _sublayer(info, sub)
            out[names[id(module)]] = (info, sub, module)
    return out


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate_sublayers(sublayers: object, field: str = "targets") -> tuple[str, ...]:
    """``sublayers`` as a tuple; ConfigError unless it is a non-empty sequence of distinct
    names from :data:`SUBLAYERS` (a list from JSON is fine, a bare string is not)."""
    ok = isinstance(sublayers, (tuple, list)) and len(sublayers) > 0
    ok = ok and all(s in SUBLAYERS for s in sublayers) and len(set(sublayers)) == len(sublayers)
    if not ok:
        raise ConfigError(f"{field} must be distinct names among {SUBLAYERS}, got {sublayers!r}.")
    return tuple(sublayers)


@dataclass
class LoRAConfig(MethodConfig):
    """LoRA settings."""

    rank: int = field(
        default=8, metadata={"help": "Rank r of every update B @ A (the size knob)."}
    )
    alpha: float | None = field(
        default=None,
        metadata={"help": "Scaling numerator; the update is (alpha / rank) · B A. None: "
                          "alpha = rank, i.e. scaling 1 at every rank, so the budget matcher can "
                          "change the rank alone."},
    )
    dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the LoRA branch's input (0 disables it)."}
    )
    targets: tuple[str, ...] = field(
        default=SUBLAYERS,
        metadata={"help": "Which linears of every backbone block get an update (qkv, proj: "
                          "window attention; fc1, fc2: MLP)."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"rank must be an integer >= 1, got {self.rank!r}.")
        if self.alpha is not None and not (_is_number(self.alpha) and self.alpha > 0):
            raise ConfigError(f"alpha must be > 0 (or None for alpha = rank), got {self.alpha!r}.")
        if not (_is_number(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}.")
        self.targets = validate_sublayers(self.targets)


@register
class LoRA(PEFTMethod):
    """LoRA (Hu et al. 2022) via ``peft`` on every backbone block's qkv/proj/fc1/fc2."""

    name = "lora"
    Config = LoRAConfig
    size_knob = "rank"
    summary = "low-rank updates of the backbone's attention and MLP linears (peft)"
    config: LoRAConfig
    #: peft's DoRA switch; the DoRA subclass turns it on.
    use_dora: ClassVar[bool] = False

    def _apply(self, model: WpeftAurora) -> None:
        cfg = self.config
        targets = block_linears(model, cfg.targets)
        peft_config = LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.rank if cfg.alpha is None else cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=list(targets),
            use_dora=self.use_dora,
            bias="none",
        )
        inject_adapter_in_model(peft_config, model.backbone)
        wrapped = {n for n, m in model.backbone.named_modules() if isinstance(m, LoraLayer)}
        if wrapped != set(targets):
            raise RuntimeError(
                f"peft wrapped {sorted(wrapped ^ set(targets))[:3]}... differently from the "
                f"{len(targets)} chosen block linears."
            )


@dataclass
class DoRAConfig(LoRAConfig):
    """DoRA settings: as :class:`LoRAConfig` (the magnitude vectors have no settings)."""


@register
class DoRA(LoRA):
    """DoRA (Liu et al. 2024): LoRA on the direction plus a learned per-output magnitude (peft)."""

    name = "dora"
    Config = DoRAConfig
    size_knob = "rank"
    summary = "weight-decomposed low-rank updates of the backbone's linears (peft)"
    use_dora = True
