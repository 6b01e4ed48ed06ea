"""Typed TOML configs: the project's one way to read, override and write a configuration.

A config is a dataclass whose fields are plain values (``bool``, ``int``, ``float``, ``str``,
``Literal[...]``, ``list[...]``, ``X | None``) or nested dataclasses (TOML tables). Every key
has a type; an unknown key, a value of the wrong type or a non-finite number is a
:class:`ConfigError` that names the key and the file. ``--set a.b=value`` overrides address any
depth. A config that defines ``validate(source)`` is checked after loading. :func:`to_toml` writes
the resolved config as TOML that :func:`load_toml` reads back to an equal object.

Defaults live on the dataclass fields, once; command-line flags that default to "not given"
override them only when given (:func:`given`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and the file."""


def _hints(cls: type) -> dict[str, Any]:
    return {f.name: typing.get_type_hints(cls)[f.name] for f in dataclasses.fields(cls) if f.init}


def _is_config(annotation: Any) -> bool:
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


def _optional(annotation: Any) -> Any | None:
    """``X | None`` -> X; anything else -> None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0]
    return None


def type_name(annotation: Any) -> str:
    """How a type reads in an error message: "an integer", "a list of a string", ..."""
    inner = _optional(annotation)
    if inner is not None:
        return f"{type_name(inner)} (or leave the key out)"
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (list, tuple):
        return f"a list of {type_name(typing.get_args(annotation)[0])}"
    if _is_config(annotation):
        return "a table"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        annotation, str(annotation)
    )


def coerce(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Check ``value`` against ``annotation`` and return it typed; ints are accepted for floats.

    Floats must be finite: a NaN or infinite setting is refused here, at load time.
    """
    inner = _optional(annotation)
    if inner is not None:
        return None if value is None else coerce(value, inner, key, source)
    origin = typing.get_origin(annotation)
    if _is_config(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a table ([{key}]), got {value!r}")
        return from_dict(annotation, value, source, prefix=key)
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        inner = typing.get_args(annotation)[0]
        items = [coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is Literal:
        if isinstance(value, str) and value in typing.get_args(annotation):
            return value
    elif annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{source}: {key} must be a finite number, got {value!r}")
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{source}: {key} must be {type_name(annotation)}, got {value!r}")


def unknown_key(key: str, choices: list[str], source: str, what: str) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known {what}: {', '.join(choices)}"
    return ConfigError(f"{source}: unknown key {key!r}{hint}")


def from_dict(cls: type[T], data: dict[str, Any], source: str = "<config>", prefix: str = "") -> T:
    """Build the dataclass ``cls`` from nested dicts (as TOML reads them), checking every key and type."""
    hints = _hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in hints:
            where = f"keys in [{prefix}]" if prefix else "keys"
            raise unknown_key(key, list(hints), source, where)
        kwargs[name] = coerce(value, hints[name], key, source)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:  # a section's own __post_init__ check
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{source}: {prefix or cls.__name__}: {error}") from None


def key_value_pairs(text: str, known: typing.Sequence[str], what: str, example: str) -> dict[str, str]:
    """``"a=1,b=x"`` (a command-line flag's value) -> ``{"a": "1", "b": "x"}``, the values as text.

    Errors name the item and the fix (``what`` names the flag's settings, ``example`` is a valid
    value): no pairs at all, a stray comma, an unknown key, a key without a value, a key given twice.
    """
    if not text.strip():
        raise ValueError(f"no {what} settings given; write key=value pairs, e.g. {example}")
    values: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = (s.strip() for s in part.partition("="))
        if not key and not sep:
            raise ValueError(f"empty item in {text!r} (a stray comma?); write key=value pairs, e.g. {example}")
        if key not in known:
            raise ValueError(f"unknown {what} key {key!r} in {text!r}; valid keys: {', '.join(known)}, e.g. {example}")
        if not sep or not value:
            raise ValueError(f"{what} key {key!r} has no value in {text!r}; write {key}=VALUE, e.g. {example}")
        if key in values:
            raise ValueError(f"{what} key {key!r} is given twice in {text!r}; give it once")
        values[key] = value
    return values


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.steps=10"`` -> ``("train.steps", 10)``; the value is read as TOML, else as a plain string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: write it as section.key=value, e.g. train.steps=500")
    key, raw = (part.strip() for part in text.split("=", 1))
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: the key must be dotted names, e.g. train.steps")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def _annotation_at(cls: type, path: list[str]) -> Any:
    """The type of the dotted key ``path`` in ``cls``, or None where a name is unknown (reported later,
    with the file, when the merged data is read)."""
    annotation: Any = cls
    for name in path:
        annotation = _optional(annotation) or annotation
        if not _is_config(annotation):
            return None
        annotation = _hints(annotation).get(name)
        if annotation is None:
            return None
    return annotation


def apply_overrides(cls: type, data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """A copy of the nested ``data`` with each ``a.b=value`` override applied (keys checked against ``cls``)."""

    def copy(value):
        return {k: copy(v) for k, v in value.items()} if isinstance(value, dict) else value

    merged = copy(data)
    for text in overrides:
        key, value = parse_override(text)
        path = key.split(".")
        annotation = _annotation_at(cls, path)
        # A string-typed key takes the raw text ("--set data.token=<sks>", "--set data.class_word=true").
        if (_optional(annotation) or annotation) is str and not isinstance(value, str):
            value = text.split("=", 1)[1].strip()
        table = merged
        for name in path[:-1]:
            table = table.setdefault(name, {})
            if not isinstance(table, dict):
                raise ConfigError(f"--set {text!r}: {name} is not a table in the config")
        table[path[-1]] = value
    return merged


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a TOML file; errors name the file (missing, not UTF-8, not TOML)."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ConfigError(f"config file {path} {what}; see configs/ for examples")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None


def load_toml(cls: type[T], path: str | os.PathLike, overrides: typing.Sequence[str] = ()) -> T:
    """Read a TOML config into ``cls``, apply ``--set`` overrides, and validate when ``cls`` can."""
    data = read_toml(path)
    source = str(path) + (" (with --set overrides)" if overrides else "")
    config = from_dict(cls, apply_overrides(cls, data, overrides), source)
    validate = getattr(config, "validate", None)
    return validate(source) if callable(validate) else config


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def to_toml(config: Any) -> str:
    """The dataclass ``config`` as TOML text that :func:`load_toml` reads back to an equal object.

    ``None`` values are left out (a missing key reads back as its default, None).
    """
    lines: list[str] = []

    def table(obj: Any, name: str) -> None:
        plain, nested = [], []
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            (nested if dataclasses.is_dataclass(value) else plain).append((f.name, value))
        if name and (plain or not nested):
            lines.append(f"[{name}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in plain if value is not None)
        if name and (plain or not nested):
            lines.append("")
        for key, value in nested:
            table(value, f"{name}.{key}" if name else key)

    table(config, "")
    return "\n".join(lines)


def save_toml(config: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as TOML, atomically."""
    from dreamguide.atomic import atomic_open

    with atomic_open(path, "w") as handle:
        handle.write(to_toml(config))
    return Path(path)


def dotted(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables as one level of dotted keys: ``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def defaults(cls: type) -> dict[str, Any]:
    """Field name -> default value of the dataclass ``cls`` (factories called)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def given(**values: Any) -> dict[str, Any]:
    """The keyword arguments that were given (not None): command-line flags default to "not given"."""
    return {key: value for key, value in values.items() if value is not None}
