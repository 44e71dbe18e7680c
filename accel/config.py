"""The root `Config`, the list of techniques, presets, and (de)serialisation to dict/JSON/YAML/TOML.

`TECHNIQUES` is the one list of techniques: each is a record (`accel.technique.Technique`) defined
in its own folder (``accel/<technique>/record.py``) with its config class and preset table. `Config`
has one field per record, `preset` reads the records' preset tables, `accel.apply` installs them in
their ``order``; adding a technique is its folder plus one line here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

from .approx.record import TECHNIQUE as _APPROX
from .attention.record import TECHNIQUE as _ATTENTION
from .cache.record import TECHNIQUE as _CACHE
from .config_base import FILE_FORMATS, ConfigBase, ConfigError, read_mapping, spec
from .families import FAMILIES
from .presets import DEFAULT_PRESET, PRESET_ORDER
from .solver.record import TECHNIQUE as _SOLVER
from .technique import Technique
from .tokens.record import TECHNIQUE as _TOKENS

# Every technique, in the order users meet them (Config's fields, config files, errors, --help).
TECHNIQUES: tuple[Technique, ...] = (_CACHE, _TOKENS, _ATTENTION, _APPROX, _SOLVER)
# The technique sections of a Config (and of a config file), in that order.
TECHNIQUE_SECTIONS = tuple(t.section for t in TECHNIQUES)
__all__ = ["Config", "DEFAULT_PRESET", "PRESET_ORDER", "TECHNIQUES", "TECHNIQUE_SECTIONS", "SweepRow",
           "available_presets", "preset", "resolve", "sweep_rows", "technique"]


def technique(section: str) -> Technique:
    """The record of the technique whose `Config` section is ``section``.

    Args:
        section: a section name (``"cache"``, ``"tokens"``, ...).

    Returns:
        Its `Technique`; a ConfigError naming the sections when there is none.
    """
    for t in TECHNIQUES:
        if t.section == section:
            return t
    raise ConfigError(f"{section}: not a technique; choose one of {', '.join(TECHNIQUE_SECTIONS)}")


class _Root(ConfigBase):
    """What `Config` does beyond its fields: the formats; the fields come from `TECHNIQUES`."""

    @property
    def enabled(self) -> bool:
        return any(getattr(self, t.section).enabled for t in TECHNIQUES)

    # --- formats --------------------------------------------------------------------------
    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **{"indent": 2, **kw})

    @classmethod
    def from_json(cls, text: str) -> "Config":
        return cls.from_dict(json.loads(text))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "Config":
        import yaml

        return cls.from_dict(yaml.safe_load(text) or {})

    def to_toml(self) -> str:
        import tomli_w

        # TOML has no null: optional fields left at None are simply absent, and absent fields
        # take their defaults on the way back, so the round trip holds.
        def drop_none(d):
            return {k: drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}

        return tomli_w.dumps(drop_none(self.to_dict()))

    @classmethod
    def from_toml(cls, text: str) -> "Config":
        import tomllib

        return cls.from_dict(tomllib.loads(text))

    def text_for(self, path: str | os.PathLike) -> str:
        """The file text `save` writes to ``path``; the format follows the suffix (.json, .yaml/.yml, .toml)."""
        return {"json": self.to_json, "yaml": self.to_yaml, "toml": self.to_toml}[_format_of(Path(path))]()

    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path``; the format follows the suffix (.json, .yaml/.yml, .toml)."""
        path = Path(path)
        text = self.text_for(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Config":
        return cls.from_dict(anchor_paths(read_mapping(path), path))


Config = dataclasses.make_dataclass(
    "Config", [(t.section, t.config, spec(None, factory=t.config, help=t.help)) for t in TECHNIQUES],
    bases=(_Root,), frozen=True,
    namespace={"__module__": __name__,
               "__doc__": "Everything `accel.apply` does to a pipeline: one sub-config per technique (all off by "
                          f"default); its fields are the `TECHNIQUES` sections: {', '.join(TECHNIQUE_SECTIONS)}."})


def anchor_paths(data: dict, config_file: str | os.PathLike) -> dict:
    """A config file's sections with each technique's path fields (`Technique.paths`: the fitted scheduler's
    folder) read relative to the file's own folder, so the file works from any current folder."""
    folder = Path(config_file).resolve().parent
    out = dict(data)
    for t in TECHNIQUES:
        section = out.get(t.section)
        if not isinstance(section, dict):
            continue
        for name in t.paths:
            value = section.get(name)
            if isinstance(value, str) and value and not Path(value).is_absolute():
                out[t.section] = section = {**section, name: str(folder / value)}
    return out


def _format_of(path: Path) -> str:
    if path.suffix.lower() not in FILE_FORMATS:
        read_mapping(path)  # raises the unknown-format error, worded once
    return FILE_FORMATS[path.suffix.lower()]


def available_presets() -> tuple[str, ...]:
    """Preset names that are defined: ``off`` plus every name some technique gives settings for.

    Returns:
        The names in `PRESET_ORDER`, then any others a technique's table defines, sorted.
    """
    defined = {"off"}
    for t in TECHNIQUES:
        defined.update(t.presets)
    return tuple(n for n in PRESET_ORDER if n in defined) + tuple(sorted(defined - set(PRESET_ORDER)))


def preset(name: str, family: str | None = None) -> Config:
    """The `Config` a preset means for ``family``.

    A technique's table maps a preset to per-family settings, with ``"*"`` for every family it
    has no specific entry for; a technique that says nothing about a preset stays off.

    Args:
        name: a preset name (`available_presets`).
        family: a key of `accel.families.FAMILIES`; None takes each table's ``"*"`` entry.

    Returns:
        The preset's `Config`.
    """
    names = available_presets()
    if name not in names:
        raise ConfigError(f"preset: {name!r} is not a preset; choose one of {', '.join(names)}")
    parts = {t.section: fields for t in TECHNIQUES if (fields := t.preset_fields(name, family))}
    return Config.from_dict(parts)


class SweepRow(NamedTuple):
    """One row of a technique's sweep: its label, its config, its search group and its place on the knob."""

    label: str
    config: Config
    group: str
    order: int


def sweep_rows(family: str, section: str, calibrated=None) -> list[SweepRow]:
    """The rows ``accel bench --sweep SECTION`` and ``accel tune`` try for one technique on ``family``.

    Args:
        family: a key of `accel.families.FAMILIES`.
        section: the technique's section (``"cache"``, ``"tokens"``, ``"attention"``).
        calibrated: values for the knobs marked ``calibrated`` (DiT cache thresholds read off the
            user's prompts); None or empty keeps their fixed grids.

    Returns:
        The rows of every knob of the technique that applies to the family, mildest first per knob;
        empty when none applies (sparse attention on an image family).
    """
    fam, tech = FAMILIES[family], technique(section)
    balanced = getattr(preset("balanced", family), section).to_dict()
    rows = []
    for knob in tech.sweep:
        if not knob.applies_to(fam.kind, fam.video):
            continue
        values = calibrated if knob.calibrated and calibrated else None
        for n, (label, fields) in enumerate(knob.rows(balanced, values)):
            rows.append(SweepRow(label, Config.from_dict({section: fields}), knob.group or section, n))
    return rows


def resolve(config: Any, family: str | None = None) -> Config:
    """Turn what a user passes to `apply` (None, a preset name, a dict, a Config, a file path) into a Config."""
    if config is None:
        return Config()
    if isinstance(config, Config):
        return config
    if isinstance(config, ConfigBase):
        return Config.from_dict({config.section: config})
    if isinstance(config, dict):
        return Config.from_dict(config)
    if isinstance(config, os.PathLike) or (isinstance(config, str) and Path(config).suffix.lower() in FILE_FORMATS):
        return Config.load(config)
    if isinstance(config, str):
        return preset(config, family)
    raise ConfigError(f"config: expected a preset name, a dict, an accel.Config or a config file path, "
                      f"got {type(config).__name__}")
