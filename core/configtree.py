"""The machinery of the config tree: typed, validated, frozen dataclass sections read from TOML
and from `--set section.key=value` overrides, with unknown keys named.

A section is a frozen dataclass whose fields are annotated with one of: bool, int, float, str,
tuple[X, ...], dict[str, Any] (free-form, validated by whoever reads it), a Literal of strings,
or another section. Values are checked strictly: a bool is only `true`/`false` (never "yes" or 1),
an int is never a bool or a float, a float may be written as an int, a tuple comes from a TOML
array. Range checks live in each section's __post_init__ and raise ConfigError naming the key.

    tree = build(Config, {"train": {"lr": 1e-3}})              # from a parsed TOML document
    values = apply_overrides(to_dict(tree), ["train.lr=3e-4"])  # --set, parsed by the field type
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names it and says what is allowed."""


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def is_section(kind: Any) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def _suggest(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_key(path: str, key: str, known: Sequence[str]) -> ConfigError:
    where = f"[{path}]" if path else "the top level"
    return ConfigError(f"unknown key {key!r} in {where}{_suggest(key, known)}; known keys: {', '.join(sorted(known))}")


def _describe(kind: Any) -> str:
    if typing.get_origin(kind) is Literal:
        return " or ".join(repr(v) for v in typing.get_args(kind))
    if typing.get_origin(kind) is tuple:
        return f"an array of {_describe(typing.get_args(kind)[0])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, str(kind))


def check_value(name: str, kind: Any, value: Any) -> Any:
    """`value` converted to `kind` where that is lossless (int -> float, list -> tuple), else ConfigError."""
    origin = typing.get_origin(kind)
    wrong = ConfigError(f"{name}={value!r}: must be {_describe(kind)}")
    if kind is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{name}={value!r}: must be a finite number")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise wrong
        return value
    if origin is Literal:
        if value not in typing.get_args(kind):
            raise wrong
        return value
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise wrong
        item = typing.get_args(kind)[0]
        return tuple(check_value(f"{name}[{i}]", item, v) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}: must be a table of key = value, got {value!r}")
        return dict(value)
    raise ConfigError(f"{name} has type {kind}, which the config tree cannot check")  # a bug in a section


def build(cls: type, values: Mapping[str, Any] | None, path: str = "") -> Any:
    """An instance of section `cls` from a mapping (missing keys keep their defaults)."""
    values = {} if values is None else values
    if not isinstance(values, Mapping):
        raise ConfigError(f"[{path}] must be a table of key = value, got {values!r}")
    hints = _hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise unknown_key(path, key, sorted(fields))
        name = f"{path}.{key}" if path else key
        kind = hints[key]
        kwargs[key] = build(kind, value, name) if is_section(kind) else check_value(name, kind, value)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:  # a section's own check raised a plain error
        raise ConfigError(f"[{path or cls.__name__}] {error}") from None


def check_keys(cls: type, values: Mapping[str, Any], path: str) -> None:
    """Every key of a partial table exists under section `cls` (values are checked when it is used)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"[{path}] must be a table of key = value, got {values!r}")
    hints = _hints(cls)
    for key, value in values.items():
        if key not in hints:
            raise unknown_key(path, key, sorted(hints))
        if is_section(hints[key]):
            check_keys(hints[key], value, f"{path}.{key}")


def to_dict(section: Any) -> dict[str, Any]:
    """Plain TOML/JSON-ready values (tuples as lists), sections as nested tables."""
    out: dict[str, Any] = {}
    for field in dataclasses.fields(section):
        value = getattr(section, field.name)
        if dataclasses.is_dataclass(value):
            out[field.name] = to_dict(value)
        elif isinstance(value, tuple):
            out[field.name] = list(value)
        elif isinstance(value, dict):
            out[field.name] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in value.items()}
        else:
            out[field.name] = value
    return out


def parse_text(name: str, kind: Any, text: str) -> Any:
    """A --set value, read by the type of the field it sets."""
    text = text.strip()
    origin = typing.get_origin(kind)
    if kind is str or (origin is Literal and all(isinstance(v, str) for v in typing.get_args(kind))):
        return check_value(name, kind, text)
    if kind is bool:
        if text in ("true", "false"):
            return text == "true"
        raise ConfigError(f"{name}={text!r}: must be true or false")
    try:
        if kind is int:
            return int(text)
        if kind is float:
            return check_value(name, float, float(text))
        if origin is tuple:
            item = typing.get_args(kind)[0]
            parts = [p for p in text.strip("[]() ").split(",") if p.strip()]
            return tuple(parse_text(f"{name}[{i}]", item, p.strip().strip("'\"")) for i, p in enumerate(parts))
    except ValueError:
        raise ConfigError(f"{name}={text!r}: must be {_describe(kind)}") from None
    raise ConfigError(f"{name} cannot be set from the command line; set it in the config file")


def _field_kind(cls: type, dotted: str) -> Any:
    """The annotated type of `a.b.c` under section `cls` (free-form dict values: Any)."""
    kind: Any = cls
    walked = []
    for part in dotted.split("."):
        if is_section(kind):
            hints = _hints(kind)
            if part not in hints:
                raise unknown_key(".".join(walked), part, sorted(hints))
            kind = hints[part]
        elif typing.get_origin(kind) is dict:
            kind = Any
        elif kind is Any:
            pass
        else:
            raise ConfigError(f"{'.'.join(walked)} is a value, not a table: cannot set {dotted}")
        walked.append(part)
    return kind


def _parse_free(text: str) -> Any:
    """A value of a free-form table (model overrides, per-stage tables): TOML syntax, else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cls: type, values: dict[str, Any], assignments: Sequence[str]) -> dict[str, Any]:
    """`values` (a plain dict tree for section `cls`) with `a.b=value` assignments applied."""
    values = _deep_copy(values)
    for assignment in assignments:
        dotted, sep, text = assignment.partition("=")
        dotted = dotted.strip()
        if not sep or not dotted or "." not in dotted and is_section(_field_kind(cls, dotted)):
            raise ConfigError(f"--set {assignment!r} is not of the form section.key=value (e.g. train.lr=1e-4)")
        kind = _field_kind(cls, dotted)
        value = _parse_free(text.strip()) if kind is Any else parse_text(dotted, kind, text)
        target = values
        *parents, leaf = dotted.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    return values


def _deep_copy(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in values.items()}


def merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Nested tables of `top` merged over `base` (values of `top` win)."""
    out = _deep_copy(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = _deep_copy(value) if isinstance(value, Mapping) else value
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
