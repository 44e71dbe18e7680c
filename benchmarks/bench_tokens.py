"""Token merging / pruning benchmark: latency ratios and fidelity, side by side in one run.

Part 1, SD1.5-shaped UNet (real SD1.5 config, random weights) at 512 px (64x64 latent, 4096
tokens at the top level), batch 2 (CFG halves): baseline, tomesd (PyPI) at 0.3 / 0.5, ours at
the same ratios with tomesd's defaults (merge before self-attention, top level only).
Part 2, Wan-shaped video transformer (Wan 2.1 1.3B widths, reduced depth) at 4 x 32 x 32 =
4096 video tokens: baseline, merge, KV downsampling, cached pruning.

Each configuration runs the same short denoising loop (a structured, partly noised latent, a few
Euler/DDIM-like steps) from the same seed; latency is the median over repeats of the whole loop,
configurations interleaved per repeat (the machine is shared). Fidelity: PSNR / SSIM of the final
update (x_final - x0, first 3 channels, mapped to [0, 1] with the baseline's range) against the baseline.

    python benchmarks/bench_tokens.py            # ~10-15 min on 2 CPU cores
    python benchmarks/bench_tokens.py --quick    # smaller, fewer repeats (~3 min)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import accel
from accel.eval.metrics import psnr, ssim


def _as_image(lat, lo, hi):
    x = lat[0, :3] if lat.ndim == 4 else lat[0, :3, 0]
    return ((x - lo) / (hi - lo)).clamp(0, 1).permute(1, 2, 0).numpy()


def _fidelity(base, out):
    lo, hi = float(base.min()), float(base.max())
    a, b = _as_image(base, lo, hi), _as_image(out, lo, hi)
    return psnr(a, b), ssim(a, b)


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


def _measure(configs, make_run, repeats):
    """configs: {label: (apply_fn, remove_fn)}; returns {label: (median_s, output)}."""
    times = {k: [] for k in configs}
    outs = {}
    for _ in range(repeats):
        for label, (on, off) in configs.items():
            on()
            try:
                t0 = time.perf_counter()
                out = make_run()
                times[label].append(time.perf_counter() - t0)
            finally:
                off()
            outs[label] = out
    return {k: (statistics.median(v), outs[k]) for k, v in times.items()}


def _table(title, results, baseline="baseline"):
    base_t, base_out = results[baseline]
    print(f"\n{title}")
    print(f"| setting | median s | speed-up | PSNR dB | SSIM |")
    print("| --- | --- | --- | --- | --- |")
    for label, (t, out) in results.items():
        if label == baseline:
            print(f"| {label} | {t:.2f} | 1.00x | - | - |")
            continue
        p, s = _fidelity(base_out, out)
        print(f"| {label} | {t:.2f} | {base_t / t:.2f}x | {p:.1f} | {s:.3f} |")


# --- part 1: SD1.5 UNet ------------------------------------------------------------------------

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def bench_unet(size, steps, repeats, ratios):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15).eval()
    lat = size // 8
    x0 = _structured_latent((1, 4, lat, lat), 1).repeat(2, 1, 1, 1)  # CFG halves share the latent
    text = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(2))
    timesteps = torch.linspace(600, 200, steps).long()

    def step(model, x, i):
        eps = model(x, timesteps[i], encoder_hidden_states=text).sample
        eps = eps[:1] + 7.5 * (eps[1:] - eps[:1])  # CFG
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
    res = _measure(configs, lambda: _run_loop(unet, x0, step, steps), repeats)
    _table(f"SD1.5-shaped UNet, {size} px ({lat // 1}x{lat} latent), batch 2 (CFG), {steps} steps, "
           f"median of {repeats}", res)


# --- part 2: Wan-shaped video DiT --------------------------------------------------------------

def bench_dit(grid, layers, steps, repeats, ratio, refresh):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                                  in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                                  num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads").eval()
    f, h, w = grid
    x0 = _structured_latent((1, 16, f, 2 * h, 2 * w), 1)
    text = torch.randn(1, 64, 4096, generator=torch.Generator().manual_seed(2)) * 0.1
    timesteps = torch.linspace(800, 300, steps)

    def step(m, x, i):
        v = m(x, timesteps[i : i + 1], encoder_hidden_states=text).sample
        return (x - 0.1 * v).detach()

    def tokens(**kw):
        return (lambda: accel.apply(model, {"tokens": kw}), lambda: accel.remove(model))

    configs = {
        "baseline": (lambda: None, lambda: None),
        f"merge {ratio}": tokens(ratio=ratio),
        f"kv_downsample {ratio}": tokens(ratio=ratio, method="kv_downsample"),
        "kv_downsample 0.75": tokens(ratio=0.75, method="kv_downsample"),
        f"prune {ratio} (refresh {refresh})": tokens(ratio=ratio, method="prune", refresh_interval=refresh),
        f"prune 0.75 (refresh {refresh})": tokens(ratio=0.75, method="prune", refresh_interval=refresh),
    }
    res = _measure(configs, lambda: _run_loop(model, x0, step, steps), repeats)
    _table(f"Wan-shaped DiT (1.3B widths, {layers} blocks), {f}x{h}x{w} = {f * h * w} video tokens, batch 1, "
           f"{steps} steps, median of {repeats}", res)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    ap.add_argument("--size", type=int, nargs="*", default=None, help="UNet image sizes (default 512)")
    ap.add_argument("--skip-unet", action="store_true")
    ap.add_argument("--skip-dit", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU")
    if not args.skip_unet:
        for size in args.size or ([256] if args.quick else [512]):
            bench_unet(size, steps=2 if args.quick else 3, repeats=2 if args.quick else 3, ratios=(0.3, 0.5))
    if not args.skip_dit:
        grid = (2, 16, 32) if args.quick else (4, 32, 32)
        bench_dit(grid, layers=2, steps=4 if args.quick else 6, repeats=2 if args.quick else 3, ratio=0.5, refresh=3)


if __name__ == "__main__":
    main()
