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
    lay = build_layout((3, 5, 7), 9, True, 16)  # nothing divides: edge tiles share blocks, text padded
    assert lay.padded % 16 == 0 and int(lay.valid.sum()) == 3 * 5 * 7 + 9
    x = torch.randn(2, 2, lay.n_tokens, 4)
    assert torch.equal(from_blocks(to_blocks(x, lay), lay), x)


@pytest.mark.parametrize("grid,text", [((21, 30, 52), 0), ((21, 45, 80), 0), ((3, 5, 7), 9), ((16, 32, 32), 5)])
def test_layout_pads_only_the_last_video_and_text_block(grid, text):
    """Wan's 480p/720p grids are divided by no 128-token tile: padding each edge tile would cost 1.72x / 1.22x
    the block pairs. Here only the last video block and the last text block hold pads, at their end."""
    T = 128 if grid[0] > 3 else 16
    lay = build_layout(grid, text, True, T)
    n_video = math.prod(grid)
    assert lay.n_video_blocks == -(-n_video // T) and lay.n_text_blocks == -(-text // T)
    counts = lay.valid.view(lay.n_blocks, T)
    assert int(lay.block_has_pad.sum()) == (n_video % T > 0) + (text % T > 0)
    # pads at the end of a block: every block's valid slots are a prefix
    assert torch.equal(counts, torch.arange(T)[None, :] < counts.sum(1, keepdim=True))


def test_layout_blocks_are_whole_tiles_where_the_tile_divides():
    lay = build_layout((16, 32, 32), 0, True, 128)
    tok = lay.gather[: lay.n_video_blocks * 128].view(-1, 128, 1)
    f, h, w = (tok // d % m for d, m in ((1024, 16), (32, 32), (1, 32)))
    tf, th, tw = lay.tile
    # each block spans exactly one tile: tf x th x tw distinct positions
    for axis, size in ((f, tf), (h, th), (w, tw)):
        assert (axis.amax(1) - axis.amin(1) + 1).eq(size).all()


def test_masks_are_built_on_the_layout_device():
    """No host tensor in mask building: on the meta device any CPU tensor beside the layout's raises."""
    lay = build_layout((5, 6, 8), 7, True, 16).to("meta")
    for kind in STATIC:
        m = static_mask(lay, kind, 0.25, 1, 0.5)
        assert m.allowed.device.type == "meta" and m.kv_indices[1].device.type == "meta"
    assert dense_mask(lay).allowed.device.type == "meta"


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
    out = backends.get("gather").run(q, k, v, m, 0.25, chunk_floats=4096)  # small chunks: several loop iterations
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
    from accel.attention.backends import triton_model_order
    from accel.attention.kernels.block_sparse import block_sparse_attention, configs
    # the second case pads the last video block and the text block, and has a head size that is not a power of 2;
    # the third runs every launch setting, BLOCK_N below the block size included (several steps per block)
    for grid, text, T, D, masks in [((2, 4, 4), 0, 16, 16, ("tile",)), ((3, 5, 3), 9, 16, 24, ("radial", "topk")),
                                    ((3, 6, 7), 5, 32, 16, ("tile",))]:
        lay = build_layout(grid, text, True, T)
        g = torch.Generator().manual_seed(T + D)
        q, k, v = [to_blocks(torch.randn(2, 1, lay.n_tokens, D, generator=g), lay) for _ in range(3)]
        s = D ** -0.5
        dense = F.scaled_dot_product_attention(from_blocks(q, lay), from_blocks(k, lay), from_blocks(v, lay))
        tri = from_blocks(run("triton", q, k, v, dense_mask(lay), s), lay)
        worst = max(worst, float((tri - dense).abs().max()))
        valid = lay.valid
        for name in masks:
            m = topk_mask(q, k, lay, 0.5, 0.9, s) if name == "topk" else static_mask(lay, name, 0.5, 1, 0.5)
            b = run("flex", q, k, v, m, s, flex_compile=False)
            a = run("triton", q, k, v, m, s)
            worst = max(worst, float((a[:, :, valid] - b[:, :, valid]).abs().max()))
            # model order in and out through the slot -> token table (q/k/v as strided views, as processors
            # hand them over), gathering q/o, k/v or both
            ref = from_blocks(b, lay)
            qm, km, vm = (from_blocks(x, lay).transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
            for gather in (("q", "kv"), ("q",), ("kv",)):
                qi = qm if "q" in gather else q
                ki, vi = (km, vm) if "kv" in gather else (k, v)
                a = triton_model_order(qi, ki, vi, m, s, gather=gather)
                a = a if "q" in gather else from_blocks(a, lay)
                worst = max(worst, float((a - ref).abs().max()))
            if T == 32:
                num, idx = m.kv_indices
                # the interpreter ignores warps and stages: one run per tile shape
                shapes = {(c["BLOCK_M"], c["BLOCK_N"]): c for c in configs(T)}
                for c in shapes.values():
                    a = block_sparse_attention(q, k, v, num, idx, lay.block_count_i32, T, s, config=c)
                    worst = max(worst, float((a[:, :, valid] - b[:, :, valid]).abs().max()))
    # the engine's own route for triton (model order, no tiled copies) against its flex route
    from accel.attention.config import AttentionConfig
    from accel.attention.sparse import SparseAttention
    grid = (3, 6, 7)
    q, k, v = [torch.randn(2, 2, 126 + 5, 16, generator=g) for _ in range(3)]
    outs = [SparseAttention(AttentionConfig(pattern="tile", backend=b, density=0.5, block_size=32,
                                            flex_compile=False), b).attend(q, k, v, 0.25, "s", grid, 5, False)
            for b in ("triton", "flex")]
    worst = max(worst, float((outs[0] - outs[1]).abs().max()))
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


# (dtype, head size, candidate index or None for the default, model-order gathers)
COMPILE_CASES = ([("bf16", 128, None, True), ("fp16", 64, None, True), ("bf16", 72, None, True),
                  ("bf16", 128, None, False)] + [("bf16", 128, i, False) for i in range(1, 9)])


@pytest.mark.parametrize("dtype,head_dim,config,gather", COMPILE_CASES)
def test_triton_kernel_compiles_for_hopper_without_a_gpu(dtype, head_dim, config, gather):
    """The interpreter compiles nothing: build the kernel for sm_90 with triton's own compiler (ptxas ships with
    triton), at the default launch setting per head size and at the candidates of the GPU sweep, reading tiled or
    model-order tensors, so that a compile error fails CI; Hopper's matrix instruction (wgmma) must be in the PTX."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from accel.attention.kernels import block_sparse as bs

    c = bs.configs(128)[config] if config is not None else bs.config_for(torch.device("cpu"), head_dim, 128)
    consts = {"HEAD_DIM": head_dim, "D_PAD": max(16, triton.next_power_of_2(head_dim)), "MASK_BLOCK": 128,
              "BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"], "GATHER_Q": gather, "GATHER_KV": gather}
    sig = {name: ("constexpr" if name in consts else f"*{dtype}" if name in "QKVO"
                  else "*i32" if name.startswith(("KV_", "KEY_", "SLOT_")) else "fp32" if name == "qk_scale"
                  else "i32") for name in bs._block_sparse_fwd.arg_names}
    kernel = triton.compile(ASTSource(fn=bs._block_sparse_fwd, signature=sig, constexprs=consts),
                            target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": c["num_warps"], "num_stages": c["num_stages"]})
    assert kernel.asm["cubin"] and "wgmma.mma_async" in kernel.asm["ptx"]
