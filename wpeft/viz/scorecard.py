"""The scorecard figure: runs x scores, coloured by the binned relative difference to a reference.

Data in (:func:`wpeft.runs.scorecard.scorecard`), figure out. Each cell's colour is the
``oriented_difference`` binned at ±:data:`~wpeft.runs.scorecard.SCORECARD_BINS` % on the
project's diverging map (:data:`wpeft.viz.style.DIVERGING`, blue below zero = better than the
reference for every metric, ACC included); the cell's text is the run's absolute score; cells
whose difference is significant are written in bold with a dot in their upper right corner.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from matplotlib import colormaps
from matplotlib.colors import BoundaryNorm
from matplotlib.figure import Figure

from wpeft.errors import DataError
from wpeft.runs.scorecard import SCORECARD_BINS
from wpeft.viz.style import DIVERGING, METRICS, new_figure

__all__ = ["plot_scorecard"]

_NEEDED = ("value", "oriented_difference", "significant")
_MISSING = "#d9d9d9"  # no score in this cell


def _column_label(card: xr.Dataset, j: int) -> str:
    metric = str(card["metric"].values[j])
    name = METRICS.get(metric, (metric.upper(), True))[0]
    return f"{name} {card['variable'].values[j]}"


def _value_text(v: float) -> str:
    if not np.isfinite(v):
        return "–"
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e5 or v == 0 else f"{v:.2e}"


def plot_scorecard(card: xr.Dataset, *, title: str | None = None) -> Figure:
    """A grid of R runs x S scores coloured by the binned relative difference to the reference.

    Args:
        card: :func:`wpeft.runs.scorecard.scorecard` output on ``(run, score)``.
        title: Figure title (default: the task and the reference run).

    Returns:
        The figure: one cell per (run, score) in a single ``pcolormesh`` (R x S), the absolute
        score written in each, significant cells bold with a dot, and a colour bar of the bins
        labelled with the sign convention.

    Raises:
        DataError: ``card`` lacks a variable of the scorecard or has no run or no score.
    """
    missing = [v for v in _NEEDED if v not in card]
    if missing or "run" not in card.dims or "score" not in card.dims:
        raise DataError(
            f"plot_scorecard needs wpeft.runs.scorecard.scorecard(...) output on (run, score); "
            f"this one lacks {missing or ['the run/score dimensions']}."
        )
    n_rows, n_cols = card.sizes["run"], card.sizes["score"]
    if not n_rows or not n_cols:
        raise DataError(f"the scorecard is empty ({n_rows} runs x {n_cols} scores).")
    diff = card["oriented_difference"].transpose("run", "score").values.astype(float)
    value = card["value"].transpose("run", "score").values.astype(float)
    significant = card["significant"].transpose("run", "score").values.astype(bool)
    bins = [float(b) for b in card.attrs.get("bins", SCORECARD_BINS)]
    edges = [-b for b in reversed(bins)] + bins
    cmap = colormaps[DIVERGING].with_extremes(bad=_MISSING)
    norm = BoundaryNorm(edges, cmap.N, extend="both")

    fig = new_figure((2.4 + 0.95 * n_cols, 1.6 + 0.42 * n_rows))
    ax = fig.add_subplot()
    mesh = ax.pcolormesh(
        np.ma.masked_invalid(diff), cmap=cmap, norm=norm, edgecolors="white", linewidth=1.0
    )
    strong = bins[-2] if len(bins) > 1 else bins[-1]  # dark cells get white text
    for i in range(n_rows):
        for j in range(n_cols):
            bold = bool(significant[i, j])
            dark = np.isfinite(diff[i, j]) and abs(diff[i, j]) >= strong
            ax.text(j + 0.5, i + 0.5, _value_text(value[i, j]), ha="center", va="center",
                    fontsize=8, fontweight="bold" if bold else "normal",
                    color="white" if dark else "black")
            if bold:
                ax.plot(j + 0.88, i + 0.2, marker="o", markersize=3,
                        color="white" if dark else "black")
    ax.set_xlim(0, n_cols)
    ax.set_ylim(n_rows, 0)  # the reference on top
    ax.set_xticks(np.arange(n_cols) + 0.5)
    ax.set_xticklabels([_column_label(card, j) for j in range(n_cols)], rotation=40,
                       ha="right", fontsize=8)
    ax.set_yticks(np.arange(n_rows) + 0.5)
    reference = str(card.attrs.get("reference", card["run"].values[0]))
    ax.set_yticklabels([
        f"{r} (reference)" if str(r) == reference else str(r) for r in card["run"].values
    ], fontsize=8)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    cbar = fig.colorbar(mesh, ax=ax, extend="both", ticks=edges, fraction=0.04, pad=0.02)
    cbar.set_label("difference to the reference (%)\nnegative / blue = better\n"
                   "(lower error, higher ACC)", fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    test = card.attrs.get("test_name", "paired test")
    alpha = card.attrs.get("alpha", 0.05)
    task = card.attrs.get("task", "")
    ax.set_title(
        title if title is not None else f"{task} scorecard against {reference}".strip(),
        fontsize=10,
    )
    ax.set_xlabel(f"cell: absolute score; bold with a dot: {test}, p < {alpha}", fontsize=8)
    return fig
