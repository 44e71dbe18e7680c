"""accel with LoRA (diffusers' peft backend): loaded before or after `accel.apply`, several adapters switched
with ``set_adapters``, fused and unfused while accelerated.

The LoRAs are made here with peft on a copy of the tiny denoiser (random A and B, so each changes the
output) and loaded with ``load_lora_weights`` as a state dict. References are the same pipeline, with the
same LoRA steps, never accelerated. Floors: common.FLOOR_DB.
"""

import numpy as np
import pytest
from helpers.snapshot import run, state_of

import accel
from accel.eval.metrics import psnr
from accel.pipelines import tiny
from combos.common import TECHNIQUES, assert_engaged, assert_within_floor, check_technique, config, denoiser

NAMES = ("sd15", "flux")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
GAIN = {"sd15": 1.0, "flux": 8.0}  # each LoRA moves its tiny pipeline's output to ~33 dB


def make_lora(name: str, seed: int) -> dict:
    """A LoRA for the tiny ``name`` denoiser, as ``load_lora_weights`` takes it (keys under ``unet.`` /
    ``transformer.``)."""
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = denoiser(tiny.make(name))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        donor.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False))
    prefix = "unet" if name in ("sd15", "sdxl") else "transformer"
    # random A and B (init_lora_weights=False), B scaled up so that the LoRA changes the output visibly
    state = get_peft_model_state_dict(donor)
    return {f"{prefix}.{k}": v * (GAIN[name] if "lora_B" in k else 1.0) for k, v in state.items()}


def _with_lora(name: str, *adapters: int):
    pipe = tiny.make(name)
    for seed in adapters:
        pipe.load_lora_weights(make_lora(name, seed), adapter_name=f"lora{seed}")
    return pipe


@pytest.mark.parametrize("technique", TECHNIQUES)
@pytest.mark.parametrize("name", NAMES)
def test_lora_loaded_before_apply(name, technique):
    plain = run(tiny.make(name), name)
    pipe = _with_lora(name, 1)
    ref = run(pipe, name)
    assert psnr(plain, ref) < 40.0  # the LoRA changes the output (measured 33 dB)
    before = state_of(pipe)
    check_technique(pipe, lambda: run(pipe, name), technique, name, ref)
    assert state_of(pipe) == before


@pytest.mark.parametrize("technique", TECHNIQUES)
@pytest.mark.parametrize("name", NAMES)
def test_lora_loaded_after_apply(name, technique):
    """peft swaps the attention projections for LoRA layers under accel's hooks and processors."""
    ref = run(_with_lora(name, 1), name)
    pipe = tiny.make(name)
    accel.apply(pipe, config(technique, name))
    pipe.load_lora_weights(make_lora(name, 1), adapter_name="lora1")
    out = run(pipe, name)
    assert_engaged(technique, accel.stats(pipe))
    assert_within_floor(technique, ref, out)
    accel.remove(pipe)
    np.testing.assert_array_equal(run(pipe, name), ref)


@pytest.mark.parametrize("name", NAMES)
def test_set_adapters_while_applied(name):
    """Adapter weights changed after apply take effect in the accelerated calls, each within the floor of the
    same adapters without accel."""
    settings = [(["lora1", "lora2"], [1.0, 0.5]), ("lora2", None), (["lora1", "lora2"], [0.0, 0.0])]
    reference = _with_lora(name, 1, 2)
    refs = []
    for adapters, weights in settings:
        reference.set_adapters(adapters, weights)
        refs.append(run(reference, name))
    pipe = _with_lora(name, 1, 2)
    outs = []
    with accel.applied(pipe, config("cache", name)):
        for adapters, weights in settings:
            pipe.set_adapters(adapters, weights)
            outs.append(run(pipe, name))
            assert_engaged("cache", accel.stats(pipe))
    for ref, out in zip(refs, outs, strict=True):
        assert_within_floor("cache", ref, out)
    assert psnr(outs[0], outs[1]) < 40.0  # switching adapters changed the accelerated output
    np.testing.assert_array_equal(run(pipe, name), refs[-1])


@pytest.mark.parametrize("name", NAMES)
def test_fuse_and_unfuse_while_applied(name):
    def steps(pipe, accelerate: bool):
        outs = []
        with accel.applied(pipe, config("cache", name) if accelerate else "off"):
            pipe.load_lora_weights(make_lora(name, 1), adapter_name="lora1")
            pipe.fuse_lora()
            outs.append(run(pipe, name))
            if accelerate:
                assert_engaged("cache", accel.stats(pipe))
            pipe.unfuse_lora()
            outs.append(run(pipe, name))
        return outs

    refs = steps(tiny.make(name), accelerate=False)
    pipe = tiny.make(name)
    outs = steps(pipe, accelerate=True)
    for ref, out in zip(refs, outs, strict=True):
        assert_within_floor("cache", ref, out)
    np.testing.assert_array_equal(run(pipe, name), refs[-1])  # removed: as the same steps without accel
