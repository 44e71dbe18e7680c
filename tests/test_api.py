"""apply/remove/applied/stats on every tiny family: exact restore, idempotence, tracking."""

import functools

import numpy as np
import pytest
import torch
from diffusers.hooks import ModelHook
from helpers.snapshot import run, state_of

import accel
from accel import api
from accel.families import Adapter
from accel.pipelines import tiny

FAMILY_OF = {"sd15": "sd15", "sdxl": "sdxl", "animatediff": "animatediff", "flux": "flux", "sd3": "sd3",
             "pixart": "pixart", "cogvideox": "cogvideox", "wan": "wan", "wan22": "wan", "ltx": "ltx",
             "hunyuanvideo": "hunyuanvideo"}


class _Probe:
    """A fake technique that touches everything a real one may: processors, block hooks, attributes."""

    calls = 0

    def __init__(self, target, cfg):
        self.seen = {"attention": 0, "blocks": 0}
        for a in target.adapters:
            for site in a.attention():
                target.ledger.set_processor(site.module, _CountingProcessor(site.module.processor, self))
            for _, block in a.blocks():
                target.ledger.add_hook(block, _CountHook(self), "probe.block")
            target.ledger.set_attr(a.module, "probe_marker", True)
        # A technique applied with a pipeline resets per call through the tracker.
        target.tracker.on_call_start(lambda s: self.seen.update(calls_started=s.call))

    def stats(self):
        return dict(self.seen)


class _CountingProcessor:
    """Delegates to the processor it replaces. diffusers' attention modules drop keyword arguments
    their processor's ``__call__`` does not name, so the wrapper must show the inner signature."""

    def __init__(self, inner, probe):
        self.inner, self.probe = inner, probe

        def count_and_call(attn, *args, **kwargs):
            probe.seen["attention"] += 1
            return inner(attn, *args, **kwargs)

        self.__call__ = functools.wraps(inner.__call__)(count_and_call)  # what inspect reads

    def __call__(self, attn, *args, **kwargs):
        return self.__dict__["__call__"](attn, *args, **kwargs)


class _CountHook(ModelHook):
    def __init__(self, probe):
        super().__init__()
        self.probe = probe

    def pre_forward(self, module, *args, **kwargs):
        self.probe.seen["blocks"] += 1
        return args, kwargs


@pytest.fixture
def probe_technique(monkeypatch):
    import types

    fake = types.ModuleType("fake_probe")
    fake.apply_technique = _Probe
    monkeypatch.setitem(__import__("sys").modules, "fake_probe", fake)
    monkeypatch.setattr(api, "TECHNIQUES", (("tokens", "fake_probe"),))
    return accel.Config(tokens=accel.TokenConfig(ratio=0.5))


@pytest.mark.parametrize("name", tiny.NAMES)
def test_apply_remove_restores_exactly(name, tiny_cache, probe_technique):
    pipe = tiny_cache(name)
    before_out = run(pipe, name)
    before = state_of(pipe)

    assert accel.apply(pipe, probe_technique) is pipe
    accel.apply(pipe, probe_technique)  # idempotent: replaces, does not stack
    out = run(pipe, name)
    st = accel.stats(pipe)
    assert st["family"] == FAMILY_OF[name]
    assert st["tokens"]["attention"] > 0 and st["tokens"]["blocks"] > 0
    assert st["tokens"]["calls_started"] == 1
    assert st["steps"] == tiny.example_inputs(name)["num_inference_steps"]
    np.testing.assert_array_equal(out, before_out)  # the probe changes nothing numerically

    accel.remove(pipe)
    assert state_of(pipe) == before
    assert not accel.is_applied(pipe)
    np.testing.assert_array_equal(run(pipe, name), before_out)
    accel.remove(pipe)  # removing twice is harmless


# How each tiny pipeline runs CFG, as the tracker must see it.
CFG_BRANCHES = {"sd15": ["batched"], "sdxl": ["batched"], "animatediff": ["batched"], "sd3": ["batched"],
                "pixart": ["batched"], "wan": ["cond", "uncond"], "wan22": ["cond", "uncond"], "flux": ["cond"],
                "cogvideox": ["batched"], "ltx": ["batched"], "hunyuanvideo": ["cond", "uncond"]}


@pytest.mark.parametrize("name", list(CFG_BRANCHES))
def test_off_preset_bitwise_and_step_tracking(name, tiny_cache):
    pipe = tiny_cache(name)
    ref = run(pipe, name)
    with accel.applied(pipe, "off"):
        out = run(pipe, name)
        st = accel.stats(pipe)
        run(pipe, name, num_inference_steps=3)
        st2 = accel.stats(pipe)
    np.testing.assert_array_equal(out, ref)
    steps = tiny.example_inputs(name)["num_inference_steps"]
    assert st["steps"] == steps and st["calls"] == 1
    assert st["cfg_branches"] == CFG_BRANCHES[name]
    assert st2["steps"] == 3 and st2["calls"] == 2
    if name == "wan22":  # two transformers share the steps and count their own
        by = st["steps_by_component"]
        assert set(by) == {"transformer", "transformer_2"} and sum(by.values()) == steps
    assert not accel.is_applied(pipe)


def test_scheduler_swapped_after_apply_is_tracked(tiny_cache):
    # Users often set `pipe.scheduler = X.from_config(...)` after accelerating: the new scheduler's
    # calls and steps must still be seen, or a step cache would carry state across calls.
    from diffusers import EulerDiscreteScheduler

    pipe = tiny_cache("sd15")
    original = pipe.scheduler
    steps = tiny.example_inputs("sd15")["num_inference_steps"]
    try:
        accel.apply(pipe, "fast")
        run(pipe, "sd15")
        swapped = pipe.scheduler = EulerDiscreteScheduler.from_config(original.config)
        first, again = run(pipe, "sd15"), run(pipe, "sd15")
        st = accel.stats(pipe)
        accel.remove(pipe)
        assert "step" not in swapped.__dict__ and "set_timesteps" not in swapped.__dict__
        accel.apply(pipe, "fast")  # the reference: applied with that scheduler in place
        fresh = run(pipe, "sd15")
        accel.remove(pipe)
    finally:
        pipe.scheduler = original
    assert st["calls"] == 3 and st["steps"] == steps
    assert st["cache"]["reused"] > 0
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first, fresh)


def test_applied_restores_on_exception_and_previous_config(tiny_cache, probe_technique):
    pipe = tiny_cache("sd15")
    before = state_of(pipe)
    with pytest.raises(RuntimeError, match="boom"):
        with accel.applied(pipe, probe_technique):
            assert accel.is_applied(pipe)
            raise RuntimeError("boom")
    assert state_of(pipe) == before
    accel.apply(pipe, "off")
    with accel.applied(pipe, probe_technique):
        assert accel.config_of(pipe) == probe_technique
    assert accel.config_of(pipe) == accel.Config()
    accel.remove(pipe)
    assert state_of(pipe) == before


def test_bare_denoiser(tiny_cache, probe_technique):
    pipe = tiny_cache("sd15")
    ref = run(pipe, "sd15")
    accel.apply(pipe.unet, probe_technique)
    out = run(pipe, "sd15")
    st = accel.stats(pipe.unet)
    accel.remove(pipe.unet)
    np.testing.assert_array_equal(out, ref)
    # Without a scheduler to watch, steps are told apart by the timestep argument.
    assert st["calls"] == 1 and st["steps"] == tiny.example_inputs("sd15")["num_inference_steps"]
    assert "_diffusers_hook" not in pipe.unet.__dict__ and "forward" not in pipe.unet.__dict__


def test_failed_apply_leaves_nothing(tiny_cache, monkeypatch):
    import sys
    import types

    def half_then_fail(target, cfg):
        target.ledger.set_attr(target.adapters[0].module, "half_done", 1)
        raise RuntimeError("technique failed")

    fake = types.ModuleType("fake_fail")
    fake.apply_technique = half_then_fail
    monkeypatch.setitem(sys.modules, "fake_fail", fake)
    monkeypatch.setattr(api, "TECHNIQUES", (("cache", "fake_fail"),))
    pipe = tiny_cache("sd15")
    before = state_of(pipe)
    with pytest.raises(RuntimeError, match="technique failed"):
        accel.apply(pipe, {"cache": {"method": "block", "threshold": 0.1}})
    assert state_of(pipe) == before and not accel.is_applied(pipe)


def test_unsupported_model_lists_families():
    with pytest.raises(accel.UnsupportedModelError) as e:
        accel.apply(torch.nn.Linear(2, 2))
    for fam in ("sd15", "sdxl", "flux", "sd3", "pixart", "cogvideox", "wan", "ltx", "hunyuanvideo", "animatediff"):
        assert fam in str(e.value)
    with pytest.raises(accel.UnsupportedModelError, match="neither a diffusers pipeline"):
        accel.apply(object())


def test_missing_technique_is_a_config_error(tiny_cache, monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "fake_empty", types.ModuleType("fake_empty"))
    monkeypatch.setattr(api, "TECHNIQUES", (("cache", "fake_empty"),))
    with pytest.raises(accel.ConfigError, match="^cache: .*no cache technique"):
        accel.apply(tiny_cache("sd15"), {"cache": {"method": "block", "threshold": 0.1}})


@pytest.mark.parametrize("name", tiny.NAMES)
def test_adapter_structure(name, tiny_cache):
    pipe = tiny_cache(name)
    for comp in ("unet", "transformer", "transformer_2"):
        m = getattr(pipe, comp, None)
        if m is None:
            continue
        a = Adapter(m, comp)
        blocks, sites = a.blocks(), a.attention()
        assert len(blocks) >= 2 and len(sites) >= 2
        assert [s.layer for s in sites] == list(range(len(sites)))
        roles = {s.role for s in sites}
        if a.family.text_position:
            assert "joint" in roles
        if a.family.kind == "unet":
            assert {"self", "cross"} <= roles
        if name == "animatediff":
            assert "temporal" in roles


def test_scheduler_swapped_back_is_counted_once(tiny_cache):
    """A scheduler swapped out and back in (A/B comparisons do it) is wrapped once: calls and steps are counted
    once, not twice (each step counted twice put a step cache's schedule on every other step)."""
    from diffusers import EulerDiscreteScheduler

    pipe = tiny_cache("sd15")
    original = pipe.scheduler
    steps = tiny.example_inputs("sd15")["num_inference_steps"]
    try:
        accel.apply(pipe, "fast")
        first = run(pipe, "sd15")
        pipe.scheduler = EulerDiscreteScheduler.from_config(original.config)
        run(pipe, "sd15")
        pipe.scheduler = original
        back = run(pipe, "sd15")
        st = accel.stats(pipe)
    finally:
        accel.remove(pipe)
        pipe.scheduler = original
    assert st["calls"] == 3 and st["steps"] == steps, {k: st[k] for k in ("calls", "steps")}
    np.testing.assert_array_equal(back, first)  # the same scheduler, the same cache decisions
