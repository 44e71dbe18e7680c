"""The token technique on every tiny family: exact at ratio 0, the requested merging, fidelity, restore.

Fidelity floors are against the same pipeline's own unaccelerated output (same seed), on tiny
random-weight models: 25 dB PSNR at ratio 0.5 (stated per test). They guard against a broken
merge/unmerge (which lands far below 20 dB), not against the real models' visual quality, which
BENCHMARKS.md measures.
"""

import numpy as np
import pytest
from helpers.snapshot import run, state_of

import accel
from accel.eval.metrics import psnr
from accel.pipelines import tiny
from accel.tokens.config import TokenConfig

STEPS = 3
FLOOR_DB = 25.0


def _tokens(pipe):
    return pipe.__dict__["_accel"].handles["tokens"]


def _cfg(name, **kw):
    # tiny SDXL has attention only one level down (like the real one, which has none at the top)
    return {"max_downsample": 2, **kw} if name == "sdxl" else kw


@pytest.mark.parametrize("name", tiny.NAMES)
def test_ratio_zero_is_bitwise_identical_and_remove_restores(tiny_cache, name):
    pipe = tiny_cache(name)
    base = run(pipe, name, num_inference_steps=2)
    before = state_of(pipe)  # after a call: a call itself adds attributes (_guidance_scale, ...)
    # hooks installed (merge), then the ratio set to 0: every hook must be a pass-through
    accel.apply(pipe, {"tokens": _cfg(name, ratio=0.5)})
    try:
        for ts in _tokens(pipe).states:
            ts.cfg = ts.cfg.replace(ratio=0.0)
        zero = run(pipe, name, num_inference_steps=2)
        assert _tokens(pipe).stats()["realised_ratio"] == 0.0
    finally:
        accel.remove(pipe)
    assert np.array_equal(base, zero)
    assert state_of(pipe) == before
    assert np.array_equal(run(pipe, name, num_inference_steps=2), base)


@pytest.mark.parametrize("name", ["sd15", "flux", "wan"])
@pytest.mark.parametrize("method", ["kv_downsample", "prune"])
def test_ratio_zero_is_bitwise_identical_for_the_other_methods(tiny_cache, name, method):
    """kv_downsample and prune install other hooks (pooling SDPA router, the prune cache) than merge."""
    pipe = tiny_cache(name)
    base = run(pipe, name, num_inference_steps=2)
    with accel.applied(pipe, {"tokens": {"ratio": 0.5, "method": method, "refresh_interval": 1}}):
        for ts in _tokens(pipe).states:
            ts.cfg = ts.cfg.replace(ratio=0.0)
        zero = run(pipe, name, num_inference_steps=2)
        assert _tokens(pipe).stats()["realised_ratio"] == 0.0
    assert np.array_equal(base, zero)


@pytest.mark.parametrize("name", tiny.NAMES)
def test_merge_removes_the_requested_ratio_per_block(tiny_cache, name):
    pipe = tiny_cache(name)
    base = run(pipe, name, num_inference_steps=STEPS)
    with accel.applied(pipe, {"tokens": _cfg(name, ratio=0.5)}):
        out = run(pipe, name, num_inference_steps=STEPS)
        stats = accel.stats(pipe)["tokens"]
    reduced = {k: b for k, b in stats["blocks"].items() if b["removed"]}
    assert reduced, stats
    for block, b in reduced.items():
        # exactly int(ratio * N): 2x2(x2) windows hold 3/4 (7/8) sources, more than half the tokens
        assert b["removed"] == int(0.5 * b["tokens"]), (block, b)
    assert stats["merges_reused"] > 0 or stats["reduced_blocks"] == 1 or "sdxl" == name
    assert out.shape == base.shape
    assert psnr(base, out) > FLOOR_DB, f"{name}: merge 0.5 PSNR {psnr(base, out):.1f} dB <= {FLOOR_DB}"


@pytest.mark.parametrize("name", ["sd15", "flux", "wan", "hunyuanvideo"])
@pytest.mark.parametrize("method", ["kv_downsample", "prune"])
def test_kv_downsample_and_prune_reduce_tokens_within_the_floor(tiny_cache, name, method):
    pipe = tiny_cache(name)
    base = run(pipe, name, num_inference_steps=STEPS)
    with accel.applied(pipe, {"tokens": {"ratio": 0.5, "method": method, "refresh_interval": 2}}):
        out = run(pipe, name, num_inference_steps=STEPS)
        stats = accel.stats(pipe)["tokens"]
    assert stats["reduced_blocks"] > 0 and stats["realised_ratio"] > 0.1, stats
    assert psnr(base, out) > FLOOR_DB


def test_prune_keeps_cond_and_uncond_caches_apart(tiny_cache):
    pipe = tiny_cache("wan")  # Wan runs cond and uncond as separate forwards
    with accel.applied(pipe, {"tokens": {"ratio": 0.5, "method": "prune"}}):
        run(pipe, "wan", num_inference_steps=STEPS)
        keys = list(_tokens(pipe).states[0].prune_cache)
    assert {k[2] for k in keys} == {"cond", "uncond"}


@pytest.mark.parametrize("name,overrides", [
    ("sd15", {"height": 40, "width": 24}),  # 20x12 latent: 3x3 windows cut at the edges
    ("flux", {"height": 36, "width": 44}),  # 9x11 tokens
    ("wan", {"height": 48, "width": 48, "num_frames": 9}),  # 3x3x3 tokens
    ("cogvideox", {"num_frames": 13}),  # 4 latent frames (odd windows in time with st=3)
])
def test_odd_sizes_and_frame_counts(tiny_cache, name, overrides):
    pipe = tiny_cache(name)
    base = run(pipe, name, num_inference_steps=2, **overrides)
    with accel.applied(pipe, {"tokens": {"ratio": 0.4, "st": 3, "sx": 3}}):
        out = run(pipe, name, num_inference_steps=2, **overrides)
        stats = accel.stats(pipe)["tokens"]
    assert out.shape == base.shape and stats["reduced_blocks"] > 0
    assert psnr(base, out) > 20.0


@pytest.mark.parametrize("name", ["sd15", "flux"])
def test_batch_of_two_prompts_with_cfg(tiny_cache, name):
    """sd15: per-sample merges over [uncond x2, cond x2]; flux: one merge shared by the batch."""
    pipe = tiny_cache(name)
    kw = {"prompt": ["a photo of a cat", "a red car on the road"], "num_inference_steps": 2}
    if name == "sd15":
        kw["negative_prompt"] = ["blurry", "low quality"]

    def call():
        return np.asarray(pipe(**tiny.example_inputs(name, **kw)).images)

    base = call()
    with accel.applied(pipe, {"tokens": {"ratio": 0.5}}):
        out = call()
        assert accel.stats(pipe)["tokens"]["realised_ratio"] > 0
    assert out.shape == base.shape == (2, *base.shape[1:])
    for i in range(2):
        assert psnr(base[i], out[i]) > FLOOR_DB


def test_schedule_moves_the_ratio_over_steps():
    cfg = TokenConfig(ratio=0.6, schedule="linear", ratio_end=0.0)
    assert [round(cfg.ratio_at(s, 4), 3) for s in range(4)] == [0.6, 0.4, 0.2, 0.0]
    cos = TokenConfig(ratio=0.6, schedule="cosine", ratio_end=0.2)
    assert cos.ratio_at(0, 5) == 0.6 and abs(cos.ratio_at(4, 5) - 0.2) < 1e-9 and abs(cos.ratio_at(2, 5) - 0.4) < 1e-9
    assert TokenConfig(ratio=0.0, schedule="linear", ratio_end=0.3).enabled


def test_max_downsample_selects_unet_levels(tiny_cache):
    pipe = tiny_cache("sd15")
    for md, expected_levels in ((1, {256}), (2, {256, 64})):
        with accel.applied(pipe, {"tokens": {"ratio": 0.5, "max_downsample": md, "merge_crossattn": True}}):
            run(pipe, "sd15", num_inference_steps=1)
            blocks = accel.stats(pipe)["tokens"]["blocks"]
        assert {b["tokens"] for b in blocks.values() if b["removed"]} == expected_levels
