"""The workbench: a Panel dashboard over a runs directory, served to a team.

* :mod:`~wpeft.app.catalog` — run names confined to RUNS_DIR and data read once for all
  sessions (no Panel needed);
* :mod:`~wpeft.app.workbench` — the page (:func:`~wpeft.app.workbench.build_workbench`, one per
  session): Overview, Fisher masks, Prompt attention, Skill maps, Budget vs skill;
* :mod:`~wpeft.app.serve` — ``wpeft serve RUNS_DIR`` / ``python -m wpeft.app.serve RUNS_DIR``.

Needs ``panel`` besides the ``viz`` extra (holoviews, bokeh). Names are imported on first use,
so building the ``wpeft`` command line (``serve.add_arguments``) stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Catalog", "RunNameError", "RunsDirError", "catalog_for"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from wpeft.app import catalog

        return getattr(catalog, name)
    raise AttributeError(f"module 'wpeft.app' has no attribute {name!r}")
