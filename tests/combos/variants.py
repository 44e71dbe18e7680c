"""Tiny pipelines beyond text-to-image, built offline from the tiny families' components.

``build(name)`` returns ``(pipe, family, call)``: the real diffusers pipeline class made from
``tiny.make(base).components`` plus, where the variant needs them, tiny modules made here (a ControlNet,
an image-to-video transformer with the extra input channels, a CLIP vision encoder), and ``call()``
running it on fixed inputs (seeded, ``output_type="np"``) and returning its frames.

Modules that diffusers zero-initialises (ControlNet's zero convolutions and embedders) get small random
weights, so the control signal reaches the denoiser: zeros would hide a cache that drops it.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image

from accel.pipelines import tiny
from accel.pipelines.call import to_frames

STEPS = 4


def image(seed: int = 0, size: int = 32) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8"))


def mask(size: int = 32) -> Image.Image:
    m = np.zeros((size, size), "uint8")
    m[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
    return Image.fromarray(m)


def wake(module: torch.nn.Module, seed: int = 1, std: float = 0.3) -> torch.nn.Module:
    """Give every all-zero parameter (zero-initialised projections) small random weights; eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module.eval()


def _seeded(fn, *args, seed: int = 0, **kwargs):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn(*args, **kwargs).eval()


def flux_transformer(in_channels: int = 64, out_channels: int | None = None, layers: int = 1, single: int = 1,
                     cls=None):
    """The tiny Flux transformer's shape (tiny.py) with other input channels or depth; also its ControlNet."""
    from diffusers import FluxTransformer2DModel

    kw = dict(patch_size=1, in_channels=in_channels, num_layers=layers, num_single_layers=single,
              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
              guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    if cls is None:
        return _seeded(FluxTransformer2DModel, out_channels=out_channels, **kw)
    return _seeded(cls, **kw)


def wan_transformer(seed: int = 0, **extra):
    """The tiny Wan transformer (tiny.py) with image-to-video's 36 input channels (latents, image latents,
    mask)."""
    from diffusers import WanTransformer3DModel

    return _seeded(
        WanTransformer3DModel, patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
        in_channels=36, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32, seed=seed, **extra,
    )  # fmt: skip


def run(pipe, **kwargs) -> np.ndarray:
    # the global generator seeded too: SD3 ControlNet samples its control latents without the generator
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return to_frames(pipe(**kwargs, output_type="np", generator=torch.Generator().manual_seed(0)))


_BUILDERS: dict = {}


def _variant(name: str, family: str):
    def register(fn):
        _BUILDERS[name] = (family, fn)
        return fn

    return register


@_variant("sd15-img2img", "sd15")
def _sd15_img2img():
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**tiny.make("sd15").components, requires_safety_checker=False)
    return pipe, dict(prompt="a cat", negative_prompt="blurry", image=image(), strength=0.9)


@_variant("sd15-inpaint", "sd15")
def _sd15_inpaint():
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline(**tiny.make("sd15").components, requires_safety_checker=False)
    return pipe, dict(prompt="a cat", negative_prompt="blurry", image=image(), mask_image=mask(), height=32,
                      width=32, strength=0.9)


@_variant("sd15-controlnet", "sd15")
def _sd15_controlnet():
    return sd15_controlnet(), dict(prompt="a cat", negative_prompt="blurry", image=image(1), height=32, width=32)


def sd15_controlnet():
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    base = tiny.make("sd15")
    # one downsampling in the hint encoder, as the tiny VAE has (the released one: 3, for an 8x VAE)
    controlnet = wake(ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(16, 32)))
    return StableDiffusionControlNetPipeline(**base.components, controlnet=controlnet, requires_safety_checker=False)


@_variant("sd15-ip-adapter", "sd15")
def _sd15_ip_adapter():
    return sd15_ip_adapter(), dict(prompt="a cat", negative_prompt="blurry", ip_adapter_image=image(2), height=32,
                                   width=32)


def clip_image_encoder(projection_dim: int = 32):
    """A tiny CLIPVisionModelWithProjection (32 px, 8x8 patches of 4) and its image processor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    encoder = _seeded(CLIPVisionModelWithProjection, CLIPVisionConfig(
        hidden_size=32, projection_dim=projection_dim, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        intermediate_size=64, patch_size=4))
    return encoder, CLIPImageProcessor(crop_size=32, size=32)


def ip_adapter_state_dict(unet, image_embed_dim: int = 32, tokens: int = 4, seed: int = 3) -> dict:
    """An IP-Adapter (the base one: a linear projection of the CLIP image embedding to ``tokens`` tokens) in
    the released checkpoints' layout for ``unet``: ``image_proj`` {proj, norm} and ``ip_adapter``
    {"<i>.to_k_ip/to_v_ip.weight"}, i numbering the UNet's attention processors (odd: the cross-attentions)."""
    gen = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    widths = {f"{n}.processor": m.to_q.out_features for n, m in unet.named_modules()  # by processor name
              if hasattr(m, "set_processor")}
    adapter = {}
    for i, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            for k in ("to_k_ip", "to_v_ip"):
                adapter[f"{i}.{k}.weight"] = torch.randn(widths[name], cross, generator=gen) * cross ** -0.5
    proj = {"proj.weight": torch.randn(tokens * cross, image_embed_dim, generator=gen) * image_embed_dim ** -0.5,
            "proj.bias": torch.zeros(tokens * cross), "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    return {"image_proj": proj, "ip_adapter": adapter}


def sd15_ip_adapter():
    """SD1.5 with an IP-Adapter loaded through diffusers' own loader (`_load_ip_adapter_weights`, what
    `load_ip_adapter` calls after reading the checkpoint), its image encoder made here."""
    from diffusers import StableDiffusionPipeline

    components = dict(tiny.make("sd15").components)
    components["image_encoder"], components["feature_extractor"] = clip_image_encoder()
    pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
    with tiny._quiet("diffusers.models.modeling_utils"):  # the loader's .to(dtype) warns about fp32 modules
        pipe.unet._load_ip_adapter_weights([ip_adapter_state_dict(pipe.unet)], low_cpu_mem_usage=False)
    pipe.set_ip_adapter_scale(1.0)
    return pipe


@_variant("sdxl-img2img", "sdxl")
def _sdxl_img2img():
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline(**tiny.make("sdxl").components)
    return pipe, dict(prompt="a cat", negative_prompt="blurry", image=image(), strength=0.9)


@_variant("sdxl-inpaint", "sdxl")
def _sdxl_inpaint():
    from diffusers import StableDiffusionXLInpaintPipeline

    pipe = StableDiffusionXLInpaintPipeline(**tiny.make("sdxl").components)
    return pipe, dict(prompt="a cat", negative_prompt="blurry", image=image(), mask_image=mask(), height=32,
                      width=32, strength=0.9)


FLUX_CALL = dict(prompt="a cat", height=32, width=32, max_sequence_length=16)


@_variant("flux-img2img", "flux")
def _flux_img2img():
    from diffusers import FluxImg2ImgPipeline

    return FluxImg2ImgPipeline(**tiny.make("flux").components), dict(FLUX_CALL, image=image(), strength=0.9)


@_variant("flux-inpaint", "flux")
def _flux_inpaint():
    from diffusers import FluxInpaintPipeline

    pipe = FluxInpaintPipeline(**tiny.make("flux").components)
    return pipe, dict(FLUX_CALL, image=image(), mask_image=mask(), strength=0.9)


@_variant("flux-kontext", "flux")
def _flux_kontext():
    from diffusers import FluxKontextPipeline

    # max_area: Kontext resizes to about 1 MP unless told the tiny size
    pipe = FluxKontextPipeline(**tiny.make("flux").components)
    return pipe, dict(FLUX_CALL, image=image(), max_area=32 * 32, _auto_resize=False)


@_variant("flux-fill", "flux")
def _flux_fill():
    from diffusers import FluxFillPipeline

    components = {k: v for k, v in tiny.make("flux").components.items()
                  if k not in ("image_encoder", "feature_extractor")}
    # packed latents (64) + packed masked-image latents (64) + the packed mask (2x2 VAE: 4 x 2x2 = 16)
    components["transformer"] = flux_transformer(in_channels=144, out_channels=64)
    return FluxFillPipeline(**components), dict(FLUX_CALL, image=image(), mask_image=mask())


@_variant("flux-controlnet", "flux")
def _flux_controlnet():
    return flux_controlnet(), dict(FLUX_CALL, control_image=image(1))


def flux_controlnet(transformer=None, layers: int = 1, single: int = 1):
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    components = dict(tiny.make("flux").components)
    if transformer is not None:
        components["transformer"] = transformer
    controlnet = wake(flux_transformer(layers=layers, single=single, cls=FluxControlNetModel))
    return FluxControlNetPipeline(**components, controlnet=controlnet)


SD3_CALL = dict(prompt="a cat", negative_prompt="blurry", height=32, width=32, max_sequence_length=16)


@_variant("sd3-controlnet", "sd3")
def _sd3_controlnet():
    return sd3_controlnet(), dict(SD3_CALL, control_image=image(1))


def sd3_transformer(layers: int = 2):
    """The tiny SD3 transformer's shape (tiny.py) with another depth."""
    from diffusers import SD3Transformer2DModel

    return _seeded(
        SD3Transformer2DModel, sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32,
        pooled_projection_dim=64, pos_embed_max_size=32,
    )  # fmt: skip


def sd3_controlnet(transformer=None, layers: int = 1):
    """SD3 ControlNet of ``layers`` joint blocks, made from the transformer (its embedders and first blocks)."""
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline

    components = dict(tiny.make("sd3").components)
    if transformer is not None:
        components["transformer"] = transformer
    transformer = components["transformer"]
    # SD3ControlNetModel.from_transformer, without its writing num_layers into the transformer's config
    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    controlnet = _seeded(SD3ControlNetModel, **dict(config, num_layers=layers), seed=2)
    for part in ("pos_embed", "time_text_embed", "context_embedder", "transformer_blocks"):
        getattr(controlnet, part).load_state_dict(getattr(transformer, part).state_dict(), strict=False)
    return StableDiffusion3ControlNetPipeline(**components, controlnet=wake(controlnet))


_VIDEO_CALL = dict(height=64, width=64, num_frames=9)  # 64 px: 3 attention blocks of 16 tokens per frame group


def _wan_i2v(base_name: str, text_len: int, guidance: float, **modules):
    from diffusers import WanImageToVideoPipeline

    base = tiny.make(base_name)
    pipe = WanImageToVideoPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                                   scheduler=base.scheduler, **modules)
    # prompt embeddings made by the text-to-video pipeline (the I2V pipeline's prompt cleaning needs ftfy)
    embeds, negative = base.encode_prompt("a cat", "blurry", max_sequence_length=text_len)
    return pipe, dict(_VIDEO_CALL, prompt_embeds=embeds, negative_prompt_embeds=negative, image=image(size=64),
                      guidance_scale=guidance)


@_variant("wan-i2v", "wan")
def _wan21_i2v():
    """Wan 2.1 I2V: a CLIP image encoder whose tokens the cross-attention takes beside the text's (it splits
    them at 512 text tokens, hence the full text length)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    encoder = _seeded(CLIPVisionModelWithProjection, CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        intermediate_size=64, patch_size=4))
    return _wan_i2v("wan", 512, 5.0, transformer=wan_transformer(image_dim=32), image_encoder=encoder,
                    image_processor=CLIPImageProcessor(crop_size=32, size=32))


@_variant("wan22-i2v", "wan")
def _wan22_i2v():
    """Wan 2.2 I2V A14B: two experts, no image encoder."""
    return _wan_i2v("wan22", 16, 4.0, transformer=wan_transformer(seed=0), transformer_2=wan_transformer(seed=1),
                    boundary_ratio=0.875)


@_variant("cogvideox-i2v", "cogvideox")
def _cogvideox_i2v():
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXTransformer3DModel

    base = tiny.make("cogvideox")
    transformer = _seeded(
        CogVideoXTransformer3DModel, num_attention_heads=2, attention_head_dim=16, in_channels=32,  # + image latents
        out_channels=16, time_embed_dim=32, text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8,
        sample_frames=9, patch_size=2, use_rotary_positional_embeddings=True,
    )  # fmt: skip
    pipe = CogVideoXImageToVideoPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                                         transformer=transformer, scheduler=base.scheduler)
    return pipe, dict(_VIDEO_CALL, prompt="a cat", negative_prompt="blurry", image=image(size=64),
                      max_sequence_length=16, guidance_scale=6.0)


@_variant("animatediff-v2v", "animatediff")
def _animatediff_v2v():
    from diffusers import AnimateDiffVideoToVideoPipeline

    pipe = AnimateDiffVideoToVideoPipeline(**tiny.make("animatediff").components)
    video = [image().rotate(20 * i) for i in range(4)]
    return pipe, dict(prompt="a cat", negative_prompt="blurry", video=video, height=32, width=32, strength=0.9)


NAMES = tuple(_BUILDERS)


@functools.lru_cache(maxsize=None)
def build(name: str):
    """``(pipe, family, call)`` for variant ``name``, built once per session (tests restore what they change)."""
    family, fn = _BUILDERS[name]
    pipe, kwargs = fn()
    pipe.set_progress_bar_config(disable=True)
    kwargs.setdefault("num_inference_steps", STEPS)
    return pipe, family, functools.partial(run, pipe, **kwargs)


@functools.lru_cache(maxsize=None)
def reference(name: str) -> np.ndarray:
    """The variant's output without accel (computed once)."""
    return build(name)[2]()
