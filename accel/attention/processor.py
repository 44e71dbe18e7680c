"""The sparse attention processor: the family's own processor, with only its attention kernel swapped.

`SparseProcessor` wraps the processor a module already has (AttnProcessor2_0, FluxAttnProcessor,
WanAttnProcessor, ...) and runs it unchanged, so q/k norms, rotary embeddings, added text
projections and output projections are exactly the family's. During that call a
`TorchFunctionMode` routes ``F.scaled_dot_product_attention`` (which both the classic
processors and diffusers' native ``dispatch_attention_fn`` end in) to `SparseAttention` when the
call is the module's full self/joint attention over the current token grid; a key-padding mask
that drops text tokens only (HunyuanVideo's padded prompt) is honoured by leaving those tokens out;
any other call (IP-adapter keys, other masks, shapes we cannot place on the grid) runs dense, and is
counted as a passthrough call.
"""

from __future__ import annotations

import functools
import math

import torch

from ..families import Adapter, AttentionSite
from ..sdpa_route import SDPA, RouteSDPA
from .sparse import SparseAttention

SPARSE_ROLES = ("self", "joint", "temporal")


class SparseProcessor:
    """Base of the per-class wrappers made by `wrap`; holds the original processor and the site."""

    def __init__(self, original, site: AttentionSite, rank: int, adapter: Adapter, engine: SparseAttention,
                 tracker):
        self.original = original
        self.site = site
        self.rank = rank  # position among the sites that can be sparse (dense_layers counts these)
        self.adapter = adapter
        self.engine = engine
        self.tracker = tracker

    def __getattr__(self, name):  # attributes diffusers reads from processors (_attention_backend, ...)
        if name == "original":
            raise AttributeError(name)
        return getattr(self.original, name)

    def _run(self, attn, args, kwargs):
        cfg = self.engine.cfg
        if self.rank < cfg.dense_layers or self.tracker.state.step < cfg.dense_steps:
            self.engine.skip("dense_layers" if self.rank < cfg.dense_layers else "dense_steps")
            return self.original(attn, *args, **kwargs)
        with RouteSDPA(self._attention):
            return self.original(attn, *args, **kwargs)

    def _placement(self, n: int):
        """(grid, text_len, text_first) of an n-token sequence at this site, or None if it does not fit."""
        s = self.tracker.state
        text_len = s.text_len if self.site.role == "joint" else 0
        nv = n - text_len
        if nv <= 0:
            return None
        if self.adapter.family.kind == "dit":
            grid = tuple(s.grid)
        elif self.site.role == "temporal":
            grid = (nv, 1, 1)
        else:
            try:
                grid = (1,) + tuple(self.adapter.grid_for_tokens(tuple(s.grid), nv))[1:]
            except ValueError:
                return None
        if math.prod(grid) != nv:
            return None
        return grid, text_len, self.adapter.family.text_position != "last"

    def _attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False):
        dense = functools.partial(SDPA, query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                  is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        same = query.ndim == 4 and key.shape == query.shape and value.shape == query.shape
        if not same or is_causal or dropout_p:
            self.engine.skip("not_self_attention")
            return dense()
        place = self._placement(query.shape[-2])
        if place is None:
            self.engine.skip("grid_lost")
            return dense()
        keys = None if attn_mask is None else _text_key_padding(attn_mask, query, *place[1:])
        if attn_mask is not None and keys is None:
            self.engine.skip("not_self_attention")
            return dense()
        if math.prod(place[0]) < self.engine.cfg.min_tokens:
            self.engine.skip("below_min_tokens")
            return dense()
        scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
        if keys is None:
            out = self.engine.attend(query, key, value, scale, self.site.name, *place)
        else:
            out = self._attend_padded(query, key, value, scale, keys, *place)
        if out is None:
            self.engine.skip("one_block")
            return dense()
        return out

    def _attend_padded(self, query, key, value, scale, keys, grid, text_len, text_first):
        """A key-padding mask over text tokens (HunyuanVideo's padded prompt): sparse attention over the kept
        tokens of each batch element (fewer text tokens), dense SDPA rows for the padded text queries."""
        out = torch.empty_like(query)
        groups = [slice(None)] if bool((keys == keys[:1]).all()) else [slice(b, b + 1) for b in range(len(keys))]
        for g in groups:
            keep = keys[g][0]
            q, k, v = query[g], key[g], value[g]
            qk, kk, vk = q[:, :, keep], k[:, :, keep], v[:, :, keep]
            o = self.engine.attend(qk, kk, vk, scale, self.site.name, grid, text_len - int((~keep).sum()), text_first)
            if o is None:
                return None
            out[g][:, :, keep] = o
            if not bool(keep.all()):
                out[g][:, :, ~keep] = SDPA(q[:, :, ~keep], kk, vk, scale=scale)
        return out


def _text_key_padding(mask, query, text_len: int, text_first: bool):
    """[B, N] bool keys kept, when ``mask`` is a key-padding mask ([B or 1, 1, 1, N], bool or 0/-inf) that only
    drops text tokens; None for any other mask (those calls run dense). Its checks read the mask's values: a few
    host syncs per call, only for calls that carry a mask (HunyuanVideo's padded prompt)."""
    B, _, N, _ = query.shape
    if mask.ndim != 4 or mask.shape[1:3] != (1, 1) or mask.shape[-1] != N or mask.shape[0] not in (1, B):
        return None
    if mask.dtype == torch.bool:
        keys = mask[:, 0, 0]
    elif bool(((mask == 0) | (mask == float("-inf"))).all()):
        keys = mask[:, 0, 0] == 0
    else:
        return None
    keys = keys.expand(B, N)
    video = slice(text_len, None) if text_first else slice(0, N - text_len)
    if not bool(keys[:, video].all()) or not bool(keys.any(1).all()):
        return None
    return keys


@functools.lru_cache(maxsize=None)
def _wrapper_class(original_cls: type) -> type:
    # diffusers passes a processor only the keyword arguments its __call__ names, so each wrapper
    # class shows its original's signature (functools.wraps sets __wrapped__, which inspect follows).
    def __call__(self, attn, *args, **kwargs):
        return self._run(attn, args, kwargs)

    __call__ = functools.wraps(original_cls.__call__)(__call__)
    return type(f"Sparse{original_cls.__name__}", (SparseProcessor,), {"__call__": __call__})


def wrap(original, site: AttentionSite, rank: int, adapter: Adapter, engine: SparseAttention, tracker):
    return _wrapper_class(type(original))(original, site, rank, adapter, engine, tracker)


def sparse_sites(adapter: Adapter) -> list[AttentionSite]:
    """The sites that get the processor: self, joint and temporal attention (cross-attention stays dense)."""
    return [s for s in adapter.attention() if s.role in SPARSE_ROLES]
