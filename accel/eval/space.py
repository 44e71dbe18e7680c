"""The settings `accel bench --sweep` and `accel tune` try: each technique's main knob, per family.

- cache: UNets sweep DeepCache's ``interval`` (full UNet every N steps); DiTs sweep the block cache's
  change ``threshold`` (reuse the cached blocks while the first block's output moved less than this),
  and `accel tune` replaces the fixed grid with thresholds read off the user's own prompts
  (`accel.eval.tune.calibrate_thresholds`), plus a fixed ``interval`` of 2 and 3.
- tokens: the fraction of tokens removed (``ratio``), with the family's own method (merge for UNets
  and video DiTs, prune for image DiTs).
- attention (video DiTs): the fraction of attention blocks computed (``density``) of each sparse
  pattern.

A sweep or search leaves the size gates (``min_tokens``) at 0: it measures what a setting does on
the call it is given, where a preset leaves calls too small to pay untouched.
"""

from __future__ import annotations

import dataclasses

from ..config import Config, preset
from ..families import FAMILIES

TECHNIQUES = ("cache", "tokens", "attention")
CACHE_INTERVALS_UNET = (2, 3, 4, 5, 6, 8, 10)
CACHE_THRESHOLDS_DIT = (0.05, 0.1, 0.2, 0.3)
CACHE_INTERVALS_DIT = (2, 3)
TOKEN_RATIOS = (0.3, 0.5, 0.7)
DENSITIES = (0.5, 0.25, 0.1)
SPARSE_PATTERNS = ("tile", "radial", "spatial_temporal")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One row: a label and the config it applies (``None``: the unaccelerated baseline)."""

    label: str
    config: Config | None
    technique: str = ""  # "cache", "tokens", "attention", "preset", "stack", "config" or "" (baseline)
    order: int = 0  # position on its knob, mildest first: a search stops a knob at its first failure


def _kind(family: str) -> str:
    return FAMILIES[family].kind


def token_base(family: str) -> dict:
    """The family's token-reduction fields as its presets set them, with the size gate off."""
    base = preset("balanced", family).tokens.to_dict()
    return {"method": base["method"], "max_downsample": base["max_downsample"], "min_tokens": 0}


def cache_settings(family: str, thresholds=None) -> list[Setting]:
    """The cache knob for ``family``: DeepCache intervals (UNets) or block-cache thresholds and
    intervals (DiTs; ``thresholds`` replaces the fixed grid)."""
    if _kind(family) == "unet":
        return [Setting(f"cache deepcache interval {i}", Config.from_dict(
            {"cache": {"method": "deepcache", "interval": i, "schedule": "uniform"}}), "cache", n)
            for n, i in enumerate(CACHE_INTERVALS_UNET)]
    out = [Setting(f"cache block threshold {t:g}", Config.from_dict(
        {"cache": {"method": "block", "threshold": float(t), "warmup_steps": 2}}), "cache", n)
        for n, t in enumerate(thresholds or CACHE_THRESHOLDS_DIT)]
    return out + [Setting(f"cache block interval {i}", Config.from_dict(
        {"cache": {"method": "block", "interval": i, "warmup_steps": 2}}), "cache:interval", n)
        for n, i in enumerate(CACHE_INTERVALS_DIT)]


def token_settings(family: str) -> list[Setting]:
    base = token_base(family)
    return [Setting(f"tokens {base['method']} {r:g}", Config.from_dict({"tokens": {**base, "ratio": r}}), "tokens", n)
            for n, r in enumerate(TOKEN_RATIOS)]


def attention_settings(family: str, patterns=SPARSE_PATTERNS) -> list[Setting]:
    """Sparse attention rows (video DiTs; other families get none)."""
    if not FAMILIES[family].video or _kind(family) != "dit":
        return []
    return [Setting(f"attention {p} {d:g}", Config.from_dict(
        {"attention": {"pattern": p, "density": d, "min_tokens": 0}}), f"attention:{p}", n)
        for p in patterns for n, d in enumerate(DENSITIES)]


def preset_settings(family: str, names=("safe", "balanced", "fast")) -> list[Setting]:
    return [Setting(f"preset {n}", preset(n, family), "preset") for n in names]


def sweep(family: str, spec: str) -> list[Setting]:
    """Rows for ``--sweep``: a technique name (``cache``, ``tokens``, ``attention``) for its main knob,
    or ``section.field=v1,v2,...`` for any field, starting from the family's ``balanced`` section (or the
    technique's sweep base when balanced leaves it off)."""
    spec = spec.strip()
    if spec in TECHNIQUES:
        rows = {"cache": cache_settings, "tokens": token_settings, "attention": attention_settings}[spec](family)
        if not rows:
            raise ValueError(f"--sweep {spec}: the {family} family has no {spec} setting to sweep "
                             "(sparse attention is for video DiTs)")
        return rows
    if "=" not in spec or "." not in spec.split("=")[0]:
        raise ValueError(f"--sweep {spec!r}: give a technique ({', '.join(TECHNIQUES)}) or section.field=v1,v2,... "
                         "(e.g. cache.threshold=0.05,0.1,0.2)")
    key, values = spec.split("=", 1)
    section, name = key.split(".", 1)
    if section not in TECHNIQUES:
        raise ValueError(f"--sweep {spec!r}: {section!r} is not a technique; use one of {', '.join(TECHNIQUES)}")
    base = getattr(preset("balanced", family), section)
    if base.enabled:
        base = base.to_dict()
    else:
        first = sweep(family, section)[0].config
        base = getattr(first, section).to_dict()
    if "min_tokens" in base and name != "min_tokens":
        base["min_tokens"] = 0  # measure the setting on the call given (see the module's docstring)
    if section == "cache" and base.get("method") == "block" and name in ("threshold", "interval"):
        base.update(interval=1) if name == "threshold" else base.update(threshold=0.0)  # one trigger at a time
    rows = []
    for n, text in enumerate(v.strip() for v in values.split(",") if v.strip()):
        cfg = Config.from_dict({section: {**base, name: _value(text)}})  # raises ConfigError naming the field
        rows.append(Setting(f"{section}.{name}={text}", cfg, section, n))
    if not rows:
        raise ValueError(f"--sweep {spec!r}: no values after '='")
    return rows


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text
