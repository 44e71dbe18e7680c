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

from ..config import TECHNIQUES as _RECORDS
from ..config import Config, preset, sweep_rows

# The sections `--sweep SECTION` takes: the techniques whose record has sweep knobs.
TECHNIQUES = tuple(t.section for t in _RECORDS if t.sweep)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One row: a label and the config it applies (``None``: the unaccelerated baseline)."""

    label: str
    config: Config | None
    technique: str = ""  # "cache", "tokens", "attention", "preset", "stack", "config" or "" (baseline)
    order: int = 0  # position on its knob, mildest first: a search stops a knob at its first failure


def settings(family: str, section: str, calibrated=None) -> list[Setting]:
    """The rows of one technique's knobs on ``family`` (its record's sweep knobs, `accel.config.sweep_rows`).

    Args:
        family: a key of `accel.families.FAMILIES`.
        section: a technique in `TECHNIQUES`.
        calibrated: values for a calibrated knob (the DiT cache thresholds `accel tune` reads off the
            user's prompts) instead of its fixed grid.

    Returns:
        The rows, mildest first on each knob; empty when no knob applies to the family.
    """
    return [Setting(*row) for row in sweep_rows(family, section, calibrated)]


def cache_settings(family: str, thresholds=None) -> list[Setting]:
    """The cache knob for ``family``: DeepCache intervals (UNets) or block-cache thresholds and
    intervals (DiTs; ``thresholds`` replaces the fixed grid)."""
    return settings(family, "cache", thresholds)


def token_settings(family: str) -> list[Setting]:
    return settings(family, "tokens")


def attention_settings(family: str) -> list[Setting]:
    """Sparse attention rows (video DiTs; other families get none)."""
    return settings(family, "attention")


def preset_settings(family: str, names=("safe", "balanced", "fast")) -> list[Setting]:
    return [Setting(f"preset {n}", preset(n, family), "preset") for n in names]


def sweep(family: str, spec: str) -> list[Setting]:
    """Rows for ``--sweep``: a technique name (``cache``, ``tokens``, ``attention``) for its main knob,
    or ``section.field=v1,v2,...`` for any field, starting from the family's ``balanced`` section (or the
    technique's sweep base when balanced leaves it off)."""
    spec = spec.strip()
    if spec in TECHNIQUES:
        rows = settings(family, spec)
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


STEP_FRACTIONS = (0.8, 0.6, 0.4, 0.25)  # of the baseline's steps, mildest first


def step_counts(steps: int) -> list[int]:
    """The step counts the step axis tries below the baseline's ``steps``, mildest first (at least 2)."""
    out = []
    for f in STEP_FRACTIONS:
        n = max(2, round(steps * f))
        if n < steps and n not in out:
            out.append(n)
    return out


def solver_settings(pipe, steps: int) -> tuple[list[Setting], str | None]:
    """The step axis: the pipeline's own scheduler and each solver for its model (`accel.solver.candidates`) at
    `step_counts`, one knob per scheduler, mildest first. Returns (rows, why there are none)."""
    from ..solver.schedulers import candidates, takes_steps

    why = takes_steps(pipe)
    if why:
        return [], why
    counts = step_counts(steps)
    if not counts:
        return [], f"the baseline runs {steps} step(s): nothing fewer to try"
    own = type(pipe.scheduler).__name__
    rows = [Setting(f"steps {n} ({own})", Config.from_dict({"solver": {"steps": n}}), "solver:own", i)
            for i, n in enumerate(counts)]
    for name in candidates(pipe.scheduler):
        rows += [Setting(f"steps {n} {name}", Config.from_dict({"solver": {"scheduler": name, "steps": n}}),
                         f"solver:{name}", i) for i, n in enumerate(counts)]
    return rows, None


def olss_settings(folders: dict[int, str]) -> list[Setting]:
    """The OLSS rows: one fitted scheduler per step count (``{steps: folder}``), mildest first."""
    return [Setting(f"steps {n} olss", Config.from_dict({"solver": {"scheduler": "olss", "olss": folder}}),
                    "solver:olss", i) for i, (n, folder) in enumerate(sorted(folders.items(), reverse=True))]

