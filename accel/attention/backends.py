"""Attention backends over the tiled block layout: ``sdpa``, ``xformers``, ``flex``, ``triton``.

Every backend takes q, k, v as [B, H, n_blocks*block, D] in tiled order and a `SparseMask`, and
computes softmax attention restricted to the mask's blocks and to real (non-pad) keys. ``sdpa``
and ``xformers`` apply the expanded mask densely (a reference; no speed-up); ``flex`` skips
masked blocks (compiled), ``triton`` is our kernel, which skips them too, and ``gather`` (the fast
path on CPU) copies each query block's kept key/value blocks together and runs two batched BLAS
matmuls and a softmax over them: no per-block kernel, so it keeps the efficiency of large GEMMs.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch
import torch.nn.functional as F

from .patterns import SparseMask, block_lists

logger = logging.getLogger("accel.attention")


class BackendUnavailableError(RuntimeError):
    """The configured attention backend cannot run here."""


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None when ``backend`` can run on ``device``, else why not and what to do."""
    if backend in ("sdpa", "gather", "auto"):
        return None
    if backend == "flex":
        try:
            from torch.nn.attention import flex_attention  # noqa: F401
        except ImportError:
            return f"torch {torch.__version__} has no torch.nn.attention.flex_attention; upgrade torch to >= 2.5"
        return None
    if backend == "xformers":
        if importlib.util.find_spec("xformers") is None:
            return "xformers is not installed; `pip install diffusers-accel[xformers]` or choose backend 'flex'"
        if device.type != "cuda":
            return "xformers needs a CUDA device; choose backend 'flex' on CPU"
        return None
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed; `pip install diffusers-accel[triton]` or choose backend 'flex'"
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return ("the triton kernel needs a CUDA device (or TRITON_INTERPRET=1 set before triton is "
                    "imported, a slow CPU reference); choose backend 'flex' on CPU")
        return None
    return f"unknown backend {backend!r}"


def _sdpa(q, k, v, mask: SparseMask, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.token_mask().to(q.device), scale=scale)


def _xformers(q, k, v, mask: SparseMask, scale):
    import xformers.ops as xops

    B, H, N, _ = q.shape
    bias = torch.zeros(B, H, N, N, dtype=q.dtype, device=q.device)
    bias.masked_fill_(~mask.token_mask().to(q.device), float("-inf"))
    out = xops.memory_efficient_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_bias=bias, scale=scale)
    return out.transpose(1, 2)


_compile_failed: list = []


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_block_mask(mask: SparseMask, B: int, H: int, device):
    """A FlexAttention BlockMask for ``mask``: blocks with pad keys are partial (mask_mod), others full.

    The mask_mod also encodes the block structure, since eager flex_attention applies only mask_mod.
    """
    from torch.nn.attention.flex_attention import BlockMask

    key = (B, H, str(device))
    if key in mask._flex:
        return mask._flex[key]
    layout = mask.layout
    allowed = mask.allowed.to(device)
    has_pad = layout.block_has_pad.to(device)
    full = allowed & ~has_pad
    partial = allowed & has_pad

    (pn, pi), (fn, fi) = block_lists(partial), block_lists(full)
    allowed_e = allowed.expand(B, H, *allowed.shape[-2:])
    valid = layout.valid.to(device)
    T = layout.block

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed_e[b, h, q_idx // T, kv_idx // T] & valid[kv_idx]

    bm = BlockMask.from_kv_blocks(pn, pi, fn, fi, BLOCK_SIZE=T, mask_mod=mask_mod,
                                  seq_lengths=(layout.padded, layout.padded))
    mask._flex[key] = bm
    return bm


def _flex(q, k, v, mask: SparseMask, scale, compile: bool = True):
    from torch.nn.attention.flex_attention import flex_attention

    bm = flex_block_mask(mask, q.shape[0], q.shape[1], q.device)
    if compile and not _compile_failed:
        try:
            return _compiled_flex()(q, k, v, block_mask=bm, scale=scale)
        except Exception as e:  # no C++ compiler, unsupported shape: the eager path is exact, only slower
            logger.warning("accel.attention: compiled flex_attention failed (%s); using eager flex_attention "
                           "from now on (set attention.flex_compile=false to skip the attempt)",
                           str(e).splitlines()[0] if str(e) else type(e).__name__)
            _compile_failed.append(e)
    return flex_attention(q, k, v, block_mask=bm, scale=scale)


def _triton(q, k, v, mask: SparseMask, scale):
    from .kernels.block_sparse import block_sparse_attention

    num, idx = mask.kv_indices  # built once per mask, on the mask's (= q's) device
    return block_sparse_attention(q, k, v, num, idx, mask.layout.block_count_i32, mask.layout.block, scale)


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


def _gather(q, k, v, mask: SparseMask, scale, chunk_floats: int = GATHER_CHUNK):
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


def triton_model_order(q, k, v, mask: SparseMask, scale, gather: tuple = ("q", "kv")):
    """Our kernel on q, k, v in the model's token order ([B, H, n_tokens, D], any strides with a contiguous last
    dim), output in model order: it reads and writes rows through the layout's slot -> token table, so the
    tiled copies of q, k, v and the output are never made (at Wan 480p on an H200 they cost ~1 ms a call)."""
    from .kernels.block_sparse import block_sparse_attention

    lay = mask.layout
    num, idx = mask.kv_indices
    return block_sparse_attention(q, k, v, num, idx, lay.block_count_i32, lay.block, scale,
                                  slot_token=lay.slot_token_i32, gather=gather)


_auto_failed: dict = {}  # backend -> the error that made `auto` stop choosing it in this process


def auto_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The fastest measured backend for ``device`` and ``dtype`` (BENCHMARKS.md, "Sparse attention",
    "On the GPU" and "On CPU"): our Triton kernel on CUDA in fp16/bf16, compiled flex on CUDA otherwise
    (the kernel's fp32 dot would run in tf32) or when triton is missing or failed here, gather on CPU."""
    if device.type == "cuda":
        if (dtype in (torch.float16, torch.bfloat16) and "triton" not in _auto_failed
                and unavailable_reason("triton", device) is None):
            return "triton"
        return "flex"
    return "gather"


def run_auto(q, k, v, mask: SparseMask, scale: float, flex_compile: bool = True, model_order: bool = False,
             backend: str | None = None) -> tuple[torch.Tensor, str]:
    """(output, backend that ran) for ``backend="auto"``: a kernel that fails to build here (an old GPU, a
    triton without a compiler for it) is dropped from auto's choices with a warning, and flex runs instead.
    ``model_order``: q, k, v and the output are in the model's token order (else tiled). ``backend``: auto's
    choice when the caller has made it already (`auto_backend`)."""
    from .layout import from_blocks, to_blocks

    backend = backend or auto_backend(q.device, q.dtype)
    if backend == "triton":
        try:
            return (triton_model_order if model_order else _triton)(q, k, v, mask, scale), backend
        except Exception as e:  # compile errors surface at the first launch
            _auto_failed["triton"] = e
            logger.warning("accel.attention: the triton kernel failed here (%s); backend 'auto' uses flex from now "
                           "on", str(e).splitlines()[0] if str(e) else type(e).__name__)
            backend = "flex"
    if not model_order:
        return run(backend, q, k, v, mask, scale, flex_compile), backend
    lay = mask.layout
    tiled = run(backend, to_blocks(q, lay), to_blocks(k, lay), to_blocks(v, lay), mask, scale, flex_compile)
    return from_blocks(tiled, lay), backend


def run(backend: str, q, k, v, mask: SparseMask, scale: float, flex_compile: bool = True) -> torch.Tensor:
    if backend == "flex":
        return _flex(q, k, v, mask, scale, flex_compile)
    if backend == "triton":
        return _triton(q, k, v, mask, scale)
    if backend == "xformers":
        return _xformers(q, k, v, mask, scale)
    if backend == "gather":
        return _gather(q, k, v, mask, scale)
    if backend == "auto":
        return run_auto(q, k, v, mask, scale, flex_compile)[0]
    return _sdpa(q, k, v, mask, scale)
