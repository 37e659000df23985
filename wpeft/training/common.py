"""Pieces shared by pretraining and fine-tuning: the learning-rate schedule and atomic saves."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["lr_factor", "save_torch_atomic"]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total`` (LambdaLR)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def save_torch_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path.tmp`` then rename: a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
