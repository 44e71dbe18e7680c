"""Token merging / pruning benchmark: latency ratios and fidelity, side by side in one run.

Part 1, SD1.5-shaped UNet (``shape:sd15``, the real SD1.5 config: 320/640/1280/1280, 8 heads, 768-d
text; RANDOM weights, seed 0) at 512 px (64x64 latent, 4096 tokens at the top level) and 1024 px (128x128
latent, 16384 tokens), batch 1 (``--cfg``: batch 2 with CFG): baseline, tomesd (PyPI)
at 0.3 / 0.5, ours at the same ratios with tomesd's defaults (merge before self-attention, top
level only).
Part 2, Wan-shaped video transformer (``shape:wan-1.3b``, Wan 2.1 1.3B widths: 12 heads x 128, FFN
8960; 1 block instead of 30 by default, random weights) at 4 x 32 x 32 = 4096 video tokens: baseline, merge, KV
downsampling, cached pruning.

Each configuration runs the same short denoising loop (a structured, partly noised latent, a few
Euler/DDIM-like steps) from the same seed; latency is the median over repeats of the whole loop,
configurations interleaved per repeat (the machine is shared). Fidelity: PSNR / SSIM of the final
update (x_final - x0, first 3 channels, mapped to [0, 1] with the baseline's range) against the baseline.

    python benchmarks/bench_tokens.py --part unet512   # ~5 min on 2 quiet CPU cores
    python benchmarks/bench_tokens.py --part unet1024  # ~8 min (1 step, 1 repeat)
    python benchmarks/bench_tokens.py --part dit       # ~8 min (3 steps = one refresh period)
    python benchmarks/bench_tokens.py --part dit_long  # 8192 tokens: baseline vs kv_downsample
    python benchmarks/bench_tokens.py --quick          # smaller, fewer repeats (~3 min)
"""

from __future__ import annotations

import argparse
import os

import torch

import accel
from accel.eval.clock import measure, median, round_robin
from accel.eval.metrics import psnr, ssim
from accel.pipelines import sized


def _as_image(lat, lo, hi):
    x = lat[0, :3] if lat.ndim == 4 else lat[0, :3, 0]
    return ((x - lo) / (hi - lo)).clamp(0, 1).permute(1, 2, 0).numpy()


def _fidelity(base, out):
    lo, hi = float(base.min()), float(base.max())
    a, b = _as_image(base, lo, hi), _as_image(out, lo, hi)
    return psnr(a, b), ssim(a, b)


def _sharpen(model, factor=3.0, gate=1.0):
    """Make random weights behave more like trained ones where it matters to token reduction.

    Freshly initialised attention is almost uniform (logit std ~0.3 for SD1.5's layout, ~1 after
    Wan's q/k RMS norms), and uniform attention averages tokens anyway, so merging them looks
    free: fidelity would be inflated. Queries and keys are scaled (``factor`` on each: logits
    x9 for SD1.5, to std ~3; the norm weights x``factor ** 0.5`` for Wan, to std ~3), and DiT
    residual gates get ``+gate`` so each block's update is not damped by its random modulation.
    """
    with torch.no_grad():
        for m in model.modules():
            nq, nk = getattr(m, "norm_q", None), getattr(m, "norm_k", None)
            if getattr(nq, "weight", None) is not None and getattr(nk, "weight", None) is not None:
                nq.weight.mul_(factor ** 0.5)
                nk.weight.mul_(factor ** 0.5)
            elif hasattr(m, "to_q") and hasattr(m, "to_k"):
                for lin in (m.to_q, m.to_k):
                    lin.weight.mul_(factor)
                    if lin.bias is not None:
                        lin.bias.mul_(factor)
            table = getattr(m, "scale_shift_table", None)
            if table is not None and table.ndim == 3 and table.shape[1] == 6:  # Wan: shift, scale, gate x2
                table[:, 2].add_(gate)
                table[:, 5].add_(gate)


def _structured_latent(shape, seed):
    """A smooth random field plus noise: structure for the matching to find, as in a real latent."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(*shape[:-2], max(1, shape[-2] // 8), max(1, shape[-1] // 8), generator=g)
    flat = low.reshape(-1, 1, *low.shape[-2:])
    smooth = torch.nn.functional.interpolate(flat, size=shape[-2:], mode="bicubic", align_corners=False)
    return smooth.reshape(shape) + 0.5 * torch.randn(shape, generator=g)


def _run_loop(model, x0, step_fn, steps):
    """The denoiser's total update to the latent (x_final - x0): fidelity is measured on what the
    model contributed, not on the input it started from (which would inflate PSNR)."""
    x = x0.clone()
    with torch.no_grad():
        for i in range(steps):
            x = step_fn(model, x, i)
    return x - x0


def _measure(configs, make_run, repeats, title=None):
    """configs: {label: (apply_fn, remove_fn)}; returns {label: (median CPU s, median wall s, output)}.

    Configurations are interleaved (round robin per repeat). The speed figure is the process's
    CPU time: on a shared machine wall time swings with other jobs' load; wall is shown beside it.
    """

    def row(on, off):
        on()
        try:
            return measure(make_run)
        finally:
            off()

    def progress(rep, label, sample):
        print(f"  [{rep + 1}/{repeats}] {label}: cpu {sample.seconds:.1f} s, wall {sample.wall_s:.1f} s, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)

    def results(samples):
        return {k: (median(s, "seconds"), median(s, "wall_s"), s[-1].out) for k, s in samples.items()}

    def partial(rep, samples):
        if title and rep + 1 < repeats:  # a usable table even if a long run is stopped early
            _table(f"{title} (after {rep + 1} of {repeats} repeats)", results(samples))

    samples, _ = round_robin({label: (lambda on=on, off=off: row(on, off)) for label, (on, off) in configs.items()},
                             repeats, after=progress, after_round=partial)
    return results(samples)


def _table(title, results, baseline="baseline"):
    base_c, base_w, base_out = results[baseline]
    print(f"\n{title}")
    print("| setting | median CPU s | speed-up (CPU) | median wall s | speed-up (wall) | PSNR dB | SSIM |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, (c, w, out) in results.items():
        if label == baseline:
            print(f"| {label} | {c:.1f} | 1.00x | {w:.1f} | 1.00x | - | - |")
            continue
        p, s = _fidelity(base_out, out)
        print(f"| {label} | {c:.1f} | {base_c / c:.2f}x | {w:.1f} | {base_w / w:.2f}x | {p:.1f} | {s:.3f} |")
    print(flush=True)


# --- part 1: SD1.5 UNet ------------------------------------------------------------------------

def bench_unet(size, steps, repeats, ratios, cfg_batch=True, like_tomesd=False, only=None):
    unet = sized.make("sd15").unet
    _sharpen(unet)
    lat = size // 8
    batch = 2 if cfg_batch else 1
    x0 = _structured_latent((1, 4, lat, lat), 1)
    text = torch.randn(batch, 77, 768, generator=torch.Generator().manual_seed(2))
    timesteps = torch.linspace(600, 200, steps).long()

    def step(model, x, i):  # CFG: the two halves [uncond, cond] share the latent
        eps = model(x.repeat(batch, 1, 1, 1), timesteps[i], encoder_hidden_states=text).sample
        if cfg_batch:
            eps = eps[:1] + 7.5 * (eps[1:] - eps[:1])  # CFG halves [uncond, cond]
        return (x - 0.1 * eps).detach()

    configs = {"baseline": (lambda: None, lambda: None)}
    try:
        import tomesd

        for r in ratios:
            configs[f"tomesd {r}"] = (lambda r=r: tomesd.apply_patch(unet, ratio=r), lambda: tomesd.remove_patch(unet))
    except ImportError:
        print("tomesd not installed (pip install --no-deps tomesd): peer rows skipped")
    for r in ratios:
        configs[f"ours merge {r}"] = (lambda r=r: accel.apply(unet, {"tokens": {"ratio": r}}),
                                      lambda: accel.remove(unet))
    if like_tomesd:  # tomesd's matching: a new one in every block; no random destinations at odd batches
        for r in ratios:
            cfg = {"ratio": r, "match_per_block": True, "use_rand": batch % 2 == 0}
            configs[f"ours merge {r} per-block"] = (lambda cfg=cfg: accel.apply(unet, {"tokens": cfg}),
                                                    lambda: accel.remove(unet))
    if only:  # a subset of rows (plus the baseline), e.g. a re-run of the like-for-like rows
        configs = {k: v for k, v in configs.items() if k == "baseline" or k in only}
    title = (f"SD1.5-shaped UNet (random weights), {size} px ({lat}x{lat} latent, {lat * lat} top-level tokens), "
             f"batch {batch}{' (CFG)' if cfg_batch else ''}, {steps} steps")
    res = _measure(configs, lambda: _run_loop(unet, x0, step, steps), repeats, title)
    _table(f"{title}, median of {repeats}", res)
    return res


# --- part 2: Wan-shaped video DiT --------------------------------------------------------------

def bench_dit(grid, layers, steps, repeats, refresh, methods=None):
    model = sized.make("wan-1.3b", overrides={"num_layers": layers}).transformer
    _sharpen(model)
    f, h, w = grid
    x0 = _structured_latent((1, 16, f, 2 * h, 2 * w), 1)
    text = torch.randn(1, 64, 4096, generator=torch.Generator().manual_seed(2)) * 0.1
    timesteps = torch.linspace(800, 300, steps)

    def step(m, x, i):
        v = m(x, timesteps[i : i + 1], encoder_hidden_states=text).sample
        return (x - 0.1 * v).detach()

    def tokens(**kw):
        return (lambda: accel.apply(model, {"tokens": kw}), lambda: accel.remove(model))

    configs = {"baseline": (lambda: None, lambda: None)}
    for r in (0.3, 0.5):
        configs[f"merge {r}"] = tokens(ratio=r)
    configs["kv_downsample 0.75"] = tokens(ratio=0.75, method="kv_downsample")
    for r in (0.5, 0.75):
        configs[f"prune {r} (refresh {refresh})"] = tokens(ratio=r, method="prune", refresh_interval=refresh)
    title = (f"Wan-shaped DiT (Wan 2.1 1.3B widths, {layers} blocks, random weights), {f}x{h}x{w} = {f * h * w} "
             f"video tokens, batch 1, {steps} steps")
    if methods:
        configs = {k: v for k, v in configs.items() if k == "baseline" or k in methods}
    res = _measure(configs, lambda: _run_loop(model, x0, step, steps), repeats, title)
    _table(f"{title}, median of {repeats}", res)
    return res


PARTS = ("unet512", "unet1024", "dit", "dit_long", "matching")


# --- part 3: the matching itself, ours vs tomesd --------------------------------------------

def bench_matching(size=1024, channels=320, repeats=5, ratios=(0.3, 0.5)):
    """Per-block cost of building a matching and of merge + unmerge at SD1.5's top level
    (``size`` px -> (size/8)^2 tokens of ``channels``), ours vs tomesd, fixed destinations."""
    from accel.tokens import matching

    h = w = size // 8
    x = torch.randn(1, h * w, channels, generator=torch.Generator().manual_seed(0))
    windows = matching.Windows((1, h, w), (1, 2, 2), x.device)

    def cpu_ms(fn):
        fn()
        return sum(measure(fn).seconds for _ in range(repeats)) / repeats * 1e3

    print(f"\nMatching at {h * w} tokens x {channels} channels (SD1.5 top level at {size} px), "
          f"CPU ms per block, mean of {repeats}")
    print("| ratio | tomesd matching | ours matching | tomesd merge+unmerge | ours merge+unmerge |")
    print("| --- | --- | --- | --- | --- |")
    try:
        from tomesd.merge import bipartite_soft_matching_random2d
    except ImportError:
        bipartite_soft_matching_random2d = None
    for ratio in ratios:
        r = int(h * w * ratio)
        cols = ["-", "-"]
        if bipartite_soft_matching_random2d is not None:
            def peer(r=r):
                return bipartite_soft_matching_random2d(x, w, h, 2, 2, r, no_rand=True)

            pm, pu = peer()
            cols = [f"{cpu_ms(peer):.0f}", f"{cpu_ms(lambda pm=pm, pu=pu: pu(pm(x))):.0f}"]
        ours = matching.bipartite(x, windows, r, False, None)
        t_match = cpu_ms(lambda r=r: matching.bipartite(x, windows, r, False, None))
        t_mu = cpu_ms(lambda m=ours: m.unmerge(m.merge(x)))
        print(f"| {ratio} | {cols[0]} | {t_match:.0f} | {cols[1]} | {t_mu:.0f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats (smoke run)")
    ap.add_argument("--part", choices=PARTS, nargs="*", default=None, help="which tables (default: all)")
    ap.add_argument("--steps", type=int, default=None, help="steps (UNet 2, 1 at 1024 px; DiT 3, 2 at 8192 tokens)")
    ap.add_argument("--repeats", type=int, default=None, help="repeats (default 2; 1 at 1024 px)")
    ap.add_argument("--cfg", action="store_true", help="UNet: batch 2 with CFG (default batch 1)")
    ap.add_argument("--like-tomesd", action="store_true",
                    help="UNet: add ours with tomesd's matching (per block; fixed destinations at batch 1)")
    ap.add_argument("--rows", nargs="+", default=None, help="UNet: only these rows (and the baseline)")
    ap.add_argument("--layers", type=int, default=1, help="DiT depth (Wan 2.1 1.3B: 30)")
    ap.add_argument("--threads", type=int, default=min(torch.get_num_threads(), 2),
                    help="torch threads (1: the CPU time does not inflate with other jobs' load)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU, load {os.getloadavg()}")
    parts = args.part or PARTS
    if args.quick:
        bench_unet(256, steps=2, repeats=2, ratios=(0.3, 0.5))
        bench_dit((2, 16, 32), layers=1, steps=3, repeats=2, refresh=3)
        return
    if "unet512" in parts:
        bench_unet(512, steps=args.steps or 2, repeats=args.repeats or 2, ratios=(0.3, 0.5), cfg_batch=args.cfg,
                   like_tomesd=args.like_tomesd, only=args.rows)
    if "unet1024" in parts:
        bench_unet(1024, steps=args.steps or 1, repeats=args.repeats or 1, ratios=(0.3, 0.5), cfg_batch=args.cfg,
                   like_tomesd=args.like_tomesd, only=args.rows)
    if "dit" in parts:
        bench_dit((4, 32, 32), layers=args.layers, steps=args.steps or 3, repeats=args.repeats or 2, refresh=3)
    if "matching" in parts:
        bench_matching(repeats=args.repeats or 5)
    if "dit_long" in parts:  # KV pooling pays off as attention's share grows with the token count
        bench_dit((8, 32, 32), layers=args.layers, steps=args.steps or 2, repeats=args.repeats or 1, refresh=3,
                  methods=("kv_downsample 0.75",))
    print(f"load at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
