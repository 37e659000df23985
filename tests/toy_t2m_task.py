"""A toy task, written as docs/ARCHITECTURE.md says a new task is: downscaling of 2 m
temperature alone with an L1 loss, built on the downscaling task. Registered on import."""

from __future__ import annotations

from typing import ClassVar

import torch

from wpeft.backbones.aurora_adapter import norm_key
from wpeft.tasks.base import TaskBatch, register_task
from wpeft.tasks.downscaling import Downscaling

T2M = "2m_temperature"


@register_task
class T2mDownscaling(Downscaling):
    name: ClassVar[str] = "toy_t2m_downscaling"
    headline: ClassVar[tuple[str, ...]] = (T2M,)

    def loss(self, prediction: dict[str, torch.Tensor], batch: TaskBatch) -> torch.Tensor:
        """Mean absolute error of 2 m temperature in normalised units."""
        std = self._require_std()[norm_key("2t")]
        return ((prediction[T2M] - batch.targets[T2M]) / std).abs().mean()
