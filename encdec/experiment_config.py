"""Experiment files: YAML into frozen dataclasses, every key and value checked.

An experiment file only chooses values; what each value means is the docstring under its field.
:func:`read_yaml` reads the file, :func:`build` applies ``--set a.b=value`` overrides (the value
is parsed as YAML, so ``--set num_slots=[8,16]`` is a list) and builds the config with
:func:`from_dict`. An unknown key, a value of the wrong type or one a class's ``__post_init__``
rejects is a :class:`ConfigError` naming the key (``workloads[1].arrival: ...``).

A ``__post_init__`` names the offending field either with ``ConfigError(field, message)`` or
with ``ValueError("field: message")``; :func:`from_dict` prefixes the field with the key of
the section the class was built for (``train.steps: must be positive``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """An experiment config is invalid; the message starts with the offending key."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


def require(ok: bool, key: str, message: str) -> None:
    """Raise ``ConfigError(key, message)`` unless ``ok``: a config class's own rule."""
    if not ok:
        raise ConfigError(key, message)


def plain(x: Any) -> Any:
    """Tuples to lists, recursively: what YAML and JSON hold."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


# --- building dataclasses from plain data -------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            require(value is not None, key, f"must be {_type_name(options[0])}, got null")
            return _convert(options[0], value, key)
        # The first option that takes the value; a scalar is a one-item tuple only as a last resort.
        for option in sorted(options, key=lambda a: typing.get_origin(a) is tuple):
            try:
                return _convert(option, value, key)
            except ConfigError:
                continue
        raise ConfigError(key, f"{value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        choices = args[0] if len(args) == 1 and isinstance(args[0], tuple) else args
        require(value in choices, key, f"{value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is tuple:
        items = value if isinstance(value, list) else [value]
        return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(items))
    if origin is dict:
        require(isinstance(value, dict), key, f"must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is bool:
        require(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        require(ok, key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        require(ok, key, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        require(isinstance(value, str), key, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported config type {tp!r}")


def _rule_error(e: ValueError, fields: dict[str, Any]) -> ConfigError:
    """A ``__post_init__`` error as a ConfigError keyed relative to its class."""
    if isinstance(e, ConfigError):
        return e
    name, sep, message = str(e).partition(": ")
    return ConfigError(name, message) if sep and name in fields else ConfigError("", str(e))


def from_dict(cls: type[T], data: Any, key: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, checking keys, types and each class's own rules."""
    where = key or "config"
    require(isinstance(data, dict), where, f"must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        sub = f"{key}.{unknown[0]}" if key else str(unknown[0])
        raise ConfigError(sub, f"unknown key (known: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{key}.{name}" if key else name
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(sub, "is required")
    try:
        return cls(**kwargs)
    except ValueError as e:  # a class's own rule: its key is relative to the class
        error = _rule_error(e, fields)
        if key:
            error = ConfigError(f"{key}.{error.key}" if error.key else key, error.message)
        if error is e:
            raise
        raise error from None


# --- overrides and loading ----------------------------------------------------------------------


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` to raw config data in place.

    The value is YAML. A numeric part indexes a list (``workloads.0.rate=2``); any other part
    applied to a list sets it in every element (``workloads.num_requests=8``).
    """
    if "=" not in assignment:
        raise ConfigError(assignment, "an override must look like key=value")
    path, raw = assignment.split("=", 1)
    parts = path.strip().split(".")
    require(all(parts), path, "empty key in override")
    value = yaml.safe_load(raw) if raw.strip() else ""
    _set(data, parts, value, "")


def _set(node: Any, parts: list[str], value: Any, prefix: str) -> None:
    head, rest = parts[0], parts[1:]
    if isinstance(node, list):
        if head.lstrip("-").isdigit():
            i = int(head)
            ok = -len(node) <= i < len(node)
            require(ok, f"{prefix}[{head}]", f"index out of range ({len(node)} items)")
            if rest:
                _set(node[i], rest, value, f"{prefix}[{i}]")
            else:
                node[i] = value
        else:
            for i, item in enumerate(node):
                _set(item, parts, value, f"{prefix}[{i}]")
        return
    key = f"{prefix}.{head}" if prefix else head
    require(isinstance(node, dict), prefix or key, f"cannot set {head!r} inside {node!r}")
    if not rest:
        node[head] = value
        return
    if head not in node or node[head] is None:
        node[head] = {}
    _set(node[head], rest, value, key)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping at the top of an experiment file; an empty file is ``{}``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"experiment file {path} does not exist")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError("", f"{path} is not valid YAML: {e}") from e
    if data is None:
        data = {}
    require(isinstance(data, dict), str(path), "must be a mapping at the top level")
    return data


def build(cls: type[T], data: dict[str, Any] | None, overrides: Sequence[str] = ()) -> T:
    """Apply ``--set`` overrides to a copy of raw config data and build ``cls`` from it."""
    data = plain(data or {})
    for assignment in overrides:
        apply_override(data, assignment)
    return from_dict(cls, data)
