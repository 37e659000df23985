"""Per-GPU memory planner: will this backbone + method + grid + batch fit, and with which strategy?

Fine-tuning Aurora 1.3B at 0.25° does not fit a GPU by default, and whether DDP suffices, FSDP2
is needed, or only activation checkpointing saves the run depends on the method (what trains,
which optimiser state it keeps), the grid and the micro-batch. :func:`plan` answers before any
GPU is rented, in bytes per GPU, for every strategy of :mod:`wpeft.distributed.strategy`:

* ``ddp`` (``none`` on one GPU): a full replica; gradient buckets as large as the gradients
  (``DistributedDataParallel`` with its default ``gradient_as_bucket_view=False``);
* ``fsdp`` (FSDP2 ``fully_shard`` per Swin block, the rest as the root unit, no
  mixed-precision policy, as ``strategy.wrap`` does): fp32 weights, gradients and optimiser
  state sharded /N; the root unit stays gathered for the whole step, plus two gathered blocks
  (the current one and the prefetched one) and one block's unsharded gradients;
* either one ``+ckpt``: activation checkpointing as Aurora's
  ``configure_activation_checkpointing`` applies it (encoder, decoder, every Swin layer and
  block).

``batch`` is the **per-GPU micro-batch** (``wpeft train --batch-size`` is the global batch:
global = per-GPU x GPUs). The auto choice is the first of ``ddp``, ``fsdp``, ``ddp+ckpt``,
``fsdp+ckpt`` that fits with a margin (10 % of the card after 1 GiB of CUDA context): no
recomputation before sharding, and DDP before FSDP2 because for PEFT methods FSDP2 gathers the
frozen weights at every step while DDP communicates only the trainable gradients.
Fisher-selection methods (``selects_entries``) run under FSDP2 with their state sharded like
the parameters (one global top-k over the shards); their checkpoints and records gather the full
masks on every rank (1 byte per backbone entry each, outside the training step).

Parameters are counted, never guessed: the real model is built with its parameters and buffers
on the ``meta`` device (``register_parameter`` / ``register_buffer`` redirected, because Aurora's
constructor calls ``.item()`` and cannot run under ``torch.device("meta")``), the method is
applied to it and its optimiser is built, all in about a second for 1.3B and no memory. Terms:

* weights: 4 bytes per parameter (fp32 master weights; ``precision="bf16"`` is Aurora's
  autocast of the backbone, which keeps fp32 weights);
* gradients: 4 bytes per entry of every tensor with ``requires_grad`` (SFAS / WeatherPEFT
  tensors are dense: the mask is applied to a full gradient);
* optimiser: ``torch.optim.AdamW``: 2 fp32 moments (8 bytes) per gradient entry;
  ``MaskedAdamW`` as implemented today: its state is dense, an int32 step count and 2 fp32
  moments (12 bytes) per entry of every masked tensor, 8 bytes elsewhere; AdamW's foreach step
  adds a transient fp32 copy of the trainable entries;
* method state: SFAS keeps one fp32 importance per eligible entry plus the current mask and its
  union as bools (6 bytes per entry); the static Fisher masks keep the two bool masks (2 bytes);
* activations: below, plus the input batch (raw and normalised) and two fp32 copies of the
  prediction, alive at the peak though not saved for backward. Backward adds a transient of
  one Swin block's activations.

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
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from wpeft.backbones.configs import CONFIGS, BackboneConfig, get_config
from wpeft.errors import ConfigError

if TYPE_CHECKING:  # the model code is imported when a plan is made, not by `wpeft --help`
    from wpeft.backbones.aurora_adapter import WpeftAurora

__all__ = [
    "PRECISIONS",
    "ActivationEstimate",
    "MemoryPlan",
    "ModelInventory",
    "PlanRequest",
    "StrategyEstimate",
    "add_arguments",
    "estimate_activations",
    "format_plan",
    "inventory",
    "main",
    "measure_saved_bytes",
    "params_on_meta",
    "parse_grid",
    "plan",
    "stage_geometry",
]

GIB = 2**30
PRECISIONS = ("bf16", "fp32")
#: Memory a CUDA context and the caching allocator's own state take outside PyTorch's counters.
CUDA_CONTEXT_BYTES = 1 * GIB
#: Fraction of the remaining card kept free for fragmentation and unmodelled temporaries.
MARGIN = 0.10
#: Multiplies the counted Swin-block bytes (calibrated: the counting is exact on CPU fp32).
BLOCK_SCALE = 1.0
#: Decoder saved bytes per patch = 4 (D (c0 + c1 C) + k0 + k1 C), C = pressure levels.
DECODER_TRAINABLE = (26.0, 22.09, 0.2, 4.0)
DECODER_FROZEN = (12.0, 12.09, 0.0, 0.0)
#: Encoder saved bytes per patch when it trains (0 when frozen), same form.
ENCODER_TRAINABLE = (52.1, 3.0, 238.7, 160.0)


# ============================================================================================
# request
# ============================================================================================


def parse_grid(text: str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``"721x1440"`` (or a pair) -> ``(721, 1440)``; :class:`ConfigError` otherwise."""
    if isinstance(text, (tuple, list)):
        parts = list(text)
    else:
        parts = str(text).lower().replace("×", "x").split("x")
    try:
        if len(parts) != 2:
            raise ValueError
        h, w = (int(str(p).strip()) for p in parts)
    except ValueError:
        raise ConfigError(
            f"Grid {text!r} is not HxW with two integers, e.g. 721x1440 (0.25°) or 128x256."
        ) from None
    if h < 1 or w < 1:
        raise ConfigError(f"Grid {text!r} must have positive sides, e.g. 721x1440.")
    return h, w


def _check_grid(grid: tuple[int, int], config: BackboneConfig) -> None:
    """Aurora's rule: W a multiple of the patch size, H too or one latitude more (721 -> 720)."""
    h, w = grid
    p = config.patch_size
    if w % p or h % p > 1:
        raise ConfigError(
            f"Grid {h}x{w} does not fit backbone {config.name!r} with patch size {p}: the width "
            f"must be a multiple of {p} and the height a multiple of {p} or one more (Aurora "
            f"drops one extra latitude, 721 -> 720); e.g. {h - h % p}x{w - w % p}."
        )
    if h // p < 2 or w // p < 2:
        raise ConfigError(f"Grid {h}x{w} gives fewer than 2x2 patches of size {p}.")


@dataclass(frozen=True)
class PlanRequest:
    """What to plan.

    Attributes:
        backbone: Backbone config name (``tiny``, ``small``, ``1.3b``).
        method: Registered fine-tuning method (``wpeft methods``).
        gpus: GPUs that train data-parallel (>= 1).
        batch: Per-GPU micro-batch (samples per forward on one GPU; global = batch x gpus).
        grid: ``(H, W)`` of the fields, e.g. ``(721, 1440)`` at 0.25°; W a multiple of the
            patch size, H too or one more.
        precision: ``bf16`` (Aurora's autocast of the backbone, fp32 weights) or ``fp32``.
        budget: Target budget fraction for the method's size knob (as ``wpeft train
            --budget``); None keeps the method's default size.
        activation_checkpointing: True / False to force it on / off; None lets the plan choose.
        gpu_memory_gib: Memory of one GPU (80 for A100/H100 80 GB, 141 for H200).
        levels: Pressure levels of the atmospheric variables (13 for WeatherBench2 ERA5).
        method_options: Further config fields of the method.
    """

    backbone: str
    method: str
    gpus: int
    batch: int
    grid: tuple[int, int]
    precision: str = "bf16"
    budget: float | None = None
    activation_checkpointing: bool | None = None
    gpu_memory_gib: float = 80.0
    levels: int = 13
    method_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backbone not in CONFIGS:
            raise ConfigError(
                f"Unknown backbone {self.backbone!r}; choose one of {sorted(CONFIGS)}."
            )
        from wpeft.methods import METHODS

        if self.method not in METHODS:
            raise ConfigError(f"Unknown method {self.method!r}; registered: {sorted(METHODS)}.")
        for name in ("gpus", "batch", "levels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}.")
        object.__setattr__(self, "grid", parse_grid(self.grid))
        _check_grid(self.grid, get_config(self.backbone))
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}.")
        if self.budget is not None and not 0.0 < self.budget <= 1.0:
            raise ConfigError(
                f"budget {self.budget!r} is out of range: a fraction of backbone parameters in "
                "(0, 1], e.g. 0.003 for 0.3%."
            )
        if not self.gpu_memory_gib > 0:
            raise ConfigError(f"gpu_memory_gib must be > 0, got {self.gpu_memory_gib!r}.")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["method_options"] = dict(self.method_options)
        return d


# ============================================================================================
# parameters: the real model on the meta device
# ============================================================================================


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Every parameter and buffer registered inside the context lands on the ``meta`` device.

    Tensors that constructors compute on the way (Aurora calls ``.item()`` on a ``linspace``)
    stay real, which ``torch.device("meta")`` would forbid; layers allocate their weights with
    ``torch.empty`` (untouched pages) before the redirection, so 1.3B parameters cost nothing.
    """
    register_parameter = nn.Module.register_parameter
    register_buffer = nn.Module.register_buffer

    def to_meta_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(self, name, param)

    def to_meta_buffer(
        self: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True
    ) -> None:
        if tensor is not None:
            tensor = tensor.to("meta")
        register_buffer(self, name, tensor, persistent)

    nn.Module.register_parameter = to_meta_parameter  # type: ignore[method-assign]
    nn.Module.register_buffer = to_meta_buffer  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
        nn.Module.register_buffer = register_buffer  # type: ignore[method-assign]


@dataclass(frozen=True)
class LinearGrad:
    """What one linear sub-layer saves for backward: its input if its own weight trains, and
    a cast copy of the input plus the hidden activations of an adapter (LoRA) if it has one."""

    own: bool
    adapter_rank: int = 0

    @property
    def adapter(self) -> bool:
        return self.adapter_rank > 0


@dataclass(frozen=True)
class BlockGrad:
    """Trainability of the parts of one Swin block that decide its saved activations.

    Attributes:
        qkv / proj / fc1 / fc2: The block's linear sub-layers.
        modulation1 / modulation2: The AdaptiveLayerNorms' modulation trains (their normalised
            output is then saved).
        params: Parameters of the block (an FSDP2 unit), adapters inside it included.
        weight_numel_2d: Entries of its >= 2-D tensors (cast to bf16 under autocast).
    """

    qkv: LinearGrad
    proj: LinearGrad
    fc1: LinearGrad
    fc2: LinearGrad
    modulation1: bool
    modulation2: bool
    params: int
    weight_numel_2d: int


@dataclass(frozen=True)
class ModelInventory:
    """Counts of the model with the method applied (from the meta device).

    Attributes:
        config: The backbone config.
        method: The method's registered name.
        total: All parameters (model, injected adapters, added modules).
        with_grad: Entries of tensors with ``requires_grad`` (gradient buffers).
        trainable: Entries allowed to change (``method.trainable()["total"]``).
        masked: Entries of tensors under a MaskedAdamW mask (dense state of 12 bytes).
        optimizer: Class name of the method's optimiser.
        optimizer_bytes: Its state when every trainable tensor has state.
        optimizer_transient_bytes: Extra bytes during ``step()`` (foreach temporaries).
        method_state_bytes: Selection state (importance, masks).
        selects_entries: Fisher-selection method (FSDP2 gathers its masks at checkpoints).
        autocast_weight_numel: Entries of >= 2-D tensors run under the backbone's autocast
            (each gets a bf16 copy saved for backward).
        blocks: Per Swin block, in execution order.
        merges: Trainability of (merge reduction | split lin1, split lin2) per layer.
        root_params: Parameters outside the Swin blocks (FSDP2's root unit).
        encoder_trainable / decoder_trainable: Whether they hold trainable parameters.
        prompts: Prompt tokens per window (TADP / VPT), 0 without prompts.
        generators: The TADP generators (meta modules; their batch-independent activations are
            measured on the CPU). kernel_shape: Shape of the kernels E they read.
        budget: The budget match, when a budget was asked for.
    """

    config: BackboneConfig
    method: str
    total: int
    with_grad: int
    trainable: int
    masked: int
    optimizer: str
    optimizer_bytes: int
    optimizer_transient_bytes: int
    method_state_bytes: int
    selects_entries: bool
    autocast_weight_numel: int
    blocks: tuple[BlockGrad, ...]
    merges: tuple[tuple[bool, ...], ...]
    root_params: int
    encoder_trainable: bool
    decoder_trainable: bool
    prompts: int
    generators: tuple[Any, ...] = ()
    kernel_shape: tuple[int, ...] = ()
    budget: dict[str, Any] | None = None

    @property
    def largest_block(self) -> int:
        return max(b.params for b in self.blocks)


def _linear_grad(module: nn.Module) -> LinearGrad:
    """Own weight trainable? Adapter (peft LoRA: ``base_layer`` + ``lora_A``) rank?"""
    base = getattr(module, "base_layer", module)
    own = bool(getattr(base, "weight", None) is not None and base.weight.requires_grad)
    rank = 0
    lora_a = getattr(module, "lora_A", None)
    if isinstance(lora_a, nn.ModuleDict):
        rank = sum(
            m.out_features for m in lora_a.values() if any(p.requires_grad for p in m.parameters())
        )
    return LinearGrad(own=own, adapter_rank=rank)


def _any_grad(module: nn.Module | None) -> bool:
    return module is not None and any(p.requires_grad for p in module.parameters())


def _optimizer_bytes(method: Any, opt: torch.optim.Optimizer) -> tuple[int, int, int]:
    """(state bytes, transient bytes of step(), masked entries) of the method's optimiser."""
    from wpeft.methods.fisher import MaskedAdamW

    params = [p for g in opt.param_groups for p in g["params"]]
    if isinstance(opt, MaskedAdamW):
        selection = getattr(method, "selection", None)
        state, masked = 0, 0
        for p in params:
            if not opt.dense and selection is not None and p in selection:
                masked += p.numel()
                state += p.numel() * (4 + 2 * p.element_size())  # int32 steps + 2 moments
            else:
                state += 2 * p.numel() * p.element_size()
        largest = max(p.numel() for p in params)
        return state, 32 * largest, masked  # per-tensor gather/scatter temporaries
    # torch.optim.AdamW (and, as an approximation, any other Adam-like optimiser)
    state = sum(2 * p.numel() * p.element_size() for p in params)
    foreach = opt.defaults.get("foreach") is not False
    transient = sum(p.numel() * p.element_size() for p in params) if foreach else 0
    return state, transient, 0


def inventory(
    backbone: str | BackboneConfig,
    method: str,
    *,
    budget: float | None = None,
    method_options: Mapping[str, Any] | None = None,
) -> ModelInventory:
    """Build the backbone on the meta device, apply the method, and count what memory needs."""
    from wpeft.backbones.aurora_adapter import build_backbone
    from wpeft.methods import create_method
    from wpeft.methods.budget import match_budget
    from wpeft.methods.prompt_injection import PromptInjector
    from wpeft.methods.tadp import TADPGenerator

    config = get_config(backbone) if isinstance(backbone, str) else backbone
    options = dict(method_options or {})
    budget_info = None
    with params_on_meta():
        if budget is not None:
            match = match_budget(method, budget, lambda: build_backbone(config), **options)
            if match.knob is not None:
                options[match.knob] = match.value
            budget_info = match.to_dict()
        model = build_backbone(config)
        m = create_method(method, **options)
        m.apply(model)
        opt = m.optimizer(lr=1e-3, weight_decay=0.01)
    params = list(m.parameters())
    opt_bytes, opt_transient, masked = _optimizer_bytes(m, opt)

    selection = getattr(m, "selection", None)
    method_state = 0
    if selection is not None:
        per_entry = 2 + (4 if hasattr(m, "_accumulator") else 0)  # masks (+ importance)
        method_state = per_entry * selection.total

    blocks = []
    in_blocks: set[int] = set()
    for info in model.blocks:
        block_params = list(info.block.parameters())
        in_blocks.update(id(p) for p in block_params)
        blocks.append(
            BlockGrad(
                qkv=_linear_grad(info.attention.qkv),
                proj=_linear_grad(info.attention.proj),
                fc1=_linear_grad(info.block.mlp.fc1),
                fc2=_linear_grad(info.block.mlp.fc2),
                modulation1=_any_grad(info.block.norm1),
                modulation2=_any_grad(info.block.norm2),
                params=sum(p.numel() for p in block_params),
                weight_numel_2d=sum(p.numel() for p in block_params if p.dim() >= 2),
            )
        )
    merges = []
    for layer in model.backbone.encoder_layers:
        if layer.downsample is not None:
            merges.append((_any_grad(layer.downsample.reduction),))
    for layer in model.backbone.decoder_layers:
        if layer.upsample is not None:
            merges.append((_any_grad(layer.upsample.lin1), _any_grad(layer.upsample.lin2)))
    autocast_numel = sum(p.numel() for p in model.backbone.parameters() if p.dim() >= 2)
    autocast_numel += sum(p.numel() for p in m.added.parameters() if p.dim() >= 2)

    injector = getattr(m, "injector", None)
    prompts = (
        int(getattr(m.config, "num_prompts", 0)) if isinstance(injector, PromptInjector) else 0
    )
    generators = tuple(g for g in m.added.modules() if isinstance(g, TADPGenerator))
    return ModelInventory(
        config=config,
        method=method,
        total=sum(p.numel() for p in params),
        with_grad=sum(p.numel() for p in params if p.requires_grad),
        trainable=m.trainable()["total"],
        masked=masked,
        optimizer=type(opt).__name__,
        optimizer_bytes=opt_bytes,
        optimizer_transient_bytes=opt_transient,
        method_state_bytes=method_state,
        selects_entries=bool(getattr(m, "selects_entries", False)),
        autocast_weight_numel=autocast_numel,
        blocks=tuple(blocks),
        merges=tuple(merges),
        root_params=sum(p.numel() for p in params if id(p) not in in_blocks),
        encoder_trainable=_any_grad(model.encoder),
        decoder_trainable=_any_grad(model.decoder),
        prompts=prompts,
        generators=generators,
        kernel_shape=tuple(model.embedding_kernels().shape),
        budget=budget_info,
    )


# ============================================================================================
# activations
# ============================================================================================


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


def stage_geometry(config: BackboneConfig, grid: tuple[int, int]) -> list[StageGeometry]:
    """Per encoder stage (the decoder mirrors them): tokens, windows and padding for ``grid``."""
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
) -> int:
    """Saved bytes of one Swin block for one sample (see the module docstring)."""
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
    return int(BLOCK_SCALE * out) + 16 * d  # + the per-sample time-modulation vectors


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
    """Saved-activation bytes (CUDA autocast policy for ``bf16``) of one forward."""
    config = inv.config
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


# ============================================================================================
# strategies
# ============================================================================================


@dataclass(frozen=True)
class StrategyEstimate:
    """Per-GPU bytes of one strategy.

    Attributes:
        strategy: ``none`` (one GPU), ``ddp`` or ``fsdp`` (as ``wpeft train --strategy``).
        checkpointing: Activation checkpointing on.
        weights / gradients / optimizer / method_state: Resident state (sharded for fsdp;
            fsdp's gathered units are in ``weights``).
        activations: Saved activations at the end of the forward (peak under checkpointing).
        buffers: DDP gradient buckets, or FSDP2's unsharded gradients of one block.
        transient: Backward's activation gradients of one block.
        step_peak: Resident state plus the optimiser's temporaries during ``step()``.
        note: What the table leaves out for this strategy, if anything.
    """

    strategy: str
    checkpointing: bool
    weights: int
    gradients: int
    optimizer: int
    method_state: int
    activations: int
    buffers: int
    transient: int
    step_peak: int
    note: str = ""

    @property
    def label(self) -> str:
        return self.strategy + ("+ckpt" if self.checkpointing else "")

    @property
    def forward_backward_peak(self) -> int:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.method_state
            + self.activations
            + self.buffers
            + self.transient
        )

    @property
    def peak(self) -> int:
        """Peak allocated bytes over one training step (what max_memory_allocated reports)."""
        return max(self.forward_backward_peak, self.step_peak)


@dataclass(frozen=True)
class MemoryPlan:
    """Result of :func:`plan`.

    Attributes:
        request: What was asked.
        inventory: Parameter counts of the applied method.
        stages: Token geometry per stage.
        activations: Activation estimate (per GPU).
        strategies: One estimate per strategy, in preference order.
        usable_bytes: What fits on one GPU with the margin.
        choice: The chosen strategy's label, or None when nothing fits.
        advice: What to change when nothing fits (or notes worth knowing).
    """

    request: PlanRequest
    inventory: ModelInventory
    stages: list[StageGeometry]
    activations: ActivationEstimate
    strategies: list[StrategyEstimate]
    usable_bytes: int
    choice: str | None
    advice: list[str]

    def strategy(self, label: str) -> StrategyEstimate:
        for s in self.strategies:
            if s.label == label:
                return s
        raise KeyError(f"No strategy {label!r}; have {[s.label for s in self.strategies]}.")

    @property
    def fits(self) -> bool:
        return self.choice is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "request": self.request.to_dict(),
            "parameters": {
                "total": self.inventory.total,
                "with_grad": self.inventory.with_grad,
                "trainable": self.inventory.trainable,
                "masked": self.inventory.masked,
                "optimizer": self.inventory.optimizer,
            },
            "strategies": [
                {**dataclasses.asdict(s), "label": s.label, "peak": s.peak} for s in self.strategies
            ],
            "usable_bytes": self.usable_bytes,
            "choice": self.choice,
            "advice": self.advice,
        }


def _strategy(
    inv: ModelInventory, act: ActivationEstimate, gpus: int, fsdp: bool, ckpt: bool
) -> StrategyEstimate:
    activations = (act.checkpointed if ckpt else act.full) + act.batch_io
    transient = act.backward_transient
    if not fsdp:
        weights = 4 * inv.total
        gradients = 4 * inv.with_grad
        optimizer = inv.optimizer_bytes
        method_state = inv.method_state_bytes
        buffers = 4 * inv.with_grad if gpus > 1 else 0  # DDP's gradient buckets
        name = "ddp" if gpus > 1 else "none"
    else:
        unit = inv.largest_block
        weights = math.ceil(4 * inv.total / gpus) + 4 * (inv.root_params + 2 * unit)
        gradients = math.ceil(4 * inv.with_grad / gpus)
        optimizer = math.ceil(inv.optimizer_bytes / gpus)
        method_state = math.ceil(inv.method_state_bytes / gpus)
        buffers = 4 * unit  # one block's unsharded gradients before the reduce-scatter
        name = "fsdp"
    step_peak = weights + gradients + optimizer + method_state + buffers
    step_peak += math.ceil(inv.optimizer_transient_bytes / (gpus if fsdp else 1))
    note = ""
    if fsdp and inv.selects_entries:
        note = (
            f"{inv.method}'s checkpoints and records gather the full mask and union on every "
            "GPU (1 byte per backbone entry each, outside the training step)"
        )
    return StrategyEstimate(
        strategy=name,
        checkpointing=ckpt,
        weights=weights,
        gradients=gradients,
        optimizer=optimizer,
        method_state=method_state,
        activations=activations,
        buffers=buffers,
        transient=transient,
        step_peak=step_peak,
        note=note,
    )


def _candidates(gpus: int, checkpointing: bool | None) -> list[tuple[bool, bool]]:
    """``(fsdp, checkpointing)`` in preference order (FSDP2 only with several GPUs)."""
    order = [(False, False), (True, False), (False, True), (True, True)]
    if checkpointing is not None:
        order = [o for o in order if o[1] == checkpointing]
    return [o for o in order if gpus > 1 or not o[0]]


def _estimates(
    inv: ModelInventory,
    req: PlanRequest,
    *,
    batch: int | None = None,
    gpus: int | None = None,
    checkpointing: bool | None | str = "request",
) -> tuple[ActivationEstimate, list[StrategyEstimate]]:
    batch = req.batch if batch is None else batch
    gpus = req.gpus if gpus is None else gpus
    ckpt = req.activation_checkpointing if checkpointing == "request" else checkpointing
    act = estimate_activations(inv, req.grid, batch, req.levels, req.precision)
    strategies = [
        _strategy(inv, act, gpus, fsdp, c)
        for fsdp, c in _candidates(gpus, ckpt)  # type: ignore[arg-type]
    ]
    return act, strategies


def _usable(gpu_memory_gib: float) -> int:
    return int((gpu_memory_gib * GIB - CUDA_CONTEXT_BYTES) * (1 - MARGIN))


def plan(req: PlanRequest) -> MemoryPlan:
    """Per-GPU memory of every strategy for ``req`` and the first one that fits."""
    inv = inventory(req.backbone, req.method, budget=req.budget, method_options=req.method_options)
    act, strategies = _estimates(inv, req)
    usable = _usable(req.gpu_memory_gib)
    choice = next((s.label for s in strategies if s.peak <= usable), None)
    advice = _notes(inv) if choice is not None else _advice(req, inv, strategies, usable)
    return MemoryPlan(
        request=req,
        inventory=inv,
        stages=stage_geometry(inv.config, req.grid),
        activations=act,
        strategies=strategies,
        usable_bytes=usable,
        choice=choice,
        advice=advice,
    )


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _notes(inv: ModelInventory) -> list[str]:
    if not inv.masked:
        return []
    note = (
        f"{inv.optimizer} keeps dense state (int32 step + 2 fp32 moments) for all "
        f"{inv.masked:,} masked entries ({_gib(inv.optimizer_bytes)} on one replica) although "
        f"{inv.trainable:,} entries train per step."
    )
    return [note]


def _advice(
    req: PlanRequest, inv: ModelInventory, strategies: list[StrategyEstimate], usable: int
) -> list[str]:
    """What to change so that something fits: batch, checkpointing, GPUs, grid."""
    best = min(strategies, key=lambda s: s.peak)
    headline = (
        f"Nothing fits {req.gpu_memory_gib:g} GiB per GPU (usable {_gib(usable)}); the "
        f"smallest is {best.label} at {_gib(best.peak)}."
    )
    out = [headline]
    # peaks are affine in the batch: fixed + batch x per_sample, per strategy
    options: list[tuple[int, str]] = []
    for ckpt in (True,) if req.activation_checkpointing else (False, True):
        _, one = _estimates(inv, req, batch=1, checkpointing=ckpt)
        _, two = _estimates(inv, req, batch=2, checkpointing=ckpt)
        for s1, s2 in zip(one, two):
            per_sample = max(1, s2.peak - s1.peak)
            fixed = s1.peak - per_sample
            fit = (usable - fixed) // per_sample
            if fit >= 1:
                options.append((fit, s1.label))
    if options:
        fit, label = max(options)
        if req.activation_checkpointing is False and label.endswith("+ckpt"):
            out.append(f"Allow activation checkpointing: {label} fits a per-GPU batch of {fit}.")
        else:
            out.append(f"Reduce the per-GPU batch to {fit} ({label}).")
        return out + _notes(inv)
    gpus = max(2, req.gpus)  # FSDP2 spreads the model state over more GPUs
    while gpus <= 4096:
        _, ests = _estimates(inv, req, batch=1, gpus=gpus, checkpointing=True)
        fsdp = [s for s in ests if s.strategy == "fsdp" and s.peak <= usable]
        if fsdp:
            out.append(f"With {gpus} GPUs, fsdp+ckpt fits a per-GPU batch of 1.")
            break
        gpus *= 2
    act1, _ = _estimates(inv, req, batch=1, checkpointing=True)
    out.append(
        f"One sample needs {_gib(act1.checkpointed)} of activations even with checkpointing: "
        "a coarser grid, fewer pressure levels or a GPU with more memory."
    )
    return out + _notes(inv)


# ============================================================================================
# measuring (calibration, tests, GPU checks)
# ============================================================================================


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

    regions: dict[str, Any] = {
        "blocks": [b.block for b in model.blocks],
        "encoder": model.encoder,
        "decoder": model.decoder,
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


# ============================================================================================
# output and CLI
# ============================================================================================


def format_plan(p: MemoryPlan) -> str:
    """A readable table of the plan (GiB per GPU)."""
    req, inv = p.request, p.inventory
    h, w = req.grid
    lines = [
        f"Memory plan: backbone {inv.config.name}, method {inv.method}"
        + (f" (budget {req.budget:g})" if req.budget is not None else "")
        + f", {req.gpus} GPU(s) x {req.gpu_memory_gib:g} GiB, per-GPU batch {req.batch} "
        f"(global {req.batch * req.gpus}), grid {h}x{w}, {req.levels} levels, {req.precision}",
        f"Parameters: {inv.total:,} total, {inv.with_grad:,} with gradients, {inv.trainable:,} "
        f"trainable ({inv.optimizer})" + (f", prompts {inv.prompts}/window" if inv.prompts else ""),
        "Tokens per stage (levels x lat x lon, window): "
        + ", ".join(
            f"{'x'.join(map(str, s.res))} ({'x'.join(map(str, s.window))})" for s in p.stages
        ),
        "",
    ]
    cols = p.strategies
    header = "| GiB per GPU | " + " | ".join(s.label for s in cols) + " |"
    lines += [header, "|---|" + "---:|" * len(cols)]
    rows = [
        ("weights", "weights"),
        ("gradients", "gradients"),
        ("optimizer state", "optimizer"),
        ("method state", "method_state"),
        ("activations", "activations"),
        ("comm. buffers", "buffers"),
        ("backward transient", "transient"),
    ]
    for title, attr in rows:
        lines.append(
            f"| {title} | " + " | ".join(f"{getattr(s, attr) / GIB:.2f}" for s in cols) + " |"
        )
    lines.append("| **peak** | " + " | ".join(f"**{s.peak / GIB:.2f}**" for s in cols) + " |")
    verdict = ["fits" if s.peak <= p.usable_bytes else "no" for s in cols]
    lines.append("| fits | " + " | ".join(verdict) + " |")
    lines.append("")
    act = p.activations
    lines.append(
        f"Activations without checkpointing: blocks {_gib(act.blocks)}, encoder "
        f"{_gib(act.encoder)}, decoder {_gib(act.decoder)}, merges {_gib(act.merges)}, method "
        f"{_gib(act.method)}, bf16 weight copies {_gib(act.weight_copies)}; with "
        f"checkpointing {_gib(act.checkpointed)}; plus input batch and predictions "
        f"{_gib(act.batch_io)}."
    )
    lines.append(
        f"Usable per GPU: {_gib(p.usable_bytes)} ({req.gpu_memory_gib:g} GiB - "
        f"{_gib(CUDA_CONTEXT_BYTES)} CUDA context, {MARGIN:.0%} margin)."
    )
    for s in cols:
        if s.note:
            lines.append(f"{s.label}: {s.note}.")
    if p.choice is not None:
        lines.append(f"Choice: {p.choice} (peak {_gib(p.strategy(p.choice).peak)}).")
    else:
        lines.append("Choice: none fits.")
    lines += [f"- {a}" for a in p.advice]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``wpeft plan``."""
    parser.add_argument("--backbone", default="1.3b", help="backbone config (tiny/small/1.3b)")
    parser.add_argument("--method", default="weatherpeft", help="fine-tuning method")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs training data-parallel")
    parser.add_argument(
        "--batch",
        type=int,
        default=1,
        help="per-GPU micro-batch (global batch = batch x gpus)",
    )
    parser.add_argument(
        "--grid", default="721x1440", help="HxW of the fields, e.g. 721x1440 (0.25°) or 128x256"
    )
    parser.add_argument("--levels", type=int, default=13, help="pressure levels (default 13)")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16")
    parser.add_argument("--budget", type=float, default=None, help="budget fraction, e.g. 0.003")
    parser.add_argument(
        "--checkpointing",
        choices=("auto", "on", "off"),
        default="auto",
        help="activation checkpointing: let the plan choose, force it on or off",
    )
    parser.add_argument(
        "--gpu-memory", type=float, default=80.0, help="GiB per GPU (80 for A100/H100, 141 H200)"
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def request_from_args(args: argparse.Namespace) -> PlanRequest:
    ckpt = {"auto": None, "on": True, "off": False}[args.checkpointing]
    return PlanRequest(
        backbone=args.backbone,
        method=args.method,
        gpus=args.gpus,
        batch=args.batch,
        grid=parse_grid(args.grid),
        precision=args.precision,
        budget=args.budget,
        activation_checkpointing=ckpt,
        gpu_memory_gib=args.gpu_memory,
        levels=args.levels,
    )


def main(args: argparse.Namespace) -> int:
    """``wpeft plan``: print the plan; 0 when a strategy fits, 1 when none does.

    Bad input raises :class:`ConfigError` (the CLI prints it and exits 2).
    """
    p = plan(request_from_args(args))
    print(json.dumps(p.to_dict(), indent=2) if args.json else format_plan(p))
    return 0 if p.fits else 1


if __name__ == "__main__":
    import sys

    parser = add_arguments(argparse.ArgumentParser(prog="wpeft plan", description=__doc__))
    try:
        sys.exit(main(parser.parse_args()))
    except ConfigError as e:
        print(f"wpeft plan: error: {e}", file=sys.stderr)
        sys.exit(2)
