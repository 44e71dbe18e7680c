"""Clip parallelism for video DiTs (Video-Infinity): each rank denoises one clip of the frames.

Every rank runs the whole pipeline with the same seed, so every rank holds the same full latents
and steps them with the same scheduler: one shared noise schedule, and the clips join because
they are slices of one video, not separate videos. Inside the denoiser the video tokens (frame
major in Wan, CogVideoX and LTX) are cut into contiguous clips of whole frames, one per rank of
the inner group, right after the patch embedding, and gathered again before the output
projection (the token sharding plan of `sharding.PLANS`). The patch embeddings of these
families have no temporal overlap (Wan's Conv3d has a temporal kernel of ``patch_size[0]`` with
the same stride, CogVideoX's and LTX's act on each patch), so no halo is needed; they run before
the split. Rotary embeddings are computed for the whole video and split the same way, so every
clip's tokens carry their global frame positions.

Self-attention (joint attention for CogVideoX) is where the clips meet, through **dual-scope
attention**: each rank's queries attend to

- its own clip's keys and values (fresh, exact within the clip);
- local scope: the keys/values of ``clip_neighbour_frames`` frames at each edge of the adjacent
  clips (point-to-point with the neighbour ranks; at most a whole clip, which for 2 ranks is
  full attention);
- global scope: ``clip_global_tokens`` tokens of every other clip, evenly strided over it
  (all-gathered), as plain keys/values. (Weighting each by the tokens it stands for, as
  proportional attention does, measured worse: a few strided samples are too noisy a summary.)

With 0 and 0 the clips are independent: each rank's result equals a single-process run of its
clip alone (same latents slice). Cross-attention to the text needs nothing. Clip parallelism
composes with ``cfg=2``; it cannot be combined with sequence or patch parallelism (they split the
same token axis).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from diffusers.hooks import ModelHook

from ..config_base import ConfigError
from ..sdpa_route import SDPA
from .attention import ParallelProcessor, wrap
from .runtime import ParallelError, _guard

CLIP_FAMILIES = ("wan", "cogvideox", "ltx")
CHECK_HOOK = "accel.parallel.clip_check"


@dataclass
class ClipGeometry:
    """This call's token grid, read before the split by `FrameCheckHook`."""

    frames: int = 0  # token frames of the whole video (latent frames after temporal patching)
    frame_tokens: int = 0  # tokens per frame


def check_clip(family, cfg) -> None:
    """ConfigError if clip parallelism cannot run on this denoiser family."""
    if family.name not in CLIP_FAMILIES:
        kind = "a video model" if family.video else "an image model"
        raise ConfigError(f"parallel.clip: {cfg.clip} is not available for {family.name} ({kind}); clip "
                          f"parallelism splits video frames and supports {', '.join(CLIP_FAMILIES)}. "
                          + ("Use sequence= for other DiTs" if family.kind == "dit" else "Use patch= for UNets"))


class FrameCheckHook(ModelHook):
    """Refuse, before the split, a video whose frames cannot be cut into equal clips; record the grid."""

    def __init__(self, adapter, degree: int, geometry: ClipGeometry, temporal_factor: int | None):
        super().__init__()
        self.adapter, self.degree, self.geometry, self.temporal_factor = adapter, degree, geometry, temporal_factor

    def pre_forward(self, module, *args, **kwargs):
        from ..families import bind_inputs

        f, h, w = self.adapter.grid(bind_inputs(module, args, kwargs))
        p = self.degree
        if f % p:
            pt = _temporal_patch(module.config)
            lo, hi = max(p, f - f % p) * pt, (f - f % p + p) * pt
            hint = ""
            if self.temporal_factor:  # latent frames -> num_frames through the VAE's temporal compression
                hint = (f" (num_frames={(lo - 1) * self.temporal_factor + 1} or "
                        f"{(hi - 1) * self.temporal_factor + 1} with this pipeline)")
            frames = f"{f} latent frames" if pt == 1 else f"{f} frames of tokens (latent frames / {pt})"
            raise ParallelError(
                f"parallel.clip: the video has {frames}, which do not split into {p} equal clips; use "
                f"{lo} or {hi} latent frames{hint}, or a clip degree that divides {f}")
        self.geometry.frames, self.geometry.frame_tokens = f, h * w
        return args, kwargs


class DualScope(ParallelProcessor):
    """Local clip attention plus neighbour frames' and strided global K/V from the other clips."""

    def __init__(self, original, site, groups, state, text_pos, stats, geometry: ClipGeometry,
                 neighbour_frames: int, global_tokens: int):
        super().__init__(original, site, groups, state, text_pos, stats)
        self.geometry, self.neighbour_frames, self.global_tokens = geometry, neighbour_frames, global_tokens

    def attend(self, q, k, v, attn_mask=None, **kw):
        if not (self.neighbour_frames or self.global_tokens):
            return SDPA(q, k, v, attn_mask=attn_mask, **kw)  # independent clips: nothing to exchange
        if attn_mask is not None:
            raise NotImplementedError(f"{self.site}: clip parallel attention with a mask is not supported; "
                                      "set clip_neighbour_frames=0 and clip_global_tokens=0 for this model")
        lay = self.layout(q)
        geo = self.geometry
        if lay.n != geo.frames // self.groups.inner_degree * geo.frame_tokens:
            raise ParallelError(f"{self.site}: {lay.n} video tokens reach attention, not the clip's "
                                f"{geo.frames // self.groups.inner_degree} frames x {geo.frame_tokens}; another "
                                "technique changes the token count (token merging?): turn it off with clip parallelism")
        kv = torch.stack([k[:, :, lay.image], v[:, :, lay.image]])  # (2, B, H, n, D): my clip's keys/values
        extra = self._neighbours(kv) if self.neighbour_frames else []
        if self.global_tokens:
            extra += self._global(kv)
        if not extra:
            return SDPA(q, k, v, **kw)
        more = torch.cat(extra, dim=3).to(k.dtype)
        return SDPA(q, torch.cat([k, more[0]], dim=2), torch.cat([v, more[1]], dim=2), **kw)

    def _neighbours(self, kv):
        """The edge frames of the clips before and after mine (point-to-point with those ranks)."""
        g, p, r = self.groups.inner_group, self.groups.inner_degree, self.groups.inner_index
        per_clip = self.geometry.frames // p
        m = min(self.neighbour_frames, per_clip) * self.geometry.frame_tokens
        first, last = kv[:, :, :, :m].contiguous(), kv[:, :, :, -m:].contiguous()
        ops, got = [], []
        if r > 0:  # my first frames are the previous clip's right context; its last frames my left one
            left = torch.empty_like(last)
            ops += [dist.P2POp(dist.isend, first, dist.get_global_rank(g, r - 1), g),
                    dist.P2POp(dist.irecv, left, dist.get_global_rank(g, r - 1), g)]
            got.append(left)
        if r < p - 1:
            right = torch.empty_like(first)
            ops += [dist.P2POp(dist.isend, last, dist.get_global_rank(g, r + 1), g),
                    dist.P2POp(dist.irecv, right, dist.get_global_rank(g, r + 1), g)]
            got.append(right)
        if ops:
            works = _guard(lambda: dist.batch_isend_irecv(ops), "clip neighbour exchange")
            for w in works:
                _guard(w.wait, "clip neighbour exchange")
            self._count("clip_kv_bytes", first, len(got))
        return got

    def _global(self, kv):
        """Evenly strided tokens of every other clip (one all-gather)."""
        g, p, r = self.groups.inner_group, self.groups.inner_degree, self.groups.inner_index
        n = kv.shape[3]
        index = _strided_index(n, min(self.global_tokens, n), kv.device)
        mine = kv.index_select(3, index).contiguous()
        parts = [torch.empty_like(mine) for _ in range(p)]
        _guard(lambda: dist.all_gather(parts, mine, group=g), "clip global-token all-gather")
        self._count("clip_kv_bytes", mine, p - 1)
        return [x for i, x in enumerate(parts) if i != r]


@functools.lru_cache(maxsize=64)
def _strided_index(n: int, k: int, device: torch.device) -> torch.Tensor:
    """``k`` evenly strided token indices of ``n``, moved to ``device`` once per shape, not copied there per call
    (computed on the host: the same indices on every device)."""
    return torch.linspace(0, n - 1, k).round().long().unique().to(device)


def _temporal_patch(config) -> int:
    """Latent frames per token frame: Wan's ``patch_size[0]``, CogVideoX 1.5's / LTX's ``patch_size_t``."""
    pt = getattr(config, "patch_size_t", None)
    if pt is None and isinstance(getattr(config, "patch_size", None), (tuple, list)):
        pt = config.patch_size[0]
    return int(pt or 1)


def _temporal_factor(pipe) -> int | None:
    for name in ("vae_scale_factor_temporal", "vae_temporal_compression_ratio"):
        value = getattr(pipe, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def apply_clip(ledger, pipe, adapter, groups, state, cfg, stats: dict) -> None:
    """Split ``adapter``'s denoiser into frame clips across the inner group, with dual-scope attention."""
    from .sharding import PLANS, apply_plan

    plan = PLANS[adapter.family.name]
    apply_plan(ledger, adapter.module, plan, groups, state, stats)
    geometry = ClipGeometry()
    for site in adapter.attention():
        if site.role not in ("self", "joint"):
            continue  # cross-attention: local queries against the whole text
        ledger.set_processor(site.module, wrap(DualScope, site.module.processor, site.name, groups, state,
                                               plan["text"], stats, geometry, cfg.clip_neighbour_frames,
                                               cfg.clip_global_tokens))
    factor = None if isinstance(pipe, torch.nn.Module) else _temporal_factor(pipe)
    # Registered after the plan's hooks, so it runs before the split of hidden_states.
    ledger.add_hook(adapter.module, FrameCheckHook(adapter, groups.inner_degree, geometry, factor), CHECK_HOOK)
