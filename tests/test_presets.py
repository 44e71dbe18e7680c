"""The preset rule (`accel.presets`): floors, the tie threshold, safe's most-faithful pick, and the promises."""

from types import SimpleNamespace

import pytest

import accel
from accel import presets
from accel.config import PRESET_ORDER, TECHNIQUES, available_presets


def _row(label, speedup, psnr):
    return {"label": label, "speedup": speedup, "psnr": psnr}


def test_fastest_over_the_floor_and_faster_than_the_baseline():
    rows = [_row("slow", 0.9, 60.0), _row("a", 1.5, 41.0), _row("b", 2.5, 33.0), _row("c", 4.0, 20.0)]
    assert presets.pick(rows, 40.0)["label"] == "a"
    assert presets.pick(rows, 32.0)["label"] == "b"
    assert presets.pick(rows, 50.0) is None  # "slow" meets it but is not faster than the baseline
    assert presets.pick([_row("same", 1.0, None)], None) is None  # as fast as the baseline is no candidate


def test_within_the_tie_the_higher_psnr_wins():
    # times 1/2.0 and 1/1.85: within 10% of each other; 1/1.7 is 17.6% slower than the fastest
    rows = [_row("fast", 2.0, 33.0), _row("close", 1.85, 38.0), _row("far", 1.7, 45.0)]
    assert presets.pick(rows, 32.0)["label"] == "close"
    assert presets.pick(rows, 32.0, tie=0.0)["label"] == "fast"
    # the tie is on time: 2.0 / 1.1 = 1.818 is the slowest speed-up still tied
    assert presets.pick([_row("fast", 2.0, 33.0), _row("edge", 1.82, 40.0)], 32.0)["label"] == "edge"
    assert presets.pick([_row("fast", 2.0, 33.0), _row("out", 1.81, 40.0)], 32.0)["label"] == "fast"


def test_identical_output_counts_as_infinite_psnr_and_objects_and_functions_are_read():
    rows = [SimpleNamespace(label="x", speedup=1.5, psnr_worst=None), SimpleNamespace(label="y", speedup=1.52,
                                                                                     psnr_worst=45.0)]
    assert presets.pick(rows, 40.0, psnr="psnr_worst").label == "x"
    assert presets.pick(rows, 40.0, psnr=lambda r: r.psnr_worst, speedup=lambda r: r.speedup).label == "x"
    assert presets.pick([SimpleNamespace(speedup=None, psnr=50.0)]) is None  # did not run


def test_derive_applies_each_tiers_rule():
    cache = [_row("i2", 1.4, 44.0), _row("i4", 2.1, 38.0), _row("i5", 2.6, 30.0), _row("i8", 3.5, 27.0)]
    picks = presets.derive(cache, "cache")
    assert {t: r["label"] for t, r in picks.items()} == {"safe": "i2", "balanced": "i4", "fast": "i8"}
    assert presets.derive(cache, "cache", offset=5.0) == {"safe": None, "balanced": cache[1], "fast": cache[1]}
    reduction = [_row("merge 0.3", 1.26, 41.7), _row("merge 0.5", 1.6, 38.6), _row("sparse", 1.15, 57.0),
                 _row("prune", 1.9, 31.0)]
    picks = presets.derive(reduction, "reduction")
    # safe: the most faithful row at >= 1.2x (sparse at 57 dB is not 1.2x faster); balanced/fast: floors 35 / 30
    assert {t: r["label"] for t, r in picks.items()} == {"safe": "merge 0.3", "balanced": "merge 0.5",
                                                         "fast": "prune"}
    with pytest.raises(ValueError, match="choose one of cache, reduction"):
        presets.derive(cache, "tokens")


def test_the_rule_matches_the_documented_floors_and_promises():
    assert presets.CACHE_FLOORS == {"safe": 40.0, "balanced": 32.0, "fast": 26.0}
    assert presets.REDUCTION_FLOORS == {"balanced": 35.0, "fast": 30.0} and presets.SAFE_MIN_SPEEDUP == 1.2
    assert presets.PROMISES["balanced"] == ("the fastest settings at >= 32 dB (step cache) and >= 35 dB "
                                            "(token reduction)")
    assert set(presets.PROMISES) == set(PRESET_ORDER) and presets.DEFAULT_PRESET in presets.TIERS
    for t in TECHNIQUES:  # every tier a technique's table defines is a tier of the rule
        assert set(t.presets) <= set(presets.TIERS), t.section
    assert available_presets() == PRESET_ORDER
    assert accel.preset(presets.DEFAULT_PRESET, "sd15").enabled
