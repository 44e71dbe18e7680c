"""Displaced patch parallelism (DistriFusion) for UNets: row patches, conv halos, GroupNorm, K/V.

The latent is cut into bands of rows, one per rank of the inner group. Every layer that looks
across rows gets what it needs from the neighbours:

- a k x k convolution takes ``k // 2`` halo rows from the patches above and below;
- GroupNorm needs the statistics of the whole image;
- self-attention needs every patch's keys and values (`attention.DisplacedKV`).

In ``sync`` mode (and the first ``warmup_steps``) all of these are exchanged synchronously, which
is exact. Otherwise each exchange is issued asynchronously and its result used one step later
(activations change little between steps), so communication overlaps computation. GroupNorm
then uses the previous step's global statistics, corrected by this patch's fresh ones
(``corrected_async_gn``), uncorrected (``stale_gn``), or exchanges them synchronously
(``sync_gn``: cheap, only 2 numbers per group).

DiTs (Flux) get row patches from the token sharding plan (image tokens are row-major) and need
only the K/V part.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.hooks import ModelHook

from .context import Groups, LoopState
from .runtime import ParallelError, _guard

CONV_HOOK, NORM_HOOK, CHECK_HOOK = "accel.parallel.halo", "accel.parallel.groupnorm", "accel.parallel.patch_check"


class _Stale:
    """Per-layer exchange state, keyed by the forward's index within the step (CFG branches)."""

    def __init__(self, groups: Groups, state: LoopState, mode: str, warmup: int, stats: dict):
        self.groups, self.state, self.mode, self.warmup, self.stats = groups, state, mode, warmup, stats
        self.store: dict = {}
        state.on_call_start(self.store.clear)

    def sync_step(self) -> bool:
        return self.mode == "sync" or self.state.step < self.warmup

    def _wait(self, work):
        if work is not None:
            t0 = time.perf_counter()
            _guard(work.wait, "displaced patch exchange")
            self.stats["wait_s"] = self.stats.get("wait_s", 0.0) + time.perf_counter() - t0

    def count(self, key, t, factor):
        self.stats[key] = self.stats.get(key, 0) + int(t.numel() * t.element_size() * factor)


class HaloConvHook(ModelHook):
    """A k x k (or t x k x k) convolution on a band of rows, with ``k // 2`` halo rows from the neighbours.

    Works for ``Conv2d`` on (B, C, H, W) and ``Conv3d`` on (B, C, T, H, W): rows are always dim -2.
    """

    def __init__(self, ex: _Stale):
        super().__init__()
        self.ex = ex

    def new_forward(self, module, x, *args, **kwargs):
        ph = module.padding[-2] if isinstance(module.padding, tuple) else 0
        if x.ndim not in (4, 5) or ph == 0:
            return self.fn_ref.original_forward(x, *args, **kwargs)
        padding = list(module.padding)
        padding[-2] = 0
        conv = F.conv2d if x.ndim == 4 else F.conv3d
        return conv(self.extend(x, ph), module.weight, module.bias, module.stride, tuple(padding),
                    module.dilation, module.groups)

    def extend(self, x: torch.Tensor, ph: int) -> torch.Tensor:
        """``x`` with ``ph`` rows of the band above and below (zeros at the image's edges)."""
        ex, g = self.ex, self.ex.groups
        p, r = g.inner_degree, g.inner_index
        edges = torch.stack([x.narrow(-2, 0, ph), x.narrow(-2, x.shape[-2] - ph, ph)]).contiguous()
        key = (id(self), ex.state.call_in_step)
        if ex.sync_step() or key not in ex.store:
            parts = [torch.empty_like(edges) for _ in range(p)]
            _guard(lambda: dist.all_gather(parts, edges, group=g.inner_group), "halo all-gather")
            ex.store[key] = (None, parts)
        else:
            work, parts = ex.store[key]
            ex._wait(work)
            fresh = [torch.empty_like(edges) for _ in range(p)]
            ex.store[key] = (_guard(lambda: dist.all_gather(fresh, edges, group=g.inner_group, async_op=True),
                                    "halo all-gather"), fresh)
        ex.count("halo_bytes", edges, p - 1)
        zeros = torch.zeros_like(edges[0])
        above = parts[r - 1][1] if r > 0 else zeros
        below = parts[r + 1][0] if r < p - 1 else zeros
        return torch.cat([above, x, below], dim=-2)


class PatchGroupNormHook(ModelHook):
    def __init__(self, ex: _Stale, gn_mode: str):
        super().__init__()
        self.ex, self.gn_mode = ex, gn_mode

    def new_forward(self, module, x):
        ex, g = self.ex, self.ex.groups
        p = g.inner_degree
        b, c = x.shape[:2]
        xs = x.reshape(b, module.num_groups, -1).float()
        key = (id(self), ex.state.call_in_step)
        if ex.sync_step() or self.gn_mode == "sync_gn" or key not in ex.store:
            mean = xs.mean(-1)
            _guard(lambda: dist.all_reduce(mean, group=g.inner_group), "GroupNorm all-reduce")
            mean = mean / p
            var = ((xs - mean[..., None]) ** 2).mean(-1)
            _guard(lambda: dist.all_reduce(var, group=g.inner_group), "GroupNorm all-reduce")
            var = var / p
            ex.count("norm_bytes", mean, 2 * 2 * (p - 1) / p)
            local = torch.stack([xs.mean(-1), (xs * xs).mean(-1)])
            ex.store[key] = (None, torch.stack([mean, var + mean * mean]), local)
        else:
            work, stale_global, stale_local = ex.store[key]
            ex._wait(work)
            if work is not None:
                stale_global = stale_global / p
            local = torch.stack([xs.mean(-1), (xs * xs).mean(-1)])
            est = stale_global + (local - stale_local) / p if self.gn_mode == "corrected_async_gn" else stale_global
            mean = est[0]
            var = est[1] - mean * mean
            var = torch.where(var > 0, var, ((xs - local[0][..., None]) ** 2).mean(-1))
            buf = local.clone()
            ex.store[key] = (_guard(lambda: dist.all_reduce(buf, group=g.inner_group, async_op=True),
                                    "GroupNorm all-reduce"), buf, local)
            ex.count("norm_bytes", buf, 2 * (p - 1) / p)
        y = (xs - mean[..., None]) * torch.rsqrt(var[..., None] + module.eps)
        y = y.reshape(x.shape).to(x.dtype)
        if module.affine:
            shape = (1, c) + (1,) * (x.ndim - 2)
            y = y * module.weight.reshape(shape) + module.bias.reshape(shape)
        return y


class RowCheckHook(ModelHook):
    """Refuse, before any work, latents whose rows cannot be cut evenly at every UNet level."""

    def __init__(self, degree: int, factor: int):
        super().__init__()
        self.degree, self.factor = degree, factor

    def pre_forward(self, module, *args, **kwargs):
        from ..families import bind_inputs

        x = bind_inputs(module, args, kwargs)["sample"]
        need = self.degree * self.factor
        if x.shape[-2] % need:
            raise ParallelError(
                f"patch parallel: latent height {x.shape[-2]} must be a multiple of {need} (patch={self.degree} "
                f"x {self.factor}, the UNet's downsampling); pick an image height that is a multiple of "
                f"{need * 8} pixels or a smaller patch degree")
        return args, kwargs


def apply_unet(ledger, unet, groups: Groups, state: LoopState, cfg, stats: dict, processors) -> None:
    from .sharding import GATHER_HOOK, SPLIT_HOOK, GatherHook, SplitHook

    ex = _Stale(groups, state, "sync" if cfg.patch_mode == "sync" else "async", cfg.warmup_steps, stats)
    for _, m in unet.named_modules():
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1:
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise ParallelError(f"patch parallel: {type(m).__name__} with padding {m.padding!r}/"
                                    f"{m.padding_mode} is not supported")
            ledger.add_hook(m, HaloConvHook(ex), CONV_HOOK)
        elif isinstance(m, torch.nn.GroupNorm):
            ledger.add_hook(m, PatchGroupNormHook(ex, cfg.gn_mode), NORM_HOOK)
    for site in processors:
        ledger.set_processor(site.module, site.processor)
    ledger.add_hook(unet, SplitHook({"sample": (2, 4)}, groups, state), SPLIT_HOOK)
    ledger.add_hook(unet, GatherHook(None, 2, groups, state, stats, narrow=False), GATHER_HOOK)
    # Registered last, so it runs first: the check happens before the split.
    ledger.add_hook(unet, RowCheckHook(groups.inner_degree, 2 ** getattr(unet, "num_upsamplers", 0)), CHECK_HOOK)
