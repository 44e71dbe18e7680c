"""``triton``: our block-sparse kernel (`accel.attention.kernels`), on tiled tensors or in the model's token order."""

from __future__ import annotations

import importlib.util
import os

from ..patterns import SparseMask
from . import Backend


def run(q, k, v, mask: SparseMask, scale, **_):
    from ..kernels.block_sparse import block_sparse_attention

    num, idx = mask.kv_indices  # built once per mask, on the mask's (= q's) device
    return block_sparse_attention(q, k, v, num, idx, mask.layout.block_count_i32, mask.layout.block, scale)


def triton_model_order(q, k, v, mask: SparseMask, scale, gather: tuple = ("q", "kv")):
    """Our kernel on q, k, v in the model's token order, output in model order.

    It reads and writes rows through the layout's slot -> token table, so the tiled copies of q, k, v
    and the output are never made (at Wan 480p on an H200 they cost ~1 ms a call).

    Args:
        q, k, v: [B, H, n_tokens, D], any strides with a contiguous last dim.
        mask: the call's `SparseMask`.
        scale: the softmax scale.
        gather: which of ``"q"`` (q and the output) and ``"kv"`` are in model order; the others are tiled.

    Returns:
        The output, in model order when ``"q"`` is in ``gather``, else tiled.
    """
    from ..kernels.block_sparse import block_sparse_attention

    lay = mask.layout
    num, idx = mask.kv_indices
    return block_sparse_attention(q, k, v, num, idx, lay.block_count_i32, lay.block, scale,
                                  slot_token=lay.slot_token_i32, gather=gather)


def unavailable(device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed; `pip install diffusers-accel[triton]` or choose backend 'flex'"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return ("the triton kernel needs a CUDA device (or TRITON_INTERPRET=1 set before triton is "
                "imported, a slow CPU reference); choose backend 'flex' on CPU")
    return None


BACKEND = Backend("triton", run, unavailable, run_model_order=triton_model_order, dropped_on_failure=True)
