"""YAML files + `key=value` overrides into typed, validated settings.

Every settings class is declared with `@settings`: a pydantic dataclass that forbids unknown keys and checks
each value's type and domain (`Annotated[int, Field(ge=1)]`, `Literal[...]`) when it is built. Recipes read
their config through `load_config`, so a typo or an out-of-range value is rejected once, where the config is
read, as one line naming the file, the dotted key and what it accepts (unknown keys get a close-match
suggestion). Numeric fields accept numeric strings, so YAML 1.1's string `1e-5` is the float 1e-5.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path

import annotated_types
import pydantic
import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError

from .errors import ConfigError


class ConfigKeyError(ConfigError):
    """A config key or value that does not fit the recipe's typed settings."""


class RawConfig(dict):
    """A config's nested dict that remembers which dotted keys `key=value` overrides set, so a bad key is
    blamed on the command line rather than on the YAML file (copies keep the record)."""

    overridden: frozenset = frozenset()


T = typing.TypeVar("T")
SETTINGS_CONFIG = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


def settings(cls: type[T]) -> type[T]:
    """Declares a settings section: a dataclass whose fields are validated (types, ranges, enums) on creation."""
    return pydantic.dataclasses.dataclass(cls, config=SETTINGS_CONFIG)


def load_config(cls: type[T], path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> T:
    """Reads `path` (YAML), applies `a.b=value` overrides (values parsed as YAML scalars/lists), builds `cls`."""
    raw = apply_overrides(read_yaml(path) if path else {}, overrides)
    return build(cls, raw, str(path) if path else "<defaults>")


SOURCE_ROOT = Path(__file__).resolve().parent.parent  # holds recipes/configs and recipes/data


def anchor_shipped_paths(value):
    """Relative paths into the shipped tree (`recipes/...`) that do not exist from the working directory are
    taken from the installed qforge, so shipped configs run from any directory; other values are untouched."""
    if isinstance(value, dict):
        return {key: anchor_shipped_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [anchor_shipped_paths(item) for item in value]
    if isinstance(value, str) and value.startswith("recipes/") and not Path(value).exists():
        shipped = SOURCE_ROOT / value
        return str(shipped) if shipped.exists() else value
    return value


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
    """Sets each `a.b=value` in the nested dict (the value is parsed as YAML: 3, 1e-5, true, [a, b]); returns
    it as a RawConfig that records the keys set."""
    raw = RawConfig(raw)
    raw.overridden = frozenset(getattr(raw, "overridden", ()))
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key.strip():
            raise ConfigKeyError(f"override {override!r} is not of the form key=value (e.g. train.max_steps=100)")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as err:
            raise ConfigKeyError(f"override {override!r}: invalid YAML value ({getattr(err, 'problem', err)})") from None
        _set_dotted(raw, key.strip(), parsed)
        raw.overridden |= {key.strip()}
    return raw


def build(cls: type[T], data: dict, source: str = "<config>") -> T:
    """Builds settings class `cls` from a nested dict; any problem is one ConfigKeyError line."""
    overridden = getattr(data, "overridden", frozenset())
    data = _prepare(cls, anchor_shipped_paths(data), source, "", overridden)
    try:
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as err:
        raise ConfigKeyError(_describe_error(cls, err.errors()[0], source, overridden)) from None


def _where(source: str, key: str, overridden: frozenset) -> str:
    """Where a dotted key was given: the command line when an override set it, a section holding it, or a key
    inside it (an unknown section made by `trian.max_steps=5`)."""
    given = any(key == o or key.startswith(f"{o}.") or o.startswith(f"{key}.") for o in overridden)
    return "command line" if given else source


def to_dict(config) -> dict:
    """The plain nested dict of a config (for saving next to checkpoints and in metrics files)."""
    return dataclasses.asdict(config)


def _unwrap(tp):
    """(type without Annotated/Optional, annotation metadata, whether None is allowed)."""
    meta, optional = [], False
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            meta += list(tp.__metadata__)
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp):
            rest = [a for a in typing.get_args(tp) if a is not type(None)]
            optional = True
            if len(rest) != 1:
                return typing.Union[tuple(rest)], meta, optional
            tp = rest[0]
        else:
            return tp, meta, optional


def _prepare(cls, data, source: str, prefix: str, overridden: frozenset = frozenset()):
    """Checks keys (with a close-match suggestion), turns an empty section (None) into {}, and a single value
    given for a list field (e.g. `data.train=a.jsonl`) into a one-element list."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigKeyError(f"{source}: '{prefix.rstrip('.') or '<root>'}' must be a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    out = {}
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {sorted(known)}"
            raise ConfigKeyError(f"{_where(source, f'{prefix}{key}', overridden)}: unknown key '{prefix}{key}'{hint}")
        tp, _, optional = _unwrap(hints[key])
        if dataclasses.is_dataclass(tp) and not (value is None and optional):
            value = _prepare(tp, value, source, f"{prefix}{key}.", overridden)
        elif typing.get_origin(tp) is list and value is not None:
            value = value if isinstance(value, (list, tuple)) else [value]
            item = _unwrap(typing.get_args(tp)[0])[0] if typing.get_args(tp) else None
            if item is not None and dataclasses.is_dataclass(item):
                value = [_prepare(item, v, source, f"{prefix}{key}[{i}].", overridden) for i, v in enumerate(value)]
        out[key] = value
    return out


def _type_at(cls, loc) -> typing.Any:
    tp = cls
    for part in loc:
        tp = _unwrap(tp)[0]
        if isinstance(part, str) and dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp, include_extras=True).get(part)
        elif isinstance(part, int) and typing.get_origin(tp) in (list, tuple):
            args = typing.get_args(tp)
            tp = args[min(part, len(args) - 1)] if typing.get_origin(tp) is tuple else args[0]
        else:
            return None
    return tp


_BOUNDS = ((annotated_types.Ge, "≥", "ge"), (annotated_types.Gt, ">", "gt"), (annotated_types.Le, "≤", "le"),
           (annotated_types.Lt, "<", "lt"))


def _expected(tp) -> str:
    """'int ≥ 1', 'float in [0, 1)', "one of ['a', 'b']", 'list of str', ... for an annotation."""
    base, meta, optional = _unwrap(tp)
    origin, args = typing.get_origin(base), typing.get_args(base)
    if origin is typing.Literal:
        text = f"one of {list(args)}"
    elif origin is list:
        text = f"a list of {_expected(args[0]) if args else 'values'}"
    elif origin is tuple:
        text = f"a pair of {_expected(args[0])}" if len(args) == 2 else f"a tuple of {len(args)} values"
    elif origin in (typing.Union, types.UnionType):
        text = " or ".join(_expected(a) for a in args)
    else:
        text = getattr(base, "__name__", str(base))
    bounds, finite = [], False
    for item in meta:
        for constraint in getattr(item, "metadata", [item]):
            for kind, symbol, attr in _BOUNDS:
                if isinstance(constraint, kind):
                    bounds.append((symbol, getattr(constraint, attr)))
            if getattr(constraint, "allow_inf_nan", None) is False:
                finite = True
    if len(bounds) == 2 and bounds[0][0] in "≥>" and bounds[1][0] in "≤<":
        text += f" in {'[' if bounds[0][0] == '≥' else '('}{bounds[0][1]}, {bounds[1][1]}{']' if bounds[1][0] == '≤' else ')'}"
    else:
        text += "".join(f" {symbol} {value}" for symbol, value in bounds)
    text += " (finite)" if finite else ""
    return text + (" or null" if optional else "")


def _describe_error(cls, error: dict, source: str, overridden: frozenset = frozenset()) -> str:
    loc = [part for part in error["loc"] if part != "__root__"]
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if error["type"] == "value_error":  # raised by a settings class's own cross-field check
        message = str(error.get("ctx", {}).get("error", error["msg"]))
        return f"{source}: {message}"
    source = _where(source, ".".join(str(p) for p in loc if not isinstance(p, int)), overridden)
    if error["type"] == "missing":
        if loc and isinstance(loc[-1], int):  # a tuple that is too short
            key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[:-1]).lstrip(".")
            return f"{source}: '{key}' must be {_expected(_type_at(cls, loc[:-1]))}, got too few values"
        return f"{source}: '{key}' is required"
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"{source}: unknown key '{key}'"
    tp = _type_at(cls, loc)
    expected = _expected(tp) if tp is not None else error["msg"]
    return f"{source}: '{key}' must be {expected}, got {error.get('input')!r}"


def _set_dotted(raw: dict, key: str, value):
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigKeyError(f"override {key}: '{part}' is a value, not a section")
    node[parts[-1]] = value
