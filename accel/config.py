"""The root `Config`, presets, and (de)serialisation to dict/JSON/YAML/TOML.

`Config` holds one sub-config per technique. Each technique owns its sub-config class and its
preset table in ``accel/<technique>/config.py``; this module only composes them, so a technique
adds itself without touching the others.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .approx.config import PRESETS as _APPROX_PRESETS
from .approx.config import ApproxCacheConfig
from .attention.config import PRESETS as _ATTENTION_PRESETS
from .attention.config import AttentionConfig
from .cache.config import PRESETS as _CACHE_PRESETS
from .cache.config import CacheConfig
from .config_base import FILE_FORMATS, ConfigBase, ConfigError, read_mapping, spec
from .tokens.config import PRESETS as _TOKEN_PRESETS
from .tokens.config import TokenConfig

# section name -> that technique's preset table: {preset: {family or "*": dict of fields}}
_SECTION_PRESETS = {"cache": _CACHE_PRESETS, "tokens": _TOKEN_PRESETS, "attention": _ATTENTION_PRESETS,
                    "approx": _APPROX_PRESETS}
# The order users meet them in: from exact to most aggressive.
PRESET_ORDER = ("off", "safe", "balanced", "fast", "max")


@dataclass(frozen=True)
class Config(ConfigBase):
    """Everything `accel.apply` does to a pipeline: one sub-config per technique (all off by default)."""

    cache: CacheConfig = spec(None, factory=CacheConfig, help="step caching")
    tokens: TokenConfig = spec(None, factory=TokenConfig, help="token merging / pruning")
    attention: AttentionConfig = spec(None, factory=AttentionConfig, help="sparse attention")
    approx: ApproxCacheConfig = spec(None, factory=ApproxCacheConfig,
                                     help="approximate caching across calls (NIRVANA): start from a similar prompt")

    @property
    def enabled(self) -> bool:
        return any(getattr(self, s).enabled for s in _SECTION_PRESETS)

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

    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path``; the format follows the suffix (.json, .yaml/.yml, .toml)."""
        path = Path(path)
        fmt = _format_of(path)
        text = {"json": self.to_json, "yaml": self.to_yaml, "toml": self.to_toml}[fmt]()
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Config":
        return cls.from_dict(read_mapping(path))


def _format_of(path: Path) -> str:
    if path.suffix.lower() not in FILE_FORMATS:
        read_mapping(path)  # raises the unknown-format error, worded once
    return FILE_FORMATS[path.suffix.lower()]


def available_presets() -> tuple[str, ...]:
    """Preset names that are defined: ``off`` plus every name some technique gives settings for."""
    defined = {"off"}
    for table in _SECTION_PRESETS.values():
        defined.update(table)
    return tuple(n for n in PRESET_ORDER if n in defined) + tuple(sorted(defined - set(PRESET_ORDER)))


def preset(name: str, family: str | None = None) -> Config:
    """The `Config` a preset means for ``family`` (a key of `accel.families.FAMILIES`).

    A technique's table maps a preset to per-family settings, with ``"*"`` for every family it
    has no specific entry for; a technique that says nothing about a preset stays off.
    """
    names = available_presets()
    if name not in names:
        raise ConfigError(f"preset: {name!r} is not a preset; choose one of {', '.join(names)}")
    parts = {}
    for section, table in _SECTION_PRESETS.items():
        per_family = table.get(name, {})
        fields = per_family.get(family, per_family.get("*")) if family else per_family.get("*")
        if fields:
            parts[section] = dict(fields)
    return Config.from_dict(parts)


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
