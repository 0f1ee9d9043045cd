"""YAML files + `key=value` overrides into typed, nested dataclasses.

Every recipe builds its settings this way, so every recipe rejects a typo the same way: an unknown key or
a value of the wrong type is an error that names the dotted key (with a close-match suggestion), never a
setting silently ignored.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path

import yaml


class ConfigKeyError(ValueError):
    """A config key or value that does not fit the recipe's typed settings."""


T = typing.TypeVar("T")


def load_config(cls: type[T], path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> T:
    """Reads `path` (YAML), applies `a.b=value` overrides (values parsed as YAML scalars/lists), builds `cls`."""
    raw = apply_overrides(read_yaml(path) if path else {}, overrides)
    return build(cls, raw, str(path) if path else "<defaults>")


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping; a syntax error names the file and line."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigKeyError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigKeyError(f"{path}{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        raise ConfigKeyError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def apply_overrides(raw: dict, overrides: typing.Sequence[str]) -> dict:
    """Sets each `a.b=value` in the nested dict (the value is parsed as YAML: 3, 1e-5, true, [a, b])."""
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key.strip():
            raise ConfigKeyError(f"override {override!r} is not of the form key=value (e.g. train.max_steps=100)")
        _set_dotted(raw, key.strip(), yaml.safe_load(value) if value.strip() else None)
    return raw


def build(cls: type[T], data: dict, source: str = "<config>", prefix: str = "") -> T:
    """Builds dataclass `cls` from a nested dict, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigKeyError(f"{source}: '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {sorted(known)}"
            raise ConfigKeyError(f"{source}: unknown key '{prefix}{key}'{hint}")
    values = {key: _coerce(hints[key], value, source, f"{prefix}{key}") for key, value in data.items()}
    try:
        return cls(**values)
    except TypeError as err:
        raise ConfigKeyError(f"{source}: {prefix or 'config'} is incomplete: {err}") from None
    except ValueError as err:
        raise ConfigKeyError(f"{source}: {err}") from None


def to_dict(config) -> dict:
    """The plain nested dict of a config (for saving next to checkpoints and in metrics files)."""
    return dataclasses.asdict(config)


def _coerce(tp, value, source: str, key: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value if value is not None else {}, source, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, source, key)
            except ConfigKeyError as err:
                errors.append(str(err))
        raise ConfigKeyError(errors[-1])
    if origin is typing.Literal:
        if value not in args:
            raise ConfigKeyError(f"{source}: '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        items = value if isinstance(value, (list, tuple)) else [value]
        item_type = args[0] if args else typing.Any
        return origin(_coerce(item_type, item, source, f"{key}[{i}]") for i, item in enumerate(items))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigKeyError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return value
    if tp is typing.Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigKeyError(f"{source}: '{key}' must be {getattr(tp, '__name__', tp)}, got {value!r}")


def _set_dotted(raw: dict, key: str, value):
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigKeyError(f"override {key}: '{part}' is a value, not a section")
    node[parts[-1]] = value
