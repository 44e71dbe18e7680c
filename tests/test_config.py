"""Configs: round trip through every format, and errors that name the field, the value and what is allowed."""

import dataclasses
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import accel
from accel.attention.config import BACKENDS, PATTERNS
from accel.cache.config import METHODS
from accel.config import Config, preset, resolve

SAMPLE = Config(cache=accel.CacheConfig(method="block", threshold=0.08, warmup_steps=2, max_skip=3),
                tokens=accel.TokenConfig(ratio=0.5, method="kv_downsample"),
                attention=accel.AttentionConfig(pattern="tile", backend="flex", density=0.25, dense_steps=1))


@pytest.mark.parametrize("fmt", ["json", "yaml", "toml"])
def test_round_trip_text(fmt):
    text = getattr(SAMPLE, f"to_{fmt}")()
    assert getattr(Config, f"from_{fmt}")(text) == SAMPLE


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml", ".toml"])
def test_round_trip_file(tmp_path, suffix):
    path = SAMPLE.save(tmp_path / f"c{suffix}")
    assert Config.load(path) == SAMPLE
    assert resolve(str(path)) == SAMPLE


def test_dict_round_trip_and_defaults():
    assert Config.from_dict(SAMPLE.to_dict()) == SAMPLE
    assert Config.from_dict({}) == Config()
    assert not Config().enabled
    assert resolve(None) == Config() == preset("off")
    assert json.loads(SAMPLE.to_json())["tokens"]["ratio"] == 0.5


def test_sub_config_and_replace():
    assert resolve(accel.TokenConfig(ratio=0.3)).tokens.ratio == 0.3
    c = SAMPLE.replace(cache={"threshold": 0.2})
    assert c.cache.threshold == 0.2 and c.cache.method == "block"


@pytest.mark.parametrize("data, field, fragment", [
    ({"cache": {"method": "magic"}}, "cache.method", "choose one of"),
    ({"cache": {"interval": 0}}, "cache.interval", ">= 1"),
    ({"cache": {"threshold": "high"}}, "cache.threshold", "expected float"),
    ({"tokens": {"ratio": 1.5}}, "tokens.ratio", "<= 0.95"),
    ({"tokens": {"speed": 2}}, "tokens.speed", "known fields are ratio, method"),
    ({"attention": {"density": 0}}, "attention.density", "> 0.0"),
    ({"attention": {"density": 0.5}}, "attention.density", "needs a sparse attention.pattern"),
    ({"attention": {"dense_steps": True}}, "attention.dense_steps", "expected int"),
    ({"cache": {"warmup_steps": 1.5}}, "cache.warmup_steps", "expected int"),
    ({"turbo": {}}, "turbo", "known fields are cache, tokens, attention"),
    ({"cache": 3}, "cache", "expected"),
])
def test_invalid_fields_are_named(data, field, fragment):
    with pytest.raises(accel.ConfigError) as e:
        Config.from_dict(data)
    msg = str(e.value)
    assert msg.startswith(field) and fragment in msg, msg


def test_unknown_preset_lists_presets():
    with pytest.raises(accel.ConfigError, match="choose one of off"):
        preset("warp9")


def test_bad_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("cache: [unclosed")
    with pytest.raises(accel.ConfigError, match="not valid YAML"):
        Config.load(p)
    with pytest.raises(accel.ConfigError, match="unknown format"):
        Config.load(tmp_path / "c.ini")


# --- hypothesis: any value is either accepted and survives a round trip, or named in the error ---
_any_value = st.one_of(st.none(), st.booleans(), st.integers(-5, 100), st.floats(-2, 200, allow_nan=False),
                       st.text(max_size=8), st.sampled_from(list(METHODS + PATTERNS + BACKENDS)))
_fields = [(cls, f.name) for cls in (accel.CacheConfig, accel.TokenConfig, accel.AttentionConfig)
           for f in dataclasses.fields(cls)]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_fields), _any_value)
def test_any_value_validates_or_names_field(field, value):
    cls, name = field
    section = cls.section
    try:
        cfg = Config.from_dict({section: {name: value}})
    except accel.ConfigError as e:
        msg = str(e)
        assert msg.startswith(f"{section}."), msg
        shown = {repr(value)} | ({repr(float(value))} if type(value) in (int, float) else set())
        # A valid value that clashes with another field: the message names that other field.
        others = [f.name for f in dataclasses.fields(cls) if f.name != name]
        cross_field = any(o in msg.split(":", 1)[1] for o in others)
        assert any(s in msg for s in shown) or cross_field, msg
    else:
        for fmt in ("json", "yaml", "toml"):
            assert getattr(Config, f"from_{fmt}")(getattr(cfg, f"to_{fmt}")()) == cfg


@pytest.mark.parametrize("level", ["safe", "balanced", "fast"])
def test_no_preset_has_a_part_that_cannot_run(level):
    """Token reduction shortens the sequence before attention, so sparse attention under it never engages
    (stats' dense_reasons: grid_lost): a preset takes one of the two per family, never both."""
    for family in accel.FAMILIES:
        cfg = accel.preset(level, family)
        assert not (cfg.tokens.enabled and cfg.attention.enabled), (level, family)
    assert accel.preset("safe", "wan").attention.pattern != "dense"  # sparse attention is on somewhere by default


def _float_fields():
    for section in (accel.CacheConfig, accel.TokenConfig, accel.AttentionConfig, accel.ParallelConfig):
        for f in dataclasses.fields(section):
            if f.type in ("float", float) or f.type == "float | None":
                yield section, f.name


@pytest.mark.parametrize("section,name", list(_float_fields()), ids=lambda x: getattr(x, "__name__", x))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_every_float_field_rejects_nan_and_infinity_naming_the_field(section, name, bad):
    """NaN passes every < / > bound check; a NaN threshold made the block cache silently never reuse."""
    with pytest.raises(accel.ConfigError, match=rf"{section.section}\.{name}: {bad!r} is not a finite number"):
        section(**{name: bad})


def test_config_files_reject_nan_and_json_is_read_as_json(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[cache]\nmethod = "block"\nthreshold = nan\n')
    with pytest.raises(accel.ConfigError, match="cache.threshold: nan is not a finite number"):
        accel.Config.load(toml)
    tabs = tmp_path / "c.json"  # valid JSON that YAML refuses (tab indentation)
    tabs.write_text('{\n\t"cache": {\n\t\t"method": "block",\n\t\t"interval": 2\n\t}\n}')
    assert accel.Config.load(tabs).cache.interval == 2
    nan_json = tmp_path / "n.json"
    nan_json.write_text('{"attention": {"pattern": "tile", "density": NaN}}')
    with pytest.raises(accel.ConfigError, match="attention.density: nan is not a finite number"):
        accel.Config.load(nan_json)
