"""Step caching: baseline vs our methods vs peers, side by side in one run.

Models: shape models (`accel.pipelines.sized`, random weights, the released denoiser configs) with the
depth and width reduced for a CPU through their config overrides; the header of each table prints the
model string, which `accel bench --model` takes as it is.

* UNet: ``shape:sd15`` (4 levels, 2 layers each, cross-attention at the top 3 levels, 8 heads, 768-d
  text) at channel width ``--unet-width`` (SD1.5: 320), with CFG (batched), DDIM.
  Peer: ``DeepCache`` (`accel.eval.peers`: DeepCacheSDHelper at interval 3, branch 0).
* DiT: ``shape:flux`` (dual-stream then single-stream blocks, 128-d heads, RoPE, guidance embedding, the
  real 4096-d T5 width) at ``--flux-dual`` + ``--flux-single`` blocks and ``--flux-heads`` heads.
  Peers: diffusers' FirstBlockCache (`accel.eval.peers`' enable/disable at each ``--thresholds`` value)
  and ``para-attn``'s first block cache (benchmark-only, defined here).

Rows run on the engine of `accel bench` (`accel.eval.bench`): round-robin over ``--repeats`` after one
untimed warm-up call per row; a row's figure is the median of its repeats in process CPU time (1 thread
keeps it steady on a shared machine), its speed-up the ratio to the baseline's, and its fidelity PSNR
(median and worst call) / SSIM against the baseline's output of the same prompt and seed.

    python benchmarks/bench_cache.py            # full run (~15 min on 2 busy CPU cores)
    python benchmarks/bench_cache.py --quick    # a smoke run
    # the issue's sizes: SD1.5 width at 512 px, 25 steps; Flux width (24 heads) at reduced depth
    python benchmarks/bench_cache.py --threads 1 --repeats 2 --peers-only --unet-width 320 --unet-px 512 \
        --flux-heads 24 --flux-dual 1 --flux-single 2 --flux-px 256
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import torch

import accel
from accel.eval import bench, peers
from accel.pipelines.load import load

UNET_PROMPT = ("a photo of a cat riding a horse on the moon", "blurry, low quality")
FLUX_PROMPT = ("a photo of a cat riding a horse on the moon", None)
FLUX_TEXT_TOKENS = 64  # T5 tokens per prompt: the CPU sizes keep the text short beside 64-256 image tokens


class ParaAttnFirstBlockCache:
    """para-attn's first block cache as a peer row (``enable(pipe, steps)`` / ``disable(pipe)``). It patches
    the transformer's forward and the pipeline class's ``__call__``; ``disable`` restores both, also after a
    call that failed."""

    package = "para_attn"

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.name = f"para-attn FBCache threshold={threshold}"
        self._call = None

    def unavailable(self, pipe, family) -> str | None:
        return None if importlib.util.find_spec(self.package) else "not installed (pip install para-attn)"

    def enable(self, pipe, steps, call=None):
        from para_attn.first_block_cache.diffusers_adapters import apply_cache_on_pipe

        self._call = type(pipe).__call__
        apply_cache_on_pipe(pipe, residual_diff_threshold=self.threshold)

    def disable(self, pipe):
        pipe.transformer.__dict__.pop("forward", None)
        if self._call is not None:
            type(pipe).__call__ = self._call


def ours(label: str, cache: dict) -> bench.Row:
    return bench.Row(f"ours {label}", "config", accel.Config.from_dict({"cache": cache}))


def peer_row(work, peer, skipped: str | None = None) -> bench.Row:
    why = skipped or peer.unavailable(work.pipe, work.family)
    return bench.Row(f"peer {peer.name}", "peer", peer=peer, skipped=why)


def model_string(name: str, overrides: dict) -> str:
    def value(v):
        return "(" + ",".join(str(x) for x in v) + ")" if isinstance(v, (tuple, list)) else str(v)

    return f"shape:{name}:" + ",".join(f"{k}={value(v)}" for k, v in overrides.items())


def workload(model: str, prompt: tuple, steps: int | None, px: int | None, **extra):
    """The pipeline ``model`` on the CPU and one call of ``prompt`` (seed 0) on it."""
    pipe = load(model, device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    work = bench.workload(pipe, model, prompts=[prompt], steps=steps, height=px, width=px, device="cpu")
    for call in work.calls:
        call.kwargs.update(extra)
    return work


def report(title: str, work, results, notes) -> None:
    env = bench.environment(work.device)
    print(f"\n### {title}\n")
    for n in notes + [f"model: `{work.model}` ({type(work.pipe).__name__}); {env['device_name']}, torch "
                      f"{env['torch']}, diffusers {env['diffusers']}, commit {env['commit'] or '-'}; time: "
                      f"{env['timing']}"]:
        print(f"- {n}")
    print()
    print(bench.table(results), flush=True)
    if work.random_weights:
        print(f"\nNote: {bench.RANDOM_WEIGHTS_NOTE}.", flush=True)


def run(args, work, rows):
    results, stopped = bench.run(work, rows, repeats=args.repeats)
    if stopped:
        print("stopped early: the rows hold what was measured")
    return results


def bench_unet(args):
    w = args.unet_width
    work = workload(model_string("sd15", {"block_out_channels": (w, 2 * w, 4 * w, 4 * w)}), UNET_PROMPT,
                    args.unet_steps, args.unet_px)
    rows = [bench.Row("baseline", "baseline")]
    for interval in args.intervals:
        rows.append(ours(f"deepcache interval={interval} branch=1", dict(method="deepcache", interval=interval)))
        rows.append(peer_row(work, peers.deepcache(interval, 0)))
    if not args.peers_only:
        rows.append(ours("deepcache interval=3 branch=2", dict(method="deepcache", interval=3, branch=2)))
    rows.append(ours("deepcache interval=5 nonuniform", dict(method="deepcache", interval=5, schedule="nonuniform")))
    results = run(args, work, rows)
    report("SD1.5-shaped UNet", work, results, [
        f"UNet2DConditionModel with SD1.5's config at channel width {w} (SD1.5: 320), random weights",
        f"{args.unet_px} px ({args.unet_px // 8}x{args.unet_px // 8} latent), {work.steps} DDIM steps, CFG 7.5 "
        f"(batched), median of {args.repeats}",
    ])


def bench_flux(args):
    if args.flux_from:  # a trained Flux pipeline (e.g. ref-dit), called with its own defaults and held-out prompts
        pipe = load(args.flux_from, device="cpu")
        pipe.set_progress_bar_config(disable=True)
        name = os.path.basename(os.path.normpath(args.flux_from))
        work = bench.workload(pipe, name, n_prompts=args.prompts, device="cpu")
    else:
        model = model_string("flux", {"num_attention_heads": args.flux_heads, "num_layers": args.flux_dual,
                                      "num_single_layers": args.flux_single})
        work = workload(model, FLUX_PROMPT, args.flux_steps, args.flux_px, max_sequence_length=FLUX_TEXT_TOKENS)
    para = [ParaAttnFirstBlockCache(th) for th in args.thresholds]
    rows = [bench.Row("baseline", "baseline")]
    for th in args.thresholds:
        rows.append(ours(f"block threshold={th}", dict(method="block", threshold=th)))
        rows.append(peer_row(work, peers.first_block_cache(th)))
    rows += [peer_row(work, p) for p in para]
    if args.flux_from:
        what = f"trained pipeline {args.flux_from}, its own call ({work.steps} steps), {len(work.calls)} prompt(s)"
    else:
        what = (f"{args.flux_dual}+{args.flux_single} blocks (Flux.1: 19+38), {args.flux_heads} heads = width "
                f"{args.flux_heads * 128} (Flux.1: 24 heads = 3072), {args.flux_px} px "
                f"({(args.flux_px // 16) ** 2} image tokens + {FLUX_TEXT_TOKENS} text tokens), {work.steps} "
                "flow-matching Euler steps, guidance-distilled (no CFG pass), random weights")
    if args.peers_only:  # ours vs the peers at each threshold only
        results = run(args, work, rows)
        report("Flux transformer: ours vs the peers", work, results, [f"{what}; median of {args.repeats}"])
        return
    th = args.thresholds[-1]
    rows.append(ours(f"block threshold={th} warmup=2 taylor=1",
                     dict(method="block", threshold=th, warmup_steps=2, taylor_order=1)))
    rows.append(ours("block interval=2 taylor=1", dict(method="block", interval=2, warmup_steps=2, taylor_order=1)))
    rows.append(ours("block interval=3 taylor=2 last_n=1",
                     dict(method="block", interval=3, warmup_steps=2, taylor_order=2, compute_last_n=1)))
    results = run(args, work, rows)
    report("Flux-shaped transformer", work, results, [f"{what}; median of {args.repeats}"])


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
    ap.add_argument("--prompts", type=int, default=1,
                    help="with --flux-from: how many of the trained model's held-out prompts (scored by the checker)")
    ap.add_argument("--intervals", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.4, 0.5, 0.6])
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.unet_steps, args.flux_steps, args.unet_px, args.flux_px = 1, 6, 6, 128, 128
        args.intervals, args.thresholds = [3], [0.3]
    torch.set_num_threads(max(1, args.threads))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.only in (None, "unet"):
        bench_unet(args)
    if args.only in (None, "flux"):
        bench_flux(args)


if __name__ == "__main__":
    main()
