"""wpeft's adapter around the real ``PrithviWxC.model.PrithviWxC`` (no fork, no copy).

The optional ``prithvi`` extra (``pip install -e ".[prithvi]"``) provides the package; it is
imported only when a Prithvi backbone is built, so the Aurora path never needs it.

:class:`WpeftPrithvi` exposes what PEFT methods need, with the same names as
:class:`~wpeft.backbones.aurora_adapter.WpeftAurora`:

* ``embedding_kernels()``: ``patch_embedding.proj.weight`` ``(D, T·V, P, P)`` (Prithvi stacks
  the input ``(B, T, V, H, W)`` time-major) reshaped to the paper's ``(D, V, T, P, P)``, V in
  :attr:`~wpeft.backbones.configs.PrithviConfig.variables` order; recomputed from the live weights;
* ``blocks``: the transformer blocks of Prithvi's encoder and decoder in execution order
  (local attention within a mask unit, global attention across mask units, alternating), each
  with the ``MultiheadAttention`` module prompts go into;
* ``parameter_groups()``: by module -- ``encoder`` (patch embeddings, time embeddings, mask
  token), ``backbone`` (Prithvi's encoder and decoder transformers), ``decoder`` (``unembed``);
* ``forward(batch)``: an ``aurora.Batch`` in, the next step as an ``aurora.Batch`` out (physical
  units), as tasks call the Aurora backbone;
* checkpoints from a local file (safetensors or ``torch.load(weights_only=True)``), in
  Prithvi's own key names, never from a hub.

The three groups are this module's children; the unforked ``PrithviWxC`` (:attr:`prithvi`) holds
the same submodules and runs the forward (``masked_inference`` without a mask: every mask unit,
in grid order, deterministic).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from aurora import Batch
from aurora import normalisation as aurora_norm
from aurora.model.util import init_weights
from torch import nn
from torch.utils.checkpoint import checkpoint

from wpeft.backbones.aurora_adapter import (
    BlockInfo,
    check_weights_file,
    nonfinite_tensors,
    norm_key,
    state_mismatches,
)
from wpeft.backbones.configs import PrithviConfig, get_config
from wpeft.backbones.groups import GroupedBackbone
from wpeft.errors import CheckpointError, ConfigError, DataError

if TYPE_CHECKING:  # xarray is imported when a climatology is set, not with the model
    from wpeft.data.climatology import Climatology

__all__ = [
    "INSTALL_HINT",
    "PrithviBlockInfo",
    "WpeftPrithvi",
    "build_prithvi",
    "load_prithvi_weights",
]

INSTALL_HINT = 'pip install -e ".[prithvi]"'

#: LoRA-style sublayer names (:data:`wpeft.methods.lora.SUBLAYERS`) -> that linear of a Prithvi
#: ``Transformer`` block (``attention = (LayerNorm, MultiheadAttention)``, ``ff = (LayerNorm,
#: Mlp)``, ``Mlp.net = (Linear, GELU, Dropout, Linear, Dropout)``).
_SUBLAYERS: dict[str, Callable[[Any], nn.Module]] = {
    "qkv": lambda block: block.attention[1].qkv_layer,
    "proj": lambda block: block.attention[1].w_layer,
    "fc1": lambda block: block.ff[1].net[0],
    "fc2": lambda block: block.ff[1].net[3],
}


def _prithvi_module() -> Any:
    """``PrithviWxC.model``, or ConfigError naming the install command."""
    try:
        import PrithviWxC.model as prithvi_model
    except ImportError as e:
        raise ConfigError(
            f"Prithvi-WxC backbones need the prithviwxc package ({e}); install it with "
            f"{INSTALL_HINT}."
        ) from None
    return prithvi_model


@dataclass(frozen=True)
class PrithviBlockInfo(BlockInfo):
    """One transformer block of Prithvi-WxC, in execution order: :class:`BlockInfo`'s fields,
    read for Prithvi, plus ``local``.

    Attributes:
        stage: ``"encoder"`` or ``"decoder"`` (Prithvi's two transformer stacks).
        layer: Always 0 (one stack per stage).
        depth: Block index within the stage.
        dim: Token width D.
        shifted: Whether the stage shifts mask units (Swin-style) after its global blocks.
        block: The ``Transformer`` module.
        attention: Its ``MultiheadAttention``, called with one ``(x, mask)`` tuple, x of shape
            ``[batch, units, tokens, D]`` (local) or ``[batch, tokens, units, D]`` (global).
        local: True: attention within each mask unit (over its tokens); False: global attention
            across mask units (one sequence per token position).
    """

    local: bool

    def linear(self, sublayer: str) -> nn.Module:
        """The block's ``qkv`` / ``proj`` (attention) or ``fc1`` / ``fc2`` (MLP) linear."""
        return _SUBLAYERS[sublayer](self.block)

    @property
    def mlp(self) -> nn.Module:
        """The block's MLP (``ff[1]``; input: the normalised tokens ``(..., D)``)."""
        return self.block.ff[1]


class _Group(nn.Module):
    """A parameter group: Prithvi's own submodules (and mask token) registered under a name."""

    def __init__(self, modules: Mapping[str, nn.Module], **params: nn.Parameter) -> None:
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)
        for name, p in params.items():
            self.register_parameter(name, p)


def _default_stats(config: PrithviConfig) -> tuple[dict[str, float], dict[str, float]]:
    """Aurora's ERA5 statistics for the config's variables where Aurora has them, else 0 / 1."""
    keys = [norm_key(v) for v in config.surf_vars + config.static_vars]
    keys += [norm_key(v, lv) for v in config.atmos_vars for lv in config.levels]
    mean = {k: float(aurora_norm.locations.get(k, 0.0)) for k in keys}
    std = {k: float(aurora_norm.scales.get(k, 1.0)) for k in keys}
    return mean, std


class WpeftPrithvi(GroupedBackbone, nn.Module):
    """Prithvi-WxC with the interface wpeft's methods and tasks use.

    Args:
        config: Architecture.
        norm_mean / norm_std: Statistics keyed like Aurora's (``"2t"``, ``"z_500"``, static
            ``"lsm"``); missing keys take Aurora's ERA5 statistics (else 0 / 1). They become
            Prithvi's input scalers; the output scalers are the input std (one-step increments
            are predicted in units of the variable's std).

    Attributes:
        applied_method: Name of the wpeft method applied (see ``WpeftAurora.applied_method``).
        own_stats: Always True: every key the model normalises is in ``norm_mean``.
    """

    applied_method: str | None = None
    own_stats: bool = True

    def __init__(
        self,
        config: PrithviConfig,
        norm_mean: Mapping[str, float] | None = None,
        norm_std: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        prithvi_model = _prithvi_module()
        self.config = config
        self.patch_size = config.patch_size
        mean, std = _default_stats(config)
        self.norm_mean = mean | dict(norm_mean or {})
        self.norm_std = std | dict(norm_std or {})
        net = prithvi_model.PrithviWxC(**config.prithvi_kwargs(), **self._scalers())
        # Not a child: its parameters are registered once, by group, below.
        object.__setattr__(self, "_net", net)
        self.encoder = _Group(
            {
                "patch_embedding": net.patch_embedding,
                "patch_embedding_static": net.patch_embedding_static,
                "input_time_embedding": net.input_time_embedding,
                "lead_time_embedding": net.lead_time_embedding,
            },
            mask_token=net.mask_token,
        )
        self.backbone = _Group({"encoder": net.encoder, "decoder": net.decoder})
        self.decoder = _Group({"unembed": net.unembed})
        self._masked_inference: Callable[..., torch.Tensor] = prithvi_model.masked_inference
        self._init_task_variables()
        self._checkpointed = False
        for stack in (net.encoder, net.decoder):  # how Prithvi calls each transformer block
            stack.lgl_block.evaluator = [self._run_block] * len(stack.lgl_block.transformers)

    # --- on a GPU: bf16 blocks and activation checkpointing, as Aurora fine-tunes ------------

    #: Run the transformer blocks under bf16 autocast (the training loop sets it on CUDA, as for
    #: Aurora's ``autocast_backbone``); embeddings and ``unembed`` stay in float32.
    autocast_backbone: bool = False

    def configure_activation_checkpointing(self) -> None:
        """Recompute every transformer block in backward, keeping only its input (Prithvi's own
        per-block ``torch.utils.checkpoint``, non-reentrant), as Aurora's method of the same
        name does for its Swin blocks."""
        self._checkpointed = True

    def _run_block(self, block: nn.Module, data: tuple[torch.Tensor, Any]) -> torch.Tensor:
        """One transformer block on ``(x, mask)``: Prithvi's block evaluator, plus autocast and
        checkpointing when asked."""
        x = data[0]
        context = (
            torch.autocast(x.device.type, dtype=torch.bfloat16)
            if self.autocast_backbone
            else contextlib.nullcontext()
        )
        with context:
            if self._checkpointed and torch.is_grad_enabled():
                return checkpoint(block, data, use_reentrant=False)
            return block(data)

    def _scalers(self) -> dict[str, torch.Tensor]:
        """Prithvi's scaler tensors from ``norm_mean`` / ``norm_std``."""
        c = self.config
        keys = [norm_key(v) for v in c.surf_vars]
        keys += [norm_key(v, lv) for v in c.atmos_vars for lv in c.levels]
        mu = torch.tensor([self.norm_mean[k] for k in keys])
        sigma = torch.tensor([self.norm_std[k] for k in keys])
        # Fourier encoding: 3 unused leading entries, then the time channels (unscaled), statics
        n_free = 3 + len(c.static_channels) - 2 - len(c.static_vars)
        s_mu = torch.tensor([0.0] * n_free + [self.norm_mean[k] for k in c.static_vars])
        s_sigma = torch.tensor([1.0] * n_free + [self.norm_std[k] for k in c.static_vars])
        return {
            "input_scalers_mu": mu,
            "input_scalers_sigma": sigma,
            "static_input_scalers_mu": s_mu,
            "static_input_scalers_sigma": s_sigma,
            "output_scalers": sigma.clone(),
        }

    @property
    def prithvi(self) -> nn.Module:
        """The unforked ``PrithviWxC`` model (the same submodules as the groups)."""
        return self._net

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        """``.to()`` / ``.float()`` also move Prithvi's own buffers (its scalers)."""
        super()._apply(fn, recurse)
        for name, buf in self._net._buffers.items():
            if buf is not None:
                self._net._buffers[name] = fn(buf)
        return self

    def train(self, mode: bool = True) -> WpeftPrithvi:
        super().train(mode)
        self._net.train(mode)
        return self

    # --- the forward tasks call --------------------------------------------------------------

    def forward(self, batch: Batch) -> Batch:
        """The state one ``timestep_hours`` after the last input step, in physical units:
        surface ``(B, 1, H, W)``, atmospheric ``(B, 1, C, H, W)``."""
        c = self.config
        climate = self._climate_input(batch) if c.residual == "climate" else {}
        x, static = self._inputs(batch)
        B, T = x.shape[:2]
        hours = float(c.timestep_hours)
        out = self._infer_with_task_variables(
            batch,
            self._net,
            {
                "x": x,
                "y": x[:, -1],  # only its shape is checked
                "static": static,
                "input_time": x.new_full((B,), -hours * (T - 1)),
                "lead_time": x.new_full((B,), hours),
                **climate,  # residual="climate": the climatology at each target time
            },
        )
        return self._outputs(batch, out)

    def _inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Prithvi's ``x`` ``(B, T, V, H, W)`` and ``static`` ``(B, 2 + C_s, H, W)``."""
        c = self.config
        levels = tuple(int(lv) for lv in batch.metadata.atmos_levels)
        if levels != tuple(c.levels):
            raise DataError(
                f"Batch levels {levels} differ from backbone {c.name!r}'s {tuple(c.levels)}; "
                "Prithvi-WxC embeds a fixed set of channels: feed exactly these levels."
            )
        missing = [v for v in c.surf_vars if v not in batch.surf_vars]
        missing += [v for v in c.atmos_vars if v not in batch.atmos_vars]
        if missing:
            raise DataError(f"Batch lacks variable(s) {missing} that backbone {c.name!r} embeds.")
        first = batch.surf_vars[c.surf_vars[0]]
        B, T, H, W = first.shape
        if (H, W) != tuple(c.grid) or T != c.max_history_size:
            raise DataError(
                f"Batch has {T} step(s) on a {H} x {W} grid; backbone {c.name!r} takes "
                f"{c.max_history_size} steps on its fixed {c.grid[0]} x {c.grid[1]} grid."
            )
        channels = [batch.surf_vars[v] for v in c.surf_vars]
        channels += [batch.atmos_vars[v][:, :, i] for v in c.atmos_vars for i in range(len(levels))]
        x = torch.stack(channels, dim=2)
        return x, self._static(batch, B, first)

    def _static(self, batch: Batch, B: int, like: torch.Tensor) -> torch.Tensor:
        """Latitude/longitude (radians), sin/cos of day of year and hour of the last input
        time, then the static variables (a variable the batch lacks: its mean, i.e. zero after
        normalisation)."""
        c = self.config
        H, W = c.grid
        meta = batch.metadata
        lat = torch.deg2rad(meta.lat.to(like)).view(H, 1).expand(H, W)
        lon = torch.deg2rad(meta.lon.to(like)).view(1, W).expand(H, W)
        per_sample = []
        for t in meta.time:
            doy = 2 * math.pi * (t.timetuple().tm_yday - 1) / 366.0
            hod = 2 * math.pi * (t.hour + t.minute / 60.0) / 24.0
            angles = (math.sin(doy), math.cos(doy), math.sin(hod), math.cos(hod))
            per_sample.append(torch.stack([like.new_full((H, W), a) for a in angles]))
        fields = [
            batch.static_vars[v].to(like) if v in batch.static_vars
            else like.new_full((H, W), self.norm_mean[norm_key(v)])
            for v in c.static_vars
        ]
        shared = torch.stack([lat, lon, *fields]) if fields else torch.stack([lat, lon])
        times = torch.stack(per_sample) if len(per_sample) == B else per_sample[0].expand(B, -1, -1, -1)
        return torch.cat([shared[:2].expand(B, -1, -1, -1), times, shared[2:].expand(B, -1, -1, -1)], dim=1)

    def _outputs(self, batch: Batch, out: torch.Tensor) -> Batch:
        c = self.config
        n_s, n_l = len(c.surf_vars), len(c.levels)
        surf = {v: out[:, i : i + 1] for i, v in enumerate(c.surf_vars)}
        atmos = {
            v: out[:, n_s + j * n_l : n_s + (j + 1) * n_l].unsqueeze(1)
            for j, v in enumerate(c.atmos_vars)
        }
        surf, atmos = self._task_outputs(out[:, len(c.variables) :], surf, atmos)
        meta = batch.metadata
        metadata = dataclasses.replace(
            meta,
            time=tuple(t + timedelta(hours=c.timestep_hours) for t in meta.time),
            rollout_step=meta.rollout_step + 1,
        )
        return Batch(surf_vars=surf, static_vars=batch.static_vars, atmos_vars=atmos, metadata=metadata)

    # --- what PEFT methods need -------------------------------------------------------------

    def embedding_variables(self) -> tuple[tuple[str, str], ...]:
        """The dynamic channels the patch embedding holds kernels for, as ``(embedding, name)``
        pairs (``"surface"`` / ``"atmos"``, ``"z_500"``), in channel order; then the channels of
        the variables a task added (:meth:`add_task_variable`: ``"tp_12h"``, ``"t_logscale_850"``),
        surface first, each in the order added."""
        c = self.config
        surf = [("surface", v) for v in c.surf_vars]
        own = surf + [("atmos", v) for v in c.variables[len(c.surf_vars) :]]
        return tuple(own + [(kind, key) for kind, _, key in self._task_channels()])

    def embedding_kernels(
        self, variables: Sequence[str] | Sequence[tuple[str, str]] | None = None
    ) -> torch.Tensor:
        """Kernels E ``(D, V, T, P, P)`` from ``patch_embedding.proj.weight`` ``(D, T·V, P, P)``.

        ``variables``: channel names (``"2t"``, ``"z_500"``, a task's ``"tp_12h"``) or
        :meth:`embedding_variables` pairs, selecting and ordering V; None: every channel of the
        backbone's own (without a task's). Differentiable, live weights.
        """
        c = self.config
        weight = self._net.patch_embedding.proj.weight
        D, _, P, _ = weight.shape
        E = weight.view(D, c.max_history_size, len(c.variables), P, P).transpose(1, 2)
        if variables is None:
            return E
        names = [v[1] if isinstance(v, tuple) else v for v in variables]
        known = [n for _, n in self.embedding_variables()]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(
                f"Backbone {c.name!r} has no embedding kernel for {unknown}; its channels: "
                f"{known}."
            )
        if len(known) > len(c.variables):
            E = torch.cat([E, self._task_kernels()], dim=1)
        return E[:, [known.index(n) for n in names]]

    def weights_state(self) -> dict[str, torch.Tensor]:
        """The tensors of a weights file of this backbone: the unforked model's state in
        Prithvi's own key names, scalers included (what :func:`load_prithvi_weights` reads)."""
        return self._net.state_dict()

    @property
    def blocks(self) -> list[PrithviBlockInfo]:
        """Prithvi's transformer blocks in execution order (encoder, then decoder); within a
        stage local and global attention alternate, starting and ending with local."""
        out: list[PrithviBlockInfo] = []
        for stage, stack, shifted in (
            ("encoder", self._net.encoder, self.config.encoder_shifting),
            ("decoder", self._net.decoder, self.config.decoder_shifting),
        ):
            for j, block in enumerate(stack.lgl_block.transformers):
                out.append(
                    PrithviBlockInfo(
                        index=len(out),
                        stage=stage,
                        layer=0,
                        depth=j,
                        dim=block.features,
                        num_heads=block.n_heads,
                        shifted=shifted,
                        local=j % 2 == 0,
                        block=block,
                        attention=block.attention[1],
                    )
                )
        return out

    # --- the climatology of residual="climate" (the released 2.3B) ---------------------------

    #: What a ``residual="climate"`` model predicts increments over (:meth:`set_climatology`).
    climatology: Climatology | None = None

    def set_climatology(self, source: Climatology | str | Path | None) -> None:
        """The climatology the forward adds the prediction to (and embeds with the statics):
        a :class:`~wpeft.data.climatology.Climatology` of this config's channels and grid, or a
        directory of ``climate_surface_doyDOY_hourHH.nc`` / ``climate_vertical_...`` files
        (Prithvi-WxC's MERRA-2 layout); None removes it."""
        from wpeft.data.climatology import Climatology

        c = self.config
        if c.residual != "climate":
            raise ConfigError(
                f"Backbone {c.name!r} has residual={c.residual!r} and reads no climatology; "
                "only a residual='climate' config (prithvi-2.3b) takes one."
            )
        if source is not None and not isinstance(source, Climatology):
            source = Climatology.for_config(c, source)
        if source is not None:
            have = (source.surf_vars, source.atmos_vars, tuple(map(float, source.levels)), source.grid)
            want = (c.surf_vars, c.atmos_vars, tuple(map(float, c.levels)), tuple(c.grid))
            if have != want:
                raise ConfigError(
                    f"Climatology of {list(source.variables)} on {source.grid} does not match "
                    f"backbone {c.name!r} ({list(c.variables)} on {tuple(c.grid)}); build it with "
                    "Climatology.for_config(model.config, DIR)."
                )
        self.climatology = source

    def _climate_input(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``{"climate": (B, V, H, W)}``: the climatology at each sample's target time (its last
        input time + ``timestep_hours``), in physical units, like the batch's fields."""
        c = self.config
        if self.climatology is None:
            raise ConfigError(
                f"Backbone {c.name!r} predicts increments over a climatology "
                "(residual='climate') and has none: call model.set_climatology(DIR) with the "
                "directory of its climate_surface_doyDOY_hourHH.nc and climate_vertical_"
                "doyDOY_hourHH.nc files, or use a config with residual='temporal'."
            )
        like = batch.surf_vars.get(c.surf_vars[0])  # None: _inputs names the missing variable
        B = like.shape[0] if like is not None else len(batch.metadata.time)
        times = [t + timedelta(hours=c.timestep_hours) for t in batch.metadata.time]
        if len(times) != B:  # one time for the whole batch
            times = times[:1] * B
        climate = self.climatology.stack(times)
        return {"climate": climate.to(like) if like is not None else climate}

    # --- what run records need (Fisher-mask and prompt-attention records) --------------------

    #: What one row V of :meth:`embedding_kernels` is: one kernel per channel, i.e. a surface
    #: variable or one atmospheric variable at one level (``"z_500"``), not Aurora's per-variable
    #: kernels.
    embedding_unit: str = "channel"

    def parameter_blocks(self) -> dict[str, tuple[str, str]]:
        """``(block name, tensor kind)`` of every parameter of a block, keyed by its name in
        ``self.backbone.named_parameters()`` (``encoder.lgl_block.transformers.3.ff.0.weight``
        -> ``("encoder0.3", "norm2")``); kinds: ``qkv``, ``proj``, ``fc1``, ``fc2``, ``norm1``
        (the attention's LayerNorm), ``norm2`` (the MLP's), ``other``."""
        from wpeft.backbones.aurora_adapter import block_tensor_kinds

        return block_tensor_kinds(
            self.backbone, self.blocks, lambda info: (info.block.attention[0], info.block.ff[0])
        )

    @property
    def patch_grid(self) -> tuple[int, int]:
        """Patches ``(H_p, W_p)`` of the model grid (one token per patch)."""
        c = self.config
        return c.grid[0] // c.patch_size, c.grid[1] // c.patch_size

    def block_resolution(
        self, info: PrithviBlockInfo, args: tuple, kwargs: dict
    ) -> tuple[int, int, int]:
        """Token resolution ``(1, H_p, W_p)`` of every block: one token per patch, no levels
        (the hook arguments are not needed; same signature as Aurora's)."""
        return (1, *self.patch_grid)

    def block_shifted(self, info: PrithviBlockInfo) -> bool:
        """Whether the block sees the mask units shifted by half a unit: with stage shifting,
        Prithvi's shifter toggles after every global block, so blocks ``4j + 2`` and ``4j + 3``
        of a stage run shifted."""
        return info.shifted and (info.depth // 2) % 2 == 1

    def sequence_positions(
        self, info: PrithviBlockInfo, res: tuple[int, int, int] | None = None
    ) -> torch.Tensor:
        """Where each token of the block's attention sequences comes from, for one sample.

        Returns:
            int64 ``(units, tokens)`` for a local block (row u: the tokens of mask unit u,
            units and tokens both row-major) or ``(tokens, units)`` for a global block (row t:
            token position t of every unit): flat index ``h·W_p + w`` into the ``(H_p, W_p)``
            patch grid, as Prithvi's ``to_patching`` orders them, after the half-unit roll of a
            shifted block (:meth:`block_shifted`).
        """
        c = self.config
        Hp, Wp = self.patch_grid
        Lh, Lw = c.mask_unit_size[0] // c.patch_size, c.mask_unit_size[1] // c.patch_size
        flat = torch.arange(Hp * Wp, dtype=torch.int64).view(Hp, Wp)
        if self.block_shifted(info):  # the token at p holds the patch at p - shift
            flat = torch.roll(flat, shifts=(Lh // 2, Lw // 2), dims=(0, 1))
        units = flat.view(Hp // Lh, Lh, Wp // Lw, Lw).permute(0, 2, 1, 3).reshape(-1, Lh * Lw)
        return units if info.local else units.T.contiguous()

    def attention_weights(
        self, info: PrithviBlockInfo, args: tuple, kwargs: dict
    ) -> torch.Tensor:
        """Softmax attention ``(rows, heads, L, L)`` of the block's ``MultiheadAttention`` for
        the arguments of one call (a forward pre-hook's: one ``(x, mask)`` tuple, x
        ``[batch, units, L, D]`` (local) or ``[batch, tokens, L, D]`` (global); rows are the
        flattened leading dims), recomputed from its q/k projection as Prithvi splits it; the
        mask is ignored, as Prithvi's attention ignores it."""
        module = info.attention
        x = args[0][0] if args else kwargs["d"][0]
        S, C = x.shape[-2:]
        heads = module.n_heads
        rows = x.reshape(-1, S, C)
        q, k, _ = (
            module.qkv_layer(rows)
            .view(rows.shape[0], S, heads, 3 * (C // heads))
            .transpose(1, 2)
            .chunk(3, dim=3)
        )
        return (q @ k.transpose(-1, -2) * (C // heads) ** -0.5).softmax(dim=-1)

    def latent_level_kinds(self, n: int) -> list[str]:
        """What each token level holds: Prithvi has one, every channel embedded together."""
        return ["all channels"] * n

    def attention_scope(self, info: PrithviBlockInfo) -> str:
        """What one attention sequence of the block is: the tokens of one mask unit (local) or
        one token position across all units (global); ``shifted`` when the units are rolled."""
        scope = "local (within a mask unit)" if info.local else "global (across mask units)"
        return scope + (", shifted" if self.block_shifted(info) else "")

    def record_blocks(self) -> list[int]:
        """Blocks whose prompt attention a run records by default: the first (local) and
        second (global) block, a middle one, and the last global and last local block."""
        n = len(self.blocks)
        return sorted({i for i in (0, 1, n // 2, n - 2, n - 1) if 0 <= i < n})

    # --- variables a task adds (``tp_12h``, ``2t_logscale``...) -----------------------------
    #
    # Prithvi embeds a fixed channel set (one conv over T·V channels, one ``unembed`` to V·P²).
    # A task's variable gets its own kernel (added to ``patch_embedding``'s tokens by a forward
    # hook) and head (on the tokens ``decoder`` returns, captured by a forward hook), held here in
    # the ``encoder`` / ``decoder`` groups; the unforked model runs unchanged between the hooks.

    def fixed_grid(self) -> tuple[int, int] | None:
        """The one grid (lat, lon) Prithvi-WxC reads (``config.grid``); it also embeds fixed
        levels and channels, so the tasks' real-store paths refuse it."""
        return (int(self.config.grid[0]), int(self.config.grid[1]))

    def _init_task_variables(self) -> None:
        """Empty containers for task variables (no state keys until a task adds one) and the
        two hooks that feed them through the unforked model (installed once)."""
        embeds = {"surface": nn.ParameterDict(), "atmos": nn.ParameterDict()}
        heads = {"surface": nn.ModuleDict(), "atmos": nn.ModuleDict()}
        self.encoder.add_module("task_surf_embeds", embeds["surface"])
        self.encoder.add_module("task_atmos_embeds", embeds["atmos"])
        self.decoder.add_module("task_surf_heads", heads["surface"])
        self.decoder.add_module("task_atmos_heads", heads["atmos"])
        self._task_embeds: dict[str, nn.ParameterDict] = embeds
        self._task_heads: dict[str, nn.ModuleDict] = heads
        #: Normalised task inputs ``(B, n·T, H, W)`` and the decoded tokens ``(B, G, L, D)``,
        #: set only within :meth:`_infer_with_task_variables`.
        self._task_x: torch.Tensor | None = None
        self._task_tokens: torch.Tensor | None = None
        self._net.patch_embedding.register_forward_hook(self._embed_task_inputs)
        self._net.decoder.register_forward_hook(self._capture_decoded)

    def add_task_variable(
        self,
        name: str,
        kind: Literal["surface", "atmos"],
        *,
        embed_init: Literal["zeros", "aurora"] = "aurora",
        head_init: Literal["zeros", "aurora"] = "aurora",
    ) -> tuple[nn.Parameter, nn.Module]:
        """Give the backbone a new input/output variable ``name`` of C channels (surface: 1;
        atmospheric: one per level of ``config.levels``).

        ``"aurora"``: kernel Kaiming uniform (``a = sqrt(5)``), head truncated normal std 0.02
        and zero bias, as Aurora initialises a variable; ``"zeros"``: the pretrained tokens (and
        so every other output) are unchanged, and the variable's output is its residual alone.
        Its statistics default to mean 0, std 1 until :meth:`register_norm`.

        Returns:
            The kernel ``(D, C, T, P, P)`` (convolved with stride P over the normalised input
            ``(B, C·T, H, W)`` and added to the patch embedding) and the head
            ``nn.Linear(D, C·P²)`` (on the decoded tokens, un-patched as ``unembed``'s output).
        """
        c = self.config
        if kind not in ("surface", "atmos"):
            raise ConfigError(f"kind={kind!r} must be 'surface' or 'atmos'.")
        taken = {*c.surf_vars, *c.atmos_vars, *self._task_embeds["surface"], *self._task_embeds["atmos"]}
        if name in taken:
            raise ConfigError(
                f"The backbone already has a variable {name!r}: call the task's setup() once, on "
                "a fresh backbone."
            )
        ref = self._net.patch_embedding.proj.weight
        C = 1 if kind == "surface" else len(c.levels)
        P = c.patch_size
        kernel = nn.Parameter(
            torch.zeros(c.embed_dim, C, c.max_history_size, P, P, dtype=ref.dtype, device=ref.device)
        )
        if embed_init == "aurora":
            nn.init.kaiming_uniform_(kernel, a=math.sqrt(5))
        head = nn.Linear(c.embed_dim, C * P * P, dtype=ref.dtype, device=ref.device)
        with torch.no_grad():
            if head_init == "aurora":
                head.apply(init_weights)
            else:
                for p in head.parameters():
                    p.zero_()
        self._task_embeds[kind][name] = kernel
        self._task_heads[kind][name] = head
        for key in self._task_keys(kind, name):
            self.norm_mean.setdefault(key, 0.0)
            self.norm_std.setdefault(key, 1.0)
        return kernel, head

    def task_variables(self) -> tuple[tuple[str, str], ...]:
        """The variables a task added, as ``(kind, name)`` pairs (one per variable, surface
        first, each in the order added)."""
        return tuple((kind, name) for kind in ("surface", "atmos") for name in self._task_embeds[kind])

    def normalisation_stats(self, name: str, level: int | None = None) -> tuple[float, float] | None:
        """Mean and std the backbone normalises a variable with (its input scalers, or a task
        variable's registered statistics), or None if it has none."""
        key = norm_key(name, level)
        if key in self.norm_mean:
            return float(self.norm_mean[key]), float(self.norm_std[key])
        return None

    def register_norm(self, key: str, mean: float, std: float) -> None:
        """Normalise a task variable's channel ``key`` (``"tp_12h"``, ``"t_logscale_850"``) with
        ``mean`` / ``std``. The backbone's own channels keep the scalers of its weights."""
        if key in self._scaler_keys():
            raise ConfigError(
                f"{key!r} is a channel of backbone {self.config.name!r}, normalised by the input "
                "scalers its weights carry; register statistics for a task's variables only."
            )
        self.norm_mean[key] = float(mean)
        self.norm_std[key] = float(std)

    def _scaler_keys(self) -> list[str]:
        """Statistics keys of the backbone's own channels (its input scalers)."""
        c = self.config
        keys = [norm_key(v) for v in c.surf_vars + c.static_vars]
        return keys + [norm_key(v, lv) for v in c.atmos_vars for lv in c.levels]

    def _task_keys(self, kind: str, name: str) -> list[str]:
        """A task variable's channel names (its statistics keys): ``["tp_12h"]`` or
        ``["t_logscale_850", ...]`` per level."""
        if kind == "surface":
            return [norm_key(name)]
        return [norm_key(name, lv) for lv in self.config.levels]

    def _task_channels(self) -> list[tuple[str, str, str]]:
        """``(kind, variable, channel)`` of every task channel, in channel order."""
        return [
            (kind, name, key)
            for kind, name in self.task_variables()
            for key in self._task_keys(kind, name)
        ]

    def _task_kernels(self) -> torch.Tensor:
        """The task variables' kernels ``(D, n, T, P, P)``, n channels in channel order."""
        kernels = [*self._task_embeds["surface"].values(), *self._task_embeds["atmos"].values()]
        return torch.cat(kernels, dim=1)

    def _task_inputs(self, batch: Batch) -> torch.Tensor | None:
        """The task channels of ``batch`` ``(B, n, T, H, W)``, physical units; None without
        task variables."""
        surf, atmos = list(self._task_embeds["surface"]), list(self._task_embeds["atmos"])
        if not surf and not atmos:
            return None
        missing = [v for v in surf if v not in batch.surf_vars]
        missing += [v for v in atmos if v not in batch.atmos_vars]
        if missing:
            raise DataError(
                f"Batch lacks variable(s) {missing} that a task added to backbone "
                f"{self.config.name!r}; feed the batches of the task whose setup() added them."
            )
        channels = [batch.surf_vars[v] for v in surf]
        channels += [batch.atmos_vars[v][:, :, i] for v in atmos for i in range(len(self.config.levels))]
        return torch.stack(channels, dim=1)

    def _infer_with_task_variables(
        self, batch: Batch, net: nn.Module, inputs: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """``masked_inference(net, inputs)`` ``(B, V, H, W)``, then the task channels
        ``(B, n, H, W)`` concatenated on the channel axis (physical units, the config's
        residual: ``"temporal"``: last input + std · head output; otherwise mean + std · head)."""
        raw = self._task_inputs(batch)
        if raw is None:
            return self._masked_inference(net, inputs)
        keys = [key for _, _, key in self._task_channels()]
        mean = raw.new_tensor([self.norm_mean[k] for k in keys]).view(1, -1, 1, 1)
        std = raw.new_tensor([self.norm_std[k] for k in keys]).view(1, -1, 1, 1)
        try:
            self._task_x = ((raw - mean.unsqueeze(2)) / std.unsqueeze(2)).flatten(1, 2)
            out = self._masked_inference(net, inputs)
            tokens = self._task_tokens
        finally:
            self._task_x = self._task_tokens = None
        assert tokens is not None, "Prithvi's decoder did not run"
        y = self._task_head_outputs(tokens)
        base = raw[:, :, -1] if self.config.residual == "temporal" else mean
        return torch.cat([out, base + std * y], dim=1)

    def _embed_task_inputs(
        self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor
    ) -> torch.Tensor | None:
        """Hook on ``patch_embedding``: its tokens ``(B, D, H/P, W/P)`` plus the task
        kernels' convolution (stride P, no bias) of the task inputs."""
        if self._task_x is None:
            return None
        weight = self._task_kernels().flatten(1, 2)  # (D, n·T, P, P), like the inputs
        return output + F.conv2d(self._task_x, weight, stride=self.config.patch_size)

    def _capture_decoded(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        """Hook on ``decoder``: keep its tokens ``(B, G, L, D)`` for the task heads."""
        if self._task_x is not None:
            self._task_tokens = output

    def _task_head_outputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Task heads on decoded tokens ``(B, G, L, D)`` -> ``(B, n, H, W)`` in std units,
        un-patched as Prithvi un-patches ``unembed`` (``from_patching``, ``pixel_shuffle``)."""
        heads = [*self._task_heads["surface"].values(), *self._task_heads["atmos"].values()]
        y = torch.cat([h(tokens) for h in heads], dim=-1)  # (B, G, L, n·P²)
        return F.pixel_shuffle(self._net.from_patching(y), self.config.patch_size)

    def _task_outputs(
        self,
        extra: torch.Tensor,
        surf: dict[str, torch.Tensor],
        atmos: dict[str, torch.Tensor],
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``surf`` / ``atmos`` with the task variables of ``extra`` ``(B, n, H, W)`` added:
        surface ``(B, 1, H, W)``, atmospheric ``(B, 1, C, H, W)``."""
        surf, atmos = dict(surf), dict(atmos)
        i = 0
        for kind, name in self.task_variables():
            n = len(self._task_keys(kind, name))
            if kind == "surface":
                surf[name] = extra[:, i : i + 1]
            else:
                atmos[name] = extra[:, i : i + n].unsqueeze(1)
            i += n
        return surf, atmos


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a ``torch.save`` file (``model_state`` / ``state_dict``
    unwrapped), without unpickling arbitrary code."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model_state", "state_dict"):
        if isinstance(state, dict) and key in state:
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"Checkpoint {str(path)!r} holds a {type(state).__name__}, not tensors.")
    return state


def load_prithvi_weights(model: WpeftPrithvi, path: str | Path) -> None:
    """Load a local Prithvi-WxC checkpoint (Prithvi's key names) into ``model`` strictly.

    A missing or corrupt file, a checkpoint of another architecture or other variables (the
    channel count differs), or one holding NaN/inf raises :class:`CheckpointError` naming the
    file and the fix; the model is left untouched then. The checkpoint's scalers replace
    ``norm_mean`` / ``norm_std``.
    """
    path = check_weights_file(path)
    try:
        state = _read_state(path)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors and torch raise many types for corrupt files
        raise CheckpointError(
            f"Could not read checkpoint {str(path)!r} ({type(e).__name__}: {e}); the file is "
            "corrupt or not a checkpoint."
        ) from e
    net = model.prithvi
    own = net.state_dict()
    details = state_mismatches(own, state)
    if details:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} does not match Prithvi config {model.config.name!r} "
            f"({len(model.config.variables)} channels x {model.config.max_history_size} steps): "
            + "; ".join(details)
            + ". Choose the config (variables, levels, grid) the checkpoint was trained with."
        )
    bad = nonfinite_tensors(state)
    if bad:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} holds non-finite values (NaN/inf) in {len(bad)} tensor(s), "
            f"e.g. {', '.join(bad[:3])}; use an earlier checkpoint or re-create it."
        )
    net.load_state_dict(state, strict=True)
    _stats_from_scalers(model)


def _stats_from_scalers(model: WpeftPrithvi) -> None:
    """``norm_mean`` / ``norm_std`` from the (loaded) input scalers."""
    c, net = model.config, model.prithvi
    keys = [norm_key(v) for v in c.surf_vars] + [
        norm_key(v, lv) for v in c.atmos_vars for lv in c.levels
    ]
    mu, sigma = net.input_scalers_mu.flatten().tolist(), net.input_scalers_sigma.flatten().tolist()
    model.norm_mean.update(zip(keys, mu))
    model.norm_std.update(zip(keys, sigma))


def build_prithvi(
    config: PrithviConfig | str = "prithvi-tiny",
    *,
    variables: Sequence[str] | None = None,
    checkpoint: str | Path | None = None,
    norm_mean: Mapping[str, float] | None = None,
    norm_std: Mapping[str, float] | None = None,
    seed: int = 0,
) -> WpeftPrithvi:
    """Build a Prithvi-WxC backbone (random init with ``seed``), optionally loading weights.

    Args:
        config: A :class:`PrithviConfig` or its name.
        variables: The dynamic channels the caller expects (``config.variables`` order); refused
            unless they are exactly the config's (Prithvi embeds a fixed channel set).
        checkpoint: A local checkpoint in Prithvi's key names (:func:`load_prithvi_weights`).
    """
    if isinstance(config, str):
        config = get_config(config)  # type: ignore[assignment]
    if not isinstance(config, PrithviConfig):
        raise ConfigError(
            f"Backbone {config.name!r} is an Aurora config; build it with "
            "wpeft.backbones.aurora_adapter.build_backbone."
        )
    if variables is not None and tuple(variables) != config.variables:
        extra = sorted(set(variables) - set(config.variables))
        lacking = sorted(set(config.variables) - set(variables))
        raise ConfigError(
            f"Backbone {config.name!r} embeds channels {list(config.variables)}; the variables "
            f"given differ (not embedded: {extra}, not given: {lacking}, or another order). "
            "Use a config built for these variables."
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WpeftPrithvi(config, norm_mean=norm_mean, norm_std=norm_std)
    if checkpoint is not None:
        load_prithvi_weights(model, checkpoint)
    return model
