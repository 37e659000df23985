"""Views of verification results: skill maps, two-method comparisons, budget vs skill.

Skill fields are (latitude, longitude) DataArrays (or one-variable Datasets), e.g. the RMSE of
``2m_temperature`` per grid point from :func:`wpeft.metrics.rmse` with ``reduce_dims="time"``;
their ``long_name`` / ``units`` attrs label the colourbars (falling back to the schema).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter

from wpeft.errors import DataError
from wpeft.viz.maps import draw_field, hatch_cells, latlon_field, map_axes
from wpeft.viz.style import (
    DIVERGING,
    SEQUENTIAL,
    colorbar_label,
    diverging_norm,
    long_name,
    method_style,
    new_figure,
    sequential_norm,
    strip_metric,
)

__all__ = [
    "BUDGET_LABEL",
    "SIZE_AXES",
    "budget_table",
    "not_significant_label",
    "plot_budget_vs_skill",
    "plot_skill_comparison",
    "plot_skill_map",
]

BUDGET_LABEL = "trainable parameters (% of backbone)"
#: The x axes budget vs skill can have: a size of :func:`wpeft.runs.store.run_sizes` -> label.
SIZE_AXES = {
    "budget_fraction": "per-step k: " + BUDGET_LABEL,
    "changed_fraction": "changed parameters, union over training (% of backbone)",
    "adapter_fraction": "adapter file (% of the full fine-tuned checkpoint)",
}


def _is_signed(values: Any) -> bool:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return bool(v.size) and v.min() < 0 < v.max()


def plot_skill_map(
    field: xr.DataArray | xr.Dataset,
    *,
    earth: bool,
    title: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    variable: str | None = None,
    cmap: str | None = None,
) -> Figure:
    """One skill field on (latitude, longitude).

    Sequential ``viridis`` for non-negative scores (RMSE, CRPS); fields with both signs (bias)
    get ``RdBu_r`` with limits symmetric about zero (``vmax``, or ``max(|vmin|, |vmax|)``).

    Args:
        field: (latitude, longitude) DataArray, or a Dataset with one variable / ``variable``.
        earth: PlateCarree map with local coastlines (True) or the synthetic world (False).
        title: Axes title (default: the field's long name).
        vmin, vmax: Colour limits (default: the data's range).
        variable: Which variable of a Dataset to draw.
        cmap: Override the colormap.
    """
    da = latlon_field(field, variable)
    label = colorbar_label(da)
    signed = vmin < 0 if vmin is not None else _is_signed(da.values)
    if signed:
        given = [abs(v) for v in (vmin, vmax) if v is not None]
        norm = diverging_norm(da.values, vmax=max(given) if given else None)
        default_cmap = DIVERGING
    else:
        norm, default_cmap = sequential_norm(da.values, vmin, vmax), SEQUENTIAL
    fig = new_figure((7.5, 4.0))
    ax = map_axes(fig, (1, 1, 1), earth=earth)
    mesh = draw_field(ax, da, earth=earth, cmap=cmap or default_cmap, norm=norm)
    ax.set_title(title if title is not None else long_name(da), fontsize="medium")
    fig.colorbar(mesh, ax=ax, label=label, shrink=0.85)
    return fig


def _as_difference(
    a: xr.DataArray,
    b: xr.DataArray,
    difference: xr.Dataset | xr.DataArray | None,
    variable: str | None = None,
) -> tuple[xr.DataArray, xr.DataArray | None]:
    """(A − B, significant or None) on (latitude, longitude); a ``variable`` dim (as in
    :func:`wpeft.runs.skill_difference`) is indexed with ``variable`` or ``a``'s name, with or
    without a metric suffix."""
    if difference is None:
        return a - b, None
    if "variable" in difference.dims and difference.sizes["variable"] > 1:
        names = [str(v) for v in difference["variable"].values]
        wanted = [n for n in (variable, a.name) if n is not None]
        wanted += [strip_metric(str(n)) for n in wanted]  # "2m_temperature_rmse" -> base name
        pick = next((str(n) for n in wanted if str(n) in names), None)
        if pick is None:
            raise DataError(
                f"The difference holds variables {names}; name one with variable=."
            )
        difference = difference.sel(variable=pick)
    if isinstance(difference, xr.DataArray):
        return latlon_field(difference), None
    if "difference" not in difference.data_vars:
        raise DataError(
            "The difference Dataset needs a 'difference' variable (and optionally a boolean "
            f"'significant'); it has {sorted(map(str, difference.data_vars))}."
        )
    sig = difference["significant"] if "significant" in difference.data_vars else None
    return latlon_field(difference["difference"]), None if sig is None else latlon_field(sig)


def not_significant_label(significant: xr.DataArray | None) -> str:
    """Legend label of the non-significant points, naming the test when ``significant`` says
    which (its ``long_name`` from :func:`wpeft.runs.skill_difference`, e.g. "paired t-test with
    AR(1) effective sample size, p < 0.05")."""
    test = None if significant is None else significant.attrs.get("long_name")
    return f"not significant ({test})" if test else "not significant"


def plot_skill_comparison(
    field_a: xr.DataArray | xr.Dataset,
    field_b: xr.DataArray | xr.Dataset,
    difference: xr.Dataset | xr.DataArray | None = None,
    *,
    labels: tuple[str, str] = ("WeatherPEFT", "Full-Tuning"),
    earth: bool,
    variable: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    title: str | None = None,
) -> Figure:
    """Three panels: A, B (shared colour limits and colourbar) and A − B.

    The difference uses ``RdBu_r`` with limits symmetric about zero; grid cells where
    ``difference["significant"]`` is False are hatched (``///``); the legend names the test
    (:func:`not_significant_label`). ``difference`` may also be a
    plain DataArray (no hatching) or ``None`` (computed as A − B, no hatching).

    Args:
        field_a, field_b: (latitude, longitude) skill fields on the same grid.
        difference: Dataset with ``difference`` and boolean ``significant`` on (latitude,
            longitude), e.g. from :func:`wpeft.runs.skill_difference` (its ``variable`` dim is
            indexed with ``variable``).
        labels: Names of A and B (panel titles).
        earth: Real-Earth maps with coastlines, or the synthetic world.
        variable: Which variable of Dataset inputs to draw.
        vmin, vmax: Colour limits of A and B (default: joint range of both).
        title: Figure title (default: the field's long name).
    """
    a = latlon_field(field_a, variable)
    b = latlon_field(field_b, variable)
    diff, significant = _as_difference(a, b, difference, variable)
    try:
        xr.align(a, b, diff, *([] if significant is None else [significant]), join="exact")
    except ValueError as e:
        raise DataError(
            f"A, B and the difference must share one (latitude, longitude) grid: {e}"
        ) from e
    label = colorbar_label(a)
    both = np.concatenate([np.ravel(a.values), np.ravel(b.values)])
    norm_ab = sequential_norm(both, vmin, vmax)
    norm_d = diverging_norm(diff.values)

    fig = new_figure((15.0, 3.8))
    axes = [map_axes(fig, (1, 3, i + 1), earth=earth) for i in range(3)]
    mesh_a = draw_field(axes[0], a, earth=earth, cmap=SEQUENTIAL, norm=norm_ab)
    draw_field(axes[1], b, earth=earth, cmap=SEQUENTIAL, norm=norm_ab)
    mesh_d = draw_field(axes[2], diff, earth=earth, cmap=DIVERGING, norm=norm_d)
    for ax, name, text in zip(
        axes, ("a", "b", "difference"), (labels[0], labels[1], f"{labels[0]} − {labels[1]}")
    ):
        ax.set_label(name)
        ax.set_title(text, fontsize="medium")
    fig.colorbar(mesh_a, ax=axes[:2], label=label, shrink=0.85, location="bottom", aspect=40)
    fig.colorbar(mesh_d, ax=axes[2], label=f"Δ {label}", shrink=0.85, location="bottom", aspect=20)
    if significant is not None and not bool(significant.all()):
        hatch_cells(axes[2], ~significant.astype(bool), earth=earth)
        axes[2].legend(
            handles=[
                Patch(facecolor="none", edgecolor="0.3", hatch="///",
                      label=textwrap.fill(not_significant_label(significant), 34))
            ],
            loc="lower left", fontsize="x-small", framealpha=0.8,
        )
    fig.suptitle(title if title is not None else label, fontsize="large")
    return fig


def budget_table(
    table: pd.DataFrame | xr.Dataset, score: str = "score", size: str = "budget_fraction"
) -> pd.DataFrame:
    """A DataFrame with columns ``method``, ``budget_percent`` and ``score`` (float).

    Accepts a DataFrame or a Dataset (one row per element of its dim); ``score`` names the score
    column (e.g. ``"2m_temperature_rmse"`` in :func:`wpeft.runs.table`), and ``budget_percent``
    is taken as ``100 * budget_fraction`` when only that column exists. Another ``size`` of
    :data:`SIZE_AXES` (``changed_fraction``, ``adapter_fraction``: columns of a runs table)
    gives ``budget_percent = 100 * <size>`` instead, the x of the plot. The score label goes to
    ``attrs["score_label"]`` (from the table's attrs, the Dataset variable's ``long_name``, or
    the schema).
    """
    attrs: dict[str, Any] = {}
    if isinstance(table, xr.Dataset):
        attrs.update(table.attrs)
        if score in table.data_vars:
            attrs.setdefault("score_label", table[score].attrs.get("long_name"))
        table = table.to_dataframe().reset_index()
    attrs.update(getattr(table, "attrs", {}) or {})
    if size not in SIZE_AXES:
        raise DataError(f"Unknown size {size!r} for the x axis; one of {list(SIZE_AXES)}.")
    df = table.copy()
    use_size = size != "budget_fraction" or "budget_percent" not in df.columns
    if use_size and size in df.columns:
        df["budget_percent"] = 100.0 * pd.to_numeric(df[size], errors="coerce")
    elif size != "budget_fraction":
        raise DataError(
            f"The runs table lacks column {size!r}; it has {list(map(str, df.columns))}."
        )
    missing = [c for c in ("method", "budget_percent", score) if c not in df.columns]
    if missing:
        raise DataError(
            f"The runs table lacks column(s) {missing}; it has {list(map(str, df.columns))}."
        )
    df = pd.DataFrame({
        "method": df["method"].astype(str),
        "budget_percent": pd.to_numeric(df["budget_percent"], errors="coerce"),
        "score": pd.to_numeric(df[score], errors="coerce"),
    })
    bad = ~(df["budget_percent"] > 0)
    if bad.any():
        raise DataError(
            "budget_percent must be > 0 for a log axis; runs of "
            f"{df.loc[bad, 'method'].tolist()} have {df.loc[bad, 'budget_percent'].tolist()}."
        )
    if not attrs.get("score_label"):
        attrs["score_label"] = colorbar_label(score)
    df.attrs = attrs
    return df


def plot_budget_vs_skill(
    table: pd.DataFrame | xr.Dataset,
    *,
    score: str = "score",
    score_label: str | None = None,
    lower_is_better: bool | None = None,
    title: str | None = None,
    methods: Sequence[str] | None = None,
) -> Figure:
    """All runs on one plot: trainable % of the backbone (log x) against a score (y).

    One colour and marker per method (fixed for known methods, see
    :data:`wpeft.viz.style.METHOD_COLORS`); every run is a marker, and a line joins the method's
    mean score per budget (over seeds).

    Args:
        table: DataFrame (or Dataset) with columns ``method``, ``budget_percent`` (or
            ``budget_fraction``) and the score (see :func:`budget_table`).
        score: Name of the score column.
        score_label: y label (default: ``table.attrs["score_label"]``, the Dataset variable's
            long name, or the schema's description of ``score``).
        lower_is_better: Adds "(lower is better)" / "(higher is better)" to the y label.
        title: Axes title.
        methods: Legend order (default: order of first appearance).
    """
    df = budget_table(table, score)
    label = score_label or df.attrs["score_label"]
    if lower_is_better is not None:
        label += " (lower is better)" if lower_is_better else " (higher is better)"
    order = list(methods) if methods is not None else list(dict.fromkeys(map(str, df["method"])))
    styles = method_style(order)
    fig = new_figure((6.0, 4.2))
    ax = fig.add_subplot()
    for m in order:
        runs = df[df["method"] == m]
        if runs.empty:
            continue
        st = styles[m]
        mean = runs.groupby("budget_percent")["score"].mean()
        ax.plot(mean.index, mean.values, color=st["color"], lw=1.0, zorder=2)
        ax.plot(runs["budget_percent"], runs["score"], ls="none", color=st["color"],
                marker=st["marker"], ms=7, label=m, markeredgecolor="k", markeredgewidth=0.5,
                zorder=3)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%"))
    ax.set_xlabel(BUDGET_LABEL)
    ax.set_ylabel(label)
    ax.grid(True, which="major", lw=0.4, alpha=0.5)
    if title:
        ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="small", loc="best")
    return fig
