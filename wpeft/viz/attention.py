"""Views of the TADP prompt-attention records.

Input: ``attention``, an :class:`xarray.Dataset` with

* ``external_var_var`` on ``(block, variable_q, variable_k)``: external attention between input
  variables (rows: query variable, columns: key variable);
* ``external_var_patch`` on ``(block, variable, t, ph, pw)``: attention received by each
  variable and position inside the patch (time step ``t``, patch row ``ph``, column ``pw``);
* ``prompt_map`` on ``(block, prompt, latitude, longitude)``: each prompt token's attention over
  the grid.

``variable*`` coordinates are strings (WB2 names such as ``"2m_temperature"``, or labels such as
``"z (static)"``). Records from :mod:`wpeft.runs` carry a leading ``step`` dim; every view takes
``step=`` (default: the last record). Records of a backbone that embeds channels rather than
variables (Prithvi-WxC: ``variable_axis="channel"``, labels such as ``"geopotential 500 hPa"``)
are labelled "channel" (:func:`variable_axis`); records with ``prompt_to_patch`` (format 2) also
draw where a prompt token looks (:func:`plot_prompt_spread`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from wpeft.errors import DataError
from wpeft.viz.maps import draw_field, map_axes
from wpeft.viz.style import SEQUENTIAL, new_figure, sequential_norm

__all__ = [
    "ATTENTION_LABEL",
    "patch_attention_title",
    "plot_patch_attention",
    "plot_prompt_map",
    "plot_prompt_spread",
    "plot_variable_attention",
    "select_block",
    "variable_attention_title",
    "variable_axis",
]

ATTENTION_LABEL = "attention weight"


def select_block(
    attention: xr.Dataset, variable: str, block: Any, step: int | None = None
) -> xr.DataArray:
    """``attention[variable]`` at ``block`` (as the records label blocks) and, for records with
    a ``step`` dim, at ``step`` (default: the last one)."""
    if variable not in attention.data_vars:
        raise DataError(
            f"The attention records have no {variable!r}; they have "
            f"{sorted(map(str, attention.data_vars))}."
        )
    da = attention[variable]
    blocks = list(da["block"].values)
    if block not in blocks:
        raise DataError(f"Unknown block {block!r}; the records have {[str(b) for b in blocks]}.")
    da = da.sel(block=block)
    if "step" in da.dims:
        steps = [int(s) for s in da["step"].values]
        chosen = steps[-1] if step is None else step
        if chosen not in steps:
            raise DataError(f"No attention record at step {step}; recorded steps: {steps}.")
        da = da.sel(step=chosen)  # keeps a scalar ``step`` coordinate for the titles
    return da


def variable_axis(attention: xr.Dataset) -> str:
    """What a row of the kernels is: ``"variable"`` (Aurora; records without the attribute) or
    ``"channel"`` (a variable at one level: Prithvi-WxC)."""
    return str(attention.attrs.get("variable_axis", "variable"))


def _where(block: Any, da: xr.DataArray) -> str:
    has_step = "step" in da.coords and da["step"].ndim == 0
    scope = f" ({da['block_scope'].item()})" if "block_scope" in da.coords else ""
    return f"block {block}{scope}" + (f", step {int(da['step'])}" if has_step else "")


def variable_attention_title(attention: xr.Dataset, block: Any, *, step: int | None = None) -> str:
    """The title of :func:`plot_variable_attention` (also the alt text of its image)."""
    da = select_block(attention, "external_var_var", block, step)
    return f"external attention between {variable_axis(attention)}s, {_where(block, da)}"


def patch_attention_title(attention: xr.Dataset, block: Any, *, step: int | None = None) -> str:
    """The title of :func:`plot_patch_attention` with ``variable=None`` (also the alt text of
    its image)."""
    da = select_block(attention, "external_var_patch", block, step)
    return f"external attention over patch positions, {_where(block, da)}"


def plot_variable_attention(
    attention: xr.Dataset, block: Any, *, step: int | None = None, annotate: bool | None = None
) -> Figure:
    """Variable x variable external attention of one block (rows: query, columns: key).

    ``annotate`` writes the weights in the cells (default: when there are at most 10 variables).
    """
    da = select_block(attention, "external_var_var", block, step)
    da = da.transpose("variable_q", "variable_k")
    q = [str(v) for v in da["variable_q"].values]
    k = [str(v) for v in da["variable_k"].values]
    values = np.asarray(da.values, dtype=float)
    n = max(len(q), len(k))
    fig = new_figure((max(4.5, 0.5 * len(k) + 2.5), max(3.8, 0.45 * len(q) + 1.8)))
    ax = fig.add_subplot()
    norm = sequential_norm(values, vmin=0.0)
    im = ax.imshow(values, cmap=SEQUENTIAL, norm=norm, interpolation="nearest", aspect="auto")
    ax.set_xticks(np.arange(len(k)), k, rotation=45, ha="right")
    ax.set_yticks(np.arange(len(q)), q)
    axis = variable_axis(attention)
    ax.set_xlabel(f"key {axis}")
    ax.set_ylabel(f"query {axis}")
    ax.set_title(variable_attention_title(attention, block, step=step), fontsize="medium")
    if annotate if annotate is not None else n <= 10:
        mid = (norm.vmin + norm.vmax) / 2
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize="x-small",
                        color="k" if v > mid else "w")
    fig.colorbar(im, ax=ax, label=ATTENTION_LABEL)
    return fig


def plot_patch_attention(
    attention: xr.Dataset,
    block: Any,
    variable: str | Sequence[str] | None = None,
    *,
    step: int | None = None,
) -> Figure:
    """Attention over the positions inside a patch, for one block.

    * ``variable=None``: one heatmap, variables (rows) x flattened patch position (columns,
      ordered ``t``, then ``ph``, then ``pw``; time steps separated by white lines).
    * ``variable`` a name or list of names: a grid of ``P_h x P_w`` panels, one row per variable
      and one column per time step ``t``, all on the same colour limits.
    """
    da = select_block(attention, "external_var_patch", block, step)
    where = _where(block, da)
    da = da.transpose("variable", "t", "ph", "pw")
    names = [str(v) for v in da["variable"].values]
    nt, nph, npw = (da.sizes[d] for d in ("t", "ph", "pw"))
    if variable is None:
        values = np.asarray(da.values, dtype=float).reshape(len(names), nt * nph * npw)
        fig = new_figure((max(6.0, 0.12 * values.shape[1] + 3.0), max(3.0, 0.4 * len(names) + 1.5)))
        ax = fig.add_subplot()
        im = ax.imshow(values, cmap=SEQUENTIAL, norm=sequential_norm(values, vmin=0.0),
                       interpolation="nearest", aspect="auto")
        ax.set_yticks(np.arange(len(names)), names)
        per_t = nph * npw
        for t in range(1, nt):
            ax.axvline(t * per_t - 0.5, color="w", lw=1.5)
        ax.set_xticks([t * per_t + (per_t - 1) / 2 for t in range(nt)],
                      [f"t={t}" for t in range(nt)])
        ax.set_xlabel(f"patch position (t, then {nph}×{npw} row-major ph, pw)")
        ax.set_ylabel(variable_axis(attention))
        ax.set_title(patch_attention_title(attention, block, step=step), fontsize="medium")
        fig.colorbar(im, ax=ax, label=ATTENTION_LABEL)
        return fig

    wanted = [variable] if isinstance(variable, str) else list(variable)
    unknown = [v for v in wanted if v not in names]
    if unknown:
        raise DataError(f"Unknown variable(s) {unknown}; the records have {names}.")
    sub = da.sel(variable=wanted)
    norm = sequential_norm(np.asarray(sub.values, dtype=float), vmin=0.0)
    fig = new_figure((2.2 * nt + 1.5, 2.0 * len(wanted) + 0.8))
    axes = fig.subplots(len(wanted), nt, squeeze=False)
    im = None
    for r, name in enumerate(wanted):
        for t in range(nt):
            ax = axes[r, t]
            im = ax.imshow(np.asarray(sub.sel(variable=name).isel(t=t).values, dtype=float),
                           cmap=SEQUENTIAL, norm=norm, interpolation="nearest")
            ax.set_title(f"{name}, t={t}", fontsize="small")
            ax.set_xticks(range(npw))
            ax.set_yticks(range(nph))
            if r == len(wanted) - 1:
                ax.set_xlabel("pw")
            if t == 0:
                ax.set_ylabel("ph")
    fig.suptitle(f"external attention inside the patch, {where}", fontsize="medium")
    fig.colorbar(im, ax=axes, label=ATTENTION_LABEL, shrink=0.9)
    return fig


def plot_prompt_map(
    attention: xr.Dataset, block: Any, prompt: Any, *, earth: bool = False, step: int | None = None
) -> Figure:
    """One prompt token's attention over (latitude, longitude) in one block.

    ``step`` picks a record when the records have a ``step`` dim (default: the last).
    ``earth=True`` draws a PlateCarree map with local coastlines (see :mod:`wpeft.viz.maps`);
    ``earth=False`` plain axes for the synthetic world.
    """
    return _prompt_field_figure(
        attention, "prompt_map", block, prompt, step, earth=earth, label=ATTENTION_LABEL,
        title=lambda where: f"attention paid to prompt {prompt}, {where}",
    )


def plot_prompt_spread(
    attention: xr.Dataset, block: Any, prompt: Any, *, earth: bool = False, step: int | None = None
) -> Figure:
    """Where one prompt token looks in one block: its attention over the patch tokens of each
    attention sequence (``prompt_to_patch``; sums to 1 over the grid), with the share it keeps
    on the prompt tokens in the title. Records of format 1 (before ``prompt_to_patch``) raise
    :class:`DataError`."""
    if "prompt_to_patch" not in attention.data_vars:
        raise DataError(
            "These attention records predate prompt_to_patch (format 1); record the run again "
            "to draw where the prompts look (plot_prompt_map draws what they have)."
        )

    def title(where: str) -> str:
        self_share = select_block(attention, "prompt_self_attention", block, step)
        kept = float(self_share.sel(prompt=prompt))
        return (f"where prompt {prompt} looks over the patches ({kept:.0%} of its attention "
                f"on prompts)\n{where}")

    return _prompt_field_figure(
        attention, "prompt_to_patch", block, prompt, step, earth=earth,
        label="share of the prompt's attention", title=title,
    )


def _prompt_field_figure(
    attention: xr.Dataset,
    var: str,
    block: Any,
    prompt: Any,
    step: int | None,
    *,
    earth: bool,
    label: str,
    title: Callable[[str], str],
) -> Figure:
    """One prompt's ``(lat, lon)`` field of record variable ``var`` in one block, on map axes
    (sequential colours from 0), titled ``title(where)``."""
    da = select_block(attention, var, block, step)
    where = _where(block, da)
    prompts = list(da["prompt"].values)
    if prompt not in prompts:
        raise DataError(f"Unknown prompt {prompt!r}; the records have {prompts}.")
    field = da.sel(prompt=prompt)
    fig = new_figure((7.5, 4.0))
    ax = map_axes(fig, (1, 1, 1), earth=earth)
    mesh = draw_field(ax, field, earth=earth, cmap=SEQUENTIAL,
                      norm=sequential_norm(field.values, vmin=0.0))
    ax.set_title(title(where), fontsize="medium")
    fig.colorbar(mesh, ax=ax, label=label, shrink=0.85)
    return fig
