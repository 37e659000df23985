"""``wpeft serve RUNS_DIR``: the workbench on a Panel (Bokeh/Tornado) server.

Why a launcher of our own rather than ``panel serve``: safe defaults for serving to a team. It
binds 127.0.0.1 unless told otherwise, refuses a missing RUNS_DIR before starting (exit code 2),
checks a ``--basic-auth`` file before the first login needs it, creates a cookie secret when
authentication needs one, and warns when the server is reachable from other hosts without a
login. Every session gets its own widgets (:func:`wpeft.app.workbench.build_workbench` runs per
session); the data are shared through the process-wide cache of :mod:`wpeft.app.catalog`.

``python -m wpeft.app.serve RUNS_DIR --port 5006`` runs the same :func:`main` as
``wpeft serve``. ``panel serve apps/workbench.py --args RUNS_DIR`` serves the same page with
Panel's own options (OAuth providers, ``--num-procs``, ``--prefix``...).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["add_arguments", "main"]

DEFAULT_PORT = 5006


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
                        help="how often a page checks its runs for new records (default 2)")
    parser.add_argument("--show", action=argparse.BooleanOptionalAction, default=False,
                        help="open the page in a browser on start (default: --no-show)")


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


def main(args: argparse.Namespace) -> int:
    """Serve the workbench until interrupted. Returns an exit code (2: bad arguments)."""
    from wpeft.app.catalog import RunsDirError, check_runs_dir

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

    poll_ms = int(1000 * args.poll_seconds)

    def app() -> object:  # a plain function: Panel calls it once per session
        return build_workbench(root, poll_ms=poll_ms)

    auth = {
        "basic_auth": args.basic_auth or None,
        "cookie_secret": cookie_secret,
        "oauth_provider": args.oauth_provider,
        "oauth_key": args.oauth_key,
        "oauth_secret": args.oauth_secret,
        "oauth_redirect_uri": args.oauth_redirect_uri,
        "oauth_encryption_key": args.oauth_encryption_key,
    }
    if args.port:
        print(f"wpeft serve: the workbench of {root.name!r} is at "
              f"http://{args.address}:{args.port}/workbench", flush=True)
    pn.serve(
        {"workbench": app},
        port=args.port,
        address=args.address,
        websocket_origin=_origins(args, args.port),
        show=args.show,
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
