"""TADP — Task-Adaptive Dynamic Prompting (WeatherPEFT's forward-pass half).

Each backbone block owns a prompt generator that turns the encoder's patch-embedding kernels
E ``(D_e, V, T, P_h, P_w)`` — recomputed from the live weights at every forward — into P prompt
tokens ``(P, D_b)`` that are prepended to every attention window of that block.

E is task-adaptive: its V variables are every variable the task feeds the encoder, in the order
of :meth:`~wpeft.backbones.aurora_adapter.WpeftAurora.embedding_variables`: the backbone's own
(surface, static, atmospheric) and then the task's new ones (precipitation's ``tp_<lead>h``,
post-processing's ``<var>_logscale``), whose kernels are trainable parameters of the task head.
So E differs between tasks and changes during training even with the encoder frozen. The
generators are built when the method is applied, i.e. after ``task.setup(model)`` installed the
task's variables; they record their variables (:attr:`TADPGenerators.variables`) and an adapter
saved with them is refused on a model whose encoder holds other ones.

The prompt count P is the task's (``Task.num_prompts``: downscaling 30, post-processing 5,
precipitation 20) unless given; applied without a task (tests, ``wpeft methods``) it is
:data:`DEFAULT_PROMPTS`.

Per generator:

1. internal mode: three hierarchical adapters ``h = LN(x); x' = h + Up(GELU(Down(h)))`` over the
   space axis S = T·P_h·P_w (hidden 8), the variable axis V (hidden V//2) and the feature axis
   D_e (hidden 16);
2. external mode: the V·S tokens of width D_e, layer-normalised, attend to each other
   (parameter-free single-head ``softmax(Z Zᵀ/√D_e) Z`` as in the released code, or with learned
   projections); the weights are the "prompt-token attention map against variables and patches";
3. projection: LayerNorm over the token axis and one Linear V·S -> P, giving ``(P, D_e)``,
   stretched to the block width D_b by linear interpolation (no parameters).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from wpeft.backbones.aurora_adapter import BlockInfo, WpeftAurora
from wpeft.errors import CheckpointError, ConfigError
from wpeft.methods.base import MethodConfig, PEFTMethod, register
from wpeft.methods.prompt_injection import PromptInjector

__all__ = [
    "DEFAULT_PROMPTS",
    "TADPConfig",
    "TADPGenerator",
    "TADPGenerators",
    "TADPOnly",
    "TADPPrompted",
    "install_tadp",
    "record_prompt_attention",
]


class AxisAdapter(nn.Module):
    """``h = LN(x); x' = h + Up(GELU(Down(h)))`` over the last axis of x (size n)."""

    def __init__(self, n: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(n)
        self.down = nn.Linear(n, hidden)
        self.up = nn.Linear(hidden, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return h + self.up(F.gelu(self.down(h)))


class TADPGenerator(nn.Module):
    """Prompt generator of one block: E ``(D_e, V, T, P_h, P_w)`` -> prompts ``(P, D_b)``.

    Args:
        embed_dim: D_e. num_vars: V. space: S = T·P_h·P_w. num_prompts: P. block_dim: D_b.
        space_hidden / variable_hidden / feature_hidden: adapter widths (8, V//2, 16).
        external: ``"parameter_free"`` (released code) or ``"learned"`` (Q/K/V projections).
    """

    def __init__(
        self,
        embed_dim: int,
        num_vars: int,
        space: int,
        num_prompts: int,
        block_dim: int,
        space_hidden: int = 8,
        variable_hidden: int | None = None,
        feature_hidden: int = 16,
        external: Literal["parameter_free", "learned"] = "parameter_free",
    ) -> None:
        super().__init__()
        self.block_dim = block_dim
        self.space_adapter = AxisAdapter(space, space_hidden)
        self.variable_adapter = AxisAdapter(num_vars, variable_hidden or max(1, num_vars // 2))
        self.feature_adapter = AxisAdapter(embed_dim, feature_hidden)
        self.external_norm = nn.LayerNorm(embed_dim)
        self.external = external
        if external == "learned":
            self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.token_norm = nn.LayerNorm(num_vars * space)
        self.to_prompts = nn.Linear(num_vars * space, num_prompts)

    def forward(
        self, kernels: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Prompts ``(P, D_b)`` (and the external attention ``(V·S, V·S)`` if asked)."""
        d_e, v = kernels.shape[:2]
        x = kernels.reshape(d_e, v, -1)  # (D_e, V, S)
        x = self.space_adapter(x)  # adapts S
        x = self.variable_adapter(x.transpose(1, 2)).transpose(1, 2)  # adapts V
        x = self.feature_adapter(x.permute(1, 2, 0))  # (V, S, D_e), adapts D_e
        z = self.external_norm(x.reshape(-1, d_e))  # (V·S, D_e)
        if self.external == "learned":
            q, k, val = self.qkv(z).chunk(3, dim=-1)
        else:
            q = k = val = z
        attn = torch.softmax(q @ k.T / d_e**0.5, dim=-1)  # (V·S, V·S)
        z = attn @ val  # (V·S, D_e)
        prompts = self.to_prompts(self.token_norm(z.T))  # LN + Linear over tokens: (D_e, P)
        prompts = prompts.T  # (P, D_e)
        if self.block_dim != d_e:  # stretch features by linear interpolation
            prompts = F.interpolate(
                prompts[:, None, :], size=self.block_dim, mode="linear", align_corners=True
            )[:, 0, :]
        return (prompts, attn) if return_attention else prompts


#: Prompt tokens per block when neither the config nor a task gives them (the paper's
#: downscaling value).
DEFAULT_PROMPTS = 30


@dataclass
class TADPConfig(MethodConfig):
    """TADP settings."""

    num_prompts: int | None = field(
        default=None,
        metadata={"help": "Prompt tokens P per block; None: the task's (downscaling 30, "
                          "post-processing 5, precipitation 20; 30 without a task)."},
    )
    space_hidden: int = field(
        default=8, metadata={"help": "Hidden width of the adapter over the space axis S."}
    )
    variable_hidden: int | None = field(
        default=None,
        metadata={"help": "Hidden width of the adapter over the variable axis V (None: V//2)."},
    )
    feature_hidden: int = field(
        default=16, metadata={"help": "Hidden width of the adapter over the feature axis D_e."}
    )
    external: Literal["parameter_free", "learned"] = field(
        default="parameter_free",
        metadata={"help": "External-mode attention: 'parameter_free' (released code) or "
                          "'learned' projections."},
    )

    def __post_init__(self) -> None:
        n = self.num_prompts
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ConfigError(f"num_prompts must be an integer >= 1 (or None), got {n!r}.")
        for name in ("space_hidden", "feature_hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.external not in ("parameter_free", "learned"):
            raise ConfigError(
                f"external must be 'parameter_free' or 'learned', got {self.external!r}."
            )


class TADPGenerators(nn.ModuleList):
    """The generators of all blocks, with the variables (rows of E) they were built for.

    Attributes:
        variables: ``(embedding, name)`` pairs, as
            :meth:`~wpeft.backbones.aurora_adapter.WpeftAurora.embedding_variables`.
    """

    def __init__(self, generators: Iterable[nn.Module], variables: Sequence[tuple[str, str]]) -> None:
        super().__init__(generators)
        self.variables = tuple((str(k), str(n)) for k, n in variables)

    def kernels(self, model: WpeftAurora) -> torch.Tensor:
        """E ``(D_e, V, T, P_h, P_w)`` over :attr:`variables`, from ``model``'s live weights."""
        return model.embedding_kernels(self.variables)

    @property
    def variable_names(self) -> tuple[str, ...]:
        """``"surface:2t"``, ``"atmos:z"``, ``"surface:tp_12h"``... (the rows of E)."""
        return tuple(f"{k}:{n}" for k, n in self.variables)


def install_tadp(
    model: WpeftAurora, config: TADPConfig, added: nn.ModuleDict
) -> PromptInjector:
    """Create one generator per block in ``added["tadp"]`` and hook them into the attention.

    E covers every variable ``model``'s encoder holds (:meth:`WpeftAurora.embedding_variables`:
    the backbone's, then those a task added), so call this after ``task.setup(model)``.
    """
    variables = model.embedding_variables()
    kernels = model.embedding_kernels(variables)
    d_e, v = kernels.shape[:2]
    space = kernels[0, 0].numel()
    num_prompts = DEFAULT_PROMPTS if config.num_prompts is None else config.num_prompts
    generators = TADPGenerators(
        (
            TADPGenerator(
                d_e,
                v,
                space,
                num_prompts,
                info.dim,
                config.space_hidden,
                config.variable_hidden,
                config.feature_hidden,
                config.external,
            )
            for info in model.blocks
        ),
        variables,
    )
    added["tadp"] = generators

    def prompts(info: BlockInfo) -> torch.Tensor:
        return generators[info.index](generators.kernels(model))

    return PromptInjector(model.blocks, prompts).install()


def _variable_list(pairs: Sequence[tuple[str, str]]) -> str:
    """``tp_12h, tp_24h``; a name both embeddings hold (static and atmospheric ``z``) says
    which: ``z (atmos)``."""
    names = [n for _, n in pairs]
    return ", ".join(f"{n} ({k})" if names.count(n) > 1 or n == "z" else n for k, n in pairs)


class TADPPrompted(PEFTMethod):
    """Base of the methods with TADP generators: installs them after the rest of ``_apply``
    and declares them (:attr:`prompt_generators`, :attr:`num_prompts`).

    ``num_prompts=None`` takes the task's count (:meth:`task_settings`, applied where a run
    creates the method); applied without a task the method runs with :data:`DEFAULT_PROMPTS`,
    and its config then says so (``config.num_prompts`` is concrete once applied)."""

    config: TADPConfig

    @classmethod
    def task_settings(cls, task: Any) -> dict[str, Any]:
        """The task's prompt count (``task.num_prompts``) for ``num_prompts`` left at None."""
        return {"num_prompts": int(task.num_prompts)}

    def _apply(self, model: WpeftAurora) -> None:
        if self.config.num_prompts is None:
            self.config = dataclasses.replace(self.config, num_prompts=DEFAULT_PROMPTS)
        super()._apply(model)
        self.injector = install_tadp(model, self.config, self.added)

    @property
    def prompt_generators(self) -> TADPGenerators | None:
        """``added["tadp"]``: one generator per backbone block (None before ``apply``)."""
        return self.added["tadp"] if "tadp" in self.added else None  # noqa: SIM401 (no .get)

    @property
    def num_prompts(self) -> int:
        n = self.config.num_prompts
        return DEFAULT_PROMPTS if n is None else n

    def describe(self, reference: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """The base record plus the prompt count and the variables E reads (rows of E)."""
        out = super().describe(reference)
        out["num_prompts"] = self.num_prompts
        generators = self.prompt_generators
        if generators is not None:
            out["prompt_variables"] = list(generators.variable_names)
        return out

    def adapter_metadata(self) -> dict[str, Any]:
        """``prompt_variables``: the ``[embedding, name]`` rows of E the generators read."""
        generators = self.prompt_generators
        if generators is None:
            return {}
        return {"prompt_variables": [list(v) for v in generators.variables]}

    @classmethod
    def check_adapter_metadata(cls, meta: dict[str, Any], model: WpeftAurora) -> None:
        """Refuse an adapter whose generators read other variables than ``model``'s encoder
        feeds (another task's, or the backbone's alone from before E covered a task's)."""
        stored = meta.get("prompt_variables")
        # adapters written before E covered the task's variables read the backbone's only
        theirs = (
            tuple((str(k), str(n)) for k, n in stored)
            if stored is not None
            else model.embedding_variables()[: len(model.config.variables)]
        )
        mine = model.embedding_variables()
        if theirs == mine:
            return
        task = meta.get("task")
        lacking = [v for v in theirs if v not in mine]
        extra = [v for v in mine if v not in theirs]
        details = []
        if lacking:
            details.append(f"the model lacks {_variable_list(lacking)}")
        if extra:
            details.append(f"it has {_variable_list(extra)}, which the adapter never saw")
        if not details:
            details.append("the same variables in another order")
        origin = (
            "were built before TADP read a task's variables: they read the backbone's "
            f"{len(theirs)}"
            if stored is None
            else f"read {len(theirs)} variables" + (f" (task {task!r})" if task else "")
        )
        raise CheckpointError(
            f"Adapter's TADP prompt generators {origin}; this model's encoder feeds "
            f"{len(mine)}: {'; '.join(details)}. Load it into a backbone set up by the task it "
            "was trained for (head = task.setup(model), then load_adapter(path, model, head))."
        )


@register
class TADPOnly(TADPPrompted):
    """Ablation: TADP prompts alone (the backbone stays frozen) -- the same TADP as inside
    WeatherPEFT at that task (the task's P), so it has no size knob: it runs at its own size
    at every budget."""

    name = "tadp"
    Config = TADPConfig
    size_knob = None
    summary = "TADP prompts only (ablation; WeatherPEFT's TADP at the task's P)"


@contextmanager
def record_prompt_attention(
    model: WpeftAurora,
    generators: TADPGenerators,
    blocks: Sequence[int] | None = None,
    max_windows: int = 16,
) -> Iterator[dict[int, dict[str, Any]]]:
    """Opt-in recording path for the figures (eval mode only; training keeps the fused kernel).

    Within the context, every forward of the chosen blocks (default: all) records, per block
    index:

    * ``"external"``: the generator's external attention ``(V·S, V·S)`` over the kernel tokens;
    * ``"patch_to_prompt"``: inside the first ``max_windows`` windows, the softmax attention of
      each window token to each prompt token, ``(n_windows, heads, N_w, P)``, recomputed from the
      block's own q/k projections (with the shifted-window mask, prompts padded with zeros);
    * ``"window_shape"``: the window size (levels, lat, lon) to map tokens back to the grid.
    """
    if model.training:
        raise RuntimeError("record_prompt_attention needs model.eval(): it is an analysis path.")
    infos = [b for b in model.blocks if blocks is None or b.index in set(blocks)]
    records: dict[int, dict[str, Any]] = {}
    handles = []

    def make_hook(info: BlockInfo):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0]  # (B·nW, P + N_w, D_b), prompts already prepended by the injector
            gen = generators[info.index]
            with torch.no_grad():
                _, external = gen(generators.kernels(model), return_attention=True)
                n_prompt = gen.to_prompts.out_features
                xs = x[:max_windows]
                heads = module.num_heads
                qkv = module.qkv(xs).reshape(xs.shape[0], xs.shape[1], 3, heads, -1)
                q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
                scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # (n, heads, L, L)
                mask = kwargs.get("mask")
                if mask is not None:  # (nW, L, L), windows are ordered batch-major
                    n_w = mask.shape[0]
                    idx = torch.arange(xs.shape[0]) % n_w
                    scores = scores + mask[idx][:, None]
                attn = scores.softmax(dim=-1)
                records[info.index] = {
                    "external": external.detach().cpu(),
                    "patch_to_prompt": attn[:, :, n_prompt:, :n_prompt].detach().cpu(),
                    "window_shape": tuple(module.window_size),
                    "block": info.name,
                }

        return hook

    for info in infos:
        handles.append(info.attention.register_forward_pre_hook(make_hook(info), with_kwargs=True))
    try:
        yield records
    finally:
        for h in handles:
            h.remove()
