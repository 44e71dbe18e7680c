"""The token part of the presets: defined for every family, composed with the cache part, applied
to tiny pipelines with a fidelity floor, and left out below its ``min_tokens``.

The tiny pipelines are far below the presets' ``min_tokens`` (4096 image/video tokens), so the
fidelity tests lower it to 0 to exercise the preset's setting itself.

Floors are PSNR against the same pipeline's unaccelerated output (same seed) on tiny
random-weight models, token part alone: ``FLOOR_DB`` per preset. The whole preset (cache and
tokens stacked) must stay above ``STACKED_FLOOR_DB``. BENCHMARKS.md "## Token merging" has the
full-size numbers the presets were chosen from.
"""

import dataclasses

import numpy as np
import pytest
from helpers.snapshot import run, state_of

import accel
from accel.cache.config import PRESETS as CACHE_PRESETS
from accel.cache.config import CacheConfig
from accel.config import Config
from accel.eval.metrics import psnr
from accel.families import FAMILIES
from accel.tokens.config import PRESETS, TokenConfig

FLOOR_DB = {"safe": 40.0, "balanced": 35.0, "fast": 30.0}  # measured: 45-61 dB at these presets
STACKED_FLOOR_DB = 20.0
STEPS = 4


def _ungated(tokens: TokenConfig) -> TokenConfig:
    return dataclasses.replace(tokens, min_tokens=0)


@pytest.mark.parametrize("name", ["sd15", "flux"])
def test_token_preset_leaves_calls_under_min_tokens_whole(tiny_cache, name):
    # tiny pipelines have 16-64 image tokens, far under the presets' 4096: bitwise untouched
    pipe = tiny_cache(name)
    tokens = accel.preset("fast", name).tokens
    assert tokens.min_tokens >= 4096
    base = run(pipe, name, num_inference_steps=STEPS)
    with accel.applied(pipe, Config(tokens=tokens)):
        out = run(pipe, name, num_inference_steps=STEPS)
        stats = accel.stats(pipe)
    assert stats["tokens"]["realised_ratio"] == 0, stats["tokens"]
    np.testing.assert_array_equal(out, base)
    # at exactly this call's token count the same setting reduces: the gate reads the call's grid
    n = int(np.prod(stats["grid"]))
    assert n < tokens.min_tokens
    with accel.applied(pipe, Config(tokens=dataclasses.replace(tokens, min_tokens=n))):
        run(pipe, name, num_inference_steps=STEPS)
        assert accel.stats(pipe)["tokens"]["realised_ratio"] > 0.05


@pytest.mark.parametrize("level", ["safe", "balanced", "fast"])
def test_every_family_has_an_enabled_token_preset_composed_with_the_cache(level):
    assert set(FLOOR_DB) <= set(PRESETS), "a preset level lost its token settings"
    for family in FAMILIES:
        cfg = accel.preset(level, family)
        if cfg.attention.enabled:  # sparse attention instead: the two do not stack (tests/test_config.py)
            assert not cfg.tokens.enabled and PRESETS[level][family] is None, (level, family)
            continue
        assert cfg.tokens.enabled, (level, family)
        fields = PRESETS[level].get(family, PRESETS[level]["*"])
        assert cfg.tokens == TokenConfig(**fields)
        cache_fields = CACHE_PRESETS.get(level, {}).get(family, CACHE_PRESETS.get(level, {}).get("*"))
        expected_cache = CacheConfig(**cache_fields) if cache_fields else CacheConfig()
        assert cfg.cache == expected_cache, f"{level}/{family}: composing lost or changed the cache part"
    # UNets whose top level has no attention (SDXL) must reach the level that has it
    assert accel.preset("balanced", "sdxl").tokens.max_downsample >= 2


@pytest.mark.parametrize("name,level", [(n, lv) for n in ("sd15", "wan") for lv in ("safe", "balanced", "fast")
                                         if accel.preset(lv, n).tokens.enabled]
                         + [("sdxl", "balanced"), ("flux", "balanced"), ("ltx", "safe")])
def test_token_preset_reduces_tokens_above_its_floor(tiny_cache, name, level):
    pipe = tiny_cache(name)
    base = run(pipe, name, num_inference_steps=STEPS)
    tokens_only = Config(tokens=_ungated(accel.preset(level, name).tokens))
    with accel.applied(pipe, tokens_only):
        out = run(pipe, name, num_inference_steps=STEPS)
        stats = accel.stats(pipe)["tokens"]
    assert stats["realised_ratio"] > 0.05, stats
    got = psnr(base, out)
    assert got > FLOOR_DB[level], f"{name} {level}: {got:.1f} dB <= {FLOOR_DB[level]} dB"


@pytest.mark.parametrize("name", ["sd15", "flux"])
def test_whole_preset_applies_cache_and_tokens_and_removes_cleanly(tiny_cache, name):
    pipe = tiny_cache(name)
    base = run(pipe, name, num_inference_steps=STEPS)
    before = state_of(pipe)
    whole = accel.preset("balanced", name)
    with accel.applied(pipe, dataclasses.replace(whole, tokens=_ungated(whole.tokens))):
        out = run(pipe, name, num_inference_steps=STEPS)
        stats = accel.stats(pipe)
    assert stats["tokens"]["realised_ratio"] > 0.05, stats["tokens"]
    assert stats["cache"], "the cache part of the preset did nothing"
    assert psnr(base, out) > STACKED_FLOOR_DB
    assert state_of(pipe) == before
    assert np.array_equal(run(pipe, name, num_inference_steps=STEPS), base)


def test_random_destinations_repeat_from_call_to_call(tiny_cache):
    # The random merge destinations come from the config's seed and the step, not from how many
    # calls the pipeline made: a resumed batch row or an app re-run must give the same picture.
    pipe = tiny_cache("sd15")
    outputs = {}
    for seed in (0, 1):
        with accel.applied(pipe, Config(tokens=TokenConfig(ratio=0.5, use_rand=True, seed=seed))):
            outputs[seed] = [run(pipe, "sd15", num_inference_steps=STEPS) for _ in range(2)]
    (first, again), (other_seed, _) = outputs[0], outputs[1]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other_seed)
