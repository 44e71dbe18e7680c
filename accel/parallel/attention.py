"""Distributed attention for sharded tokens: Ulysses (all-to-all over heads) and displaced K/V.

The family's own attention processor keeps doing everything it does (projections, norms, rotary
embeddings, joint text/image concatenation); a wrapping processor intercepts only its call to
``scaled_dot_product_attention`` (through a `TorchFunctionMode`, scoped to that processor call),
where q/k/v hold this rank's image tokens plus, for joint attention, all text tokens:

- `Ulysses`: one all-to-all turns (all heads, my tokens) into (my heads, all tokens), attention
  runs on the full sequence (padding dropped), a second all-to-all turns it back. Text tokens are
  already whole on every rank; each rank keeps its heads' slice and an all-gather over heads
  rebuilds the text output. Exact.
- `DisplacedKV` (DistriFusion): queries stay local; keys/values of the other patches come from an
  all-gather, synchronous (exact) in ``sync`` mode and warmup steps, otherwise the previous
  step's gather (issued asynchronously and overlapped with this step's compute) with this rank's
  own slice fresh. PCPP (``patch_kv_fraction`` < 1) sends and attends to only a strided subset
  of the other patches' tokens in async steps.
"""

from __future__ import annotations

import inspect
import time

import torch
import torch.distributed as dist

from ..sdpa_route import SDPA, RouteSDPA
from .context import Groups, LoopState
from .runtime import _guard
from .sharding import pad_to


class _Layout:
    """Where this call's image tokens sit in q/k/v and how many of them are real."""

    def __init__(self, lq: int, text_len: int, text_pos, state: LoopState, degree: int):
        t = text_len if text_pos else 0
        self.n = lq - t  # local image tokens (padded share)
        self.text = slice(0, t) if text_pos == "first" else slice(self.n, lq)
        self.image = slice(t, lq) if text_pos == "first" else slice(0, self.n)
        self.t, self.first = t, text_pos == "first"
        padded = self.n * degree
        self.real = state.real_len if state.pad_len == padded and state.real_len else padded

    def join(self, text, image):
        if not self.t:
            return image
        return torch.cat([text, image] if self.first else [image, text], dim=2)


class ParallelProcessor:
    """Wraps a family's processor; subclasses implement `attend` (SDPA's signature)."""

    def __init__(self, original, site: str, groups: Groups, state: LoopState, text_pos, stats: dict):
        self.original, self.site, self.groups, self.state, self.text_pos = original, site, groups, state, text_pos
        self.stats = stats

    def __call__(self, attn, *args, **kwargs):
        with RouteSDPA(self.attend):
            return self.original(attn, *args, **kwargs)

    def __getattr__(self, name):  # diffusers reads processor attributes (_attention_backend, ...)
        if name == "original":
            raise AttributeError(name)
        return getattr(self.original, name)

    def layout(self, q) -> _Layout:
        return _Layout(q.shape[2], self.state.text_len, self.text_pos, self.state, self.groups.inner_degree)

    def _count(self, key: str, t: torch.Tensor, factor: float = 1.0):
        self.stats[key] = self.stats.get(key, 0) + int(t.numel() * t.element_size() * factor)


def wrap(cls, original, *args):
    """An instance of ``cls`` whose ``__call__`` shows the original processor's signature.

    Attention modules built on diffusers' AttentionModuleMixin drop keyword arguments that the
    processor's ``__call__`` does not name (``image_rotary_emb``, ...), so the wrapper must name them.
    """
    sig = inspect.signature(type(original).__call__)
    call = cls.__call__

    def __call__(self, *a, **k):
        return call(self, *a, **k)

    __call__.__signature__ = sig
    sub = type(f"{cls.__name__}[{type(original).__name__}]", (cls,), {"__call__": __call__})
    return sub(original, *args)


def _all_to_all(x: torch.Tensor, group, what: str) -> torch.Tensor:
    x = x.contiguous()  # empty_like keeps a view's strides; the collective writes densely
    out = torch.empty_like(x)
    _guard(lambda: dist.all_to_all_single(out, x, group=group), what)
    return out


class Ulysses(ParallelProcessor):
    def attend(self, q, k, v, attn_mask=None, **kw):
        if attn_mask is not None:
            raise NotImplementedError(f"{self.site}: sequence parallel attention with a mask is not supported; "
                                      "use cfg parallel or patch parallel for this model")
        g, p, r = self.groups.inner_group, self.groups.inner_degree, self.groups.inner_index
        lay = self.layout(q)
        b, h, _, d = q.shape
        hp = h // p
        qkv = torch.stack([q, k, v])  # (3, B, H, L, D)
        img = qkv[:, :, :, lay.image]  # (3, B, H, n, D)
        # (3,B,P,H/P,n,D) -> (P,3,B,H/P,n,D): chunk j of my tokens goes to the rank owning heads j.
        send = img.reshape(3, b, p, hp, lay.n, d).permute(2, 0, 1, 3, 4, 5)
        recv = _all_to_all(send, g, "Ulysses all-to-all")
        self._count("a2a_bytes", send, (p - 1) / p)
        full = recv.permute(1, 2, 3, 0, 4, 5).reshape(3, b, hp, p * lay.n, d)[:, :, :, :lay.real]
        if lay.t:
            full = torch.cat([lay.join(qkv[i][:, r * hp:(r + 1) * hp, lay.text], full[i]).unsqueeze(0)
                              for i in range(3)])
        out = SDPA(full[0], full[1], full[2], **kw)  # (B, H/P, T + N, D)
        if lay.t:
            text_out = out[:, :, :lay.t] if lay.first else out[:, :, out.shape[2] - lay.t:]
            img_out = out[:, :, lay.t:] if lay.first else out[:, :, :out.shape[2] - lay.t]
        else:
            text_out, img_out = None, out
        img_out = pad_to(img_out, 2, p * lay.n)
        send = img_out.reshape(b, hp, p, lay.n, d).permute(2, 0, 1, 3, 4)
        back = _all_to_all(send, g, "Ulysses all-to-all")
        self._count("a2a_bytes", send, (p - 1) / p)
        img_local = back.permute(1, 0, 2, 3, 4).reshape(b, h, lay.n, d)
        if text_out is None:
            return img_local
        text_out = text_out.contiguous()
        parts = [torch.empty_like(text_out) for _ in range(p)]
        _guard(lambda: dist.all_gather(parts, text_out, group=g), "Ulysses text all-gather")
        self._count("gather_bytes", text_out, p - 1)
        return lay.join(torch.cat(parts, 1), img_local)


class DisplacedKV(ParallelProcessor):
    def __init__(self, original, site, groups, state, text_pos, stats, mode: str, warmup: int, fraction: float):
        super().__init__(original, site, groups, state, text_pos, stats)
        self.mode, self.warmup = mode, warmup
        self.stride = max(1, round(1 / fraction))
        self.stale: dict = {}  # call_in_step -> (work handle or None, list of per-rank (2,B,H,n,D))
        state.on_call_start(self.stale.clear)

    def _sync_step(self) -> bool:
        return self.mode == "sync" or self.state.step < self.warmup

    def attend(self, q, k, v, attn_mask=None, **kw):
        if attn_mask is not None:
            raise NotImplementedError(f"{self.site}: patch parallel attention with a mask is not supported")
        g, p, r = self.groups.inner_group, self.groups.inner_degree, self.groups.inner_index
        lay = self.layout(q)
        kv = torch.stack([k[:, :, lay.image], v[:, :, lay.image]]).contiguous()  # (2, B, H, n, D)
        key = self.state.call_in_step
        previous = self.stale.pop(key, None)
        if self._sync_step() or previous is None:
            parts = [torch.empty_like(kv) for _ in range(p)]
            _guard(lambda: dist.all_gather(parts, kv, group=g), "patch K/V all-gather")
            self._count("kv_bytes", kv, p - 1)
            self.stale[key] = (None, parts)
        else:
            work, parts = previous
            if work is not None:
                t0 = time.perf_counter()
                _guard(work.wait, "patch K/V all-gather (async)")
                self.stats["wait_s"] = self.stats.get("wait_s", 0.0) + time.perf_counter() - t0
            parts = [kv if i == r else (x[:, :, :, ::self.stride] if x.shape[3] == lay.n else x)
                     for i, x in enumerate(parts)]
            send = kv[:, :, :, ::self.stride].contiguous() if self.stride > 1 else kv
            bufs = [torch.empty_like(send) for _ in range(p)]
            work = _guard(lambda: dist.all_gather(bufs, send, group=g, async_op=True), "patch K/V all-gather")
            self._count("kv_bytes", send, p - 1)
            self.stale[key] = (work, bufs)
        trimmed = []
        for i, x in enumerate(parts):  # drop the padding of the last patches
            real_i = max(0, min(lay.n, lay.real - i * lay.n))
            trimmed.append(x[:, :, :, :real_i if x.shape[3] == lay.n else -(-real_i // self.stride)])
        full = torch.cat(trimmed, dim=3)
        k_all = lay.join(k[:, :, lay.text], full[0])
        v_all = lay.join(v[:, :, lay.text], full[1])
        return SDPA(q, k_all, v_all, **kw)
