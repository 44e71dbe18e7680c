"""Block-sparse attention forward in Triton: FlashAttention-style online softmax over a block list.

Each program computes one query block of one (batch, head): it walks the key blocks listed for
that query block (``kv_idx[b, h, m, :kv_num[b, h, m]]``), keeping a running max and denominator,
so skipped blocks cost nothing. Pad key slots carry a large negative bias. Works in fp16/bf16 on
a GPU (fp32 accumulation) and in fp32 on CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_NEG = -1.0e30


@triton.jit
def _block_sparse_fwd(
    Q, K, V, O, KV_NUM, KV_IDX, KBIAS, sm_scale,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    snb, snh, snm, sib, sih, sim, sbn,
    H, HEAD_DIM,
    BLOCK: tl.constexpr, D_PAD: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_t = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=d_ok[None, :], other=0.0)
    m_i = tl.zeros([BLOCK], dtype=tl.float32) + _NEG
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, D_PAD], dtype=tl.float32)
    n_kv = tl.load(KV_NUM + b * snb + h * snh + pid_m * snm)
    for j in range(0, n_kv):
        kb = tl.load(KV_IDX + b * sib + h * sih + pid_m * sim + j)
        offs_n = kb * BLOCK + offs_t
        k = tl.load(K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None], mask=d_ok[:, None], other=0.0)
        s = tl.dot(q, k) * sm_scale
        s += tl.load(KBIAS + b * sbn + offs_n)[None, :]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=d_ok[None, :])


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num: torch.Tensor,
                           kv_idx: torch.Tensor, key_valid: torch.Tensor, block: int, scale: float) -> torch.Tensor:
    """q, k, v: [B, H, nb*block, D]; kv_num [Bm, Hm, nb], kv_idx [Bm, Hm, nb, nb] (Bm/Hm 1 or B/H);
    key_valid: [nb*block] or [B, nb*block] bool. Returns [B, H, nb*block, D]."""
    B, H, N, D = q.shape
    nb = N // block
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(q)
    kv_num = kv_num.to(q.device, torch.int32).expand(B, H, nb)
    kv_idx = kv_idx.to(q.device, torch.int32).expand(B, H, nb, nb)
    bias = torch.where(key_valid.to(q.device), 0.0, _NEG).to(torch.float32)
    bias = bias.expand(B, N) if bias.ndim == 2 else bias[None].expand(B, N)
    d_pad = max(16, triton.next_power_of_2(D))
    _block_sparse_fwd[(nb, B * H)](
        q, k, v, o, kv_num, kv_idx, bias, float(scale),
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        *kv_num.stride(), *kv_idx.stride()[:3], bias.stride(0),
        H, D, BLOCK=block, D_PAD=d_pad,
    )
    return o
