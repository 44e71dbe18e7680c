"""Block-level sparsity patterns over a `BlockLayout`: which key blocks each query block computes.

Every static pattern is a *ranking* of key tiles for each query tile; a row keeps its
``round(density * n_video_blocks)`` best-ranked tiles, so the realised density is the configured
one for every pattern and shape (up to rounding of one block per row). Text blocks are outside
the ranking: text rows keep every block and every row keeps every text block.

- ``tile``: nearest tiles in 3-D (Chebyshev distance): a sliding tile window (STA).
- ``spatial`` / ``temporal``: the same frame(s) first / the same place in other frames first;
  ``spatial_temporal`` picks one per head by profiling (Sparse VideoGen).
- ``radial``: the spatial window shrinks exponentially with temporal distance, plus sink blocks.
- ``global_local``: a local window plus strided global tiles spread over the whole sequence.
- ``topk``: dynamic; blocks ranked by pooled q.k scores, kept until a cumulative mass.
"""

from __future__ import annotations

import functools
import math

import torch

from .layout import BlockLayout

STATIC = ("tile", "spatial", "temporal", "radial", "global_local")


class SparseMask:
    """Block mask ``allowed`` [Bm, Hm, n_blocks, n_blocks] (Bm/Hm are 1 when shared) plus derived forms."""

    def __init__(self, allowed: torch.Tensor, layout: BlockLayout):
        self.allowed = allowed
        self.layout = layout
        self._flex = {}

    @functools.cached_property
    def kv_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        return block_lists(self.allowed)

    @functools.cached_property
    def _densities(self) -> tuple[float, float]:
        # one host sync per mask, not per call: static masks are cached per shape, so their densities are read
        # once; a topk mask (new every call) pays it once per call, documented in AttentionConfig
        nv = self.layout.n_video_blocks
        return tuple(torch.stack([self.allowed[..., :nv, :nv].float().mean(), self.allowed.float().mean()]).tolist())

    def video_density(self) -> float:
        return self._densities[0]

    def density(self) -> float:
        return self._densities[1]

    def token_mask(self) -> torch.Tensor:
        """Dense [Bm, Hm, Np, Np] bool mask (block mask expanded, pad keys off): for reference backends."""
        T = self.layout.block
        m = self.allowed.repeat_interleave(T, -1).repeat_interleave(T, -2)
        return m & self.layout.valid.to(m.device)[None, None, None, :]


def block_lists(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_num [..., nb] int32, kv_idx [..., nb, nb] int32) of a [..., nb, nb] bool mask: kept blocks first,
    ascending."""
    nb = a.shape[-1]
    order = torch.arange(nb, device=a.device).expand_as(a)
    idx = torch.where(a, order, nb + order).argsort(-1).to(torch.int32)
    return a.sum(-1).to(torch.int32).contiguous(), idx.contiguous()


def _budget(layout: BlockLayout, density: float) -> int:
    return max(1, min(layout.n_video_blocks, round(density * layout.n_video_blocks)))


def _distances(layout: BlockLayout):
    c = layout.coords.to(torch.float64)
    d = (c[:, None, :] - c[None, :, :]).abs()
    return d[..., 0], torch.maximum(d[..., 1], d[..., 2]), d[..., 1] + d[..., 2]


def _score(layout: BlockLayout, kind: str, sinks: int) -> torch.Tensor:
    """Higher is kept first. Small index terms make ties deterministic."""
    df, ds, ds1 = _distances(layout)
    if kind in ("tile", "global_local"):
        s = -(torch.maximum(df, ds) + 0.01 * (df + ds1))
    elif kind == "spatial":
        s = -(df * 1e4 + ds + 0.01 * ds1)
    elif kind == "temporal":
        s = -(ds * 1e4 + 0.01 * ds1 + df)
    elif kind == "radial":
        s = -((ds + 1.0) * torch.pow(2.0, df) + 0.01 * ds1)
        if sinks:
            s[:, :sinks] = math.inf
    else:
        raise ValueError(f"unknown static pattern {kind!r}")
    n = s.shape[0]
    idx = torch.arange(n, dtype=torch.float64, device=s.device)
    return s - 1e-7 * (idx[None, :] - idx[:, None]).abs() - 1e-9 * idx[None, :]


def _keep_top(score: torch.Tensor, k: int) -> torch.Tensor:
    top = score.topk(k, dim=-1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top, True)


def video_pattern(layout: BlockLayout, kind: str, density: float, *, sinks: int = 1,
                  local_fraction: float = 0.5) -> torch.Tensor:
    """[nv, nv] bool: the kept video key tiles of each video query tile."""
    k = _budget(layout, density)
    score = _score(layout, kind, sinks)
    if kind != "global_local":
        return _keep_top(score, k)
    n = score.shape[0]
    n_local = max(1, math.ceil(k * local_fraction))
    local = _keep_top(score, n_local)  # exactly n_local per row
    n_global = k - n_local
    if n_global <= 0:
        return local
    stride = max(1, n // n_global)
    strided = (torch.arange(n, device=score.device) % stride == 0)[None, :].expand(n, n)
    # local first, then strided tiles (far before near, so the global set reaches the whole video), then the rest
    ranked = torch.where(local, math.inf, torch.where(strided, 1e6 - score, score))
    return _keep_top(ranked, k)


def with_text(video: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Embed a [..., nv, nv] video mask in the full [..., nb, nb] mask: text rows and columns all kept."""
    nv, nb = layout.n_video_blocks, layout.n_blocks
    full = torch.ones(video.shape[:-2] + (nb, nb), dtype=torch.bool, device=video.device)
    full[..., :nv, :nv] = video
    return full


@functools.lru_cache(maxsize=128)
def static_mask(layout: BlockLayout, kind: str, density: float, sinks: int, local_fraction: float) -> SparseMask:
    """Cached per (shape, pattern, density): built once, reused by every layer and step."""
    video = video_pattern(layout, kind, density, sinks=sinks, local_fraction=local_fraction)
    return SparseMask(with_text(video, layout)[None, None], layout)


@functools.lru_cache(maxsize=32)
def dense_mask(layout: BlockLayout) -> SparseMask:
    nb = layout.n_blocks
    return SparseMask(torch.ones(1, 1, nb, nb, dtype=torch.bool, device=layout.valid.device), layout)


def pooled_blocks(x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """[B, H, Np, D] tiled -> [B, H, nb, D] mean over each block's real tokens."""
    B, H, _, D = x.shape
    valid = layout.valid.to(x.dtype)[:, None]
    s = (x * valid).view(B, H, layout.n_blocks, layout.block, D).sum(3)
    return s / layout.block_count.to(x.dtype)[:, None].clamp(min=1)


def topk_mask(qb: torch.Tensor, kb: torch.Tensor, layout: BlockLayout, density: float, mass: float,
              scale: float) -> SparseMask:
    """Per batch and head: video key tiles by pooled-score softmax mass until ``mass``, at most the budget."""
    nv = layout.n_video_blocks
    qp, kp = pooled_blocks(qb.float(), layout)[:, :, :nv], pooled_blocks(kb.float(), layout)[:, :, :nv]
    probs = torch.softmax(qp @ kp.transpose(-1, -2) * scale, dim=-1)  # [B, H, nv, nv]
    probs = probs + torch.eye(nv, device=probs.device) * 2.0  # own tile always first
    sorted_p, order = probs.sort(-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass strictly before this block (diagonal counts 2+)
    keep_sorted = before < (mass + 2.0)
    keep_sorted[..., _budget(layout, density):] = False
    video = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return SparseMask(with_text(video, layout), layout)


def kept_mass(qb: torch.Tensor, kb: torch.Tensor, layout: BlockLayout, masks: list[torch.Tensor],
              rows: int, scale: float, seed: int = 0) -> list[torch.Tensor]:
    """Attention mass each [.., nb, nb] mask keeps, per head ([H]), from ``rows`` sampled video query rows.

    Exact dense softmax for the sampled rows, so it costs ``rows / N`` of a dense attention.
    """
    nv, T = layout.n_video_blocks, layout.block
    valid = layout.valid.to(qb.device)
    cand = torch.nonzero(valid[: nv * T]).flatten()
    g = torch.Generator().manual_seed(seed)  # a CPU generator: the same rows on every device
    # one small host-to-device copy, once per site and pipeline call (profiling), not per attention call
    pick = cand[torch.randperm(len(cand), generator=g)[:rows].to(cand.device)]
    s = (qb[:, :, pick].float() @ kb.float().transpose(-1, -2)) * scale  # [B, H, r, Np]
    s = s.masked_fill(~valid, float("-inf"))
    p = torch.softmax(s, -1)
    out = []
    for m in masks:
        rows_mask = m[..., pick // T, :].repeat_interleave(T, -1).to(p.dtype)  # [Bm, Hm, r, Np]
        out.append((p * rows_mask).sum(-1).mean(dim=(0, 2)))
    return out
