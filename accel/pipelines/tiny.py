"""Tiny, randomly initialised diffusers pipelines, built entirely offline.

``make(name)`` returns the *real* diffusers pipeline class for each family in
``NAMES`` (same block types, schedulers and text-encoder families as the
released checkpoints) with weights small enough that a call takes a fraction of
a second on CPU. Tests and benchmarks of acceleration techniques use them as
stand-ins for the multi-gigabyte models; ``example_inputs(name)`` gives matching
call arguments.

Nothing comes from the Hugging Face hub. Tokenizers are the real transformers
classes built in code over a small English word list: listed words are single
tokens, anything else falls back to characters (or bytes), so prompts give short,
realistic sequences and ``encode_prompt`` works as usual (padding to
``max_length``, truncation, CLIP pooling at the end-of-text token).

Deviations from the released layouts, and why:

* Image VAEs have two blocks (2x downsampling, not 8x), so a 32 px image still
  gives a 16x16 latent and several transformer patches.
* ``cogvideox`` uses the CogVideoX-5b layout (rotary position embeddings). The
  2b layout adds fixed sin-cos embeddings over text+video tokens, which only
  fit when the text is padded to exactly 226 tokens.
* ``hunyuanvideo``'s default prompt template crops the first 95 Llama-3 tokens
  (its system prompt); our tokenizer splits that text differently, so
  ``example_inputs`` passes a plain ``"{}"`` template, as diffusers' tests do.
* ``pixart`` disables resolution binning in ``example_inputs``: binning snaps
  the size to the released aspect-ratio tables (256 px and up).

All families in ``NAMES`` build offline; none had to be left out.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import parts

if TYPE_CHECKING:  # torch is imported where it is used: `accel models` lists the built-in models without it
    import torch

NAMES = ("sd15", "sdxl", "animatediff", "flux", "sd3", "pixart", "cogvideox", "wan", "wan22", "ltx", "hunyuanvideo")

# ---------------------------------------------------------------------------
# Pipeline builders: ``seeded(fn, ...)`` reseeds torch, then calls fn(...).
# ---------------------------------------------------------------------------

_FAMILIES: dict[str, tuple[str, Callable]] = {}


def _family(name: str, pipeline_class: str):
    def register(build):
        _FAMILIES[name] = (pipeline_class, build)
        return build

    return register


@_family("sd15", "StableDiffusionPipeline")
def _sd15(seeded):
    from diffusers import StableDiffusionPipeline

    tok = parts.clip_tokenizer()
    return StableDiffusionPipeline(
        vae=parts.image_vae(seeded, 4), text_encoder=seeded(parts.clip_text, tok), tokenizer=tok, unet=parts.sd_unet(seeded),
        scheduler=parts.sd_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


@_family("sdxl", "StableDiffusionXLPipeline")
def _sdxl(seeded):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    tok, tok_2 = parts.clip_tokenizer(), parts.clip_tokenizer()
    unet = seeded(
        UNet2DConditionModel, sample_size=16, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=64,  # both CLIP hidden states, concatenated
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six size/crop ids + pooled CLIP-G projection
    )  # fmt: skip
    return StableDiffusionXLPipeline(
        vae=parts.image_vae(seeded, 4), text_encoder=seeded(parts.clip_text, tok),
        text_encoder_2=seeded(parts.clip_text, tok_2, projection=True), tokenizer=tok, tokenizer_2=tok_2, unet=unet,
        scheduler=parts.sdxl_scheduler(),
        add_watermarker=False,  # needs the invisible-watermark package
    )  # fmt: skip


@_family("animatediff", "AnimateDiffPipeline")
def _animatediff(seeded):
    from diffusers import AnimateDiffPipeline, MotionAdapter

    tok = parts.clip_tokenizer()
    adapter = seeded(
        MotionAdapter, block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
    )  # fmt: skip
    # __init__ fuses unet + adapter into a UNetMotionModel and casts it with
    # .to(dtype), which makes diffusers warn about (no) fp32 modules.
    with _quiet("diffusers.models.modeling_utils"):
        return seeded(
            AnimateDiffPipeline, vae=parts.image_vae(seeded, 4), text_encoder=seeded(parts.clip_text, tok), tokenizer=tok,
            unet=parts.sd_unet(seeded), motion_adapter=adapter, scheduler=parts.sd_scheduler(),
        )  # fmt: skip


@_family("flux", "FluxPipeline")
def _flux(seeded):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok, tok_2 = parts.clip_tokenizer(), parts.t5_tokenizer()
    transformer = seeded(
        FluxTransformer2DModel, patch_size=1, in_channels=64,  # 16 latent channels packed 2x2
        num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
        vae=parts.flow_vae(seeded, shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=seeded(parts.clip_text, tok), tokenizer=tok,
        text_encoder_2=seeded(parts.t5_text, tok_2), tokenizer_2=tok_2, transformer=transformer,
    )  # fmt: skip


@_family("sd3", "StableDiffusion3Pipeline")
def _sd3(seeded):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok, tok_2, tok_3 = parts.clip_tokenizer(), parts.clip_tokenizer(), parts.t5_tokenizer()
    # The two CLIP hidden states (32 + 32) are zero-padded to the T5 width, so
    # T5 is the wider one, as in the released model (2048 vs 4096).
    transformer = seeded(
        SD3Transformer2DModel, sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32,
        pooled_projection_dim=64, pos_embed_max_size=32,
    )  # fmt: skip
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=parts.flow_vae(seeded, shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=seeded(parts.clip_text, tok, projection=True), tokenizer=tok,
        text_encoder_2=seeded(parts.clip_text, tok_2, projection=True), tokenizer_2=tok_2,
        text_encoder_3=seeded(parts.t5_text, tok_3, d_model=64), tokenizer_3=tok_3,
    )  # fmt: skip


@_family("pixart", "PixArtSigmaPipeline")
def _pixart(seeded):
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    tok = parts.t5_tokenizer()
    transformer = seeded(
        PixArtTransformer2DModel, sample_size=16, num_layers=2, patch_size=2, attention_head_dim=16,
        num_attention_heads=2, in_channels=4, out_channels=8,  # learned sigma; the pipeline keeps half
        caption_channels=32, cross_attention_dim=32, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        use_additional_conditions=False,
    )  # fmt: skip
    return PixArtSigmaPipeline(
        tokenizer=tok, text_encoder=seeded(parts.t5_text, tok), vae=parts.image_vae(seeded, 4), transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )  # fmt: skip


@_family("cogvideox", "CogVideoXPipeline")
def _cogvideox(seeded):
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    tok = parts.t5_tokenizer()
    vae = seeded(
        AutoencoderKLCogVideoX, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=16,
        layers_per_block=1, norm_num_groups=2, sample_height=32, sample_width=32,
    )  # fmt: skip
    transformer = seeded(
        CogVideoXTransformer3DModel, num_attention_heads=2, attention_head_dim=16, in_channels=16,
        out_channels=16, time_embed_dim=32, text_embed_dim=32, num_layers=2, sample_width=4, sample_height=4,
        sample_frames=9, patch_size=2, use_rotary_positional_embeddings=True,
    )  # fmt: skip
    scheduler = CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear", prediction_type="v_prediction", rescale_betas_zero_snr=True,
        timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True,
    )  # fmt: skip
    return CogVideoXPipeline(
        tokenizer=tok, text_encoder=seeded(parts.t5_text, tok), vae=vae, transformer=transformer, scheduler=scheduler
    )


@_family("wan", "WanPipeline")
def _wan(seeded, two_experts: bool = False):
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    def transformer(seeded):
        return seeded(
            WanTransformer3DModel, patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
            in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
        )  # fmt: skip

    tok = parts.t5_tokenizer()
    return WanPipeline(
        tokenizer=tok, text_encoder=seeded(parts.t5_text, tok, umt5=True), vae=parts.wan_vae(seeded),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        transformer=transformer(seeded),
        # Wan 2.2 A14B: a high-noise and a low-noise expert, switched at
        # boundary_ratio. Distinct seeds, so a bug routing every step to one
        # expert changes the output.
        transformer_2=transformer(seeded.offset(1)) if two_experts else None,
        boundary_ratio=0.875 if two_experts else None,
    )  # fmt: skip


_family("wan22", "WanPipeline")(functools.partial(_wan, two_experts=True))


@_family("ltx", "LTXPipeline")
def _ltx(seeded):
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    tok = parts.t5_tokenizer()
    # 8x spatial / 8x temporal compression (the released VAE: 32x / 8x), so
    # num_frames keeps the 8k+1 rule.
    vae = seeded(
        AutoencoderKLLTXVideo, latent_channels=8, block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
        layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5, patch_size=1, patch_size_t=1,
        spatio_temporal_scaling=(True, True, True, False), decoder_spatio_temporal_scaling=(True, True, True, False),
    )  # fmt: skip
    transformer = seeded(
        LTXVideoTransformer3DModel, in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, num_layers=2, caption_channels=32,
    )  # fmt: skip
    return LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=seeded(parts.t5_text, tok), tokenizer=tok,
        transformer=transformer,
    )  # fmt: skip


@_family("hunyuanvideo", "HunyuanVideoPipeline")
def _hunyuanvideo(seeded):
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )

    tok, tok_2 = parts.llama_tokenizer(), parts.clip_tokenizer()
    vae = seeded(
        AutoencoderKLHunyuanVideo, latent_channels=16, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8,) * 4, layers_per_block=1,
        norm_num_groups=4,
    )  # fmt: skip
    transformer = seeded(
        HunyuanVideoTransformer3DModel, in_channels=16, out_channels=16, num_attention_heads=2,
        attention_head_dim=16, num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=2,
        guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=32, rope_axes_dim=(4, 6, 6),
    )  # fmt: skip
    return HunyuanVideoPipeline(
        text_encoder=seeded(parts.llama_text, tok), tokenizer=tok, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=seeded(parts.clip_text, tok_2), tokenizer_2=tok_2,
    )  # fmt: skip


# ---------------------------------------------------------------------------
# Call arguments
# ---------------------------------------------------------------------------

_IMAGE = {"height": 32, "width": 32}
_VIDEO = {"height": 32, "width": 32, "num_frames": 9}  # 4k+1 (Wan, CogVideoX, Hunyuan) and 8k+1 (LTX)
_CFG = {"negative_prompt": "blurry, low quality"}
_SHORT_TEXT = {"max_sequence_length": 16}

_INPUTS: dict[str, dict[str, Any]] = {
    "sd15": {**_IMAGE, **_CFG, "guidance_scale": 7.5},
    "sdxl": {**_IMAGE, **_CFG, "guidance_scale": 5.0},
    "animatediff": {**_IMAGE, **_CFG, "guidance_scale": 7.5, "num_frames": 8},
    # Guidance-distilled: the scale is an input embedding, no unconditional pass.
    "flux": {**_IMAGE, **_SHORT_TEXT, "guidance_scale": 3.5},
    "sd3": {**_IMAGE, **_CFG, **_SHORT_TEXT, "guidance_scale": 5.0},
    # Caption cleaning needs bs4/ftfy and only matters for scraped captions.
    "pixart": {
        **_IMAGE,
        **_CFG,
        **_SHORT_TEXT,
        "guidance_scale": 4.5,
        "use_resolution_binning": False,
        "clean_caption": False,
    },
    "cogvideox": {**_VIDEO, **_CFG, **_SHORT_TEXT, "guidance_scale": 6.0},
    "wan": {**_VIDEO, **_CFG, **_SHORT_TEXT, "guidance_scale": 5.0},
    "wan22": {**_VIDEO, **_CFG, **_SHORT_TEXT, "guidance_scale": 4.0, "guidance_scale_2": 3.0},
    "ltx": {**_VIDEO, **_CFG, **_SHORT_TEXT, "guidance_scale": 3.0},
    # guidance_scale is the embedded (distilled) scale; true_cfg_scale plus a
    # negative prompt adds a real, separate unconditional pass.
    "hunyuanvideo": {
        **_VIDEO,
        **_CFG,
        **_SHORT_TEXT,
        "guidance_scale": 6.0,
        "true_cfg_scale": 4.0,
        "prompt_template": {"template": "{}", "crop_start": 0},
    },
}


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


class _Seeded:
    """Calls a component constructor with torch freshly seeded."""

    def __init__(self, seed: int):
        self.seed = seed

    def __call__(self, fn, *args, **kwargs):
        import torch

        torch.manual_seed(self.seed)
        return fn(*args, **kwargs)

    def offset(self, k: int) -> _Seeded:
        return _Seeded(self.seed + k)


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check(name: str) -> None:
    if name not in _FAMILIES:
        raise ValueError(f"unknown tiny pipeline {name!r}; expected one of: {', '.join(NAMES)}")


def make(name: str, seed: int = 0, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Build the tiny random pipeline ``name`` (one of ``NAMES``); same seed, same weights; ``dtype``
    defaults to float32."""
    import torch

    _check(name)
    dtype = dtype or torch.float32
    # Reseeding per component must not disturb the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        pipe = _FAMILIES[name][1](_Seeded(seed))
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            # from_pretrained() hands out eval-mode models; fresh ones are in
            # train mode, where T5's dropout would make every call random.
            component.eval()
            if dtype != torch.float32:
                _cast(component, dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast as ``from_pretrained(torch_dtype=dtype)`` would, keeping the model's
    declared fp32 modules (Wan norms and time embedder, T5 ``wo`` in fp16, ...)
    in float32. ``pipe.to(dtype)`` would cast those too, and ModelMixin.to warns
    on every dtype cast."""
    import torch
    from transformers import PreTrainedModel

    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if isinstance(model, PreTrainedModel):
        # transformers only honours the non-strict list for float16.
        strict = getattr(model, "_keep_in_fp32_modules_strict", None) or ()
        keep = (keep if dtype == torch.float16 else set()) | set(strict)
    for module_name, module in model.named_modules():
        for tensors in (module._parameters, module._buffers):
            for key, tensor in tensors.items():
                if tensor is None or not tensor.is_floating_point():
                    continue
                parts = f"{module_name}.{key}".split(".")
                target = torch.float32 if keep.intersection(parts) else dtype
                if isinstance(tensor, torch.nn.Parameter):
                    tensor.data = tensor.data.to(target)
                else:
                    tensors[key] = tensor.to(target)


def example_inputs(name: str, **overrides) -> dict[str, Any]:
    """Keyword arguments for a fast, deterministic ``make(name)(**inputs)``; overrides replace keys."""
    import torch

    _check(name)
    inputs = {
        "prompt": "a photo of a cat riding a horse on the moon",
        "num_inference_steps": 4,
        "output_type": "np",
        "generator": torch.Generator("cpu").manual_seed(0),
        **_INPUTS[name],
    }
    inputs.update(overrides)
    return inputs


def describe() -> dict[str, str]:
    """``{name: diffusers pipeline class name}``, without building anything."""
    return {name: _FAMILIES[name][0] for name in NAMES}
