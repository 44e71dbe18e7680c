"""Step caching: exact at its no-op settings, reuse with a fidelity floor, no stale state, CFG streams
kept apart, diffusers' caches in pipelines that set no cache context, exact removal.

Fidelity floors are measured on the tiny random-weight pipelines, whose features change far more
between steps than a trained model's (relative L1 change of the first block's residual 0.05-0.6 per
step, against ~0.01-0.1 for trained models), so the floors are loose: they catch a cache that reuses
the wrong tensor (PSNR drops to ~10-20 dB), not a small loss of quality.
"""

import numpy as np
import pytest
import torch
from helpers.snapshot import run, state_of

import accel
from accel import CacheConfig
from accel.cache import block as block_module
from accel.config import preset as preset_config
from accel.config_base import ConfigError
from accel.eval.metrics import psnr
from accel.pipelines import tiny

UNETS = ("sd15", "sdxl", "animatediff")
FAMILY = {"wan22": "wan"}


def _handle(pipe):
    return pipe.__dict__["_accel"].handles["cache"]


@pytest.mark.parametrize("name", tiny.NAMES)
def test_noop_settings_bitwise_and_remove_restores(name, tiny_cache):
    """threshold 0 (block) / interval 1 (DeepCache): every hook runs, nothing is reused, output is
    bitwise the uncached one; remove puts back every attribute, hook and processor."""
    pipe = tiny_cache(name)
    ref = run(pipe, name)
    before = state_of(pipe)
    accel.apply(pipe, CacheConfig(method="auto", threshold=0.0, interval=1))
    out = run(pipe, name)
    st = accel.stats(pipe)["cache"]
    accel.remove(pipe)
    np.testing.assert_array_equal(out, ref)
    assert st["method"] == ("deepcache" if name in UNETS else "block")
    assert st["reused"] == 0 and st["computed"] > 0
    assert state_of(pipe) == before
    np.testing.assert_array_equal(run(pipe, name), ref)


# (pipeline, preset, steps, PSNR floor in dB): every family at a tier that caches. Measured PSNR on the
# tiny models at 10 steps (2-core CPU): sd15 balanced 41.0 dB (interval 5; 47.3 at interval 4), sdxl
# fast 41.5, animatediff fast 40.0, flux fast 63.0, sd3 balanced 49.1, pixart fast 96.6, cogvideox
# fast 52.8, wan fast 56.4, ltx fast 47.7, hunyuanvideo balanced 47.4; floors sit 11-20 dB below,
# since seeds and the noisy random weights move these by several dB, while a cache reusing the wrong
# tensor drops to ~10-20 dB.
PRESET_CASES = [("sd15", "balanced", 10, 30.0), ("sdxl", "fast", 10, 28.0), ("animatediff", "fast", 10, 26.0),
                ("flux", "fast", 10, 40.0), ("sd3", "balanced", 10, 32.0), ("pixart", "fast", 10, 40.0),
                ("cogvideox", "fast", 10, 32.0), ("wan", "fast", 10, 36.0), ("ltx", "fast", 10, 30.0),
                ("hunyuanvideo", "balanced", 10, 30.0)]


@pytest.mark.parametrize("name,preset,steps,floor", PRESET_CASES)
def test_preset_reuses_above_fidelity_floor(name, preset, steps, floor, tiny_cache):
    pipe = tiny_cache(name)
    ref = run(pipe, name, num_inference_steps=steps)
    cache_part = accel.Config(cache=preset_config(preset, FAMILY.get(name, name)).cache)  # other techniques off
    with accel.applied(pipe, cache_part):
        out = run(pipe, name, num_inference_steps=steps)
        st = accel.stats(pipe)["cache"]
    assert st["reused"] > 0, st
    assert 0 < st["hit_rate"] < 1
    assert all(p["computed"] + p["reused"] > 0 for p in st["parts"].values())
    assert psnr(ref, out) >= floor, (psnr(ref, out), st)


@pytest.mark.parametrize("name,cfg,size", [
    ("sd15", CacheConfig(method="deepcache", interval=2), 48),
    ("wan", CacheConfig(method="block", interval=2), 48),
    ("flux", CacheConfig(method="block", threshold=0.6), 48),
])
def test_second_call_equals_fresh_run(name, cfg, size, tiny_cache):
    """A call after another (other prompt, other size) equals that call on a freshly applied cache."""
    pipe = tiny_cache(name)
    second = dict(prompt="a red car on a bridge at night", height=size, width=size, num_inference_steps=5)
    with accel.applied(pipe, cfg):
        run(pipe, name, num_inference_steps=5)
        after_other = run(pipe, name, **second)
        st = accel.stats(pipe)["cache"]
    with accel.applied(pipe, cfg):
        fresh = run(pipe, name, **second)
    assert st["reused"] > 0
    np.testing.assert_array_equal(after_other, fresh)


def _reuses_own_branch(trace) -> bool:
    """Every reuse used the residual its own CFG branch stored last, not the other branch's."""
    last = {}
    reuses = 0
    for key, _, action, value in trace:
        if action == "store":
            last[key] = value
        elif action == "reuse":
            reuses += 1
            if value != last.get(key) or any(v == value for k, v in last.items() if k != key):
                return False
    return reuses > 0 and len(last) == 2


def test_cfg_branches_keep_separate_state(tiny_cache, monkeypatch):
    """Wan runs cond and uncond as two calls per step: each must reuse its own residual. The same
    check is run with the state deliberately shared (one key for both) and must then fail."""
    pipe = tiny_cache("wan")
    cfg = CacheConfig(method="block", interval=2)
    with accel.applied(pipe, cfg):
        trace = _handle(pipe).trace()
        run(pipe, "wan", num_inference_steps=5)
        own = list(trace)
        st = accel.stats(pipe)["cache"]
    assert set(st["by_branch"]) == {"cond", "uncond"}
    assert _reuses_own_branch(own)

    monkeypatch.setattr(block_module, "state_key", lambda s: ("shared", "shared"))
    with accel.applied(pipe, cfg):
        trace = _handle(pipe).trace()
        run(pipe, "wan", num_inference_steps=5)
    assert not _reuses_own_branch([(("t", i % 2), *e[1:]) for i, e in enumerate(trace)])


def test_batched_cfg_with_batch_of_two_matches_single_runs(tiny_cache):
    """SD1.5 batches [uncond, cond] (4 samples for 2 prompts): the DeepCache schedule is per call, so
    each image equals its own single-prompt run under the same cache."""
    pipe = tiny_cache("sd15")
    cfg = CacheConfig(method="deepcache", interval=3)
    prompts = ["a cat", "a red house by the sea"]
    def images(**kw):
        return pipe(**tiny.example_inputs("sd15", num_inference_steps=6, **kw)).images

    with accel.applied(pipe, cfg):
        both = images(prompt=prompts, negative_prompt=["blurry"] * 2,
                      generator=[torch.Generator().manual_seed(i) for i in (0, 1)])
        assert accel.stats(pipe)["cache"]["by_branch"]["batched"]["reused"] > 0
        single = [images(prompt=p, negative_prompt="blurry", generator=torch.Generator().manual_seed(i))
                  for i, p in enumerate(prompts)]
    assert both.shape[0] == 2
    np.testing.assert_allclose(both, np.concatenate(single), atol=2e-5)


def test_wan22_counts_steps_per_transformer(tiny_cache):
    """Wan 2.2's second expert starts its own stream: its first forward is computed, not reused from
    the other expert's residual."""
    pipe = tiny_cache("wan22")
    with accel.applied(pipe, CacheConfig(method="block", interval=2)):
        trace = _handle(pipe).trace()
        run(pipe, "wan22", num_inference_steps=8)
        st = accel.stats(pipe)["cache"]
        events = list(trace)
    assert {p.split(".")[0] for p in st["parts"]} == {"transformer", "transformer_2"}
    firsts = {}
    for key, step, action, _ in events:
        firsts.setdefault(key, (step, action))
    assert {k[0] for k in firsts} == {"transformer", "transformer_2"}
    assert all(v == (0, "store") for v in firsts.values()), firsts
    assert all(p["reused"] > 0 for p in st["parts"].values())


def test_taylor_extrapolation_reuses_and_differs_from_plain(tiny_cache):
    pipe = tiny_cache("wan")
    ref = run(pipe, "wan", num_inference_steps=9)
    outs = {}
    for order in (0, 1, 2):
        with accel.applied(pipe, CacheConfig(method="block", interval=3, taylor_order=order)):
            outs[order] = run(pipe, "wan", num_inference_steps=9)
            assert accel.stats(pipe)["cache"]["reused"] > 0
    assert not np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[1], outs[2])
    assert min(psnr(ref, o) for o in outs.values()) >= 40.0  # measured 63.7 (order 0), 64.9 (1), 64.2 (2) dB


def test_flux_img2img_with_diffusers_first_block_cache(tiny_cache):
    """FluxImg2ImgPipeline never calls cache_context: diffusers' own FirstBlockCache fails there;
    through accel the tracked branch supplies the context."""
    from diffusers import FirstBlockCacheConfig, FluxImg2ImgPipeline
    from PIL import Image

    from accel.pipelines.call import to_frames

    pipe = FluxImg2ImgPipeline(**tiny_cache("flux").components)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8"))

    def call():
        return to_frames(pipe(prompt="a cat", image=image, strength=0.9, num_inference_steps=8, height=32,
                              width=32, output_type="np", max_sequence_length=16,
                              generator=torch.Generator().manual_seed(0)))

    ref = call()
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    try:
        with pytest.raises(ValueError, match="No (cache )?context is set"):  # < 0.41: "No context is set"
            call()
    finally:
        pipe.transformer.disable_cache()
    before = state_of(pipe)  # as diffusers' own disable_cache left it

    with accel.applied(pipe, CacheConfig(method="diffusers.first_block", threshold=0.5)):
        out = call()
        st = accel.stats(pipe)["cache"]
    assert st["reused"] > 0 and st["method"] == "diffusers.first_block"
    assert psnr(ref, out) >= 40.0  # measured ~62 dB
    assert state_of(pipe) == before


@pytest.mark.parametrize("method,threshold,interval", [
    ("diffusers.mag", 0.3, 1), ("diffusers.pab", 0.0, 2), ("diffusers.taylorseer", 0.0, 2)])
def test_other_diffusers_caches_on_flux(method, threshold, interval, tiny_cache):
    pipe = tiny_cache("flux")
    ref = run(pipe, "flux", num_inference_steps=6)
    before = state_of(pipe)
    with accel.applied(pipe, CacheConfig(method=method, threshold=threshold, interval=interval)):
        out = run(pipe, "flux", num_inference_steps=6)
        st = accel.stats(pipe)["cache"]
    skipped = st["reused"] + sum(v["skipped"] for v in st.get("other", {}).values())
    assert skipped > 0, st
    assert psnr(ref, out) >= 35.0  # measured 54-79 dB
    assert state_of(pipe) == before


def test_config_errors_say_what_to_do(tiny_cache):
    with pytest.raises(ConfigError, match="cache.interval"):
        CacheConfig(method="block", threshold=0.1, interval=2)
    with pytest.raises(ConfigError, match="cache.taylor_order"):
        CacheConfig(method="deepcache", taylor_order=1)
    unet, dit = tiny_cache("sd15"), tiny_cache("sd3")
    for pipe, cfg, field in [(unet, CacheConfig(method="block"), "cache.method"),
                             (dit, CacheConfig(method="deepcache"), "cache.method"),
                             (dit, CacheConfig(method="block", compute_first_n=2), "cache.compute_first_n"),
                             (dit, CacheConfig(method="diffusers.first_block"), "CacheMixin"),
                             (unet, CacheConfig(method="deepcache", branch=99), "cache.branch")]:
        before = state_of(pipe)
        with pytest.raises(ConfigError, match=field):
            accel.apply(pipe, cfg)
        assert state_of(pipe) == before and not accel.is_applied(pipe)
