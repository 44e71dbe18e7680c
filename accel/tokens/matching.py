"""Which tokens become one: bipartite soft matching (ToMe) and window pooling (ToDo), as index tensors.

Both build a `Merge`: ``slot[b, i]`` is the row of the reduced sequence that token ``i`` joins.
Merging is one ``index_add_``/``scatter_add_`` plus a multiply by the precomputed ``1 / count``;
unmerging is one ``index_select``/``gather``. Rows are ordered by their representative token's
position (``keep``), so the reduced sequence keeps raster order, and rotary tables or masks are
reduced by selecting ``keep``: a merged token attends at its destination's position.

``slot`` is shared by the whole batch (shape ``(1, N)``) when positions must be gathered (DiT
rotary tables are one table for the batch), else per sample (``(B, N)``, as tomesd).
Odd grids: windows at the right/bottom/last-frame edges are smaller, never skipped.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass
class Merge:
    slot: torch.Tensor  # (Bm, N) long: reduced row of each token; Bm is 1 (shared) or B
    keep: torch.Tensor  # (Bm, n_out) long: original position of each reduced row's representative
    inv_count: torch.Tensor  # (Bm, n_out, 1): 1 / tokens in the row, in the model dtype
    n_in: int
    n_out: int

    @property
    def shared(self) -> bool:
        return self.slot.shape[0] == 1

    @property
    def removed(self) -> int:
        return self.n_in - self.n_out

    def merge(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """(…, N, …) -> (…, n_out, …) along ``dim``: the mean of each row's tokens."""
        if dim != 1:
            return self.merge(x.movedim(dim, 1)).movedim(1, dim)
        shape = (x.shape[0], self.n_out, *x.shape[2:])
        inv = self.inv_count.to(x.dtype).reshape(self.inv_count.shape[0], self.n_out, *([1] * (x.ndim - 2)))
        if self.shared:
            return x.new_zeros(shape).index_add_(1, self.slot[0], x) * inv
        idx = self.slot.reshape(*self.slot.shape, *([1] * (x.ndim - 2))).expand_as(x)
        return x.new_zeros(shape).scatter_add_(1, idx, x) * inv

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, n_out, …) -> (B, N, …): every token takes its row's value."""
        if self.shared:
            return y.index_select(1, self.slot[0])
        idx = self.slot.reshape(*self.slot.shape, *([1] * (y.ndim - 2))).expand(-1, -1, *y.shape[2:])
        return y.gather(1, idx)


class Windows:
    """Window ids of a (F, H, W) token grid for windows of (st, sy, sx); edge windows are smaller.

    Shape-only: built on ``device`` once per (grid, window, device) by `TokenState` and reused by
    every merge of that shape, with the per-window tables the matchers need.
    """

    def __init__(self, grid: tuple[int, int, int], window: tuple[int, int, int], device):
        f, h, w = grid
        st, sy, sx = (max(1, min(a, b)) for a, b in zip(window, grid, strict=True))
        self.grid, self.window = (f, h, w), (st, sy, sx)
        self.counts_axis = (-(-f // st), -(-h // sy), -(-w // sx))
        ff, hh, ww = torch.meshgrid(*(torch.arange(a, device=device) for a in (f, h, w)), indexing="ij")
        nf, nh, nw = self.counts_axis
        wid = (ff // st) * (nh * nw) + (hh // sy) * nw + (ww // sx)
        self.window_id = wid.reshape(-1)  # (N,)
        self.offsets = tuple(t.reshape(-1) for t in (ff % st, hh % sy, ww % sx))

        # size of each window along each axis (edge windows are cut by the grid)
        def sizes(n, s):
            return torch.clamp(n - torch.arange(-(-n // s), device=device) * s, max=s)

        sf, sh, sw = sizes(f, st), sizes(h, sy), sizes(w, sx)
        self.sizes = tuple(t.reshape(-1) for t in torch.meshgrid(sf, sh, sw, indexing="ij"))
        self.n_windows = nf * nh * nw
        self.n_tokens = f * h * w

    @functools.cached_property
    def positions(self) -> torch.Tensor:
        """(N,) long: 0..N-1."""
        return torch.arange(self.n_tokens, device=self.window_id.device)

    @functools.cached_property
    def token_count(self) -> torch.Tensor:
        """(n_windows,) float32: tokens in each window."""
        dev = self.window_id.device
        return torch.zeros(self.n_windows, device=dev).index_add_(
            0, self.window_id, torch.ones(self.n_tokens, device=dev))

    @functools.cached_property
    def first(self) -> torch.Tensor:
        """(n_windows,) long: the first (lowest) position of each window."""
        return torch.full((self.n_windows,), self.n_tokens, device=self.window_id.device, dtype=torch.long
                          ).scatter_reduce(0, self.window_id, self.positions, reduce="amin")

    def destinations(self, generator: torch.Generator | None) -> torch.Tensor:
        """Bool (N,): one destination per window, at a random (or the first) position inside it."""
        if generator is None:
            picks = [torch.zeros_like(s) for s in self.sizes]
        else:
            # Drawn on the host (the generator is a CPU one): the same picks on every device. Pinned and
            # non-blocking, the copy does not wait for the device queue as a plain host-to-device copy does.
            u = torch.rand(3, self.n_windows, generator=generator)
            dev = self.window_id.device
            u = u.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else u.to(dev)
            picks = [(u[i] * s).long() for i, s in enumerate(self.sizes)]
        wid = self.window_id
        off = self.offsets
        return (off[0] == picks[0][wid]) & (off[1] == picks[1][wid]) & (off[2] == picks[2][wid])


def _true_first(mask: torch.Tensor) -> torch.Tensor:
    """Positions along the last dim of ``mask`` (..., N): the True ones first, then the False ones, each part
    ascending. With the count of True entries known on the host, the first part is what ``mask.nonzero()`` gives,
    without its host sync (a stable sort)."""
    return torch.argsort((~mask).to(torch.uint8), dim=-1, stable=True)


def _from_groups(rep: torch.Tensor, kept: torch.Tensor, n_out: int, dtype) -> Merge:
    """Merge from ``rep[b, i]`` (the position whose row token i joins) and ``kept[b, i]`` (i heads a
    row; ``n_out`` True entries in every row)."""
    bm, n = rep.shape
    row_of = kept.long().cumsum(1) - 1  # row of each kept position
    slot = row_of.gather(1, rep)
    keep = _true_first(kept).narrow(-1, 0, n_out)
    count = torch.zeros(bm, n_out, device=rep.device, dtype=torch.float32).scatter_add_(
        1, slot, torch.ones(bm, n, device=rep.device))
    return Merge(slot, keep, (1.0 / count).unsqueeze(-1).to(dtype), n, n_out)


def bipartite(x: torch.Tensor, windows: Windows, r: int, shared: bool,
              generator: torch.Generator | None) -> Merge:
    """ToMe for images and video: the ``r`` source tokens most similar to some destination merge into it.

    ``x`` (B, N, C) are the features matched (cosine similarity, computed in x's dtype). One
    destination per window; sources match against every destination (bipartite, global).
    """
    b, n, _ = x.shape
    is_dst = windows.destinations(generator)
    # Exactly one destination per window: the counts are known on the host, so both position lists come
    # from one stable sort, without nonzero()'s sync.
    order_dst = _true_first(is_dst)
    dst_pos, src_pos = order_dst[:windows.n_windows], order_dst[windows.n_windows:]
    r = max(0, min(r, n - windows.n_windows))
    metric = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    scores = metric.index_select(1, src_pos) @ metric.index_select(1, dst_pos).transpose(1, 2)
    if shared:
        scores = scores.float().sum(0, keepdim=True)
    best, best_dst = scores.max(dim=-1)  # (Bm, n_src)
    order = best.argsort(dim=-1, descending=True)
    merged_src = order[:, :r]  # src-local indices
    bm = scores.shape[0]
    rep = windows.positions.expand(bm, n).clone()
    merged_pos = src_pos[merged_src]  # (Bm, r)
    rep.scatter_(1, merged_pos, dst_pos[best_dst.gather(1, merged_src)])
    kept = torch.ones(bm, n, dtype=torch.bool, device=x.device)
    kept.scatter_(1, merged_pos, False)
    return _from_groups(rep, kept, n - r, x.dtype)


def window_pool(x: torch.Tensor, windows: Windows, r: int) -> Merge:
    """ToDo, adaptively: pool whole windows, the most uniform first, until ``r`` tokens are removed.

    A window of k tokens pooled to one removes k - 1; uniformity is the mean cosine similarity of
    a window's tokens to their mean (over the batch, so the result is shared).
    """
    b, n, _ = x.shape
    wid = windows.window_id
    metric = (x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)).float()
    sums = metric.new_zeros(b, windows.n_windows, metric.shape[-1]).index_add_(1, wid, metric)
    size = windows.token_count
    mean = sums / size[None, :, None]
    uniform = (metric * mean.index_select(1, wid)).sum(-1)  # (B, N): cos to the window mean (scaled)
    score = torch.zeros(windows.n_windows, device=x.device).index_add_(0, wid, uniform.sum(0)) / size
    score = torch.where(size > 1, score, torch.full_like(score, -float("inf")))
    order = score.argsort(descending=True)
    gain = (size - 1)[order].cumsum(0)
    taken = gain <= r  # a prefix of `order`: gain only grows
    # Documented host sync, one per merge built (once per step and shape): how many tokens are
    # removed depends on the data and sets the reduced sequence's length, a shape.
    removed = int(torch.where(taken, gain, 0).max())
    pooled = torch.zeros(windows.n_windows, dtype=torch.bool, device=x.device).scatter_(0, order, taken)
    # each pooled window is represented by its first token (lowest position)
    first = windows.first
    pos = windows.positions
    in_pooled = pooled[wid]
    rep = torch.where(in_pooled, first[wid], pos)[None]
    kept = (~in_pooled | (pos == first[wid]))[None]
    return _from_groups(rep, kept, n - removed, x.dtype)


def top_changed(x: torch.Tensor, previous: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted positions of the ``k`` tokens whose relative change since ``previous`` is largest (batch summed)."""
    change = (x - previous).float().norm(dim=-1) / previous.float().norm(dim=-1).clamp_min(1e-6)
    return change.sum(0).topk(k).indices.sort().values
