"""Driving a served workbench from a headless browser: what the browser tests and the load
benchmark (``benchmarks/bench_workbench_load.py``) share.

The browser is Debian's chromium (``apt-get install chromium``), launched by Playwright with
``executable_path=CHROMIUM`` and :data:`CHROMIUM_ARGS`; ``playwright install`` is never needed.
"""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["CHROMIUM", "CHROMIUM_ARGS", "wait_for_server"]

CHROMIUM = "/usr/bin/chromium"
#: Headless, sandbox-free, and silent on the network (no updates, sync or background fetches).
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]


def wait_for_server(
    url: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0
) -> None:
    """Return once ``url`` answers 200; raise RuntimeError with the server's ``log`` when the
    process ``proc`` exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}):\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise RuntimeError(f"the server did not answer in {timeout} s:\n{log.read_text()}")
