"""The served workbench over a real-data run, in chromium: the skill map is a GeoViews map with
the local coastline, plots fill the window, and ``?theme=dark`` gives a dark page.

The run trains 2 steps on a zarr store written from a tiny embedded world with
:func:`~wpeft.data.era5.write_wb2_zarr` (what ``data.path`` reads for ERA5), so the catalog
treats it as real data (``earth``). Server, browser and page helpers are those of
``test_workbench_browser.py``; skipped as it is when chromium or playwright is missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import test_workbench_browser as wb
from test_workbench_browser import WORLD, Server, figure, goto, query, shot, wait_until

pytestmark = wb.pytestmark
browser = wb.browser  # fixtures
page = wb.page
RUN = "downscaling/earth-4pct"

_GLYPHS_JS = """() => {
  const out = [], seen = new Set();
  function walk(v) {
    if (!v || seen.has(v)) return; seen.add(v);
    const m = v.model;
    if (m && m.type === 'Figure') {
      const glyphs = m.renderers.filter(r => r.glyph).map(r => {
        const g = {type: r.glyph.type};
        if (g.type === 'MultiLine') g.points = r.data_source.data.xs.reduce((n, a) => n + a.length, 0);
        return g;
      });
      out.push({cls: (m.css_classes || []).join(' '), glyphs: glyphs,
                width: v.el.getBoundingClientRect().width, fill: m.background_fill_color,
                x: [m.x_range.start, m.x_range.end]});
    }
    for (const c of (v.child_views || [])) walk(c);
  }
  for (const v of Object.values(Bokeh.index)) walk(v);
  return out;
}"""


def _train_earth_run(root: Path, cache: Path) -> None:
    from wpeft.data.era5 import write_wb2_zarr
    from wpeft.data.world import WorldConfig, open_world
    from wpeft.training.loop import TrainConfig, train

    world = open_world(WorldConfig(**WORLD), cache_dir=cache, progress=False)
    store = write_wb2_zarr(world.load(), root.parent / "earth.zarr")
    cfg = TrainConfig(task="downscaling", method="weatherpeft", budget=0.04, steps=2,
                      batch_size=2, warmup_steps=1, checkpoint_every=0, device="cpu",
                      task_options={"data": {"path": str(store)}, "coarse_factor": 4})
    train(cfg, root / RUN, progress=False)


@pytest.fixture(scope="module")
def earth_app(tmp_path_factory) -> Iterator[str]:
    base = tmp_path_factory.mktemp("earth-workbench")
    root = base / "runs"
    root.mkdir()
    _train_earth_run(root, base / "world-cache")
    server = Server(root, base / "server.log")
    try:
        server.wait_ready()
        yield server.base
    finally:
        server.stop()


def glyph_figures(page) -> list[dict]:
    return page.evaluate(_GLYPHS_JS)


def skill_map(page, what: str = "the skill map") -> dict:
    """The skill map's figure (its glyphs, width, fill and x range), once the page shows it."""
    wait_until(page, lambda: any("wb-skill-maps" in f["cls"] for f in glyph_figures(page)), what)
    (fig,) = [f for f in glyph_figures(page) if "wb-skill-maps" in f["cls"]]
    return fig


def glyph_types(fig: dict) -> list[str]:
    return [g["type"] for g in fig["glyphs"]]


def test_real_data_skill_map_shows_the_coastline(earth_app, page, tmp_path) -> None:
    goto(page, earth_app, view="skill", run=RUN)
    fig = skill_map(page)
    assert {"Image", "MultiLine"} <= set(glyph_types(fig))  # the raster, the coastline over it
    coast = next(g for g in fig["glyphs"] if g["type"] == "MultiLine")
    assert coast["points"] > 1000  # a global map: every continent's crude GSHHS outline
    assert -181 < fig["x"][0] < -170 and 170 < fig["x"][1] < 181  # PlateCarree, as the figures
    # the map fills the main area (1500 px window minus the 330 px sidebar), not 520 px
    assert fig["width"] > 900
    assert page.external_requests == []  # coastlines from local files, nothing downloaded
    shot(page, tmp_path, "earth-skill-map")


def test_dark_theme_from_the_url_and_the_header_switch(earth_app, page, tmp_path) -> None:
    goto(page, earth_app, view="skill", run=RUN, theme="dark")
    assert skill_map(page)["fill"] not in ("#ffffff", "white")  # it follows the dark page
    shot(page, tmp_path, "dark")
    page.locator(".wb-theme button").first.click()  # "light theme"
    wait_until(page, lambda: query(page).get("theme") == "light", "theme=light in the URL")
    fig = skill_map(page, "the skill map again")
    assert query(page)["view"] == "skill" and query(page)["run"] == RUN  # the rest is kept
    assert fig["fill"] in ("#ffffff", "white")
    assert figure(page, "wb-skill-maps") is not None


# --------------------------------------------------------------------------- the ERA5 sample

UK_RUN = "uk/weatherpeft-4pct"
#: The README's ``uk.yaml`` ("Fine-tune on your own data"), its store path filled in.
UK_TASK = {
    "variables": ["2m_temperature"], "region": [50.25, 58.0, 350.0, 359.75],
    "fill_missing": True, "train": ["2019-03-01", "2019-03-21"],
    "val": ["2019-03-22", "2019-03-25"], "test": ["2019-03-26", "2019-03-31"],
}


@pytest.fixture(scope="module")
def uk_app(tmp_path_factory) -> Iterator[str]:
    """The README's path on the shared ERA5 sample: the GRIB file to a zarr store, a short
    WeatherPEFT run with training and validation lines, the workbench over it."""
    from test_era5 import _sample

    grib = _sample("era5-2mt-2019-03-uk.grib")
    pytest.importorskip("cfgrib", reason="GRIB needs cfgrib (pip install 'wpeft[grib]')")
    from wpeft.data.era5 import open_era5, write_wb2_zarr
    from wpeft.training.loop import TrainConfig, train

    base = tmp_path_factory.mktemp("uk-workbench")
    store = write_wb2_zarr(open_era5(grib, variables=["2m_temperature"]).load(),
                           base / "era5-uk-t2m.zarr")
    cfg = TrainConfig(task="downscaling", method="weatherpeft", budget=0.04, steps=4,
                      batch_size=2, warmup_steps=1, checkpoint_every=0, device="cpu",
                      log_every=1, eval_every=2,
                      task_options={"data": {"path": str(store), **UK_TASK},
                                    "coarse_factor": 4})
    train(cfg, base / "runs" / UK_RUN, progress=False)
    server = Server(base / "runs", base / "server.log")
    try:
        server.wait_ready()
        yield server.base
    finally:
        server.stop()


def test_the_era5_sample_gives_a_coastline_map_and_curves(uk_app, page, tmp_path) -> None:
    """README, "Workbench": the UK 2 m temperature sample's skill map is a map of the UK with
    its coastline, and Curves draws the run's validation RMSE (evaluated at steps 2 and 4)."""
    goto(page, uk_app, view="skill", run=UK_RUN)
    fig = skill_map(page)
    assert {"Image", "MultiLine"} <= set(glyph_types(fig))  # the field, the coastline over it
    assert next(g for g in fig["glyphs"] if g["type"] == "MultiLine")["points"] > 20
    assert -11 < fig["x"][0] < -9 and -1 < fig["x"][1] < 1  # 10° W to 0°, PlateCarree
    shot(page, tmp_path, "era5-uk-skill-map")
    goto(page, uk_app, view="curves", run=UK_RUN, curve="val:rmse/2m_temperature")
    wait_until(page, lambda: wb.line_lengths(page, "wb-curves-plot") == [2],
               "the validation RMSE at steps 2 and 4")
    goto(page, uk_app, view="curves", run=UK_RUN)
    wait_until(page, lambda: wb.line_lengths(page, "wb-curves-plot") == [4],
               "the training loss at steps 1-4")
    assert page.external_requests == []
