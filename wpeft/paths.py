"""Where wpeft keeps things on disk: the user cache (generated world data) and shipped files."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

__all__ = ["cache_dir", "package_data_dir"]


def cache_dir() -> Path:
    """The user cache directory (``$WPEFT_CACHE_DIR`` overrides the platform default)."""
    path = Path(os.environ.get("WPEFT_CACHE_DIR") or platformdirs.user_cache_dir("wpeft"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_data_dir() -> Path:
    """Files shipped inside the package (pretrained weights and their metadata)."""
    return Path(__file__).parent / "backbones" / "weights"
