"""accel with diffusers' offloading: model CPU offload, sequential CPU offload, group offloading, each enabled
before and after `accel.apply`.

On CPU-only torch, diffusers refuses ``enable_model_cpu_offload()`` and ``enable_sequential_cpu_offload()``
without an accelerator, but the same hooks run with the CPU as the execution device:
``enable_model_cpu_offload(device="cpu")`` (accelerate's ``CpuOffload`` per model, unwrapped and rewrapped by
the pipeline at the end of every call) and ``accelerate.cpu_offload(denoiser, cpu)``, which is what
``enable_sequential_cpu_offload`` does per model (the pipeline-level call on CPU fails inside accelerate
on the text encoder's embedding, without accel). Group offloading runs on CPU as it is. Moving weights
from the CPU to the CPU changes no number, so each offloaded run must equal the plain one bitwise; what
is checked is that the hooks of both live together: accel engaged in every call (the first call's
counts again in the second), the offload hooks ran in every denoiser forward, and after `remove` the
output is the plain one and the offload hooks still run, with none of accel's left. The `gpu` tests do
the same with the real offloading to CUDA (scripts/gpu_check.sh).

Techniques: the step cache with token merging (sd15), with sparse attention (flux). Floor: 20 dB against the
same offloaded pipeline without accel (the floor of tests/tokens/test_compose.py for two lossy techniques
together).
"""

import accelerate.hooks
import numpy as np
import pytest
import torch
from diffusers.hooks import group_offloading
from helpers.snapshot import run, state_of

import accel
from accel.eval.metrics import psnr
from accel.pipelines import tiny
from combos.common import denoiser

FLOOR_DB = 20.0
# the step cache with token merging on the UNet, with sparse attention on the DiT (the two do not stack)
CONFIG = {"sd15": {"cache": {"method": "auto", "interval": 2}, "tokens": {"ratio": 0.5}},
          "flux": {"cache": {"method": "auto", "interval": 2},
                   "attention": {"pattern": "radial", "density": 0.5, "block_size": 16}}}
MODES = ("model", "sequential", "group", "group_leaf_pipeline")
# the hook classes whose pre_forward each mode runs on the denoiser itself
HOOKS = {"model": accelerate.hooks.CpuOffload, "sequential": accelerate.hooks.AlignDevicesHook,
         "group": group_offloading.GroupOffloadingHook, "group_leaf_pipeline": group_offloading.GroupOffloadingHook}


def _offload(pipe, mode: str, device: str) -> None:
    den, dev = denoiser(pipe), torch.device(device)
    on_cpu = dev.type == "cpu"
    if mode == "model":
        pipe.enable_model_cpu_offload(device=device) if on_cpu else pipe.enable_model_cpu_offload()
    elif mode == "sequential":
        if on_cpu:
            accelerate.cpu_offload(den, dev)  # what enable_sequential_cpu_offload does for each model
        else:
            pipe.enable_sequential_cpu_offload()
    elif mode == "group":
        den.enable_group_offload(onload_device=dev, offload_type="block_level", num_blocks_per_group=1,
                                 use_stream=not on_cpu)
        for component in pipe.components.values():  # the pipeline now runs on the onload device
            if isinstance(component, torch.nn.Module) and component is not den:
                component.to(dev)
    else:
        pipe.enable_group_offload(onload_device=dev, offload_type="leaf_level")


class _Calls(dict):
    """pre_forward calls per offload hook class, on the modules in ``watched`` (ids)."""

    watched: set = frozenset()


@pytest.fixture
def denoiser_hook_calls(monkeypatch):
    calls = _Calls()
    for cls in set(HOOKS.values()):
        original = cls.pre_forward

        def counting(self, module, *args, _cls=cls, _original=original, **kwargs):
            if id(module) in calls.watched:
                calls[_cls] = calls.get(_cls, 0) + 1
            return _original(self, module, *args, **kwargs)

        monkeypatch.setattr(cls, "pre_forward", counting)
    return calls


def _accel_hooks_left(pipe) -> list[str]:
    names = []
    for m in denoiser(pipe).modules():
        reg = m.__dict__.get("_diffusers_hook")
        names += [n for n in (reg.hooks if reg is not None else ()) if n.startswith("accel.")]
        if "_old_forward" in m.__dict__ and "_diffusers_hook" in getattr(m._old_forward, "__qualname__", ""):
            names.append("accel wrapper inside accelerate's hook")
    return names


def check_offload(name: str, mode: str, order: str, device: str, calls: _Calls) -> None:
    pipe = tiny.make(name)
    plain = run(pipe, name)
    hook = HOOKS[mode]
    # the denoiser's own hook (leaf-level group offloading: its leaves'); a lost one is what breaks on a GPU
    den = denoiser(pipe)
    calls.watched = {id(m) for m in den.modules()} if mode == "group_leaf_pipeline" else {id(den)}
    if order == "before":
        _offload(pipe, mode, device)
        ref = run(pipe, name)
        before = state_of(pipe)
        accel.apply(pipe, CONFIG[name])
    else:
        accel.apply(pipe, CONFIG[name])
        _offload(pipe, mode, device)
        with accel.applied(pipe, "off"):  # the offloaded pipeline without accel, for the reference
            ref = run(pipe, name)
        accel.apply(pipe, CONFIG[name])
    if device == "cpu":
        np.testing.assert_array_equal(ref, plain)  # CPU to CPU: offloading changes no number
    counts = []
    for _ in range(2):  # model offload unwraps and rewraps its hooks at the end of every call
        calls.clear()
        out = run(pipe, name)
        st = accel.stats(pipe)
        other = st["tokens"]["realised_ratio"] if "tokens" in st else st["attention"]["sparse_calls"]
        counts.append((st["cache"]["reused"], st["cache"]["computed"], other))
        assert calls.get(hook, 0) >= st["cache"]["computed"], (mode, calls)  # offload ran in every forward
        assert psnr(ref, out) >= FLOOR_DB, psnr(ref, out)
    assert counts[0] == counts[1] and counts[0][0] > 0 and counts[0][2] > 0, counts
    accel.remove(pipe)
    calls.clear()
    np.testing.assert_array_equal(run(pipe, name), ref)
    assert calls.get(hook, 0) >= tiny.example_inputs(name)["num_inference_steps"], (mode, "offload hook lost", calls)
    assert _accel_hooks_left(pipe) == []
    if order == "before" and mode != "model":  # model offload makes new hook objects at every call
        assert state_of(pipe) == before


@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("mode", MODES)
def test_offload_on_cpu(mode, order, denoiser_hook_calls):
    check_offload("sd15", mode, order, "cpu", denoiser_hook_calls)


@pytest.mark.parametrize("mode", MODES)
def test_offload_on_cpu_dit(mode, denoiser_hook_calls):
    check_offload("flux", mode, "before", "cpu", denoiser_hook_calls)


@pytest.mark.gpu
@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["sd15", "flux"])
def test_offload_on_cuda(name, mode, order, denoiser_hook_calls):
    """The real offloading: weights on the CPU, each model (or layer, or block group) moved to CUDA when it
    runs; group offloading with CUDA streams (prefetching in the order recorded at the first forward, while
    the cache skips modules in reused steps)."""
    check_offload(name, mode, order, "cuda", denoiser_hook_calls)


@pytest.mark.parametrize("name,method", [("flux", "diffusers.first_block"), ("cogvideox", "diffusers.faster")])
def test_diffusers_caches_under_model_offload(name, method, denoiser_hook_calls):
    """diffusers' own caches (``enable_cache``) register hooks on the denoiser too, FasterCache one on the
    denoiser itself: installed inside accelerate's hook, they survive model offload's rewrap at the end of
    each call (before: FasterCache skipped nothing from the second call on)."""
    pipe = tiny.make(name)
    pipe.enable_model_cpu_offload(device="cpu")
    ref = run(pipe, name, num_inference_steps=6)
    denoiser_hook_calls.watched = {id(denoiser(pipe))}
    cfg = {"method": method, "threshold": 0.5} if method.endswith("first_block") else {"method": method, "interval": 2}
    skipped = []
    with accel.applied(pipe, {"cache": cfg}):
        for _ in range(2):
            out = run(pipe, name, num_inference_steps=6)
            st = accel.stats(pipe)["cache"]
            skipped.append(st["reused"] + sum(v["skipped"] for v in st.get("other", {}).values()))
            assert psnr(ref, out) >= 26.0  # the cache's floor (common.FLOOR_DB)
    assert skipped[0] > 0 and skipped[0] == skipped[1], skipped
    denoiser_hook_calls.clear()
    np.testing.assert_array_equal(run(pipe, name, num_inference_steps=6), ref)
    assert denoiser_hook_calls.get(accelerate.hooks.CpuOffload, 0) > 0
    assert _accel_hooks_left(pipe) == []
