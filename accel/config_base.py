"""Plain-data configs: validation and dict round-trip shared by every technique's config.

A technique's config is a dataclass deriving from :class:`ConfigBase`. Each field may carry
``metadata`` built with :func:`spec` (allowed choices, numeric bounds, a help line); validation
runs in ``__post_init__`` so an invalid config never exists. Errors name the field, the value and
what is allowed, because the person reading them is usually editing a YAML file or a CLI flag.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Union


class ConfigError(ValueError):
    """A config field has a wrong name, type or value. The message says which and what is allowed."""


def spec(default: Any, *, choices=None, min=None, max=None, min_exclusive=False, help: str = "", factory=None):
    """A dataclass field with validation metadata.

    ``choices``: allowed values (for str fields, or a tuple's items); ``min``/``max``: inclusive
    bounds unless ``min_exclusive``; ``help``: one line shown in errors and ``--help``.
    """
    meta = {"choices": tuple(choices) if choices is not None else None, "min": min, "max": max,
            "min_exclusive": min_exclusive, "help": help}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _describe_type(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe_type(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        inner = _describe_type(args[0]) if args else "any"
        return f"list of {inner}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp, value, where: str):
    """Return ``value`` converted to ``tp`` where the conversion is lossless, else raise ConfigError.

    Loose input is normal (JSON has no tuples, TOML has no null, CLI flags are strings), so lists
    become tuples and ints become floats; anything else (a string for a number, a float for an int,
    1 for a bool) is an error rather than a silent guess.
    """
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{where}: expected {_describe_type(tp)}, got {value!r}")
    if origin is tuple:
        if isinstance(value, (list, tuple)):
            args = typing.get_args(tp)
            item = args[0] if args else Any
            return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and issubclass(tp, ConfigBase):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return tp.from_dict(value, _where=where)
    raise ConfigError(f"{where}: expected {_describe_type(tp)}, got {value!r}")


FILE_FORMATS = {".json": "json", ".yaml": "yaml", ".yml": "yaml", ".toml": "toml"}


def read_mapping(path, what: str = "config file") -> dict:
    """The top-level mapping of a .json/.yaml/.yml/.toml file; ConfigError naming the file otherwise."""
    from pathlib import Path

    path = Path(path)
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"{what} {str(path)!r}: unknown format {path.suffix or '(no suffix)'!r}; "
                          "use .json, .yaml, .yml or .toml")
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read {what} {str(path)!r}: {e.strerror or e}") from None
    try:
        if fmt == "toml":
            import tomllib

            data = tomllib.loads(text)
        elif fmt == "json":  # JSON's own parser: YAML refuses JSON indented with tabs
            import json

            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # the parser's own message, with the file named
        raise ConfigError(f"{what} {str(path)!r}: not valid {fmt.upper()}: {str(e).strip().splitlines()[0]}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(path)!r}: expected a mapping at the top, got {type(data).__name__}")
    return data


class ConfigBase:
    """Validation, dict round-trip and copy-with-changes for dataclass configs."""

    #: name used in error messages ("cache", "tokens", ...); set by subclasses.
    section: str = ""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            where = f"{self.section}.{f.name}" if self.section else f.name
            value = _coerce(hints[f.name], getattr(self, f.name), where)
            object.__setattr__(self, f.name, value)
            self._check_bounds(f, value, where)
        self.validate()

    @staticmethod
    def _check_bounds(f: dataclasses.Field, value, where: str):
        meta = f.metadata or {}
        choices = meta.get("choices")
        items = value if isinstance(value, tuple) else (value,)
        for v in items:
            if v is None:
                continue
            if choices is not None and v not in choices:
                raise ConfigError(f"{where}: {v!r} is not allowed; choose one of {', '.join(map(repr, choices))}")
            if isinstance(v, float) and not math.isfinite(v):  # NaN passes every < / > comparison
                lo, hi = meta.get("min"), meta.get("max")
                bounds = [f"{'>' if meta.get('min_exclusive') else '>='} {lo}"] if lo is not None else []
                bounds += [f"<= {hi}"] if hi is not None else []
                raise ConfigError(f"{where}: {v!r} is not a finite number; give a number"
                                  + (f" {' and '.join(bounds)}" if bounds else ""))
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                lo, hi = meta.get("min"), meta.get("max")
                if lo is not None and (v <= lo if meta.get("min_exclusive") else v < lo):
                    op = ">" if meta.get("min_exclusive") else ">="
                    raise ConfigError(f"{where}: {v!r} is out of range; it must be {op} {lo}"
                                      + (f" and <= {hi}" if hi is not None else ""))
                if hi is not None and v > hi:
                    raise ConfigError(f"{where}: {v!r} is out of range; it must be <= {hi}"
                                      + (f" and >= {lo}" if lo is not None else ""))

    def validate(self) -> None:
        """Cross-field checks; subclasses override and raise ConfigError."""

    # --- round trip -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, ConfigBase):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: dict | None, _where: str = ""):
        where = _where or cls.section
        if data is None:
            return cls()
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise ConfigError(f"{where or cls.__name__}: expected a mapping of fields, got {data!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in names]
        if unknown:
            prefix = f"{where}." if where else ""
            raise ConfigError(f"{prefix}{unknown[0]}: unknown field; known fields are {', '.join(names)}")
        return cls(**data)

    def replace(self, **changes):
        """A copy with ``changes`` applied (validated); nested configs accept dicts."""
        merged = self.to_dict()
        for k, v in changes.items():
            if isinstance(v, ConfigBase):
                v = v.to_dict()
            if isinstance(merged.get(k), dict) and isinstance(v, dict):
                merged[k] = {**merged[k], **v}
            else:
                merged[k] = v
        return type(self).from_dict(merged)

    @classmethod
    def field_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
