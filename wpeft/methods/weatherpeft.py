"""WeatherPEFT = TADP (forward pass: dynamic prompts from the embedding kernels) + SFAS
(backward pass: annealed Fisher-guided selection of the backbone entries that update).

The composition is literal: SFAS selects over the backbone's own parameters, and the TADP
generators are installed afterwards, outside the backbone, so they are never selection
candidates; they train whole and count in the budget as ``added``.
"""

from __future__ import annotations

from dataclasses import dataclass

from wpeft.methods.base import register
from wpeft.methods.sfas import SFAS, SFASConfig
from wpeft.methods.tadp import TADPConfig, TADPPrompted

__all__ = ["WeatherPEFT", "WeatherPEFTConfig"]


@dataclass
class WeatherPEFTConfig(SFASConfig, TADPConfig):
    """SFAS settings (``keep_ratio`` is the budget knob) plus TADP settings (``num_prompts``)."""

    def __post_init__(self) -> None:
        SFASConfig.__post_init__(self)
        TADPConfig.__post_init__(self)


@register
class WeatherPEFT(TADPPrompted, SFAS):
    """SFAS's ``_apply`` selects over the backbone, then :class:`TADPPrompted` installs the
    generators (method order: TADPPrompted, SFAS, ..., PEFTMethod)."""

    name = "weatherpeft"
    Config = WeatherPEFTConfig
    size_knob = "keep_ratio"
    summary = "TADP prompts + SFAS annealed Fisher selection (the paper's method)"
    config: WeatherPEFTConfig

    def budget_split(self) -> dict[str, float]:
        """``{"tadp": generators, "sfas": selected backbone entries}`` as fractions of the
        backbone (plus ``"encoder_decoder"`` when the policy trains them); they sum to
        :meth:`budget_fraction`. The budget matcher sizes TADP first (the task's prompt
        count) and gives SFAS the rest."""
        assert self.model is not None, "apply the method first"
        t = self.trainable()
        split = {"tadp": t["added"] / self.backbone_size, "sfas": t["backbone"] / self.backbone_size}
        if t["encoder"] or t["decoder"]:
            split["encoder_decoder"] = (t["encoder"] + t["decoder"]) / self.backbone_size
        return split
