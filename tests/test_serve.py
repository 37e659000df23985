"""The workbench server's shared machinery: one runs watcher for all sessions, and the
rate-limited basic-auth login (in process, then against a real ``python -m wpeft.app.serve``
with urllib POSTs)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from test_workbench import _fisher_steps, make_run

from wpeft.app.catalog import Catalog, DataCache, RunsWatcher
from wpeft.app.serve import LoginLimiter
from wpeft.runs.store import RecordStore

WP, FULL = "downscaling/weatherpeft-4pct", "downscaling/full"


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    root = tmp_path / "runs"
    make_run(root, WP, "weatherpeft", budget=0.04, seed=0)
    make_run(root, FULL, "full", budget=None, seed=1, records=False)
    return Catalog(root, cache=DataCache(), discovery_ttl=0)


# --------------------------------------------------------------------------- runs watcher


def test_watcher_notifies_only_sessions_whose_runs_changed(catalog, monkeypatch) -> None:
    watcher = RunsWatcher(catalog, interval=60)  # no thread tick during the test: check() by hand
    calls: list[tuple[str, ...]] = []
    real = catalog.signature
    monkeypatch.setattr(catalog, "signature", lambda names=(), metrics=():
                        calls.append(tuple(names)) or real(names, metrics=metrics))
    notified: list[str] = []
    for who, names in [("a1", (WP, "")), ("a2", (WP, "")), ("b", (FULL, ""))]:
        watcher.subscribe(lambda names=names: names, lambda who=who: notified.append(who))
    watcher.stop()
    assert len(watcher) == 3
    calls.clear()
    assert watcher.check() == 0 and notified == []
    assert sorted(calls) == [(FULL, ""), (WP, "")]  # once per distinct selection, not per tab
    RecordStore(catalog.root / WP, "fisher").append(40, _fisher_steps()[-1])
    assert watcher.check() == 2 and sorted(notified) == ["a1", "a2"]
    assert watcher.check() == 0  # told once per change
    make_run(catalog.root, "downscaling/lora", "lora", budget=0.04, seed=2, records=False)
    notified.clear()
    assert watcher.check() == 3 and sorted(notified) == ["a1", "a2", "b"]  # the run list changed



def test_watcher_watches_metrics_only_for_subscribers_that_ask(catalog) -> None:
    """A session showing curves is told when ``metrics.jsonl`` grows; one showing only the
    run's records and fields is not (training appends every few steps)."""
    watcher = RunsWatcher(catalog, interval=60)
    notified: list[str] = []
    watcher.subscribe(lambda: (WP,), lambda: notified.append("curves"), lambda: (WP,))
    watcher.subscribe(lambda: (WP,), lambda: notified.append("maps"))
    watcher.stop()
    assert watcher.check() == 0
    metrics = catalog.root / WP / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 999, "split": "train", "loss": 0.5}\n')
    assert watcher.check() == 1 and notified == ["curves"]
    assert watcher.check() == 0

def test_watcher_thread_calls_back_and_survives_a_failing_session(catalog) -> None:
    watcher = catalog.watcher(0.05)
    assert catalog.watcher(5.0) is watcher  # one per catalog
    got = threading.Event()

    def broken() -> None:
        raise RuntimeError("a session that went away")

    bad = watcher.subscribe(lambda: (WP,), broken)
    token = watcher.subscribe(lambda: (WP,), got.set)
    try:
        RecordStore(catalog.root / WP, "fisher").append(40, _fisher_steps()[-1])
        assert got.wait(10), "the watcher thread did not notify"
        watcher.unsubscribe(token)
        watcher.unsubscribe(bad)
        watcher.unsubscribe(bad)  # twice: ignored
        got.clear()
        checks = watcher.checks
        RecordStore(catalog.root / WP, "fisher").append(50, _fisher_steps()[-1])
        deadline = time.monotonic() + 10
        while watcher.checks < checks + 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert watcher.checks >= checks + 3 and not got.is_set() and len(watcher) == 0
    finally:
        watcher.stop()
    with pytest.raises(ValueError, match="interval 0"):
        RunsWatcher(catalog, 0)


# --------------------------------------------------------------------------- login limiter


def test_login_limiter_refuses_the_sixth_failure_until_the_window_passes() -> None:
    now = [100.0]
    lim = LoginLimiter(attempts=5, window=60.0, clock=lambda: now[0])
    assert [lim.failed("10.0.0.1") for _ in range(4)] == [4, 3, 2, 1]
    assert lim.wait("10.0.0.1") == 0.0
    now[0] += 10
    assert lim.failed("10.0.0.1") == 0
    assert lim.wait("10.0.0.1") == pytest.approx(50.0)  # until the oldest (t=100) is 60 s old
    assert lim.wait("10.0.0.2") == 0.0  # per address
    now[0] += 30
    assert lim.wait("10.0.0.1") == pytest.approx(20.0)
    now[0] += 20  # t=160: the four of t=100 are 60 s old, the one of t=110 still counts
    assert lim.wait("10.0.0.1") == 0.0
    assert lim.failed("10.0.0.1") == 3  # two in the window
    lim.succeeded("10.0.0.1")
    assert [lim.failed("10.0.0.1") for _ in range(5)][-1] == 0
    for bad in ({"attempts": 0}, {"window": 0.0}):
        with pytest.raises(ValueError, match="login"):
            LoginLimiter(**bad)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _post(base: str, user: str, password: str) -> tuple[int, str, dict[str, str]]:
    """Status, body and headers (``Set-Cookie`` lines joined) of a login POST."""
    data = urllib.parse.urlencode({"username": user, "password": password}).encode()
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(f"{base}/login", data=data, timeout=30) as r:
            return r.status, r.read().decode(), _headers(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), _headers(e.headers)


def _headers(msg) -> dict[str, str]:
    return {**dict(msg), "Set-Cookie": "; ".join(msg.get_all("Set-Cookie") or [])}


@pytest.fixture
def auth_server(tmp_path: Path):
    pytest.importorskip("panel")
    from test_workbench_browser import _free_port

    users = tmp_path / "users.json"
    users.write_text(json.dumps({"ana": "correct horse battery"}))
    (tmp_path / "runs").mkdir()
    port = _free_port()
    log = tmp_path / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "wpeft.app.serve", str(tmp_path / "runs"), "--port", str(port),
         "--basic-auth", str(users), "--login-attempts", "5", "--login-window", "4"],
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/login", timeout=10) as r:
                    page = r.read().decode()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"no server:\n{log.read_text()}") from None
                time.sleep(0.3)
        yield base, page
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_basic_auth_rate_limits_failed_logins(auth_server) -> None:
    base, page = auth_server
    assert 'name="password"' in page
    assert not re.search(r"(src|href)=\"?https?://", page)  # the login page needs no CDN
    codes = []
    for i in range(5):
        code, body, _ = _post(base, "ana", f"guess-{i}")
        codes.append(code)
        assert "Invalid user name or password" in body
    assert codes == [401] * 5
    start = time.monotonic()
    code, body, headers = _post(base, "ana", "correct horse battery")  # 6th: even a right one
    assert code == 429 and "Too many failed logins" in body
    assert 1 <= int(headers["Retry-After"]) <= 5
    time.sleep(max(0.0, 4.2 - (time.monotonic() - start)))
    code, _, headers = _post(base, "ana", "correct horse battery")
    assert code == 302 and "user=" in headers.get("Set-Cookie", "")


def test_a_session_polls_on_its_own_document_and_unsubscribes_when_it_ends(catalog) -> None:
    pytest.importorskip("panel")
    from bokeh.document import Document

    from wpeft.app.workbench import Workbench, _watch_runs

    class Doc(Document):  # records what the watcher hands to the session's document
        def __init__(self) -> None:
            super().__init__()
            self.ticks: list = []

        def add_next_tick_callback(self, callback):
            self.ticks.append(callback)

    wb = Workbench(catalog, poll_ms=0, sync_url=False)
    wb.sel.param.update(run=WP, view="fisher")
    doc = Doc()
    _watch_runs(wb, doc, 60.0)
    watcher = catalog.watcher()
    watcher.stop()
    assert len(watcher) == 1 and watcher.check() == 0 and doc.ticks == []
    RecordStore(catalog.root / WP, "fisher").append(40, _fisher_steps()[-1])
    assert watcher.check() == 1 and len(doc.ticks) == 1
    assert wb.views["fisher"].step.options == [0, 10, 20, 30]  # nothing redrawn off the document
    doc.ticks[0]()  # the document runs it: the session polls and redraws
    assert wb.views["fisher"].step.options == [0, 10, 20, 30, 40]
    for callback in doc.session_destroyed_callbacks:
        callback(None)
    assert len(watcher) == 0


def test_a_write_to_a_closed_tab_is_not_logged_as_a_traceback() -> None:
    """Closing a tab while Bokeh still writes to it raises WebSocketClosedError in a task
    nobody awaits; the server's loop handler turns that into a debug line and passes every
    other loop error on unchanged."""
    import asyncio

    from tornado.websocket import WebSocketClosedError

    from wpeft.app.serve import _quiet_closed_tabs, closed_tab_exception

    assert closed_tab_exception({"exception": WebSocketClosedError()})
    assert not closed_tab_exception({"exception": RuntimeError("boom")})
    assert not closed_tab_exception({"message": "no exception at all"})
    loop = asyncio.new_event_loop()
    try:
        passed_on: list[dict] = []
        loop.set_exception_handler(lambda _loop, ctx: passed_on.append(ctx))
        _quiet_closed_tabs(loop)
        loop.call_exception_handler({"message": "Task exception was never retrieved",
                                     "exception": WebSocketClosedError()})
        assert passed_on == []
        other = {"message": "Task exception was never retrieved", "exception": KeyError("x")}
        loop.call_exception_handler(other)
        assert passed_on == [other]
    finally:
        loop.close()


def _stylesheets_of_a_websocket_session(base: str) -> list[str]:
    """The stylesheet URLs of every model of a session that the server builds from its websocket
    alone (a new session id, no ``GET`` of the page before it): what a forked server process
    does when a page's websocket reaches it rather than the process that served the page."""
    import panel.models
    import panel.models.tabulator  # noqa: F401  (Panel's model types, to read the document)
    from bokeh.client import pull_session
    from bokeh.models import ImportedStyleSheet
    from bokeh.models.ui import UIElement
    from bokeh.util.token import generate_session_id

    with pull_session(session_id=generate_session_id(), url=f"{base}/workbench") as session:
        models = list(session.document.models)
    urls = []
    for model in models:
        if isinstance(model, UIElement):
            for sheet in model.stylesheets:
                if isinstance(sheet, ImportedStyleSheet):
                    urls.append(sheet.url)
                elif isinstance(sheet, str) and not sheet.lstrip().startswith((":", "@", ".")):
                    urls.append(sheet)  # a URL given as a string (CSS text starts otherwise)
    return urls


def _wait_for_page(base: str, proc: subprocess.Popen, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{base}/workbench", timeout=60) as r:
                return r.read().decode()
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no server: {proc.stdout.read()}") from None
            time.sleep(0.3)


def test_a_session_built_from_its_websocket_serves_panels_css_itself(catalog) -> None:
    """Panel names its CSS by a CDN address until its page handler says otherwise; a session
    built from the websocket alone (another server process than the page's) must still point
    every stylesheet at this server, and each must load from it."""
    pytest.importorskip("panel")
    from test_workbench_browser import _free_port

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "wpeft.app.serve", str(catalog.root), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_page(base, proc)
        urls = _stylesheets_of_a_websocket_session(base)
        assert len(urls) > 10  # Panel's own: bootstrap, buttons, markdown, tabulator, ...
        remote = [u for u in urls if "://" in u and not u.startswith(base)]
        assert remote == []
        for url in sorted(set(urls)):
            with urllib.request.urlopen(urllib.parse.urljoin(f"{base}/workbench", url),
                                        timeout=60) as r:
                assert r.status == 200 and r.read(), url
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    assert "Traceback" not in proc.stdout.read()


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc (Linux)")
def test_num_procs_forks_servers_that_serve_and_exit_with_their_parent(catalog) -> None:
    """``--num-procs 2``: two forked processes share the port and serve the page and sessions
    built from their websocket alone, with Panel's CSS from the server itself; terminating the
    server leaves none of them behind. A negative count is refused before anything starts."""
    pytest.importorskip("panel")
    from test_workbench_browser import _free_port

    bad = subprocess.run([sys.executable, "-m", "wpeft.app.serve", str(catalog.root),
                          "--num-procs", "-1"], capture_output=True, text=True, timeout=120,
                         check=False)
    assert bad.returncode == 2 and "--num-procs -1 must be >= 0" in bad.stderr

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "wpeft.app.serve", str(catalog.root), "--port", str(port),
         "--num-procs", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    children: list[int] = []
    try:
        pages = [_wait_for_page(base, proc) for _ in range(3)]
        assert all("wpeft workbench" in page for page in pages)
        children = _children(proc.pid)
        assert len(children) == 2
        for _ in range(4):  # sessions land on either process
            urls = _stylesheets_of_a_websocket_session(base)
            assert urls and not [u for u in urls if "://" in u and not u.startswith(base)]
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    deadline = time.monotonic() + 10
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(c) for c in children)
    assert "Traceback" not in proc.stdout.read()
