"""Web controls generated from the technique configs, so each technique brings its own knobs.

Every field of every `accel.Config` section becomes one `Knob`, read from the dataclass and its
`spec` metadata: a field with ``choices`` is a dropdown, a bool a checkbox, an int or float a number
input with the spec's bounds, anything else (lists, optional values) a JSON text box. A technique
that adds a field to its config gets a control in the app without the app changing.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Union

from ..config import Config
from ..config_base import ConfigBase, ConfigError

# The preset name of `accel app --config FILE`'s config (offered beside the built-in presets).
CONFIG_PRESET = "config"


@dataclass(frozen=True)
class Knob:
    section: str          # "cache", "tokens", ...
    name: str             # field name
    kind: str             # "choice", "bool", "int", "float" or "json"
    default: Any
    choices: tuple | None
    minimum: float | None
    maximum: float | None
    help: str
    optional: bool        # None is allowed (an empty number box means None)

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"


def sections(config_cls=Config) -> list[tuple[str, type]]:
    """``[(section name, sub-config class)]`` in the order `Config` declares them."""
    hints = typing.get_type_hints(config_cls)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(config_cls)
            if isinstance(hints[f.name], type) and issubclass(hints[f.name], ConfigBase)]


def _kind(tp) -> tuple[str, bool]:
    optional = False
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0] if len(args) == 1 else Any
    kind = {bool: "bool", int: "int", float: "float", str: "text"}.get(tp, "json")
    return kind, optional


def knobs(config_cls=Config, hide: tuple[str, ...] = ()) -> list[Knob]:
    """One `Knob` per field of every section of ``config_cls`` except those in ``hide``."""
    out = []
    for section, cls in sections(config_cls):
        if section in hide:
            continue
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            meta = f.metadata or {}
            kind, optional = _kind(hints[f.name])
            choices = meta.get("choices")
            if choices and kind in ("text", "int", "float"):
                kind = "choice"
            elif kind == "text":
                kind = "json" if optional else "text"
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append(Knob(section, f.name, kind, default, choices, meta.get("min"), meta.get("max"),
                            meta.get("help", ""), optional))
    return out


def to_widget_value(knob: Knob, value):
    """A config value as its control shows it."""
    if knob.kind == "json":
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    return value


def from_widget_value(knob: Knob, value):
    """What a control holds as a config value (validation is the config's job, not this one's)."""
    if knob.kind == "json" and not isinstance(value, str) and value is not None:
        return value  # an API call may send the list itself
    if knob.kind == "json":
        text = (value or "").strip()
        if not text:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text  # a bare word; the config says whether it is allowed
    if knob.kind == "choice" and knob.choices and value not in knob.choices:
        # a dropdown may hand back a number choice as text ("64"): map it back to the choice
        return next((c for c in knob.choices if str(c) == str(value)), value)
    if knob.kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if knob.kind in ("int", "float") and value is None and not knob.optional:
        raise ConfigError(f"{knob.key}: empty; give a number")
    return value


def config_from_values(knob_list: list[Knob], values) -> Config:
    """The `Config` the controls describe; raises `ConfigError` naming the field when it is invalid."""
    parts: dict[str, dict] = {}
    for knob, value in zip(knob_list, values, strict=True):
        parts.setdefault(knob.section, {})[knob.name] = from_widget_value(knob, value)
    return Config.from_dict(parts)


def config_over(knob_list: list[Knob], values, base: Config) -> Config:
    """``base`` (a preset's config) with every knob whose value is not None on top: the rule of the
    app's runs. The page always sends every knob, so its config is what its controls show; an API
    call sends only the knobs it names (the others are None) and gets the preset with those changed."""
    parts = base.to_dict()
    for knob, value in zip(knob_list, values, strict=True):
        if value is not None:
            parts.setdefault(knob.section, {})[knob.name] = from_widget_value(knob, value)
    return Config.from_dict(parts)


def changes(knob_list: list[Knob], cfg: Config, base: Config) -> list[str]:
    """``"section.field value"`` for every knob where ``cfg`` differs from ``base``."""
    def value(c, k):
        return getattr(getattr(c, k.section), k.name)

    return [f"{k.key} {value(cfg, k)}" for k in knob_list if value(cfg, k) != value(base, k)]


def api_name(knob: Knob) -> str:
    """The knob's parameter name in the app's API: ``cache_threshold`` for ``cache.threshold``."""
    return f"{knob.section}_{knob.name}"


def api_schema(knob: Knob) -> dict:
    """The JSON schema the API documents for the knob: its type, and a description (gradio's
    ``additional_description``) with its help, its bounds or choices and its default. The type is not
    nullable: the default, None, keeps the preset's value, which the client shows as ``| None``."""
    choices = knob.choices or ()
    words = [knob.help] if knob.help else []
    if knob.kind == "choice" and all(isinstance(c, str) for c in choices):
        schema: dict = {"enum": list(choices)}
    elif knob.kind == "choice":  # number choices: documented as numbers (an enum would read as strings)
        schema = {"type": "integer" if all(isinstance(c, int) for c in choices) else "number"}
        words.append("one of " + ", ".join(str(c) for c in choices))
    elif knob.kind == "json":
        schema = {"anyOf": [{"type": "array"}, {"type": "string"}]}
        words.append("a list, or JSON text")
    else:
        schema = {"type": {"bool": "boolean", "int": "integer", "float": "number"}.get(knob.kind, "string")}
    bounds = " and ".join(f"{word} {v}" for word, v in ((">=", knob.minimum), ("<=", knob.maximum)) if v is not None)
    if bounds:
        words.append(bounds)
    words.append(f"{knob.key} of the preset when left out")
    return {**schema, "additional_description": "; ".join(words)}


def values_from_config(knob_list: list[Knob], cfg: Config) -> list:
    """The control values that show ``cfg``."""
    return [to_widget_value(k, getattr(getattr(cfg, k.section), k.name)) for k in knob_list]


def section_title(cls: type) -> str:
    doc = (cls.__doc__ or cls.__name__).strip().splitlines()[0].rstrip(".")
    return f"{cls.section}: {doc}"


def widget(knob: Knob):
    """The gradio component for ``knob`` (gradio is imported here, only when the app is built)."""
    import gradio as gr

    # Bounds go in the hint, not the component: gradio's own bounds error does not name the field,
    # the config's does ("cache.interval: 0 is out of range; it must be >= 1").
    bounds = ", ".join(f"{word} {v}" for word, v in (("min", knob.minimum), ("max", knob.maximum)) if v is not None)
    info = "; ".join(p for p in (knob.help, bounds) if p) or None
    common = {"label": knob.name, "info": info, "elem_id": f"knob-{knob.section}-{knob.name}"}
    value = to_widget_value(knob, knob.default)
    if knob.kind == "choice":
        return gr.Dropdown(choices=list(knob.choices), value=value, **common)
    if knob.kind == "bool":
        return gr.Checkbox(value=value, **common)
    if knob.kind in ("int", "float"):
        return gr.Number(value=value, precision=0 if knob.kind == "int" else None,
                         step=1 if knob.kind == "int" else 0.01, **common)
    return gr.Textbox(value=value, max_lines=1, **common)
