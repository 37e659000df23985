"""Writing a benchmark's result: the Markdown table printed and saved, its rows as JSON beside it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def write_report(text: str, rows: Sequence[dict[str, Any]], out: Path | None) -> None:
    """Print ``text``; with ``out``, write it there and ``rows`` to ``out`` with suffix .json."""
    print(text)
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    out.with_suffix(".json").write_text(json.dumps(list(rows), indent=1) + "\n")
