"""``flex``: FlexAttention over a BlockMask that skips the blocks not computed (compiled; eager as a reference)."""

from __future__ import annotations

import functools
import logging

import torch

from ..patterns import SparseMask, block_lists
from . import Backend

logger = logging.getLogger("accel.attention")

_compile_failed: list = []


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_block_mask(mask: SparseMask, B: int, H: int, device):
    """A FlexAttention BlockMask for ``mask``: blocks with pad keys are partial (mask_mod), others full.

    The mask_mod also encodes the block structure, since eager flex_attention applies only mask_mod.

    Args:
        mask: the call's `SparseMask`.
        B: batch size.
        H: heads.
        device: where the attention runs.

    Returns:
        The BlockMask, cached on ``mask`` per (B, H, device).
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


def run(q, k, v, mask: SparseMask, scale, flex_compile: bool = True, **_):
    from torch.nn.attention.flex_attention import flex_attention

    bm = flex_block_mask(mask, q.shape[0], q.shape[1], q.device)
    if flex_compile and not _compile_failed:
        try:
            return _compiled_flex()(q, k, v, block_mask=bm, scale=scale)
        except Exception as e:  # no C++ compiler, unsupported shape: the eager path is exact, only slower
            logger.warning("accel.attention: compiled flex_attention failed (%s); using eager flex_attention "
                           "from now on (set attention.flex_compile=false to skip the attempt)",
                           str(e).splitlines()[0] if str(e) else type(e).__name__)
            _compile_failed.append(e)
    return flex_attention(q, k, v, block_mask=bm, scale=scale)


def unavailable(device) -> str | None:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention; upgrade torch to >= 2.5"
    return None


BACKEND = Backend("flex", run, unavailable)
