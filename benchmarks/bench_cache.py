"""Step caching: baseline vs our methods vs peers, side by side in one run.

Models (random weights, real architectures' layouts; see the notes printed with the table):

* UNet: SD1.5's UNet layout (4 levels, 2 layers each, cross-attention at the top 3 levels, 8 heads,
  768-d text) at reduced channel width, in a StableDiffusionPipeline with CFG (batched), DDIM.
  Peer: ``DeepCache`` (DeepCacheSDHelper).
* DiT: Flux's transformer layout (dual-stream then single-stream blocks, 128-d heads, RoPE, guidance
  embedding) at reduced depth and width, in a FluxPipeline. Peers: diffusers' FirstBlockCache and
  ``para-attn``'s first block cache.

Every row reports the median latency of the whole pipeline call over repeats, the ratio to the
baseline's median (>1 is faster) and PSNR/SSIM of the output against the baseline of the same seed.

    python benchmarks/bench_cache.py            # full run (~15 min on 2 busy CPU cores)
    python benchmarks/bench_cache.py --quick    # a smoke run
    # the issue's sizes: SD1.5 width at 512 px, 25 steps; Flux width (24 heads) at reduced depth
    python benchmarks/bench_cache.py --threads 1 --repeats 2 --peers-only --unet-width 320 --unet-px 512 \
        --flux-heads 24 --flux-dual 1 --flux-single 2 --flux-px 256
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from timing import median, round_robin, timed  # noqa: E402

import accel  # noqa: E402
from accel.eval.metrics import compare  # noqa: E402
from accel.pipelines import tiny  # noqa: E402


def sd15_pipe(width: int):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, block_out_channels=tuple(width * m for m in (1, 2, 4, 4)), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8)  # SD1.5: 8 heads (the field means heads here)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(32,) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=32)
    tok = tiny._clip_tokenizer()
    text = tiny._clip_text(tok, hidden=768)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=tiny._sd_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for m in (unet, vae, text):
        m.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_pipe(heads: int, dual: int, single: int):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=dual, num_single_layers=single, attention_head_dim=128,
        num_attention_heads=heads, joint_attention_dim=512, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(32,) * 4, layers_per_block=1, latent_channels=16, norm_num_groups=32,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
    tok, tok2 = tiny._clip_tokenizer(), tiny._t5_tokenizer()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                        text_encoder=tiny._clip_text(tok, hidden=768), tokenizer=tok,
                        text_encoder_2=tiny._t5_text(tok2, d_model=512), tokenizer_2=tok2, transformer=transformer)
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(out):
    return np.asarray(out.images)


def measure(pipe, kwargs, setup=None, teardown=None):
    """(CPU seconds, wall seconds, output, stats) of one call (`timing.timed`); `run_rows` takes the
    medians."""
    if setup:
        setup()
    try:
        cpu, wall, out = timed(lambda: _images(pipe(**kwargs, generator=torch.Generator().manual_seed(0))))
        st = accel.stats(pipe).get("cache", {}) if accel.is_applied(pipe) else {}
    finally:
        if teardown:
            teardown()
    return cpu, wall, out, st


def table(title, rows, notes):
    print(f"\n### {title}\n")
    for n in notes:
        print(f"- {n}")
    print("\n| setting | median CPU s | speedup (CPU) | median wall s | PSNR dB | SSIM | reused/computed |")
    print("|---|---|---|---|---|---|---|")
    base_t = rows[0][1]
    base_out = rows[0][3]
    for name, t, wall, out, st, err in rows:
        if err:
            print(f"| {name} | - | - | - | - | - | could not run: {err} |")
            continue
        c = compare(base_out, out)
        p = "inf" if c["psnr"] is None else f"{c['psnr']:.1f}"
        hits = f"{st['reused']}/{st['computed']}" if st and "reused" in st else ""
        print(f"| {name} | {t:.2f} | {base_t / t:.2f}x | {wall:.1f} | {p} | {c['ssim']:.3f} | {hits} |")
    sys.stdout.flush()


def run_rows(pipe, kwargs, repeats, variants):
    """Every row ``repeats`` times, round-robin: repeat r of every row runs before repeat r+1 of
    any, so the machine's load drift hits every row alike. A row that raises (a peer that cannot
    run here) is reported with its error and dropped from later rounds."""
    pipe(**kwargs, generator=torch.Generator().manual_seed(0))  # untimed warm-up: first-call set-up costs
    # own: a separate pipeline copy for a peer that patches
    fns = {name: (lambda p=(own[0] if own else pipe), su=setup, td=teardown: measure(p, kwargs, su, td))
           for name, setup, teardown, *own in variants}
    first = {}

    def progress(r, name, sample):
        base = first.setdefault("out", sample[2])  # the baseline is the first row
        print(f"  [{r + 1}/{repeats}] {name}: {sample[0]:.2f} CPU s, {compare(base, sample[2])}",
              file=sys.stderr, flush=True)

    samples, errors = round_robin(fns, repeats, catch=True, after=progress)
    rows = []
    for name, *_ in variants:
        runs = samples[name]
        if name in errors:
            rows.append((name, 0, 0, None, None, errors[name]))
            continue
        rows.append((name, median(runs, 0), median(runs, 1), runs[-1][2], runs[-1][3], None))
    return rows


def ours(pipe, cfg):
    return (lambda: accel.apply(pipe, {"cache": cfg}), lambda: accel.remove(pipe))


def bench_unet(args):
    pipe = sd15_pipe(args.unet_width)
    kwargs = dict(prompt="a photo of a cat riding a horse on the moon", negative_prompt="blurry, low quality",
                  height=args.unet_px, width=args.unet_px, num_inference_steps=args.unet_steps, guidance_scale=7.5,
                  output_type="np")

    def deepcache_peer(interval, branch_id):
        from DeepCache import DeepCacheSDHelper

        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=branch_id)
        return (helper.enable, helper.disable)

    variants = [("baseline", None, None)]
    for interval in args.intervals:
        variants.append((f"ours deepcache interval={interval} branch=1", *ours(pipe, dict(method="deepcache",
                                                                                          interval=interval))))
        variants.append((f"peer DeepCache interval={interval} branch_id=0", *deepcache_peer(interval, 0)))
    if not args.peers_only:
        variants.append(("ours deepcache interval=3 branch=2",
                         *ours(pipe, dict(method="deepcache", interval=3, branch=2))))
    variants.append(("ours deepcache interval=5 nonuniform", *ours(pipe, dict(method="deepcache", interval=5,
                                                                                schedule="nonuniform"))))
    rows = run_rows(pipe, kwargs, args.repeats, variants)
    table("SD1.5-shaped UNet", rows, [
        f"UNet2DConditionModel with SD1.5's layout (4 levels x 2 layers, attention at 3 levels, 8 heads, "
        f"768-d text) at channel width {args.unet_width} (SD1.5: 320), random weights",
        f"{args.unet_px} px ({args.unet_px // 8}x{args.unet_px // 8} latent), {args.unet_steps} DDIM steps, "
        f"CFG 7.5 (batched), median of {args.repeats}; speedup from process CPU time (see measure())",
    ])


def bench_flux(args):
    if args.flux_from:  # a trained Flux pipeline (e.g. ref-dit), called with its own defaults
        from accel.pipelines import ref
        from accel.pipelines.load import load

        pipe = load(args.flux_from, device="cpu")
        pipe.set_progress_bar_config(disable=True)
        name = os.path.basename(os.path.normpath(args.flux_from))
        kwargs = {**ref.call_defaults(name), "prompt": "a big red circle in the center on a white background",
                  "output_type": "np"}
    else:
        pipe = flux_pipe(args.flux_heads, args.flux_dual, args.flux_single)
        kwargs = dict(prompt="a photo of a cat riding a horse on the moon", height=args.flux_px, width=args.flux_px,
                      num_inference_steps=args.flux_steps, guidance_scale=3.5, max_sequence_length=64,
                      output_type="np")

    def diffusers_fbc(th):
        from diffusers import FirstBlockCacheConfig

        def setup():
            pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=th))

        def teardown():
            pipe.transformer.disable_cache()

        return (setup, teardown)

    # para-attn patches the transformer and the pipeline class and can fail mid-call: it runs on its own
    # copy of the pipeline (same weights), so a failure there cannot leave the other rows' model patched.
    para_pipe = copy.deepcopy(pipe)

    def para_attn_fbc(th):
        state = {}

        def setup():
            from para_attn.first_block_cache.diffusers_adapters import apply_cache_on_pipe

            state["call"] = type(para_pipe).__call__
            apply_cache_on_pipe(para_pipe, residual_diff_threshold=th)

        def teardown():
            para_pipe.transformer.__dict__.pop("forward", None)
            type(para_pipe).__call__ = state["call"]

        return (setup, teardown, para_pipe)

    variants = [("baseline", None, None)]
    for th in args.thresholds:
        variants.append((f"ours block threshold={th}", *ours(pipe, dict(method="block", threshold=th))))
        variants.append((f"peer diffusers FirstBlockCache threshold={th}", *diffusers_fbc(th)))
    for th in args.thresholds:
        variants.append((f"peer para-attn FBCache threshold={th}", *para_attn_fbc(th)))
    if args.peers_only:  # ours vs the peers at each threshold only
        variants = [v for v in variants if v[0] == "baseline" or "threshold=" in v[0] and "taylor" not in v[0]]
        rows = run_rows(pipe, kwargs, args.repeats, variants)
        what = (f"trained pipeline {args.flux_from}, its own call ({kwargs.get('num_inference_steps')} steps)"
                if args.flux_from else f"{args.flux_dual}+{args.flux_single} blocks, width {args.flux_heads * 128}, "
                f"{args.flux_px} px, {args.flux_steps} steps, random weights")
        table("Flux transformer: ours vs the peers", rows, [
            f"{what}; rows measured round-robin, median of {args.repeats}; CPU time"])
        return
    th = args.thresholds[-1]
    variants.append((f"ours block threshold={th} warmup=2 taylor=1",
                     *ours(pipe, dict(method="block", threshold=th, warmup_steps=2, taylor_order=1))))
    variants.append(("ours block interval=2 taylor=1",
                     *ours(pipe, dict(method="block", interval=2, warmup_steps=2, taylor_order=1))))
    variants.append(("ours block interval=3 taylor=2 last_n=1",
                     *ours(pipe, dict(method="block", interval=3, warmup_steps=2, taylor_order=2,
                                      compute_last_n=1))))
    rows = run_rows(pipe, kwargs, args.repeats, variants)
    table("Flux-shaped transformer", rows, [
        f"FluxTransformer2DModel layout (dual-stream then single-stream blocks, 128-d heads, RoPE, guidance "
        f"embedding) at {args.flux_dual}+{args.flux_single} blocks (Flux.1: 19+38) and {args.flux_heads} heads "
        f"= width {args.flux_heads * 128} (Flux.1: 24 heads = 3072), 512-d T5 stand-in, random weights",
        f"{args.flux_px} px ({(args.flux_px // 16) ** 2} image tokens + 64 text tokens), {args.flux_steps} "
        f"flow-matching Euler steps, guidance-distilled (no CFG pass), median of {args.repeats}; "
        "speedup from process CPU time",
    ])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers-only", action="store_true",
                    help="only the rows that have a peer (plus the UNet's nonuniform schedule)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                    help="torch threads (1: the CPU time does not inflate with other jobs' load)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: few steps, one repeat")
    ap.add_argument("--only", choices=("unet", "flux"), help="run one of the two models")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--unet-width", type=int, default=64)
    ap.add_argument("--unet-px", type=int, default=128)
    ap.add_argument("--unet-steps", type=int, default=25)
    ap.add_argument("--flux-heads", type=int, default=4)
    ap.add_argument("--flux-dual", type=int, default=2)
    ap.add_argument("--flux-single", type=int, default=4)
    ap.add_argument("--flux-px", type=int, default=128)
    ap.add_argument("--flux-steps", type=int, default=20)
    ap.add_argument("--flux-from", help="a trained Flux pipeline folder (e.g. accel/pipelines/ref_models/ref-dit) "
                                        "instead of the random-weight one")
    ap.add_argument("--intervals", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.4, 0.5, 0.6])
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.unet_steps, args.flux_steps, args.unet_px, args.flux_px = 1, 6, 6, 128, 128
        args.intervals, args.thresholds = [3], [0.3]
    torch.set_num_threads(max(1, args.threads))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, machine: 2-core CPU, shared/noisy")
    if args.only in (None, "unet"):
        bench_unet(args)
    if args.only in (None, "flux"):
        bench_flux(args)


if __name__ == "__main__":
    main()
