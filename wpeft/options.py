"""Settings given as ``key=value`` (CLI), a YAML / JSON file (CLI) or a dict (Python), checked
against a config dataclass.

A method's or task's settings are checked by name and by type *before* anything is built, so
``--method-option rank=abc`` is refused in a line instead of failing inside the model after a
minute of set-up. A field typed as a dataclass (a task's ``world: WorldConfig``) takes a mapping
of that dataclass's fields, checked the same way, one level down; the config's own
``__post_init__`` turns it into the dataclass.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from wpeft.errors import ConfigError

__all__ = ["check_settings", "load_settings_file", "parse_key_values"]


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


def set_dotted(options: dict[str, Any], key: str, value: Any) -> None:
    """``options["data"]["path"] = value`` for ``key="data.path"``: a dotted key reaches into
    nested mappings (made where missing), so one field of a nested setting can be changed."""
    *parents, last = key.split(".")
    node = options
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"Setting {part!r} is not a mapping; cannot set {key!r}.")
        node = child
    node[last] = value


class _SettingsLoader(yaml.SafeLoader):
    """PyYAML's safe loader (YAML 1.1) with two YAML 1.2 habits that settings need: ``1e-3``
    is a number (1.1 reads it as text), and a date such as ``2020-01-01`` stays text (JSON, in
    which runs record their settings, has no dates; configs parse their own time strings)."""


_SettingsLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SettingsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _json_problem(value: Any, where: str) -> str | None:
    """Where ``value`` holds something JSON cannot (a non-text key, a set, bytes), or None."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"key {k!r} under {where} is not text (quote it)"
            problem = _json_problem(v, f"{where}.{k}" if where != "the top level" else k)
            if problem:
                return problem
        return None
    if isinstance(value, list):
        for i, v in enumerate(value):
            problem = _json_problem(v, f"{where}[{i}]")
            if problem:
                return problem
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return None
    return f"{where} is a {type(value).__name__}, which settings cannot hold"


def load_settings_file(path: str | Path, flag: str = "--data") -> dict[str, Any]:
    """The settings in a YAML (or, for ``*.json``, JSON) file whose top level is a mapping.

    Values may nest (mappings, lists), e.g. ``world: {nlat: 16, nlon: 32}`` or
    ``split_fractions: [0.6, 0.2, 0.2]``; they are checked against the config they are meant for
    by :func:`check_settings` later, where the names and types are known. YAML is read safely
    (no Python objects) with ``1e-3`` as a number and dates kept as text.

    Args:
        path: The file.
        flag: How messages name the option that gave the file.

    Raises:
        ConfigError: one line naming the file and the problem -- it is missing or unreadable,
            not valid YAML / JSON (with the line and column), empty, its top level is not a
            mapping, or it holds something JSON cannot (a non-text key, a set).
    """
    p = Path(path)
    name = f"{flag} {path}"
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "does not exist"
        raise ConfigError(
            f"{name}: the file {what}; give a YAML or JSON file of KEY: VALUE settings."
        )
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(
            f"{name}: the file is not UTF-8 text; give a YAML or JSON file."
        ) from None
    except OSError as e:
        raise ConfigError(
            f"{name}: cannot read the file ({e.strerror}); check its permissions."
        ) from None
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"{name}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})."
            ) from None
    else:
        try:
            data = yaml.load(text, Loader=_SettingsLoader)  # a safe loader
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            problem = _one_line(getattr(e, "problem", None) or e)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"{name}: not valid YAML ({problem}{at}).") from None
    if data is None:
        raise ConfigError(f"{name}: the file is empty; write one KEY: VALUE setting per line.")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{name}: the top level is a {type(data).__name__}, not a mapping of settings; "
            "write one KEY: VALUE setting per line (e.g. surface_weight: 0.5)."
        )
    problem = _json_problem(data, "the top level")
    if problem:
        raise ConfigError(f"{name}: {problem}.")
    return data


def _dataclass_of(tp: Any) -> type | None:
    """The dataclass ``tp`` names, directly or as a member of a Union (``X | None``)."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        for t in typing.get_args(tp):
            found = _dataclass_of(t)
            if found is not None:
                return found
    return None


def _accepts(tp: Any, value: Any) -> bool:
    """Whether ``value`` fits the annotation ``tp`` (scalars, Optional/Union, Literal, tuples
    and lists of scalars, dicts, a dataclass or a mapping of its fields; anything else is left
    to the config's own checks)."""
    if tp is Any:
        return True
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return isinstance(value, (tp, Mapping))
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

    A field typed as a dataclass (or ``X | None`` of one) takes an instance or a mapping of the
    dataclass's fields; a mapping is checked against them in turn (``"world: nlat='x' is not a
    valid int"``) and left for the config's ``__post_init__`` to turn into the dataclass.
    Tuple-typed fields take lists (as YAML, JSON and ``--task-option`` give them).

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
        nested = _dataclass_of(tp)
        if not _accepts(tp, value) and nested is not None:
            raise ConfigError(
                f"{what}: {name}={value!r} is not a {nested.__name__} or a mapping of its fields "
                f"(e.g. {name}: {{{dataclasses.fields(nested)[0].name}: ...}})."
            )
        if not _accepts(tp, value):
            raise ConfigError(
                f"{what}: {name}={value!r} is not a valid {_describe(tp)} "
                f"(default {_default(fields[name])!r})."
            )
        if nested is not None and isinstance(value, Mapping):
            bad_keys = [k for k in value if not isinstance(k, str)]
            if bad_keys:
                raise ConfigError(f"{what}: {name} has key {bad_keys[0]!r}, not a setting name.")
            check_settings(nested, dict(value), f"{what}: {name}")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None
