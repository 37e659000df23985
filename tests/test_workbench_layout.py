"""Layout of the interactive views and the workbench page: GeoViews Earth maps over the local
coastlines, responsive sizes, the budget plot's legend and log ticks, the page theme, and the
``wpeft lab`` command line (never launched here)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import test_viz
from test_viz import _runs, make_attention, make_fisher, make_skill

from wpeft import cli
from wpeft.errors import ConfigError
from wpeft.viz import maps
from wpeft.viz.style import sequential_norm

hv = pytest.importorskip("holoviews")
gv = pytest.importorskip("geoviews", reason="geoviews is not installed (pip install -e '.[app]')")
ccrs = pytest.importorskip("cartopy.crs")

from wpeft.viz import interactive

earth_data = test_viz.earth_data  # fixtures: local coastline data, no network
no_network = test_viz.no_network

UK_LAT = np.linspace(50.25, 58.0, 32)
UK_LON = np.linspace(350.0, 359.75, 40)


def _render(obj):
    return hv.renderer("bokeh").get_plot(obj).state


def _joined(lines: list[np.ndarray]) -> np.ndarray:
    gap = np.full((1, 2), np.nan)
    return np.concatenate([p for line in lines for p in (line, gap)])


# --------------------------------------------------------------------------- Earth maps


@pytest.mark.parametrize("grid", ["global", "uk"])
def test_earth_map_is_geoviews_with_the_local_coastline(grid, earth_data, no_network) -> None:
    lat, lon = (None, None) if grid == "global" else (UK_LAT, UK_LON)
    a, _, _ = make_skill() if grid == "global" else make_skill(lat=lat, lon=lon)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "no local coastline data" would fail
        overlay = interactive.hv_skill_map(a, earth=True)
    img, coast = overlay
    assert isinstance(img, gv.Image) and isinstance(coast, gv.Path)
    assert img.crs == ccrs.PlateCarree() and coast.crs == ccrs.PlateCarree()
    assert overlay.opts.get().kwargs["projection"] == ccrs.PlateCarree()  # as maps.map_axes
    field = maps.display_longitudes(a).sortby("latitude")
    expected = _joined(maps.coastline_lines(maps.grid_extent(field),
                                            fine=not maps.is_global(field)))
    np.testing.assert_array_equal(coast.array(), expected)  # same lines, same frame
    # the colour scale is that of the cartopy figure
    assert img.opts.get().kwargs["cmap"] == "viridis"
    ref = sequential_norm(a.values)
    assert img.vdims[0].range == (float(ref.vmin), float(ref.vmax))
    state = _render(overlay)
    glyphs = {type(r.glyph).__name__ for r in state.renderers}
    assert glyphs == {"Image", "MultiLine"}
    assert no_network == []


def test_regional_earth_map_is_drawn_in_its_own_box(earth_data, no_network) -> None:
    a, _, _ = make_skill(lat=UK_LAT, lon=UK_LON)
    state = _render(interactive.hv_skill_map(a, earth=True))
    # PlateCarree keeps degrees: the UK box (350..359.75 E) is shown as -10.1..-0.1
    assert state.x_range.start == pytest.approx(-10.125, abs=0.01)
    assert state.x_range.end == pytest.approx(-0.125, abs=0.01)
    assert state.y_range.start == pytest.approx(50.125, abs=0.01)


def test_synthetic_world_map_has_no_coastline() -> None:
    a, _, _ = make_skill()
    img = interactive.hv_skill_map(a, earth=False)
    assert type(img) is hv.Image  # not a GeoViews element, not an overlay
    assert not isinstance(img, gv.Image)
    assert [type(r.glyph).__name__ for r in _render(img).renderers] == ["Image"]


def test_earth_comparison_stipples_share_the_map_crs(earth_data, no_network) -> None:
    a, b, diff = make_skill()
    layout = interactive.hv_skill_comparison(a, b, diff, earth=True)
    d = layout.values()[2]
    pts = [el for el in d if isinstance(el, hv.Points)]
    assert len(pts) == 1 and isinstance(pts[0], gv.Points)
    assert pts[0].crs == ccrs.PlateCarree()
    assert len(pts[0]) == int((~diff.significant).sum())
    assert d.opts.get().kwargs["legend_position"] == "bottom"  # below the map, not over it


# --------------------------------------------------------------------------- sizes


def _plots():
    fisher, att = make_fisher(), make_attention()
    a, b, diff = make_skill()
    return {
        "mask_heatmap": interactive.hv_mask_heatmap(fisher),
        "mask_image": interactive.hv_mask_image(fisher, "encoder0.0/qkv", step=10),
        "overlap": interactive.hv_overlap_curves(fisher),
        "var_var": interactive.hv_variable_attention(att, "encoder0.0"),
        "var_patch": interactive.hv_patch_attention(att, "encoder0.0"),
        "patch_images": interactive.hv_patch_attention(att, "encoder0.0", "2m_temperature"),
        "prompt_map": interactive.hv_prompt_map(att, "encoder0.0", 1),
        "skill_map": interactive.hv_skill_map(a),
        "comparison": interactive.hv_skill_comparison(a, b, diff),
        "budget": interactive.hv_budget_vs_skill(_runs()),
    }


def _leaves(obj) -> list:
    if isinstance(obj, (hv.Layout, hv.NdLayout)):
        return [leaf for item in obj.values() for leaf in _leaves(item)]
    return [obj]


def _bokeh_figures(model) -> list:
    from bokeh.models import GridPlot
    from bokeh.plotting import figure

    if isinstance(model, figure):
        return [model]
    if isinstance(model, GridPlot):
        return [m for child in model.children for m in _bokeh_figures(child[0])]
    return []


@pytest.mark.parametrize("name", [
    "mask_heatmap", "mask_image", "overlap", "var_var", "var_patch", "patch_images",
    "prompt_map", "skill_map", "comparison", "budget"])
def test_every_plot_fills_the_width(name) -> None:
    obj = _plots()[name]
    for leaf in _leaves(obj):
        opts = leaf.opts.get("plot", backend="bokeh").kwargs
        assert opts["responsive"] is True, name
        assert "width" not in opts, name
        if "aspect" in opts:  # maps: aspect of the lon/lat extent, never below a usable height
            assert opts["min_height"] == interactive.MAP_MIN_HEIGHT
        else:
            assert opts["height"] >= 200
    figures = _bokeh_figures(_render(obj))
    assert figures
    for fig in figures:
        assert fig.sizing_mode in ("stretch_width", "scale_both"), (name, fig.sizing_mode)
        assert fig.width is None or fig.sizing_mode != "fixed"


def test_map_aspect_follows_the_extent() -> None:
    a, _, _ = make_skill()  # global: 360 x 180 degrees
    assert interactive.hv_skill_map(a).opts.get().kwargs["aspect"] == pytest.approx(1.15 * 2.0)
    uk, _, _ = make_skill(lat=UK_LAT, lon=UK_LON)  # 10 x 8 degrees, 0.25° cells
    expect = 1.15 * (40 * 0.25) / (32 * 0.25)
    assert interactive.hv_skill_map(uk).opts.get().kwargs["aspect"] == pytest.approx(expect)
    thin, _, _ = make_skill(lat=np.linspace(0, 1, 3), lon=np.arange(0.0, 100.0, 1.0))
    assert interactive.hv_skill_map(thin).opts.get().kwargs["aspect"] == pytest.approx(1.15 * 2.4)


# --------------------------------------------------------------------------- budget plot


@pytest.mark.parametrize("lo, hi, expected", [
    (4.0, 100.0, [2, 5, 10, 20, 50, 100, 200]),
    (0.1, 100.0, [0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200]),
    (0.03, 0.03, [0.02, 0.05]),
    (1.0, 1.0, [0.5, 1, 2]),
])
def test_log_ticks_are_1_2_5_values(lo, hi, expected) -> None:
    assert interactive.log_ticks(lo, hi) == pytest.approx(expected)


@pytest.mark.parametrize("lo, hi", [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0), (1.0, float("inf"))])
def test_log_ticks_refuse_a_range_a_log_axis_cannot_show(lo, hi) -> None:
    with pytest.raises(ValueError, match="0 < lo <= hi"):
        interactive.log_ticks(lo, hi)


def test_budget_plot_has_its_legend_outside_and_readable_log_ticks() -> None:
    plot = interactive.hv_budget_vs_skill(_runs(), title="downscaling: budget vs rmse")
    opts = plot.opts.get("plot", backend="bokeh").kwargs
    assert opts["legend_position"] == "right" and opts["logx"] is True
    values = [v for v, _ in opts["xticks"]]
    # data from 0.1 % to 100 %: every 1-2-5 value in between is a tick
    assert {0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0} <= set(values)
    state = _render(plot)
    ticker = state.xaxis[0].ticker
    assert list(ticker.ticks) == values
    overrides = state.xaxis[0].major_label_overrides
    assert overrides[0.2] == "0.2" and overrides[50.0] == "50" and overrides[100.0] == "100"
    legend = state.legend[0]
    assert legend in state.right  # beside the frame, not over the points
    assert [item.label["value"] for item in legend.items] == ["WeatherPEFT", "LoRA",
                                                              "Full-Tuning"]


def test_curves_and_scorecard_fill_the_width_and_keep_the_legend_off_the_lines() -> None:
    """The Curves overlay and the Scorecard heat map size as every other plot (responsive, a
    fixed height); the curves' legend sits beside the frame, not over the lines."""
    import pandas as pd
    import xarray as xr

    frame = pd.DataFrame(
        [(run, method, "train", step, "loss", 1.0 / step)
         for run, method in (("a", "weatherpeft"), ("b", "full")) for step in (1, 2, 3)],
        columns=["run", "method", "split", "step", "column", "value"])
    curves = interactive.hv_curves(frame, title="training loss")
    scores = ["rmse/2m_temperature", "acc/2m_temperature"]
    card = xr.Dataset(
        {name: (("run", "score"), np.array(values, dtype=float))
         for name, values in {"value": [[2.0, 0.8], [1.5, 0.9]],
                              "oriented_difference": [[0.0, 0.0], [-25.0, -12.5]],
                              "relative_difference": [[0.0, 0.0], [-25.0, 12.5]]}.items()}
        | {"significant": (("run", "score"), np.array([[False, False], [True, False]]))},
        coords={"run": ["full", "wp"], "score": scores})
    heat = interactive.hv_scorecard(card, title="scorecard").get(0)
    for name, element in (("curves", curves), ("scorecard", heat)):
        opts = element.opts.get("plot", backend="bokeh").kwargs
        assert opts["responsive"] is True and "width" not in opts, name
        assert opts["height"] >= 200, name
    assert heat.opts.get("plot", backend="bokeh").kwargs["height"] == (
        interactive.SCORECARD_MIN_HEIGHT)  # two runs: the least height, the bar readable
    # rows the runs (the reference on top), columns the scores: as the static figure
    assert [d.name for d in heat.kdims] == ["score", "run"]
    assert heat.opts.get("plot", backend="bokeh").kwargs["invert_yaxis"] is True
    assert curves.opts.get("plot", backend="bokeh").kwargs["legend_position"] == "right"
    state = _render(curves)
    assert state.sizing_mode in ("stretch_width", "scale_both")
    assert state.legend[0] in state.right  # beside the frame
    assert [item.label["value"] for item in state.legend[0].items] == ["a", "b"]
    card_state = _render(interactive.hv_scorecard(card))
    assert card_state.sizing_mode in ("stretch_width", "scale_both")


# --------------------------------------------------------------------------- theme


@pytest.fixture()
def workbench(tmp_path: Path):
    pytest.importorskip("panel")
    from wpeft.app.catalog import catalog_for
    from wpeft.app.workbench import Workbench

    (tmp_path / "runs").mkdir()
    return Workbench(catalog_for(tmp_path / "runs"), poll_ms=0, sync_url=False)


@pytest.mark.parametrize("args, expected", [
    ({}, "light"), ({"theme": [b"dark"]}, "dark"), ({"theme": [b"light"]}, "light"),
    ({"theme": [b"<script>"]}, "light"), ({"theme": [b"light", b"dark"]}, "dark"),
    ({"theme": []}, "light"),
])
def test_page_theme_from_the_url(args, expected) -> None:
    from wpeft.app.workbench import page_theme

    assert page_theme(args) == expected


def test_theme_picks_the_template_and_plot_theme(tmp_path: Path) -> None:
    pytest.importorskip("panel")
    from panel.theme import DarkTheme, DefaultTheme

    from wpeft.app.catalog import catalog_for
    from wpeft.app.workbench import Workbench

    (tmp_path / "runs").mkdir()
    catalog = catalog_for(tmp_path / "runs")

    def page(theme: str | None) -> Workbench:
        return Workbench(catalog, poll_ms=0, sync_url=False, theme=theme)

    dark = page("dark")
    assert dark.theme == "dark" and dark.template().theme is DarkTheme
    assert dark.template()._design.theme.bokeh_theme is not None  # plots drawn dark too
    assert page("light").template().theme is DefaultTheme
    assert page("purple").theme == "light"  # unknown: the default
    assert page(None).theme == "light"  # no session: no URL parameter
    # the header button leads to the other theme, keeping the rest of the URL
    (button,) = dark.template().header.objects
    assert button.label == "light theme"
    assert page("light").template().header.objects[0].label == "dark theme"


def test_colour_maps_do_not_depend_on_the_theme(workbench) -> None:
    a, _, _ = make_skill()
    workbench.theme = "dark"
    workbench.template()
    assert interactive.hv_skill_map(a).opts.get().kwargs["cmap"] == "viridis"


# --------------------------------------------------------------------------- wpeft lab


def test_lab_argv(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(cli, "_installed", lambda module: module == "jupyterlab")
    argv = cli.lab_argv(notebooks=tmp_path)
    assert argv == [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={tmp_path}"]
    argv = cli.lab_argv(8899, browser=False, notebooks=tmp_path)
    assert argv[3:] == [f"--ServerApp.root_dir={tmp_path}", "--port=8899", "--no-browser"]
    assert cli.NOTEBOOKS_DIR == Path(cli.__file__).resolve().parents[1] / "notebooks"
    assert (cli.NOTEBOOKS_DIR / "04_skill_maps.ipynb").is_file()  # this checkout's notebooks


def test_lab_without_jupyterlab_names_the_extra(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setattr(cli, "_installed", lambda module: False)
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[app\]"'):
        cli.lab_argv(notebooks=tmp_path)
    assert cli.main(["lab", "--no-browser"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wpeft: error: wpeft lab needs JupyterLab") and err.count("\n") == 1


def test_lab_without_a_notebooks_folder_says_so(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setattr(cli, "_installed", lambda module: True)
    missing = tmp_path / "site-packages" / "notebooks"
    with pytest.raises(ConfigError, match="No notebooks folder at .*source checkout"):
        cli.lab_argv(notebooks=missing)
    monkeypatch.setattr(cli, "NOTEBOOKS_DIR", missing)  # e.g. wpeft installed from a wheel
    assert cli.main(["lab"]) == 2
    assert "No notebooks folder at" in capsys.readouterr().err


def test_lab_runs_jupyterlab_with_the_argv(monkeypatch, tmp_path: Path) -> None:
    import subprocess

    monkeypatch.setattr(cli, "_installed", lambda module: True)
    monkeypatch.setattr(cli, "NOTEBOOKS_DIR", tmp_path)
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda argv: calls.append(argv) or 0)
    assert cli.main(["lab", "--port", "8890", "--no-browser"]) == 0
    assert calls == [[sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={tmp_path}",
                      "--port=8890", "--no-browser"]]
    # options after -- go to JupyterLab unchanged (e.g. --allow-root in a container)
    calls.clear()
    assert cli.main(["lab", "--port", "8890", "--", "--allow-root", "--ServerApp.token=x"]) == 0
    assert calls[0][4:] == ["--port=8890", "--allow-root", "--ServerApp.token=x"]
