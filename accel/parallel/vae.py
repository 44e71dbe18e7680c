"""Parallel VAE decode: each rank decodes a band of latent rows; the image (or video) is gathered.

The decoder is cut the same way displaced patch parallelism cuts a UNet, always synchronously:
its k x k convolutions (2-D, and the spatial part of 3-D ones) take halo rows from the
neighbouring bands, its GroupNorms use whole-image statistics, and layers that look at a whole
frame (the image VAE's mid-block attention, Wan's per-frame attention) see every band. The result
therefore equals a single-process decode (fp32 round-off), unlike tiled decoding, whose per-tile
statistics and blending leave seams.

Supported decoders:

- ``AutoencoderKL`` (SD, SDXL, SD3, Flux, PixArt): conv halos, GroupNorm, attention K/V exchange.
- ``AutoencoderKLWan``: causal 3-D convolutions (halo rows of the frame and of its time cache),
  per-position RMS norms (local), per-frame attention in the mid block (computed on the whole
  frame, gathered from the bands). The decoder runs frame by frame; every rank keeps the time
  cache of its own band, which is all its next frame needs.
- ``AutoencoderKLCogVideoX``: 3-D convolutions, GroupNorm over (C, T, H, W), spatial norms whose
  nearest-neighbour upsampling of the latent is band-local.
- ``AutoencoderKLLTXVideo``: 3-D convolutions, per-position RMS norms, depth-to-space upsamplers;
  decoders that inject noise (LTX 0.9.1+) are refused (each band would draw other noise).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.hooks import ModelHook

from .config import ParallelConfig
from .context import LoopState
from .runtime import ParallelError, _guard, rank, world_size

VAE_BAND_HOOK, VAE_FRAME_HOOK = "accel.parallel.vae_band", "accel.parallel.vae_frame"
# Decoder modules that mix rows in ways halos cannot serve: computed on the whole frame, per class name.
WHOLE_FRAME = {"AutoencoderKLWan": ("WanAttentionBlock",)}
SUPPORTED = ("AutoencoderKL", "AutoencoderKLWan", "AutoencoderKLCogVideoX", "AutoencoderKLLTXVideo")


class _Band:
    """The ranks that decode one image together, as the one inner group of the displaced-patch hooks:
    a pipeline copy's ranks (`Groups.replica_group`) when there are copies, else the whole world."""

    def __init__(self, groups, replicas: int):
        self.rank = rank()
        if groups is not None:
            self.inner_group, self.inner_degree, self.inner_index = groups.replica_group, groups.size, groups.local_rank
        elif replicas > 1:  # one rank per copy: nothing to share
            self.inner_group, self.inner_degree, self.inner_index = None, 1, 0
        else:
            self.inner_group, self.inner_degree, self.inner_index = None, world_size(), self.rank
        self.cfg_degree, self.cfg_index, self.cfg_group = 1, 0, None


def _gather_rows(x: torch.Tensor, band: _Band, stats: dict) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(band.inner_degree)]
    _guard(lambda: dist.all_gather(parts, x, group=band.inner_group), "VAE all-gather")
    stats["gather_bytes"] = stats.get("gather_bytes", 0) + x.numel() * x.element_size() * (len(parts) - 1)
    return torch.cat(parts, -2)


class _BandHook(ModelHook):
    """On the decoder: split the latent (its first argument) into row bands, gather the output's rows."""

    def __init__(self, band: _Band, stats: dict):
        super().__init__()
        self.band, self.stats = band, stats

    def pre_forward(self, module, *args, **kwargs):
        from ..families import forward_params

        name = forward_params(type(module))[0]
        x = args[0] if args else kwargs[name]
        p = self.band.inner_degree
        if x.shape[-2] % p:
            raise ParallelError(f"parallel.vae: latent height {x.shape[-2]} is not a multiple of the {p} ranks; "
                                "pick a height whose latent is, or set vae=False")
        x = x.chunk(p, -2)[self.band.inner_index]
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, name: x}

    def post_forward(self, module, output):
        from .cfg_parallel import _first_tensor, _with_first

        return _with_first(output, _gather_rows(_first_tensor(output), self.band, self.stats))


class _WholeFrameHook(ModelHook):
    """A module that needs the whole frame: run it on the gathered rows, keep this band's rows of the result."""

    def __init__(self, band: _Band, stats: dict):
        super().__init__()
        self.band, self.stats = band, stats

    def new_forward(self, module, x, *args, **kwargs):
        rows = x.shape[-2]
        out = self.fn_ref.original_forward(_gather_rows(x, self.band, self.stats), *args, **kwargs)
        return out.narrow(-2, self.band.inner_index * rows, rows)


def _causal_halo_hook():
    """Wan's causal 3-D convolution: it pads in ``forward`` (time causally, rows and columns with
    zeros) and convolves without padding, so the halo rows go in between."""
    from .displaced_patch import HaloConvHook

    class CausalHaloConvHook(HaloConvHook):
        def new_forward(self, module, x, cache_x=None):
            padding = list(module._padding)  # (left, right, top, bottom, front, back)
            if cache_x is not None and padding[4] > 0:
                x = torch.cat([cache_x.to(x.device), x], dim=2)
                padding[4] -= cache_x.shape[2]
            if padding[2]:
                x = self.extend(x, padding[2])
                padding[2] = padding[3] = 0
            return torch.nn.Conv3d.forward(module, F.pad(x, padding))

    return CausalHaloConvHook


def _check(vae, decoder) -> None:
    name = type(vae).__name__
    if decoder is None or name not in SUPPORTED:
        raise ParallelError(f"parallel.vae: {name} is not supported (supported: {', '.join(SUPPORTED)}); "
                            "set vae=False for this pipeline")
    if any(getattr(vae.config, "decoder_inject_noise", None) or ()):
        raise ParallelError(f"parallel.vae: this {name} injects noise while decoding, which each band would draw "
                            "differently; set vae=False for this pipeline")


def apply_vae(ledger, vae, cfg: ParallelConfig, stats: dict, groups=None, replicas: int = 1) -> None:
    from . import attention
    from .displaced_patch import CONV_HOOK, NORM_HOOK, HaloConvHook, PatchGroupNormHook, _Stale

    decoder = getattr(vae, "decoder", None)
    _check(vae, decoder)
    band = _Band(groups, replicas)
    if band.inner_degree == 1:
        return
    vae_stats = stats.setdefault("vae", {})
    state = LoopState()
    ex = _Stale(band, state, "sync", 0, vae_stats)
    whole = WHOLE_FRAME.get(type(vae).__name__, ())
    causal = _causal_halo_hook()
    inside_whole: set[int] = set()
    for name, m in decoder.named_modules():
        if id(m) in inside_whole:
            continue
        if type(m).__name__ in whole:
            ledger.add_hook(m, _WholeFrameHook(band, vae_stats), VAE_FRAME_HOOK)
            inside_whole.update(id(s) for s in m.modules())
        elif isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)) and m.kernel_size[-2] > 1:
            ledger.add_hook(m, _conv_hook(m, name, ex, causal, HaloConvHook), CONV_HOOK)
        elif isinstance(m, torch.nn.GroupNorm):
            ledger.add_hook(m, PatchGroupNormHook(ex, "sync_gn"), NORM_HOOK)
        elif hasattr(m, "processor") and hasattr(m, "set_processor"):
            ledger.set_processor(m, attention.wrap(attention.DisplacedKV, m.processor, f"vae.{name}", band,
                                                   state, None, vae_stats, "sync", 0, 1.0))
    ledger.add_hook(decoder, _BandHook(band, vae_stats), VAE_BAND_HOOK)


def _conv_hook(m, name: str, ex, causal, halo):
    if hasattr(m, "_padding") and isinstance(m, torch.nn.Conv3d):  # WanCausalConv3d pads in forward
        return causal(ex)
    if isinstance(m.padding, str) or m.padding_mode != "zeros" or m.padding[-2] == 0 or m.stride[-2] != 1:
        raise ParallelError(f"parallel.vae: decoder convolution {name} ({type(m).__name__}, padding {m.padding!r} "
                            f"{m.padding_mode}, stride {m.stride}) cannot take halo rows; set vae=False")
    return halo(ex)
