"""Reading and writing what a run records: run directories, Fisher-mask and prompt-attention
records, and per-grid-point skill.

>>> from wpeft import runs
>>> run = runs.open("results/downscaling/weatherpeft-0.3pct-s0")   # doctest: +SKIP
>>> run.fisher.density.sel(tensor="qkv")                           # doctest: +SKIP
>>> runs.table(runs.scan("results"))                               # doctest: +SKIP

Modules: :mod:`~wpeft.runs.layout` (the files of a run directory, :class:`RunLayout`),
:mod:`~wpeft.runs.store` (append-only records, :class:`Run`, ``open``, ``scan``, ``table``,
``run_sizes``),
:mod:`~wpeft.runs.fisher_records`, :mod:`~wpeft.runs.attention_records`,
:mod:`~wpeft.runs.skill`, :mod:`~wpeft.runs.recorders` (``attach_recorders`` for the loop),
:mod:`~wpeft.runs.curves` (validation curves, ``curves_table``).

Names are imported on first use, so reading the layout (:mod:`wpeft.runs.layout`, e.g. the
dashboard's run discovery) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> (module, attribute).
_NAMES = {
    "RecordStore": ("store", "RecordStore"),
    "Recorders": ("recorders", "Recorders"),
    "Run": ("store", "Run"),
    "RunLayout": ("layout", "RunLayout"),
    "attach_recorders": ("recorders", "attach_recorders"),
    "curves_table": ("curves", "curves_table"),
    "open": ("store", "open_run"),
    "run_sizes": ("store", "run_sizes"),
    "scan": ("store", "scan"),
    "skill_difference": ("skill", "skill_difference"),
    "skill_fields": ("skill", "skill_fields"),
    "table": ("store", "table"),
}

__all__ = [
    "RecordStore",
    "Recorders",
    "Run",
    "RunLayout",
    "attach_recorders",
    "curves_table",
    "open",
    "run_sizes",
    "scan",
    "skill_difference",
    "skill_fields",
    "table",
]


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        module, attribute = _NAMES[name]
        return getattr(importlib.import_module(f"wpeft.runs.{module}"), attribute)
    raise AttributeError(f"module 'wpeft.runs' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_NAMES])
