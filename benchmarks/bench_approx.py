"""The approximate cache (NIRVANA) on a prompt stream with realistic repetition, on the trained reference models.

The stream: N prompts whose attributes (colour, shape, size, position, background; motion for clips) are each
drawn with Zipf-distributed popularity (exponent ``--zipf``), so popular combinations recur and many prompts
have a near neighbour, as in a service's traffic. Four configurations run the same stream side by side,
interleaved prompt by prompt (the machine is shared): ``off`` (full generation, the reference), ``approx``
(a fresh cache folder, the default policy), ``balanced`` (the preset) and ``approx + balanced``. Prompt i uses
seed i in every configuration. Reported per configuration: hit rate, share of denoising steps saved, time
ratio to ``off`` (total time over the stream, `accel.eval.clock`: process CPU time on a CPU), PSNR/SSIM
against ``off``'s output of the same prompt and seed, and the checker's verdict (every requested object's
colour and shape right; the motion direction for clips) beside ``off``'s. The target: >= 20% of the steps
saved, the checker within one prompt in 24 of ``off``.

    python benchmarks/bench_approx.py --model ref-sd --prompts 300 --policy 0.05:0.5
    python benchmarks/bench_approx.py --model ref-video --prompts 24 --configs approx
    python benchmarks/bench_approx.py --calibrate --model ref-sd --pairs 24   # the policy table's evidence
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import numpy as np
import torch

import accel
from accel.eval.clock import measure
from accel.eval.metrics import psnr, ssim
from accel.pipelines.call import family_name
from accel.pipelines.load import load
from accel.pipelines.ref import call_defaults, checker
from accel.pipelines.ref import data as S


def zipf_pick(rng, options, s: float):
    options = list(options)
    w = 1.0 / np.arange(1, len(options) + 1) ** s
    return options[int(rng.choice(len(options), p=w / w.sum()))]


def stream(n: int, video: bool, s: float, seed: int = 0) -> list:
    """Scenes (or clips) with Zipf-popular attributes; each attribute's popularity order is shuffled once."""
    rng = np.random.default_rng(seed)
    order = {k: list(rng.permutation(v)) for k, v in {
        "colour": list(S.COLOURS), "shape": list(S.SHAPES), "size": list(S.SIZES), "position": list(S.POSITIONS),
        "background": list(S.BACKGROUNDS), "motion": list(S.DIRECTIONS)}.items()}
    out = []
    for _ in range(n):
        pick = {k: str(zipf_pick(rng, v, s)) for k, v in order.items()}
        if video:
            clip = S.random_clip(rng, motions=(pick["motion"],))
            shape = dataclasses.replace(clip.scene.shapes[0], colour=pick["colour"], shape=pick["shape"])
            out.append(dataclasses.replace(clip, scene=dataclasses.replace(
                clip.scene, shapes=(shape,), background=pick["background"], style="plain")))
        else:
            x, y = S.POSITIONS[pick["position"]]
            shape = S.Shape(pick["shape"], pick["colour"], pick["size"], x, y)
            out.append(S.Scene((shape,), pick["background"], "plain", pick["position"]))
    return out


def verdict(out: np.ndarray, item, video: bool) -> bool:
    if video:
        return checker.score_clips([out], [item])["direction"] == 1.0
    return all(r["colour"] and r["shape"] for r in checker.check_scene(out, item))


def _output(result, video: bool) -> np.ndarray:
    return np.asarray(result.frames[0] if video else result.images[0], np.float32)


def bench(model: str, n: int, s: float, configs=("off", "approx", "balanced", "approx + balanced"),
          policy: dict | None = None) -> None:
    """``policy``: {"similarity": [...], "skip": [...]} for the configuration "approx (policy)"."""
    video = model == "ref-video"
    kw = {**call_defaults(model), "output_type": "np"}
    items = stream(n, video, s)
    pipes, folders = {}, []
    for name in configs:
        pipe = load(model, device="cpu")
        pipe.set_progress_bar_config(disable=True)
        pipe(prompt="a small gray square on a black background", **kw)  # warm-up, before any cache exists
        if name != "off":
            cfg = accel.preset("balanced", family_name(pipe)) if "balanced" in name else accel.Config()
            if "approx" in name:
                folders.append(tempfile.TemporaryDirectory())
                cfg = cfg.replace(approx={"dir": folders[-1].name, **(policy if "policy" in name else {})})
            accel.apply(pipe, cfg)
        pipes[name] = pipe
    rec = {name: {"s": 0.0, "hits": 0, "saved": 0, "steps": 0, "ok": 0, "psnr": [], "ssim": []} for name in configs}
    ref_out = None
    t_start = time.time()
    for i, item in enumerate(items):
        for name, pipe in pipes.items():
            gen = torch.Generator().manual_seed(i)
            call = measure(lambda pipe=pipe, prompt=item.prompt, gen=gen: pipe(prompt=prompt, generator=gen, **kw))
            out = _output(call.out, video)
            r = rec[name]
            r["s"] += call.seconds
            if name == "off":
                ref_out = out
            else:
                p = psnr(ref_out, out)
                r["psnr"].append(min(p, 60.0))
                r["ssim"].append(ssim(ref_out, out))
            st = accel.stats(pipe).get("approx") or {}
            r["hits"] += bool(st.get("hit"))
            r["saved"] += st.get("skipped_steps", 0)
            r["steps"] += kw["num_inference_steps"]
            r["ok"] += verdict(out, item, video)
        if (i + 1) % 50 == 0:
            print(f"  {i + 1}/{n} prompts, {time.time() - t_start:.0f} s", flush=True)
    base = rec["off"]
    print(f"\n{model}: {n} prompts (Zipf s={s}, {len({it.prompt for it in items})} distinct), "
          f"{kw['num_inference_steps']} steps, CPU\n")
    print("| configuration | hit rate | steps saved | time vs off | PSNR dB (mean / min) | SSIM | checker ok |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rec.items():
        ps = f"{np.mean(r['psnr']):.1f} / {np.min(r['psnr']):.1f}" if r["psnr"] else "ref"
        ss = f"{np.mean(r['ssim']):.4f}" if r["ssim"] else "ref"
        print(f"| {name} | {r['hits'] / n:.0%} | {r['saved'] / r['steps']:.1%} | {base['s'] / r['s']:.2f}x | {ps} | "
              f"{ss} | {r['ok']}/{n} ({r['ok'] - base['ok']:+d}) |")
    for f in folders:
        f.cleanup()


def calibrate(model: str, n_pairs: int) -> None:
    """Pairs (earlier prompt, new prompt) differing in 0, 1 or 2 attributes: similarity, skip, PSNR, checker."""
    from accel.eval.approx_policy import measure, table

    video = model == "ref-video"
    kw = call_defaults(model)
    pipe = load(model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(7)
    items = stream(4 * n_pairs, video, 0.0, seed=3)  # uniform attributes: varied pairs
    by_prompt, pairs = {}, []
    for k in range(n_pairs):
        a, b = items[2 * k], (items[2 * k] if k % 4 == 0 else items[2 * k + 1])
        if k % 4 == 1:  # one attribute apart: b is a with b's colour
            b = _with_colour(a, b, video)
        by_prompt[a.prompt], by_prompt[b.prompt] = a, b
        pairs.append((a.prompt, b.prompt))
    rng.shuffle(pairs)
    rows = measure(pipe, pairs, call_kwargs=kw, score=lambda img, p: verdict(img, by_prompt[p], video))
    print("| similarity | skip | PSNR dB vs full | checker ok (full ok) |")
    print("|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (-r["similarity"], r["skip"])):
        print(f"| {r['similarity']:.4f} | {r['skip']:.1f} | {r['psnr']} | {r['ok']} ({r['ok_full']}) |")
    print("policy from these rows (judge only):", table(rows))


def _with_colour(a, b, video: bool):
    src = (b.scene if video else b).shapes[0]
    if video:
        return dataclasses.replace(a, scene=dataclasses.replace(
            a.scene, shapes=(dataclasses.replace(a.scene.shapes[0], colour=src.colour),)))
    return dataclasses.replace(a, shapes=(dataclasses.replace(a.shapes[0], colour=src.colour),))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ref-sd", choices=("ref-sd", "ref-dit", "ref-video"))
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--configs", default="off,approx,balanced,approx + balanced",
                    help="comma-separated subset of: off, approx, balanced, approx + balanced (off always runs)")
    ap.add_argument("--policy", default=None, metavar="SIM:SKIP,...",
                    help="a policy table for the configuration 'approx (policy)', e.g. 0.05:0.5 (from --calibrate)")
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--pairs", type=int, default=24)
    args = ap.parse_args()
    if args.calibrate:
        calibrate(args.model, args.pairs)
    else:
        chosen = ["off", *[c.strip() for c in args.configs.split(",") if c.strip() != "off"]]
        policy = None
        if args.policy:
            pairs = [tuple(float(x) for x in p.split(":")) for p in args.policy.split(",")]
            policy = {"similarity": [p[0] for p in pairs], "skip": [p[1] for p in pairs]}
            chosen.append("approx (policy)")
        bench(args.model, args.prompts, args.zipf, tuple(chosen), policy)
