"""Shared by tests/combos: each technique at a setting that engages on the tiny shapes, its fidelity floor,
and the check that it engaged.

Floors (PSNR against the same combination without accel, same seed) are the ones the technique's own tests
use on the tiny random-weight pipelines: the step cache 26 dB (the lowest preset floor in
tests/cache/test_cache.py), token merging 25 dB (tests/tokens/test_pipelines.py), sparse attention 33 dB
(the lowest floor in tests/attention/test_processor.py, there at density 0.25; here 0.5). They catch a
technique that reuses or drops the wrong tensor (10-20 dB), not a small loss of quality.
"""

from __future__ import annotations

import numpy as np
import torch

import accel
from accel.eval.metrics import psnr

TECHNIQUES = ("cache", "tokens", "attention")
FLOOR_DB = {"cache": 26.0, "tokens": 25.0, "attention": 33.0}


def config(technique: str, family: str) -> dict:
    """The technique alone, on tiny shapes: every size threshold off, blocks of 16 tokens."""
    if technique == "cache":  # deepcache on UNets, block cache on DiTs: a full step every 2
        return {"cache": {"method": "auto", "interval": 2}}
    if technique == "tokens":  # tiny SDXL has attention one level down only, as the real one
        return {"tokens": {"ratio": 0.5, **({"max_downsample": 2} if family == "sdxl" else {})}}
    if technique == "attention":
        return {"attention": {"pattern": "radial", "density": 0.5, "block_size": 16}}
    raise ValueError(technique)


def assert_engaged(technique: str, stats: dict) -> None:
    """The technique did its work in the last call, by its own counts in `accel.stats`."""
    st = stats[technique]
    if technique == "cache":
        assert st["reused"] > 0 and st["computed"] > 0, st
    elif technique == "tokens":
        assert st["realised_ratio"] >= 0.4, st  # ratio 0.5 of every reduced block (UNets: 0.46 over levels)
    else:
        assert st["sparse_calls"] > 0 and st["dense_calls"] == 0 and st["realised_density"] < 1.0, st


def assert_within_floor(technique: str, ref: np.ndarray, out: np.ndarray) -> None:
    assert np.isfinite(out).all()
    value = psnr(ref, out)
    assert value >= FLOOR_DB[technique], f"{technique}: PSNR {value:.1f} dB < {FLOOR_DB[technique]} dB"


def denoiser(pipe) -> torch.nn.Module:
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def check_technique(pipe, call, technique: str, family: str, ref: np.ndarray) -> dict:
    """Applied: engaged and within the floor of ``ref`` (the same combination without accel); removed:
    bitwise ``ref`` again. Returns the stats of the accelerated call."""
    with accel.applied(pipe, config(technique, family)):
        out = call()
        stats = accel.stats(pipe)
    assert_engaged(technique, stats)
    assert_within_floor(technique, ref, out)
    np.testing.assert_array_equal(call(), ref)
    return stats
