"""Typed dataclass configs filled from TOML plus ``--set key=value`` overrides.

A config is a tree of dataclasses whose leaves are ``bool``, ``int``, ``float``, ``str``, lists of
those, ``Optional`` of those, or free-form tables (``dict[str, Any]``, for architecture overrides). Unknown keys and values of the wrong type are errors that name the
dotted key, so a typo such as ``optim.lr_shedule`` fails at start-up instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar, Union

import tomllib

from .errors import InvalidInputError, MissingFileError

T = TypeVar("T")


def load_config(cls: type[T], path: Union[str, Path, None] = None, overrides: Sequence[str] = ()) -> T:
    """Read ``path`` (TOML) into ``cls``, then apply ``key.sub=value`` overrides (values in TOML syntax)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise InvalidInputError(f"{path} is not valid TOML: {e}") from None
    for item in overrides:
        key, value = _parse_override(item)
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InvalidInputError(f"--set {item}: {part!r} is a value, not a section")
        node[leaf] = value
    return from_dict(cls, data)


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise InvalidInputError(f"--set takes key=value (e.g. optim.lr=1e-4), got {item!r}")
    try:  # TOML syntax first: 1e-4, true, [1, 2], "quoted"
        return key, tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return key, text  # a bare word is a string: --set data.path=/data/pets


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    if not isinstance(data, dict):
        raise InvalidInputError(f"{where or 'config'} must be a table of settings, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(f"{where}{k}" for k in unknown)
        known = ", ".join(sorted(fields))
        raise InvalidInputError(f"unknown config key {names} (known keys{' in ' + where[:-1] if where else ''}: {known})")
    values = {}
    for name, value in data.items():
        values[name] = _coerce(hints[name], value, f"{where}{name}")
    return cls(**values)


def _coerce(kind, value, key: str):
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        return from_dict(kind, value, key + ".")
    if origin in (Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key)
            except InvalidInputError:
                pass
        raise InvalidInputError(f"config key {key} must be {_describe(kind)}, got {value!r}")
    if origin in (list, tuple, Sequence):
        (item_kind,) = typing.get_args(kind)[:1] or (Any,)
        if not isinstance(value, list):
            raise InvalidInputError(f"config key {key} must be a list of {_describe(item_kind)}, got {value!r}")
        return [_coerce(item_kind, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:  # a free-form table (e.g. architecture overrides): string keys, TOML values
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise InvalidInputError(f"config key {key} must be a table of settings, got {value!r}")
        return dict(value)
    if kind is Any:
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise InvalidInputError(f"config key {key} must be a finite number, got {value!r}")
        return float(value)
    if kind in (bool, int, str) and type(value) is kind:
        return value
    raise InvalidInputError(f"config key {key} must be {_describe(kind)}, got {value!r}")


def _describe(kind) -> str:
    if typing.get_origin(kind) in (Union, types.UnionType):
        return " or ".join(_describe(k) for k in typing.get_args(kind) if k is not type(None))
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(
        kind, getattr(kind, "__name__", str(kind))
    )


def to_dict(config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def to_toml(config) -> str:
    """The resolved config as TOML that :func:`load_config` reads back to an equal config."""
    lines: list[str] = []
    _emit(to_dict(config), [], lines)
    return "\n".join(lines).strip() + "\n"


def _emit(table: dict[str, Any], path: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
    if path and scalars:
        lines.append(f"\n[{'.'.join(path)}]")
    for key, value in scalars.items():
        if value is not None:  # TOML has no null: an absent key means None (the default)
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in table.items():
        if isinstance(value, dict):
            _emit(value, path + [key], lines)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")
