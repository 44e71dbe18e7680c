"""Parallel VAE decode: each rank decodes a band of latent rows; the image is gathered.

The decoder is cut the same way displaced patch parallelism cuts a UNet, always synchronously:
its 3x3 convolutions take halo rows from the neighbouring bands, its GroupNorms use whole-image
statistics and its mid-block attention sees every band's keys and values. The result therefore
equals a single-process decode (fp32 round-off), unlike tiled decoding, whose per-tile
GroupNorm statistics leave seams. Image VAEs (``AutoencoderKL``: SD, SDXL, SD3, Flux, PixArt).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .config import ParallelConfig
from .context import LoopState
from .runtime import ParallelError

VAE_CHECK_HOOK = "accel.parallel.vae_check"


class _WorldGroups:
    """All ranks as one inner group."""

    def __init__(self):
        self.rank = dist.get_rank()
        self.inner_group = None
        self.inner_degree = dist.get_world_size()
        self.inner_index = self.rank
        self.cfg_degree, self.cfg_index, self.cfg_group = 1, 0, None


def apply_vae(ledger, vae, cfg: ParallelConfig, stats: dict) -> None:
    from diffusers.hooks import ModelHook

    from . import attention
    from .displaced_patch import CONV_HOOK, NORM_HOOK, HaloConvHook, PatchGroupNormHook, _Stale
    from .sharding import GATHER_HOOK, SPLIT_HOOK, GatherHook, SplitHook

    decoder = getattr(vae, "decoder", None)
    if decoder is None or any(isinstance(m, torch.nn.Conv3d) for m in decoder.modules()):
        raise ParallelError(f"parallel.vae: {type(vae).__name__} is not supported yet (image VAEs with a 2-D "
                            "decoder only: AutoencoderKL); set vae=False for this pipeline")
    if dist.get_world_size() == 1:
        return
    groups, state = _WorldGroups(), LoopState()
    vae_stats = stats.setdefault("vae", {})
    ex = _Stale(groups, state, "sync", 0, vae_stats)
    for name, m in decoder.named_modules():
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1:
            ledger.add_hook(m, HaloConvHook(ex), CONV_HOOK)
        elif isinstance(m, torch.nn.GroupNorm):
            ledger.add_hook(m, PatchGroupNormHook(ex, "sync_gn"), NORM_HOOK)
        elif hasattr(m, "processor") and hasattr(m, "set_processor"):
            ledger.set_processor(m, attention.wrap(attention.DisplacedKV, m.processor, f"vae.{name}", groups,
                                                   state, None, vae_stats, "sync", 0, 1.0))

    degree = groups.inner_degree

    class _RowCheck(ModelHook):
        def pre_forward(self, module, sample, *args, **kwargs):
            if sample.shape[-2] % degree:
                raise ParallelError(f"parallel.vae: latent height {sample.shape[-2]} is not a multiple of the "
                                    f"{degree} ranks; pick a height whose latent is, or set vae=False")
            return (sample, *args), kwargs

    ledger.add_hook(decoder, SplitHook({"sample": (2, 4)}, groups, state), SPLIT_HOOK)
    ledger.add_hook(decoder, GatherHook(None, 2, groups, state, vae_stats, narrow=False), GATHER_HOOK)
    ledger.add_hook(decoder, _RowCheck(), VAE_CHECK_HOOK)
