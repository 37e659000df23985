"""Learning curves: a validation score against the optimiser step, from the runs' tidy curves
table (:func:`wpeft.runs.curves.curves_table`; that table needs no matplotlib)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from wpeft.errors import ConfigError, DataError
from wpeft.runs.curves import CURVE_KEYS, VAL_SCORE, curves_table
from wpeft.runs.layout import METRICS
from wpeft.runs.store import Run
from wpeft.viz.style import colorbar_label, method_style, new_figure

__all__ = ["VAL_SCORE_LABEL", "curve_label", "curve_lines", "ema", "plot_learning_curves", "plot_training_curves"]

VAL_SCORE_LABEL = "headline validation score (score / reference; lower is better)"
_LINESTYLES = ("-", "--", ":", "-.")


def _budget_text(budget: float) -> str:
    return "default" if np.isnan(budget) else f"{100 * budget:g}%"


def plot_learning_curves(
    runs: str | Path | Iterable[Run] | pd.DataFrame,
    *,
    metric: str | None = None,
    variable: str | None = None,
    task: str | None = None,
    log_y: bool = False,
    title: str | None = None,
) -> Figure:
    """Validation score against step, one line per method-budget: the mean over seeds with a
    min–max band (when there are several seeds).

    A method-budget that ran at several learning rates gets one line per lr (labelled
    ``lr ...``). Colours are fixed per method (:func:`wpeft.viz.style.method_style`), budgets
    and lrs of one method differ in line style.

    Args:
        runs: A root directory, runs, or a :func:`~wpeft.runs.curves.curves_table` DataFrame.
        metric / variable: The column ``<metric>/<variable>`` (``"rmse"``,
            ``"2m_temperature"``); both None: the headline validation score (``val_score``).
        task: The task to draw when the runs hold several.
        log_y: Logarithmic y axis.
        title: Axes title.

    Raises:
        DataError: no validation lines, or no such column. ConfigError: only one of
            ``metric`` / ``variable``, or several tasks and no ``task``.
    """
    df = runs if isinstance(runs, pd.DataFrame) else curves_table(runs)
    if df.empty:
        raise DataError(
            f"No validation lines to draw: the runs have no {METRICS} val lines; train with "
            "--eval-every N."
        )
    if (metric is None) != (variable is None):
        raise ConfigError(
            f"metric={metric!r}, variable={variable!r}: give both (e.g. metric='rmse', "
            "variable='2m_temperature') or neither (the headline validation score)."
        )
    column = VAL_SCORE if metric is None else f"{metric}/{variable}"
    if column not in df:
        scores = [c for c in df.columns if c not in CURVE_KEYS]
        raise DataError(f"The validation lines have no {column!r}; they have {scores}.")
    tasks = list(dict.fromkeys(df["task"]))
    if task is not None:
        if task not in tasks:
            raise DataError(f"task {task!r} has no validation lines; the runs' tasks are {tasks}.")
        df = df[df["task"] == task]
    elif len(tasks) > 1:
        raise ConfigError(f"The runs hold several tasks {tasks}; pick one with task=...")

    stats = (
        df.groupby(["method", "budget", "lr", "step"], dropna=False, sort=False)[column]
        .agg(["mean", "min", "max", "count"])
        .reset_index()
    )
    methods = list(dict.fromkeys(stats["method"]))
    styles = method_style(methods)
    fig = new_figure((7.4, 4.2))  # room for the legend beside the axes
    ax = fig.add_subplot()
    for method in methods:
        of_method = stats[stats["method"] == method]
        lines = of_method[["budget", "lr"]].drop_duplicates()
        lines = lines.sort_values(["budget", "lr"], na_position="first")
        for i, (budget, lr) in enumerate(zip(lines["budget"], lines["lr"])):
            same_budget = of_method["budget"].isna() if np.isnan(budget) else of_method["budget"] == budget
            line = of_method[same_budget & (of_method["lr"] == lr)].sort_values("step")
            several_lrs = of_method.loc[same_budget, "lr"].nunique() > 1
            label = f"{method} {_budget_text(budget)}" + (f" lr {lr:g}" if several_lrs else "")
            color = styles[method]["color"]
            ax.plot(line["step"], line["mean"], color=color, ls=_LINESTYLES[i % len(_LINESTYLES)],
                    marker="o", ms=3, lw=1.2, label=label)
            if (line["count"] > 1).any():
                ax.fill_between(line["step"], line["min"], line["max"], color=color, alpha=0.2,
                                lw=0)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(VAL_SCORE_LABEL if metric is None else
                  "validation " + colorbar_label(f"{variable}_{metric}"))
    ax.grid(True, lw=0.4, alpha=0.5)
    if title:
        ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # never on a curve
    return fig


# --------------------------------------------------------------------------- training curves
# The long table of the workbench (wpeft.app.catalog.Catalog.curves: run, method, split, step,
# column, value), one line per run; hv_curves (wpeft.viz.interactive) draws the same lines.

_CURVES_NEEDED = ("run", "method", "split", "step", "column", "value")


def ema(values: np.ndarray, weight: float) -> np.ndarray:
    """Exponential moving average ``s_0 = y_0``, ``s_i = w s_(i-1) + (1 - w) y_i`` (weight 0:
    the values themselves).

    Raises:
        ConfigError: ``weight`` is outside [0, 1).
    """
    if not 0.0 <= weight < 1.0:
        raise ConfigError(f"smoothing weight must be in [0, 1), got {weight}.")
    y = np.asarray(values, dtype=float)
    out = np.empty_like(y)
    acc = y[0] if y.size else 0.0
    for i, v in enumerate(y):
        acc = weight * acc + (1.0 - weight) * v
        out[i] = acc
    return out


def curve_lines(
    frame: pd.DataFrame, column: str, *, split: str = "val", smoothing: float = 0.0
) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """``[(run, method, steps, values)]``: one line per run of ``column`` in ``split`` (in the
    frame's run order), sorted by step, the values smoothed with :func:`ema`.

    Raises:
        DataError: the frame is not a curves table, or no run has ``column`` in ``split``.
    """
    missing = [c for c in _CURVES_NEEDED if c not in frame.columns]
    if missing:
        raise DataError(f"a curves table needs the columns {list(_CURVES_NEEDED)}; "
                        f"this one lacks {missing}.")
    rows = frame[(frame["split"] == split) & (frame["column"] == column)]
    if rows.empty:
        have = sorted({f"{s}: {c}" for s, c in zip(frame["split"], frame["column"])})
        raise DataError(f"no run has {split} lines of {column!r}; the lines hold {have}.")
    lines = []
    for run in dict.fromkeys(rows["run"]):
        line = rows[rows["run"] == run].sort_values("step")
        lines.append((str(run), str(line["method"].iloc[0]), line["step"].to_numpy(),
                      ema(line["value"].to_numpy(), smoothing)))
    return lines


def curve_label(column: str, split: str) -> str:
    """``"training loss"``, ``"validation loss"``, ``"validation rmse/2m_temperature"``."""
    return f"{'training' if split == 'train' else 'validation'} {column}"


def plot_training_curves(
    frame: pd.DataFrame,
    column: str = "loss",
    *,
    split: str = "train",
    log_y: bool = False,
    smoothing: float = 0.0,
    title: str | None = None,
) -> Figure:
    """``column`` of ``split`` lines against step, one line per run (colour per method, line
    style per run of the same method), smoothed with :func:`ema` (``smoothing`` 0: raw).

    Args:
        frame: :meth:`wpeft.app.catalog.Catalog.curves` long table.
        column: ``loss`` or a ``<metric>/<variable>`` of the lines.
        split: ``train`` or ``val``.
        log_y: Logarithmic y axis.
        smoothing: EMA weight in [0, 1).
        title: Axes title.

    Raises:
        DataError: no such lines. ConfigError: a bad ``smoothing``.
    """
    lines = curve_lines(frame, column, split=split, smoothing=smoothing)
    styles = method_style(list(dict.fromkeys(m for _, m, _, _ in lines)))
    seen: dict[str, int] = {}
    fig = new_figure((7.4, 4.2))
    ax = fig.add_subplot()
    for run, method, steps, values in lines:
        i = seen[method] = seen.get(method, -1) + 1
        ax.plot(steps, values, color=styles[method]["color"], lw=1.3,
                ls=_LINESTYLES[i % len(_LINESTYLES)], label=f"{run} ({method})")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    smooth = f" (EMA {smoothing:g})" if smoothing else ""
    ax.set_ylabel(curve_label(column, split) + smooth)
    ax.grid(True, lw=0.4, alpha=0.5)
    if title:
        ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig
