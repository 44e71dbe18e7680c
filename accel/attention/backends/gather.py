"""``gather``: block-sparse attention as batched dense matmuls over gathered key blocks (the fast path on CPU).

Each query block's kept key/value blocks are copied together and two batched BLAS matmuls and a softmax
run over them: no per-block kernel, so it keeps the efficiency of large GEMMs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..patterns import SparseMask
from . import Backend

# floats of scores per matmul chunk (64 MB; the workspace holds ~4x that, kept between calls). Measured at
# 16k tokens on CPU: 1M floats per chunk 0.27x dense, 4M 0.77x, 16M 1.20x at density 0.5 (block 128): large
# batched GEMMs matter more than cache residency.
GATHER_CHUNK = 1 << 24
_workspaces: dict = {}


def _workspace(n: int, dtype, device) -> torch.Tensor:
    """A flat buffer of at least ``n`` elements, kept between calls (one per dtype and device)."""
    key = (dtype, str(device))
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < n:
        buf = _workspaces[key] = torch.empty(n, dtype=dtype, device=device)
    return buf


def run(q, k, v, mask: SparseMask, scale, chunk_floats: int = GATHER_CHUNK, **_):
    """Block-sparse attention as batched dense matmuls over gathered key blocks (exact softmax per row).

    Query blocks that keep every key block (text rows) run one SDPA over all keys; the others are
    processed a few blocks at a time: their kept K/V blocks (index lists padded to the longest row,
    the padding slots masked) are copied into [rows, kept*block, D] tensors with `index_select`.
    """
    lay = mask.layout
    B, H, Np, D = q.shape
    T, nb = lay.block, lay.n_blocks
    BH = B * H
    num, idx = mask.kv_indices
    shared = num.shape[0] == num.shape[1] == 1  # one mask for every batch and head
    num = num.to(q.device).expand(B, H, nb).reshape(BH, nb)
    idx = idx.to(q.device).expand(B, H, nb, nb).reshape(BH, nb, nb).long()
    valid = lay.valid.to(q.device)
    has_pad = not bool(valid.all())
    out = torch.empty_like(q).view(BH, nb, T, D)
    qv = q.reshape(BH, nb, T, D)
    full = (num == nb).all(0)  # query blocks that attend to every block, for every batch and head
    if bool(full.any()):
        rows = torch.nonzero(full).flatten()
        key_mask = valid.view(1, 1, 1, Np) if has_pad else None
        out[:, rows] = F.scaled_dot_product_attention(
            qv[:, rows].reshape(BH, 1, -1, D), k.reshape(BH, 1, Np, D), v.reshape(BH, 1, Np, D),
            attn_mask=key_mask, scale=scale).view(BH, len(rows), T, D)
    rest = torch.nonzero(~full).flatten()
    if not len(rest):
        return out.view(B, H, Np, D)
    kk = int(num[:, rest].max())
    lists = idx[:, rest, :kk]  # kept blocks first; slots past a row's count hold other blocks, masked below
    ragged = bool((num[:, rest] < kk).any())
    slot_ok = torch.arange(kk, device=q.device) < num[:, rest, None]  # [BH, r, kk]
    valid_b = valid.view(nb, T)
    if shared:
        kf, vf = k.reshape(BH, nb, T * D), v.reshape(BH, nb, T * D)
    else:  # per batch/head lists: index rows of the flattened [BH * nb] blocks
        kf, vf = k.reshape(BH * nb, T * D), v.reshape(BH * nb, T * D)
        offset = (torch.arange(BH, device=q.device) * nb)[:, None, None]
    step = max(1, min(len(rest), chunk_floats // (BH * T * kk * T)))
    n_kv, n_s = BH * step * kk * T * D, BH * step * T * kk * T
    ws = _workspace(2 * n_kv + 2 * n_s + BH * step * T * D, q.dtype, q.device)
    for s in range(0, len(rest), step):
        rows, li = rest[s:s + step], lists[:, s:s + step]  # [c], [BH, c, kk]
        c = len(rows)
        kg, vg = (ws[i * n_kv:i * n_kv + BH * c * kk * T * D].view(-1, T * D) for i in (0, 1))
        scores, probs = (ws[2 * n_kv + i * n_s:2 * n_kv + i * n_s + BH * c * T * kk * T].view(BH * c, T, kk * T)
                         for i in (0, 1))
        o = ws[2 * n_kv + 2 * n_s:2 * n_kv + 2 * n_s + BH * c * T * D].view(BH * c, T, D)
        flat = li[0].flatten() if shared else (li + offset).flatten()
        # into reused buffers: fresh multi-MB tensors per chunk cost more in page faults than the copy itself
        for src, dst in ((kf, kg), (vf, vg)):
            torch.index_select(src, int(shared), flat, out=dst.view(BH, -1, T * D) if shared else dst)
        kg, vg = kg.view(BH * c, kk * T, D), vg.view(BH * c, kk * T, D)
        qc = qv[:, rows].reshape(BH * c, T, D)
        torch.baddbmm(scores, qc, kg.transpose(1, 2), beta=0.0, alpha=scale, out=scores)
        if has_pad or ragged:
            keep = (valid_b[li] & slot_ok[:, s:s + step, :, None]).reshape(BH * c, 1, kk * T)
            scores.masked_fill_(~keep, float("-inf"))
        torch.ops.aten._softmax.out(scores, -1, False, out=probs)
        torch.bmm(probs, vg, out=o)
        out[:, rows] = o.view(BH, c, T, D)
    return out.view(B, H, Np, D)


BACKEND = Backend("gather", run)
