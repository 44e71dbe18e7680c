"""Layouts, patterns and backends at the attention level (no pipeline)."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from accel.attention import backends
from accel.attention.backends import run, unavailable_reason
from accel.attention.config import AttentionConfig
from accel.attention.layout import build_layout, from_blocks, to_blocks
from accel.attention.patterns import STATIC, SparseMask, dense_mask, static_mask, topk_mask, video_pattern
from accel.attention.sparse import SparseAttention

AVAILABLE = [b for b in ("sdpa", "flex", "xformers", "gather") if unavailable_reason(b, torch.device("cpu")) is None]


def _qkv(B, H, N, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g) for _ in range(3)]


def test_layout_round_trip_with_padding_and_text():
    lay = build_layout((3, 5, 7), 9, True, 16)  # nothing divides: edge tiles padded, text padded
    assert lay.padded % 16 == 0 and int(lay.valid.sum()) == 3 * 5 * 7 + 9
    x = torch.randn(2, 2, lay.n_tokens, 4)
    assert torch.equal(from_blocks(to_blocks(x, lay), lay), x)


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("grid,text", [((2, 4, 8), 0), ((3, 5, 7), 11)])
def test_all_ones_mask_is_dense_attention(backend, grid, text):
    lay = build_layout(grid, text, False, 16)
    q, k, v = _qkv(2, 3, lay.n_tokens, 16)
    scale = 1 / math.sqrt(16)
    ref = F.scaled_dot_product_attention(q, k, v)
    out = from_blocks(run(backend, to_blocks(q, lay), to_blocks(k, lay), to_blocks(v, lay), dense_mask(lay),
                          scale, flex_compile=False), lay)
    assert (out - ref).abs().max() < 1e-5


@pytest.mark.parametrize("kind", STATIC)
@pytest.mark.parametrize("density", [0.5, 0.25, 0.125])
def test_realised_density_equals_configured(kind, density):
    lay = build_layout((4, 16, 16), 0, True, 16)  # 64 tiles: every density is a whole number of tiles
    video = video_pattern(lay, kind, density)
    assert video.sum(-1).eq(round(density * 64)).all()  # every row, not only on average
    assert static_mask(lay, kind, density, 1, 0.5).video_density() == density
    assert video.diagonal().all() or kind == "radial"  # a tile sees itself (radial: sinks may take the slot)


def test_topk_density_is_capped_and_follows_scores():
    lay = build_layout((4, 8, 8), 0, True, 16)
    q, k, _ = _qkv(1, 2, lay.n_tokens, 16)
    m = topk_mask(to_blocks(q, lay), to_blocks(k, lay), lay, 0.25, 0.99, 0.25)
    assert m.video_density() <= 0.25 + 1e-9
    assert m.allowed[..., : lay.n_video_blocks, : lay.n_video_blocks].diagonal(dim1=-2, dim2=-1).all()


def test_masks_are_built_once_per_shape():
    a = static_mask(build_layout((2, 8, 8), 5, True, 16), "tile", 0.5, 1, 0.5)
    b = static_mask(build_layout((2, 8, 8), 5, True, 16), "tile", 0.5, 1, 0.5)
    assert a is b


@pytest.mark.parametrize("pattern", ["tile", "radial", "global_local", "spatial_temporal", "topk"])
@pytest.mark.parametrize("text_first", [True, False])
def test_text_tokens_attend_and_are_attended_densely(pattern, text_first):
    grid, text, T = (4, 4, 8), 10, 16
    engine = SparseAttention(AttentionConfig(pattern=pattern, backend="flex", density=0.25, block_size=T,
                                             flex_compile=False), "flex")
    N = 128 + text
    q, k, v = _qkv(2, 2, N, 16, seed=1)
    scale = 0.25
    out = engine.attend(q, k, v, scale, "site", grid, text, text_first)
    is_text = torch.zeros(N, dtype=torch.bool)
    is_text[:text] = text_first
    is_text[N - text:] = not text_first
    dense = F.scaled_dot_product_attention(q, k, v, scale=scale)
    # text rows: every key, exactly
    assert (out[:, :, is_text] - dense[:, :, is_text]).abs().max() < 1e-5
    # video rows: the reference built in model order from the block mask, with text columns always on
    lay = build_layout(grid, text, text_first, T)
    mask = engine._mask("site", lay, to_blocks(q, lay), to_blocks(k, lay), scale).allowed
    tile_of = lay.scatter // T
    tok = mask[..., tile_of[:, None], tile_of[None, :]]
    assert tok[..., is_text].all() and tok[..., is_text, :].all()
    video_only = mask[..., : lay.n_video_blocks, : lay.n_video_blocks]
    assert video_only.float().mean() < 0.5  # it really is sparse among video tiles
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=tok, scale=scale)
    assert (out - ref).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["tile", "radial", "global_local", "topk", "per_head"])
@pytest.mark.parametrize("grid,text", [((4, 8, 8), 0), ((3, 5, 7), 11)])
def test_gather_backend_matches_masked_dense(kind, grid, text):
    """The CPU gather path against SDPA with the expanded token mask: padded tiles, text rows, per-head masks."""
    lay = build_layout(grid, text, True, 16)
    q, k, v = (to_blocks(x, lay) for x in _qkv(2, 3, lay.n_tokens, 16, seed=5))
    if kind == "topk":  # per batch and head, rows of different lengths
        m = topk_mask(q, k, lay, 0.5, 0.6, 0.25)
    elif kind == "per_head":
        a, b = (static_mask(lay, p, 0.25, 0, 1.0).allowed for p in ("tile", "radial"))
        m = SparseMask(torch.where(torch.tensor([True, False, True])[None, :, None, None], a, b), lay)
    else:
        m = static_mask(lay, kind, 0.25, 1, 0.5)
    ref = run("sdpa", q, k, v, m, 0.25)
    out = backends._gather(q, k, v, m, 0.25, chunk_floats=4096)  # small chunks: several loop iterations
    valid = lay.valid
    assert (out[:, :, valid] - ref[:, :, valid]).abs().max() < 1e-5
    assert m.video_density() < 0.6


def test_renorm_moves_sparse_output_towards_dense():
    # smooth keys: attention is diffuse, the case where lost mass biases sparse outputs most
    grid, T = (4, 8, 8), 16
    q, k, v = _qkv(1, 4, 256, 16, seed=3)
    q, k = q * 0.3, k * 0.3
    dense = F.scaled_dot_product_attention(q, k, v)
    errs = {}
    for renorm in (False, True):
        cfg = AttentionConfig(pattern="tile", backend="flex", density=0.25, block_size=T, renorm=renorm,
                              flex_compile=False, profile_rows=64)
        out = SparseAttention(cfg, "flex").attend(q, k, v, 0.25, "s", grid, 0, True)
        errs[renorm] = float((out - dense).pow(2).mean())
    assert errs[True] < 0.7 * errs[False], errs


TRITON_SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch, torch.nn.functional as F
    from accel.attention.backends import run, unavailable_reason
    from accel.attention.layout import build_layout, to_blocks, from_blocks
    from accel.attention.patterns import dense_mask, static_mask, topk_mask
    assert unavailable_reason("triton", torch.device("cpu")) is None
    worst = 0.0
    # the second case pads every edge tile and the text block, and has a head size that is not a power of 2
    for grid, text, T, D, masks in [((2, 4, 4), 0, 16, 16, ("tile",)), ((3, 5, 3), 9, 16, 24, ("radial", "topk"))]:
        lay = build_layout(grid, text, True, T)
        g = torch.Generator().manual_seed(T + D)
        q, k, v = [to_blocks(torch.randn(2, 1, lay.n_tokens, D, generator=g), lay) for _ in range(3)]
        s = D ** -0.5
        dense = F.scaled_dot_product_attention(from_blocks(q, lay), from_blocks(k, lay), from_blocks(v, lay))
        tri = from_blocks(run("triton", q, k, v, dense_mask(lay), s), lay)
        worst = max(worst, float((tri - dense).abs().max()))
        for name in masks:
            m = topk_mask(q, k, lay, 0.5, 0.9, s) if name == "topk" else static_mask(lay, name, 0.5, 1, 0.5)
            a = run("triton", q, k, v, m, s)
            b = run("flex", q, k, v, m, s, flex_compile=False)
            valid = lay.valid
            worst = max(worst, float((a[:, :, valid] - b[:, :, valid]).abs().max()))
    print("WORST", worst)
    assert worst < 1e-5, worst
""")


def test_triton_kernel_matches_flex_under_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "WORST" in r.stdout
