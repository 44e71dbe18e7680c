"""The processor on tiny real pipelines: family math reused, exactness at no-op settings, fidelity floors."""

import dataclasses

import numpy as np
import pytest
import torch

import accel
from accel.config_base import ConfigError
from accel.eval.metrics import psnr
from accel.pipelines import tiny

FAMILIES = ["wan", "cogvideox", "flux", "sd15"]
MASKED = ["hunyuanvideo"]  # its joint attention carries a key-padding mask over the padded prompt
SIZE = {"height": 64, "width": 64}  # tiny models: >= 3 tiles of 16 tokens per attention call
# Tiny shapes hold few tiles and few tokens, so the preset's block size and size threshold are scaled down
# with them (the preset leaves calls under its min_tokens dense); eager flex keeps the reference backends fast.
TINY = {"block_size": 16, "flex_compile": False}
TINY_PRESET = {"block_size": 16, "min_tokens": 0}
PRESET = "safe"  # the preset with sparse attention for video DiTs
# PSNR floor (dB) of the PRESET's attention part vs dense on the tiny random-weight models, measured on a
# 2-core CPU at block 16 (radial, density 0.25): wan 53.9, cogvideox 37.0, hunyuanvideo 42.7; floors ~3-4 dB under.
# Families the preset leaves dense (flux, sd15) must stay bitwise identical.
FLOOR = {"wan": 50.0, "cogvideox": 33.0, "hunyuanvideo": 40.0}


def _run(pipe, name, **kw):
    out = pipe(**tiny.example_inputs(name, **SIZE, **kw))
    return np.asarray(out.frames if hasattr(out, "frames") else out.images, dtype=np.float32)


def _attention(**fields):
    return {"attention": {**TINY, **fields}}


@pytest.mark.parametrize("name", FAMILIES + MASKED)
def test_dense_pattern_on_flex_reproduces_family_processor(tiny_cache, name):
    pipe = tiny_cache(name)
    ref = _run(pipe, name)
    with accel.applied(pipe, _attention(backend="flex")):
        out = _run(pipe, name)
        st = accel.stats(pipe)["attention"]
    assert st["sparse_calls"] > 0 and st["passthrough_calls"] == 0, st
    assert np.abs(out - ref).max() < 1e-4  # fp32, through the whole pipeline (VAE included)


@pytest.mark.parametrize("name", FAMILIES + MASKED)
def test_preset_fidelity_floor_and_remove_restores(tiny_cache, name):
    pipe = tiny_cache(name)
    ref = _run(pipe, name)
    preset = accel.preset(PRESET, name).attention
    if not preset.enabled:  # the preset leaves this family dense: applying it changes nothing
        assert name in ("flux", "sd15"), f"{PRESET} has no attention part for {name}"
        with accel.applied(pipe, {"attention": preset}):
            assert np.array_equal(_run(pipe, name), ref)
        return
    assert preset.pattern != "dense" and preset.density < 1.0
    cfg = dataclasses.replace(preset, **TINY_PRESET)
    with accel.applied(pipe, {"attention": cfg}):
        out = _run(pipe, name)
        st = accel.stats(pipe)["attention"]
    assert np.isfinite(out).all()
    assert st["sparse_calls"] > 0 and st["realised_density"] < 1.0 and st["passthrough_calls"] == 0, st
    assert psnr(ref, out) >= FLOOR[name], (psnr(ref, out), st)
    assert np.array_equal(_run(pipe, name), ref)  # removed: bitwise as before
    with accel.applied(pipe, {"attention": preset}):  # as shipped: the tiny shapes are under min_tokens
        assert np.array_equal(_run(pipe, name), ref)
        assert accel.stats(pipe)["attention"]["sparse_calls"] == 0


def test_default_config_is_bitwise_identical(tiny_cache):
    pipe = tiny_cache("wan")
    ref = _run(pipe, "wan")
    with accel.applied(pipe, {"attention": {}}):
        assert np.array_equal(_run(pipe, "wan"), ref)


def test_dense_steps_and_layers_are_honoured(tiny_cache):
    pipe = tiny_cache("wan")
    ref = _run(pipe, "wan")
    steps = len(pipe.scheduler.timesteps)
    sparse = dict(pattern="tile", backend="flex", density=0.5)
    with accel.applied(pipe, _attention(**sparse, dense_steps=steps)):
        assert np.array_equal(_run(pipe, "wan"), ref)
        st = accel.stats(pipe)["attention"]
        assert st["sparse_calls"] == 0 and st["dense_calls"] > 0
    with accel.applied(pipe, _attention(**sparse, dense_layers=100)):
        assert np.array_equal(_run(pipe, "wan"), ref)
    with accel.applied(pipe, _attention(**sparse, min_tokens=10**6)):  # every call below the size: dense
        assert np.array_equal(_run(pipe, "wan"), ref)
        st = accel.stats(pipe)["attention"]
        assert st["sparse_calls"] == 0 and st["dense_calls"] > 0
    with accel.applied(pipe, _attention(**sparse, dense_layers=1, dense_steps=1)):
        _run(pipe, "wan")
        st = accel.stats(pipe)["attention"]
        forwards, sites = accel.stats(pipe)["denoiser_forwards"], st["sites"]
        per_step = forwards // steps
        # step 0: every site dense; later steps: only the first site dense
        assert st["dense_calls"] == per_step * sites + (forwards - per_step)
        assert st["sparse_calls"] == (forwards - per_step) * (sites - 1)


def test_spatial_temporal_profiles_heads_and_cfg_batch(tiny_cache):
    pipe = tiny_cache("cogvideox")  # CFG batched [uncond, cond]: batch 2 through the sparse path
    with accel.applied(pipe, _attention(pattern="spatial_temporal", backend="flex", density=0.5)):
        out = _run(pipe, "cogvideox", guidance_scale=6.0)
        st = accel.stats(pipe)["attention"]
    assert np.isfinite(out).all() and st["sparse_calls"] > 0
    assert sum(st["heads"].values()) == st["sites"] * pipe.transformer.config.num_attention_heads


def test_unavailable_backend_errors_or_falls_back(tiny_cache, monkeypatch):
    from accel.attention import backends

    monkeypatch.setattr(backends, "unavailable_reason",
                        lambda b, d: None if b in ("sdpa", "flex") else f"{b} missing here")
    import accel.attention as att

    monkeypatch.setattr(att, "unavailable_reason", backends.unavailable_reason)
    pipe = tiny_cache("flux")
    with pytest.raises(ConfigError, match="attention.backend: 'triton' is unavailable"):
        accel.apply(pipe, _attention(pattern="tile", backend="triton", density=0.5))
    assert not accel.api.is_applied(pipe)
    with accel.applied(pipe, _attention(pattern="tile", backend="triton", density=0.5, on_unavailable="fallback")):
        _run(pipe, "flux")
        st = accel.stats(pipe)["attention"]
    assert st["backend"] == "flex" and "missing" in st["fallback_reason"] and st["sparse_calls"] > 0


def test_auto_backend_runs_gather_on_cpu_and_stats_name_it(tiny_cache):
    from accel.attention.backends import auto_backend

    assert accel.AttentionConfig().backend == "auto" and not accel.AttentionConfig().enabled
    assert auto_backend(torch.device("cpu"), torch.float32) == "gather"
    assert auto_backend(torch.device("cuda"), torch.float32) == "flex"  # the kernel's fp32 dot would be tf32
    pipe = tiny_cache("wan")
    with accel.applied(pipe, {"attention": {**TINY_PRESET, "pattern": "tile", "density": 0.5}}):
        _run(pipe, "wan")
        st = accel.stats(pipe)["attention"]
    assert st["configured_backend"] == "auto" and st["backend"] == "gather"
    assert st["backend_calls"] == {"gather": st["sparse_calls"]} and st["sparse_calls"] > 0 and st["why_dense"] is None


@pytest.mark.parametrize("case", ["tokens_first", "min_tokens", "one_block"])
def test_stats_say_why_sparse_attention_did_nothing(tiny_cache, case):
    pipe = tiny_cache("wan")
    att = {**TINY, "pattern": "radial", "density": 0.25, "min_tokens": 0}
    cfg = {"attention": att}
    if case == "tokens_first":  # token merging shortens the sequence before attention sees it
        cfg["tokens"] = {"ratio": 0.5, "min_tokens": 0}
    elif case == "min_tokens":
        att["min_tokens"] = 10**6
    else:
        att["block_size"] = 128  # the tiny grid fits in one block
    with accel.applied(pipe, cfg):
        _run(pipe, "wan")
        st = accel.stats(pipe)
    a = st["attention"]
    assert a["sparse_calls"] == 0 and a["why_dense"], a
    reason = {"tokens_first": "grid_lost", "min_tokens": "below_min_tokens", "one_block": "one_block"}[case]
    assert max(a["dense_reasons"], key=a["dense_reasons"].get) == reason
    assert {"grid_lost": "token reduction", "below_min_tokens": "min_tokens",
            "one_block": "block_size"}[reason] in a["why_dense"]
    if case == "tokens_first":
        assert st["tokens"]["average_removed"] > 0  # token reduction did run
