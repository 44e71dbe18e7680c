"""``xformers``: xformers' memory-efficient attention with the block mask as a dense bias (a reference, CUDA)."""

from __future__ import annotations

import importlib.util

import torch

from ..patterns import SparseMask
from . import Backend


def run(q, k, v, mask: SparseMask, scale, **_):
    import xformers.ops as xops

    B, H, N, _ = q.shape
    bias = torch.zeros(B, H, N, N, dtype=q.dtype, device=q.device)
    bias.masked_fill_(~mask.token_mask().to(q.device), float("-inf"))
    out = xops.memory_efficient_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_bias=bias, scale=scale)
    return out.transpose(1, 2)


def unavailable(device) -> str | None:
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed; `pip install diffusers-accel[xformers]` or choose backend 'flex'"
    if device.type != "cuda":
        return "xformers needs a CUDA device; choose backend 'flex' on CPU"
    return None


BACKEND = Backend("xformers", run, unavailable)
