"""The one method API: what every fine-tuning method (WeatherPEFT, its ablations, baselines) is.

A method is applied once to a backbone (and optionally a task head). It then

* decides which scalars may change (``requires_grad`` and, for selection methods, a mask),
* owns the modules it adds (prompt generators, LoRA matrices, adapters, ...),
* can hook into training (``after_backward`` runs between ``loss.backward()`` and the optimiser),
* builds its optimiser (selection methods need a sparse-safe one),
* reports ``trainable`` (scalars allowed to change) and ``changed`` (scalars that differ from the
  pretrained weights), both counted per group: backbone / encoder / decoder / head / added.

Parameter groups are decided by module identity when the method is applied, never by name
substrings, so wrapped modules (peft's LoRA layers) cannot confuse the counts.

The encoder/decoder policy (``train_encoder_decoder``) is one explicit switch on every config:
the released WeatherPEFT code trains the encoder and decoder fully; the paper's budgets count the
backbone only. Every run reports which policy it used.

What a method can do is declared on the class, with defaults here, so that the training loop,
recorders, distributed strategy and memory planner ask instead of probing:

* :attr:`PEFTMethod.selection`: the :class:`~wpeft.methods.sfas.EntrySelection` of a
  Fisher-selection method once applied (masks over backbone entries), else None;
* :meth:`PEFTMethod.preparation` / :meth:`PEFTMethod.prepare`: a step run once before
  training (static Fisher masks) on the training batches ``preparation`` asks for (a
  :class:`Preparation`); None and a no-op by default;
* :attr:`PEFTMethod.prompt_generators` / :attr:`PEFTMethod.num_prompts`: the TADP generators
  (None without) and the prompt tokens prepended to every attention window (0 without);
* :meth:`PEFTMethod.state_bytes`: the method's own training state for the memory planner;
* :meth:`PEFTMethod.check_strategy`: refuses a data-parallel strategy the method cannot run under;
* :attr:`PEFTMethod.default_lr`: the learning rate comparisons use for it;
* :meth:`PEFTMethod.task_settings`: config values a run takes from its task where the user left
  them at None (TADP's prompt count);
* :meth:`PEFTMethod.adapter_metadata` / :meth:`PEFTMethod.check_adapter_metadata`: what an
  adapter file records about the model the method was applied to, and the check that refuses
  loading it into another one (TADP: the variables its generators read).

Every config field carries its help text (``field(metadata={"help": ...})``, as peft's configs
do); :func:`settings` lists them (``wpeft methods --help-method NAME``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from wpeft.backbones.aurora_adapter import WpeftAurora
from wpeft.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from wpeft.methods.sfas import EntrySelection

__all__ = [
    "GROUPS",
    "METHODS",
    "MethodConfig",
    "PEFTMethod",
    "Preparation",
    "Setting",
    "check_selection",
    "create_method",
    "method_class",
    "plain_name",
    "register",
    "settings",
]

GROUPS = ("backbone", "encoder", "decoder", "head", "added")
_CHECKPOINT_PREFIX = "_checkpoint_wrapped_module."


def plain_name(name: str) -> str:
    """A parameter's name as in the unwrapped model (activation-checkpoint wrappers, which GPU
    training adds around Aurora's blocks, removed; torch's distributed state dicts do the same)."""
    return name.replace(_CHECKPOINT_PREFIX, "")


def check_selection(state: Mapping[str, torch.Tensor], numel: Mapping[str, int]) -> None:
    """Refuse selection entries (``<name>.indices`` + ``<name>.values``) that cannot be written
    into a tensor of ``numel[name]`` entries; names missing from ``numel`` are skipped.

    Raises:
        CheckpointError: One line naming the tensor and, for an index out of range, the bad
            index and the valid range.
    """
    selected = {k.rsplit(".", 1)[0] for k in state if k.endswith((".indices", ".values"))}
    for name in sorted(selected & numel.keys()):
        idx, values = state.get(f"{name}.indices"), state.get(f"{name}.values")
        if idx is None or values is None:
            raise CheckpointError(
                f"Adapter selection {name!r} lacks its "
                f"{'indices' if idx is None else 'values'}: the adapter is corrupt; re-save it."
            )
        integer = not (idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool)
        if not integer or idx.dim() != 1 or idx.shape != values.shape:
            raise CheckpointError(
                f"Adapter selection {name!r} has indices {idx.dtype} {tuple(idx.shape)} for values "
                f"{tuple(values.shape)}; expected 1-D integer indices, one per value: the adapter "
                "is corrupt; re-save it."
            )
        if idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= numel[name]:
                raise CheckpointError(
                    f"Adapter selection index {lo if lo < 0 else hi} of {name!r} is out of range "
                    f"[0, {numel[name]}): the adapter is corrupt or belongs to another model; "
                    "re-save it from the run that trained it."
                )


@dataclass
class MethodConfig:
    """Settings shared by every method (each field's help is in its ``metadata["help"]``).

    ``removed_settings``: ``{name: what replaced it}`` of settings an earlier wpeft had, so a
    config that still gives one (an old run's command) is refused naming the replacement.
    """

    removed_settings: ClassVar[dict[str, str]] = {}

    train_encoder_decoder: bool = field(
        default=False,
        metadata={"help": "Also train the encoder and decoder fully (the released code's policy). "
                          "Off: only the backbone budget and the head train."},
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def refuse_removed(cls, settings: Mapping[str, Any], what: str) -> None:
        """Raise ConfigError for a setting of ``settings`` that ``removed_settings`` lists."""
        for name in sorted(set(settings) & set(cls.removed_settings)):
            raise ConfigError(
                f"{what}: setting {name}={settings[name]!r} no longer exists: "
                f"{cls.removed_settings[name]}"
            )


@dataclass(frozen=True)
class Preparation:
    """The training data a method's :meth:`PEFTMethod.prepare` reads before the first step: the
    first ``batches`` batches of ``batch_size`` samples of the training split, in the first
    epoch's order (the last one may be smaller when the split does not divide)."""

    batch_size: int
    batches: int


class PEFTMethod:
    """Base class; subclasses set ``name``, ``Config`` and override ``_apply`` (and hooks).

    Args:
        config: The method's config (a ``MethodConfig`` subclass instance); defaults if omitted.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    #: Name of the config field the budget matcher tunes (None: fixed size).
    size_knob: ClassVar[str | None] = None
    #: Short description for ``wpeft methods``.
    summary: ClassVar[str] = ""
    #: Learning rate a comparison (``wpeft compare``, ``wpeft demo``) uses unless told one.
    default_lr: ClassVar[float] = 1e-3

    def __init__(self, config: MethodConfig | None = None, **kwargs: Any) -> None:
        self.Config.refuse_removed(kwargs, f"Method {self.name!r}")
        known = {f.name for f in dataclasses.fields(self.Config)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(
                f"Method {self.name!r} has no setting(s) {unknown}; its settings: {sorted(known)}."
            )
        if config is None:
            config = self.Config(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        if not isinstance(config, self.Config):
            raise ConfigError(
                f"{type(self).__name__} needs a {self.Config.__name__}, got {type(config).__name__}."
            )
        self.config = config
        self.added = nn.ModuleDict()
        self.model: WpeftAurora | None = None
        self.head: nn.Module | None = None
        self.backbone_size = 0
        self.backbone_bytes = 0
        self._group_of: dict[int, str] = {}
        self._pristine_name: dict[int, str] = {}

    # --- applying --------------------------------------------------------------------------

    def apply(self, model: WpeftAurora, head: nn.Module | None = None) -> WpeftAurora:
        """Freeze what must not change, unfreeze what may, install the method's modules.

        Marks ``model.applied_method`` first (a failed apply may have half-modified the model),
        and refuses a model that already carries a method: a second one would stack on the
        first (prompt hooks twice, LoRA in LoRA) without a word."""
        if self.model is not None:
            raise ConfigError(f"Method {self.name!r} is already applied to a model.")
        if model.applied_method is not None:
            raise ConfigError(
                f"Model already carries method {model.applied_method!r}; apply {self.name!r} to a "
                "pristine backbone (build_backbone / load_pretrained)."
            )
        model.applied_method = self.name
        self.model, self.head = model, head
        self.backbone_size = model.num_parameters()["backbone"]  # before any injection
        groups = model.named_parameter_groups()
        # what a fully fine-tuned backbone's checkpoint stores: its parameters in their dtype
        self.backbone_bytes = sum(p.numel() * p.element_size() for _, p in groups["backbone"])
        for group, params in groups.items():
            for name, p in params:
                self._group_of[id(p)] = group
                self._pristine_name[id(p)] = name
        if head is not None:
            # A task's new embeddings and decoder heads may live inside the model's encoder and
            # decoder as well: they are "head", and keep their model name where they have one.
            for name, p in head.named_parameters():
                self._group_of[id(p)] = "head"
                self._pristine_name.setdefault(id(p), f"head.{name}")
        for p in model.parameters():
            p.requires_grad_(False)
        if head is not None:
            head.requires_grad_(True)
        if self.config.train_encoder_decoder:
            model.encoder.requires_grad_(True)
            model.decoder.requires_grad_(True)
        self._apply(model)
        return model

    def _apply(self, model: WpeftAurora) -> None:
        """Subclass hook: unfreeze backbone parameters and/or add modules to ``self.added``."""

    # --- groups and counts -------------------------------------------------------------------

    def group_of(self, p: nn.Parameter) -> str:
        """``backbone``/``encoder``/``decoder``/``head`` for pristine parameters, else ``added``."""
        return self._group_of.get(id(p), "added")

    def named_parameters(self) -> Iterable[tuple[str, nn.Parameter]]:
        """All parameters the method touches, unique, with stable names: ``model.<name>``
        (including modules a method injected into the model), ``head.<name>``, ``added.<name>``."""
        seen: set[int] = set()
        for prefix, m in (("model", self.model), ("head", self.head), ("added", self.added)):
            if m is None:
                continue
            for name, p in m.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    # names as in an unwrapped model, with or without activation checkpointing
                    yield f"{prefix}.{plain_name(name)}", p

    def parameters(self) -> Iterable[nn.Parameter]:
        for _, p in self.named_parameters():
            yield p

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_in(self, p: nn.Parameter) -> int:
        """Scalars of ``p`` allowed to change (selection methods override: mask entries)."""
        return p.numel() if p.requires_grad else 0

    def trainable(self) -> dict[str, int]:
        """Scalars allowed to change, per group, plus ``total``."""
        counts = dict.fromkeys(GROUPS, 0)
        for p in self.parameters():
            counts[self.group_of(p)] += self.trainable_in(p)
        counts["total"] = sum(counts[g] for g in GROUPS)
        return counts

    def changed(self, reference: dict[str, torch.Tensor]) -> dict[str, int]:
        """Scalars that differ from ``reference`` (the pretrained model's and head's state,
        keyed like ``model.state_dict()`` / ``head.<name>``), per group; added modules count
        whole (they did not exist before)."""
        counts = dict.fromkeys(GROUPS, 0)
        for p in self.parameters():
            group = self.group_of(p)
            if group == "added":
                counts[group] += p.numel()
                continue
            name = self._pristine_name[id(p)]
            if name not in reference:
                raise ConfigError(f"Reference state lacks {name!r}; pass the pretrained state.")
            counts[group] += int((p.detach() != reference[name].to(p.device)).sum())
        counts["total"] = sum(counts[g] for g in GROUPS)
        return counts

    def budget_fraction(self) -> float:
        """Trainable scalars outside the task head, as a fraction of the backbone group's size."""
        assert self.model is not None, "apply the method first"
        t = self.trainable()
        return (t["total"] - t["head"]) / self.backbone_size

    def budget_split(self) -> dict[str, float] | None:
        """The named parts of :meth:`budget_fraction` of a composed method (they sum to it);
        None for a method of one part."""
        return None

    # --- adapter state ----------------------------------------------------------------------

    def adapter_state(self, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Only what fine-tuning changed, keyed by :meth:`named_parameters` names: added
        modules whole, pristine tensors whole if any entry differs from ``reference``.
        Selection methods override this to store ``<name>.indices`` / ``<name>.values``."""
        state = {}
        for name, p in self.named_parameters():
            group = self.group_of(p)
            if group == "added":
                state[name] = p.detach().clone()
            elif bool((p.detach() != reference[self._pristine_name[id(p)]]).any()):
                state[name] = p.detach().clone()
        return state

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Write an :meth:`adapter_state` into the applied model (inverse of saving).

        Everything is checked before anything is written: unknown names and wrong shapes raise
        :class:`ConfigError`, bad selection indices :class:`CheckpointError`."""
        params = dict(self.named_parameters())
        unknown = sorted(k for k in state if k.removesuffix(".indices").removesuffix(".values") not in params)
        if unknown:
            raise ConfigError(
                f"Adapter has tensors {unknown[:3]}... that method {self.name!r} with this config "
                "does not create; it was saved by another method or size."
            )
        whole = {k: v for k, v in state.items() if not k.endswith((".indices", ".values"))}
        for name, value in whole.items():
            if params[name].shape != value.shape:
                raise ConfigError(
                    f"Adapter tensor {name!r} has shape {tuple(value.shape)}, the model "
                    f"expects {tuple(params[name].shape)}."
                )
        check_selection(state, {name: p.numel() for name, p in params.items()})
        with torch.no_grad():
            for name, value in whole.items():
                params[name].copy_(value)
            for name in {k.removesuffix(".indices") for k in state if k.endswith(".indices")}:
                flat = params[name].view(-1)
                flat[state[f"{name}.indices"]] = state[f"{name}.values"].to(flat.dtype)

    # --- declared capabilities ----------------------------------------------------------------

    @classmethod
    def task_settings(cls, task: Any) -> dict[str, Any]:
        """Config values the method takes from ``task`` (a :class:`~wpeft.tasks.base.Task`)
        where the run's options leave them unset or None; the training loop applies them when
        it creates the method. None by default."""
        return {}

    def adapter_metadata(self) -> dict[str, Any]:
        """JSON-serialisable facts about the applied method that an adapter file records and
        :meth:`check_adapter_metadata` checks on loading; nothing by default."""
        return {}

    @classmethod
    def check_adapter_metadata(cls, meta: dict[str, Any], model: WpeftAurora) -> None:
        """Raise :class:`~wpeft.errors.CheckpointError` when an adapter with metadata ``meta``
        cannot be loaded into ``model`` (a pristine backbone, with the task's head installed);
        called before the method touches the model. Accepts everything by default."""

    @property
    def selection(self) -> EntrySelection | None:
        """The entry selection (masks over backbone entries) of a Fisher-selection method once
        applied; None for every other method."""
        return None

    @property
    def prompt_generators(self) -> nn.ModuleList | None:
        """The TADP prompt generators (one per backbone block) once applied; None without."""
        return None

    @property
    def num_prompts(self) -> int:
        """Prompt tokens prepended to every attention window (TADP, VPT); 0 without prompts."""
        return 0

    def state_bytes(self) -> int:
        """Bytes of the method's own training state besides parameters, gradients and optimiser
        (selection masks, importance), unsharded; what the memory planner adds."""
        return 0

    def check_strategy(self, strategy: str) -> None:
        """Raise ConfigError if the method cannot train under ``strategy`` (``none``, ``ddp``,
        ``fsdp``) with its config; every strategy is fine by default."""

    def prepare(
        self,
        loss_fn: Callable[..., torch.Tensor],
        batches: Iterable[Any] | None = None,
        n_batches: int | None = None,
    ) -> Any:
        """Work done once after ``apply`` and before the first step, from ``loss_fn(batch)`` on
        ``batches`` (the ones :meth:`preparation` asks for); nothing by default."""
        return None

    def preparation(self, train_samples: int, batch_size: int) -> Preparation | None:
        """The training batches :meth:`prepare` reads before the first step, for a training split
        of ``train_samples`` samples and a run of global batch size ``batch_size``; None (the
        default): the method has no preparation step.

        Raises:
            ConfigError: the method's config asks for more data than the split holds.
        """
        return None

    # --- training hooks ----------------------------------------------------------------------

    def on_wrapped(self) -> None:
        """Hook: called once on every rank after data-parallel wrapping, which may replace
        parameter objects (FSDP2 makes them DTensor shards). Per-parameter state follows here."""

    def before_backward(self, step: int, total_steps: int) -> None:
        """Runs before ``loss.backward()`` of optimiser step ``step`` (0-based); lean SFAS's
        gradient hooks learn here whether the step refreshes the mask."""

    def after_backward(self, step: int, total_steps: int) -> None:
        """Runs after ``loss.backward()`` and before ``optimizer.step()`` (SFAS selects here)."""

    def clip_grad_norm_(self, params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Clip the trained gradients to one global L2 norm (between :meth:`after_backward` and
        ``optimizer.step()``); methods that hold gradients outside ``.grad`` include them."""
        return torch.nn.utils.clip_grad_norm_(list(params), max_norm)

    def optimizer_recipe(
        self, lr: float, weight_decay: float = 0.0
    ) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
        """The optimiser class and its keyword arguments (serialisable values only), so that a
        sharded wrapper (``ZeroRedundancyOptimizer``) can build it over a share of the
        parameters; :meth:`bind_optimizer` then attaches the method's state."""
        return torch.optim.AdamW, {"lr": lr, "weight_decay": weight_decay}

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Hook: connect an optimiser built from :meth:`optimizer_recipe` to the method."""

    def optimizer(self, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters (selection methods return a sparse-safe one)."""
        params = self.trainable_parameters()
        if not params:
            raise ConfigError(f"Method {self.name!r} left nothing trainable.")
        cls, kwargs = self.optimizer_recipe(lr, weight_decay)
        opt = cls(params, **kwargs)
        self.bind_optimizer(opt)
        return opt

    def describe(self, reference: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """What a run records about the method (its part of ``summary.json``): name, config,
        encoder/decoder policy, trainable counts and budget fraction, the backbone's parameter
        count and bytes (``full_checkpoint_bytes``: the backbone's parameters in their dtype, what
        a fully fine-tuned backbone's checkpoint stores), and with ``reference`` (the pristine
        state) the changed counts."""
        out = {
            "method": self.name,
            "method_config": self.config.to_dict(),
            "encoder_decoder_policy": "train" if self.config.train_encoder_decoder else "frozen",
            "trainable": self.trainable(),
            "budget_fraction": self.budget_fraction(),
            "backbone_parameters": self.backbone_size,
            "full_checkpoint_bytes": self.backbone_bytes,
        }
        split = self.budget_split()
        if split is not None:
            out["budget_split"] = split
        if reference is not None:
            out["changed"] = self.changed(reference)
        return out


METHODS: dict[str, type[PEFTMethod]] = {}


def register(cls: type[PEFTMethod]) -> type[PEFTMethod]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    if not cls.name:
        raise ConfigError(f"{cls.__name__} has no name.")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ConfigError(f"Method name {cls.name!r} is registered twice.")
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[PEFTMethod]:
    """The registered method class ``name``; an unknown name is refused with the known ones."""
    import wpeft.methods  # noqa: F401  (registers the built-in methods)

    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(
            f"Unknown method {name!r}; known methods: {', '.join(sorted(METHODS))} "
            "(wpeft methods lists them)."
        ) from None


def create_method(name: str, **kwargs: Any) -> PEFTMethod:
    """A registered method by name, with config overrides; unknown names list the known ones."""
    return method_class(name)(**kwargs)


@dataclass(frozen=True)
class Setting:
    """One config field of a method: its name, type (as annotated), default and help."""

    name: str
    type: str
    default: Any
    help: str


def settings(config: type[MethodConfig]) -> list[Setting]:
    """The fields of a method config class, in declaration order, with their help texts."""
    out = []
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        out.append(Setting(f.name, kind, default, f.metadata.get("help", "")))
    return out
