"""Exceptions raised at wpeft's boundaries (data, configs, checkpoints).

Each error message names the bad value and says how to fix it. They subclass the built-in
exception a caller would expect (``ValueError`` for bad input), so ``except ValueError`` works.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "DataError", "WpeftError"]


class WpeftError(Exception):
    """Base class for every error wpeft raises on purpose."""


class DataError(WpeftError, ValueError):
    """Input data is unusable: unknown variable, wrong grid, NaNs, bad coordinates."""


class ConfigError(WpeftError, ValueError):
    """A configuration value is out of range or inconsistent."""


class CheckpointError(WpeftError, RuntimeError):
    """A checkpoint is missing, corrupt, or does not match the model it is loaded into."""
