"""Honest budgets: set a method's size knob to hit a target fraction of backbone parameters.

The fraction is :meth:`PEFTMethod.budget_fraction`: every scalar the method lets change outside
the task head (added modules, selected backbone entries, and the encoder/decoder when the
policy trains them), divided by the size of the backbone group. Every method's count is affine
in its knob (rank, prompt length, adapter width, keep ratio), so two probes give the line, one
solve gives the knob, and a final application reports the fraction actually achieved.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from wpeft.backbones.aurora_adapter import WpeftAurora
from wpeft.errors import ConfigError
from wpeft.methods.base import create_method, method_class

__all__ = ["BudgetMatch", "match_budget"]


@dataclass(frozen=True)
class BudgetMatch:
    """Result of :func:`match_budget`."""

    method: str
    target: float
    knob: str | None
    value: Any
    achieved: float
    trainable: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


ModelFn = Callable[[], "WpeftAurora | tuple[WpeftAurora, nn.Module]"]


def _fraction(name: str, model_fn: ModelFn, **kwargs: Any) -> tuple[float, dict]:
    method = create_method(name, **kwargs)
    built = model_fn()
    model, head = built if isinstance(built, tuple) else (built, None)
    method.apply(model, head)
    return method.budget_fraction(), method.trainable()


def match_budget(
    name: str,
    target: float,
    model_fn: ModelFn,
    **fixed: Any,
) -> BudgetMatch:
    """The knob value of method ``name`` whose budget fraction is closest to ``target``.

    Args:
        name: Registered method.
        target: Fraction of backbone parameters, in (0, 1] (e.g. 0.003 or 0.04).
        model_fn: Builds a fresh backbone (the method is applied to new copies), or a
            ``(backbone, head)`` pair with a task's variables installed
            (:func:`wpeft.tasks.common.copy_task_variables`): methods whose size depends on
            them (TADP's generators read every variable the encoder holds) are then probed at
            the task's size.
        fixed: Other config fields, held fixed.
    """
    if not 0.0 < target <= 1.0:
        raise ConfigError(
            f"Budget {target!r} is out of range: give a fraction of backbone parameters in (0, 1], "
            "e.g. 0.003 for 0.3%."
        )
    cls = method_class(name)
    knob = cls.size_knob
    if knob is None:
        achieved, trainable = _fraction(name, model_fn, **fixed)
        return BudgetMatch(name, target, None, None, achieved, trainable)

    default = getattr(cls.Config(), knob)
    is_int = isinstance(default, int)
    lo, hi = (1, 2) if is_int else (1e-4, 2e-4)
    f_lo, _ = _fraction(name, model_fn, **fixed, **{knob: lo})
    f_hi, _ = _fraction(name, model_fn, **fixed, **{knob: hi})
    slope = (f_hi - f_lo) / (hi - lo)
    if slope <= 0:
        raise ConfigError(f"Knob {knob!r} of {name!r} does not grow its budget.")
    value: Any = lo + (target - f_lo) / slope
    if is_int:
        value = max(1, round(value))
    else:
        value = min(1.0, max(1e-8, value))
    achieved, trainable = _fraction(name, model_fn, **fixed, **{knob: value})
    return BudgetMatch(name, target, knob, value, achieved, trainable)
