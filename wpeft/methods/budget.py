"""Honest budgets: set a method's size knob to hit a target fraction of backbone parameters.

The fraction is :meth:`PEFTMethod.budget_fraction`: every scalar the method lets change outside
the task head (added modules, selected backbone entries, and the encoder/decoder when the
policy trains them), divided by the size of the backbone group. Every method's count is affine
in its knob (rank, prompt length, adapter width, keep ratio), so two probes give the line, one
solve gives the knob, and a final application reports the fraction actually achieved.

Nothing is clamped. An integer knob is probed at 1 and 2; a float knob (a fraction in (0, 1])
at its floor :data:`FLOAT_FLOOR` (one entry) and on its line at 1/2 and 1. A target below the fraction at the smallest knob
value is refused with the smallest feasible budget, one above the fraction at a float knob's
largest value with the largest feasible one (:class:`BudgetInfeasible`). WeatherPEFT's split is
explicit: TADP's size at the run's prompt count first, then SFAS gets what is left; a budget that
TADP alone reaches is refused with TADP's share and the largest prompt count that would fit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from wpeft.backbones.aurora_adapter import WpeftAurora
from wpeft.errors import ConfigError
from wpeft.methods.base import PEFTMethod, create_method, method_class

__all__ = ["FLOAT_FLOOR", "BudgetInfeasible", "BudgetMatch", "match_budget", "readable_bound"]

#: Smallest value a float knob (a fraction in (0, 1], e.g. ``keep_ratio``) is probed at: it
#: selects one entry (k = max(1, round(ratio · N))) for any backbone below 5e11 entries.
FLOAT_FLOOR = 1e-12


@dataclass(frozen=True)
class BudgetMatch:
    """Result of :func:`match_budget`: the target, the knob value and the fraction achieved.

    ``split`` names the parts of ``achieved`` of a composed method (WeatherPEFT:
    ``{"tadp": ..., "sfas": ...}``, see :meth:`PEFTMethod.budget_split`); None otherwise."""

    method: str
    target: float
    knob: str | None
    value: Any
    achieved: float
    trainable: dict[str, int]
    split: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """``budget: target 4 %, achieved 4 % (keep_ratio=0.000572)``."""
        return describe_budget(self.to_dict())


def describe_budget(match: dict[str, Any]) -> str:
    """One line of a :meth:`BudgetMatch.to_dict` (as ``summary.json``'s ``budget_match``)."""
    knob = f"{match['knob']}={match['value']:.4g}" if match["knob"] else "fixed size"
    line = (f"budget: target {100 * match['target']:.4g} %, achieved "
            f"{100 * match['achieved']:.4g} % ({knob})")
    if match.get("split"):
        line += " = " + " + ".join(f"{k} {100 * v:.4g} %" for k, v in match["split"].items())
    return line


class BudgetInfeasible(ConfigError):
    """A budget the method cannot reach with any value of its size knob.

    Attributes:
        method: The method. target: The asked fraction.
        smallest: The smallest feasible budget, rounded up to two significant digits (the
            target was below it), else None. largest: The largest feasible budget, rounded
            down (the target was above it), else None.
    """

    def __init__(
        self, message: str, method: str, target: float,
        smallest: float | None = None, largest: float | None = None,
    ) -> None:
        super().__init__(message)
        self.method, self.target, self.smallest, self.largest = method, target, smallest, largest


ModelFn = Callable[[], "WpeftAurora | tuple[WpeftAurora, nn.Module]"]


def readable_bound(fraction: float, up: bool) -> float:
    """``fraction`` rounded up (``up``) or down to two significant digits: 0.037440 -> 0.038
    up, 0.0057718 -> 0.0058 up, 0.99 -> 0.99 down. A budget given as the result is feasible
    whenever ``fraction`` is the smallest (largest) feasible one."""
    unit = 10.0 ** (math.floor(math.log10(fraction)) - 1)
    steps = math.ceil(fraction / unit) if up else math.floor(fraction / unit)
    bound = float(f"{steps * unit:.2g}")
    if up and bound < fraction:  # the division or the printing rounded below
        bound = float(f"{(steps + 1) * unit:.2g}")
    elif not up and bound > fraction:
        bound = float(f"{(steps - 1) * unit:.2g}")
    return bound


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.4g}%"


def _probe(name: str, model_fn: ModelFn, **kwargs: Any) -> PEFTMethod:
    method = create_method(name, **kwargs)
    built = model_fn()
    model, head = built if isinstance(built, tuple) else (built, None)
    method.apply(model, head)
    return method


def _match(name: str, target: float, knob: str | None, value: Any, method: PEFTMethod) -> BudgetMatch:
    return BudgetMatch(name, target, knob, value, method.budget_fraction(), method.trainable(),
                       method.budget_split())


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
        fixed: Other config fields, held fixed (WeatherPEFT: ``num_prompts``, the task's).

    Raises:
        BudgetInfeasible: ``target`` is below the fraction at the knob's smallest value (TADP
            alone, for WeatherPEFT) or above the fraction at a float knob's largest value.
        ConfigError: ``target`` is outside (0, 1].

    A method without a size knob (BitFit, SSF, TADP, Full) is applied at its own size and
    reports the fraction it has.
    """
    if not 0.0 < target <= 1.0:
        raise ConfigError(
            f"Budget {target!r} is out of range: give a fraction of backbone parameters in (0, 1], "
            "e.g. 0.003 for 0.3%."
        )
    cls = method_class(name)
    knob = cls.size_knob
    if knob is None:
        return _match(name, target, None, None, _probe(name, model_fn, **fixed))

    is_int = isinstance(getattr(cls.Config(), knob), int)
    floor = 1 if is_int else FLOAT_FLOOR
    at_floor = _probe(name, model_fn, **fixed, **{knob: floor})
    f_floor = at_floor.budget_fraction()
    if f_floor > target:
        raise _below_floor(name, target, knob, floor, at_floor, model_fn, fixed)
    # the line: through the floor for an integer knob; for a fraction away from it (its
    # one-entry floor is off the line k = round(ratio · N)), through 1/2 and 1
    lo, hi = (1, 2) if is_int else (0.5, 1.0)
    f_lo = f_floor if is_int else _probe(name, model_fn, **fixed, **{knob: lo}).budget_fraction()
    f_hi = _probe(name, model_fn, **fixed, **{knob: hi}).budget_fraction()
    if f_hi <= f_lo:
        raise ConfigError(f"Knob {knob!r} of {name!r} does not grow its budget.")
    value: Any
    if is_int:
        value = round(lo + (target - f_lo) * (hi - lo) / (f_hi - f_lo))
    else:
        if target > f_hi:
            largest = readable_bound(f_hi, up=False)
            raise BudgetInfeasible(
                f"Budget {target:g} ({_pct(target)}) is above what {name!r} can reach: at "
                f"{knob}=1 it trains {_pct(f_hi)} of the backbone; use --budget {largest:g} or "
                "less.",
                name, target, largest=largest,
            )
        value = lo + (target - f_lo) * (hi - lo) / (f_hi - f_lo)
    return _match(name, target, knob, value, _probe(name, model_fn, **fixed, **{knob: value}))


def _below_floor(
    name: str, target: float, knob: str, lo: Any, at_lo: PEFTMethod,
    model_fn: ModelFn, fixed: dict[str, Any],
) -> BudgetInfeasible:
    """The refusal of a target below the fraction at the knob's smallest value ``lo``."""
    floor = at_lo.budget_fraction()
    smallest = readable_bound(floor, up=True)
    asked = f"Budget {target:g} ({_pct(target)}) is below what {name!r} can reach"
    split = at_lo.budget_split()
    if split is None or "tadp" not in split:
        least = f"{knob}={lo}" if isinstance(lo, int) else f"one {knob} entry"
        return BudgetInfeasible(
            f"{asked}: at its smallest size ({least}) it trains {_pct(floor)} of the backbone; "
            f"use --budget {smallest:g} or more.",
            name, target, smallest=smallest,
        )
    # WeatherPEFT: TADP's share at the run's prompt count first, SFAS gets the rest.
    prompts = at_lo.num_prompts
    tadp = split["tadp"]
    other = floor - tadp  # one SFAS entry (+ encoder/decoder when trained)
    other_prompts = prompts + 1 if prompts == 1 else prompts - 1
    tadp_other = _probe(name, model_fn, **{**fixed, "num_prompts": other_prompts, knob: lo})
    per_prompt = (tadp_other.budget_split() or {})["tadp"] - tadp
    per_prompt /= other_prompts - prompts
    intercept = tadp - per_prompt * prompts  # TADP(P) = intercept + per_prompt · P
    fits = math.floor((target - other - intercept) / per_prompt)
    if fits >= 1:
        advice = (f"or keep the budget and use at most {fits} prompts per block "
                  f"(--method-option num_prompts={fits}).")
    else:
        advice = (f"even 1 prompt per block does not fit {_pct(target)} (TADP at 1 prompt: "
                  f"{_pct(intercept + per_prompt)}).")
    return BudgetInfeasible(
        f"{asked}: its TADP prompts ({prompts} per block) alone take {_pct(tadp)} of the "
        f"backbone, so the smallest feasible budget (TADP plus one SFAS entry) is "
        f"{_pct(floor)}; use --budget {smallest:g} or more, {advice}",
        name, target, smallest=smallest,
    )
