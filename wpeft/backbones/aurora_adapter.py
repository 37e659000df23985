"""wpeft's adapter around the real ``aurora.Aurora`` model (no fork, no copy of the library).

What PEFT methods need from a weather foundation model, exposed in one place:

* ``embedding_kernels()``: the per-variable patch-embedding kernels E stacked to
  ``(D, V, T, P, P)`` (surface, static, then atmospheric), recomputed from the live weights;
  ``embedding_variables()`` names every kernel the encoder holds, a task's new ones included;
* ``blocks``: the Swin3D blocks in execution order with their width, heads and window attention;
* ``parameter_groups()``: encoder / backbone / decoder parameters, selected by module;
* checkpoints from a local file (safetensors or Aurora's ``.ckpt``), never from a hub.

Normalisation: Aurora normalises inside ``forward`` with its ERA5 statistics. A backbone trained
on other data (the embedded world) carries its own statistics; :class:`WpeftAurora` maps them
onto Aurora's by an affine change in two of Aurora's documented hooks, so that Aurora's own
``normalise`` yields ``(x - mean) / std`` with *our* mean and std.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from aurora import Aurora, Batch
from aurora import normalisation as aurora_norm
from aurora.model.swin3d import (
    Swin3DTransformerBlock,
    WindowAttention,
    pad_3d,
    window_partition_3d,
)
from aurora.model.util import init_weights, maybe_adjust_windows
from torch import nn

from wpeft.backbones.configs import BackboneConfig, PrithviConfig, get_config
from wpeft.backbones.groups import GroupedBackbone
from wpeft.errors import CheckpointError, ConfigError

__all__ = [
    "BlockInfo",
    "WpeftAurora",
    "build_backbone",
    "check_weights_file",
    "file_sha256",
    "load_weights",
    "nonfinite_tensors",
    "norm_key",
    "state_mismatches",
    "window_positions",
]


@dataclass(frozen=True)
class BlockInfo:
    """One Swin3D block of the backbone, in execution order.

    Attributes:
        index: Position in execution order (0 = first encoder block).
        stage: ``"encoder"`` or ``"decoder"`` half of the U-Net.
        layer: Stage index within that half.
        depth: Block index within the stage.
        dim: Token width D_b of the block.
        num_heads: Attention heads.
        shifted: Whether the block uses shifted windows.
        block: The ``Swin3DTransformerBlock`` module.
        attention: Its ``WindowAttention`` module.
    """

    index: int
    stage: str
    layer: int
    depth: int
    dim: int
    num_heads: int
    shifted: bool
    block: Swin3DTransformerBlock
    attention: WindowAttention

    @property
    def name(self) -> str:
        return f"{self.stage}{self.layer}.{self.depth}"

    def linear(self, sublayer: str) -> nn.Module:
        """The block's ``qkv`` / ``proj`` (window attention) or ``fc1`` / ``fc2`` (MLP) linear."""
        if sublayer in ("qkv", "proj"):
            return getattr(self.attention, sublayer)
        return getattr(self.block.mlp, sublayer)

    @property
    def mlp(self) -> nn.Module:
        """The block's MLP (input: the normalised tokens ``(..., D_b)``)."""
        return self.block.mlp


def norm_key(name: str, level: float | None = None) -> str:
    """Aurora's statistics key of a variable: ``"2t"``, or ``"z_500"`` for a pressure level."""
    return name if level is None else f"{name}_{aurora_norm.level_to_str(level)}"


def _aurora_loc_scale(model: Aurora, name: str, level: int | None) -> tuple[float, float]:
    """Location and scale that Aurora's own ``Batch.normalise`` uses for a variable."""
    if level is None and name in model.surf_stats:
        return model.surf_stats[name]
    key = norm_key(name, level)
    return aurora_norm.locations[key], aurora_norm.scales[key]


class WpeftAurora(GroupedBackbone, Aurora):
    """``aurora.Aurora`` normalising with the statistics of the data it was trained on.

    Args:
        config: Architecture.
        norm_mean / norm_std: Statistics keyed like Aurora's (``"2t"``, ``"z_500"``). Empty means
            Aurora's own ERA5 statistics, as for the released checkpoints.

    Attributes:
        applied_method: Name of the wpeft method applied to this model (set by
            :meth:`wpeft.methods.PEFTMethod.apply`, which refuses a second one); None while the
            model is pristine.
    """

    applied_method: str | None = None

    def __init__(
        self,
        config: BackboneConfig,
        norm_mean: Mapping[str, float] | None = None,
        norm_std: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(**config.aurora_kwargs())
        self.config = config
        self.norm_mean = dict(norm_mean or {})
        self.norm_std = dict(norm_std or {})
        #: Whether the backbone came with its own statistics (a wpeft-trained one); without
        #: them (a released checkpoint) every key a task does not register uses Aurora's tables.
        self.own_stats = bool(self.norm_mean)
        for key in self.norm_mean:
            # Variables unknown to Aurora get the identity there, so ours is the only one applied.
            aurora_norm.locations.setdefault(key, 0.0)
            aurora_norm.scales.setdefault(key, 1.0)

    def _remap(self, batch: Batch, forward: bool) -> Batch:
        """Affine map between our normalisation and Aurora's (``forward``: ours -> Aurora's)."""
        if not self.norm_mean:
            return batch

        def f(x: torch.Tensor, name: str, level: int | None) -> torch.Tensor:
            key = norm_key(name, level)
            if key not in self.norm_mean:
                return x
            m, s = self.norm_mean[key], self.norm_std[key]
            loc, scale = _aurora_loc_scale(self, name, level)
            return (x - m) / s * scale + loc if forward else (x - loc) / scale * s + m

        levels = batch.metadata.atmos_levels

        def f_atmos(x: torch.Tensor, name: str) -> torch.Tensor:
            # (B, T, C, H, W): one affine map per level.
            return torch.stack([f(x[:, :, i], name, lvl) for i, lvl in enumerate(levels)], dim=2)

        return dataclasses.replace(
            batch,
            surf_vars={k: f(v, k, None) for k, v in batch.surf_vars.items()},
            static_vars={k: f(v, k, None) for k, v in batch.static_vars.items()},
            atmos_vars={k: f_atmos(v, k) for k, v in batch.atmos_vars.items()},
        )

    def _pre_norm_hook(self, batch: Batch) -> Batch:
        return self._remap(batch, forward=True)

    def _post_decoder_hook(self, batch: Batch, pred: Batch) -> Batch:
        """With ``config.residual``, the decoder's output is the increment over the last input
        step, both normalised: surface ``(B, 1, H, W)``, atmospheric ``(B, 1, C, H, W)``."""
        if not self.config.residual:
            return pred
        return dataclasses.replace(
            pred,
            surf_vars={k: v + batch.surf_vars[k][:, -1:] for k, v in pred.surf_vars.items()},
            atmos_vars={k: v + batch.atmos_vars[k][:, -1:] for k, v in pred.atmos_vars.items()},
        )

    def _post_unnorm_hook(self, batch: Batch, pred: Batch) -> Batch:
        return self._remap(pred, forward=False)

    # --- what PEFT methods need -------------------------------------------------------------

    def embedding_variables(self) -> tuple[tuple[str, str], ...]:
        """Every variable the encoder holds a patch-embedding kernel for, as ``(embedding,
        name)`` pairs; ``embedding`` is ``"surface"`` (``surf_token_embeds``: surface and
        static variables) or ``"atmos"`` (``atmos_token_embeds``).

        Order: the backbone's own variables as in :meth:`embedding_kernels` (surface, static,
        atmospheric, ``config`` order), then the variables a task added since
        (:func:`wpeft.tasks.common.add_variable`: ``tp_12h``, ``2t_logscale``...), those of the
        surface embedding first, each group in the order they were added.
        """
        c = self.config
        own = [("surface", v) for v in c.surf_vars + c.static_vars]
        own += [("atmos", v) for v in c.atmos_vars]
        known = set(own)
        added = [
            (kind, name)
            for kind, embed in (
                ("surface", self.encoder.surf_token_embeds),
                ("atmos", self.encoder.atmos_token_embeds),
            )
            for name in embed.weights
            if (kind, name) not in known
        ]
        return tuple(own + added)

    def embedding_kernels(
        self, variables: Sequence[str] | Sequence[tuple[str, str]] | None = None
    ) -> torch.Tensor:
        """Stacked patch-embedding kernels E of shape ``(D, V, T, P, P)``.

        Order: surface, static, then atmospheric variables (``config.variables``: the
        backbone's own, without any a task added), or the order of ``variables``: either
        ``(embedding, name)`` pairs as :meth:`embedding_variables` gives them, or Aurora short
        names (surface/static names first; an atmospheric name is looked up in the atmospheric
        embedding only after the backbone's surface/static ones run out).
        Recomputed from the live parameters on every call (differentiable).
        """
        surf_embed = self.encoder.surf_token_embeds.weights
        atmos_embed = self.encoder.atmos_token_embeds.weights
        if variables is None:
            kernels = [surf_embed[v] for v in self.config.surf_vars + self.config.static_vars]
            kernels += [atmos_embed[v] for v in self.config.atmos_vars]
        elif all(isinstance(v, tuple) for v in variables):
            kernels = [
                (surf_embed if kind == "surface" else atmos_embed)[name]
                for kind, name in variables  # type: ignore[misc]
            ]
        else:
            n_surface = len(self.config.surf_vars) + len(self.config.static_vars)
            kernels = [
                (surf_embed if i < n_surface else atmos_embed)[v] for i, v in enumerate(variables)
            ]
        return torch.cat(list(kernels), dim=1)

    @property
    def blocks(self) -> list[BlockInfo]:
        """The Swin3D blocks in execution order (encoder stages, then decoder stages)."""
        out: list[BlockInfo] = []
        for stage, layers in (
            ("encoder", self.backbone.encoder_layers),
            ("decoder", self.backbone.decoder_layers),
        ):
            for i, layer in enumerate(layers):
                for j, block in enumerate(layer.blocks):
                    out.append(
                        BlockInfo(
                            index=len(out),
                            stage=stage,
                            layer=i,
                            depth=j,
                            dim=block.dim,
                            num_heads=block.num_heads,
                            shifted=any(s > 0 for s in block.shift_size),
                            block=block,
                            attention=block.attn,
                        )
                    )
        return out

    def weights_state(self) -> dict[str, torch.Tensor]:
        """The tensors of a weights file of this backbone, as :func:`load_weights` reads them."""
        return self.state_dict()

    # --- what run records need (Fisher-mask and prompt-attention records) --------------------

    #: What one row V of :meth:`embedding_kernels` is: one kernel per variable (an atmospheric
    #: variable's kernel serves all its pressure levels).
    embedding_unit: str = "variable"

    def parameter_blocks(self) -> dict[str, tuple[str, str]]:
        """``(block name, tensor kind)`` of every parameter of a block, keyed by its name in
        ``self.backbone.named_parameters()``; kinds: ``qkv``, ``proj``, ``fc1``, ``fc2``,
        ``norm1`` / ``norm2`` (the adaptive layer norms), ``other``. Parameters outside the
        blocks (patch merging, lead-time MLP) are absent."""
        return block_tensor_kinds(
            self.backbone, self.blocks, lambda info: (info.block.norm1, info.block.norm2)
        )

    def block_resolution(self, info: BlockInfo, args: tuple, kwargs: dict) -> tuple[int, int, int]:
        """Token resolution ``(C, H_b, W_b)`` (latent levels, lat, lon) of a block's input, from
        the arguments of its forward ``(x, c, res, rollout_step)`` (a forward pre-hook's)."""
        res = args[2] if len(args) > 2 else kwargs["res"]
        return tuple(int(r) for r in res)  # type: ignore[return-value]

    def sequence_positions(self, info: BlockInfo, res: tuple[int, int, int]) -> torch.Tensor:
        """Where each token of the block's attention sequences (windows) comes from: int64
        ``(n_windows, N_w)`` flat index ``c·H_b·W_b + h·W_b + w`` into the ``res`` tokens of one
        sample, -1 for padding (:func:`window_positions`)."""
        return window_positions(res, info.block.window_size, info.block.shift_size)

    def attention_weights(self, info: BlockInfo, args: tuple, kwargs: dict) -> torch.Tensor:
        """Softmax attention ``(rows, heads, L, L)`` of the block's ``WindowAttention`` for the
        arguments of one call (a forward pre-hook's: windows ``(B·nW, L, D_b)``, the shifted-window
        mask ``(nW, L, L)`` in ``mask``), recomputed from its q/k projections (no dropout)."""
        module = info.attention
        x = args[0] if args else kwargs["x"]
        mask = args[1] if len(args) > 1 else kwargs.get("mask")
        qkv = module.qkv(x).reshape(x.shape[0], x.shape[1], 3, module.num_heads, -1)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # (rows, heads, L, L)
        if mask is not None:  # (nW, L, L); windows are ordered batch-major
            idx = torch.arange(x.shape[0], device=mask.device) % mask.shape[0]
            scores = scores + mask[idx][:, None]
        return scores.softmax(dim=-1)

    def latent_level_kinds(self, n: int) -> list[str]:
        """What each of the ``n`` token levels of a block holds: Aurora's surface level, then
        the latent atmospheric levels of its Perceiver aggregation."""
        return ["surface"] + ["atmos"] * (n - 1)

    def attention_scope(self, info: BlockInfo) -> str:
        """What one attention sequence of the block is: a (shifted) 3-D window of tokens."""
        return "shifted window" if info.shifted else "window"

    def record_blocks(self) -> list[int]:
        """Blocks whose prompt attention a run records by default: the first, a middle and the
        last."""
        n = len(self.blocks)
        return sorted({0, n // 2, n - 1}) if n else []

    # --- what tasks need ----------------------------------------------------------------------

    def fixed_grid(self) -> tuple[int, int] | None:
        """The one grid (lat, lon) the backbone reads, or None: Aurora reads any grid (a
        multiple of the patch size), any levels and a task's real-store variables."""
        return None

    def add_task_variable(
        self,
        name: str,
        kind: Literal["surface", "atmos"],
        *,
        embed_init: Literal["zeros", "aurora"] = "aurora",
        head_init: Literal["zeros", "aurora"] = "aurora",
    ) -> tuple[nn.Parameter, nn.Module]:
        """Give the backbone a new variable ``name``: a patch-embedding kernel and a decoder head.

        ``kind``: ``"surface"`` or ``"atmos"``. ``"aurora"`` initialises like Aurora does for its
        own variables (kernels: Kaiming uniform with ``a = sqrt(5)``; heads: truncated normal std
        0.02, zero bias); ``"zeros"`` gives a kernel that leaves the pretrained tokens unchanged,
        or a head whose first output is exactly zero.

        Returns:
            The new kernel ``(D, 1, T, P, P)`` (in ``surf_token_embeds`` / ``atmos_token_embeds``)
            and ``LinearPatchReconstruction`` head (in ``surf_heads`` / ``atmos_heads``).
        """
        if self.encoder.level_condition:
            raise ConfigError("Adding variables to a level-conditioned Aurora is not supported.")
        embed = self.encoder.surf_token_embeds if kind == "surface" else self.encoder.atmos_token_embeds
        heads = self.decoder.surf_heads if kind == "surface" else self.decoder.atmos_heads
        if name in embed.weights or name in heads:
            raise ConfigError(
                f"The backbone already has a {kind} variable {name!r}: call the task's setup() "
                "once, on a fresh backbone."
            )
        template = next(iter(embed.weights.values()))
        kernel = nn.Parameter(torch.zeros_like(template))
        if embed_init == "aurora":
            nn.init.kaiming_uniform_(kernel, a=math.sqrt(5))
        new_head = copy.deepcopy(next(iter(heads.values())))
        with torch.no_grad():
            if head_init == "aurora":
                new_head.apply(init_weights)
            else:
                for p in new_head.parameters():
                    p.zero_()
        new_head.requires_grad_(True)
        embed.weights[name] = kernel
        heads[name] = new_head
        return kernel, new_head

    def task_variables(self) -> tuple[tuple[str, str], ...]:
        """The variables a task added (:meth:`add_task_variable`), as ``(kind, name)`` pairs in
        :meth:`embedding_variables` order."""
        return self.embedding_variables()[len(self.config.variables) :]

    def normalisation_stats(self, name: str, level: int | None = None) -> tuple[float, float] | None:
        """Mean and std the backbone normalises a variable with (its own statistics; without
        them, a released checkpoint's, Aurora's ERA5 tables), or None if it has none."""
        key = norm_key(name, level)
        if key in self.norm_mean:
            return float(self.norm_mean[key]), float(self.norm_std[key])
        if not self.own_stats:
            if level is None and name in self.surf_stats:
                loc, scale = self.surf_stats[name]
                return float(loc), float(scale)
            if key in aurora_norm.locations:
                return float(aurora_norm.locations[key]), float(aurora_norm.scales[key])
        return None

    def register_norm(self, key: str, mean: float, std: float) -> None:
        """Normalise ``key`` (``"tp_12h"``, ``"t_logscale_850"``) with ``mean`` / ``std``;
        Aurora's own tables get the identity for a key they lack, so ours is the only one applied
        (on a released checkpoint only registered keys are remapped, see :meth:`_remap`)."""
        self.norm_mean[key] = float(mean)
        self.norm_std[key] = float(std)
        aurora_norm.locations.setdefault(key, 0.0)
        aurora_norm.scales.setdefault(key, 1.0)


def window_positions(
    res: tuple[int, int, int], window_size: Sequence[int], shift_size: Sequence[int]
) -> torch.Tensor:
    """Where each window token of a Swin3D block comes from.

    Args:
        res: Token resolution ``(C, H, W)`` of the block's input (levels, lat, lon).
        window_size / shift_size: The block's configured window and shift
            (``block.window_size``, ``block.shift_size``); adjusted as Aurora does.

    Returns:
        int64 ``(n_windows, N_w)``: flat index ``c·H·W + h·W + w`` into the unshifted
        ``(C, H, W)`` tokens of one sample, in Aurora's window order, or -1 for padding.
    """
    ws, ss = maybe_adjust_windows(tuple(window_size), tuple(shift_size), tuple(res))
    C, H, W = res
    idx = torch.arange(C * H * W, dtype=torch.float64).view(1, C, H, W, 1)
    if any(s > 0 for s in ss):
        idx = torch.roll(idx, shifts=(-ss[0], -ss[1], -ss[2]), dims=(1, 2, 3))
    idx = pad_3d(idx, ((-C) % ws[0], (-H) % ws[1], (-W) % ws[2]), value=-1.0)
    windows = window_partition_3d(idx, ws)  # (nW, Wc, Wh, Ww, 1)
    return windows.reshape(windows.shape[0], -1).round().long()


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_mismatches(
    own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
) -> list[str]:
    """How a checkpoint's ``state`` differs from a model's own state dict, one phrase per kind
    (shape mismatches, missing keys, unexpected keys; each with a first example); empty when
    they match."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    details = []
    if mismatched:
        k = mismatched[0]
        details.append(
            f"{len(mismatched)} shape mismatch(es), e.g. {k}: file {tuple(state[k].shape)} vs "
            f"model {tuple(own[k].shape)}"
        )
    if missing:
        details.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
    if unexpected:
        details.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
    return details


def nonfinite_tensors(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names (sorted) of the floating-point tensors in ``state`` holding NaN or inf."""
    return sorted(
        name
        for name, t in state.items()
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())
    )


#: How a message says where released weights come from.
GET_WEIGHTS = "download it once from the Aurora model card and pass the local path"


def check_weights_file(path: str | Path) -> Path:
    """Refuse a missing or unreadable checkpoint cheaply, without loading its tensors.

    A safetensors file's header is read and checked against the file's length; any other file
    (Aurora's ``.ckpt``) is opened with ``torch.load(..., mmap=True, weights_only=True)``, which
    maps the tensors instead of reading them (an old non-zip file is read whole). Whether the
    tensors fit an architecture is checked when they are loaded (:func:`load_weights`).

    Returns:
        The path.

    Raises:
        CheckpointError: one line naming the file and the fix.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a checkpoint file" if path.is_dir() else "does not exist"
        raise CheckpointError(
            f"Checkpoint {str(path)!r} {what}; {GET_WEIGHTS} (wpeft never fetches weights)."
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                keys = list(f.keys())
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            keys = list(state) if isinstance(state, dict) else []
    except Exception as e:  # safetensors and torch raise many types for corrupt files
        raise CheckpointError(
            f"Could not read checkpoint {str(path)!r} ({type(e).__name__}: "
            f"{' '.join(str(e).split())}). The file is corrupt or not a checkpoint; "
            f"{GET_WEIGHTS} again."
        ) from e
    if not keys:
        raise CheckpointError(f"Checkpoint {str(path)!r} holds no tensors; {GET_WEIGHTS} again.")
    return path


def load_weights(model: WpeftAurora, path: str | Path) -> None:
    """Load a local checkpoint into ``model`` strictly, without unpickling arbitrary code.

    Accepts safetensors files and Aurora's released ``.ckpt`` files (``torch.load`` with
    ``weights_only=True``). A missing file, a corrupt file, a checkpoint for another
    architecture or one holding NaN/inf weights raises :class:`CheckpointError` that names the
    file and the fix; the model is left untouched then.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"Checkpoint {str(path)!r} does not exist. Download it once (e.g. from the Aurora "
            "model card) and pass its local path; wpeft never fetches weights at run time."
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device=str(next(model.parameters()).device))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            state = model._adapt_checkpoint(state)
    except Exception as e:  # safetensors and torch raise many types for corrupt files
        raise CheckpointError(
            f"Could not read checkpoint {str(path)!r} ({type(e).__name__}: {e}). The file is "
            "corrupt or not a checkpoint; re-download or re-create it."
        ) from e
    own = model.state_dict()
    details = state_mismatches(own, state)
    if details:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} does not match backbone config {model.config.name!r}: "
            + "; ".join(details)
            + ". Choose the config the checkpoint was trained with (wpeft backbone info --help)."
        )
    bad = nonfinite_tensors(state)
    if bad:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} holds non-finite values (NaN/inf) in {len(bad)} tensor(s), "
            f"e.g. {', '.join(bad[:3])}: the run that wrote it diverged or the file is corrupt; "
            "use an earlier checkpoint or re-create it."
        )
    model.load_state_dict(state, strict=True)


def build_backbone(
    config: BackboneConfig | str = "tiny",
    *,
    checkpoint: str | Path | None = None,
    norm_mean: Mapping[str, float] | None = None,
    norm_std: Mapping[str, float] | None = None,
    seed: int = 0,
) -> WpeftAurora:
    """Build a backbone from a config (random init with ``seed``), optionally loading weights.

    A Prithvi-WxC config (``prithvi-tiny``, ``prithvi-2.3b``) is built by
    :func:`wpeft.backbones.prithvi_adapter.build_prithvi` (the optional ``prithvi`` extra)."""
    if isinstance(config, str):
        config = get_config(config)
    if isinstance(config, PrithviConfig):
        from wpeft.backbones.prithvi_adapter import build_prithvi

        return build_prithvi(  # type: ignore[return-value]
            config, checkpoint=checkpoint, norm_mean=norm_mean, norm_std=norm_std, seed=seed
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WpeftAurora(config, norm_mean=norm_mean, norm_std=norm_std)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model


def block_tensor_kinds(
    root: nn.Module,
    infos: Sequence[BlockInfo],
    norms: Callable[[BlockInfo], tuple[nn.Module, nn.Module]],
) -> dict[str, tuple[str, str]]:
    """``(block name, tensor kind)`` of the block parameters among ``root.named_parameters()``,
    found by module identity: each block's ``linear(kind)`` for ``qkv`` / ``proj`` / ``fc1`` /
    ``fc2``, ``norms(info)`` for ``norm1`` / ``norm2``, ``other`` for the rest of the block."""
    owner: dict[int, tuple[str, str]] = {}
    for info in infos:
        for p in info.block.parameters():
            owner[id(p)] = (info.name, "other")
        kinds = [(kind, info.linear(kind)) for kind in ("qkv", "proj", "fc1", "fc2")]
        kinds += list(zip(("norm1", "norm2"), norms(info)))
        for kind, module in kinds:
            for p in module.parameters():
                owner[id(p)] = (info.name, kind)
    return {name: owner[id(p)] for name, p in root.named_parameters() if id(p) in owner}
