"""Fidelity of every preset, and of each technique's part of it, on the trained reference models.

For each shipped reference model (``ref-sd``, ``ref-dit``, ``ref-video``) and each preset in
``accel.available_presets()``: the preset as a whole, and each of its enabled technique parts
(cache, tokens, attention) alone. Each row: CPU-time ratio to the baseline (``off``; median over
repeats, rows interleaved per repeat: the machine is shared), PSNR / SSIM of the outputs against
the baseline's (same held-out prompts, same seeds), and the attribute checker's accuracy (colour /
shape for pictures; motion direction, and colour / shape of the middle frame, for clips) with and
without acceleration. Calls use each model's own defaults (`accel.pipelines.ref.call_defaults`).

    python benchmarks/bench_ref_fidelity.py                     # every shipped model, 3 repeats
    python benchmarks/bench_ref_fidelity.py --models ref-sd     # one model
    python benchmarks/bench_ref_fidelity.py --quick             # few prompts, few steps, 1 repeat
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch
from timing import median, round_robin, timed

import accel
from accel.eval import checker, shapes
from accel.eval.metrics import psnr, ssim
from accel.pipelines import ref
from accel.pipelines.call import family_name
from accel.pipelines.load import load
from accel.pipelines.ref import train_video

SECTIONS = ("cache", "tokens", "attention")


def rows_for(family: str) -> dict[str, accel.Config | None]:
    """Row label -> Config: every preset whole, then each enabled part of it alone."""
    rows: dict[str, accel.Config | None] = {"off": None}
    for name in accel.available_presets():
        if name == "off":
            continue
        full = accel.preset(name, family)
        parts = [s for s in SECTIONS if getattr(full, s).enabled]
        if not parts:
            continue
        rows[name] = full
        if len(parts) > 1:
            for s in parts:
                rows[f"{name}: {s} only"] = dataclasses.replace(accel.Config(), **{s: getattr(full, s)})
    return rows


def _as_batch(out, video: bool) -> np.ndarray:
    return np.asarray(out.frames if video else out.images, np.float32)


def bench_model(model: str, n: int, steps: int | None, repeats: int) -> None:
    pipe = load(model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    family = family_name(pipe)
    call = ref.call_defaults(model)
    if steps:
        call["num_inference_steps"] = steps
    video = "num_frames" in call
    items = shapes.held_out_clips(n) if video else shapes.held_out_scenes(n, n_shapes=1)
    prompts = [it.prompt for it in items]
    rows = rows_for(family)

    def generate():
        return _as_batch(pipe(prompts, output_type="np", generator=torch.Generator().manual_seed(0), **call), video)

    def row(cfg):
        with accel.applied(pipe, cfg):
            return timed(generate)

    generate()  # untimed warm-up
    # a part a family does not support is reported, not fatal
    samples, errors = round_robin({label: (lambda cfg=cfg: row(cfg)) for label, cfg in rows.items()}, repeats,
                                  catch=True)
    outputs = {label: runs[-1][2] for label, runs in samples.items() if runs}
    base, base_t = outputs["off"], median(samples["off"], 0)
    what = "direction | colour | shape" if video else "colour | shape"
    print(f"\n### {model} (family {family}): {n} held-out prompts, {call.get('num_inference_steps')} steps, "
          f"median of {repeats}\n")
    print(f"| row | speedup (CPU) | PSNR dB | SSIM | {what} |")
    columns = 7 if video else 6
    print("|---" * columns + "|")
    for label in rows:
        if label in errors:
            print(f"| {label} | error: {errors[label]} |" + " |" * (columns - 2))
            continue
        out = outputs[label]
        if video:  # direction of the centroid track; colour / shape of the middle frame
            s = train_video.score(list(out), items)
            score = f"{s['direction']:.2f} | {s['colour']:.2f} | {s['shape']:.2f}"
            a, b = base.reshape(-1, *base.shape[2:]), out.reshape(-1, *out.shape[2:])
        else:
            s = checker.score_images(list(out), items)
            score = f"{s['colour']:.2f} | {s['shape']:.2f}"
            a, b = base, out
        p = psnr(a, b)
        print(f"| {label} | {base_t / median(samples[label], 0):.2f}x | {'inf' if np.isinf(p) else f'{p:.1f}'} | "
              f"{ssim(a, b):.3f} | {score} |", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=None, help="reference models (default: every shipped one)")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's own)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="8 prompts, 8 steps, 1 repeat")
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts, args.steps, args.repeats = 8, 8, 1
    torch.set_num_threads(1)  # CPU time of a 1-thread run does not inflate with other jobs' load
    print("2-core CPU, shared/noisy; 1 thread; speed-up from process CPU time")
    for model in args.models or list(ref.shipped()):
        bench_model(model, args.prompts, args.steps, args.repeats)


if __name__ == "__main__":
    main()
