"""Reading and writing what a run records: run directories, Fisher-mask and prompt-attention
records, and per-grid-point skill.

>>> from wpeft import runs
>>> run = runs.open("results/downscaling/weatherpeft-0.3pct-s0")   # doctest: +SKIP
>>> run.fisher.density.sel(tensor="qkv")                           # doctest: +SKIP
>>> runs.table(runs.scan("results"))                               # doctest: +SKIP

Modules: :mod:`~wpeft.runs.store` (append-only records, :class:`Run`, ``open``, ``scan``,
``table``), :mod:`~wpeft.runs.fisher_records`, :mod:`~wpeft.runs.attention_records`,
:mod:`~wpeft.runs.skill`, :mod:`~wpeft.runs.recorders` (``attach_recorders`` for the loop).
"""

from wpeft.runs.recorders import Recorders, attach_recorders
from wpeft.runs.skill import skill_difference, skill_fields
from wpeft.runs.store import RecordStore, Run, scan, table
from wpeft.runs.store import open_run as open

__all__ = [
    "RecordStore",
    "Recorders",
    "Run",
    "attach_recorders",
    "open",
    "scan",
    "skill_difference",
    "skill_fields",
    "table",
]
