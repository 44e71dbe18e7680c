"""Attention backends over the tiled block layout: ``sdpa``, ``xformers``, ``flex``, ``triton``.

Every backend takes q, k, v as [B, H, n_blocks*block, D] in tiled order and a `SparseMask`, and
computes softmax attention restricted to the mask's blocks and to real (non-pad) keys. ``sdpa``
and ``xformers`` apply the expanded mask densely (a reference; no speed-up); ``flex`` skips
masked blocks (compiled) and ``triton`` is our kernel, which skips them too.
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
    if backend == "sdpa":
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

    num, idx = mask.kv_indices
    return block_sparse_attention(q, k, v, num, idx, mask.layout.valid, mask.layout.block, scale)


def run(backend: str, q, k, v, mask: SparseMask, scale: float, flex_compile: bool = True) -> torch.Tensor:
    if backend == "flex":
        return _flex(q, k, v, mask, scale, flex_compile)
    if backend == "triton":
        return _triton(q, k, v, mask, scale)
    if backend == "xformers":
        return _xformers(q, k, v, mask, scale)
    return _sdpa(q, k, v, mask, scale)
