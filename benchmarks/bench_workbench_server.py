"""The served workbench's own share of a page and a view switch, with S concurrent sessions.

`bench_workbench_load.py` times sessions in headless chromium on the same machine as the server,
so most of what it measures under load is the browsers laying out Bokeh figures (ten chromium
processes on 2 cores). Here each session is a Bokeh protocol client instead (a websocket
speaking the same messages as BokehJS, no rendering: a few milliseconds of CPU per step), so
the times are the server's: what a team's users see from it when their browsers run on their own
machines. Per session:

* first page: ``GET /workbench`` (the server builds the session: widgets and the overview) and
  the document pulled over the websocket (``PULL-DOC-REQ`` -> ``PULL-DOC-REPLY``);
* each view switch: the nav button group's ``active`` set, as a click does (``PATCH-DOC``),
  until the server's patch that puts the view into the page has arrived (Panel handles a change
  after a 50 ms debounce; that wait is counted), then until a round trip (``SERVER-INFO-REQ``)
  confirms the server has nothing more queued for the session.

All sessions start together and switch views in the same order (the worst case for a shared
server). Prints a table (median, p95, max) per session count and appends it with ``--out``::

    python benchmarks/bench_workbench_server.py --runs-dir /tmp/wb-runs --sessions 1 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_workbench_load import Server, _pct, prepare_runs_dir

#: Nav labels in the order the sessions switch (the overview is where a session starts).
VIEWS = ("Fisher masks", "Prompt attention", "Skill maps", "Budget vs skill", "Curves",
         "Scorecard", "Overview")
RESULTS = Path(__file__).parent / "results" / "workbench-load-cpu.md"


@dataclass
class SessionTimes:
    first_page: float | None = None
    switches: dict[str, float] = field(default_factory=dict)  # until the view's patch
    settled: dict[str, float] = field(default_factory=dict)  # until the round trip after it
    failures: list[str] = field(default_factory=list)


def _objects(node: Any) -> Any:
    """Every serialised Bokeh model (``{"type": "object", "name": ..., "id": ...}``) in a
    document's JSON, depth first."""
    if isinstance(node, dict):
        if node.get("type") == "object" and "id" in node:
            yield node
        for value in node.values():
            yield from _objects(value)
    elif isinstance(node, list):
        for value in node:
            yield from _objects(value)


def _find(doc: dict[str, Any], name: str, css: str) -> dict[str, Any]:
    """The model of class ``name`` (Bokeh's or Panel's: ``panel.models.widgets.Name``) with
    css class ``css``."""
    for obj in _objects(doc):
        if (obj.get("name", "").rsplit(".", 1)[-1] == name
                and css in obj.get("attributes", {}).get("css_classes", [])):
            return obj
    raise LookupError(f"no {name} with css class {css!r} in the pulled document")


class ProtocolSession:
    """One workbench session driven over the Bokeh websocket protocol (no rendering)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.ws: Any = None

    async def open(self) -> dict[str, Any]:
        """GET the page, connect, pull the document; returns its JSON."""
        from bokeh.client.websocket import WebSocketClientConnectionWrapper
        from bokeh.protocol import Protocol
        from bokeh.protocol.receiver import Receiver
        from tornado.httpclient import AsyncHTTPClient
        from tornado.websocket import websocket_connect

        page = await AsyncHTTPClient().fetch(f"{self.base}/workbench", request_timeout=300)
        html = page.body.decode()
        match = re.search(r'"token":\s*"([^"]+)"', html) or re.search(r"token=([\w.-]+)", html)
        if match is None:
            raise RuntimeError("no session token in the page: is this a Bokeh server app?")
        self.protocol = Protocol()
        self.receiver = Receiver(self.protocol)
        ws_url = self.base.replace("http://", "ws://") + "/workbench/ws"
        self.ws = await websocket_connect(ws_url, subprotocols=["bokeh", match.group(1)],
                                          max_message_size=1 << 30)
        self.conn = WebSocketClientConnectionWrapper(self.ws)
        await self.next("ACK")
        request = self.protocol.create("PULL-DOC-REQ")
        await request.send(self.conn)
        reply = await self.next("PULL-DOC-REPLY")
        await self.ready()
        await self.roundtrip()
        return reply.content["doc"]

    async def message(self) -> Any:
        while True:
            fragment = await self.ws.read_message()
            if fragment is None:
                raise ConnectionError("the server closed the session's websocket")
            msg = await self.receiver.consume(fragment)
            if msg is not None:
                if msg.msgtype == "ERROR":
                    raise RuntimeError(f"server error: {msg.content}")
                return msg

    async def next(self, msgtype: str) -> Any:
        while True:
            msg = await self.message()
            if msg.msgtype == msgtype:
                return msg

    async def patch(self, *events: dict[str, Any]) -> None:
        from bokeh.protocol.messages.patch_doc import patch_doc

        await patch_doc(patch_doc.create_header(), {}, {"events": list(events)}).send(self.conn)

    async def ready(self) -> None:
        """Tell the server the page is shown, as BokehJS does once the document is rendered
        (Panel holds a session's layout updates until then)."""
        await self.patch({"kind": "MessageSent", "msg_type": "bokeh_event", "msg_data": {
            "type": "event", "name": "document_ready", "values": {"type": "map", "entries": []}}})

    async def set(self, model_id: str, attr: str, value: Any) -> None:
        await self.patch({"kind": "ModelChanged", "model": {"id": model_id}, "attr": attr,
                          "new": value})

    async def until_patched(self, model_id: str, attr: str) -> None:
        """Until a ``PATCH-DOC`` from the server changes ``attr`` of model ``model_id``."""
        while True:
            msg = await self.next("PATCH-DOC")
            for event in msg.content.get("events", []):
                if (event.get("kind") == "ModelChanged" and event.get("attr") == attr
                        and event.get("model", {}).get("id") == model_id):
                    return

    async def roundtrip(self) -> None:
        request = self.protocol.create("SERVER-INFO-REQ")
        await request.send(self.conn)
        while True:
            msg = await self.next("SERVER-INFO-REPLY")
            if msg.header.get("reqid") == request.header["msgid"]:
                return

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()


async def _session(base: str, start: asyncio.Event, step: asyncio.Barrier,
                   timeout: float) -> SessionTimes:
    times = SessionTimes()
    client = ProtocolSession(base)
    await start.wait()
    t = time.perf_counter()
    try:
        doc = await asyncio.wait_for(client.open(), timeout)
        times.first_page = time.perf_counter() - t
        nav = _find(doc, "RadioButtonGroup", "wb-nav")
        main = _find(doc, "Column", "wb-main")
        labels = nav["attributes"]["labels"]
        for label in VIEWS:
            await step.wait()  # every session switches at once
            t = time.perf_counter()
            try:
                await client.set(nav["id"], "active", labels.index(label))
                await asyncio.wait_for(client.until_patched(main["id"], "children"), timeout)
                times.switches[label] = time.perf_counter() - t
                await asyncio.wait_for(client.roundtrip(), timeout)
                times.settled[label] = time.perf_counter() - t
            except (TimeoutError, asyncio.TimeoutError):
                times.failures.append(f"{label}: timeout")
    except Exception as e:  # noqa: BLE001 -- a failed session is a result
        times.failures.append(f"{type(e).__name__}: {e}")
        await step.abort()
    finally:
        client.close()
    return times


async def drive(base: str, sessions: int, timeout: float) -> list[SessionTimes]:
    start, step = asyncio.Event(), asyncio.Barrier(sessions)
    tasks = [asyncio.create_task(_session(base, start, step, timeout)) for _ in range(sessions)]
    await asyncio.sleep(0.2)
    start.set()
    return list(await asyncio.gather(*tasks))


def summarise(sessions: int, results: list[SessionTimes], server: Server, cpu_s: float,
              wall_s: float) -> dict[str, Any]:
    first = [r.first_page for r in results if r.first_page is not None]
    switch = [v for r in results for v in r.switches.values()]
    settled = [v for r in results for v in r.settled.values()]

    def stats(values: list[float]) -> tuple[float, float, float]:
        if not values:
            return (float("nan"),) * 3  # type: ignore[return-value]
        return statistics.median(values), _pct(values, 0.95), max(values)

    return {
        "sessions": sessions, "first": stats(first), "switch": stats(switch),
        "settled": stats(settled),
        "per_view": {v: statistics.median([r.switches[v] for r in results if v in r.switches]
                                          or [float("nan")]) for v in VIEWS},
        "failures": [f for r in results for f in r.failures],
        "server_cpu_pct": 100 * cpu_s / wall_s, "rss_peak_mb": server.rss_peak / 1e6,
        **server.errors(),
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| sessions | first page median / p95 / max (s) | view switch median / p95 / max (s) "
            "| with the round trip after it, median / p95 (s) | failures | server tracebacks "
            "| 'error handling message' | server CPU | server RSS peak (MB) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        f, s, t = r["first"], r["switch"], r["settled"]
        lines.append(
            f"| {r['sessions']} | {f[0]:.2f} / {f[1]:.2f} / {f[2]:.2f} "
            f"| {s[0]:.2f} / {s[1]:.2f} / {s[2]:.2f} | {t[0]:.2f} / {t[1]:.2f} "
            f"| {len(r['failures'])} | {r['tracebacks']} | {r['error handling message']} "
            f"| {r['server_cpu_pct']:.0f} % | {r['rss_peak_mb']:.0f} |")
    lines += ["", "Median switch per view (s):", "",
              "| sessions | " + " | ".join(VIEWS) + " |", "|" + "---|" * (len(VIEWS) + 1)]
    for r in rows:
        lines.append(f"| {r['sessions']} | "
                     + " | ".join(f"{r['per_view'][v]:.2f}" for v in VIEWS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="runs in the directory (50)")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="reuse (or create) this runs directory")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--timeout", type=float, default=60.0, help="per page/switch (s)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra argument of wpeft.app.serve (repeatable)")
    parser.add_argument("--label", default="", help="what this measurement is (in the report)")
    parser.add_argument("--out", type=Path, default=None, help="append the table to this file")
    args = parser.parse_args(argv)

    root = prepare_runs_dir(args.runs_dir, args.runs)
    n = sum(1 for _ in root.glob("downscaling/*/config.json"))
    rows = []
    for s in args.sessions:
        server = Server(root, root.parent / f"server-protocol-{s}.log", args.server_arg)
        try:
            server.wait_ready()
            cpu0, t0 = server.cpu_seconds(), time.perf_counter()
            results = asyncio.run(drive(server.base, s, args.timeout))
            row = summarise(s, results, server, server.cpu_seconds() - cpu0,
                            time.perf_counter() - t0)
        finally:
            server.stop()
        rows.append(row)
        print(f"{s} sessions: {json.dumps(row, default=str)}", flush=True)
    out = table(rows)
    print(out)
    if args.out is not None:
        load = os.getloadavg()
        text = (f"\n### {args.label or 'server share under load (protocol clients)'}\n\n"
                f"`benchmarks/bench_workbench_server.py`: {n} runs, {os.cpu_count()} CPU cores, "
                f"load average before {load[0]:.2f}; server args {args.server_arg or 'default'}; "
                f"{time.strftime('%Y-%m-%d %H:%M')}\n\n{out}\n")
        args.out.write_text((args.out.read_text() if args.out.exists() else "") + text)
        print(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
