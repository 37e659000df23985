"""Per-GPU memory planner: will this backbone + method + grid + batch fit, and with which strategy?

Fine-tuning Aurora 1.3B at 0.25° does not fit a GPU by default, and whether DDP suffices, FSDP2
is needed, or only activation checkpointing saves the run depends on the method (what trains,
which optimiser state it keeps), the grid and the micro-batch. :func:`plan` answers before any
GPU is rented, in bytes per GPU, for every strategy of :mod:`wpeft.distributed.strategy`:

* ``ddp`` (``none`` on one GPU): a full replica; the gradients are views into DDP's
  all-reduce buckets (``gradient_as_bucket_view=True``, as ``strategy.wrap`` sets it), so the
  buckets cost nothing beyond the gradients;
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
Fisher-selection methods (``method.selection``) run under FSDP2 with their state sharded like
the parameters (one global top-k over the shards); their checkpoints and records gather the full
masks on every rank (1 byte per backbone entry each, outside the training step).

Prithvi-WxC backbones (``prithvi-tiny``, ``prithvi-2.3b``) are planned the same way: its
transformer blocks are the FSDP2 units and the checkpointed units, the grid must divide into
its mask units, and its channels (levels) are fixed by its config.

What the plan adds up comes from :mod:`wpeft.distributed.inventory` (parameters, gradients,
optimiser and method state, counted on the meta device) and
:mod:`wpeft.distributed.activations` (saved activations, counted from the architecture and
calibrated against exact measurements).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from wpeft.backbones.configs import CONFIGS, BackboneConfig, PrithviConfig, get_config
from wpeft.distributed.activations import (
    ActivationEstimate,
    StageGeometry,
    estimate_activations,
    stage_geometry,
)
from wpeft.distributed.inventory import ModelInventory, inventory
from wpeft.errors import ConfigError

__all__ = [
    "PRECISIONS",
    "MemoryPlan",
    "PlanRequest",
    "StrategyEstimate",
    "add_arguments",
    "format_plan",
    "main",
    "parse_grid",
    "plan",
]

GIB = 2**30
PRECISIONS = ("bf16", "fp32")
#: Memory a CUDA context and the caching allocator's own state take outside PyTorch's counters.
CUDA_CONTEXT_BYTES = 1 * GIB
#: Fraction of the remaining card kept free for fragmentation and unmodelled temporaries.
MARGIN = 0.10


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


def _check_grid(grid: tuple[int, int], config: BackboneConfig | PrithviConfig) -> None:
    """Aurora's rule: W a multiple of the patch size, H too or one latitude more (721 -> 720).
    Prithvi-WxC's: H and W multiples of its mask unit (which the patch size divides)."""
    h, w = grid
    p = config.patch_size
    if isinstance(config, PrithviConfig):
        mh, mw = config.mask_unit_size
        if h % mh or w % mw:
            raise ConfigError(
                f"Grid {h}x{w} does not fit backbone {config.name!r} with mask unit {mh}x{mw} "
                f"(patch size {p}): the height must be a multiple of {mh} and the width of {mw}; "
                f"e.g. {max(mh, h - h % mh)}x{max(mw, w - w % mw)}, or the model's own grid "
                f"{config.grid[0]}x{config.grid[1]}."
            )
        return
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
        backbone: Backbone config name (``tiny``, ``small``, ``1.3b``, ``prithvi-tiny``,
            ``prithvi-2.3b``).
        method: Registered fine-tuning method (``wpeft methods``).
        gpus: GPUs that train data-parallel (>= 1).
        batch: Per-GPU micro-batch (samples per forward on one GPU; global = batch x gpus).
        grid: ``(H, W)`` of the fields, e.g. ``(721, 1440)`` at 0.25°; W a multiple of the
            patch size, H too or one more (Aurora); both multiples of the mask unit
            (Prithvi-WxC, e.g. ``(360, 576)`` for ``prithvi-2.3b``).
        precision: ``bf16`` (Aurora's autocast of the backbone, fp32 weights) or ``fp32``.
        budget: Target budget fraction for the method's size knob (as ``wpeft train
            --budget``); None keeps the method's default size.
        activation_checkpointing: True / False to force it on / off; None lets the plan choose.
        gpu_memory_gib: Memory of one GPU (80 for A100/H100 80 GB, 141 for H200).
        levels: Pressure levels of the atmospheric variables (13 for WeatherBench2 ERA5);
            Prithvi-WxC's are its config's (fixed by its weights), this is not used.
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
        from wpeft.methods.base import method_class

        method_class(self.method)  # an unknown name is refused with the known ones
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
        buffers: FSDP2's unsharded gradients of one block (DDP's buckets hold the gradients).
        transient: Backward's activation gradients of one block, plus the selection's own
            temporaries during backward (lean SFAS's candidate pool).
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
    transient = act.backward_transient + inv.selection_transient_bytes
    if not fsdp:
        weights = 4 * inv.total
        gradients = 4 * (inv.with_grad if inv.gradient_numel is None else inv.gradient_numel)
        optimizer = inv.optimizer_bytes
        method_state = inv.method_state_bytes
        buffers = 0  # DDP's buckets are the gradients (gradient_as_bucket_view)
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
    if fsdp and inv.has_selection:
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
        + _shrink_hint(inv.config)
    )
    return out + _notes(inv)



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
        f"(global {req.batch * req.gpus}), grid {h}x{w}, {_levels(req, inv.config)} levels, "
        f"{req.precision}",
        f"Parameters: {inv.total:,} total, {inv.with_grad:,} with gradients, {inv.trainable:,} "
        f"trainable ({inv.optimizer})" + (f", prompts {inv.prompts}/window" if inv.prompts else ""),
        _tokens_line(p),
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
    parser.add_argument(
        "--backbone",
        default="1.3b",
        help="backbone config: Aurora tiny/small/1.3b or Prithvi-WxC prithvi-tiny/prithvi-2.3b",
    )
    parser.add_argument("--method", default="weatherpeft", help="fine-tuning method")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs training data-parallel")
    parser.add_argument(
        "--batch",
        type=int,
        default=1,
        help="per-GPU micro-batch (global batch = batch x gpus)",
    )
    parser.add_argument(
        "--grid",
        default=None,
        help="HxW of the fields, e.g. 721x1440 (0.25°) or 128x256; default 721x1440 for Aurora, "
        "the model's own grid for Prithvi-WxC (360x576 for prithvi-2.3b, multiples of its mask "
        "unit)",
    )
    parser.add_argument(
        "--levels",
        type=int,
        default=13,
        help="pressure levels (default 13; Prithvi-WxC's are fixed by its config)",
    )
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
        grid=parse_grid(args.grid if args.grid is not None else _default_grid(args.backbone)),
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


# --- Prithvi-WxC ----------------------------------------------------------------------------


def _default_grid(backbone: str) -> tuple[int, int]:
    """``--grid`` left out: Aurora's 0.25° grid, or a Prithvi-WxC model's own grid."""
    config = CONFIGS.get(backbone)
    return tuple(config.grid) if isinstance(config, PrithviConfig) else (721, 1440)  # type: ignore[return-value]


def _levels(req: PlanRequest, config: BackboneConfig | PrithviConfig) -> str:
    if isinstance(config, PrithviConfig):
        return f"{len(config.levels)} (fixed)"
    return str(req.levels)


def _tokens_line(p: MemoryPlan) -> str:
    """Aurora: tokens and window per Swin stage. Prithvi-WxC: its token grid in mask units."""
    config = p.inventory.config
    if not isinstance(config, PrithviConfig):
        return "Tokens per stage (levels x lat x lon, window): " + ", ".join(
            f"{'x'.join(map(str, s.res))} ({'x'.join(map(str, s.window))})" for s in p.stages
        )
    local, units = p.stages[0], p.stages[1]
    prompts = f" + {p.inventory.prompts} prompts" if p.inventory.prompts else ""
    return (
        f"Tokens: {local.res[1]}x{local.res[2]} patches of {config.patch_size}x"
        f"{config.patch_size} in {units.window[1]}x{units.window[2]} mask units of "
        f"{local.window[1]}x{local.window[2]}; local attention over {local.window_tokens} "
        f"tokens{prompts} per unit, global over {units.window_tokens} units{prompts} per "
        f"position; {len(p.inventory.blocks)} transformer blocks of width {config.embed_dim}"
    )


def _shrink_hint(config: BackboneConfig | PrithviConfig) -> str:
    if isinstance(config, PrithviConfig):
        return (
            "more GPUs or a GPU with more memory (Prithvi-WxC's channels are fixed by its "
            "weights; a coarser grid needs a config built on it)."
        )
    return "a coarser grid, fewer pressure levels or a GPU with more memory."


if __name__ == "__main__":
    import sys

    parser = add_arguments(argparse.ArgumentParser(prog="wpeft plan", description=__doc__))
    try:
        sys.exit(main(parser.parse_args()))
    except ConfigError as e:
        print(f"wpeft plan: error: {e}", file=sys.stderr)
        sys.exit(2)
