"""Named backbone configurations: Aurora's ``tiny`` (CPU default), ``small`` (AuroraSmall),
``1.3b`` (Aurora), and Prithvi-WxC's ``prithvi-tiny`` and ``prithvi-2.3b``.

A config is a frozen dataclass that serialises to JSON (it is stored beside every checkpoint and
in every run directory). :class:`BackboneConfig` builds the real ``aurora.Aurora`` model with
``use_lora=False``; :class:`PrithviConfig` the real ``PrithviWxC.model.PrithviWxC`` (the optional
``prithvi`` extra; nothing here imports it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

from wpeft.errors import ConfigError

if TYPE_CHECKING:  # typing.Self is Python 3.11+; annotations are not evaluated at run time
    from typing_extensions import Self

__all__ = ["CONFIGS", "BackboneConfig", "PrithviConfig", "config_from_dict", "get_config"]


class _ConfigRecord:
    """What a backbone config (a frozen dataclass) writes into run and adapter files: its fields
    as a dict, back from one (lists become tuples; an unknown field is refused), and a short
    hash of the architecture."""

    #: Names the config kind in errors ("backbone", "Prithvi").
    config_kind: ClassVar[str] = "backbone"
    #: The model the config builds, as written for people ("Aurora", "Prithvi-WxC").
    model_name: ClassVar[str] = "Aurora"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"Unknown {cls.config_kind} config field(s) {unknown}; known: {sorted(known)}."
            )
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def fingerprint(self) -> str:
        """Short stable hash of the architecture (used to match adapters to backbones)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class BackboneConfig(_ConfigRecord):
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



#: MERRA-2 variables and model levels of the released Prithvi-WxC (``PrithviWxC`` small.yaml).
_MERRA2_SURFACE = (
    "EFLUX", "GWETROOT", "HFLUX", "LAI", "LWGAB", "LWGEM", "LWTUP", "PS", "QV2M", "SLP", "SWGNT",
    "SWTNT", "T2M", "TQI", "TQL", "TQV", "TS", "U10M", "V10M", "Z0M",
)
_MERRA2_STATIC = ("FRACI", "FRLAND", "FROCEAN", "PHIS")
_MERRA2_VERTICAL = ("CLOUD", "H", "OMEGA", "PL", "QI", "QL", "QV", "T", "U", "V")
_MERRA2_LEVELS = (34, 39, 41, 43, 44, 45, 48, 51, 53, 56, 63, 68, 71, 72)

#: Static input channels Prithvi-WxC reads before the static variables (Fourier positional
#: encoding): latitude and longitude, then sin/cos of day of year and of hour of day.
PRITHVI_POSITION_CHANNELS = ("lat", "lon", "sin_doy", "cos_doy", "sin_hod", "cos_hod")


@dataclass(frozen=True)
class PrithviConfig(_ConfigRecord):
    """Arguments of ``PrithviWxC.model.PrithviWxC`` that define an architecture, with the
    variables in channel order (wpeft's Prithvi adapter: :mod:`wpeft.backbones.prithvi_adapter`).

    Attributes:
        name: Config name (``prithvi-tiny``, ``prithvi-2.3b`` or a user's own).
        family: Always ``"prithvi-wxc"``; recorded so that a stored config names its model.
        surf_vars / static_vars / atmos_vars: Variable names (wpeft's Aurora short names for
            ``prithvi-tiny``, MERRA-2 names for the released model).
        levels: Pressure (or model) levels of every atmospheric variable, in channel order.
        grid: The model's fixed grid (lat, lon) in pixels.
        patch_size: Square patch P in pixels (divides ``mask_unit_size``).
        mask_unit_size: Mask unit (lat, lon) in pixels; local attention runs within one, global
            attention across them; divides ``grid``.
        embed_dim / n_heads / mlp_multiplier: Token width D, heads, MLP hidden / D.
        n_blocks_encoder / n_blocks_decoder: Local-global pairs; each stage builds
            ``2 n + 1`` transformer blocks.
        max_history_size: Input steps T stacked channel-wise (``input_size_time``).
        timestep_hours: Forecast step (the lead time fed to the model).
        residual: ``"temporal"`` (increment over the last input), ``"climate"`` (over a
            climatology; the released model) or ``"none"``.
        encoder_shifting / decoder_shifting: Swin shifting of the mask units.
    """

    config_kind: ClassVar[str] = "Prithvi"
    model_name: ClassVar[str] = "Prithvi-WxC"

    name: str
    family: str = "prithvi-wxc"
    surf_vars: tuple[str, ...] = ("2t", "10u", "10v", "msl")
    static_vars: tuple[str, ...] = ("lsm", "z", "slt")
    atmos_vars: tuple[str, ...] = ("z", "u", "v", "t", "q")
    levels: tuple[int, ...] = (850, 500, 250)
    grid: tuple[int, int] = (32, 64)
    patch_size: int = 2
    mask_unit_size: tuple[int, int] = (8, 16)
    embed_dim: int = 192
    n_heads: int = 6
    mlp_multiplier: int = 4
    n_blocks_encoder: int = 2
    n_blocks_decoder: int = 1
    max_history_size: int = 2
    timestep_hours: int = 6
    residual: str = "temporal"
    encoder_shifting: bool = False
    decoder_shifting: bool = False

    def __post_init__(self) -> None:
        if self.family != "prithvi-wxc":
            raise ConfigError(f"PrithviConfig family must be 'prithvi-wxc', got {self.family!r}.")
        if self.patch_size < 1:
            raise ConfigError(f"patch_size must be >= 1, got {self.patch_size}.")
        for axis, n, mu in zip(("lat", "lon"), self.grid, self.mask_unit_size):
            if mu % self.patch_size:
                raise ConfigError(
                    f"Mask unit {self.mask_unit_size} is not divisible by the patch size "
                    f"{self.patch_size} along {axis}; choose a mask unit that is a multiple of it."
                )
            if n % mu:
                raise ConfigError(
                    f"Grid {self.grid} is not divisible by the mask unit {self.mask_unit_size} "
                    f"along {axis} ({n} % {mu} = {n % mu}); crop or pad the grid, or choose a mask "
                    "unit that divides it."
                )
        if self.embed_dim % self.n_heads:
            raise ConfigError(
                f"embed_dim {self.embed_dim} must be divisible by n_heads {self.n_heads}."
            )
        if self.residual not in ("temporal", "climate", "none"):
            raise ConfigError(
                f"residual must be 'temporal', 'climate' or 'none', got {self.residual!r}."
            )

    @property
    def variables(self) -> tuple[str, ...]:
        """Dynamic input channels in Prithvi's order: surface, then every atmospheric variable
        at every level (``"z_500"``); the V axis of the kernels E."""
        return self.surf_vars + tuple(f"{v}_{lv}" for v in self.atmos_vars for lv in self.levels)

    @property
    def static_channels(self) -> tuple[str, ...]:
        """Static input channels: :data:`PRITHVI_POSITION_CHANNELS`, then ``static_vars``."""
        return PRITHVI_POSITION_CHANNELS + self.static_vars

    def prithvi_kwargs(self) -> dict[str, Any]:
        """Architecture arguments of ``PrithviWxC(**kwargs)`` (the scalers are the adapter's)."""
        return {
            "in_channels": len(self.variables),
            "input_size_time": self.max_history_size,
            "in_channels_static": len(self.static_channels) - 2,  # lat/lon go to the encoding
            "input_scalers_epsilon": 0.0,
            "static_input_scalers_epsilon": 0.0,
            "n_lats_px": self.grid[0],
            "n_lons_px": self.grid[1],
            "patch_size_px": (self.patch_size, self.patch_size),
            "mask_unit_size_px": tuple(self.mask_unit_size),
            "mask_ratio_inputs": 0.0,
            "mask_ratio_targets": 0.0,
            "embed_dim": self.embed_dim,
            "n_blocks_encoder": self.n_blocks_encoder,
            "n_blocks_decoder": self.n_blocks_decoder,
            "mlp_multiplier": self.mlp_multiplier,
            "n_heads": self.n_heads,
            "dropout": 0.0,
            "drop_path": 0.0,
            "parameter_dropout": 0.0,
            "residual": self.residual,
            "masking_mode": "global",
            "positional_encoding": "fourier",
            "encoder_shifting": self.encoder_shifting,
            "decoder_shifting": self.decoder_shifting,
        }



CONFIGS: dict[str, BackboneConfig | PrithviConfig] = {
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

# Prithvi-WxC (the optional ``prithvi`` extra). A few million parameters on the embedded
# world's 32 x 64 grid: 4 x 4 patches (the 8 x 16 token grid of Aurora ``tiny``), 8 x 16 mask
# units (4 x 4 units of 2 x 4 tokens).
CONFIGS["prithvi-tiny"] = PrithviConfig(name="prithvi-tiny", patch_size=4)
# Architecture of the released Prithvi-WxC 2.3B (prithvi.wxc.2300m.v1) on MERRA-2's 360 x 576 grid.
CONFIGS["prithvi-2.3b"] = PrithviConfig(
    name="prithvi-2.3b",
    surf_vars=_MERRA2_SURFACE,
    static_vars=_MERRA2_STATIC,
    atmos_vars=_MERRA2_VERTICAL,
    levels=_MERRA2_LEVELS,
    grid=(360, 576),
    patch_size=2,
    mask_unit_size=(30, 32),
    embed_dim=2560,
    n_heads=16,
    mlp_multiplier=4,
    n_blocks_encoder=12,
    n_blocks_decoder=2,
    max_history_size=2,
    timestep_hours=6,
    residual="climate",
    decoder_shifting=True,
)


def get_config(name: str) -> BackboneConfig | PrithviConfig:
    """A named config; unknown names list the known ones."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise ConfigError(
            f"Unknown backbone {name!r}; choose one of {sorted(CONFIGS)}."
        ) from None


def config_from_dict(d: dict[str, Any]) -> BackboneConfig | PrithviConfig:
    """A config back from its :meth:`to_dict` (a Prithvi config records ``family``)."""
    if d.get("family") == "prithvi-wxc":
        return PrithviConfig.from_dict(d)
    return BackboneConfig.from_dict(d)
