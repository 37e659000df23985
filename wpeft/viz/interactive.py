"""HoloViews versions of the wpeft views, for notebooks and the Panel dashboard.

Same inputs as the matplotlib views (see :mod:`wpeft.viz.fisher`, :mod:`~wpeft.viz.attention`,
:mod:`~wpeft.viz.skill`), same colormaps and colour limits (except that
:func:`hv_skill_comparison` draws A and B of signed fields, e.g. bias, diverging about zero as
:func:`hv_skill_map` does); each returns a HoloViews object
(nothing is rendered or shown). Colour limits are set as the value dimension's ``range``, so they
hold for any backend; styling options are given for the bokeh backend (hover, colourbars).

Earth maps (``earth=True``) are GeoViews elements: the field as a ``gv.Image`` (``gv.QuadMesh`` on
an irregular grid) in ``crs=PlateCarree`` and local coastlines as one ``gv.Path`` (lines separated by
NaN rows) read from the same shapefile as the static maps
(:func:`wpeft.viz.maps.coastline_lines`; never ``gv.feature``, which downloads), clipped to the
grid and in its longitude frame. They are drawn in PlateCarree (:data:`MAP_PROJECTION`), the
projection of the cartopy figures (:func:`wpeft.viz.maps.map_axes`), so a map looks the same in
the dashboard and in a figure. GeoViews reprojects the raster only when its longitudes leave
-180..180 (a global 0..360 grid) and projects the coastline at every draw: a global Earth map
draws in ~0.26 s at 32 x 64 and at 180 x 360 alike (a synthetic one in ~0.04 s, the UK box in
~0.1 s; ``benchmarks/bench_interactive_maps.py``, 2 CPU cores), under the 0.5 s where caching
a projected copy would pay, so nothing is cached. (Robinson is not offered:
GeoViews 1.15 with cartopy 0.26 fails to draw it in bokeh, ``KeyError: 'lon_0'``.) The synthetic
world (``earth=False``) stays a plain ``hv.Image`` in longitude/latitude with no coastline.

Layout: every plot fills its container's width (``responsive``, :func:`_sized`); maps keep the
aspect of their lon/lat extent, other plots have a fixed height.

Needs ``holoviews`` and ``bokeh`` (the ``viz`` extra); Earth maps also ``geoviews`` (``app``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from wpeft.viz.attention import ATTENTION_LABEL, _where, select_block, variable_axis
from wpeft.viz.fisher import (
    _UNIT_RANGE,
    MASK_VARIABLES,
    _crop,
    aggregate_tensors,
    overlap_series,
    select_step,
)
from wpeft.viz.maps import (
    coastline_lines,
    display_longitudes,
    grid_extent,
    is_global,
    latlon_field,
)
from wpeft.viz.skill import (
    SIZE_AXES,
    _as_difference,
    _is_signed,
    budget_table,
    not_significant_label,
)
from wpeft.viz.style import (
    DIVERGING,
    MASK,
    OKABE_ITO,
    SEQUENTIAL,
    long_name,
    method_style,
    pretty_units,
    sequential_norm,
    symmetric_limits,
    units_of,
)

__all__ = [
    "MAP_PROJECTION",
    "hv_budget_vs_skill",
    "hv_curves",
    "hv_mask_heatmap",
    "hv_mask_image",
    "hv_overlap_curves",
    "hv_patch_attention",
    "hv_prompt_map",
    "hv_scorecard",
    "hv_skill_comparison",
    "hv_skill_map",
    "hv_variable_attention",
]

_MARKERS = {"o": "circle", "s": "square", "D": "diamond", "^": "triangle", "v": "inverted_triangle",
            "P": "plus", "X": "x", "*": "star", "<": "triangle", ">": "triangle", "h": "hex"}


def _hv() -> Any:
    """HoloViews with the bokeh backend's options registered (no notebook output)."""
    import holoviews as hv

    if "bokeh" not in hv.Store.renderers:
        import holoviews.plotting.bokeh  # registers the backend's options
    return hv


def _limits(
    values: Any, vmin: float | None = None, vmax: float | None = None
) -> tuple[float, float]:
    norm = sequential_norm(values, vmin, vmax)
    return float(norm.vmin), float(norm.vmax)


def _regular(values: np.ndarray) -> bool:
    """Evenly spaced to hv.Image's default relative tolerance (1e-3)."""
    step = np.diff(np.asarray(values, dtype=float))
    return step.size == 0 or bool(np.allclose(step, step[0], rtol=1e-3, atol=0.0))


def log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks of a log axis over ``[lo, hi]`` (> 0): the 1-2-5 values of each decade inside it
    plus the nearest one beyond each end (so a padded axis is labelled at both ends)."""
    if not (0 < lo <= hi and np.isfinite(hi)):
        raise ValueError(f"A log axis needs 0 < lo <= hi; got lo={lo}, hi={hi}.")
    values = [m * 10.0**k for k in range(int(np.floor(np.log10(lo))) - 1,
                                         int(np.ceil(np.log10(hi))) + 2) for m in (1, 2, 5)]
    values = [float(f"{v:.6g}") for v in values]
    inside = [v for v in values if lo <= v <= hi]
    below = [v for v in values if v < lo][-1:]
    above = [v for v in values if v > hi][:1]
    return below + inside + above


#: Projection of Earth maps, as in :func:`wpeft.viz.maps.map_axes` (a ``cartopy.crs`` name).
MAP_PROJECTION = "PlateCarree"
#: Smallest height (px) of a map; other plots' heights are given per function.
MAP_MIN_HEIGHT = 180


def _sized(height: int | None = None, *, aspect: float | None = None) -> dict[str, Any]:
    """The shared bokeh size options: fill the container's width (``responsive``) at a fixed
    ``height`` (px), or, with ``aspect`` (width / height), keep that aspect at any width."""
    opts: dict[str, Any] = {"responsive": True, "backend": "bokeh"}
    if aspect is not None:
        opts.update(aspect=aspect, min_height=MAP_MIN_HEIGHT)
    else:
        opts.update(height=height, min_height=height)
    return opts


def _map_aspect(field: xr.DataArray) -> float:
    """Plot width / height of a map: the extent's lon / lat span (clipped to 0.8..2.4, so thin
    boxes stay usable) with room for the colour bar."""
    lon0, lon1, lat0, lat1 = grid_extent(display_longitudes(latlon_field(field)))
    return 1.15 * float(np.clip((lon1 - lon0) / max(lat1 - lat0, 1e-6), 0.8, 2.4))


def _gv() -> tuple[Any, Any]:
    """GeoViews (bokeh plots registered) and ``cartopy.crs``; ImportError naming the extra."""
    _hv()
    try:
        import cartopy.crs as ccrs
        import geoviews as gv
        import geoviews.plotting.bokeh  # registers the geo plot classes
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Earth maps in HoloViews need geoviews and cartopy: pip install -e '.[app]' "
            "(or earth=False)."
        ) from e
    return gv, ccrs


def _coast_path(field: xr.DataArray) -> np.ndarray:
    """Local coastlines of ``field``'s extent as one (n, 2) array, lines split by NaN rows
    (one path renders far faster than hundreds)."""
    lines = coastline_lines(grid_extent(field), fine=not is_global(field))
    gap = np.full((1, 2), np.nan)
    return np.concatenate([p for line in lines for p in (line, gap)]) if lines else gap


def _image(field: xr.DataArray, value: Any, *, earth: bool, cmap: str, title: str = "") -> Any:
    """hv.Image of a (latitude, longitude) field (hv.QuadMesh if the grid is irregular); with
    ``earth`` a GeoViews overlay of gv.Image / gv.QuadMesh (``crs`` PlateCarree) and a gv.Path
    of local coastlines, drawn in :data:`MAP_PROJECTION`."""
    hv = _hv()
    field = display_longitudes(latlon_field(field)).sortby("latitude")
    lon, lat = field["longitude"].values, field["latitude"].values
    xdim = hv.Dimension("longitude", label="longitude", unit="°E")
    ydim = hv.Dimension("latitude", label="latitude", unit="°N")
    data = (lon, lat, np.asarray(field.values, dtype=float))
    regular = _regular(lon) and _regular(lat)
    size = _sized(aspect=_map_aspect(field))
    opts = {"cmap": cmap, "colorbar": True, "tools": ["hover"], "title": title, **size}
    if not earth:
        element = hv.Image if regular else hv.QuadMesh
        return element(data, kdims=[xdim, ydim], vdims=[value], label=title).opts(**opts)
    gv, ccrs = _gv()
    crs = projection = ccrs.PlateCarree()  # MAP_PROJECTION
    element = gv.Image if regular else gv.QuadMesh
    img = element(data, kdims=[xdim, ydim], vdims=[value], crs=crs, label=title)
    coast = gv.Path([_coast_path(field)], kdims=[xdim, ydim], crs=crs)
    return (img.opts(projection=projection, **opts)
            * coast.opts(color="black", line_width=0.7, backend="bokeh")
            ).opts(title=title, projection=projection, **size)


# --------------------------------------------------------------------------- Fisher masks


def hv_mask_heatmap(
    fisher: xr.Dataset, variable: str = "density", tensor: str | None = None
) -> Any:
    """hv.HeatMap, kdims ``(step, block)``, vdim ``variable`` (tensor kinds aggregated as in
    :func:`wpeft.viz.fisher.aggregate_tensors`). Steps are categorical labels (``"10"``) in
    record order, so every record gets one equal-width column."""
    hv = _hv()
    data = aggregate_tensors(fisher, variable, tensor)
    df = data.to_dataframe(name=variable).reset_index()[["step", "block", variable]]
    df["block"] = df["block"].astype(str)
    # steps as labels: one equal-width column per record (numeric steps leave gaps and uneven
    # cells when the last record is off the regular interval)
    df = df.sort_values("step", kind="stable")
    df["step"] = df["step"].astype(int).astype(str)
    lo, hi = (0.0, 1.0) if variable in _UNIT_RANGE else _limits(df[variable], vmin=0.0)
    vdim = hv.Dimension(variable, label=MASK_VARIABLES.get(variable, variable), range=(lo, hi))
    kdims = [hv.Dimension("step", label="training step"), hv.Dimension("block")]
    which = tensor or (
        "sum over tensor kinds" if variable == "fisher_mass" else "mean over tensor kinds"
    )
    return hv.HeatMap(df, kdims=kdims, vdims=[vdim]).opts(
        cmap=SEQUENTIAL, colorbar=True, tools=["hover"], invert_yaxis=True,
        title=f"{vdim.label} ({which})", **_sized(max(250, 22 * df["block"].nunique())),
    )


def hv_mask_image(fisher: xr.Dataset, matrix: str, step: int | None = None) -> Any:
    """hv.Image of one matrix's pooled mask, kdims ``(col, row)``, vdim ``mask_density`` on
    [0, 1]. ``step=None`` gives an hv.HoloMap over all steps (a slider in Panel/bokeh)."""
    hv = _hv()
    da = fisher["mask_image"].sel(matrix=matrix)
    vdim = hv.Dimension("mask_density", label="local mask density", range=(0.0, 1.0))
    kdims = [hv.Dimension("col", label="input features (pooled)"),
             hv.Dimension("row", label="output features (pooled)")]

    def one(s: int) -> Any:
        img = _crop(fisher, select_step(da, s)[0].transpose("row", "col"), matrix)
        data = (img["col"].values if "col" in img.coords else np.arange(img.sizes["col"]),
                img["row"].values if "row" in img.coords else np.arange(img.sizes["row"]),
                np.asarray(img.values, dtype=float))
        return hv.Image(data, kdims=kdims, vdims=[vdim]).opts(
            cmap=MASK, colorbar=True, invert_yaxis=True, tools=["hover"],
            title=f"{matrix} mask at step {s}", **_sized(380),
        )

    if step is not None:
        return one(step)
    steps = [int(s) for s in da["step"].values]
    step_dim = hv.Dimension("step", label="training step")
    return hv.HoloMap({s: one(s) for s in steps}, kdims=[step_dim])


def hv_overlap_curves(
    fisher: xr.Dataset, blocks: Sequence[str] | None = None, tensor: str | None = None
) -> Any:
    """hv.Layout of two overlays of hv.Curve over ``step``: Jaccard overlap (vs previous, vs
    first; vdim ``jaccard`` on [0, 1]) and ``union_density``. ``blocks=None``: block mean."""
    hv = _hv()
    series = overlap_series(fisher, blocks, tensor)
    step = hv.Dimension("step", label="training step")
    jac = hv.Dimension("jaccard", label="Jaccard overlap", range=(0.0, 1.0))
    union = hv.Dimension("union_density", label=MASK_VARIABLES["union_density"])
    top, bottom = [], []
    for i, (b, (jp, jf, s)) in enumerate(series.items()):
        color = OKABE_ITO[(i + 3) % len(OKABE_ITO)]
        for da, dash, what in ((jp, "solid", "vs previous"), (jf, "dashed", "vs first")):
            top.append(hv.Curve((da["step"].values, da.values), kdims=[step], vdims=[jac],
                                label=f"{b} {what}").opts(color=color, line_dash=dash,
                                                          backend="bokeh"))
        bottom.append(hv.Curve((s["step"].values, s.values), kdims=[step], vdims=[union],
                               label=b).opts(color=color, backend="bokeh"))
    opts = {"tools": ["hover"], "legend_position": "right", **_sized(260)}
    return (hv.Overlay(top).opts(title="mask overlap over training", **opts)
            + hv.Overlay(bottom).opts(title="union density", **opts)).cols(1)


# --------------------------------------------------------------------------- prompt attention


def hv_variable_attention(attention: xr.Dataset, block: Any, *, step: int | None = None) -> Any:
    """hv.HeatMap, kdims ``(variable_k, variable_q)``, vdim ``attention``."""
    hv = _hv()
    da = select_block(attention, "external_var_var", block, step)
    where = _where(block, da)
    df = da.to_dataframe(name="attention").reset_index()[["variable_k", "variable_q", "attention"]]
    vdim = hv.Dimension("attention", label=ATTENTION_LABEL, range=_limits(df["attention"], 0.0))
    axis = variable_axis(attention)
    kdims = [hv.Dimension("variable_k", label=f"key {axis}"),
             hv.Dimension("variable_q", label=f"query {axis}")]
    return hv.HeatMap(df, kdims=kdims, vdims=[vdim]).opts(
        cmap=SEQUENTIAL, colorbar=True, tools=["hover"], invert_yaxis=True, xrotation=45,
        title=f"external attention, {where}", **_sized(460),
    )


def hv_patch_attention(
    attention: xr.Dataset,
    block: Any,
    variable: str | Sequence[str] | None = None,
    *,
    step: int | None = None,
) -> Any:
    """``variable=None``: hv.HeatMap, kdims ``(position, variable)`` (position = flattened
    ``t, ph, pw`` index), vdim ``attention``. Else an hv.Layout of hv.Image per (variable, t),
    kdims ``(pw, ph)``, all on one colour range."""
    hv = _hv()
    da = select_block(attention, "external_var_patch", block, step)
    where = _where(block, da)
    da = da.transpose("variable", "t", "ph", "pw")
    nt, nph, npw = (da.sizes[d] for d in ("t", "ph", "pw"))
    if variable is None:
        names = [str(v) for v in da["variable"].values]
        flat = np.asarray(da.values, dtype=float).reshape(len(names), -1)
        pos, var = np.meshgrid(np.arange(flat.shape[1]), names)
        vdim = hv.Dimension("attention", label=ATTENTION_LABEL, range=_limits(flat, 0.0))
        kdims = [hv.Dimension("position", label=f"patch position (t, ph, pw; {nt}×{nph}×{npw})"),
                 hv.Dimension("variable", label=variable_axis(attention))]
        return hv.HeatMap((pos.ravel(), var.ravel(), flat.ravel()), kdims=kdims, vdims=[vdim]).opts(
            cmap=SEQUENTIAL, colorbar=True, tools=["hover"], invert_yaxis=True,
            title=f"external attention over patch positions, {where}",
            **_sized(max(220, 28 * len(names))),
        )
    wanted = [variable] if isinstance(variable, str) else list(variable)
    sub = da.sel(variable=wanted)
    vdim = hv.Dimension("attention", label=ATTENTION_LABEL, range=_limits(sub.values, 0.0))
    kdims = [hv.Dimension("pw"), hv.Dimension("ph")]
    panels = []
    for name in wanted:
        for t in range(nt):
            img = np.asarray(sub.sel(variable=name).isel(t=t).values, dtype=float)
            panels.append(hv.Image((np.arange(npw), np.arange(nph), img), kdims=kdims,
                                   vdims=[vdim]).opts(
                cmap=SEQUENTIAL, colorbar=True, invert_yaxis=True, tools=["hover"],
                title=f"{name}, t={t}", **_sized(200)))
    return hv.Layout(panels).cols(nt)


def hv_prompt_map(
    attention: xr.Dataset, block: Any, prompt: Any, *, earth: bool = False, step: int | None = None
) -> Any:
    """hv.Image, kdims ``(longitude, latitude)``, vdim ``attention``; with ``earth`` an
    hv.Overlay of that image and an hv.Path of local coastlines."""
    hv = _hv()
    field = select_block(attention, "prompt_map", block, step)
    where = _where(block, field)
    field = field.sel(prompt=prompt)
    vdim = hv.Dimension("attention", label=ATTENTION_LABEL, range=_limits(field.values, 0.0))
    return _image(field, vdim, earth=earth, cmap=SEQUENTIAL,
                  title=f"attention paid to prompt {prompt}, {where}")


# --------------------------------------------------------------------------- skill


def _value_dim(da: xr.DataArray, name: str, rng: tuple[float, float]) -> Any:
    hv = _hv()
    return hv.Dimension(name, label=long_name(da, name), unit=pretty_units(units_of(da)) or None,
                        range=rng)


def hv_skill_map(
    field: xr.DataArray | xr.Dataset,
    *,
    earth: bool = False,
    title: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    variable: str | None = None,
) -> Any:
    """hv.Image, kdims ``(longitude, latitude)``, vdim named after the field (limits as in
    :func:`wpeft.viz.skill.plot_skill_map`; signed fields symmetric about zero)."""
    da = latlon_field(field, variable)
    signed = vmin < 0 if vmin is not None else _is_signed(da.values)
    if signed:
        given = [abs(v) for v in (vmin, vmax) if v is not None]
        rng, cmap = symmetric_limits(da.values, vmax=max(given) if given else None), DIVERGING
    else:
        rng, cmap = _limits(da.values, vmin, vmax), SEQUENTIAL
    vdim = _value_dim(da, str(da.name or "value"), rng)
    return _image(da, vdim, earth=earth, cmap=cmap, title=title or vdim.label)


def hv_skill_comparison(
    field_a: xr.DataArray | xr.Dataset,
    field_b: xr.DataArray | xr.Dataset,
    difference: xr.Dataset | xr.DataArray | None = None,
    *,
    labels: tuple[str, str] = ("WeatherPEFT", "Full-Tuning"),
    earth: bool = False,
    variable: str | None = None,
) -> Any:
    """hv.Layout of three maps: A, B (one vdim range) and A − B (symmetric range, ``RdBu_r``),
    the last overlaid with hv.Points (stipples) at non-significant grid points (if any; labelled
    with the test, :func:`~wpeft.viz.skill.not_significant_label`). A and B use
    ``viridis``, or ``RdBu_r`` on a range symmetric about zero when they hold both signs
    (bias)."""
    hv = _hv()
    a = latlon_field(field_a, variable)
    b = latlon_field(field_b, variable)
    diff, significant = _as_difference(a, b, difference, variable)
    name = str(a.name or "value")
    both = np.concatenate([np.ravel(a.values), np.ravel(b.values)])
    if _is_signed(both):
        rng, cmap = symmetric_limits(both), DIVERGING
    else:
        rng, cmap = _limits(both), SEQUENTIAL
    vdim = _value_dim(a, name, rng)
    ddim = hv.Dimension(f"{name}_difference", label=f"Δ {vdim.label}", unit=vdim.unit,
                        range=symmetric_limits(diff.values))
    panels = [
        _image(a, vdim, earth=earth, cmap=cmap, title=labels[0]),
        _image(b, vdim, earth=earth, cmap=cmap, title=labels[1]),
    ]
    d = _image(diff, ddim, earth=earth, cmap=DIVERGING, title=f"{labels[0]} − {labels[1]}")
    if significant is not None and not bool(significant.all()):
        ns = display_longitudes(~significant.astype(bool)).stack(point=("latitude", "longitude"))
        ns = ns[ns.values]
        xy = (ns["longitude"].values, ns["latitude"].values)
        label = not_significant_label(significant)
        if earth:  # in the map's crs, so the dots follow the projected raster
            gv, ccrs = _gv()
            pts = gv.Points(xy, kdims=["longitude", "latitude"], crs=ccrs.PlateCarree(),
                            label=label)
        else:
            pts = hv.Points(xy, kdims=["longitude", "latitude"], label=label)
        d = (d * pts.opts(color="black", size=2, marker="dot", backend="bokeh")).opts(
            legend_position="bottom", **_sized(aspect=_map_aspect(diff)))  # legend off the map
    return hv.Layout(panels + [d]).cols(3)


def hv_budget_vs_skill(
    table: Any,
    *,
    score: str = "score",
    score_label: str | None = None,
    methods: Sequence[str] | None = None,
    title: str = "",
    size: str = "budget_fraction",
) -> Any:
    """hv.Overlay of one hv.Scatter per method (every run), kdim ``budget_percent`` (log x: the
    ``size`` of :data:`~wpeft.viz.skill.SIZE_AXES` in %, per-step k by default), vdim ``score``,
    plus an hv.Curve through the method's mean score per budget; ``title`` names the plot."""
    hv = _hv()
    df = budget_table(table, score, size)
    label = score_label or df.attrs["score_label"]
    order = list(methods) if methods is not None else list(dict.fromkeys(map(str, df["method"])))
    styles = method_style(order)
    x = hv.Dimension("budget_percent", label=SIZE_AXES[size])
    y = hv.Dimension("score", label=label)
    layers = []
    for m in order:
        runs = df[df["method"] == m]
        if runs.empty:
            continue
        mean = runs.groupby("budget_percent")["score"].mean()
        pts = (runs["budget_percent"].values, runs["score"].values)
        color = styles[m]["color"]
        layers.append(hv.Curve((mean.index.values, mean.values), kdims=[x], vdims=[y],
                               label=m).opts(color=color, backend="bokeh"))
        layers.append(hv.Scatter(pts, kdims=[x], vdims=[y], label=m).opts(
            color=color, size=9, marker=_MARKERS.get(styles[m]["marker"], "circle"),
            tools=["hover"], backend="bokeh"))
    ticks = log_ticks(float(df["budget_percent"].min()), float(df["budget_percent"].max()))
    return hv.Overlay(layers).opts(logx=True, legend_position="right", padding=0.1, title=title,
                                   xticks=[(t, f"{t:g}") for t in ticks], **_sized(420))


_DASHES = ("solid", "dashed", "dotted", "dotdash")


def hv_curves(
    frame: Any,
    column: str = "loss",
    *,
    split: str = "train",
    logy: bool = False,
    smoothing: float = 0.0,
    title: str = "",
) -> Any:
    """hv.Overlay of one hv.Curve per run (kdim ``step``, vdim ``value``, label the run) of
    ``column`` in ``split`` lines of a curves table (:func:`wpeft.viz.curves.curve_lines`:
    the same lines, EMA-smoothed with weight ``smoothing``, as the static
    :func:`~wpeft.viz.curves.plot_training_curves`); colour per method, dash per run of one
    method.

    Raises:
        DataError: no such lines, or ``logy`` with a value <= 0.
    """
    from wpeft.errors import DataError
    from wpeft.viz.curves import curve_label, curve_lines

    hv = _hv()
    lines = curve_lines(frame, column, split=split, smoothing=smoothing)
    if logy and any((values <= 0).any() for _, _, _, values in lines):
        raise DataError(f"{curve_label(column, split)} has values <= 0: a log y axis cannot "
                        "show them; choose the linear axis.")
    styles = method_style(list(dict.fromkeys(m for _, m, _, _ in lines)))
    seen: dict[str, int] = {}
    x = hv.Dimension("step", label="optimiser step")
    y = hv.Dimension("value", label=curve_label(column, split))
    layers = []
    for run, method, steps, values in lines:
        i = seen[method] = seen.get(method, -1) + 1
        layers.append(hv.Curve((steps, values), kdims=[x], vdims=[y], label=run).opts(
            color=styles[method]["color"], line_dash=_DASHES[i % len(_DASHES)], line_width=2,
            tools=["hover"], backend="bokeh"))
    return hv.Overlay(layers).opts(logy=logy, legend_position="right", title=title,
                                   show_grid=True, **_sized(400))


def scorecard_colors(n: int) -> list[str]:
    """``n`` colours sampled evenly from :data:`~wpeft.viz.style.DIVERGING` (one per bin)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps[DIVERGING]
    return [to_hex(cmap((i + 0.5) / n)) for i in range(n)]


def scorecard_colorbar(edges: np.ndarray) -> dict[str, Any]:
    """Bokeh colour-bar options of :func:`hv_scorecard`: the colour is the bin index, so a
    tick sits between bins i − 1 and i (at i − 0.5) labelled with the bin edge ``edges[i − 1]``
    (%)."""
    from bokeh.models import FixedTicker

    ticks = [i + 0.5 for i in range(len(edges))]
    labels = {tick: f"{e:+g}" for tick, e in zip(ticks, edges)}
    return {"ticker": FixedTicker(ticks=ticks), "major_label_overrides": labels}


#: The least height (px) of :func:`hv_scorecard`: its colour bar's 13 bins stay readable on a
#: card of one or two runs (a card grows by 26 px per run).
SCORECARD_MIN_HEIGHT = 260

#: The colour bar's title of :func:`hv_scorecard` (the sign convention, as the static figure's).
SCORECARD_CLABEL = "difference to the reference (%), negative / blue = better"


def hv_scorecard(card: xr.Dataset, *, title: str = "") -> Any:
    """hv.HeatMap of a scorecard (:func:`wpeft.runs.scorecard.scorecard`), laid out as the
    static :func:`~wpeft.viz.scorecard.plot_scorecard`: rows the runs (the reference on top;
    the card grows downwards with them), columns the scores in the card's order, colour the
    ``oriented_difference`` binned at ±``attrs["bins"]`` %
    (13 colours of the diverging map for the default bins, blue = better than the reference),
    cell labels the absolute score, with a "•" where the difference is significant.

    vdims: ``bin`` (index of the colour, NaN where no score), ``value``,
    ``oriented_difference``, ``relative_difference``, ``significant`` and ``label``.

    Raises:
        DataError: ``card`` is not a scorecard.
    """
    import pandas as pd

    from wpeft.errors import DataError
    from wpeft.runs.scorecard import SCORECARD_BINS

    needed = ("value", "oriented_difference", "relative_difference", "significant")
    if any(v not in card for v in needed) or {"run", "score"} - set(card.dims):
        raise DataError("hv_scorecard needs wpeft.runs.scorecard.scorecard(...) output on "
                        f"(run, score) with {list(needed)}.")
    hv = _hv()
    bins = [float(b) for b in card.attrs.get("bins", SCORECARD_BINS)]
    edges = np.array([-b for b in reversed(bins)] + bins)
    runs = [str(r) for r in card["run"].values]
    scores = [str(s) for s in card["score"].values]

    def flat(name: str) -> np.ndarray:  # (run, score) in run-major order: one row per cell
        return card[name].transpose("run", "score").values.reshape(-1)

    value, diff = flat("value").astype(np.float64), flat("oriented_difference").astype(np.float64)
    sig = flat("significant").astype(bool)
    index = np.where(np.isfinite(diff),
                     np.searchsorted(edges, np.nan_to_num(diff), side="right"), np.nan)
    label = [("–" if not np.isfinite(v) else f"{v:.3g}") + (" •" if s else "")
             for v, s in zip(value.tolist(), sig.tolist())]
    cells = pd.DataFrame({
        "score": np.tile(scores, len(runs)), "run": np.repeat(runs, len(scores)),
        "bin": index, "value": value, "oriented_difference": diff,
        "relative_difference": flat("relative_difference").astype(np.float64),
        "significant": sig, "label": label,
    })
    vdims = [hv.Dimension("bin", range=(-0.5, len(edges) + 0.5)), "value",
             hv.Dimension("oriented_difference", unit="%"),
             hv.Dimension("relative_difference", unit="%"), "significant", "label"]
    heat = hv.HeatMap(cells, kdims=["score", "run"], vdims=vdims)
    labels = hv.Labels(cells, kdims=["score", "run"], vdims=["label"])
    heat = heat.opts(cmap=scorecard_colors(len(edges) + 1), clim=(-0.5, len(edges) + 0.5),
                     colorbar=True, colorbar_opts=scorecard_colorbar(edges),
                     clabel=SCORECARD_CLABEL, tools=["hover"],
                     invert_yaxis=True, xaxis="top", xrotation=30, title=title,
                     **_sized(max(SCORECARD_MIN_HEIGHT, 160 + 26 * len(runs))))
    return heat * labels.opts(text_font_size="9pt", text_color="black", backend="bokeh")
