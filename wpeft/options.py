"""Settings given as ``key=value`` (CLI) or a dict (Python), checked against a config dataclass.

A method's or task's settings are checked by name and by type *before* anything is built, so
``--method-option rank=abc`` is refused in a line instead of failing inside the model after a
minute of set-up.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal, Union

from wpeft.errors import ConfigError

__all__ = ["check_settings", "parse_key_values"]


def parse_key_values(items: list[str], flag: str) -> dict[str, Any]:
    """``["rank=4", "targets=[\\"qkv\\"]"]`` -> ``{"rank": 4, "targets": ["qkv"]}``: values are
    parsed as JSON where they can be (numbers, true/false, lists), else kept as strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r} is not KEY=VALUE (e.g. {flag} rank=4).")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _accepts(tp: Any, value: Any) -> bool:
    """Whether ``value`` fits the annotation ``tp`` (scalars, Optional/Union, Literal, tuples
    and lists of scalars, dicts; anything else is left to the config's own checks)."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_accepts(t, value) for t in typing.get_args(tp))
    if origin is Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return not args or len(set(args)) > 1 or all(_accepts(args[0], v) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return True


def _describe(tp: Any) -> str:
    text = str(tp).replace("typing.", "")
    return getattr(tp, "__name__", text) if typing.get_origin(tp) is None else text


def check_settings(config_cls: type, settings: dict[str, Any], what: str) -> None:
    """Refuse unknown names and values of the wrong type for ``config_cls`` (a dataclass).

    Args:
        config_cls: The config dataclass (a method's or task's ``Config``).
        settings: ``{name: value}`` as a user gave them.
        what: How to name the owner in messages, e.g. ``"method 'lora'"``.

    Raises:
        ConfigError: naming the setting, the bad value, and what would be accepted.
    """
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise ConfigError(f"{what} has no setting(s) {unknown}; its settings: {sorted(fields)}.")
    hints = typing.get_type_hints(config_cls)
    for name, value in settings.items():
        tp = hints.get(name, Any)
        if not _accepts(tp, value):
            raise ConfigError(
                f"{what}: {name}={value!r} is not a valid {_describe(tp)} "
                f"(default {_default(fields[name])!r})."
            )


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None
