"""Shape models: random-weight pipelines at the released models' sizes, for measuring speed.

``make("flux")`` returns a real ``FluxPipeline`` whose transformer has FLUX.1-dev's config
(11.9B parameters), with random weights. The text encoders and the VAE are small (2 layers, narrow)
but keep what the denoiser sees: the text widths it projects from (T5 4096, CLIP 768/1280, pooled
and time-id inputs), the latent channels, and the VAE's spatial (8x) and temporal (4x) compression,
so a call at the released size gives the released number of latents and tokens. Time in the
denoiser is the real model's; time in text encoding and VAE decoding is not. Outputs are noise:
fidelity measured on a shape model says nothing about the released model.

Models are built directly on the target device in the target dtype (``torch.device`` context and
default dtype set while constructing): FLUX's 12B parameters built on a CPU in float32 and then
cast would take minutes and 48 GB. Modules a model declares float32 (Wan's norms and time
embedder) are then upcast, as ``from_pretrained(torch_dtype=...)`` leaves them.

Model strings (``accel bench --model ...``): ``shape:<name>``, or ``shape:<name>:key=value,...``
to change fields of the denoiser's config, e.g. ``shape:flux:num_layers=1,num_single_layers=1``
or ``shape:wan-1.3b:num_layers=2,patch_size=(1,2,2)``. Values are ints, floats, ``true``/``false``,
``none``, tuples ``(a,b)`` / ``[a,b]``, or bare strings.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import parts, tiny
from .devices import default_dtype

if TYPE_CHECKING:  # torch and diffusers are imported where they are used: `accel models` lists these without them
    import torch

PREFIX = "shape:"
NAMES = ("flux", "wan-1.3b", "sd15", "sdxl")

# The small text encoders: output width as the denoiser needs it, narrow inside.
_T5_INNER = {"d_kv": 32, "d_ff": 128}
# 4 blocks: 8x spatial compression, as in the released image VAEs.
_VAE_WIDTHS = (32, 32, 32, 32)
# SDXL's added conditioning: six size/crop ids, each embedded to addition_time_embed_dim.
_SDXL_TIME_IDS = 6


@dataclass(frozen=True)
class _Spec:
    released: str  # the checkpoint whose denoiser config this is
    pipeline: str
    denoiser: str
    parameters: str  # the denoiser's size, as written in the description
    config: dict[str, Any]
    call: dict[str, Any]  # the usual call at the released size


# The released denoiser configs (the model repos' transformer/config.json and unet/config.json,
# fields left at the class defaults omitted). tests/pipelines/test_shape.py checks parameter counts.
_SPECS: dict[str, _Spec] = {
    "flux": _Spec(
        "FLUX.1-dev", "FluxPipeline", "FluxTransformer2DModel", "11.9B",
        {"patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
         "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
         "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)},
        {"height": 1024, "width": 1024, "num_inference_steps": 28, "guidance_scale": 3.5,
         "max_sequence_length": 512},
    ),
    "wan-1.3b": _Spec(
        "Wan2.1-T2V-1.3B", "WanPipeline", "WanTransformer3DModel", "1.42B",
        {"patch_size": (1, 2, 2), "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16,
         "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30,
         "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None,
         "added_kv_proj_dim": None, "rope_max_seq_len": 1024},
        {"height": 480, "width": 832, "num_frames": 81, "num_inference_steps": 50, "guidance_scale": 5.0,
         "max_sequence_length": 512},
    ),
    "sd15": _Spec(
        "stable-diffusion-v1-5", "StableDiffusionPipeline", "UNet2DConditionModel", "860M",
        {"sample_size": 64, "in_channels": 4, "out_channels": 4, "block_out_channels": (320, 640, 1280, 1280),
         "layers_per_block": 2, "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
         "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, "cross_attention_dim": 768,
         "attention_head_dim": 8},  # the head count, in this class
        {"height": 512, "width": 512, "num_inference_steps": 50, "guidance_scale": 7.5},
    ),
    "sdxl": _Spec(
        "stable-diffusion-xl-base-1.0", "StableDiffusionXLPipeline", "UNet2DConditionModel", "2.57B",
        {"sample_size": 128, "in_channels": 4, "out_channels": 4, "block_out_channels": (320, 640, 1280),
         "layers_per_block": 2, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
         "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
         "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
         "use_linear_projection": True, "cross_attention_dim": 2048,  # CLIP-L 768 + CLIP-G 1280 hidden states
         "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
         "projection_class_embeddings_input_dim": 2816},  # 6 time ids x 256 + pooled CLIP-G 1280
        {"height": 1024, "width": 1024, "num_inference_steps": 50, "guidance_scale": 5.0},
    ),
}


# ---------------------------------------------------------------------------
# Names, configs, model strings
# ---------------------------------------------------------------------------


def _check(name: str) -> _Spec:
    if name not in _SPECS:
        raise ValueError(f"unknown shape model {name!r}; shape models: {', '.join(PREFIX + n for n in NAMES)}")
    return _SPECS[name]


def describe() -> dict[str, str]:
    """``{name: what it is}``, without importing torch."""
    return {name: f"random-weight {s.pipeline} at {s.released}'s size ({s.parameters} "
                  f"{'UNet' if s.denoiser.startswith('UNet') else 'transformer'}, small text encoders and VAE; "
                  "for speed, fidelity not meaningful)"
            for name, s in _SPECS.items()}


def call_defaults(name: str) -> dict[str, Any]:
    """The released model's usual call: size, frames, steps, guidance (the prompt and generator are the caller's)."""
    return dict(_check(name).call)


def full_config(name: str) -> dict[str, Any]:
    """The released denoiser's config (fields at the class default left out)."""
    return dict(_check(name).config)


def config_keys(name: str) -> tuple[str, ...]:
    """The fields ``overrides`` may change: the denoiser class's init parameters."""
    import diffusers

    params = inspect.signature(getattr(diffusers, _check(name).denoiser).__init__).parameters
    return tuple(p for p, v in params.items() if p != "self" and v.kind is v.POSITIONAL_OR_KEYWORD)


def config(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The denoiser config ``make`` builds: ``full_config(name)`` with ``overrides`` applied and checked."""
    cfg = full_config(name)
    if overrides:
        keys = config_keys(name)
        unknown = sorted(set(overrides) - set(keys))
        if unknown:
            raise ValueError(f"unknown {_check(name).denoiser} config key(s) for {PREFIX}{name}: "
                             f"{', '.join(unknown)}; valid keys: {', '.join(keys)}")
        cfg.update(overrides)
    _check_consistent(name, cfg)
    return cfg


def _check_consistent(name: str, cfg: dict[str, Any]) -> None:
    """Mismatches that diffusers would only report at the first call, or not clearly."""
    if name == "flux" and sum(cfg["axes_dims_rope"]) != cfg["attention_head_dim"]:
        raise ValueError(f"{PREFIX}flux: axes_dims_rope {tuple(cfg['axes_dims_rope'])} must sum to "
                         f"attention_head_dim {cfg['attention_head_dim']}; e.g. attention_head_dim=16,"
                         "axes_dims_rope=(4,6,6)")
    if name == "sdxl":
        _sdxl_text_widths(cfg)


def _sdxl_text_widths(cfg: dict[str, Any]) -> tuple[int, int]:
    """(CLIP-L, CLIP-G) hidden widths the UNet expects: CLIP-G's pooled projection fills what the
    time ids leave of the added embedding; the two hidden states together are cross_attention_dim."""
    big = cfg["projection_class_embeddings_input_dim"] - _SDXL_TIME_IDS * cfg["addition_time_embed_dim"]
    small = cfg["cross_attention_dim"] - big
    if big <= 0 or small <= 0 or big % 2 or small % 2:
        raise ValueError(
            f"{PREFIX}sdxl: projection_class_embeddings_input_dim ({cfg['projection_class_embeddings_input_dim']}) "
            f"minus {_SDXL_TIME_IDS} x addition_time_embed_dim ({cfg['addition_time_embed_dim']}) is the pooled "
            f"text width ({big}) and must be even, positive and below cross_attention_dim "
            f"({cfg['cross_attention_dim']}) by an even amount; e.g. cross_attention_dim=64,"
            "addition_time_embed_dim=8,projection_class_embeddings_input_dim=80")
    return small, big


def parse(model: str) -> tuple[str, dict[str, Any]]:
    """``"shape:<name>[:key=value,...]"`` -> (name, overrides), checked as ``make`` would."""
    if not model.startswith(PREFIX):
        raise ValueError(f"{model!r} is not a shape model; write {PREFIX}<name> or {PREFIX}<name>:key=value,... "
                         f"with <name> one of {', '.join(NAMES)}")
    name, _, rest = model[len(PREFIX):].partition(":")
    _check(name)
    overrides = {}
    for item in _split(rest):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ValueError(f"override {item!r} in {model!r} is not key=value; e.g. "
                             f"{PREFIX}flux:num_layers=1,num_single_layers=1")
        overrides[key.strip()] = _value(value)
    config(name, overrides)
    return name, overrides


def _split(text: str) -> list[str]:
    """Split on the commas outside brackets; empty pieces dropped (so ``(1,)`` is one element)."""
    pieces, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch in "([") - (ch in ")]")
        if depth < 0:
            raise ValueError(f"unbalanced brackets in {text!r}")
        if ch == "," and depth == 0:
            pieces.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced brackets in {text!r}")
    pieces.append(text[start:])
    return [p.strip() for p in pieces if p.strip()]


def _value(text: str) -> Any:
    text = text.strip()
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if text[:1] in ("(", "["):
        if text[-1] != {"(": ")", "[": "]"}[text[0]]:
            raise ValueError(f"unbalanced brackets in {text!r}")
        return tuple(_value(v) for v in _split(text[1:-1]))
    for number in (int, float):
        with contextlib.suppress(ValueError):
            return number(text)
    return text.strip("'\"")


# ---------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------


def _modules_flux(seeded, cfg):
    from diffusers import FluxTransformer2DModel


    tok, tok_2 = parts.clip_tokenizer(), parts.t5_tokenizer()
    return {
        "transformer": seeded(FluxTransformer2DModel, **cfg),
        "vae": parts.flow_vae(seeded, shift_factor=0.1159, scaling_factor=0.3611, block_out_channels=_VAE_WIDTHS),
        "text_encoder": seeded(parts.clip_text, tok, hidden=cfg["pooled_projection_dim"]), "tokenizer": tok,
        "text_encoder_2": seeded(parts.t5_text, tok_2, d_model=cfg["joint_attention_dim"], **_T5_INNER),
        "tokenizer_2": tok_2,
    }


def _modules_wan(seeded, cfg):
    from diffusers import WanTransformer3DModel


    tok = parts.t5_tokenizer()
    return {
        "transformer": seeded(WanTransformer3DModel, **cfg), "vae": parts.wan_vae(seeded),
        "text_encoder": seeded(parts.t5_text, tok, umt5=True, d_model=cfg["text_dim"], **_T5_INNER),
        "tokenizer": tok,
    }


def _modules_sd15(seeded, cfg):
    from diffusers import UNet2DConditionModel


    tok = parts.clip_tokenizer()
    return {
        "unet": seeded(UNet2DConditionModel, **cfg),
        "vae": parts.image_vae(seeded, cfg["in_channels"], block_out_channels=_VAE_WIDTHS),
        "text_encoder": seeded(parts.clip_text, tok, hidden=cfg["cross_attention_dim"]), "tokenizer": tok,
    }


def _modules_sdxl(seeded, cfg):
    from diffusers import UNet2DConditionModel


    small, big = _sdxl_text_widths(cfg)
    tok, tok_2 = parts.clip_tokenizer(), parts.clip_tokenizer()
    return {
        "unet": seeded(UNet2DConditionModel, **cfg),
        "vae": parts.image_vae(seeded, cfg["in_channels"], block_out_channels=_VAE_WIDTHS, scaling_factor=0.13025),
        "text_encoder": seeded(parts.clip_text, tok, hidden=small), "tokenizer": tok,
        "text_encoder_2": seeded(parts.clip_text, tok_2, projection=True, hidden=big), "tokenizer_2": tok_2,
    }


def _rest(name: str) -> dict[str, Any]:
    """The pipeline's other arguments, built outside the low-precision default dtype. Schedulers as released,
    but SD1.5's is DDIM (the release ships PNDM; a step costs the same)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler


    if name == "flux":
        return {"scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)}
    if name == "wan-1.3b":
        return {"scheduler": UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                     flow_shift=3.0)}
    if name == "sd15":
        return {"scheduler": parts.sd_scheduler(), "safety_checker": None, "feature_extractor": None,
                "requires_safety_checker": False}
    return {"scheduler": parts.sdxl_scheduler(), "add_watermarker": False}


_MODULES = {"flux": _modules_flux, "wan-1.3b": _modules_wan, "sd15": _modules_sd15, "sdxl": _modules_sdxl}


@contextlib.contextmanager
def _constructing_on(device: torch.device, dtype: torch.dtype):
    """New tensors on ``device`` in ``dtype``; the caller's default dtype and RNG state restored after."""
    import torch

    cuda = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=cuda), torch.device(device):
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)


def make(name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, seed: int = 0,
         overrides: dict[str, Any] | None = None):
    """The shape pipeline ``name`` (one of ``NAMES``) on ``device``: eval mode, progress bar off, same seed same
    weights. ``dtype`` defaults to bfloat16 on CUDA and float32 elsewhere. ``overrides`` change fields of the
    denoiser config (``config_keys(name)``), e.g. ``{"num_layers": 1, "num_single_layers": 1}`` for a CPU."""
    import diffusers
    import torch

    cfg = config(name, overrides)
    device = torch.device(device)
    dtype = dtype or default_dtype(str(device))
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype, not {dtype}")
    with _constructing_on(device, dtype):
        modules = _MODULES[name](tiny._Seeded(seed), cfg)
    pipe = getattr(diffusers, _SPECS[name].pipeline)(**modules, **_rest(name))
    for module in modules.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
            tiny._cast(module, dtype)  # only the model's declared float32 modules move (up)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameter_count(name: str, overrides: dict[str, Any] | None = None) -> int:
    """The denoiser's parameter count, built on the meta device (no memory, no weights)."""
    import diffusers
    import torch

    cfg = config(name, overrides)
    with torch.device("meta"):
        denoiser = getattr(diffusers, _SPECS[name].denoiser)(**cfg)
    return sum(p.numel() for p in denoiser.parameters())
