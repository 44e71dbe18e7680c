"""The one rule every front end uses to build a run's configuration.

A run's `Config` is layered, lowest first: the preset for the model's family, then the technique
sections of a config file (``--config``: a config file, a tuned file from `accel tune`, or an
output's sidecar), then each ``--set section.field=value``. A config file may also hold a
``[parallel]`` table (an `accel.ParallelConfig`) and an engine's own table (``[batch]``), which the
engine reads itself. `accel generate`, `accel batch`, `accel app`, `accel bench` and `accel tune`
all read their configuration through this module. Errors are `ConfigError`s whose message names
the flag or file and what to write instead.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .config import TECHNIQUE_SECTIONS, Config, anchor_paths, preset
from .config_base import ConfigError, read_mapping
from .parallel.config import ParallelConfig

PARALLEL_SECTION = "parallel"


def config_mapping(path) -> dict:
    """The mapping of a ``--config`` file: a config file as it is, or an output's sidecar JSON (its ``config``).

    Args:
        path: a .json, .yaml/.yml or .toml file.

    Returns:
        The file's top-level mapping.
    """
    data = read_mapping(path)
    if isinstance(data.get("config"), dict) and "output" in data and "model" in data:  # a sidecar
        return dict(data["config"])
    return data


def read_sections(config_file, sets: list[str], engine_tables: dict[str, tuple[str, ...]] | None = None
                  ) -> tuple[dict, dict]:
    """Read a ``--config`` file and ``--set`` overrides into technique sections.

    Args:
        config_file: the file's path, or None.
        sets: ``section.field=value`` strings (values are YAML scalars), applied on top of the file.
        engine_tables: tables an engine reads from the same file, with the names each may hold
            (``{"batch": SETTINGS}``); any other top-level name than a technique section,
            ``parallel`` or these is refused.

    Returns:
        ``(engine tables, sections)``: the engine tables found (``{"batch": {...}}``) and the technique
        sections with each ``--set`` on top.
    """
    engine_tables = engine_tables or {}
    tables, sections = _read_config_file(config_file, engine_tables) if config_file else ({}, {})
    for k, v in _parse_sets(sets).items():
        _deep_set(sections, k, v)
    return tables, sections


def _read_config_file(path, engine_tables: dict[str, tuple[str, ...]]) -> tuple[dict, dict]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {str(path)!r}: no such file")
    try:
        data = config_mapping(p)
    except ConfigError as e:
        raise ConfigError(f"--config: {e}") from None
    known = (*TECHNIQUE_SECTIONS, PARALLEL_SECTION, *engine_tables)
    unknown = [k for k in data if k not in known]
    if unknown:
        extra = "".join(f" and {t}" for t in engine_tables)
        raise ConfigError(f"--config {str(path)!r}: unknown section {unknown[0]!r}; sections are "
                          f"{', '.join(TECHNIQUE_SECTIONS)}, {PARALLEL_SECTION}{extra}")
    tables = {}
    for name, allowed in engine_tables.items():
        table = data.get(name) or {}
        bad = [k for k in table if k not in allowed]
        if bad:
            raise ConfigError(f"--config {str(path)!r}: {name}.{bad[0]}: unknown setting; settings are "
                              f"{', '.join(allowed)}")
        tables[name] = table
    return tables, {k: v for k, v in anchor_paths(data, p).items() if k in TECHNIQUE_SECTIONS}


def _parse_sets(sets: list[str]) -> dict:
    out = {}
    for s in sets:
        key, eq, value = s.partition("=")
        if not eq or key.count(".") != 1 or key.split(".")[0] not in TECHNIQUE_SECTIONS:
            raise ConfigError(f"--set {s!r}: write SECTION.FIELD=VALUE with SECTION one of "
                              f"{', '.join(TECHNIQUE_SECTIONS)}")
        out[key] = yaml.safe_load(value) if value.strip() else ""
    return out


def _deep_set(d: dict, dotted: str, value) -> None:
    section, name = dotted.split(".")
    if not isinstance(d.get(section), dict):
        d[section] = {}
    d[section][name] = value


def merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, nested mappings merged key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def layered(preset_name: str, sections: dict, family: str | None,
            parallel: ParallelConfig | None = None) -> Config:
    """The `Config` a run uses: the preset for ``family``, then ``sections`` (from `read_sections`) on top.

    Args:
        preset_name: a preset name (`accel.available_presets`).
        sections: technique sections, e.g. ``{"cache": {"interval": 3}}``.
        family: the model's family (`accel.families.FAMILIES` key), or None for the family-independent preset.
        parallel: the run's parallel strategies: a technique they cannot run with (the step cache under
            ``components``) is left out of the preset's part; given in ``sections``, it stays (and the
            strategy refuses it with an error that says what to do).

    Returns:
        The validated `Config`; raises `ConfigError` naming the field when a value is bad.
    """
    base = preset(preset_name, family).to_dict()
    for section in parallel.refused_sections if parallel is not None else ():
        base.pop(section, None)
    return Config.from_dict(merge(base, sections))


def parallel_config(spec: str | None, config_file=None) -> ParallelConfig | None:
    """The `accel.ParallelConfig` of ``--parallel cfg=2,sequence=2`` over a config file's ``parallel`` table.

    Args:
        spec: ``FIELD=VALUE`` pairs separated by commas; values are YAML scalars (``vae=true``).
        config_file: a ``--config`` file whose ``parallel`` table lies under ``spec``, or None.

    Returns:
        The config, or None when neither gives a field.
    """
    fields = {}
    if config_file:
        section = config_mapping(config_file).get(PARALLEL_SECTION)
        if section is not None and not isinstance(section, dict):
            raise ConfigError(f"--config {str(config_file)!r}: parallel must be a table of ParallelConfig fields")
        fields.update(section or {})
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--parallel {spec!r}: write FIELD=VALUE pairs separated by commas, e.g. cfg=2,sequence=2")
        fields[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    if not fields:
        return None
    try:
        return ParallelConfig.from_dict(fields)
    except ConfigError as e:
        raise ConfigError(f"--parallel: {e}") from None
