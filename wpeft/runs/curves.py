"""Validation curves of runs: the ``split == "val"`` lines of ``metrics.jsonl`` as a tidy table,
and the one headline validation score that ranks runs (the learning-rate choice of
``wpeft compare --lrs``).

The training loop appends a line every ``eval_every`` steps (strictly before the last step; the
test split is evaluated once, at the end, into ``summary.json``), e.g.::

    {"step": 20, "split": "val", "loss": 0.41, "rmse/2m_temperature": 1.9,
     "rmse_bilinear/2m_temperature": 2.6, ...}

and, with ``log_every``, a training-loss line every ``log_every`` steps,
``{"step": 5, "split": "train", "loss": 0.52}``: :func:`train_lines` reads those; every validation
reader here (:func:`val_lines`, :func:`curves_table`) keeps ``split == "val"`` lines only.

**The headline validation score** of such a line (:func:`headline_val_score`, lower is better)
is the mean over the task's headline variables of the method's score divided by the score of
the reference that does not depend on the method, carried by the same line: the first pair of
:data:`VAL_SCORE_PAIRS` present for at least one headline variable (downscaling: RMSE / bilinear
RMSE; post-processing: CRPS / raw-ensemble CRPS; precipitation: RMSE / persistence RMSE). 1 is
the reference's skill, below 1 better than it; dividing makes variables of different units
comparable. A line without any such pair falls back to its ``loss`` (the training loss the loop
logs with the line). Nothing here reads the test split.

No matplotlib here (the dashboard and ``wpeft compare`` use the table); the figure is
:func:`wpeft.viz.curves.plot_learning_curves`. Task headlines are looked up on use (that import
pulls in torch).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wpeft.runs.store import Run, scan

__all__ = [
    "CURVE_KEYS",
    "VAL_SCORE",
    "VAL_SCORE_PAIRS",
    "curves_table",
    "headline_val_score",
    "is_headline",
    "task_headline",
    "train_lines",
    "val_lines",
]

#: (method score, reference score) prefixes, both lower-is-better; the first pair a line carries
#: for a headline variable is the headline validation score's.
VAL_SCORE_PAIRS: tuple[tuple[str, str], ...] = (
    ("crps", "crps_raw"),
    ("rmse", "rmse_bilinear"),
    ("rmse", "rmse_persistence"),
    ("rmse", "rmse_raw"),
)
#: The column of :func:`curves_table` holding :func:`headline_val_score`.
VAL_SCORE = "val_score"
#: The identity columns of :func:`curves_table`, in order (the score columns follow).
CURVE_KEYS = ("task", "method", "budget", "seed", "lr", "step")


def task_headline(task: str) -> tuple[str, ...]:
    """The registered task's headline variables (empty for an unknown task: every variable)."""
    from wpeft.tasks import TASKS

    return tuple(getattr(TASKS.get(task), "headline", ()))


def is_headline(variable: str, headline: Sequence[str]) -> bool:
    """``temperature_850`` is a headline ``temperature_850`` or ``temperature`` (per level)."""
    return not headline or any(variable == h or variable.startswith(f"{h}_") for h in headline)


def headline_val_score(line: Mapping[str, Any], headline: Sequence[str]) -> tuple[float, str]:
    """The headline validation score of one ``metrics.jsonl`` line (lower is better) and what
    it is (``"rmse / rmse_bilinear"``, or ``"loss"`` for the fallback; see the module doc).

    Args:
        line: ``{"rmse/2m_temperature": 1.9, "rmse_bilinear/2m_temperature": 2.6, ...}``.
        headline: The task's headline variables (:func:`task_headline`); empty: every variable.

    Returns:
        ``(score, basis)``; ``(nan, "none")`` when the line has neither a pair nor a loss.
    """
    for metric, reference in VAL_SCORE_PAIRS:
        ratios = []
        for key, value in line.items():
            prefix, _, variable = str(key).partition("/")
            ref = line.get(f"{reference}/{variable}")
            if prefix != metric or not is_headline(variable, headline) or ref is None:
                continue
            if _finite(value) and _finite(ref) and ref > 0:
                ratios.append(value / ref)
            else:  # a diverged score (NaN) or a zero reference: no usable score
                ratios.append(math.nan)
        if ratios:
            return float(np.mean(ratios)), f"{metric} / {reference}"
    loss = line.get("loss")
    return (float(loss), "loss") if _finite(loss) else (math.nan, "none")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _lines(run: Run, split: str) -> list[dict[str, Any]]:
    by_step: dict[int, dict[str, Any]] = {}
    for row in run._read_metrics()[0]:
        if row.get("split") == split and _finite(row.get("step")):
            by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def val_lines(run: Run) -> list[dict[str, Any]]:
    """The ``split == "val"`` lines of a run's ``metrics.jsonl`` by step; a step logged twice
    (a resumed run evaluates it again) keeps its last line."""
    return _lines(run, "val")


def train_lines(run: Run) -> list[dict[str, Any]]:
    """The ``split == "train"`` lines (``{"step", "split", "loss"}``, ``log_every``) of a run's
    ``metrics.jsonl`` by step; a step logged twice keeps its last line, as :func:`val_lines`."""
    return _lines(run, "train")


def curves_table(runs: str | Path | Iterable[Run]) -> pd.DataFrame:
    """Every validation line of ``runs`` as one tidy table.

    Args:
        runs: A root directory (every run under it, :func:`wpeft.runs.scan`) or runs.

    Returns:
        One row per (run, step) with columns ``task``, ``method``, ``budget`` (fraction; NaN for
        the method's default size, as in :func:`wpeft.runs.table`), ``seed``, ``lr``, ``step``,
        ``val_score`` (:func:`headline_val_score`), then ``loss`` and every ``<metric>/<variable>``
        of the lines (NaN where a line lacks it). Runs without validation lines add no row;
        an empty table still has the identity columns.
    """
    if isinstance(runs, (str, Path)):
        runs = scan(runs)
    rows = []
    headlines: dict[str, tuple[str, ...]] = {}
    for run in runs:
        lines = val_lines(run)
        if not lines:
            continue
        ident = run.identity
        if ident.task not in headlines:
            headlines[ident.task] = task_headline(ident.task)
        lr = run.config.get("lr")
        for line in lines:
            scores = {k: v for k, v in line.items() if k not in ("step", "split")}
            rows.append({
                "task": ident.task,
                "method": ident.method,
                "budget": math.nan if ident.budget is None else ident.budget,
                "seed": ident.seed,
                "lr": float(lr) if _finite(lr) else math.nan,
                "step": int(line["step"]),
                VAL_SCORE: headline_val_score(line, headlines[ident.task])[0],
                **scores,
            })
    df = pd.DataFrame(rows, columns=None if rows else [*CURVE_KEYS, VAL_SCORE])
    if not df.empty:
        df = df.sort_values(list(CURVE_KEYS), na_position="first", kind="stable")
        df = df.reset_index(drop=True)
    return df
