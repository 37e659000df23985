"""A training run killed part-way, as by kill -9 during an optimiser step (tests import it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from wpeft.methods.fisher import MaskedAdamW
from wpeft.training.loop import TrainConfig, train


def train_killed_during_step(
    monkeypatch: pytest.MonkeyPatch,
    cfg: TrainConfig,
    path: Path,
    call: int,
    optimizer: type[torch.optim.Optimizer] = MaskedAdamW,
    **kwargs: Any,
) -> None:
    """Train ``cfg`` into ``path`` and stop it with KeyboardInterrupt during its ``call``-th
    step of ``optimizer`` (the run's optimiser class; 1-based), leaving whatever checkpoint it
    had written; ``kwargs`` go to :func:`train`. The optimiser is restored afterwards."""
    calls = {"n": 0}
    real_step = optimizer.step

    def dying_step(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt("killed")
        return real_step(self, *args, **kw)

    monkeypatch.setattr(optimizer, "step", dying_step)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, path, progress=False, **kwargs)
    finally:
        monkeypatch.setattr(optimizer, "step", real_step)
