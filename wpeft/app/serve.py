"""``wpeft serve RUNS_DIR``: the workbench on a Panel (Bokeh/Tornado) server.

Why a launcher of our own rather than ``panel serve``: safe defaults for serving to a team. It
binds 127.0.0.1 unless told otherwise, refuses a missing RUNS_DIR before starting (exit code 2),
checks a ``--basic-auth`` file before the first login needs it, creates a cookie secret when
authentication needs one, and warns when the server is reachable from other hosts without a
login. Every session gets its own widgets (:func:`wpeft.app.workbench.build_workbench` runs per
session); the data are shared through the process-wide cache of :mod:`wpeft.app.catalog`.

``--num-procs N`` forks N server processes that share the port (Bokeh's own option): a session
stays on the process its websocket reached, so N cores build and update pages side by side
(the server is one Python thread per process; ten sessions switching views at once keep one
busy). Each process has its own caches and login counts; a forked process exits when the
process that started it does. A page's websocket may reach another process than the one that
served the page: that process builds the session again from its token (the first build is
dropped unused), with Panel's CSS still served locally (``build_workbench`` sees to it).

``python -m wpeft.app.serve RUNS_DIR --port 5006`` runs the same :func:`main` as
``wpeft serve``. ``panel serve apps/workbench.py --args RUNS_DIR`` serves the same page with
Panel's own options (OAuth providers, ``--num-procs``, ``--prefix``...).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import secrets
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LoginLimiter", "add_arguments", "main"]

DEFAULT_PORT = 5006

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``wpeft serve`` (RUNS_DIR first)."""
    parser.add_argument("runs_dir", metavar="RUNS_DIR",
                        help="directory of run directories (any depth) to show")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"TCP port (default {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--address", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; "
                             "0.0.0.0 for every interface, behind --basic-auth or a proxy)")
    parser.add_argument("--allow-websocket-origin", action="append", default=None,
                        metavar="HOST[:PORT]",
                        help="host the browser uses to reach the server (repeatable); needed "
                             "whenever it is not localhost:PORT, e.g. a hostname or a proxy")
    parser.add_argument("--basic-auth", default=os.environ.get("WPEFT_BASIC_AUTH"),
                        metavar="FILE_OR_PASSWORD",
                        help="require a login: a JSON file {user: password} or one shared "
                             "password (default $WPEFT_BASIC_AUTH; prefer the file, a password "
                             "on the command line is visible to other local users)")
    parser.add_argument("--cookie-secret", default=os.environ.get("PANEL_COOKIE_SECRET"),
                        help="secret that signs login cookies (default $PANEL_COOKIE_SECRET; "
                             "a random one per start if a login is required)")
    parser.add_argument("--oauth-provider", default=None,
                        help="OAuth login through a provider Panel supports (github, google, "
                             "azure, okta, auth0, generic...), with --oauth-key/--oauth-secret")
    parser.add_argument("--oauth-key", default=os.environ.get("PANEL_OAUTH_KEY"),
                        help="OAuth client id (default $PANEL_OAUTH_KEY)")
    parser.add_argument("--oauth-secret", default=os.environ.get("PANEL_OAUTH_SECRET"),
                        help="OAuth client secret (default $PANEL_OAUTH_SECRET)")
    parser.add_argument("--oauth-redirect-uri", default=None,
                        help="OAuth redirect URI registered with the provider")
    parser.add_argument("--oauth-encryption-key",
                        default=os.environ.get("PANEL_OAUTH_ENCRYPTION"),
                        help="key that encrypts OAuth tokens in cookies "
                             "(default $PANEL_OAUTH_ENCRYPTION)")
    parser.add_argument("--poll-seconds", type=float, default=2.0,
                        help="how often the server checks the runs for new records (default 2; "
                             "one check for all pages)")
    parser.add_argument("--login-attempts", type=int, default=5,
                        help="failed --basic-auth logins one address may make within "
                             "--login-window seconds before it must wait (default 5)")
    parser.add_argument("--login-window", type=float, default=60.0,
                        help="seconds the failed logins of --login-attempts are counted over, "
                             "and the longest wait after them (default 60)")
    parser.add_argument("--show", action=argparse.BooleanOptionalAction, default=False,
                        help="open the page in a browser on start (default: --no-show)")
    parser.add_argument("--num-procs", type=int, default=1,
                        help="server processes sharing the port (default 1; 0: one per CPU "
                             "core). Each keeps its own sessions, caches and login counts")


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _check_basic_auth(value: str) -> str | None:
    """An error message if ``value`` names a missing or malformed users file."""
    path = Path(value).expanduser()
    looks_like_file = path.suffix == ".json" or os.sep in value or "/" in value
    if path.is_file():
        try:
            users = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            return f"--basic-auth file {value!r} is not valid JSON ({e})."
        if not (isinstance(users, dict) and users
                and all(isinstance(k, str) and isinstance(v, str) for k, v in users.items())):
            return f"--basic-auth file {value!r} must hold a JSON object {{user: password}}."
        return None
    if looks_like_file:
        return f"--basic-auth file {value!r} does not exist (a password must not look like a path)."
    if len(value) < 8:
        return "--basic-auth password is shorter than 8 characters."
    return None


def _origins(args: argparse.Namespace, port: int) -> list[str] | None:
    if args.allow_websocket_origin:
        return list(args.allow_websocket_origin)
    if _is_loopback(args.address) and port:
        return [f"localhost:{port}", f"127.0.0.1:{port}"]
    return None  # Bokeh's default: localhost only


@dataclass
class LoginLimiter:
    """Failed logins per client address: after ``attempts`` failures within ``window``
    seconds that address is refused until the oldest of them is ``window`` seconds old (a
    correct password included, so guessing cannot go on). Thread-safe; ``clock`` is for tests.
    """

    attempts: int = 5
    window: float = 60.0
    clock: Callable[[], float] = time.monotonic
    _failures: dict[str, deque[float]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"--login-attempts {self.attempts} must be at least 1.")
        if self.window <= 0:
            raise ValueError(f"--login-window {self.window} must be positive (seconds).")

    def _recent(self, address: str) -> deque[float]:
        now = self.clock()
        times = self._failures.get(address, deque())
        while times and now - times[0] >= self.window:
            times.popleft()
        if times:
            self._failures[address] = times
        else:
            self._failures.pop(address, None)
        return times

    def wait(self, address: str) -> float:
        """Seconds ``address`` must wait before its next login (0: it may try now)."""
        with self._lock:
            times = self._recent(address)
            if len(times) < self.attempts:
                return 0.0
            return max(0.0, times[-self.attempts] + self.window - self.clock())

    def failed(self, address: str) -> int:
        """Record a failed login; returns the attempts ``address`` has left in the window."""
        with self._lock:
            times = self._recent(address)
            times.append(self.clock())
            self._failures[address] = times
            return max(0, self.attempts - len(times))

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._failures.pop(address, None)


_LOGIN_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>wpeft workbench: log in</title>
<style>
body {{ font-family: system-ui, sans-serif; background: #f4f6f8; display: flex;
       justify-content: center; margin-top: 12vh; }}
form {{ background: white; padding: 2em 2.5em; border-radius: 6px; min-width: 300px;
       box-shadow: 0 1px 4px rgba(0, 0, 0, 0.15); }}
h1 {{ font-size: 1.3em; color: #0072B2; margin-top: 0; }}
label, input {{ display: block; width: 100%; box-sizing: border-box; }}
input {{ margin: 0.3em 0 1em; padding: 0.5em; }}
button {{ background: #0072B2; color: white; border: 0; padding: 0.6em 1.5em; border-radius: 4px; }}
.error {{ background: #fdecea; border: 1px solid #f1aeb5; color: #58151c; padding: 0.5em;
          border-radius: 4px; margin-bottom: 1em; }}
</style></head>
<body><form action="{action}" method="post" class="wb-login">
<h1>wpeft workbench</h1>{message}
<label for="username">User</label><input id="username" name="username" type="text" autofocus>
<label for="password">Password</label><input id="password" name="password" type="password">
<button type="submit">Log in</button></form></body></html>
"""


def _password_ok(users: str, username: str, password: str) -> bool:
    """``password`` is ``username``'s in the ``--basic-auth`` file (read at every login, so
    edits apply without a restart), or the one shared password."""
    import hmac

    path = Path(users).expanduser()
    if path.is_file():
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return False
        expected = table.get(username) if isinstance(table, dict) else None
        return isinstance(expected, str) and hmac.compare_digest(expected, password)
    return hmac.compare_digest(users, password)


def _login_handler(users: str, limiter: LoginLimiter) -> type:
    """Panel's basic-auth login handler with ``limiter`` applied and a login page of our own
    (Panel's loads its logo and icon from a public CDN; this one needs nothing else)."""
    import html

    from panel.auth import BasicLoginHandler

    class RateLimitedLoginHandler(BasicLoginHandler):
        def _page(self, message: str, status: int = 200) -> None:
            box = f'<p class="error" role="alert">{html.escape(message)}</p>' if message else ""
            self.set_status(status)
            self.write(_LOGIN_PAGE.format(action=html.escape(self._login_endpoint), message=box))

        def get(self) -> None:
            from panel.auth import _validate_next_url
            from panel.io.state import state

            next_url = _validate_next_url(self.get_argument("next", state.base_url))
            if next_url:
                self.set_cookie("next_url", next_url)
            self._page(self.get_argument("error", ""))

        def _validate(self, username: str, password: str) -> bool:
            return _password_ok(users, username, password)

        def post(self) -> None:
            address = self.request.remote_ip or "unknown"
            wait = limiter.wait(address)
            if wait > 0:
                self.set_header("Retry-After", str(int(wait) + 1))
                self._page(f"Too many failed logins from your address: try again in "
                           f"{int(wait) + 1} s.", status=429)
                return
            if self._validate(self.get_argument("username", ""),
                              self.get_argument("password", "")):
                limiter.succeeded(address)
                super().post()
                return
            left = limiter.failed(address)
            after = (f"{left} more {'try' if left == 1 else 'tries'} before a pause"
                     if left else f"next try in {limiter.window:g} s")
            self._page(f"Invalid user name or password ({after}).", status=401)

    return RateLimitedLoginHandler


def _auth_provider(users: str, limiter: LoginLimiter) -> Any:
    """Panel's :class:`~panel.auth.BasicAuthProvider` serving :func:`_login_handler`."""
    from panel.auth import BasicAuthProvider

    handler = _login_handler(users, limiter)

    class RateLimitedAuthProvider(BasicAuthProvider):
        @property
        def login_handler(self) -> type:
            handler._login_endpoint = self._login_endpoint
            return handler

    return RateLimitedAuthProvider()


def closed_tab_exception(context: dict[str, Any]) -> bool:
    """True when an asyncio error ``context`` is only a write to a browser tab that has just
    closed (tornado's ``WebSocketClosedError`` / ``StreamClosedError`` from a message Bokeh was
    still sending): routine when a user closes a tab, not a server fault."""
    from tornado.iostream import StreamClosedError
    from tornado.websocket import WebSocketClosedError

    return isinstance(context.get("exception"), (WebSocketClosedError, StreamClosedError))


def _quiet_closed_tabs(loop: asyncio.AbstractEventLoop) -> None:
    """Log a write to a closed tab as one debug line instead of an asyncio traceback; every
    other loop error goes to the previous (default) handler."""
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if closed_tab_exception(context):
            log.debug("a browser tab closed while the server wrote to it")
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def _exit_with_parent(interval: float = 0.5) -> None:
    """In a forked server process: exit as soon as the process that forked it is gone (a
    terminated ``wpeft serve --num-procs N`` leaves no server behind)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(0)

    threading.Thread(target=watch, name="wpeft-serve-parent-watch", daemon=True).start()


def main(args: argparse.Namespace) -> int:
    """Serve the workbench until interrupted. Returns an exit code (2: bad arguments)."""
    from wpeft.app.catalog import RunsDirError, catalog_for, check_runs_dir

    try:
        root = check_runs_dir(args.runs_dir)
    except RunsDirError as e:
        print(f"wpeft serve: {e}", file=sys.stderr)
        return 2
    if not 0 <= args.port <= 65535:
        print(f"wpeft serve: --port {args.port} is not a TCP port (0-65535).", file=sys.stderr)
        return 2
    if args.basic_auth and args.oauth_provider:
        print("wpeft serve: choose --basic-auth or --oauth-provider, not both.", file=sys.stderr)
        return 2
    if args.basic_auth:
        problem = _check_basic_auth(args.basic_auth)
        if problem:
            print(f"wpeft serve: {problem}", file=sys.stderr)
            return 2
    if args.poll_seconds < 0.2:
        print("wpeft serve: --poll-seconds must be at least 0.2.", file=sys.stderr)
        return 2
    if args.num_procs < 0:
        print(f"wpeft serve: --num-procs {args.num_procs} must be >= 0 (0: one process per "
              "CPU core).", file=sys.stderr)
        return 2
    try:
        limiter = LoginLimiter(args.login_attempts, args.login_window)
    except ValueError as e:
        print(f"wpeft serve: {e}", file=sys.stderr)
        return 2
    login = bool(args.basic_auth or args.oauth_provider)
    cookie_secret = args.cookie_secret
    if login and not cookie_secret:
        cookie_secret = secrets.token_urlsafe(32)  # logins last until the server restarts
    if not login and not _is_loopback(args.address):
        print(
            f"wpeft serve: warning: binding {args.address} without --basic-auth or "
            "--oauth-provider: anyone who can reach this port can read every run.",
            file=sys.stderr,
        )

    try:
        import panel as pn
    except ImportError:
        print("wpeft serve: error: the workbench needs Panel; install the app extra: "
              "pip install -e '.[app]'", file=sys.stderr)
        return 2

    from wpeft.app.workbench import build_workbench
    from wpeft.viz.interactive import _hv

    _hv()  # import HoloViews and its bokeh backend now, not in the first visitor's session
    # read the runs table and the default run's records once for everyone (before a fork,
    # so every server process starts with them)
    catalog_for(root).warm_up()

    poll_ms = int(1000 * args.poll_seconds)
    quieted: list[asyncio.AbstractEventLoop] = []

    def app() -> object:  # a plain function: Panel calls it once per session
        loop = asyncio.get_event_loop()  # the serving process's (after a fork, its own)
        if loop not in quieted:
            _quiet_closed_tabs(loop)
            quieted.append(loop)
        return build_workbench(root, poll_ms=poll_ms)

    auth: dict[str, Any] = {
        "cookie_secret": cookie_secret,
        "oauth_provider": args.oauth_provider,
        "oauth_key": args.oauth_key,
        "oauth_secret": args.oauth_secret,
        "oauth_redirect_uri": args.oauth_redirect_uri,
        "oauth_encryption_key": args.oauth_encryption_key,
    }
    if args.basic_auth:  # Panel's basic auth, with failed logins rate-limited per address
        auth["auth_provider"] = _auth_provider(args.basic_auth, limiter)
    if args.port:
        print(f"wpeft serve: the workbench of {root.name!r} is at "
              f"http://{args.address}:{args.port}/workbench", flush=True)
    if args.num_procs == 1:
        asyncio.set_event_loop(asyncio.new_event_loop())  # tornado's IOLoop.current()
    else:  # each forked process makes its own loop, and must not outlive this one
        os.register_at_fork(after_in_child=_exit_with_parent)
    pn.serve(
        {"workbench": app},
        port=args.port,
        address=args.address,
        websocket_origin=_origins(args, args.port),
        show=args.show,
        num_procs=args.num_procs,
        title="wpeft workbench",
        verbose=True,
        **{k: v for k, v in auth.items() if v},
    )
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m wpeft.app.serve",
        description="Serve the wpeft workbench (Panel) over a runs directory.",
    )
    add_arguments(parser)
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    """``python -m wpeft.app.serve`` (parse ``argv``, then :func:`main`)."""
    return main(_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run())
