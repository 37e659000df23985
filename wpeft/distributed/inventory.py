"""What a backbone + method keeps in memory besides activations, counted on the meta device.

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
  each method declares it (``method.state_bytes()``);
* activations: below, plus the input batch (raw and normalised) and two fp32 copies of the
  prediction, alive at the peak though not saved for backward. Backward adds a transient of
  one Swin block's activations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from wpeft.backbones.configs import BackboneConfig, PrithviConfig, get_config

if TYPE_CHECKING:
    from wpeft.methods.base import PEFTMethod

__all__ = ["BlockGrad", "LinearGrad", "ModelInventory", "inventory", "params_on_meta"]


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
        method_state_bytes: Selection state (importance, masks): ``method.state_bytes()``.
        has_selection: Fisher-selection method, ``method.selection`` set (FSDP2 gathers its
            masks at checkpoints).
        autocast_weight_numel: Entries of >= 2-D tensors run under the backbone's autocast
            (each gets a bf16 copy saved for backward).
        blocks: Per Swin block, in execution order.
        merges: Trainability of (merge reduction | split lin1, split lin2) per layer.
        root_params: Parameters outside the Swin blocks (FSDP2's root unit).
        encoder_trainable / decoder_trainable: Whether they hold trainable parameters.
        prompts: Prompt tokens per window (TADP / VPT), 0 without prompts: ``method.num_prompts``.
        generators: ``method.prompt_generators`` (meta modules; their batch-independent
            activations are measured on the CPU). kernel_shape: Shape of the kernels E they read.
        budget: The budget match, when a budget was asked for.
        gradient_numel: Gradient entries alive at the optimiser step: ``with_grad``, or for
            lean SFAS (gradients consumed by hooks during backward) the dense gradients outside
            the backbone, the largest backbone tensor's (scored one at a time) and the k
            selected values (None: ``with_grad``).
        selection_transient_bytes: Bytes alive during backward for the selection itself: the
            candidate pool of lean SFAS's streamed top-k at its largest
            (:meth:`~wpeft.methods.streaming.StreamingTopK.pool_bytes`), 0 otherwise.
    """

    config: BackboneConfig | PrithviConfig
    method: str
    total: int
    with_grad: int
    trainable: int
    masked: int
    optimizer: str
    optimizer_bytes: int
    optimizer_transient_bytes: int
    method_state_bytes: int
    has_selection: bool
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
    gradient_numel: int | None = None
    selection_transient_bytes: int = 0

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


def _optimizer_bytes(method: PEFTMethod, opt: torch.optim.Optimizer) -> tuple[int, int, int]:
    """(state bytes, transient bytes of step(), masked entries) of the method's optimiser."""
    from wpeft.methods.compact import COMPACT_STATE_BYTES_PER_ENTRY, CompactAdamW
    from wpeft.methods.fisher import MaskedAdamW

    params = [p for g in opt.param_groups for p in g["params"]]
    if isinstance(opt, CompactAdamW):  # lean SFAS: state for the k selected entries only
        selection = method.selection
        assert selection is not None
        state = COMPACT_STATE_BYTES_PER_ENTRY * selection.k
        # other tensors: AdamW's two moments and a 4-byte step count
        state += sum(2 * p.numel() * p.element_size() + 4 for p in params if p not in selection)
        return state, 32 * max(selection.counts()), 0
    if isinstance(opt, MaskedAdamW):
        selection = method.selection
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
    backbone: str | BackboneConfig | PrithviConfig,
    method: str,
    *,
    budget: float | None = None,
    method_options: Mapping[str, Any] | None = None,
) -> ModelInventory:
    """Build the backbone on the meta device, apply the method, and count what memory needs."""
    from wpeft.backbones.aurora_adapter import build_backbone
    from wpeft.methods import create_method
    from wpeft.methods.budget import match_budget
    from wpeft.methods.lean import LeanSelection

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

    if isinstance(config, PrithviConfig):
        blocks, merges, in_blocks = _prithvi_structure(model)
    else:
        blocks, merges, in_blocks = _aurora_structure(model)
    autocast_numel = sum(p.numel() for p in model.backbone.parameters() if p.dim() >= 2)
    autocast_numel += sum(p.numel() for p in m.added.parameters() if p.dim() >= 2)

    generators = m.prompt_generators
    gradient_numel = None
    selection_transient = 0
    selection = m.selection
    if selection is not None and selection.lean:
        eligible = [p.numel() for p in selection.params]
        with_grad = sum(p.numel() for p in params if p.requires_grad)
        gradient_numel = with_grad - sum(eligible) + max(eligible) + selection.k
        if isinstance(selection, LeanSelection) and selection.stream is not None:
            selection_transient = selection.stream.pool_bytes()
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
        method_state_bytes=m.state_bytes(),
        has_selection=m.selection is not None,
        autocast_weight_numel=autocast_numel,
        blocks=tuple(blocks),
        merges=tuple(merges),
        root_params=sum(p.numel() for p in params if id(p) not in in_blocks),
        encoder_trainable=_any_grad(model.encoder),
        decoder_trainable=_any_grad(model.decoder),
        prompts=m.num_prompts,
        generators=tuple(generators) if generators is not None else (),
        kernel_shape=tuple(
            (generators.kernels(model) if generators is not None else model.embedding_kernels()).shape
        ),
        budget=budget_info,
        gradient_numel=gradient_numel,
        selection_transient_bytes=selection_transient,
    )


def _block_grad(info: Any, modulation1: bool, modulation2: bool) -> BlockGrad:
    """What trains in one transformer block (its linears asked through ``info.linear``)."""
    block_params = list(info.block.parameters())
    return BlockGrad(
        qkv=_linear_grad(info.linear("qkv")),
        proj=_linear_grad(info.linear("proj")),
        fc1=_linear_grad(info.linear("fc1")),
        fc2=_linear_grad(info.linear("fc2")),
        modulation1=modulation1,
        modulation2=modulation2,
        params=sum(p.numel() for p in block_params),
        weight_numel_2d=sum(p.numel() for p in block_params if p.dim() >= 2),
    )


def _block_ids(model: nn.Module) -> set[int]:
    """The ids of every transformer block's parameters."""
    return {id(p) for info in model.blocks for p in info.block.parameters()}


def _aurora_structure(
    model: nn.Module,
) -> tuple[list[BlockGrad], list[tuple[bool, ...]], set[int]]:
    """Aurora's Swin blocks, patch merging / splitting, and the ids of the blocks' parameters."""
    blocks = [
        _block_grad(info, _any_grad(info.block.norm1), _any_grad(info.block.norm2))
        for info in model.blocks
    ]
    merges = []
    for layer in model.backbone.encoder_layers:
        if layer.downsample is not None:
            merges.append((_any_grad(layer.downsample.reduction),))
    for layer in model.backbone.decoder_layers:
        if layer.upsample is not None:
            merges.append((_any_grad(layer.upsample.lin1), _any_grad(layer.upsample.lin2)))
    return blocks, merges, _block_ids(model)


def _prithvi_structure(
    model: nn.Module,
) -> tuple[list[BlockGrad], list[tuple[bool, ...]], set[int]]:
    """Prithvi-WxC's transformer blocks (encoder, then decoder; no merging) and the ids of their
    parameters. Its LayerNorms are plain (no time modulation): they save their input whether or
    not their affine parameters train, so ``modulation1`` / ``modulation2`` are False."""
    return [_block_grad(info, False, False) for info in model.blocks], [], _block_ids(model)
