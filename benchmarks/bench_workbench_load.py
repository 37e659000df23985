"""Load on the served workbench: S concurrent browser sessions over a runs directory of N runs.

Makes (or reuses, ``--runs-dir``) a runs directory of N runs: two tiny real runs are trained
(WeatherPEFT at 4 % with Fisher and prompt-attention records, and Full-Tuning) and copied under
new names with distinct seeds and summaries (scores jittered), so it costs a minute, not hours.
Then, for each session count in ``--sessions`` (default ``1 10``: the single-session baseline
and the load), it starts ``python -m wpeft.app.serve RUNS_DIR`` in a subprocess, opens S
concurrent sessions (one Debian chromium, S contexts, Playwright's async API) and measures per
session:

* the server's share of a first page: S concurrent ``GET /workbench`` without a browser (the
  session's document is built before the HTML is sent);
* first page: ``goto`` until the overview table shows its rows;
* each view switch: click the nav button until the view's plot (or caption) shows, and one
  select change (the budget plot's score) until the caption shows the new score;
* console errors, requests to non-loopback hosts (must be 0);
* errors in the server log: tracebacks and Bokeh's "error handling message";
* server RSS and CPU (psutil) during the load and during ``--idle-seconds`` with S tabs open;
* with S = 1: the CPU seconds the browser (all chromium processes) and the server spend on the
  first page and on each view switch: what one session costs each side.

Prints a table (median, p95) and writes ``benchmarks/results/workbench-load-cpu.md``::

    python benchmarks/bench_workbench_load.py --runs 50 --sessions 1 10 --runs-dir /tmp/wb-runs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import psutil

from wpeft.app.browsing import CHROMIUM, CHROMIUM_ARGS, wait_for_server

WORLD = {"nlat": 16, "nlon": 32, "days": 12, "spinup_days": 1, "ensemble_inits": 8,
         "ensemble_members": 3}
TEMPLATES = ("weatherpeft", "full")
RESULTS = Path(__file__).parent / "results" / "workbench-load-cpu.md"

#: nav button label -> JS condition (on the page) that the view has drawn.
_FIGURES = """(() => { const out = [], seen = new Set();
  function walk(v) { if (!v || seen.has(v)) return; seen.add(v);
    const m = v.model; if (m && m.type === 'Figure') out.push((m.css_classes || []).join(' '));
    for (const c of (v.child_views || [])) walk(c); }
  for (const v of Object.values(window.Bokeh ? Bokeh.index : {})) walk(v); return out; })()"""


#: Every element matching a selector, shadow roots included (Panel renders inside them).
_DEEP = """((sel) => { const out = [];
  (function walk(r) { out.push(...r.querySelectorAll(sel));
    for (const el of r.querySelectorAll('*')) if (el.shadowRoot) walk(el.shadowRoot); })(document);
  return out; })"""


def _shown(selector: str) -> str:
    return (f"{_DEEP}({json.dumps(selector)}).some(el => "
            "((el.shadowRoot || el).textContent || '').trim().length > 0)")


def _has_figure(cls: str) -> str:
    return f"{_FIGURES}.some(c => c.split(' ').includes({json.dumps(cls)}))"


def _has_image(cls: str) -> str:
    """A loaded image inside the pane with css class ``cls`` (a pre-rendered PNG)."""
    return (f"{_DEEP}({json.dumps('.' + cls)}).some(el => {{ const i = (el.shadowRoot || el)"
            ".querySelector('img'); return i && i.complete && i.naturalWidth > 0; })")


VIEWS = {
    # every part: the heatmap, and the mask image as a bokeh figure (up to e6cb152) or an image
    "Fisher masks": f"{_has_figure('wb-fisher-heatmap')} && ({_has_figure('wb-mask-image')} "
                    f"|| {_has_image('wb-mask-image')})",
    # the map, and the variable kernel as a bokeh figure (up to 8639b58) or an image
    "Prompt attention": f"{_has_figure('wb-prompt-map')} && ({_has_figure('wb-var-var')} "
                        f"|| {_has_image('wb-var-var')})",
    "Skill maps": f"{_shown('.wb-skill-caption')} && {_FIGURES}.length > 0",
    "Budget vs skill": _has_figure("wb-budget-plot"),
    "Curves": _has_figure("wb-curves-plot"),
    "Scorecard": _has_figure("wb-scorecard-plot"),
    "Overview": f"{_DEEP}('.tabulator-row').length > 0",
}
FIRST_PAGE = VIEWS["Overview"]
_SCORE_SHOWN = f"{_shown('.wb-budget-caption')} && {_DEEP}('.wb-budget-caption').some(" \
    "el => (el.shadowRoot || el).textContent.includes('rmse/temperature_850'))"


# --------------------------------------------------------------------------- runs directory


def _train_templates(out: Path) -> None:
    from wpeft.training.loop import TrainConfig, train

    common = {"task": "downscaling", "batch_size": 2, "warmup_steps": 1, "checkpoint_every": 0,
              "task_options": {"world": WORLD}, "device": "cpu"}
    curves = {"log_every": 1, "eval_every": 4}  # metrics.jsonl lines for the Curves view
    train(TrainConfig(method="weatherpeft", budget=0.04, steps=12, record_every=3,
                      method_options={"num_prompts": 3}, **curves, **common),
          out / "weatherpeft", progress=False)
    train(TrainConfig(method="full", steps=4, **curves, **common), out / "full", progress=False)


def _jitter(value: object, rng: random.Random) -> object:
    if isinstance(value, dict):
        return {k: _jitter(v, rng) for k, v in value.items()}
    if isinstance(value, float):
        return value * rng.uniform(0.9, 1.1)
    return value


def make_runs(root: Path, n: int, templates: Path) -> None:
    """``n`` runs under ``root``: copies of the trained templates, each with its own seed,
    budget and jittered scores (so every row and point of the app differs)."""
    rng = random.Random(0)
    for i in range(n):
        kind = TEMPLATES[i % len(TEMPLATES)]
        dest = root / "downscaling" / f"{kind}-{i:03d}"
        if dest.exists():
            continue
        shutil.copytree(templates / kind, dest)
        cfg = json.loads((dest / "config.json").read_text())
        cfg["seed"] = i
        if kind == "weatherpeft":
            cfg["budget"] = rng.choice([0.01, 0.02, 0.04, 0.08])
        (dest / "config.json").write_text(json.dumps(cfg))
        summary = json.loads((dest / "summary.json").read_text())
        summary["scores"] = _jitter(summary["scores"], rng)
        (dest / "summary.json").write_text(json.dumps(summary))


def prepare_runs_dir(runs_dir: Path | None, n: int) -> Path:
    root = runs_dir or Path(tempfile.mkdtemp(prefix="wb-load-")) / "runs"
    have = sum(1 for _ in root.glob("downscaling/*/config.json")) if root.exists() else 0
    if have >= n:
        return root
    templates = root.parent / f"{root.name}-templates"
    if not (templates / "full" / "summary.json").exists():
        t = time.perf_counter()
        print(f"training the template runs under {templates} ...", flush=True)
        _train_templates(templates)
        print(f"  {time.perf_counter() - t:.0f} s", flush=True)
    make_runs(root, n, templates)
    return root


# --------------------------------------------------------------------------- server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m wpeft.app.serve ROOT`` with its CPU and RSS (its forked processes included)
    sampled every 0.5 s."""

    def __init__(self, root: Path, log: Path, extra: list[str]) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
               "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "wpeft.app.serve", str(root), "--port", str(self.port),
             *extra],
            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
            cwd=root.parent,  # not a source checkout: $PYTHONPATH picks the wpeft measured
        )
        self.ps = psutil.Process(self.proc.pid)
        self.rss_peak = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _processes(self) -> list[psutil.Process]:
        """The server and any processes it forked."""
        return [self.ps, *self.ps.children(recursive=True)]

    def _rss(self) -> int:
        total = 0
        for p in self._processes():
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.rss_peak = max(self.rss_peak, self._rss())
            except psutil.Error:
                return

    def cpu_seconds(self) -> float:
        """CPU seconds of the server and of the processes it forked, so far."""
        total = 0.0
        for p in self._processes():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def rss_mb(self) -> float:
        return self._rss() / 1e6

    def wait_ready(self, timeout: float = 120.0) -> None:
        wait_for_server(f"{self.base}/workbench", self.proc, self.log, timeout)

    def errors(self) -> dict[str, int]:
        text = self.log.read_text(errors="replace")
        return {"tracebacks": text.count("Traceback"),
                "error handling message": text.count("error handling message")}

    def stop(self) -> None:
        self._stop.set()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --------------------------------------------------------------------------- sessions


@dataclass
class SessionResult:
    first_page: float | None = None
    switches: dict[str, float] = field(default_factory=dict)
    changes: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    external: list[str] = field(default_factory=list)
    #: step ("first page", a view, "score select") -> (browsers', server's) CPU seconds in it;
    #: a session's own cost only when it runs alone
    cpu: dict[str, tuple[float, float]] = field(default_factory=dict)


async def _session(browser, base: str, timeout_ms: int, start: asyncio.Event,
                   done: asyncio.Event, pages: list,
                   cpu: Callable[[], tuple[float, float]]) -> SessionResult:
    res = SessionResult()
    marks: list[tuple[float, float]] = []

    def mark() -> None:
        marks.append(cpu())

    def spent(step: str) -> None:
        (c0, s0), (c1, s1) = marks[-1], cpu()
        res.cpu[step] = (c1 - c0, s1 - s0)

    context = await browser.new_context(viewport={"width": 1400, "height": 1100})
    page = await context.new_page()
    pages.append(page)
    page.on("console", lambda m: res.console_errors.append(m.text) if m.type == "error" else None)
    page.on("request", lambda r: None if urlparse(r.url).hostname in ("127.0.0.1", "localhost")
            or r.url.startswith(("data:", "blob:")) else res.external.append(r.url))
    await start.wait()
    mark()
    t = time.perf_counter()
    try:
        await page.goto(f"{base}/workbench", timeout=timeout_ms)
        await page.wait_for_function(FIRST_PAGE, timeout=timeout_ms, polling=50)
        res.first_page = time.perf_counter() - t
        spent("first page")
        for label, shown in VIEWS.items():
            mark()
            t = time.perf_counter()
            await page.locator(".wb-nav button", has_text=label).click(timeout=timeout_ms)
            try:
                await page.wait_for_function(shown, timeout=timeout_ms, polling=50)
                res.switches[label] = time.perf_counter() - t
                spent(label)
            except Exception as e:  # noqa: BLE001 -- a timeout is a result
                res.failures.append(f"{label}: {type(e).__name__}")
            if label == "Budget vs skill":  # one select change: its update must arrive
                mark()
                t = time.perf_counter()
                try:
                    await page.locator(".wb-score select").select_option(
                        label="rmse/temperature_850", timeout=timeout_ms)
                    await page.wait_for_function(_SCORE_SHOWN, timeout=timeout_ms, polling=50)
                    res.changes.append(time.perf_counter() - t)
                    spent("score select")
                except Exception as e:  # noqa: BLE001
                    res.failures.append(f"score select: {type(e).__name__}")
    except Exception as e:  # noqa: BLE001
        res.failures.append(f"first page: {type(e).__name__}")
    done.set()
    return res


def http_first_pages(base: str, sessions: int, timeout_s: float) -> list[float]:
    """Seconds of S concurrent ``GET /workbench`` (no browser): the server's share of a first
    page, since the session and its whole document are built before the HTML is sent."""
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    def get(_: int) -> float:
        t = time.perf_counter()
        with urllib.request.urlopen(f"{base}/workbench", timeout=timeout_s) as r:
            r.read()
        return time.perf_counter() - t

    with ThreadPoolExecutor(sessions) as pool:
        return list(pool.map(get, range(sessions)))


def _client_cpu() -> float:
    """CPU seconds of this process's chromium processes (the sessions' rendering)."""
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            if "chrom" in child.name():
                t = child.cpu_times()
                total += t.user + t.system
        except psutil.Error:
            pass
    return total


async def _drive(base: str, sessions: int, timeout_s: float, idle_s: float,
                 server: Server) -> tuple[list[SessionResult], dict[str, float]]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        start, pages = asyncio.Event(), []
        dones = [asyncio.Event() for _ in range(sessions)]
        def cpu() -> tuple[float, float]:
            return _client_cpu(), server.cpu_seconds()

        tasks = [asyncio.create_task(_session(browser, base, int(timeout_s * 1000), start,
                                              d, pages, cpu)) for d in dones]
        await asyncio.sleep(1.0)  # contexts open
        cpu0, t0, client0 = server.cpu_seconds(), time.perf_counter(), _client_cpu()
        start.set()
        results = list(await asyncio.gather(*tasks))
        load_s = time.perf_counter() - t0
        load_cpu = server.cpu_seconds() - cpu0
        client_cpu = _client_cpu() - client0
        rss_load = server.rss_peak / 1e6
        await asyncio.sleep(2.0)  # let the last redraws settle
        cpu1 = server.cpu_seconds()
        await asyncio.sleep(idle_s)
        idle_cpu = server.cpu_seconds() - cpu1
        stats = {"load_wall_s": load_s, "load_cpu_s": load_cpu,
                 "load_cpu_pct": 100 * load_cpu / load_s, "rss_peak_mb": rss_load,
                 "browser_cpu_pct": 100 * client_cpu / load_s,
                 "idle_cpu_pct": 100 * idle_cpu / idle_s if idle_s else float("nan"),
                 "rss_idle_mb": server.rss_mb()}
        await browser.close()
    return results, stats


# --------------------------------------------------------------------------- report


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def summarise(sessions: int, results: list[SessionResult], stats: dict[str, float],
              errors: dict[str, int]) -> dict[str, object]:
    first = [r.first_page for r in results if r.first_page is not None]
    switches = [v for r in results for v in r.switches.values()]
    return {
        "sessions": sessions,
        "first_median": statistics.median(first) if first else float("nan"),
        "first_p95": _pct(first, 0.95),
        "switch_median": statistics.median(switches) if switches else float("nan"),
        "switch_p95": _pct(switches, 0.95),
        "switch_max": max(switches, default=float("nan")),
        "change_median": statistics.median(
            [c for r in results for c in r.changes] or [float("nan")]),
        "failures": sum(len(r.failures) for r in results),
        "console_errors": sum(len(r.console_errors) for r in results),
        "external_requests": sum(len(r.external) for r in results),
        "per_view_median": {v: statistics.median([r.switches[v] for r in results
                                                  if v in r.switches] or [float("nan")])
                            for v in VIEWS},
        "cpu": results[0].cpu if len(results) == 1 else {},
        **errors, **stats,
    }


def table(rows: list[dict[str, object]]) -> str:
    head = ("| sessions | server share of a first page (GET, no browser) median / p95 (s) | "
            "first page median / p95 (s) | view switch median / p95 / max (s) | "
            "select change median (s) | timeouts | console errors | non-local requests | server tracebacks | "
            "'error handling message' | server CPU during load | browsers' CPU during load | "
            "server CPU idle (S tabs) | server RSS peak / idle (MB) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['sessions']} | {r['http_median']:.2f} / {r['http_p95']:.2f} | "
            f"{r['first_median']:.2f} / {r['first_p95']:.2f} | "
            f"{r['switch_median']:.2f} / {r['switch_p95']:.2f} / {r['switch_max']:.2f} | "
            f"{r['change_median']:.2f} | {r['failures']} | {r['console_errors']} | {r['external_requests']} | "
            f"{r['tracebacks']} | {r['error handling message']} | {r['load_cpu_pct']:.0f} % | "
            f"{r['browser_cpu_pct']:.0f} % | "
            f"{r['idle_cpu_pct']:.1f} % | {r['rss_peak_mb']:.0f} / {r['rss_idle_mb']:.0f} |"
        )
    return "\n".join(lines)


def per_view(rows: list[dict[str, object]]) -> str:
    head = "| sessions | " + " | ".join(VIEWS) + " |"
    lines = [head, "|" + "---|" * (len(VIEWS) + 1)]
    for r in rows:
        med = r["per_view_median"]
        lines.append(f"| {r['sessions']} | " + " | ".join(f"{med[v]:.2f}" for v in VIEWS) + " |")
    return "\n".join(lines)


def cpu_table(rows: list[dict[str, object]]) -> str:
    """CPU seconds of each step of a session that runs alone: the browser's and the server's."""
    steps = ["first page", *VIEWS, "score select"]
    head = "| CPU seconds, one session alone | " + " | ".join(steps) + " |"
    lines = [head, "|" + "---|" * (len(steps) + 1)]
    for r in rows:
        cpu = r["cpu"]
        if not cpu:
            continue
        for i, who in enumerate(("browser (chromium)", "server")):
            lines.append(f"| {who} | " + " | ".join(
                f"{cpu[s][i]:.2f}" if s in cpu else "–" for s in steps) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="runs in the directory (50)")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="reuse (or create) this runs directory")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 10],
                        help="concurrent sessions, one server start each (default: 1 10)")
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--timeout", type=float, default=60.0, help="per page/switch (s)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra argument of wpeft.app.serve (repeatable)")
    parser.add_argument("--label", default="", help="what this measurement is (in the report)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--append", action="store_true", help="append to --out")
    args = parser.parse_args(argv)

    root = prepare_runs_dir(args.runs_dir, args.runs)
    n = sum(1 for _ in root.glob("downscaling/*/config.json"))
    rows = []
    for s in args.sessions:
        log = root.parent / f"server-{s}.log"
        server = Server(root, log, args.server_arg)
        try:
            server.wait_ready()
            http = http_first_pages(server.base, s, args.timeout)
            results, stats = asyncio.run(_drive(server.base, s, args.timeout,
                                                args.idle_seconds, server))
            errors = server.errors()
        finally:
            server.stop()
        row = summarise(s, results, stats, errors)
        row["http_median"], row["http_p95"] = statistics.median(http), _pct(http, 0.95)
        rows.append(row)
        bad = sorted({u for r in results for u in r.external})[:5]
        fails = [f for r in results for f in r.failures][:5]
        print(f"{s} sessions: {json.dumps({k: v for k, v in row.items()}, default=str)}")
        if bad:
            print(f"  non-local requests: {bad}")
        if fails:
            print(f"  failures: {fails}")
        if errors["tracebacks"] or errors["error handling message"]:
            print(f"  server log: {log}")
    out = table(rows)
    views = per_view(rows)
    cpus = cpu_table(rows)
    print(out)
    print(views)
    print(cpus)
    load = os.getloadavg()
    text = (
        f"\n### {args.label or 'workbench load'}\n\n"
        f"{n} runs, {os.cpu_count()} CPU cores, load average before "
        f"{load[0]:.2f}; server args {args.server_arg or 'default'}; "
        f"idle window {args.idle_seconds:.0f} s; {time.strftime('%Y-%m-%d %H:%M')}\n\n"
        f"{out}\n\nMedian switch time per view (s):\n\n{views}\n"
        + (f"\n{cpus}\n" if cpus else "")
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.append and args.out.exists():
        args.out.write_text(args.out.read_text() + text)
    else:
        args.out.write_text("# Workbench under load (CPU)\n\nbenchmarks/bench_workbench_load.py"
                            "\n" + text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
