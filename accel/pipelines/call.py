"""Calling any supported pipeline the same way, and reading its output as frames.

Pipelines name their arguments differently (``num_frames`` only for video, ``negative_prompt``
not for guidance-distilled Flux); `call_kwargs` keeps what the pipeline's ``__call__`` accepts.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch

from ..families import FAMILIES, Adapter, denoisers_of


def family_name(pipe) -> str:
    return Adapter(denoisers_of(pipe)[0][1]).family.name


def is_video(pipe) -> bool:
    return FAMILIES[family_name(pipe)].video


def size_multiple(pipe) -> int:
    """What ``pipe``'s width and height must be a multiple of: one latent pixel per VAE factor, times the
    denoiser's patch (times 2 where the pipeline packs a fixed 2x2 of latents into a token, as Flux does), and at
    least 8 (the Stable Diffusion pipelines ask for 8 whatever their VAE)."""
    factors = (getattr(pipe, n, None) for n in ("vae_scale_factor_spatial", "vae_spatial_compression_ratio",
                                                "vae_scale_factor"))
    vae = next((v for v in factors if isinstance(v, int) and v > 0), 8)
    patch = getattr(getattr(denoisers_of(pipe)[0][1], "config", None), "patch_size", None) or 1
    patch = patch[-1] if isinstance(patch, (tuple, list)) else patch
    pack = getattr(pipe, "_pack_latents", None)  # Flux's packs a fixed 2x2; LTX's takes its patch_size
    packed = 2 if callable(pack) and "patch_size" not in inspect.signature(pack).parameters else 1
    return max(8, vae * int(patch) * packed)


def accepted(pipe) -> set[str]:
    return set(inspect.signature(type(pipe).__call__).parameters)


def call_kwargs(pipe, *, prompt: str, negative_prompt: str | None = None, steps: int | None = None,
                height: int | None = None, width: int | None = None, frames: int | None = None,
                guidance: float | None = None, seed: int = 0, defaults: dict | None = None) -> dict:
    """Keyword arguments for ``pipe(**kw)``: ``defaults`` (e.g. a tiny model's), then what was given."""
    kw = dict(defaults or {})
    given = {"prompt": prompt, "negative_prompt": negative_prompt, "num_inference_steps": steps,
             "height": height, "width": width, "num_frames": frames, "guidance_scale": guidance}
    kw.update({k: v for k, v in given.items() if v is not None})
    ok = accepted(pipe)
    kw = {k: v for k, v in kw.items() if k in ok}
    kw["generator"] = torch.Generator("cpu").manual_seed(int(seed))
    kw["output_type"] = "np"
    return kw


def all_frames(output) -> list[np.ndarray]:
    """Every result of a pipeline output, each float32 in [0, 1]: (H, W, 3) or (F, H, W, 3)."""
    if hasattr(output, "frames"):
        items = output.frames
    elif hasattr(output, "images"):
        items = output.images
    else:
        items = output[0] if isinstance(output, (tuple, list)) else output
    return [_as_float_frames(x) for x in items]


def to_frames(output) -> np.ndarray:
    """The first result of a pipeline output (see `all_frames`)."""
    return all_frames(output)[0]


def _as_float_frames(x) -> np.ndarray:
    if isinstance(x, list):  # a video as a list of PIL frames
        x = np.stack([np.asarray(f) for f in x])
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    return np.clip(x.astype(np.float32), 0.0, 1.0)
