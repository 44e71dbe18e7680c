"""Fidelity of every preset, and of each technique's part of it, on the trained reference models.

For each shipped reference model (``ref-sd``, ``ref-dit``, ``ref-video``) and each preset in
``accel.available_presets()``: the preset as a whole, and each of its enabled technique parts
(cache, tokens, attention) alone. The rows run on the engine of `accel bench` (`accel.eval.bench`):
each row's CPU-time ratio to the baseline (``off``; median over repeats, rows round-robin: the
machine is shared), PSNR (median and worst prompt) / SSIM of its outputs against the baseline's
(same held-out prompts, same seed), and the attribute checker's accuracy (colour / shape for
pictures; motion direction, and colour / shape of the middle frame, for clips) with and without
acceleration. Calls use each model's own defaults (`accel.pipelines.ref.call_defaults`).

    python benchmarks/bench_ref_fidelity.py                     # every shipped model, 3 repeats
    python benchmarks/bench_ref_fidelity.py --models ref-sd     # one model
    python benchmarks/bench_ref_fidelity.py --quick             # few prompts, few steps, 1 repeat
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

import accel
from accel.eval import bench
from accel.pipelines import ref
from accel.pipelines.load import load

SECTIONS = ("cache", "tokens", "attention")


def rows_for(family: str) -> list[bench.Row]:
    """The baseline (``off``), then every preset whole and each enabled part of it alone."""
    rows = [bench.Row("off", "baseline")]
    for name in accel.available_presets():
        if name == "off":
            continue
        full = accel.preset(name, family)
        parts = [s for s in SECTIONS if getattr(full, s).enabled]
        if not parts:
            continue
        rows.append(bench.Row(name, "preset", full))
        if len(parts) > 1:
            for s in parts:
                rows.append(bench.Row(f"{name}: {s} only", "config",
                                      dataclasses.replace(accel.Config(), **{s: getattr(full, s)})))
    return rows


def bench_model(model: str, n: int, steps: int | None, repeats: int) -> None:
    pipe = load(model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    work = bench.workload(pipe, model, n_prompts=n, steps=steps, device="cpu")
    # a part a family does not support is reported in its row, not fatal
    results, stopped = bench.run(work, rows_for(work.family), repeats=repeats)
    print(f"\n### {model} (family {work.family}): {n} held-out prompts, {work.steps} steps, median of {repeats}"
          f"{' (stopped early)' if stopped else ''}\n")
    print(bench.table(results), flush=True)


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
