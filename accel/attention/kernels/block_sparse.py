"""Block-sparse attention forward in Triton: FlashAttention-style online softmax over a block list.

Each program computes ``BLOCK_M`` query rows of one mask row (a query block of ``MASK_BLOCK``
tokens) of one (batch, head): it walks the key blocks listed for that row
(``kv_idx[b, h, row, :kv_num[b, h, row]]``) in steps of ``BLOCK_N`` keys, keeping a running max
and denominator in base 2 (the softmax scale is folded into ``log2(e)``), so skipped blocks cost
nothing. A key block's pad slots sit at its end (`layout.BlockLayout`): a block with fewer than
``MASK_BLOCK`` real keys masks its tail, the others pay no masking. Works in fp16/bf16 on a GPU
(fp32 accumulation) and in fp32 on CPU under ``TRITON_INTERPRET=1``.

Launch settings: `config_for` gives the measured default for the GPU (BENCHMARKS.md, "Sparse
attention" / "On the GPU"); ``ACCEL_TRITON_AUTOTUNE=1`` times every candidate of `configs` on the first
call of each head size, block size and dtype instead (triton.autotune), which costs seconds once.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _online_step(q, kt, vt, m_i, l_i, acc, qk_scale, count, first, offs_n, MASK_BLOCK: tl.constexpr):
    """One key tile of the online softmax (base 2): returns the new running max, denominator and accumulator."""
    s = tl.dot(q, kt)
    if count < MASK_BLOCK:  # the block's tail is padding
        s = tl.where((first + offs_n)[None, :] < count, s, -1.0e30)
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    acc = tl.dot(p.to(vt.dtype), vt, acc * alpha[:, None])
    return m_new, l_i * alpha + tl.sum(p, 1), acc


@triton.jit
def _block_sparse_fwd(
    Q, K, V, O, KV_NUM, KV_IDX, KEY_COUNT, SLOT_TOKEN, qk_scale,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    snb, snh, snm, sib, sih, sim,
    H, N_TOKENS,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    MASK_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GATHER_Q: tl.constexpr, GATHER_KV: tl.constexpr,
):
    """GATHER_Q: q and o are in the model's token order (rows read and written through SLOT_TOKEN, the token
    of each tiled slot; pads hold N_TOKENS and are not written); GATHER_KV: k and v too. Else tiled order."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    row = (pid_m * BLOCK_M) // MASK_BLOCK
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    if GATHER_Q:
        q_tok = tl.load(SLOT_TOKEN + offs_m)
        q_rows = tl.minimum(q_tok, N_TOKENS - 1)
    else:
        q_rows = offs_m
    q_ptrs = Q + b * sqb + h * sqh + q_rows[:, None] * sqn + offs_d[None, :]
    if HEAD_DIM == D_PAD:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    k_base = K + b * skb + h * skh + offs_d[:, None]
    v_base = V + b * svb + h * svh + offs_d[None, :]
    idx_base = KV_IDX + b * sib + h * sih + row * sim
    SUBS: tl.constexpr = MASK_BLOCK // BLOCK_N
    n_steps = tl.load(KV_NUM + b * snb + h * snh + row * snm) * SUBS
    # one flat loop over (listed key block, BLOCK_N slice of it): one K and one V tile per iteration, the shape
    # triton's software pipeliner overlaps best
    for t in range(0, n_steps):
        kb = tl.load(idx_base + t // SUBS)
        first = (t % SUBS) * BLOCK_N
        keys = kb * MASK_BLOCK + first + offs_n
        if GATHER_KV:  # pad slots read a real token; the block's count masks them
            keys = tl.minimum(tl.load(SLOT_TOKEN + keys), N_TOKENS - 1)
        if HEAD_DIM == D_PAD:
            kt = tl.load(k_base + keys[None, :] * skn)
            vt = tl.load(v_base + keys[:, None] * svn)
        else:
            kt = tl.load(k_base + keys[None, :] * skn, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            vt = tl.load(v_base + keys[:, None] * svn, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        count = tl.load(KEY_COUNT + kb)
        m_i, l_i, acc = _online_step(q, kt, vt, m_i, l_i, acc, qk_scale, count, first, offs_n, MASK_BLOCK)
    acc = (acc / l_i[:, None]).to(O.dtype.element_ty)
    o_ptrs = O + b * sob + h * soh + q_rows[:, None] * son + offs_d[None, :]
    if GATHER_Q:
        if HEAD_DIM == D_PAD:
            tl.store(o_ptrs, acc, mask=(q_tok < N_TOKENS)[:, None])
        else:
            tl.store(o_ptrs, acc, mask=(q_tok < N_TOKENS)[:, None] & (offs_d[None, :] < HEAD_DIM))
    elif HEAD_DIM == D_PAD:
        tl.store(o_ptrs, acc)
    else:
        tl.store(o_ptrs, acc, mask=offs_d[None, :] < HEAD_DIM)


# (BLOCK_M, BLOCK_N, num_warps, num_stages): the candidates timed on the GPU (benchmarks/bench_attention_gpu.py)
CANDIDATES = [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (128, 64, 8, 4),
              (128, 128, 4, 2), (64, 128, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2), (32, 32, 4, 2), (16, 16, 1, 1),
              (128, 64, 4, 2), (128, 64, 4, 4), (128, 32, 4, 3), (128, 32, 4, 2)]
# measured defaults per (compute capability major, head size <= 64 or not), the fastest on an H200
# (BENCHMARKS.md, "Sparse attention" / "On the GPU"): heads of 128 (Wan, HunyuanVideo),
# 32,760 tokens: 0.93 / 0.85 of the ideal at d=0.25 / 0.1 on tiled q/k/v; heads of 64 (CogVideoX, LTX), 17,550
# tokens: 0.93 / 0.81 in model order (what the engine runs)
_DEFAULTS = {(9, False): (128, 64, 4, 3), (9, True): (64, 64, 4, 2)}
_FALLBACK = (128, 64, 4, 3)


def _fit(setting: tuple[int, int, int, int], mask_block: int) -> dict:
    """A (BLOCK_M, BLOCK_N, num_warps, num_stages) setting as launch keywords, its tiles no larger than a block."""
    bm, bn, w, s = setting
    return dict(BLOCK_M=min(bm, mask_block), BLOCK_N=min(bn, mask_block), num_warps=w, num_stages=s)


def configs(mask_block: int = 128) -> list[dict]:
    """Every candidate launch setting that fits ``mask_block`` (as dicts for `block_sparse_attention`)."""
    out = []
    for setting in CANDIDATES:
        c = _fit(setting, mask_block)
        if c not in out:
            out.append(c)
    return out


def config_for(device: torch.device, head_dim: int, mask_block: int) -> dict:
    """The measured default launch setting for ``device`` (CPU: the interpreter ignores warps and stages)."""
    major = torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else 0
    return _fit(_DEFAULTS.get((major, head_dim <= 64), _FALLBACK), mask_block)


def _prune(configs_, named_args, **kwargs):
    mb = kwargs.get("MASK_BLOCK", named_args.get("MASK_BLOCK"))
    return [c for c in configs_ if c.kwargs["BLOCK_M"] <= mb and c.kwargs["BLOCK_N"] <= mb] or configs_[-1:]


_autotuned = triton.autotune(
    [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in CANDIDATES],
    key=["HEAD_DIM", "MASK_BLOCK", "GATHER_Q", "GATHER_KV"],
    prune_configs_by={"early_config_prune": _prune})(_block_sparse_fwd)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num: torch.Tensor,
                           kv_idx: torch.Tensor, key_count: torch.Tensor, block: int, scale: float,
                           config: dict | None = None, slot_token: torch.Tensor | None = None,
                           gather: tuple = ("q", "kv")) -> torch.Tensor:
    """Block-sparse attention over ``nb`` blocks of ``block`` tiled slots.

    Without ``slot_token``, q, k, v are [B, H, nb*block, D] in tiled order and so is the output. With it (the
    layout's slot -> token table, int32 [nb*block], pads = n_tokens), the tensors named in ``gather`` ("q": q and
    the output, "kv": k and v) are [B, H, n_tokens, D] in the model's order, read and written through the table:
    no reordered copies. Last dims must be contiguous; other strides are free.
    kv_num [Bm, Hm, nb] and kv_idx [Bm, Hm, nb, nb] int32 on q's device (Bm/Hm 1 or B/H); key_count: [nb] int32,
    the real keys of each block (pads at its end). ``config``: launch setting (`configs`); default `config_for`
    the device, or autotuned (module doc)."""
    B, H, _, D = q.shape
    nb = kv_idx.shape[-1]
    n_slots = nb * block
    gather_q, gather_kv = slot_token is not None and "q" in gather, slot_token is not None and "kv" in gather
    n_tokens = q.shape[2] if gather_q else (k.shape[2] if gather_kv else n_slots)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    o = q.new_empty(B, H, n_tokens if gather_q else n_slots, D)
    kv_num, kv_idx = kv_num.expand(B, H, nb), kv_idx.expand(B, H, nb, nb)
    d_pad = max(16, triton.next_power_of_2(D))
    slots = slot_token if slot_token is not None else key_count  # any int32 pointer when nothing is gathered
    args = (q, k, v, o, kv_num, kv_idx, key_count, slots, float(scale) * LOG2E,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            *kv_num.stride(), *kv_idx.stride()[:3], H, n_tokens)
    flags = dict(HEAD_DIM=D, D_PAD=d_pad, MASK_BLOCK=block, GATHER_Q=gather_q, GATHER_KV=gather_kv)
    if config is None and os.environ.get("ACCEL_TRITON_AUTOTUNE") == "1":
        _autotuned[lambda meta: (n_slots // meta["BLOCK_M"], B * H)](*args, **flags)
        return o
    c = dict(config or config_for(q.device, D, block))
    bm = c.pop("BLOCK_M")
    _block_sparse_fwd[(n_slots // bm, B * H)](*args, BLOCK_M=bm, **flags, **c)
    return o
