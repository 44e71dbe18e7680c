"""The diffusers hooks that reduce tokens: on blocks, on their attention/MLP modules, around SDPA.

- `BasicBlockHook` (UNets, PixArt: ``BasicTransformerBlock``): chooses the step's merge for the
  block; `SubmoduleMergeHook`\\ s on ``attn1`` / ``attn2`` / ``ff`` merge their input and unmerge
  their output (tomesd's placement), or for ``kv_downsample`` hand ``attn1`` pooled tokens as its
  keys/values source (any attention processor or backend honours ``encoder_hidden_states``).
- `DiTBlockHook` (every other DiT block, and ``prune`` everywhere): runs the whole block on fewer
  image tokens. ``merge``: output = x + unmerge(block(merge(x)) - merge(x)), the block's residual
  update spread back over its tokens. ``prune``: the selected tokens' update is recomputed, the
  rest reuse their cached update. ``kv_downsample``: keys/values pooled inside SDPA (see `PoolKV`).
- Rotary positions: a merged row attends at its representative's (the destination's) position;
  the rotary tables are reduced to ``Merge.keep``. Text tokens are never in the reduced set.
"""

from __future__ import annotations

import torch
from diffusers.hooks import ModelHook

from ..families import block_io
from ..sdpa_route import SDPA, RouteSDPA
from . import blockio, matching
from .state import TokenState

HOOK_NAME = "accel.tokens"


def _hidden(args, kwargs):
    return args[0] if args else kwargs.get("hidden_states")


def _replace_hidden(args, kwargs, value):
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


class BasicBlockHook(ModelHook):
    """``BasicTransformerBlock``: picks the merge; its submodule hooks apply it."""

    def __init__(self, ts: TokenState, name: str):
        super().__init__()
        self.ts, self.name = ts, name

    def new_forward(self, module, *args, **kwargs):
        ts = self.ts
        x = _hidden(args, kwargs)
        n = x.shape[1] if isinstance(x, torch.Tensor) and x.ndim == 3 else 0
        grid = ts.grid(n) if n else None
        amount = int(n * ts.ratio())
        if grid is None or amount <= 0 or not ts.level_allowed(n):
            ts.record(self.name, n, 0)
            return self.fn_ref.original_forward(*args, **kwargs)
        if ts.cfg.method == "kv_downsample":
            m = ts.merge_for(x, grid, "pool", amount, shared=True, block=self.name)
        else:
            m = ts.merge_for(x, grid, "bipartite", amount, shared=False, block=self.name)
        ts.record(self.name, n, m.removed)
        ts.current = m
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            ts.current = None


class SubmoduleMergeHook(ModelHook):
    """On ``attn1``/``attn2``/``ff`` of a BasicTransformerBlock: merge in, unmerge out (or pool keys)."""

    def __init__(self, ts: TokenState, pool_keys: bool = False):
        super().__init__()
        self.ts, self.pool_keys = ts, pool_keys
        self._active = []

    def pre_forward(self, module, *args, **kwargs):
        m = self.ts.current
        self._active.append(m)
        if m is None:
            return args, kwargs
        x = _hidden(args, kwargs)
        if self.pool_keys:
            if kwargs.get("encoder_hidden_states") is None:
                kwargs = {**kwargs, "encoder_hidden_states": m.merge(x)}
            return args, kwargs
        return _replace_hidden(args, kwargs, m.merge(x))

    def post_forward(self, module, output):
        m = self._active.pop()
        if m is None or self.pool_keys:
            return output
        return m.unmerge(output)


class SelfAttentionFlag(ModelHook):
    """Marks that a self/joint attention module runs, so `PoolKV` leaves cross-attention alone."""

    def __init__(self, ts: TokenState):
        super().__init__()
        self.ts = ts

    def new_forward(self, module, *args, **kwargs):
        previous, self.ts.in_self_attention = self.ts.in_self_attention, True
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self.ts.in_self_attention = previous


class PoolKV:
    """Inside a self/joint attention: SDPA gets keys/values pooled over the merge's windows.

    Keys arrive projected, normalised and rotated (rotary embeddings applied per position), so a
    pooled key is the mean of its window's rotated keys. Text keys (a ``text_len`` run at the
    family's ``text_position``) pass unchanged. Processors that do not call
    ``torch.nn.functional.scaled_dot_product_attention`` (other backends) are left unchanged;
    ``stats()["kv_calls"]`` shows how many attention calls were pooled.
    """

    def __init__(self, ts: TokenState, m: matching.Merge, n: int):
        self.ts, self.m, self.n = ts, m, n
        self.calls = 0

    def attend(self, query, key, value, **rest):
        """SDPA's signature (a `RouteSDPA` handler): pooled keys/values inside self/joint attention."""
        pooled = (self._pool(key), self._pool(value)) if self.ts.in_self_attention else (None, None)
        if pooled[0] is None:
            return SDPA(query, key, value, **rest)
        mask = rest.get("attn_mask")
        if isinstance(mask, torch.Tensor) and mask.shape[-1] == key.shape[-2]:
            rest["attn_mask"] = self._columns(mask)
        self.calls += 1
        return SDPA(query, *pooled, **rest)

    def _split(self, length):
        text_len, where = self.ts.text()
        if length == self.n:
            return 0, 0
        if text_len and length == self.n + text_len:
            return (0, text_len) if where == "last" else (text_len, 0)
        return None

    def _pool(self, t):
        split = self._split(t.shape[-2])
        if split is None:
            return None
        before, after = split
        img = t.narrow(-2, before, self.n)
        parts = [t.narrow(-2, 0, before)] if before else []
        parts.append(self.m.merge(img, dim=t.ndim - 2))
        if after:
            parts.append(t.narrow(-2, before + self.n, after))
        return torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]

    def _columns(self, mask):
        before, after = self._split(mask.shape[-1])
        idx = blockio._table_index(mask.shape[-1], self.m.keep[0].to(mask.device), self.n, before + after,
                                   "first" if before else "last")
        return mask.index_select(mask.ndim - 1, idx)


class DiTBlockHook(ModelHook):
    """A whole DiT block on fewer image tokens (merge, prune), or with pooled keys (kv_downsample)."""

    def __init__(self, ts: TokenState, name: str):
        super().__init__()
        self.ts, self.name = ts, name
        self.output_index = None  # read from the block on first use (families.block_io)

    def new_forward(self, module, *args, **kwargs):
        ts, original = self.ts, self.fn_ref.original_forward
        if self.output_index is None:
            io = block_io(module)
            self.output_index = io[0] if io else 0
        x = _hidden(args, kwargs)
        n = x.shape[1] if isinstance(x, torch.Tensor) and x.ndim == 3 else 0
        ratio = ts.ratio()
        grid = ts.grid(n) if n else None
        if not n or int(n * ratio) <= 0 or not ts.level_allowed(n) or (grid is None and ts.cfg.method != "prune"):
            ts.record(self.name, n, 0)
            if ts.cfg.method == "prune":
                ts.prune_drop(self.name)
            return original(*args, **kwargs)
        method = ts.cfg.method
        if method == "prune":
            return self._prune(module, original, args, kwargs, x, n, ratio)
        if method == "kv_downsample":
            m = ts.merge_for(x, grid, "pool", int(n * ratio), shared=True, block=self.name)
            ts.record(self.name, n, m.removed)
            with RouteSDPA(PoolKV(ts, m, n).attend):
                return original(*args, **kwargs)
        m = ts.merge_for(x, grid, "bipartite", int(n * ratio), shared=True, block=self.name)
        ts.record(self.name, n, m.removed)
        ba = blockio.BlockArgs(module, args, kwargs)
        text_len, where = ts.text()
        blockio.reduce_inputs(ba, m.keep[0], n, text_len, where, m.merge)
        xm = ba.get("hidden_states")
        out = ba.call(original)
        y = blockio.image_output(out, self.output_index)
        return blockio.with_image_output(out, self.output_index, x + m.unmerge(y - xm))

    def _prune(self, module, original, args, kwargs, x, n, ratio):
        ts = self.ts
        keep_n = n - int(n * ratio)
        cached_x = ts.prune_cached_input(self.name, x, keep_n)
        if cached_x is None:  # a full run: every token computed, the cache refreshed
            out = original(*args, **kwargs)
            ts.prune_store(self.name, x, blockio.image_output(out, self.output_index))
            ts.record(self.name, n, 0)
            return out
        sel = matching.top_changed(x, cached_x, keep_n)
        ba = blockio.BlockArgs(module, args, kwargs)
        text_len, where = ts.text()
        blockio.reduce_inputs(ba, sel, n, text_len, where, lambda t: t.index_select(1, sel.to(t.device)))
        xs = ba.get("hidden_states")
        out = ba.call(original)
        ys = blockio.image_output(out, self.output_index)
        delta = ts.prune_update(self.name, sel, xs, ys)
        ts.record(self.name, n, n - keep_n)
        return blockio.with_image_output(out, self.output_index, x + delta)
