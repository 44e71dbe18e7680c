"""``sdpa``: PyTorch's scaled_dot_product_attention with the block mask expanded to tokens (a dense reference)."""

from __future__ import annotations

import torch.nn.functional as F

from ..patterns import SparseMask
from . import Backend


def run(q, k, v, mask: SparseMask, scale, **_):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.token_mask().to(q.device), scale=scale)


BACKEND = Backend("sdpa", run)
