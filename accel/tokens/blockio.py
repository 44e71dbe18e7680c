"""Calling a transformer block on fewer image tokens: its arguments in, its image output out.

Every diffusers DiT block takes the image/video tokens as ``hidden_states`` and the text apart
(``encoder_hidden_states``), so the text is never reduced here. What must follow the image
tokens: per-position tables (rotary cos/sin, possibly covering [text, image] or [image, text] as
the family's ``text_position`` says, with ``text_len`` text rows), attention masks over the
joint sequence (last dimension), and per-token modulation (Wan 2.2 TI2V's 4-D ``temb``).
"""

from __future__ import annotations

import functools

import torch

from ..families import bind_inputs

ROPE_ARGS = ("image_rotary_emb", "rotary_emb", "freqs_cis")
MASK_ARGS = ("attention_mask",)


class BlockArgs:
    """A block call's arguments by name, editable, turned back into (args, kwargs)."""

    def __init__(self, module, args: tuple, kwargs: dict):
        self.module = module
        self.values = bind_inputs(module, args, kwargs)

    def get(self, name):
        return self.values.get(name)

    def set(self, name, value):
        self.values[name] = value

    def call(self, forward):
        return forward(**{k: v for k, v in self.values.items() if k not in ("args", "kwargs")})


@functools.lru_cache(maxsize=32)
def _text_rows(text_len: int, device: torch.device) -> torch.Tensor:
    """0..text_len-1 on ``device``: shape-only, built once per (length, device)."""
    return torch.arange(text_len, device=device)


def _table_index(size: int, positions: torch.Tensor, n: int, text_len: int, text_position: str | None):
    """Index into a table of ``size`` rows covering the image tokens (n) and possibly the text."""
    if size == n:
        return positions
    if text_len and size == n + text_len:
        text = _text_rows(text_len, positions.device)
        if text_position == "last":
            return torch.cat([positions, n + text])
        return torch.cat([text, text_len + positions])
    return None


def reduce_table(t, positions: torch.Tensor, n: int, text_len: int, text_position: str | None, dims):
    """Select ``positions`` (image tokens kept) in a tensor or tuple of tensors along the first
    dimension among ``dims`` that has n (or n + text_len) entries; others are returned unchanged."""
    if isinstance(t, (tuple, list)):
        return type(t)(reduce_table(x, positions, n, text_len, text_position, dims) for x in t)
    if not isinstance(t, torch.Tensor):
        return t
    for d in dims(t):
        idx = _table_index(t.shape[d], positions.to(t.device), n, text_len, text_position)
        if idx is not None:
            return t.index_select(d, idx)
    return t


def _rope_dims(t):
    return range(t.ndim - 1)  # the last dimension is the rotary feature dimension


def reduce_inputs(args: BlockArgs, positions: torch.Tensor, n: int, text_len: int, text_position, reduce_tokens):
    """Replace the image tokens with ``reduce_tokens(hidden_states)`` and shrink what follows them."""
    x = args.get("hidden_states")
    args.set("hidden_states", reduce_tokens(x))
    for name in ROPE_ARGS:
        if args.get(name) is not None:
            args.set(name, reduce_table(args.get(name), positions, n, text_len, text_position, _rope_dims))
    for name in MASK_ARGS:
        m = args.get(name)
        if isinstance(m, torch.Tensor):
            # a (…, L, L) mask is reduced on both axes; (…, 1, L) only on the last
            m = reduce_table(m, positions, n, text_len, text_position, lambda t: (t.ndim - 1,))
            if m.ndim >= 2 and m.shape[-2] > 1:
                m = reduce_table(m, positions, n, text_len, text_position, lambda t: (t.ndim - 2,))
            args.set(name, m)
    temb = args.get("temb")
    if isinstance(temb, torch.Tensor) and temb.ndim >= 3 and temb.shape[1] == n:
        args.set("temb", reduce_tokens(temb))  # per-token modulation follows its tokens
    return x


def image_output(output, index: int):
    """The image/video hidden states in a block's output (a tensor, or a tuple at ``index``)."""
    return output if isinstance(output, torch.Tensor) else output[index]


def with_image_output(output, index: int, value):
    if isinstance(output, torch.Tensor):
        return value
    out = list(output)
    out[index] = value
    return type(output)(out) if isinstance(output, tuple) else out
