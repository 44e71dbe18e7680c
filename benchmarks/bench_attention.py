"""Sparse attention benchmark: attention alone and a Wan-shaped transformer, dense vs sparse, one run.

    python benchmarks/bench_attention.py                 # 4k/8k/16k, gather + flex, Wan table (long)
    python benchmarks/bench_attention.py --quick         # 16k tile only, 1 repeat, 3 Wan settings
    python benchmarks/bench_attention.py --sizes 16k --backends gather --blocks 64,128 --wan-blocks 0
    python benchmarks/bench_attention.py --wan-only --wan-blocks 1

Part 1: one attention call over a video-shaped token grid (4k, 8k, 16k tokens; one head of 128,
Wan's head size), dense SDPA vs every pattern on ``gather`` (our CPU path: batched BLAS over
gathered key tiles) and ``flex`` (compiled FlexAttention) at densities 0.5/0.25/0.1. q/k are a
smooth random field over the grid plus noise, so attention is local as in real video DiTs.
Reported: median speed-up (dense / sparse, > 1 is faster) in process CPU time (robust to the other
jobs on a shared machine) and in wall time, and relative L2 error of the output. Part 2: a
WanTransformer3DModel with Wan2.1-1.3B width (1536, 12 heads of 128, FFN 8960) at reduced depth,
on 8192 video tokens + 64 text tokens (the shape model ``shape:wan-1.3b:num_layers=N``, random weights):
forward speed-up and PSNR of its output vs dense.
Variants are timed round-robin (one warm-up each: compile excluded), so load drift hits all alike.
Timings include our tile gather/scatter and mask lookup.
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.nn.functional as F

import accel
from accel.attention.config import AttentionConfig
from accel.attention.sparse import SparseAttention
from accel.eval.clock import measure, median, round_robin
from accel.eval.metrics import psnr
from accel.pipelines import sized

PATTERNS = ("tile", "spatial_temporal", "radial", "global_local", "topk")
GRIDS = {"4k": (4, 32, 32), "8k": (8, 32, 32), "16k": (16, 32, 32)}


def _interleaved(fns: dict, repeats: int):
    """{name: (median wall s, median process CPU s, last output)}: one untimed warm-up each (compiles flex once
    per shape), then ``repeats`` rounds over all of them in turn (`accel.eval.clock.round_robin`)."""
    for fn in fns.values():
        fn()
    samples, _ = round_robin({name: (lambda fn=fn: measure(fn)) for name, fn in fns.items()}, repeats)
    return {n: (median(s, "wall_s"), median(s, "seconds"), s[-1].out) for n, s in samples.items()}


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


def attention_table(sizes, densities, repeats, patterns, backends, blocks):
    rows = []
    for size in sizes:
        grid = GRIDS[size]
        q, k, v = video_qkv(grid)
        scale = 1 / math.sqrt(q.shape[-1])
        fns = {"dense sdpa": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)}
        engines = {}
        for backend in backends:
            for block in blocks:
                for pattern in patterns:
                    for d in densities:
                        cfg = AttentionConfig(pattern=pattern, backend=backend, density=d, block_size=block)
                        eng = engines[(backend, block, pattern, d)] = SparseAttention(cfg, backend)
                        fns[(backend, block, pattern, d)] = (
                            lambda eng=eng, q=q, k=k, v=v, s=scale, g=grid: eng.attend(q, k, v, s, "site", g, 0, True))
        res = _interleaved(fns, repeats)
        w0, c0, dense_out = res.pop("dense sdpa")
        rows.append((size, "dense sdpa", "-", "-", 1.0, w0, c0, 1.0, 1.0, 0.0))
        for (backend, block, pattern, d), (w, c, out) in res.items():
            err = float((out - dense_out).norm() / dense_out.norm())
            realised = engines[(backend, block, pattern, d)].stats()["realised_density"]
            rows.append((size, pattern, backend, block, realised, w, c, w0 / w, c0 / c, err))
            print(f"  {size:>4} {backend:<6} T={block:<3} {pattern:<17} d={d:<5} cpu {c:7.2f} s x{c0 / c:5.2f} "
                  f"wall x{w0 / w:5.2f} err {err:.4f}", flush=True)
    return rows


def wan_table(blocks, repeats, settings):
    model = sized.make("wan-1.3b", device="cpu", overrides={"num_layers": blocks}).transformer
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 8, 64, 64, generator=g)  # 8 x 32 x 32 = 8192 tokens after 1x2x2 patches
    # a smooth latent, as a partly denoised video is, so attention is local
    x = F.interpolate(torch.randn(1, 16, 4, 16, 16, generator=g), size=(8, 64, 64), mode="trilinear") + 0.3 * x
    text = torch.randn(1, 64, 4096, generator=g)
    t = torch.tensor([500])

    def fwd(fields=None):
        if fields:
            accel.apply(model, {"attention": fields})
        try:
            with torch.no_grad():
                out = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
            stats = accel.stats(model)["attention"] if fields else None
        finally:
            if fields:
                accel.remove(model)
        fwd.stats[str(fields)] = stats
        return out

    fwd.stats = {}
    fns = {"dense sdpa": fwd, **{name: (lambda f=f: fwd(f)) for name, f in settings}}
    res = _interleaved(fns, repeats)
    w0, c0, ref = res.pop("dense sdpa")
    lo, hi = float(ref.min()), float(ref.max())
    norm = lambda a: ((a - lo) / (hi - lo)).clamp(0, 1).numpy()  # noqa: E731
    rows = [("dense sdpa", 1.0, w0, c0, 1.0, 1.0, math.inf)]
    for name, fields in settings:
        w, c, out = res[name]
        st = fwd.stats[str(fields)]
        p = psnr(norm(ref), norm(out))
        rows.append((name, st["realised_density"], w, c, w0 / w, c0 / c, p))
        print(f"  wan {name:<34} cpu {c:7.2f} s x{c0 / c:5.2f} wall x{w0 / w:5.2f}  PSNR {p:.1f} dB", flush=True)
    return rows


def _g(pattern, density, block=128, **extra):
    return {"pattern": pattern, "backend": "gather", "density": density, "block_size": block, **extra}


WAN_SETTINGS = [("gather tile d=0.5 T=128", _g("tile", 0.5)),
                ("gather tile d=0.25 T=128", _g("tile", 0.25)),
                ("gather tile d=0.1 T=128", _g("tile", 0.1)),
                ("gather tile d=0.25 T=64", _g("tile", 0.25, 64)),
                ("gather radial d=0.25 T=128", _g("radial", 0.25)),
                ("gather global_local d=0.25 T=128", _g("global_local", 0.25)),
                ("gather spatial_temporal d=0.25 T=128", _g("spatial_temporal", 0.25)),
                ("gather topk d=0.25 T=128", _g("topk", 0.25)),
                ("gather tile d=0.25 T=128 renorm", _g("tile", 0.25, renorm=True)),
                ("flex tile d=0.25 T=64", {"pattern": "tile", "backend": "flex", "density": 0.25})]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16k tile only, 1 repeat, 3 Wan settings")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="4k,8k,16k")
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--backends", default="gather,flex")
    ap.add_argument("--blocks", default="64", help="block sizes (tokens per tile), comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--wan-blocks", type=int, default=1, help="transformer blocks (0: skip the Wan table)")
    ap.add_argument("--wan-only", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    sizes, patterns, backends = split(a.sizes), split(a.patterns), split(a.backends)
    blocks, repeats, wan_settings = [int(b) for b in split(a.blocks)], a.repeats, WAN_SETTINGS
    if a.quick:
        sizes, patterns, repeats, wan_settings = ["16k"], ["tile"], 1, WAN_SETTINGS[:3]
    print(f"# torch {torch.__version__}, {a.threads} threads, load average {os.getloadavg()[0]:.1f}")
    att = []
    if not a.wan_only:
        if "flex" in backends:
            print(f"# compiled vs eager flex, max abs diff: {check_compiled_flex((2, 16, 16)):.2e}")
        print("# attention alone, one head of 128")
        att = attention_table(sizes, (0.5, 0.25, 0.1), repeats, patterns, backends, blocks)
    wan = []
    if a.wan_blocks:
        print(f"# Wan-shaped transformer (1536 wide, 12 heads, {a.wan_blocks} block(s)), 8192 video tokens + 64 text")
        wan = wan_table(a.wan_blocks, repeats, wan_settings)
    print(f"# load average at the end {os.getloadavg()[0]:.1f}")
    if att:
        print("\n| tokens | pattern | backend | block | density | CPU s | speed-up (CPU) | speed-up (wall) "
              "| rel. L2 err |")
        print("|---|---|---|---|---|---|---|---|---|")
        for size, pat, be, blk, d, _w, c, rw, rc, e in att:
            print(f"| {size} | {pat} | {be} | {blk} | {d:.3f} | {c:.2f} | {rc:.2f} | {rw:.2f} | {e:.4f} |")
    if wan:
        print("\n| Wan-shaped, 8k tokens | density | CPU s | speed-up (CPU) | speed-up (wall) | PSNR dB |")
        print("|---|---|---|---|---|---|")
        for name, d, _w, c, rw, rc, p in wan:
            print(f"| {name} | {d:.3f} | {c:.1f} | {rc:.2f} | {rw:.2f} | {p:.1f} |")


if __name__ == "__main__":
    main()
