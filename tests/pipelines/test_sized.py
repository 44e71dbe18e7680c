"""Shape models: the released denoiser configs, reduced copies that run on a CPU, built in the target dtype."""

import functools
import subprocess
import sys

import diffusers
import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import accel
from accel.families import bind_inputs, denoisers_of, family_of
from accel.pipelines import sized
from accel.pipelines.call import to_frames
from accel.pipelines.load import ModelLoadError, builtin_models, load

# Parameter counts of the released denoisers (FLUX.1-dev 11.9B, Wan2.1-T2V-1.3B 1.42B, SD1.5 860M, SDXL 2.57B).
RELEASED_PARAMETERS = {"flux": 11.90e9, "wan-1.3b": 1.419e9, "sd15": 859.5e6, "sdxl": 2.567e9}
FAMILY = {"flux": "flux", "wan-1.3b": "wan", "sd15": "sd15", "sdxl": "sdxl"}
# Reduced depth and width; the text widths, channels and compression stay the released ones.
REDUCED = {
    "flux": {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16,
             "axes_dims_rope": (4, 6, 6)},
    "wan-1.3b": {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16, "ffn_dim": 64, "freq_dim": 32},
    "sd15": {"block_out_channels": (32, 32, 32, 32), "layers_per_block": 1, "attention_head_dim": 2},
    "sdxl": {"block_out_channels": (32, 32, 32), "layers_per_block": 1, "attention_head_dim": 2,
             "transformer_layers_per_block": 1},
}
SMALL_CALL = {"height": 64, "width": 64, "num_inference_steps": 2, "output_type": "np"}
SMALL_CALL_EXTRA = {"flux": {"max_sequence_length": 16}, "wan-1.3b": {"num_frames": 9, "max_sequence_length": 16}}
# What the denoiser sees at the 64 px call: the released text widths, latent channels and 8x (and Wan's 4x
# temporal) compression. Batch 2 in the SD UNets (CFG batched); Wan makes its CFG passes one by one, and Flux
# is guidance-distilled. {name: {input: shape}}
DENOISER_INPUTS = {
    "flux": {"hidden_states": (1, 16, 64), "encoder_hidden_states": (1, 16, 4096), "pooled_projections": (1, 768)},
    "wan-1.3b": {"hidden_states": (1, 16, 3, 8, 8), "encoder_hidden_states": (1, 16, 4096)},
    "sd15": {"sample": (2, 4, 8, 8), "encoder_hidden_states": (2, 77, 768)},
    "sdxl": {"sample": (2, 4, 8, 8), "encoder_hidden_states": (2, 77, 2048), "text_embeds": (2, 1280),
             "time_ids": (2, 6)},
}


@functools.lru_cache(maxsize=None)
def reduced(name: str, dtype: torch.dtype = torch.float32):
    return sized.make(name, dtype=dtype, overrides=REDUCED[name])


def call(pipe, name: str) -> np.ndarray:
    kwargs = {**SMALL_CALL, **SMALL_CALL_EXTRA.get(name, {})}
    return to_frames(pipe(prompt="a cat", generator=torch.Generator().manual_seed(0), **kwargs))


def denoiser(pipe) -> torch.nn.Module:
    return denoisers_of(pipe)[0][1]


@pytest.mark.parametrize("name", sized.NAMES)
def test_full_configs_have_the_released_parameter_counts(name):
    assert sized.parameter_count(name) == pytest.approx(RELEASED_PARAMETERS[name], rel=0.002)


@pytest.mark.parametrize("name", sized.NAMES)
def test_reduced_pipeline_runs_at_the_asked_size_with_the_released_widths(name):
    pipe = reduced(name)
    assert type(pipe).__name__ == sized.describe()[name].split()[1]  # "random-weight FluxPipeline at ..."
    assert all(not m.training for m in pipe.components.values() if isinstance(m, torch.nn.Module))
    cfg = dict(denoiser(pipe).config)
    for key, value in {**sized.full_config(name), **REDUCED[name]}.items():
        assert cfg[key] == (list(value) if isinstance(value, tuple) and isinstance(cfg[key], list) else value), key

    seen = {}

    def record(module, args, kwargs):
        named = bind_inputs(module, args, kwargs)
        named.update(named.get("added_cond_kwargs") or {})
        seen.update({k: tuple(named[k].shape) for k in DENOISER_INPUTS[name] if k in named})

    handle = denoiser(pipe).register_forward_pre_hook(record, with_kwargs=True)
    try:
        out = call(pipe, name)
    finally:
        handle.remove()
    assert seen == DENOISER_INPUTS[name]
    assert out.shape == ((9, 64, 64, 3) if name == "wan-1.3b" else (64, 64, 3))
    assert np.isfinite(out).all()


def test_same_seed_same_weights_other_seed_other_weights():
    a = denoiser(reduced("sd15")).state_dict()
    b = denoiser(sized.make("sd15", overrides=REDUCED["sd15"])).state_dict()
    c = denoiser(sized.make("sd15", seed=1, overrides=REDUCED["sd15"])).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv_in.weight"], c["conv_in.weight"])


class _Float32Made(TorchFunctionMode):
    """The largest float32 tensor any torch function made while active."""

    largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dtype == torch.float32:
            self.largest = max(self.largest, out.numel())
        return out


@pytest.mark.parametrize("name", ["flux", "sdxl"])
def test_built_in_bf16_directly(name):
    # Built then cast, every weight would exist in float32 first; the schedulers' 1000-step tables are the
    # only float32 tensors made.
    made = _Float32Made()
    with made:
        pipe = sized.make(name, dtype=torch.bfloat16, overrides=REDUCED[name])
    assert made.largest <= 1001
    assert torch.get_default_dtype() == torch.float32
    for key, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            assert {p.dtype for p in module.parameters()} == {torch.bfloat16}, key
    assert call(pipe, name).shape == (64, 64, 3)


def test_declared_float32_modules_stay_float32():
    # as from_pretrained(torch_dtype=bf16) leaves Wan's norms and time embedder
    model = denoiser(sized.make("wan-1.3b", dtype=torch.bfloat16, overrides=REDUCED["wan-1.3b"]))
    keep = set(model._keep_in_fp32_modules)
    for key, p in model.named_parameters():
        assert p.dtype == (torch.float32 if keep.intersection(key.split(".")) else torch.bfloat16), key


def test_default_dtype_is_restored_when_building_fails():
    with pytest.raises(ValueError, match="block_out_channels"):  # diffusers' check, inside the UNet's __init__
        sized.make("sd15", dtype=torch.bfloat16, overrides={"block_out_channels": (32, 32)})
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.parametrize("name", sized.NAMES)
def test_recognised_as_its_family(name):
    assert family_of(denoiser(reduced(name))).name == FAMILY[name]


@pytest.mark.parametrize("name", ["flux", "sd15"])
def test_accelerates_and_restores(name):
    pipe = reduced(name)
    before = call(pipe, name)
    accel.apply(pipe, "balanced")
    try:
        assert accel.is_applied(pipe)
        assert np.isfinite(call(pipe, name)).all()
    finally:
        accel.remove(pipe)
    np.testing.assert_array_equal(call(pipe, name), before)


def test_loader_builds_shape_models():
    pipe = load("shape:flux:num_layers=1,num_single_layers=1,num_attention_heads=2,attention_head_dim=16,"
                "axes_dims_rope=(4,6,6)", device="cpu", dtype="bf16")
    assert type(pipe) is diffusers.FluxPipeline
    assert pipe.transformer.config.num_layers == 1 and pipe.transformer.config.joint_attention_dim == 4096
    assert pipe.transformer.dtype == torch.bfloat16
    models = builtin_models()
    for name in sized.NAMES:
        assert "fidelity not meaningful" in models[f"shape:{name}"]


@pytest.mark.parametrize("model, message", [
    ("shape:flux2", "shape models: shape:flux, shape:wan-1.3b, shape:sd15, shape:sdxl"),
    ("shape:flux:num_layer=1", r"unknown FluxTransformer2DModel config key\(s\) for shape:flux: num_layer; "
                               "valid keys: patch_size, in_channels, out_channels, num_layers"),
    ("shape:flux:num_layers", "is not key=value; e.g. shape:flux:num_layers=1,num_single_layers=1"),
    ("shape:flux:num_layers=", "is not key=value"),
    ("shape:flux:attention_head_dim=16", r"must sum to attention_head_dim 16; e.g. .*axes_dims_rope=\(4,6,6\)"),
    ("shape:sdxl:cross_attention_dim=1280", "the pooled text width"),
    ("shape:wan-1.3b:patch_size=(1,2,2", "unbalanced brackets"),
])
def test_bad_model_strings_say_what_would_work(model, message):
    with pytest.raises(ValueError, match=message):
        sized.parse(model)
    with pytest.raises(ModelLoadError, match=message):
        load(model, device="cpu")


def test_parse_values():
    name, overrides = sized.parse("shape:wan-1.3b:num_layers=2, patch_size=(1,2,2),qk_norm=rms_norm_across_heads,"
                                  "cross_attn_norm=false,eps=1e-5,image_dim=none,ffn_dim=[64]")
    assert name == "wan-1.3b"
    assert overrides == {"num_layers": 2, "patch_size": (1, 2, 2), "qk_norm": "rms_norm_across_heads",
                         "cross_attn_norm": False, "eps": 1e-5, "image_dim": None, "ffn_dim": (64,)}
    assert sized.parse("shape:sd15") == ("sd15", {})
    assert type(sized.parse("shape:sd15:sample_size=32")[1]["sample_size"]) is int


def test_call_defaults_are_the_released_calls():
    assert sized.call_defaults("flux") == {"height": 1024, "width": 1024, "num_inference_steps": 28,
                                           "guidance_scale": 3.5, "max_sequence_length": 512}
    assert sized.call_defaults("wan-1.3b") == {"height": 480, "width": 832, "num_frames": 81,
                                               "num_inference_steps": 50, "guidance_scale": 5.0,
                                               "max_sequence_length": 512}
    assert sized.call_defaults("sd15") == {"height": 512, "width": 512, "num_inference_steps": 50,
                                           "guidance_scale": 7.5}
    assert sized.call_defaults("sdxl") == {"height": 1024, "width": 1024, "num_inference_steps": 50,
                                           "guidance_scale": 5.0}
    sized.call_defaults("flux")["height"] = 1
    assert sized.call_defaults("flux")["height"] == 1024  # a copy each time


def test_listing_and_parsing_model_names_import_no_torch():
    code = ("import sys; from accel.pipelines import sized; sized.describe(); sized.call_defaults('flux'); "
            "sized.full_config('sdxl'); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
def test_full_flux_on_cuda_in_bf16():
    torch.cuda.reset_peak_memory_stats()
    pipe = sized.make("flux", device="cuda", dtype=torch.bfloat16)
    # 11.9B parameters are 23.8 GB in bf16; built in float32 first they would pass 47 GB.
    assert torch.cuda.max_memory_allocated() < 30e9
    for key, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            for p_name, p in module.named_parameters():
                assert p.device.type == "cuda" and p.dtype == torch.bfloat16, (key, p_name)
    out = pipe(prompt="a cat", height=512, width=512, num_inference_steps=2, guidance_scale=3.5,
               output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 512, 512, 3)
    assert np.isfinite(out.images).all()
    del pipe
    torch.cuda.empty_cache()
