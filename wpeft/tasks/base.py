"""The task API: what a downstream task gives the training loop.

A task owns its data (already split into train / val / test), its head (new embeddings and
decoder heads for variables or outputs the backbone never had), its loss and its evaluation.
The training loop only does::

    task = create_task("downscaling")
    head = task.setup(model)              # before the method is applied
    method.apply(model, head)
    for batch in task.batches("train", batch_size, seed=..., epochs=None):
        loss = task.loss(task.predict(model, batch), batch)
        ...
    fields, scores = task.evaluate(model, "test")

Predictions and targets are dicts of tensors keyed by WB2 variable name (plus task-specific
keys such as ``"<var>_sigma"``), in physical units.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import xarray as xr
from aurora import Batch
from torch import nn

from wpeft.backbones.aurora_adapter import WpeftAurora
from wpeft.data.source import DataSource, coerce_source
from wpeft.errors import ConfigError, DataError

__all__ = ["TASKS", "Split", "Task", "TaskBatch", "TaskConfig", "create_task", "register_task"]

Split = Literal["train", "val", "test"]


@dataclass
class TaskConfig:
    """Settings shared by tasks.

    Attributes:
        source: ``"world"`` (the embedded world, default) or ``"data"`` (a real store; set
            automatically when ``data`` is given).
        seed: Seed of the task's own randomness.
        data: The real store (a :class:`~wpeft.data.source.DataSource`, or a mapping of its
            fields as in a YAML file, or a bare path); ``None``: the embedded world.
    """

    source: str = "world"
    seed: int = 0
    data: DataSource | None = None

    def __post_init__(self) -> None:
        """Coerce ``data`` and set ``source`` to match; subclasses call this first."""
        self.data = coerce_source(self.data)
        if self.data is not None:
            if self.source not in ("world", "data"):
                raise ConfigError(
                    f"source={self.source!r} and data= were both given; drop source (data= "
                    "describes the store)."
                )
            self.source = "data"
        elif self.source == "data":
            raise ConfigError("source='data' needs data= the store's description (path, ...).")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TaskBatch:
    """One mini-batch of B samples: the model input, targets, their valid times and extras.

    Checked on construction (:class:`~wpeft.errors.DataError` names the bad key and shapes):
    every tensor in ``inputs`` (surface and atmospheric), ``targets`` and ``extra`` has the same
    leading batch size B, and ``times`` has length B.

    Attributes:
        inputs: ``aurora.Batch`` fed to the backbone: surface ``(B, T, H, W)``, atmospheric
            ``(B, T, C, H, W)``, static ``(H, W)``.
        targets: ``{name: tensor}`` in physical units, e.g. ``(B, H, W)`` surface,
            ``(B, C, H, W)`` atmospheric.
        times: ``(B,)`` numpy datetime64 valid times of the targets.
        extra: Task-specific tensors ``(B, ...)`` (ensemble mean and spread, ...).
    """

    inputs: Batch
    targets: dict[str, torch.Tensor]
    times: np.ndarray
    extra: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.inputs, Batch):
            raise DataError(
                f"TaskBatch.inputs must be an aurora.Batch, got {type(self.inputs).__name__}."
            )
        size = self.size
        for group, tensors in (
            ("inputs.surf_vars", self.inputs.surf_vars),
            ("inputs.atmos_vars", self.inputs.atmos_vars),
            ("targets", self.targets),
            ("extra", self.extra),
        ):
            if not isinstance(tensors, dict):
                raise DataError(
                    f"TaskBatch.{group} must be a dict of tensors, got {type(tensors).__name__}."
                )
            for key, value in tensors.items():
                if not torch.is_tensor(value):
                    raise DataError(
                        f"TaskBatch.{group}[{key!r}] must be a tensor, got {type(value).__name__}."
                    )
                if value.dim() == 0 or value.shape[0] != size:
                    raise DataError(
                        f"TaskBatch.{group}[{key!r}] has shape {tuple(value.shape)}; its first "
                        f"(batch) dimension must be the inputs' batch size {size}."
                    )
        times = np.asarray(self.times)
        if times.ndim != 1 or len(times) != size:
            raise DataError(
                f"TaskBatch.times has shape {times.shape}; it must be ({size},), one valid time "
                "per sample."
            )

    @property
    def size(self) -> int:
        """B, the batch size of the inputs (leading dimension of their first tensor)."""
        for tensors in (self.inputs.surf_vars, self.inputs.atmos_vars):
            for value in tensors.values():
                if torch.is_tensor(value) and value.dim() > 0:
                    return int(value.shape[0])
        raise DataError("TaskBatch.inputs holds no surface or atmospheric tensor: no batch size.")

    def to(self, device: str | torch.device) -> TaskBatch:
        """The batch with ``inputs``, ``targets`` and ``extra`` on ``device`` (``times`` is
        shared); ``self`` when every tensor is there already."""
        device = torch.device(device)
        if all(_on(t, device) for t in self._tensors()):
            return self
        return dataclasses.replace(
            self,
            inputs=self.inputs.to(device),
            targets={k: v.to(device) for k, v in self.targets.items()},
            extra={k: v.to(device) for k, v in self.extra.items()},
        )

    def _tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor the batch holds (inputs, their coordinates, targets, extra)."""
        b = self.inputs
        for tensors in (b.surf_vars, b.static_vars, b.atmos_vars, self.targets, self.extra):
            yield from tensors.values()
        yield b.metadata.lat
        yield b.metadata.lon


def _on(tensor: torch.Tensor, device: torch.device) -> bool:
    """Whether ``tensor`` is on ``device`` (``"cuda"`` without an index: the current GPU)."""
    if device.index is None and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return tensor.device == device


class Task:
    """Base class. Subclasses set ``name`` and ``Config`` and implement the methods below."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[TaskConfig]] = TaskConfig
    #: Variables (WB2 names) scored in the comparison tables, e.g. ("2m_temperature", ...).
    headline: ClassVar[tuple[str, ...]] = ()
    #: Prompt tokens P per block that prompt methods (TADP: ``tadp``, ``weatherpeft``) use on
    #: this task unless told otherwise (the paper: downscaling 30, post-processing 5,
    #: precipitation 20); see :meth:`wpeft.methods.base.PEFTMethod.task_settings`.
    num_prompts: ClassVar[int] = 30

    def __init__(self, config: TaskConfig | None = None, **kwargs: Any) -> None:
        known = {f.name for f in dataclasses.fields(self.Config)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(f"Task {self.name!r} has no setting(s) {unknown}; settings: {sorted(known)}.")
        self.config = config if config is not None else self.Config(**kwargs)
        self._statistics: dict[str, Any] = {}

    def cached_statistics(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` (statistics of the training period: a JSON-able value) once per run.

        A resumed run gets the values its start computed (:meth:`restore_statistics`, from the
        run's statistics file) instead of reading the training period again; a fresh one computes
        them and the loop writes :meth:`statistics` beside the run."""
        if key not in self._statistics:
            self._statistics[key] = compute()
        return self._statistics[key]

    def statistics(self) -> dict[str, Any]:
        """The statistics computed (or restored) so far, by key."""
        return dict(self._statistics)

    def restore_statistics(self, values: Mapping[str, Any]) -> None:
        """Use ``values`` (what :meth:`statistics` gave when the run started) from now on."""
        self._statistics.update(values)

    def setup(self, model: WpeftAurora) -> nn.Module:
        """Install new embeddings/decoder heads into ``model`` and return them as one module
        (the method's ``head`` group). Called once, before the method is applied."""
        raise NotImplementedError

    def batches(
        self,
        split: Split,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool | None = None,
        shard: tuple[int, int] | None = None,
    ) -> Iterator[TaskBatch]:
        """One pass over ``split`` (shuffled with ``seed`` for training by default).

        ``shard=(rank, world_size)``: yield only this rank's contiguous share of each global
        batch of ``batch_size`` samples, reading nothing else (``index_batches`` does it)."""
        raise NotImplementedError

    def num_samples(self, split: Split) -> int:
        raise NotImplementedError

    def predict(self, model: WpeftAurora, batch: TaskBatch) -> dict[str, torch.Tensor]:
        """Physical-unit predictions keyed like ``batch.targets`` (plus task extras)."""
        raise NotImplementedError

    def loss(self, prediction: dict[str, torch.Tensor], batch: TaskBatch) -> torch.Tensor:
        """The task's training loss (a scalar tensor)."""
        raise NotImplementedError

    def evaluate(
        self, model: WpeftAurora, split: Split = "test", batch_size: int = 8
    ) -> tuple[xr.Dataset, dict[str, float]]:
        """Predictions and targets of ``split`` as an xarray Dataset (schema dims, variables
        ``<name>`` for predictions and ``<name>_target`` for truth...) and headline scores
        (``{"rmse/2m_temperature": ..., ...}``)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What a run records about the task (its part of ``summary.json``)."""
        return {"task": self.name, "task_config": self.config.to_dict()}


TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    if not cls.name:
        raise ConfigError(f"{cls.__name__} has no name.")
    TASKS[cls.name] = cls
    return cls


def create_task(name: str, **kwargs: Any) -> Task:
    import wpeft.tasks  # noqa: F401  (registers the built-in tasks)

    try:
        cls = TASKS[name]
    except KeyError:
        raise ConfigError(f"Unknown task {name!r}; available: {sorted(TASKS)}.") from None
    return cls(**kwargs)
