"""Views of the Fisher-mask records (SFAS / FISH / Child-Tuning masks over training).

Input: ``fisher``, an :class:`xarray.Dataset` with

* ``density``, ``fisher_mass``, ``jaccard_previous``, ``jaccard_first``, ``union_density`` on
  dims ``(step, block, tensor)`` (NaN where a block has no tensor of that kind);
* ``mask_image`` on ``(step, matrix, row, col)``: local density in [0, 1] of one weight matrix's
  pooled boolean mask (``matrix`` labels such as ``"encoder0.0/qkv"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib as mpl
import numpy as np
import xarray as xr
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from wpeft.errors import DataError
from wpeft.viz.style import (
    MASK,
    OKABE_ITO,
    PNG_DPI,
    SEQUENTIAL,
    new_figure,
    sequential_norm,
    themed_png,
)

__all__ = [
    "MASK_VARIABLES",
    "aggregate_tensors",
    "overlap_series",
    "plot_mask_heatmap",
    "plot_mask_image",
    "plot_mask_layers",
    "plot_overlap_curves",
    "select_step",
]

#: Label of each per-tensor record (used on colourbars and y axes).
MASK_VARIABLES = {
    "density": "mask density (fraction of entries selected)",
    "fisher_mass": "share of Fisher mass",
    "jaccard_previous": "Jaccard overlap with previous mask",
    "jaccard_first": "Jaccard overlap with first mask",
    "union_density": "union density (fraction ever selected)",
}
_UNIT_RANGE = {"jaccard_previous", "jaccard_first"}  # always shown on [0, 1]


def _check(fisher: xr.Dataset, variable: str) -> xr.DataArray:
    if variable not in fisher.data_vars:
        raise DataError(
            f"The Fisher records have no {variable!r}; "
            f"they have {sorted(map(str, fisher.data_vars))}."
        )
    return fisher[variable]


def aggregate_tensors(fisher: xr.Dataset, variable: str, tensor: str | None = None) -> xr.DataArray:
    """``variable`` on (step, block) for one tensor kind, or aggregated over kinds.

    With ``tensor=None``: ``fisher_mass`` is **summed** over the kinds a block has (mass is
    additive); every other record is the **unweighted mean** over the kinds the block has (NaNs
    skipped; per-tensor sizes are not in the records). Blocks with no data stay NaN.
    """
    da = _check(fisher, variable)
    if tensor is not None:
        kinds = [str(t) for t in da["tensor"].values]
        if tensor not in kinds:
            raise DataError(f"Unknown tensor kind {tensor!r}; the records have {kinds}.")
        return da.sel(tensor=tensor, drop=True).transpose("step", "block")
    has_any = da.notnull().any("tensor")
    if variable == "fisher_mass":
        out = da.sum("tensor", skipna=True)
    else:
        out = da.mean("tensor", skipna=True)
    return out.where(has_any).transpose("step", "block")


def select_step(da: xr.DataArray, step: int | None) -> tuple[xr.DataArray, int]:
    """``da`` at ``step`` (the last step when ``None``) and the step chosen."""
    steps = [int(s) for s in da["step"].values]
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise DataError(f"No record at step {step}; recorded steps: {steps}.")
    return da.sel(step=step), step


def _step_edges(steps: np.ndarray) -> np.ndarray:
    s = np.asarray(steps, dtype=float)
    if s.size == 1:
        return np.array([s[0] - 0.5, s[0] + 0.5])
    mid = (s[1:] + s[:-1]) / 2
    return np.concatenate([[s[0] - (mid[0] - s[0])], mid, [s[-1] + (s[-1] - mid[-1])]])


def plot_mask_heatmap(
    fisher: xr.Dataset, variable: str = "density", tensor: str | None = None
) -> Figure:
    """Heatmap of a per-layer mask record: block (rows, in record order) x training step (x).

    Args:
        fisher: Fisher-mask records (dims ``step``, ``block``, ``tensor``).
        variable: One of :data:`MASK_VARIABLES`.
        tensor: A tensor kind (``"qkv"``, ``"fc1"``, ...), or ``None`` to aggregate over kinds as
            in :func:`aggregate_tensors` (sum for ``fisher_mass``, mean otherwise).

    Blocks without such a tensor are drawn light grey.
    """
    data = aggregate_tensors(fisher, variable, tensor)
    steps = data["step"].values
    blocks = [str(b) for b in data["block"].values]
    values = np.ma.masked_invalid(np.asarray(data.values, dtype=float).T)  # (block, step)
    norm = (
        sequential_norm(values.compressed(), 0.0, 1.0)
        if variable in _UNIT_RANGE
        else sequential_norm(values.compressed(), vmin=0.0)
    )
    fig = new_figure((max(5.0, 0.25 * len(steps) + 3.5), max(3.0, 0.28 * len(blocks) + 1.2)))
    ax = fig.add_subplot()
    cmap = mpl.colormaps[SEQUENTIAL].with_extremes(bad="0.88")
    mesh = ax.pcolormesh(
        _step_edges(steps), np.arange(len(blocks) + 1) - 0.5, values, cmap=cmap, norm=norm
    )
    ax.set_yticks(np.arange(len(blocks)), blocks)
    ax.invert_yaxis()  # first block on top
    ax.set_xlabel("training step")
    ax.set_ylabel("block")
    label = MASK_VARIABLES.get(variable, variable)
    which = f"{tensor} tensors" if tensor else (
        "sum over tensor kinds" if variable == "fisher_mass" else "mean over tensor kinds"
    )
    ax.set_title(f"{label}\n({which})", fontsize="medium")
    fig.colorbar(mesh, ax=ax, label=label)
    return fig


def plot_mask_layers(
    fisher: xr.Dataset, variable: str = "density", step: int | None = None
) -> Figure:
    """One step of a per-tensor mask record: block (rows, in record order) x tensor kind.

    Args:
        fisher: Fisher-mask records (dims ``step``, ``block``, ``tensor``).
        variable: One of :data:`MASK_VARIABLES`.
        step: A recorded step (``None``: the last one).

    The colour limits span *every* recorded step (frames of a step slider compare directly;
    [0, 1] for the Jaccard records). Tensor kinds without data at any step are left out; blocks
    without a tensor of a kept kind are drawn light grey.
    """
    da = _check(fisher, variable)
    if "tensor" not in da.dims or "block" not in da.dims:
        raise DataError(f"{variable!r} is not a per-(block, tensor) record; dims {da.dims}.")
    has_data = da.notnull().any([d for d in da.dims if d != "tensor"])
    if bool(has_data.any()):
        da = da.sel(tensor=has_data)
    at, step = select_step(da, step)
    at = at.transpose("block", "tensor")
    blocks = [str(b) for b in at["block"].values]
    kinds = [str(t) for t in at["tensor"].values]
    everything = np.asarray(da.values, dtype=float)
    norm = (
        sequential_norm(everything, 0.0, 1.0)
        if variable in _UNIT_RANGE
        else sequential_norm(everything, vmin=0.0)
    )
    fig = new_figure((max(4.5, 0.6 * len(kinds) + 3.0), max(3.0, 0.28 * len(blocks) + 1.2)))
    ax = fig.add_subplot()
    cmap = mpl.colormaps[SEQUENTIAL].with_extremes(bad="0.88")
    values = np.ma.masked_invalid(np.asarray(at.values, dtype=float))
    mesh = ax.pcolormesh(
        np.arange(len(kinds) + 1) - 0.5,
        np.arange(len(blocks) + 1) - 0.5,
        values,
        cmap=cmap,
        norm=norm,
    )
    ax.set_xticks(np.arange(len(kinds)), kinds)
    ax.set_yticks(np.arange(len(blocks)), blocks)
    ax.invert_yaxis()  # first block on top, as in plot_mask_heatmap
    ax.set_xlabel("tensor kind")
    ax.set_ylabel("block")
    label = MASK_VARIABLES.get(variable, variable)
    ax.set_title(f"{label}\nat step {step}", fontsize="medium")
    fig.colorbar(mesh, ax=ax, label=label)
    return fig


def _crop(fisher: xr.Dataset, image: xr.DataArray, matrix: str) -> xr.DataArray:
    """Drop the NaN padding of a small matrix's image (``image_rows`` / ``image_cols`` if
    recorded, else all-NaN rows and columns)."""
    if "image_rows" in fisher and "image_cols" in fisher:
        rows = int(fisher["image_rows"].sel(matrix=matrix).max())
        cols = int(fisher["image_cols"].sel(matrix=matrix).max())
        return image.isel(row=slice(0, rows), col=slice(0, cols))
    keep_r = image.notnull().any("col")
    keep_c = image.notnull().any("row")
    if bool(keep_r.any()):
        image = image.isel(row=np.flatnonzero(keep_r.values), col=np.flatnonzero(keep_c.values))
    return image


def plot_mask_image(fisher: xr.Dataset, matrix: str, step: int | None = None) -> Figure:
    """The pooled mask of one weight matrix at one step (``None``: the last step).

    Rows are output features, columns input features (both pooled); colour is the fraction of
    selected entries in each pooled cell, on [0, 1].
    """
    da = _check(fisher, "mask_image")
    matrices = [str(m) for m in da["matrix"].values]
    if matrix not in matrices:
        raise DataError(f"Unknown matrix {matrix!r}; the records have {matrices}.")
    image, step = select_step(da.sel(matrix=matrix), step)
    image = _crop(fisher, image.transpose("row", "col"), matrix)
    fig = new_figure((4.8, 4.2))
    ax = fig.add_subplot()
    im = ax.imshow(
        np.asarray(image.values, dtype=float),
        cmap=MASK,
        vmin=0.0,
        vmax=1.0,
        interpolation="nearest",
        aspect="auto",
        origin="upper",
    )
    ax.set_xlabel("input features (pooled columns)")
    ax.set_ylabel("output features (pooled rows)")
    ax.set_title(mask_image_title(matrix, step), fontsize="medium")
    fig.colorbar(im, ax=ax, label="local mask density (fraction selected)")
    return fig


def overlap_series(
    fisher: xr.Dataset, blocks: Sequence[str] | None = None, tensor: str | None = None
) -> dict[str, tuple[xr.DataArray, xr.DataArray, xr.DataArray]]:
    """``{name: (jaccard_previous, jaccard_first, union_density)}``, each on ``(step,)``.

    ``blocks=None``: one entry for the whole backbone, from the recorded ``total_*`` variables
    (entry-weighted) when present and no ``tensor`` is picked, else the unweighted mean over
    blocks.
    """
    names = ("jaccard_previous", "jaccard_first", "union_density")
    if blocks is None:
        if tensor is None and all(f"total_{n}" in fisher for n in names):
            return {"backbone": tuple(fisher[f"total_{n}"] for n in names)}
        return {"all blocks (mean)": tuple(
            aggregate_tensors(fisher, n, tensor).mean("block") for n in names)}
    parts = [aggregate_tensors(fisher, n, tensor) for n in names]
    known = [str(b) for b in parts[0]["block"].values]
    unknown = [b for b in blocks if b not in known]
    if unknown:
        raise DataError(f"Unknown block(s) {unknown}; the records have {known}.")
    return {b: tuple(p.sel(block=b) for p in parts) for b in blocks}


def plot_overlap_curves(
    fisher: xr.Dataset, blocks: Sequence[str] | None = None, tensor: str | None = None
) -> Figure:
    """Mask stability over training: two panels sharing the step axis.

    Top: Jaccard overlap with the previous mask (solid) and with the first mask (dashed), on
    [0, 1]. Bottom: union density (fraction of entries ever selected). One colour per block in
    ``blocks``; ``None`` draws one line for the whole backbone (see :func:`overlap_series`).
    Tensor kinds are aggregated as in :func:`aggregate_tensors` unless ``tensor`` picks one.
    """
    series = overlap_series(fisher, blocks, tensor)

    fig = new_figure((6.5, 5.0))
    top, bottom = fig.subplots(2, 1, sharex=True)
    for i, (name, (p, f, u)) in enumerate(series.items()):
        color = OKABE_ITO[(i + 3) % len(OKABE_ITO)]
        top.plot(p["step"], p, color=color, ls="-", marker=".", label=name)
        top.plot(f["step"], f, color=color, ls="--", marker=".")
        bottom.plot(u["step"], u, color=color, ls="-", marker=".", label=name)
    top.set_ylim(0.0, 1.02)
    top.set_ylabel("Jaccard overlap")
    top.set_title(overlap_curves_title(tensor), fontsize="medium")
    style_legend = [
        Line2D([], [], color="0.3", ls="-", label="vs previous mask"),
        Line2D([], [], color="0.3", ls="--", label="vs first mask"),
    ]
    top.legend(handles=style_legend, loc="lower left", fontsize="small")
    bottom.set_ylim(bottom=0.0)
    bottom.set_ylabel("union density")
    bottom.set_xlabel("training step")
    if len(series) > 1:
        bottom.legend(loc="upper left", fontsize="small", ncols=2)
    return fig


def mask_image_png(fisher: xr.Dataset, matrix: str, step: int | None = None, *,
                   dpi: int = PNG_DPI, theme: str = "light") -> bytes:
    """:func:`plot_mask_image` as PNG bytes for a page ``theme``
    (:func:`~wpeft.viz.style.themed_png`)."""
    return themed_png(lambda: plot_mask_image(fisher, matrix, step), theme=theme, dpi=dpi)


def mask_image_title(matrix: str, step: int) -> str:
    """The title of :func:`plot_mask_image` (also the alt text of its pre-rendered image)."""
    return f"{matrix} mask at step {step}"


def overlap_curves_title(tensor: str | None = None) -> str:
    """The title of :func:`plot_overlap_curves` (also the alt text of its pre-rendered image)."""
    return "mask overlap over training" + (f" ({tensor} tensors)" if tensor else "")


def overlap_curves_png(fisher: xr.Dataset, blocks: Sequence[str] | None = None,
                       tensor: str | None = None, *, dpi: int = PNG_DPI,
                       theme: str = "light") -> bytes:
    """:func:`plot_overlap_curves` as PNG bytes for a page ``theme``
    (:func:`~wpeft.viz.style.themed_png`)."""
    return themed_png(lambda: plot_overlap_curves(fisher, blocks, tensor), theme=theme, dpi=dpi)
