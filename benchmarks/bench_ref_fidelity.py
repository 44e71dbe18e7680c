"""Fidelity of every defined preset on the trained reference model ref-sd (not random weights).

For each preset in ``accel.available_presets()``: the same held-out prompts and seeds as the
baseline (``off``), latency ratio (median over repeats, presets interleaved per repeat: the
machine is shared), PSNR / SSIM of the accelerated pictures against the baseline's, and the
attribute checker's colour / shape accuracy with and without acceleration.

    python benchmarks/bench_ref_fidelity.py            # 24 prompts, 25 steps, 3 repeats
    python benchmarks/bench_ref_fidelity.py --quick    # 8 prompts, 15 steps, 1 repeat
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import accel
from accel.eval import checker, shapes
from accel.eval.metrics import psnr, ssim
from accel.pipelines.call import family_name
from accel.pipelines.load import load


def _generate(pipe, prompts, steps):
    out = pipe(prompts, num_inference_steps=steps, guidance_scale=5.0, output_type="np",
               generator=torch.Generator().manual_seed(0))
    return out.images


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="ref-sd")
    args = ap.parse_args(argv)
    n, steps, repeats = (8, 15, 1) if args.quick else (24, 25, 3)
    torch.set_num_threads(1)
    pipe = load(args.model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    family = family_name(pipe)
    scenes = shapes.held_out_scenes(n, n_shapes=1)
    prompts = [s.prompt for s in scenes]
    presets = accel.available_presets()
    times, outputs, errors = {p: [] for p in presets}, {}, {}
    for _ in range(repeats):
        for name in presets:
            if name in errors:
                continue
            try:
                with accel.applied(pipe, name):
                    t = time.perf_counter()
                    outputs[name] = _generate(pipe, prompts, steps)
                    times[name].append(time.perf_counter() - t)
            except Exception as e:  # a preset a family does not support is reported, not fatal
                errors[name] = str(e).splitlines()[0]
    base = outputs["off"]
    base_time = statistics.median(times["off"])
    print(f"ref fidelity: {args.model} (family {family}), {n} held-out prompts, {steps} steps, "
          f"median of {repeats}; 2-core CPU, shared/noisy")
    print("| preset | speedup | PSNR dB | SSIM | colour | shape |\n|---|---|---|---|---|---|")
    for name in presets:
        if name in errors:
            print(f"| {name} | error: {errors[name]} | | | | |")
            continue
        out = outputs[name]
        score = checker.score_images(out, scenes)
        p = psnr(base, out)
        print(f"| {name} | {base_time / statistics.median(times[name]):.2f}x | "
              f"{'inf' if np.isinf(p) else f'{p:.1f}'} | {ssim(base, out):.3f} | "
              f"{score['colour']:.2f} | {score['shape']:.2f} |")


if __name__ == "__main__":
    main()
