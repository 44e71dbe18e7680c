"""The approximate cache (NIRVANA) on the tiny pipelines: a hit skips K steps and, with a first-order scheduler,
reproduces the full run of the same prompt and seed bit for bit; entries are scoped, persistent, written
atomically, bounded in size; corrupt files are skipped; off changes nothing."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import accel
from accel.approx.store import ApproxCache
from accel.pipelines import tiny
from tests.helpers.snapshot import run, state_of

STEPS = 6


def _count_forwards(pipe):
    den = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    calls = {"n": 0}

    def hook(module, args):
        calls["n"] += 1

    return calls, den.register_forward_pre_hook(hook)


def _approx(folder, **kw):
    return {"approx": {"dir": str(folder), "similarity": [0.999], "skip": [0.5], **kw}}


# First-order schedulers: DDIM (sd15), Euler (sdxl), flow-matching Euler (flux, sd3, ltx, hunyuanvideo),
# CogVideoX's DDIM. Resuming at step K from the stored latent repeats the full run's arithmetic exactly.
@pytest.mark.parametrize("name", ["sd15", "sdxl", "flux", "sd3", "cogvideox", "ltx", "hunyuanvideo"])
def test_a_hit_skips_k_steps_and_reproduces_the_full_run(name, tiny_cache, tmp_path):
    pipe = tiny_cache(name)
    full = run(pipe, name, num_inference_steps=STEPS)
    calls, handle = _count_forwards(pipe)
    try:
        accel.apply(pipe, _approx(tmp_path))
        calls["n"] = 0
        miss = run(pipe, name, num_inference_steps=STEPS)
        st = accel.stats(pipe)["approx"]
        assert not st["hit"] and st["stored"] and st["reason"] is None, st
        per_step = calls["n"] // STEPS
        calls["n"] = 0
        hit = run(pipe, name, num_inference_steps=STEPS)
        st = accel.stats(pipe)["approx"]
        assert st["hit"] and st["similarity"] == pytest.approx(1.0, abs=1e-6), st
        assert st["skipped_steps"] == STEPS // 2 and calls["n"] == per_step * (STEPS - STEPS // 2)
        np.testing.assert_array_equal(miss, full)  # storing changes nothing
        np.testing.assert_array_equal(hit, full)  # the stored latent at K, then the same remaining steps
    finally:
        handle.remove()
        accel.remove(pipe)


def test_off_and_remove_leave_the_pipeline_exact(tiny_cache, tmp_path):
    pipe = tiny_cache("flux")
    before = state_of(pipe)
    full = run(pipe, "flux", num_inference_steps=STEPS)
    accel.apply(pipe, {"approx": {"dir": ""}, "cache": {"method": "none"}})
    np.testing.assert_array_equal(run(pipe, "flux", num_inference_steps=STEPS), full)
    assert "approx" not in accel.stats(pipe)
    accel.apply(pipe, _approx(tmp_path))
    run(pipe, "flux", num_inference_steps=STEPS)
    run(pipe, "flux", num_inference_steps=STEPS)
    assert accel.stats(pipe)["approx"]["hit"]
    accel.remove(pipe)
    assert state_of(pipe) == before
    np.testing.assert_array_equal(run(pipe, "flux", num_inference_steps=STEPS), full)


def test_no_hit_across_model_size_scheduler_steps_or_guidance(tiny_cache, tmp_path):
    pipe = tiny_cache("flux")
    other_model = tiny.make("flux", seed=1)  # the same architecture, other weights
    cfg = _approx(tmp_path, similarity=[-1.0])  # any neighbour in scope would be a hit
    try:
        accel.apply(pipe, cfg)
        run(pipe, "flux", num_inference_steps=STEPS)
        for change in ({"height": 48}, {"num_inference_steps": STEPS + 2}, {"guidance_scale": 2.0}):
            run(pipe, "flux", **{"num_inference_steps": STEPS, **change})
            assert not accel.stats(pipe)["approx"]["hit"], change
        accel.apply(other_model, cfg)
        run(other_model, "flux", num_inference_steps=STEPS)
        assert not accel.stats(other_model)["approx"]["hit"]
        shift = pipe.scheduler
        pipe.scheduler = type(shift).from_config({**shift.config, "shift": 2.0})
        run(pipe, "flux", num_inference_steps=STEPS)
        assert not accel.stats(pipe)["approx"]["hit"]
        pipe.scheduler = shift
        run(pipe, "flux", num_inference_steps=STEPS, prompt="a small blue dog")  # in scope: served
        assert accel.stats(pipe)["approx"]["hit"]
    finally:
        pipe.scheduler = shift
        accel.remove(pipe)
        accel.remove(other_model)


def test_the_policy_table_picks_k_by_similarity(tiny_cache, tmp_path):
    pipe = tiny_cache("flux")
    try:
        accel.apply(pipe, _approx(tmp_path, similarity=[0.9999, 0.5], skip=[0.5, 0.2], store_at=[0.2, 0.5]))
        run(pipe, "flux", num_inference_steps=10)
        run(pipe, "flux", num_inference_steps=10, prompt="a photo of a dog riding a horse on the moon")
        st = accel.stats(pipe)["approx"]
        assert st["hit"] and 0.5 <= st["similarity"] < 0.9999 and st["skipped_steps"] == 2, st
        run(pipe, "flux", num_inference_steps=10)
        assert accel.stats(pipe)["approx"]["skipped_steps"] == 5
        totals = accel.stats(pipe)["approx"]["totals"]
        assert totals["hits"] == 2 and totals["misses"] == 1 and totals["steps_saved"] == 7
    finally:
        accel.remove(pipe)


def test_with_the_step_cache_on_a_video_model(tiny_cache, tmp_path):
    """Wan (UniPC, a multistep solver: approximate even on a self-match) with the block cache in the same call."""
    pipe = tiny_cache("wan")
    full = run(pipe, "wan", num_inference_steps=8)
    try:
        accel.apply(pipe, {**_approx(tmp_path, skip=[0.25]),
                           "cache": {"method": "block", "interval": 2, "warmup_steps": 1}})
        run(pipe, "wan", num_inference_steps=8)
        out = run(pipe, "wan", num_inference_steps=8)
        st = accel.stats(pipe)
        assert st["approx"]["hit"] and st["approx"]["skipped_steps"] == 2
        assert st["cache"]["reused"] > 0
        err = float(np.abs(out - full).mean())
        assert err < 0.05, err  # same prompt and seed: close to the full run
    finally:
        accel.remove(pipe)


def test_calls_the_cache_cannot_serve_run_untouched_and_say_why(tiny_cache, tmp_path):
    pipe = tiny_cache("flux")
    try:
        accel.apply(pipe, _approx(tmp_path))
        full = run(pipe, "flux", num_inference_steps=STEPS, prompt=["a cat", "a dog"])
        assert "batch of prompts" in accel.stats(pipe)["approx"]["reason"]
        accel.remove(pipe)
        np.testing.assert_array_equal(run(pipe, "flux", num_inference_steps=STEPS, prompt=["a cat", "a dog"]), full)
        accel.apply(pipe, _approx(tmp_path))
        run(pipe, "flux", num_inference_steps=STEPS, num_images_per_prompt=2)
        assert "several outputs" in accel.stats(pipe)["approx"]["reason"]
        assert not os.listdir(tmp_path) or not list(tmp_path.glob("*.safetensors"))
    finally:
        accel.remove(pipe)
    with pytest.raises(accel.ConfigError, match="works on a pipeline"):
        accel.apply(pipe.transformer, _approx(tmp_path))


def test_entries_persist_and_corrupt_or_foreign_files_are_skipped(tiny_cache, tmp_path, caplog):
    from safetensors.torch import save_file

    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 40)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"), metadata={"format": "other"})
    pipe = tiny_cache("flux")
    try:
        accel.apply(pipe, _approx(tmp_path))
        run(pipe, "flux", num_inference_steps=STEPS)
    finally:
        accel.remove(pipe)
    assert "skipping garbage.safetensors" in caplog.text and "skipping foreign.safetensors" in caplog.text
    fresh = ApproxCache(tmp_path)  # another process, later
    assert len(fresh.entries) == 1 and len(fresh.skipped) == 2
    (entry,) = fresh.entries.values()
    assert entry.stored == (1, 2, 3) and entry.steps == STEPS and entry.prompt.startswith("a photo of a cat")


def test_the_size_limit_evicts_the_least_useful(tmp_path):
    cache = ApproxCache(tmp_path, max_bytes=10**9)
    latents = {2: torch.zeros(4, 64, 64)}  # 64 KiB each
    a = cache.add("s", 10, torch.ones(8), latents)
    b = cache.add("s", 10, torch.ones(8), latents)
    cache.record_hit(a, 3)  # a saved steps; b never did
    cache.max_bytes = int(a.bytes * 2.5)
    c = cache.add("s", 10, torch.ones(8), latents)
    assert b.id not in cache.entries and set(cache.entries) == {a.id, c.id} and cache.evicted == 1
    assert cache.total_bytes() <= cache.max_bytes
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == sorted(f"{e}.safetensors" for e in (a.id, c.id))
    assert json.loads((tmp_path / "usage.json").read_text())[a.id]["saved"] == 3


def test_a_kill_while_storing_leaves_no_entry(tmp_path):
    code = textwrap.dedent(f"""
        import os, signal, torch
        import safetensors.torch as st
        from accel.approx.store import ApproxCache
        real = st.save_file
        def save_then_die(tensors, path, metadata=None):
            real(tensors, path, metadata=metadata)
            os.kill(os.getpid(), signal.SIGKILL)  # after the bytes, before the rename
        st.save_file = save_then_die
        ApproxCache({str(tmp_path)!r}).add("s", 10, torch.ones(8), {{2: torch.zeros(4, 8, 8)}})
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert list(tmp_path.glob(".tmp-*"))  # the partial file exists, under a name no reader takes
    cache = ApproxCache(tmp_path)
    assert not cache.entries and not cache.skipped


def test_config_checks_name_the_field():
    with pytest.raises(accel.ConfigError, match="approx.skip: 1 values for 2 similarity thresholds"):
        accel.ApproxCacheConfig(dir="x", similarity=(0.9, 0.8), skip=(0.3,))
    with pytest.raises(accel.ConfigError, match="descending"):
        accel.ApproxCacheConfig(dir="x", similarity=(0.8, 0.9), skip=(0.3, 0.4))
    with pytest.raises(accel.ConfigError, match="approx.skip"):
        accel.ApproxCacheConfig(dir="x", similarity=(0.9,), skip=(float("nan"),))
    assert accel.Config.from_dict({"approx": {"dir": "c"}}).approx.enabled
    assert not accel.preset("fast", "flux").approx.enabled  # no preset turns it on


def test_calibration_measures_pairs_and_the_table_follows_the_judge(tiny_cache):
    from accel.eval.approx_policy import measure, table

    pipe = tiny_cache("flux")
    kw = {k: v for k, v in tiny.example_inputs("flux").items() if k not in ("prompt", "generator", "output_type")}
    rows = measure(pipe, [("a red cat", "a red cat"), ("a red cat", "a blue dog")], fractions=(0.25, 0.5),
                   call_kwargs={**kw, "num_inference_steps": 4}, score=lambda img, p: "cat" in p)
    assert [(r["skip"], r["skipped_steps"]) for r in rows] == [(0.25, 1), (0.5, 2)] * 2
    assert rows[0]["similarity"] == pytest.approx(1.0) and rows[2]["similarity"] < 1.0
    assert all(r["psnr"] is None or r["psnr"] > 10 for r in rows)  # a real image, not noise
    assert not accel.is_applied(pipe)  # measure leaves the pipeline as it found it
    synthetic = [{"similarity": s, "skip": f, "psnr": 30.0, "ok": ok, "ok_full": True}
                 for s, f, ok in [(1.0, 0.5, True), (0.95, 0.5, True), (0.9, 0.5, True), (0.85, 0.5, True),
                                  (0.8, 0.5, False), (0.7, 0.5, False),
                                  (1.0, 0.2, True), (0.9, 0.2, True), (0.8, 0.2, True), (0.7, 0.2, True)]]
    assert table(synthetic, min_pairs=3) == ((0.85, 0.7), (0.5, 0.2))
    assert table(synthetic, min_pairs=3, min_psnr=31.0) == ((), ())


def test_a_bf16_hit_resumes_in_the_dtype_the_loop_held(tmp_path):
    """HunyuanVideo starts from fp32 latents and its scheduler returns the model's bf16: the stored latent comes
    back as bf16, not cast to the fresh latents' fp32 (which changed every remaining step)."""
    pipe = tiny.make("hunyuanvideo", dtype=torch.bfloat16)
    full = run(pipe, "hunyuanvideo", num_inference_steps=STEPS)
    accel.apply(pipe, _approx(tmp_path))
    run(pipe, "hunyuanvideo", num_inference_steps=STEPS)
    hit = run(pipe, "hunyuanvideo", num_inference_steps=STEPS)
    assert accel.stats(pipe)["approx"]["hit"]
    np.testing.assert_array_equal(hit, full)
