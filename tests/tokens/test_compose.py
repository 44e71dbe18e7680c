"""Tokens together with a step cache applied at the same time, and with the attention backends."""

import importlib.util

import numpy as np
import pytest
from helpers.snapshot import run, state_of

import accel
from accel.eval.metrics import psnr


@pytest.mark.parametrize("name,cache", [
    ("sd15", {"method": "deepcache", "interval": 2}),
    ("flux", {"method": "block", "threshold": 0.5}),
])
@pytest.mark.parametrize("method", ["merge", "kv_downsample", "prune"])
def test_with_step_cache_at_the_same_time(tiny_cache, name, cache, method):
    pipe = tiny_cache(name)
    base = run(pipe, name, num_inference_steps=4)
    before = state_of(pipe)
    cfg = {"cache": cache, "tokens": {"ratio": 0.5, "method": method, "refresh_interval": 2}}
    with accel.applied(pipe, cfg):
        out = run(pipe, name, num_inference_steps=4)
        stats = accel.stats(pipe)
    assert stats["tokens"]["realised_ratio"] > 0, stats["tokens"]
    assert stats["cache"], "the cache technique reported nothing"
    assert psnr(base, out) > 20.0  # floor for both lossy techniques stacked, tiny random models
    assert state_of(pipe) == before
    assert np.array_equal(run(pipe, name, num_inference_steps=4), base)


def test_with_sdpa_processors(tiny_cache):
    """The tiny pipelines run diffusers' default SDPA processors; kv_downsample pools inside them."""
    pipe = tiny_cache("sd15")
    names = {type(m.processor).__name__ for m in pipe.unet.modules() if hasattr(m, "processor")}
    assert names == {"AttnProcessor2_0"}
    with accel.applied(pipe, {"tokens": {"ratio": 0.5, "method": "kv_downsample"}}):
        run(pipe, "sd15", num_inference_steps=1)
        assert accel.stats(pipe)["tokens"]["realised_ratio"] > 0


@pytest.mark.skipif(importlib.util.find_spec("xformers") is None, reason="xformers is not installed (CPU CI)")
def test_with_xformers(tiny_cache):
    pipe = tiny_cache("sd15")
    base = run(pipe, "sd15", num_inference_steps=2)
    pipe.enable_xformers_memory_efficient_attention()
    try:
        with accel.applied(pipe, {"tokens": {"ratio": 0.5}}):
            out = run(pipe, "sd15", num_inference_steps=2)
    finally:
        pipe.disable_xformers_memory_efficient_attention()
    assert psnr(base, out) > 25.0
