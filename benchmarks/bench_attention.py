"""Sparse attention benchmark: attention alone and a Wan-shaped transformer, dense vs sparse, one run.

    python benchmarks/bench_attention.py            # full (~12 min on a 2-core CPU)
    python benchmarks/bench_attention.py --quick    # 4k/16k only, 1 repeat, 1 Wan block

Part 1: one attention call over a video-shaped token grid (4k, 8k, 16k tokens; one head of 128,
Wan's head size), dense SDPA vs every pattern on ``flex`` (compiled) at densities 0.5/0.25/0.1.
q/k are a smooth random field over the grid plus noise, so attention is local as in real video
DiTs. Reported: median latency ratio (dense / sparse, > 1 is faster) and relative L2 error of
the output. Part 2: a WanTransformer3DModel with Wan2.1-1.3B width (1536, 12 heads of 128, FFN
8960) at reduced depth, on 8k video tokens: forward latency ratio and PSNR of its output vs dense.
Timings include our tile gather/scatter and mask lookup. Compile time is excluded (one warm-up).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

import accel
from accel.attention.config import AttentionConfig
from accel.attention.sparse import SparseAttention
from accel.eval.metrics import psnr

PATTERNS = ("tile", "spatial_temporal", "radial", "global_local", "topk")
GRIDS = {"4k": (4, 32, 32), "8k": (8, 32, 32), "16k": (16, 32, 32)}


def _median_time(fn, repeats: int):
    """(median seconds, last output); one untimed warm-up call compiles flex once per shape."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def video_qkv(grid, heads=1, dim=128, seed=0):
    """q and k share one smooth random field over the grid (plus noise), so a token's keys are most
    similar nearby, the locality that positional embeddings give real video DiTs; v is smooth too."""
    g = torch.Generator().manual_seed(seed)
    F_, H, W = grid

    def field():
        coarse = torch.randn(1, heads * dim, max(1, F_ // 2), max(1, H // 4), max(1, W // 4), generator=g)
        smooth = F.interpolate(coarse, size=grid, mode="trilinear", align_corners=False)
        return smooth.view(heads, dim, -1).transpose(1, 2)[None]

    shared, noise = field(), lambda: 0.5 * torch.randn(1, heads, F_ * H * W, dim, generator=g)
    q, k = shared + noise(), shared + noise()
    return q.contiguous(), k.contiguous(), (field() + noise()).contiguous()


def check_compiled_flex(grid):
    """The compiled and the eager flex paths agree (the tests run eager; the benchmark times compiled)."""
    q, k, v = video_qkv(grid)
    outs = [SparseAttention(AttentionConfig(pattern="tile", backend="flex", density=0.25, flex_compile=c), "flex")
            .attend(q, k, v, q.shape[-1] ** -0.5, "s", grid, 0, True) for c in (True, False)]
    return float((outs[0] - outs[1]).abs().max())


def attention_table(sizes, densities, repeats):
    rows = []
    for size in sizes:
        grid = GRIDS[size]
        q, k, v = video_qkv(grid)
        scale = 1 / math.sqrt(q.shape[-1])
        t_dense, dense_out = _median_time(lambda: F.scaled_dot_product_attention(q, k, v), repeats)
        rows.append((size, "dense sdpa", 1.0, t_dense, 1.0, 0.0))
        for pattern in PATTERNS:
            for d in densities:
                eng = SparseAttention(AttentionConfig(pattern=pattern, backend="flex", density=d), "flex")
                run = lambda: eng.attend(q, k, v, scale, "site", grid, 0, True)  # noqa: E731
                t, out = _median_time(run, repeats)
                err = float((out - dense_out).norm() / dense_out.norm())
                rows.append((size, pattern, eng.stats()["realised_density"], t, t_dense / t, err))
                print(f"  {size:>4} {pattern:<17} d={d:<5} {t * 1e3:8.1f} ms  x{t_dense / t:5.2f}  err {err:.4f}",
                      flush=True)
    return rows


def wan_model(blocks: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                                 in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                                 num_layers=blocks, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 rope_max_seq_len=1024).eval()


def wan_table(blocks, repeats, settings):
    model = wan_model(blocks)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 8, 64, 64, generator=g)  # 8 x 32 x 32 = 8192 tokens after 1x2x2 patches
    # a smooth latent, as a partly denoised video is, so attention is local
    x = F.interpolate(torch.randn(1, 16, 4, 16, 16, generator=g), size=(8, 64, 64), mode="trilinear") + 0.3 * x
    text = torch.randn(1, 64, 4096, generator=g)
    t = torch.tensor([500])

    def fwd():
        with torch.no_grad():
            return model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]

    t_dense, ref = _median_time(fwd, repeats)
    lo, hi = float(ref.min()), float(ref.max())
    norm = lambda a: ((a - lo) / (hi - lo)).clamp(0, 1).numpy()  # noqa: E731
    rows = [("dense sdpa", 1.0, t_dense, 1.0, math.inf)]
    for name, fields in settings:
        accel.apply(model, {"attention": fields})
        tt, out = _median_time(fwd, repeats)
        st = accel.stats(model)["attention"]
        accel.remove(model)
        p = psnr(norm(ref), norm(out))
        rows.append((name, st["realised_density"], tt, t_dense / tt, p))
        print(f"  wan {name:<28} {tt:7.2f} s  x{t_dense / tt:5.2f}  PSNR {p:.1f} dB", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4k and 16k only, 1 repeat, 1 Wan block")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    sizes = ("4k", "16k") if a.quick else ("4k", "8k", "16k")
    repeats = 1 if a.quick else 3
    print(f"# compiled vs eager flex, max abs diff: {check_compiled_flex((2, 16, 16)):.2e}")
    print(f"# attention alone (flex compiled, {a.threads} threads)")
    att = attention_table(sizes, (0.5, 0.25, 0.1), repeats)
    settings = [(f"{p} d={d}", {"pattern": p, "backend": "flex", "density": d})
                for p, d in (("tile", 0.5), ("tile", 0.25), ("radial", 0.25), ("global_local", 0.25), ("topk", 0.25),
                             ("spatial_temporal", 0.25))]
    settings.append(("tile d=0.25 renorm", {"pattern": "tile", "backend": "flex", "density": 0.25, "renorm": True}))
    print("# Wan-shaped transformer (1536 wide, 12 heads), 8192 video tokens")
    wan = wan_table(1 if a.quick else 2, repeats, settings)
    print("\n| tokens | pattern | density | median ms | speed-up vs dense | rel. L2 error |")
    print("|---|---|---|---|---|---|")
    for size, pat, d, t, r, e in att:
        print(f"| {size} | {pat} | {d:.3f} | {t * 1e3:.1f} | {r:.2f} | {e:.4f} |")
    print("\n| Wan-shaped, 8k tokens | density | median s | speed-up vs dense | PSNR dB |")
    print("|---|---|---|---|---|")
    for name, d, t, r, p in wan:
        print(f"| {name} | {d:.3f} | {t:.2f} | {r:.2f} | {p:.1f} |")


if __name__ == "__main__":
    main()
