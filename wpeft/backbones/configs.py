"""Named Aurora configurations: ``tiny`` (CPU default), ``small`` (AuroraSmall), ``1.3b`` (Aurora).

A config is a frozen dataclass that serialises to JSON (it is stored beside every checkpoint and
in every run directory) and builds the real ``aurora.Aurora`` model with ``use_lora=False``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from wpeft.errors import ConfigError

__all__ = ["BackboneConfig", "CONFIGS", "get_config"]


@dataclass(frozen=True)
class BackboneConfig:
    """Keyword arguments of ``aurora.Aurora`` that define an architecture.

    Attributes:
        name: Config name (``tiny``, ``small``, ``1.3b`` or a user's own).
        surf_vars / static_vars / atmos_vars: Aurora short names, in embedding order.
        embed_dim: Width D of the patch embedding and of the first Swin stage.
        encoder_depths / decoder_depths: Swin blocks per stage.
        encoder_num_heads / decoder_num_heads: Attention heads per stage.
        num_heads: Heads of the Perceiver level aggregation / decoder.
        patch_size: Patch size P (grid H and W must be multiples of it).
        window_size: Swin window (levels, lat, lon).
        latent_levels: Surface + latent pressure levels after aggregation.
        mlp_ratio: MLP hidden width / block width.
        max_history_size: History steps T folded into each token.
        timestep_hours: Forecast step of the model.
        residual: Predict the increment over the last input step (in normalised units) instead
            of the full state. Aurora's released checkpoints predict full states (False); the
            ``tiny`` backbone pretrained by wpeft predicts increments, as GraphCast does.
    """

    name: str
    surf_vars: tuple[str, ...] = ("2t", "10u", "10v", "msl")
    static_vars: tuple[str, ...] = ("lsm", "z", "slt")
    atmos_vars: tuple[str, ...] = ("z", "u", "v", "t", "q")
    embed_dim: int = 512
    encoder_depths: tuple[int, ...] = (6, 10, 8)
    encoder_num_heads: tuple[int, ...] = (8, 16, 32)
    decoder_depths: tuple[int, ...] = (8, 10, 6)
    decoder_num_heads: tuple[int, ...] = (32, 16, 8)
    num_heads: int = 16
    patch_size: int = 4
    window_size: tuple[int, int, int] = (2, 6, 12)
    latent_levels: int = 4
    mlp_ratio: float = 4.0
    max_history_size: int = 2
    timestep_hours: int = 6
    residual: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.encoder_depths) != len(self.encoder_num_heads):
            raise ConfigError(
                f"encoder_depths {self.encoder_depths} and encoder_num_heads "
                f"{self.encoder_num_heads} must have the same length."
            )
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}."
            )
        if self.patch_size < 1:
            raise ConfigError(f"patch_size must be >= 1, got {self.patch_size}.")

    @property
    def variables(self) -> tuple[str, ...]:
        """Embedding order of the kernels E: surface, static, then atmospheric."""
        return self.surf_vars + self.static_vars + self.atmos_vars

    def aurora_kwargs(self) -> dict[str, Any]:
        """Arguments for ``aurora.Aurora(**kwargs)``."""
        return dict(
            surf_vars=self.surf_vars,
            static_vars=self.static_vars,
            atmos_vars=self.atmos_vars,
            embed_dim=self.embed_dim,
            encoder_depths=self.encoder_depths,
            encoder_num_heads=self.encoder_num_heads,
            decoder_depths=self.decoder_depths,
            decoder_num_heads=self.decoder_num_heads,
            num_heads=self.num_heads,
            patch_size=self.patch_size,
            window_size=self.window_size,
            latent_levels=self.latent_levels,
            mlp_ratio=self.mlp_ratio,
            max_history_size=self.max_history_size,
            timestep=timedelta(hours=self.timestep_hours),
            use_lora=False,
            **self.extra,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackboneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"Unknown backbone config field(s) {unknown}; known: {sorted(known)}.")
        tuples = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**tuples)

    def fingerprint(self) -> str:
        """Short stable hash of the architecture (used to match adapters to backbones)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


CONFIGS: dict[str, BackboneConfig] = {
    # A few million parameters; runs on a laptop CPU on the embedded world (32 x 64 grid).
    "tiny": BackboneConfig(
        name="tiny",
        embed_dim=64,
        encoder_depths=(2, 2, 2),
        encoder_num_heads=(2, 4, 8),
        decoder_depths=(2, 2, 2),
        decoder_num_heads=(8, 4, 2),
        num_heads=2,
        patch_size=4,
        window_size=(2, 4, 8),
        latent_levels=4,
        residual=True,
    ),
    # Architecture of aurora.AuroraSmall (~113M parameters).
    "small": BackboneConfig(
        name="small",
        embed_dim=256,
        encoder_depths=(2, 6, 2),
        encoder_num_heads=(4, 8, 16),
        decoder_depths=(2, 6, 2),
        decoder_num_heads=(16, 8, 4),
        num_heads=8,
    ),
    # Architecture of aurora.Aurora (1.3B parameters).
    "1.3b": BackboneConfig(name="1.3b"),
}


def get_config(name: str) -> BackboneConfig:
    """A named config; unknown names list the known ones."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise ConfigError(
            f"Unknown backbone {name!r}; choose one of {sorted(CONFIGS)}."
        ) from None
