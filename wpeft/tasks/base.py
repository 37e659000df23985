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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import xarray as xr
from torch import nn

from wpeft.backbones.aurora_adapter import WpeftAurora
from wpeft.errors import ConfigError

__all__ = ["TASKS", "Split", "Task", "TaskBatch", "TaskConfig", "create_task", "register_task"]

Split = Literal["train", "val", "test"]


@dataclass
class TaskConfig:
    """Settings shared by tasks. ``source``: ``"world"`` (embedded default) or a data path."""

    source: str = "world"
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TaskBatch:
    """One mini-batch: the model input (an ``aurora.Batch``), targets and their valid times.

    Attributes:
        inputs: ``aurora.Batch`` fed to the backbone.
        targets: ``{name: tensor}`` in physical units, e.g. ``(B, H, W)`` surface,
            ``(B, C, H, W)`` atmospheric.
        times: ``(B,)`` numpy datetime64 valid times of the targets.
        extra: Task-specific tensors (ensemble mean and spread, ...).
    """

    inputs: Any
    targets: dict[str, torch.Tensor]
    times: Any
    extra: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


class Task:
    """Base class. Subclasses set ``name`` and ``Config`` and implement the methods below."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[TaskConfig]] = TaskConfig
    #: Variables (WB2 names) scored in the comparison tables, e.g. ("2m_temperature", ...).
    headline: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: TaskConfig | None = None, **kwargs: Any) -> None:
        known = {f.name for f in dataclasses.fields(self.Config)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(f"Task {self.name!r} has no setting(s) {unknown}; settings: {sorted(known)}.")
        self.config = config if config is not None else self.Config(**kwargs)

    def setup(self, model: WpeftAurora) -> nn.Module:
        """Install new embeddings/decoder heads into ``model`` and return them as one module
        (the method's ``head`` group). Called once, before the method is applied."""
        raise NotImplementedError

    def batches(
        self, split: Split, batch_size: int, *, seed: int = 0, shuffle: bool | None = None
    ) -> Iterator[TaskBatch]:
        """One pass over ``split`` (shuffled with ``seed`` for training by default)."""
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
        return {"task": self.name, "config": self.config.to_dict()}


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
