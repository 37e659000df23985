"""The served workbench in a real browser: Playwright (sync API) driving Debian's chromium.

A module fixture trains two tiny real runs (WeatherPEFT at a 4 % budget with Fisher and prompt
attention records, and Full-Tuning), starts ``python -m wpeft.app.serve RUNS_DIR`` on a free
loopback port (and a second server over an empty directory), and every test opens the page,
changes selections and checks what the browser shows: plot titles and axis factors read from the
live Bokeh views, the alt text and bytes of the images pre-rendered on the server, caption text,
the URL query. Screenshots go to each test's tmp dir.

Skipped with a reason when /usr/bin/chromium or playwright is missing. Never runs
``playwright install``: the browser is the system one.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlparse

import pytest

from wpeft.app.browsing import CHROMIUM, CHROMIUM_ARGS, wait_for_server

WORLD = {"nlat": 16, "nlon": 32, "days": 12, "spinup_days": 1, "ensemble_inits": 8,
         "ensemble_members": 3}
SECRET = "TOP-SECRET-MARKER"
WP, FULL = "downscaling/weatherpeft-4pct", "downscaling/full"


def _skip_reason() -> str | None:
    if not Path(CHROMIUM).is_file():
        return f"{CHROMIUM} is missing (apt-get install chromium); browser tests skipped"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright (pip install playwright; no `playwright install` needed) is missing"
    try:
        import holoviews  # noqa: F401
        import panel  # noqa: F401
    except ImportError:
        return "panel / holoviews are not installed"
    return None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or ""),
]


# --------------------------------------------------------------------------- servers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m wpeft.app.serve ROOT`` in a subprocess on a free loopback port."""

    def __init__(self, root: Path, log: Path) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wpeft.app.serve", str(root), "--port", str(self.port),
             "--poll-seconds", "0.5"],
            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
        )

    def wait_ready(self, timeout: float = 180.0) -> None:
        wait_for_server(f"{self.base}/workbench", self.proc, self.log, timeout)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)


def _train_runs(root: Path, cache: Path) -> None:
    from wpeft.training.loop import TrainConfig, train

    mp = pytest.MonkeyPatch()
    mp.setenv("WPEFT_CACHE_DIR", str(cache))
    try:
        common = {"task": "downscaling", "batch_size": 2, "warmup_steps": 1,
                  "checkpoint_every": 0, "task_options": {"world": WORLD}, "device": "cpu",
                  "log_every": 1}  # training-loss lines for the Curves view
        train(TrainConfig(method="weatherpeft", budget=0.04, steps=12, record_every=3,
                          method_options={"num_prompts": 3}, **common), root / WP,
              progress=False)
        train(TrainConfig(method="full", steps=4, **common), root / FULL, progress=False)
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> Iterator[dict]:
    """Trained runs, a server over them and one over an empty directory."""
    base = tmp_path_factory.mktemp("workbench")
    root, empty = base / "runs", base / "empty"
    root.mkdir()
    empty.mkdir()
    empty_server = Server(empty, base / "empty-server.log")  # starts while the runs train
    servers = [empty_server]
    try:
        _train_runs(root, tmp_path_factory.getbasetemp() / "world-cache")
        outside = base / "outside" / "run"  # a run outside RUNS_DIR, reachable by a symlink
        outside.mkdir(parents=True)
        (outside / "config.json").write_text(json.dumps({"task": SECRET, "method": SECRET}))
        (root / "escape").symlink_to(outside.parent, target_is_directory=True)
        server = Server(root, base / "server.log")
        servers.append(server)
        server.wait_ready()
        empty_server.wait_ready()
        yield {"base": server.base, "empty": empty_server.base, "root": root,
               "log": server.log}
    finally:
        for s in servers:
            s.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, tmp_path: Path) -> Iterator:
    """A fresh page (own session); records any request that leaves the loopback server."""
    context = browser.new_context(viewport={"width": 1500, "height": 1400})
    pg = context.new_page()
    pg.external_requests = []
    pg.on("request", lambda r: None if urlparse(r.url).hostname == "127.0.0.1"
          or r.url.startswith(("data:", "blob:")) else pg.external_requests.append(r.url))
    yield pg
    pg.screenshot(path=str(tmp_path / "last.png"), full_page=True)
    context.close()


# --------------------------------------------------------------------------- page helpers

_FIGURES_JS = """() => {
  const out = [], seen = new Set();
  function walk(v) {
    if (!v || seen.has(v)) return; seen.add(v);
    const m = v.model;
    if (m && m.type === 'Figure') out.push({
      cls: (m.css_classes || []).join(' '), title: m.title ? m.title.text : '',
      x: m.x_range.factors ? Array.from(m.x_range.factors).map(String) : [m.x_range.start, m.x_range.end]});
    for (const c of (v.child_views || [])) walk(c);
  }
  for (const v of Object.values(Bokeh.index)) walk(v);
  return out;
}"""


def goto(page, base: str, **query) -> None:
    page.goto(f"{base}/workbench" + (f"?{urlencode(query)}" if query else ""))
    page.wait_for_selector(".wb-main", state="attached", timeout=60_000)


def wait_until(page, check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    from playwright.sync_api import Error as PlaywrightError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done = check()
        except (PlaywrightError, TypeError, KeyError):  # the plot is not there yet
            done = False
        if done:
            return
        page.wait_for_timeout(150)
    raise AssertionError(f"timed out waiting for {what}")


def text_of(page, selector: str) -> str:
    """Text of a Panel component (its content lives in a shadow root)."""
    loc = page.locator(selector)
    if loc.count() == 0:
        return ""
    return loc.first.evaluate("el => (el.shadowRoot || el).textContent")


def figures(page) -> list[dict]:
    """The Bokeh figures currently shown: css classes, title, x range (factors or bounds)."""
    return page.evaluate(_FIGURES_JS)


def figure(page, cls: str) -> dict | None:
    return next((f for f in figures(page) if cls in f["cls"].split()), None)


_IMAGE_JS = """(cls) => {
  const found = [];
  (function walk(r) {
    for (const el of r.querySelectorAll('*')) {
      if (el.classList && el.classList.contains(cls) && el.shadowRoot) {
        const img = el.shadowRoot.querySelector('img');
        if (img && img.complete && img.naturalWidth > 0 && el.offsetParent !== null)
          found.push({alt: img.alt, src: img.src, width: img.naturalWidth,
                      height: img.naturalHeight});
      }
      if (el.shadowRoot) walk(el.shadowRoot);
    }
  })(document);
  return found.length ? found[0] : null;
}"""


def image(page, cls: str) -> dict | None:
    """The shown, loaded image of the pane with css class ``cls`` (Panel's PNG pane): alt
    text, src (a data URL), natural width and height; None when there is none."""
    return page.evaluate(_IMAGE_JS, cls)


def image_alt(page, cls: str) -> str | None:
    found = image(page, cls)
    return None if found is None else found["alt"]


def png_bytes(found: dict) -> bytes:
    import base64

    head, data = found["src"].split(",", 1)
    assert head == "data:image/png;base64"
    return base64.b64decode(data)


def titles(page) -> list[str]:
    return [f["title"] for f in figures(page)]


def query(page) -> dict[str, str]:
    return dict(parse_qsl(urlparse(page.url).query))


def wait_query(page, **expected: str) -> None:
    """Wait until the URL query holds ``expected`` (the browser updates it asynchronously)."""
    wait_until(page, lambda: all(query(page).get(k) == str(v) for k, v in expected.items()),
               f"the URL query to hold {expected}")


def shot(page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)


def _fisher(root: Path):
    from wpeft import runs

    return runs.open(root / WP).fisher


def _records(root: Path) -> tuple[list[int], list[str]]:
    from wpeft import runs

    fisher = runs.open(root / WP).fisher
    return [int(s) for s in fisher.step.values], [str(m) for m in fisher.matrix.values]


# --------------------------------------------------------------------------- tests


def test_overview_sorts_and_selects_a_run(app, page, tmp_path) -> None:
    goto(page, app["base"])
    cells = page.locator('.wb-runs-table .tabulator-row .tabulator-cell[tabulator-field="run"]')
    wait_until(page, lambda: cells.count() == 2, "the runs table")
    assert [cells.nth(i).inner_text() for i in range(2)] == [FULL, WP]  # by task, method
    header = page.locator('.wb-runs-table .tabulator-col[tabulator-field="trainable_backbone"]')
    header.click()  # ascending: WeatherPEFT (4 %) before Full-Tuning (all parameters)
    wait_until(page, lambda: cells.nth(0).inner_text() == WP, "sorting by trainable_backbone")
    header.click()
    wait_until(page, lambda: cells.nth(0).inner_text() == FULL, "sorting descending")
    caption = text_of(page, ".wb-overview-caption")
    assert "2 runs" in caption and "2 finished" in caption
    table_text = text_of(page, ".wb-runs-table")
    assert "weatherpeft" in table_text and "4.0" in table_text  # budget in percent
    shot(page, tmp_path, "overview-sorted")
    page.locator('.wb-runs-table .tabulator-cell[tabulator-field="run"]', has_text=FULL).click()
    wait_query(page, run=FULL)
    assert page.locator(".wb-run select").input_value().startswith(FULL)
    assert page.external_requests == []  # everything is served by the workbench itself


def test_overview_pages_and_selects_a_run_on_page_two(app, browser, tmp_path) -> None:
    """25 runs: 20 rows a page; sorted, the second page's rows select their own run."""
    root = tmp_path / "many"
    for i in range(25):  # config and summary only: listed with their sizes and scores
        run = root / "downscaling" / f"run-{i:02d}"
        run.mkdir(parents=True)
        config = json.loads((app["root"] / FULL / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**config, "seed": i}))
        shutil.copy(app["root"] / FULL / "summary.json", run / "summary.json")
    server = Server(root, tmp_path / "many-server.log")
    page = browser.new_page(viewport={"width": 1500, "height": 1400})
    try:
        server.wait_ready()
        goto(page, server.base)
        cells = page.locator('.wb-runs-table .tabulator-row .tabulator-cell[tabulator-field="run"]')
        wait_until(page, lambda: cells.count() == 20, "the first page of 20 rows")
        header = page.locator('.wb-runs-table .tabulator-col[tabulator-field="seed"]')
        header.click()
        header.click()  # descending: seeds 24..5 on page one, 4..0 on page two
        wait_until(page, lambda: cells.nth(0).inner_text() == "downscaling/run-24", "sorting")
        page.locator('.wb-runs-table .tabulator-page[data-page="next"]').click()
        wait_until(page, lambda: cells.count() == 5, "the second page")
        assert [cells.nth(i).inner_text() for i in range(5)] == [
            f"downscaling/run-{i:02d}" for i in (4, 3, 2, 1, 0)]
        cells.nth(1).click()
        wait_query(page, run="downscaling/run-03")
        assert "25 runs" in text_of(page, ".wb-overview-caption")
    finally:
        page.close()
        server.stop()


def test_fisher_view_step_player_and_selections(app, page, browser, tmp_path) -> None:
    from wpeft.viz.fisher import mask_image_png, overlap_curves_png

    steps, matrices = _records(app["root"])
    goto(page, app["base"], view="fisher", run=WP)
    wait_until(page, lambda: f"step {steps[-1]}" in text_of(page, ".wb-fisher-caption"),
               "the Fisher view")
    wait_until(page, lambda: image(page, "wb-mask-image") is not None, "the mask image")
    shown = image(page, "wb-mask-image")  # pre-rendered on the server: the wpeft.viz figure
    assert shown["alt"] == f"{matrices[0]} mask at step {steps[-1]}"
    assert png_bytes(shown) == mask_image_png(_fisher(app["root"]), matrices[0], steps[-1])
    assert (shown["width"], shown["height"]) == (384, 336)
    heat = figure(page, "wb-fisher-heatmap")
    assert heat["x"] == [str(s) for s in steps]  # one column per recorded step
    assert heat["title"].startswith("mask density")
    wait_query(page, step=steps[-1], matrix=matrices[0], run=WP)
    shot(page, tmp_path, "fisher-last-step")

    page.locator(".wb-step button.previous").click()  # the step player
    wait_until(page, lambda: image_alt(page, "wb-mask-image")
               == f"{matrices[0]} mask at step {steps[-2]}", "the previous step's mask")
    wait_query(page, step=steps[-2])
    page.locator(".wb-step button.first").click()
    wait_query(page, step=steps[0])
    wait_until(page, lambda: f"mask at step {steps[0]}" in image_alt(page, "wb-mask-image"),
               "step 0")

    page.locator(".wb-matrix select").select_option(label=matrices[-1])
    wait_until(page, lambda: image_alt(page, "wb-mask-image")
               == f"{matrices[-1]} mask at step {steps[0]}", "another matrix")
    wait_query(page, matrix=matrices[-1])
    page.locator(".wb-record select").select_option(label="share of Fisher mass")
    wait_until(page, lambda: figure(page, "wb-fisher-heatmap")["title"].startswith(
        "share of Fisher mass"), "the Fisher-mass heatmap")
    wait_query(page, record="fisher_mass")
    page.locator(".wb-tensor select").select_option(label="qkv")
    wait_until(page, lambda: "(qkv)" in figure(page, "wb-fisher-heatmap")["title"], "one kind")
    wait_query(page, tensor="qkv")
    wait_until(page, lambda: image_alt(page, "wb-overlap-curves")
               == "mask overlap over training (qkv tensors)", "the overlap curves of qkv")
    curves = image(page, "wb-overlap-curves")
    assert png_bytes(curves) == overlap_curves_png(_fisher(app["root"]), None, "qkv")
    shot(page, tmp_path, "fisher-first-step")

    # another session is independent: it still shows the defaults
    other = browser.new_page(viewport={"width": 1500, "height": 1400})
    try:
        goto(other, app["base"], view="fisher", run=WP)
        wait_until(other, lambda: image(other, "wb-mask-image") is not None, "a second session")
        assert image_alt(other, "wb-mask-image") == f"{matrices[0]} mask at step {steps[-1]}"
        wait_until(other, lambda: figure(other, "wb-fisher-heatmap") is not None, "its heatmap")
        assert figure(other, "wb-fisher-heatmap")["title"].startswith("mask density")
    finally:
        other.close()
    assert image_alt(page, "wb-mask-image") == f"{matrices[-1]} mask at step {steps[0]}"


def test_a_shared_url_restores_the_view(app, page, tmp_path) -> None:
    steps, matrices = _records(app["root"])
    goto(page, app["base"], view="fisher", run=WP, step=steps[1], matrix=matrices[2],
         record="union_density")
    wait_until(page, lambda: image(page, "wb-mask-image") is not None
               and figure(page, "wb-fisher-heatmap") is not None, "the shared view")
    assert image_alt(page, "wb-mask-image") == f"{matrices[2]} mask at step {steps[1]}"
    assert figure(page, "wb-fisher-heatmap")["title"].startswith("union density")
    assert page.locator(".wb-nav button.bk-active").inner_text() == "Fisher masks"
    shot(page, tmp_path, "shared-url")


def test_prompt_attention_view(app, page, tmp_path) -> None:
    from wpeft import runs
    from wpeft.viz.attention import plot_variable_attention
    from wpeft.viz.style import figure_png

    goto(page, app["base"], view="attention", run=WP)
    wait_until(page, lambda: image(page, "wb-var-var") is not None
               and figure(page, "wb-prompt-map") is not None, "the attention view")
    assert "block encoder0.0" in image_alt(page, "wb-var-var")  # pre-rendered kernels
    assert image_alt(page, "wb-var-patch").startswith("external attention over patch")
    assert "attention paid to prompt 0" in figure(page, "wb-prompt-map")["title"]
    page.locator(".wb-block select").select_option(label="decoder2.1")
    wait_until(page, lambda: "block decoder2.1" in (image_alt(page, "wb-var-var") or ""),
               "another block")
    wait_until(page, lambda: "block decoder2.1" in (image_alt(page, "wb-var-patch") or ""),
               "the patch view")
    page.locator(".wb-prompt select").select_option(label="2")
    wait_until(page, lambda: "prompt 2, block decoder2.1" in figure(page, "wb-prompt-map")[
        "title"], "another prompt token")
    wait_query(page, block="decoder2.1", prompt=2)
    # the image is the wpeft.viz figure of the records (its axes name every variable)
    records = runs.open(app["root"] / WP).attention
    assert png_bytes(image(page, "wb-var-var")) == figure_png(
        plot_variable_attention(records, "decoder2.1"))
    shot(page, tmp_path, "attention")


def test_skill_maps_side_by_side_and_difference(app, page, tmp_path) -> None:
    goto(page, app["base"], view="skill", run=WP, run_b=FULL)
    wait_until(page, lambda: f"{WP} − {FULL}" in titles(page), "the skill comparison")
    assert {WP, FULL} <= set(titles(page))
    caption = text_of(page, ".wb-skill-caption")
    assert "RMSE of 2m_temperature" in caption and "significant" in caption
    page.locator(".wb-variable select").select_option(label="temperature")
    wait_query(page, variable="temperature")
    page.locator(".wb-level select").select_option(label="500")
    page.locator(".wb-metric select").select_option(label="bias (mean error)")
    wait_until(page, lambda: "bias (mean error) of temperature_500" in text_of(
        page, ".wb-skill-caption"), "bias of temperature at 500 hPa")
    wait_query(page, variable="temperature", level=500, metric="bias")
    shot(page, tmp_path, "skill-comparison")
    # run B: none -> one run's map
    page.locator(".wb-run-b select").select_option(index=0)
    wait_until(page, lambda: f"{WP}: bias (mean error) of temperature_500" in titles(page),
               "a single run's map")


def test_budget_vs_skill(app, page, tmp_path) -> None:
    goto(page, app["base"], view="budget")
    wait_until(page, lambda: figure(page, "wb-budget-plot") is not None, "the budget plot")
    plot = figure(page, "wb-budget-plot")
    assert plot["title"] == "downscaling: budget vs rmse/2m_temperature"
    lo, hi = plot["x"]
    assert lo < 4.0 and hi > 100.0  # WeatherPEFT at 4 %, Full-Tuning at 106 %: both inside
    assert "2 finished downscaling runs" in text_of(page, ".wb-budget-caption")
    page.locator(".wb-score select").select_option(label="rmse/temperature_850")
    wait_until(page, lambda: figure(page, "wb-budget-plot")["title"]
               == "downscaling: budget vs rmse/temperature_850", "another score")
    wait_query(page, score="rmse/temperature_850", task="downscaling")
    shot(page, tmp_path, "budget")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../outside/run", "outside the runs directory"),
        ("escape/run", "through a symbolic link"),
        ("/etc/passwd", "is an absolute path"),
        ("nope", "There is no run named 'nope'"),
        ("<img src=x onerror=window.__xss=1>", "There is no run named '<img src=x"),
    ],
)
def test_bad_run_names_show_a_clear_message(app, page, tmp_path, name, expected) -> None:
    goto(page, app["base"], view="fisher", run=name)
    wait_until(page, lambda: expected in text_of(page, ".wb-fisher-message"), "the message")
    assert expected in text_of(page, ".wb-run-message")
    assert image(page, "wb-mask-image") is None  # nothing drawn
    assert figure(page, "wb-fisher-heatmap") is None
    shown = page.evaluate("""() => { let t = ''; (function walk(r) {
        for (const el of r.querySelectorAll('*')) { if (el.shadowRoot) walk(el.shadowRoot); }
        t += r.textContent || ''; })(document); return t; }""")
    assert SECRET not in shown and str(app["root"]) not in shown
    assert page.evaluate("() => window.__xss") is None  # the name was shown, not run
    shot(page, tmp_path, "bad-run-name")


def test_live_refresh_without_reload(app, page, tmp_path) -> None:
    """A run that is still training: new records show up in the open page."""
    import xarray as xr

    from wpeft.runs.store import RecordStore

    root = app["root"]
    live = root / "live" / "weatherpeft"
    shutil.copytree(root / WP, live)
    for name in ("summary.json", "fields.nc"):  # as if training were still going on
        (live / name).unlink()
    steps, _ = _records(root)
    goto(page, app["base"], view="fisher", run="live/weatherpeft")
    wait_until(page, lambda: "updates as records arrive" in text_of(page, ".wb-fisher-caption"),
               "the training run")
    assert figure(page, "wb-fisher-heatmap")["x"] == [str(s) for s in steps]
    store = RecordStore(live, "fisher")
    with xr.open_dataset(live / "records" / "fisher" / f"step-{steps[-1]:08d}.nc") as ds:
        record = ds.load().isel(step=0, drop=True)
    new = steps[-1] + 3
    store.append(new, record)
    wait_until(page, lambda: figure(page, "wb-fisher-heatmap")["x"][-1] == str(new),
               "the new record in the heatmap")
    wait_until(page, lambda: f"mask at step {new}" in image_alt(page, "wb-mask-image"),
               "the mask image following the new last step")
    wait_query(page, step=new)
    shot(page, tmp_path, "live-refresh")


def test_empty_runs_dir_says_how_to_make_a_run(app, page, tmp_path) -> None:
    goto(page, app["empty"])
    wait_until(page, lambda: "No runs found" in text_of(page, ".wb-overview-message"),
               "the empty-directory message")
    message = text_of(page, ".wb-overview-message")
    assert "wpeft train --task downscaling" in message and "wpeft demo" in message
    shot(page, tmp_path, "empty")


_LINES_JS = """(cls) => {
  const out = [], seen = new Set();
  function walk(v) {
    if (!v || seen.has(v)) return; seen.add(v);
    const m = v.model;
    if (m && m.type === 'Figure' && (m.css_classes || []).includes(cls)) {
      for (const r of m.renderers) {
        if (!r.glyph || r.glyph.type !== 'Line') continue;
        const d = r.data_source.data;
        const cols = d instanceof Map ? Array.from(d.values()) : Object.values(d);
        out.push(cols[0].length);
      }
    }
    for (const c of (v.child_views || [])) walk(c);
  }
  for (const v of Object.values(Bokeh.index)) walk(v);
  return out;
}"""


def line_lengths(page, cls: str) -> list[int]:
    """The number of points of each line of the figure with css class ``cls``."""
    return page.evaluate(_LINES_JS, cls)


def _train_steps(run: Path) -> list[int]:
    from wpeft.runs.curves import train_lines
    from wpeft.runs.store import Run

    return [int(line["step"]) for line in train_lines(Run(run))]


def test_runs_round_trip_through_the_url(app, page, tmp_path) -> None:
    n_wp, n_full = len(_train_steps(app["root"] / WP)), len(_train_steps(app["root"] / FULL))
    assert n_wp and n_full  # the fixture's runs log their training loss
    goto(page, app["base"], view="curves", runs=f"{WP},{FULL}")
    wait_until(page, lambda: sorted(line_lengths(page, "wb-curves-plot")) == sorted(
        [n_wp, n_full]), "one training-loss line per chosen run")
    wait_query(page, view="curves", runs=f"{WP},{FULL}", curve="train:loss")
    chosen = text_of(page, ".wb-runs")
    assert WP in chosen and FULL in chosen
    assert "2 runs" in text_of(page, ".wb-curves-caption")
    shot(page, tmp_path, "curves-two-runs")
    # the shared address restores the choice in a new session; an unknown name is named
    goto(page, app["base"], view="curves", runs=f"{FULL},nope")
    wait_until(page, lambda: line_lengths(page, "wb-curves-plot") == [n_full], "run FULL only")
    assert "There is no run named 'nope'" in text_of(page, ".wb-run-message")
    # the scorecard and the budget plot take the same choice
    goto(page, app["base"], view="scorecard", runs=f"{WP},{FULL}")
    wait_until(page, lambda: figure(page, "wb-scorecard-plot") is not None, "the scorecard")
    assert figure(page, "wb-scorecard-plot")["title"] == f"downscaling scorecard against {FULL}"
    caption = text_of(page, ".wb-scorecard-caption")
    assert "blue = better than the reference" in caption and "2 runs" in caption
    shot(page, tmp_path, "scorecard")


def test_curves_update_while_a_run_trains(app, page, tmp_path) -> None:
    root = app["root"]
    live = root / "live" / "curves"
    shutil.copytree(root / WP, live)
    for name in ("summary.json", "fields.nc"):  # as if training were still going on
        (live / name).unlink()
    steps = _train_steps(live)
    goto(page, app["base"], view="curves", run="live/curves")
    wait_until(page, lambda: line_lengths(page, "wb-curves-plot") == [len(steps)],
               "the training run's loss line")
    assert "updates as lines arrive" in text_of(page, ".wb-curves-caption")
    with (live / "metrics.jsonl").open("a") as f:
        for step in (steps[-1] + 1, steps[-1] + 2):
            f.write(json.dumps({"step": step, "split": "train", "loss": 0.5}) + "\n")
    wait_until(page, lambda: line_lengths(page, "wb-curves-plot") == [len(steps) + 2],
               "two new points without a reload")
    with (live / "metrics.jsonl").open("a") as f:
        f.write('{"step": 99, "split": "tr')  # cut off (the loop is writing it)
    wait_until(page, lambda: "line" in text_of(page, ".wb-curves-message")
               and "cut off" in text_of(page, ".wb-curves-message"), "the cut-off line named")
    assert line_lengths(page, "wb-curves-plot") == [len(steps) + 2]  # what parses is shown
    shot(page, tmp_path, "curves-live")


def test_download_buttons_send_png_svg_and_csv(app, page, tmp_path) -> None:
    import io
    from xml.etree import ElementTree

    import matplotlib.image
    import pandas as pd

    goto(page, app["base"], view="budget")
    wait_until(page, lambda: figure(page, "wb-budget-plot") is not None, "the budget plot")
    with page.expect_download(timeout=60_000) as info:
        page.locator(".wb-download-figure button").click()
    png = tmp_path / info.value.suggested_filename
    info.value.save_as(png)
    assert png.suffix == ".png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(png).ndim == 3
    with page.expect_download(timeout=60_000) as info:
        page.locator(".wb-download-svg button").click()
    svg = tmp_path / info.value.suggested_filename
    info.value.save_as(svg)
    assert svg.suffix == ".svg" and ElementTree.parse(svg).getroot().tag.endswith("svg")
    with page.expect_download(timeout=60_000) as info:
        page.locator(".wb-download-data button").click()
    csv = tmp_path / info.value.suggested_filename
    info.value.save_as(csv)
    table = pd.read_csv(io.StringIO(csv.read_text()))
    assert csv.suffix == ".csv" and set(table["run"]) == {WP, FULL}


def test_every_view_is_served_offline(app, page, tmp_path) -> None:
    """Every asset of every view comes from the workbench server itself (no CDN)."""
    goto(page, app["base"], run=WP)
    wait_until(page, lambda: "runs" in text_of(page, ".wb-overview-caption"), "the overview")
    page.locator(".wb-nav button", has_text="Fisher masks").click()
    wait_until(page, lambda: image(page, "wb-mask-image") is not None
               and figure(page, "wb-fisher-heatmap") is not None, "Fisher masks")
    for label, cls in [("Prompt attention", "wb-prompt-map"),
                       ("Budget vs skill", "wb-budget-plot"), ("Curves", "wb-curves-plot"),
                       ("Scorecard", "wb-scorecard-plot")]:
        page.locator(".wb-nav button", has_text=label).click()
        wait_until(page, lambda cls=cls: figure(page, cls) is not None, label)
    page.locator(".wb-nav button", has_text="Skill maps").click()
    wait_until(page, lambda: any(t.startswith(f"{WP}: ") for t in titles(page)), "skill maps")
    shot(page, tmp_path, "offline")
    assert page.external_requests == []


def test_ten_concurrent_sessions_each_see_their_own_selection(app, browser, tmp_path) -> None:
    """Ten sessions open at once, each on its own view and run: every page shows its own view
    and address, no view shows an error, and the server logs no traceback and no dropped
    message ("error handling message") meanwhile. Speed is measured by
    benchmarks/bench_workbench_load.py, not here: the timeouts are only generous bounds."""
    plan = [("overview", WP), ("fisher", WP), ("attention", WP), ("skill", WP),
            ("budget", FULL), ("curves", FULL), ("scorecard", WP), ("skill", FULL),
            ("curves", WP), ("overview", FULL)]
    log_start = len(app["log"].read_text())
    contexts = [browser.new_context(viewport={"width": 1300, "height": 1000}) for _ in plan]
    try:
        pages = [c.new_page() for c in contexts]
        for pg, (view, run) in zip(pages, plan):  # start every load before waiting for any
            pg.goto(f"{app['base']}/workbench?{urlencode({'view': view, 'run': run})}",
                    wait_until="commit")
        for i, (pg, (view, run)) in enumerate(zip(pages, plan)):
            pg.wait_for_selector(f".wb-view-{view}", state="visible", timeout=240_000)
            wait_until(pg, lambda pg=pg, view=view, run=run: query(pg).get("view") == view
                       and query(pg).get("run") == run, f"session {i}'s address", timeout=240)
            wait_until(pg, lambda pg=pg, view=view: bool(text_of(pg, f".wb-{view}-caption"))
                       or view == "overview", f"session {i}'s {view} caption", timeout=240)
            assert not pg.locator(f".wb-{view}-message").is_visible(), text_of(
                pg, f".wb-{view}-message")
        for i, (pg, (view, run)) in enumerate(zip(pages, plan)):  # nobody moved another
            assert (query(pg)["view"], query(pg)["run"]) == (view, run), i
        shot(pages[1], tmp_path, "fisher-among-ten")
    finally:
        for c in contexts:
            c.close()
    log = app["log"].read_text()[log_start:]
    assert "Traceback" not in log and "error handling message" not in log, log[-3000:]
