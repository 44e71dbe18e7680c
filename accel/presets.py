"""The preset rule: the tiers, their fidelity floors, the tie threshold and what each preset promises.

A preset is a per-family setting of each technique, read from measured rows by one rule; each
technique keeps its picks in the ``PRESETS`` table of ``accel/<technique>/config.py``, and
docs/presets.md tells how each table was measured. PSNR is against the unaccelerated output of the
same seed; speed-ups are measured side by side with that baseline in one run.

- Step cache: the fastest row at PSNR >= 40 dB (``safe``), 32 dB (``balanced``), 26 dB (``fast``).
- Token reduction and sparse attention (one table: they do not stack): ``safe`` takes the
  highest-PSNR row at least 1.2x faster, ``balanced`` the fastest at >= 35 dB, ``fast`` the fastest
  at >= 30 dB.
- A candidate runs faster than the baseline. Rows whose time is within `SPEED_TIE` (10%) of the
  fastest candidate's count as equally fast, and the higher PSNR wins: repeats of one setting vary
  by up to +-15% on a shared CPU.

`pick` applies the rule to one list of rows and `derive` to a technique's table for every tier; the
derivation script, the video judge, ``accel tune`` and ``accel models`` read the rule from here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

OFF = "off"
TIERS = ("safe", "balanced", "fast")
# The order users meet the presets in: from exact to most aggressive.
PRESET_ORDER = (OFF, *TIERS)
# The preset `accel generate`, `accel batch`, `accel app` and `accel run` use when none is given: an
# acceleration tool accelerates by default (`--preset off` turns it off).
DEFAULT_PRESET = "balanced"
# Candidates whose time is within this fraction of the fastest candidate's count as equally fast.
SPEED_TIE = 0.10


@dataclass(frozen=True)
class Rule:
    """How one tier picks one technique's setting from measured rows.

    Args:
        floor: the least PSNR in dB a candidate keeps; None for no floor.
        min_speedup: the least speed-up a candidate has; None: any speed-up above 1.
        most_faithful: the highest-PSNR candidate wins, not the fastest.
    """

    floor: float | None = None
    min_speedup: float | None = None
    most_faithful: bool = False


# part -> tier -> rule. "reduction" is token reduction and sparse attention, judged on one table.
RULES: dict[str, dict[str, Rule]] = {
    "cache": {"safe": Rule(40.0), "balanced": Rule(32.0), "fast": Rule(26.0)},
    "reduction": {"safe": Rule(min_speedup=1.2, most_faithful=True), "balanced": Rule(35.0), "fast": Rule(30.0)},
}
# technique section -> the part of RULES that picks its setting
PART_OF = {"cache": "cache", "tokens": "reduction", "attention": "reduction"}
CACHE_FLOORS = {tier: rule.floor for tier, rule in RULES["cache"].items()}
REDUCTION_FLOORS = {tier: rule.floor for tier, rule in RULES["reduction"].items() if rule.floor is not None}
SAFE_MIN_SPEEDUP = RULES["reduction"]["safe"].min_speedup

# What each preset promises (`accel models`, the README's and docs/presets.md's table).
PROMISES = {
    OFF: "no acceleration: the pipeline as it is",
    "safe": f"the most faithful settings that still gain: step cache >= {CACHE_FLOORS['safe']:g} dB, light token "
            "reduction (sparse attention instead for video DiTs)",
    **{tier: f"the fastest settings at >= {CACHE_FLOORS[tier]:g} dB (step cache) and "
             f">= {REDUCTION_FLOORS[tier]:g} dB (token reduction)" for tier in ("balanced", "fast")},
}

Accessor = str | Callable[[Any], Any]


def _reader(how: Accessor) -> Callable[[Any], Any]:
    if callable(how):
        return how
    return lambda row: row.get(how) if isinstance(row, Mapping) else getattr(row, how)


def pick(rows, floor: float | None = None, *, min_speedup: float | None = None, most_faithful: bool = False,
         psnr: Accessor = "psnr", speedup: Accessor = "speedup", tie: float = SPEED_TIE):
    """The rule's choice among measured rows.

    Args:
        rows: the measured rows of one technique on one family: mappings or objects with a speed-up
            (the baseline's time over the row's) and a PSNR against the baseline (None: identical
            output, counted as infinite).
        floor: the least PSNR in dB; None for no floor (rows filtered by the caller already).
        min_speedup: the least speed-up of a candidate; None: any above 1 (faster than the baseline).
        most_faithful: take the highest-PSNR candidate instead of the fastest.
        psnr: a row's PSNR: its key or attribute name, or a function of the row.
        speedup: a row's speed-up, likewise (None: it did not run).
        tie: the fraction of time within which candidates count as equally fast (`SPEED_TIE`).

    Returns:
        The chosen row, or None when no row is a candidate.
    """
    psnr_of, speed_of = _reader(psnr), _reader(speedup)

    def db(row) -> float:
        value = psnr_of(row)
        return math.inf if value is None else value

    ok = [r for r in rows if (s := speed_of(r)) is not None and s > 1.0
          and (min_speedup is None or s >= min_speedup) and (floor is None or db(r) >= floor)]
    if not ok:
        return None
    if not most_faithful:
        best = max(speed_of(r) for r in ok)
        ok = [r for r in ok if speed_of(r) * (1 + tie) >= best]  # time within `tie` of the fastest's
    return max(ok, key=lambda r: (db(r), speed_of(r)))


def derive(rows, part: str, *, offset: float = 0.0, psnr: Accessor = "psnr", speedup: Accessor = "speedup",
           tie: float = SPEED_TIE) -> dict:
    """Every tier's pick from one technique's table, by the tier's `Rule`.

    Args:
        rows: the measured candidate rows (as `pick` reads them); leave out rows a preset may not
            use before calling.
        part: ``"cache"`` or ``"reduction"`` (token reduction and sparse attention), a key of `RULES`;
            `PART_OF` maps a technique section to its part.
        offset: dB added to every floor (random-weight models, whose PSNR overstates a trained model's).
        psnr: a row's PSNR, as for `pick`.
        speedup: a row's speed-up, as for `pick`.
        tie: as for `pick`.

    Returns:
        ``{tier: the chosen row or None}`` for each of `TIERS`.
    """
    if part not in RULES:
        raise ValueError(f"part {part!r}: choose one of {', '.join(RULES)}")
    out = {}
    for tier, rule in RULES[part].items():
        floor = None if rule.floor is None else rule.floor + offset
        out[tier] = pick(rows, floor, min_speedup=rule.min_speedup, most_faithful=rule.most_faithful,
                         psnr=psnr, speedup=speedup, tie=tie)
    return out
