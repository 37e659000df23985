"""Saved activations of one forward, counted from the architecture, and how they are measured.

Activations, per Swin block and sample, are counted from the architecture: the tokens of the
block's stage (latent levels x H/P x W/P halved per stage, padded to whole windows of the
block's window, which Aurora shrinks to the stage where the stage is smaller), the width D,
heads h, MLP ratio r, the method's prompt tokens P per window, and which sub-layers hold
trainable weights (only those save their inputs; an adapter such as LoRA saves its own copy of
its input). With ``a`` = bytes of an autocast element (2 for bf16, 4 for fp32) and ``f`` = 4
(LayerNorm runs in fp32 under CUDA autocast), per window token (T_w = windows x (N_w + P)):
``5aD`` (q, k, v, attention output, qkv input when qkv trains) + ``4h`` (log-sum-exp), the
shifted-window mask ``a (N_w + P)`` per window token, and per token
``2fD + 16 [+ 2fD when the AdaptiveLayerNorm modulation trains] + arD [+ aD fc1 input]
[+ arD fc2 input]``. Patch merging / splitting are counted the same way. Encoder and decoder
run in fp32 outside the autocast region; their saved bytes per patch are a fitted line in
D and the number of pressure levels C (below). TADP prompt generators save batch-independent
activations, which :func:`plan` measures by running each distinct generator once on the CPU.
With ``+ckpt``, what stays is the fp32 input of every block and the skip tensors, plus the
largest of one block's, the decoder's or the encoder's full activations during recomputation.

Calibration (``measure_saved_bytes``: exact sums of the unique storages that
``torch.autograd.graph.saved_tensors_hooks`` sees in one forward, parameters excluded, split
per sample as bytes(B=2) - bytes(B=1); CPU, torch 2.14, fp32; tiny and small backbones at
32 x 64 and 64 x 128 with 3, 7 and 13 pressure levels, full / lora / tadp / weatherpeft):

* Swin blocks and patch merging/splitting: the counting above reproduces the measurement to
  the byte for ``full``, ``tadp`` and ``weatherpeft`` up to the per-sample time-modulation
  vectors (16 D bytes per block, included); ``BLOCK_SCALE`` = 1.0. LoRA adds its rank-r
  hidden activations and a cast copy of each adapted linear's input (counted).
* decoder, bytes per patch = 4 (D (c0 + c1 C) + k0 + k1 C): trainable c0 = 26.0, c1 = 22.09,
  k0 = 0.2, k1 = 4.0; frozen (gradient to its input only) c0 = 12.0, c1 = 12.09.
* encoder (zero when it is frozen: nothing before it needs a gradient): c0 = 52.1, c1 = 3.0,
  k0 = 238.7, k1 = 160 (the patch inputs: 2 history steps x P² per variable and level), plus a
  batch-independent 8 D bytes per patch + 1536 D (position and scale encodings).
* measured / estimated per sample over those 18 configurations: blocks 0.999-1.000, merges
  1.000, encoder 1.000, decoder 0.997-1.000; whole forward at batch 2 0.999-1.000. Checked on
  tiny at 48 x 96 with 13 levels (grid and level count not used for the fit; padded and shrunk
  windows): within 0.1 % for full, lora and weatherpeft (``tests/test_plan.py`` allows 2 %).
* bf16: CPU autocast keeps LayerNorm (and so the residual stream) in bf16 where CUDA autocast
  runs it in fp32, so CPU bf16 measurements fall below the CUDA-policy estimate by design
  (blocks 0.82-0.90, merges 0.67-0.80, whole forward 0.89-0.94 on tiny and small; the test
  asserts 0.6-1.05). The CUDA-policy constants are the counting above;
  ``benchmarks/gpu/check_plan.py`` (run by ``benchmarks/gpu/run_device.sh``) prints
  measured / estimated on a GPU to confirm them.

Prithvi-WxC (:func:`prithvi_activations`): the same block counting over mask units. Measured /
estimated whole forward on ``prithvi-tiny`` (32 x 64, batch 2, CPU fp32): full 1.0001,
weatherpeft 1.0000, tadp 0.998, lora 0.992 (the first block's LayerNorm input is not saved when
nothing before it trains; not modelled); blocks exact for full and weatherpeft. CPU bf16 (autocast
over the whole forward): 0.95-0.98. Not yet checked on a GPU.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from wpeft.backbones.configs import BackboneConfig, PrithviConfig
from wpeft.distributed.inventory import BlockGrad, ModelInventory

if TYPE_CHECKING:  # the model code is imported when a plan is made, not by `wpeft --help`
    from wpeft.backbones.aurora_adapter import WpeftAurora

__all__ = [
    "ActivationEstimate",
    "StageGeometry",
    "estimate_activations",
    "measure_saved_bytes",
    "model_regions",
    "prithvi_activations",
    "prithvi_geometry",
    "stage_geometry",
]

#: Multiplies the counted Swin-block bytes (calibrated: the counting is exact on CPU fp32).
BLOCK_SCALE = 1.0
#: Decoder saved bytes per patch = 4 (D (c0 + c1 C) + k0 + k1 C), C = pressure levels.
DECODER_TRAINABLE = (26.0, 22.09, 0.2, 4.0)
DECODER_FROZEN = (12.0, 12.09, 0.0, 0.0)
#: Encoder saved bytes per patch when it trains (0 when frozen), same form.
ENCODER_TRAINABLE = (52.1, 3.0, 238.7, 160.0)


@dataclass(frozen=True)
class StageGeometry:
    """Token geometry of one Swin stage (the decoder stage at the same resolution shares it).

    Attributes:
        res: ``(C, H, W)`` tokens (latent levels, patch rows, patch columns).
        window: Window after Aurora's adjustment (a dimension shrinks to the stage's size).
        shift: Whether shifted blocks of the stage really shift (some window dimension did
            not shrink).
        padded: ``(C, H, W)`` padded to whole windows.
    """

    res: tuple[int, int, int]
    window: tuple[int, int, int]
    shift: bool
    padded: tuple[int, int, int]

    @property
    def tokens(self) -> int:
        return math.prod(self.res)

    @property
    def window_tokens(self) -> int:
        return math.prod(self.window)

    @property
    def windows(self) -> int:
        return math.prod(p // w for p, w in zip(self.padded, self.window))


def stage_geometry(
    config: BackboneConfig | PrithviConfig, grid: tuple[int, int]
) -> list[StageGeometry]:
    """Per encoder stage (the decoder mirrors them): tokens, windows and padding for ``grid``.

    Prithvi-WxC: its two attention patterns, local then global (:func:`prithvi_geometry`)."""
    if isinstance(config, PrithviConfig):
        return prithvi_geometry(config, grid)
    h, w = grid
    p = config.patch_size
    res = (config.latent_levels, h // p, w // p)  # Aurora drops one extra latitude (721 -> 720)
    out = []
    for i in range(len(config.encoder_depths)):
        if i:
            c, hh, ww = res
            res = (c, (hh + hh % 2) // 2, (ww + ww % 2) // 2)
        ws = tuple(min(r, s) for r, s in zip(res, config.window_size))
        shift = any(r > s and s // 2 > 0 for r, s in zip(res, config.window_size))
        padded = tuple(-(-r // s) * s for r, s in zip(res, ws))
        out.append(StageGeometry(res=res, window=ws, shift=shift, padded=padded))  # type: ignore[arg-type]
    return out


def _block_order(config: BackboneConfig) -> list[tuple[int, int, int, bool]]:
    """``(stage index, width, heads, shifted?)`` of every block in execution order."""
    n = len(config.encoder_depths)
    out = []
    for i, (depth, heads) in enumerate(zip(config.encoder_depths, config.encoder_num_heads)):
        out += [(i, config.embed_dim * 2**i, heads, j % 2 == 1) for j in range(depth)]
    for i, (depth, heads) in enumerate(zip(config.decoder_depths, config.decoder_num_heads)):
        stage = n - 1 - i
        out += [(stage, config.embed_dim * 2**stage, heads, j % 2 == 1) for j in range(depth)]
    return out


def _block_bytes(
    geo: StageGeometry,
    dim: int,
    heads: int,
    shifted: bool,
    g: BlockGrad,
    prompts: int,
    mlp_ratio: float,
    a: int,
    f: int,
    modulated: bool = True,
) -> int:
    """Saved bytes of one Swin block for one sample (see the module docstring); without
    ``modulated`` (Prithvi-WxC's plain LayerNorms) no per-sample time-modulation vectors."""
    d, hidden = dim, int(dim * mlp_ratio)
    window_tokens = geo.windows * (geo.window_tokens + prompts)
    per_window_token = 4 * a * d + 4 * heads  # q, k, v, attention output; log-sum-exp
    if g.qkv.own:
        per_window_token += a * d  # qkv input (its cast / partitioned copy)
    out = window_tokens * per_window_token
    if shifted and geo.shift:
        out += a * geo.windows * (geo.window_tokens + prompts) ** 2  # the shifted-window mask
    # An adapter (LoRA) saves its input and its rank-r hidden activations. Its input is a copy
    # of its own (peft casts to the adapter's dtype, autocast back), except in fp32 for proj,
    # whose input is the attention output already saved.
    for lin, n_in, tokens, shared in (
        (g.qkv, d, window_tokens, False),
        (g.proj, d, window_tokens, a == 4),
        (g.fc1, d, geo.tokens, False),
        (g.fc2, hidden, geo.tokens, False),
    ):
        if lin.adapter:
            out += tokens * a * (lin.adapter_rank + (0 if shared else n_in))
    per_token = 2 * (f * d + 8)  # both AdaptiveLayerNorms: input and mean / rstd
    per_token += f * d * (int(g.modulation1) + int(g.modulation2))  # normalised output
    per_token += a * hidden  # GELU input
    if g.fc1.own:
        per_token += a * d
    if g.fc2.own:
        per_token += a * hidden
    out += geo.tokens * per_token
    return int(BLOCK_SCALE * out) + (16 * d if modulated else 0)  # time-modulation vectors


def _merge_bytes(
    stages: list[StageGeometry],
    config: BackboneConfig,
    merges: tuple[tuple[bool, ...], ...],
    a: int,
    f: int,
) -> int:
    """Saved bytes of patch merging (encoder) and splitting (decoder) for one sample."""
    n = len(stages)
    out, k = 0, 0
    for i in range(n - 1):  # PatchMerging3D after encoder stage i: LayerNorm(4D) + Linear
        d, merged = config.embed_dim * 2**i, stages[i + 1].tokens
        out += merged * (f * 4 * d + 8)
        if merges[k][0]:
            out += merged * a * 4 * d
        k += 1
    for i in range(n - 1):  # PatchSplitting3D in decoder layer i: Linear, LayerNorm(D/2), Linear
        stage = n - 1 - i
        d = config.embed_dim * 2**stage
        coarse, fine = stages[stage].tokens, stages[stage - 1].tokens
        lin1, lin2 = merges[k]
        if lin1:
            out += coarse * a * d
        out += fine * (f * d // 2 + 8)
        if lin2:
            out += fine * a * d // 2
        k += 1
    return out


def _perceiver_bytes(coef: tuple[float, float, float, float], patches: int, d: int, c: int) -> int:
    c0, c1, k0, k1 = coef
    return int(4 * patches * (d * (c0 + c1 * c) + k0 + k1 * c))


_GENERATOR_CACHE: dict[tuple, int] = {}


def _generator_bytes(
    generator: nn.Module, kernel_shape: tuple[int, ...], precision: str, kernels_grad: bool
) -> int:
    """Saved bytes of one TADP generator forward, measured on the CPU (batch-independent)."""
    key = (
        repr(generator),
        getattr(generator, "block_dim", None),  # plain attributes repr() does not show
        getattr(generator, "external", None),
        kernel_shape,
        precision,
        kernels_grad,
    )
    if key not in _GENERATOR_CACHE:
        gen = copy.deepcopy(generator).to_empty(device="cpu")
        with torch.no_grad():
            for p in gen.parameters():
                p.normal_(0.0, 0.02)
        kernels = torch.randn(kernel_shape, requires_grad=kernels_grad)
        autocast = (
            torch.autocast("cpu", dtype=torch.bfloat16)
            if precision == "bf16"
            else contextlib.nullcontext()
        )
        with autocast:
            _GENERATOR_CACHE[key] = measure_saved_bytes(gen, kernels)["total"]
    return _GENERATOR_CACHE[key]


@dataclass(frozen=True)
class ActivationEstimate:
    """Saved-for-backward bytes of one forward on one GPU (``batch`` samples).

    Attributes:
        blocks: All Swin blocks. largest_block: The largest one (recomputed under ckpt).
        merges: Patch merging and splitting.
        encoder / decoder: Perceiver encoder and decoder (fp32, outside autocast).
        method: Batch-independent activations of the method (TADP generators).
        largest_generator: One generator's share (what recomputation keeps).
        weight_copies: bf16 weight copies autocast saves for backward (all of them without
            checkpointing; ``largest_block_weights`` of them with it).
        block_inputs: fp32 inputs of every block and the U-Net skips (kept under ckpt).
        checkpoint_roots: Inputs of the backbone and decoder (kept under ckpt).
        batch_io: Not saved for backward but alive at the peak: the input batch (raw and
            normalised) and two copies of the prediction (decoder output, unnormalised), fp32.
    """

    blocks: int
    largest_block: int
    merges: int
    encoder: int
    decoder: int
    method: int
    largest_generator: int
    weight_copies: int
    largest_block_weights: int
    block_inputs: int
    checkpoint_roots: int
    batch_io: int = 0

    @property
    def full(self) -> int:
        """Without activation checkpointing."""
        return (
            self.blocks
            + self.merges
            + self.encoder
            + self.decoder
            + self.method
            + self.weight_copies
        )

    @property
    def checkpointed(self) -> int:
        """Peak with Aurora's activation checkpointing (recompute one unit at a time)."""
        recompute = max(
            self.largest_block + self.largest_generator + self.largest_block_weights,
            self.decoder,
            self.encoder,
        )
        return self.checkpoint_roots + self.block_inputs + recompute

    @property
    def backward_transient(self) -> int:
        """Gradients of one block's activations while its backward runs."""
        return self.largest_block


def estimate_activations(
    inv: ModelInventory,
    grid: tuple[int, int],
    batch: int,
    levels: int,
    precision: str = "bf16",
) -> ActivationEstimate:
    """Saved-activation bytes (CUDA autocast policy for ``bf16``) of one forward.

    Prithvi-WxC: :func:`prithvi_activations` (``levels`` is its config's, fixed by its weights).
    """
    config = inv.config
    if isinstance(config, PrithviConfig):
        return prithvi_activations(inv, grid, batch, precision)
    a = 2 if precision == "bf16" else 4
    f = 4  # LayerNorm and the residual stream are fp32 under CUDA autocast
    stages = stage_geometry(config, grid)
    per_block = []
    for (stage, dim, heads, shifted), g in zip(_block_order(config), inv.blocks, strict=True):
        per_block.append(
            _block_bytes(stages[stage], dim, heads, shifted, g, inv.prompts, config.mlp_ratio, a, f)
        )
    patches = stages[0].res[1] * stages[0].res[2]
    d = config.embed_dim
    decoder = batch * _perceiver_bytes(
        DECODER_TRAINABLE if inv.decoder_trainable else DECODER_FROZEN, patches, d, levels
    )
    decoder += 8 * d * levels if inv.decoder_trainable else 0  # level embeddings
    encoder = 0
    if inv.encoder_trainable:
        encoder = batch * _perceiver_bytes(ENCODER_TRAINABLE, patches, d, levels)
        encoder += 8 * d * patches + 1536 * d  # position / scale encodings
    generator_bytes = [
        _generator_bytes(g, inv.kernel_shape, precision, inv.encoder_trainable)
        for g in inv.generators
    ]
    copies = 2 * inv.autocast_weight_numel if precision == "bf16" else 0
    block_copies = 2 * max(b.weight_numel_2d for b in inv.blocks) if precision == "bf16" else 0
    # under checkpointing every block keeps its fp32 input; the encoder stages keep their skips
    inputs = sum(4 * stages[stage].tokens * dim for stage, dim, _, _ in _block_order(config))
    n = len(stages)
    inputs += sum(4 * stages[i].tokens * d * 2**i for i in range(n))
    roots = 4 * stages[0].tokens * d * 3  # backbone input (D) and decoder input (2 D)
    history = config.max_history_size
    channels_in = history * (len(config.surf_vars) + len(config.static_vars))
    channels_in += history * len(config.atmos_vars) * levels
    channels_out = len(config.surf_vars) + len(config.atmos_vars) * levels
    return ActivationEstimate(
        blocks=batch * sum(per_block),
        largest_block=batch * max(per_block),
        merges=batch * _merge_bytes(stages, config, inv.merges, a, f),
        encoder=encoder,
        decoder=decoder,
        method=sum(generator_bytes),
        largest_generator=max(generator_bytes, default=0),
        weight_copies=copies,
        largest_block_weights=block_copies,
        block_inputs=batch * inputs,
        checkpoint_roots=batch * roots,
        batch_io=batch * 4 * grid[0] * grid[1] * (2 * channels_in + 2 * channels_out),
    )


# --- measuring (calibration, tests, GPU checks) --------------------------------------------


def measure_saved_bytes(
    module: nn.Module,
    *inputs: Any,
    regions: Mapping[str, nn.Module | list[nn.Module]] | None = None,
    exclude: list[torch.Tensor] | None = None,
) -> dict[str, int]:
    """Bytes autograd saves for backward during ``module(*inputs)``, exactly.

    Sums ``untyped_storage().nbytes()`` of every unique storage that
    ``torch.autograd.graph.saved_tensors_hooks`` is handed, leaving out the storages of
    ``module``'s parameters (and of ``exclude``: they exist anyway). With ``regions``, each
    storage is charged to the innermost named module running when it is first saved (the rest
    to ``"other"``). Returns ``{region: bytes, ..., "total": bytes}``.
    """
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    params |= {t.untyped_storage().data_ptr() for t in exclude or []}
    seen: set[int] = set()
    by: dict[str, int] = {"other": 0}
    stack = ["other"]
    handles = []

    def enter(name: str):
        return lambda *_: stack.append(name)

    def leave(*_: Any) -> None:
        stack.pop()

    for name, mods in (regions or {}).items():
        by.setdefault(name, 0)
        for mod in mods if isinstance(mods, list) else [mods]:
            handles.append(mod.register_forward_pre_hook(enter(name)))
            handles.append(mod.register_forward_hook(leave))

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            by[stack[-1]] += storage.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = module(*inputs)
    finally:
        for h in handles:
            h.remove()
    del out
    by["total"] = sum(by.values())
    return by


def model_regions(model: WpeftAurora, added: nn.Module | None = None) -> dict[str, Any]:
    """The regions of :func:`measure_saved_bytes` that match :class:`ActivationEstimate`."""
    from wpeft.methods.tadp import TADPGenerator

    # Prithvi-WxC's groups are containers its forward never calls: their modules are the regions
    prithvi = isinstance(model.config, PrithviConfig)
    regions: dict[str, Any] = {
        "blocks": [b.block for b in model.blocks],
        "encoder": list(model.encoder.children()) if prithvi else model.encoder,
        "decoder": list(model.decoder.children()) if prithvi else model.decoder,
        "merges": [
            m
            for m in model.backbone.modules()
            if type(m).__name__ in ("PatchMerging3D", "PatchSplitting3D")
        ],
    }
    if added is not None:
        gens = [g for g in added.modules() if isinstance(g, TADPGenerator)]
        if gens:
            regions["method"] = gens
    return regions


# --- Prithvi-WxC ----------------------------------------------------------------------------


def prithvi_geometry(config: PrithviConfig, grid: tuple[int, int]) -> list[StageGeometry]:
    """Prithvi-WxC's attention patterns on its token grid ``(1, H/P, W/P)``: ``[local, global]``.

    Local attention runs within each mask unit (window: the unit's ``mu_h/P x mu_w/P`` tokens,
    one window per unit); global attention runs across the units, one sequence per token
    position in a unit (window: the ``H/mu_h x W/mu_w`` units, dilated; one per position). No
    padding (the grid divides into mask units) and no shifted-window mask (Prithvi's shifting
    rolls the tokens and its attention takes no mask).
    """
    h, w = grid
    p = config.patch_size
    mh, mw = config.mask_unit_size
    res = (1, h // p, w // p)
    local = (1, mh // p, mw // p)
    units = (1, h // mh, w // mw)
    return [
        StageGeometry(res=res, window=local, shift=False, padded=res),
        StageGeometry(res=res, window=units, shift=False, padded=res),
    ]


def _prithvi_block_order(config: PrithviConfig) -> list[tuple[int, int, int, bool]]:
    """``(pattern, width, heads, shifted?)`` per transformer block in execution order: pattern 0
    local, 1 global (alternating from local, ``2 n + 1`` blocks per stack)."""
    d, heads = config.embed_dim, config.n_heads
    out = []
    for n in (config.n_blocks_encoder, config.n_blocks_decoder):
        out += [(j % 2, d, heads, False) for j in range(2 * n + 1)]
    return out


def prithvi_activations(
    inv: ModelInventory, grid: tuple[int, int], batch: int, precision: str = "bf16"
) -> ActivationEstimate:
    """Saved-activation bytes of one Prithvi-WxC forward (CUDA autocast policy for ``bf16``,
    autocast over the transformer blocks; embedding, gathers and unembedding in fp32).

    Blocks: the Swin-block counting of the module docstring with the window of
    :func:`prithvi_geometry` (local: units x (tokens + P); global: tokens x (units + P)), no
    shifted-window mask, no modulation. Outside the blocks, per sample and token N of width D:
    the gather that rebuilds the unit grid before the decoder stack saves its input (4 N D);
    ``unembed`` its input when it trains (4 N D); when the encoder trains, the two patch
    embeddings their inputs (4 H W (T V + static channels [+ V climatology])) and the token and
    mask-token gathers theirs (2 x 4 N D). Under ``+ckpt`` (per transformer block) every block
    keeps its fp32 input; nothing outside the blocks is recomputed.
    """
    config = inv.config
    assert isinstance(config, PrithviConfig)
    a = 2 if precision == "bf16" else 4
    f = 4
    stages = prithvi_geometry(config, grid)
    order = _prithvi_block_order(config)
    per_block = [
        _block_bytes(
            stages[pattern], dim, heads, False, g, inv.prompts, config.mlp_multiplier, a, f,
            modulated=False,
        )
        for (pattern, dim, heads, _), g in zip(order, inv.blocks, strict=True)
    ]
    tokens, d = stages[0].tokens, config.embed_dim
    pixels = grid[0] * grid[1]
    n_vars = len(config.variables)
    climate = n_vars if config.residual == "climate" else 0
    static = len(config.static_channels) - 2 + climate  # lat / lon go to the Fourier encoding
    decoder = batch * 4 * tokens * d * (1 + int(inv.decoder_trainable))
    encoder = 0
    if inv.encoder_trainable:
        encoder = batch * 4 * (pixels * (config.max_history_size * n_vars + static) + 2 * tokens * d)
    generator_bytes = [
        _generator_bytes(g, inv.kernel_shape, precision, inv.encoder_trainable)
        for g in inv.generators
    ]
    copies = 2 * inv.autocast_weight_numel if precision == "bf16" else 0
    block_copies = 2 * max(b.weight_numel_2d for b in inv.blocks) if precision == "bf16" else 0
    channels_in = config.max_history_size * n_vars + len(config.static_channels) + climate
    return ActivationEstimate(
        blocks=batch * sum(per_block),
        largest_block=batch * max(per_block),
        merges=0,
        encoder=encoder,
        decoder=decoder,
        method=sum(generator_bytes),
        largest_generator=max(generator_bytes, default=0),
        weight_copies=copies,
        largest_block_weights=block_copies,
        block_inputs=batch * 4 * tokens * d * len(order),
        checkpoint_roots=encoder + decoder,  # not recomputed: kept whole under checkpointing
        batch_io=batch * 4 * pixels * (2 * channels_in + 2 * n_vars),
    )
