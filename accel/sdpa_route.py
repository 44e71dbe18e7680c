"""Routing one processor call's ``scaled_dot_product_attention`` to a function of ours.

Sparse attention, token KV pooling and sequence/patch parallelism all keep the family's own
attention processor (projections, q/k norms, rotary embeddings, joint text concatenation) and
replace only the attention kernel it ends in. Both the classic processors and diffusers' native
``dispatch_attention_fn`` call ``torch.nn.functional.scaled_dot_product_attention``, so a
`TorchFunctionMode` scoped to the processor call catches it; nothing global or class-level is
patched. Inside the handler the mode is off, so calling SDPA there runs the real kernel.
"""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

SDPA = F.scaled_dot_product_attention
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class RouteSDPA(TorchFunctionMode):
    """``with RouteSDPA(handler): ...``: SDPA calls become ``handler(query, key, value, **rest)``."""

    def __init__(self, handler: Callable):
        super().__init__()
        self.handler = handler

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not SDPA:
            return func(*args, **kwargs)
        call = dict(zip(SDPA_ARGS, args, strict=False), **kwargs)  # diffusers' dispatcher passes q/k/v by name
        return self.handler(call.pop("query"), call.pop("key"), call.pop("value"), **call)
