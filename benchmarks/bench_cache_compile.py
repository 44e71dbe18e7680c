"""Step caching with a torch.compile'd denoiser: graphs, graph breaks, recompiles, agreement, speed.

For each (pipeline, cache setting) it runs the cached pipeline uncompiled, then compiles the
denoiser in place (``module.compile(backend=...)``) and calls it again several times, and prints:
the graphs dynamo captured after the first compiled call and after the last (equal: no recompiles
on repeat calls), the graph breaks by reason, the largest difference of the compiled output from
the uncompiled cached output, the steps reused in both, and the median CPU time of a call
(uncompiled cached vs compiled cached, after the compiled warm-up call).

    python benchmarks/bench_cache_compile.py                     # backend eager (fast, exact)
    python benchmarks/bench_cache_compile.py --backend inductor  # real kernels (minutes to compile)
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections import Counter

import numpy as np
import torch

import accel
from accel.eval.clock import measure
from accel.pipelines import tiny
from accel.pipelines.call import to_frames

CASES = [
    ("sd15", dict(method="deepcache", interval=3)),
    ("flux", dict(method="block", interval=3, warmup_steps=2, taylor_order=1)),
    ("flux", dict(method="block", threshold=0.3)),
    ("wan", dict(method="block", interval=3, warmup_steps=2, taylor_order=1)),
]


def _reason(key: str) -> str:
    text = " ".join(key.split())
    if "torch.compiler.disable" in text:
        return "torch.compiler.disable'd host bookkeeping (tracker / cache state)"
    return text[:90]


def one(name: str, cfg: dict, backend: str, steps: int, repeats: int) -> dict:
    from torch._dynamo.utils import counters

    pipe = tiny.make(name)
    denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer

    def call():
        return to_frames(pipe(**tiny.example_inputs(name, num_inference_steps=steps)))

    def timed():
        s = measure(call)
        return s.seconds, s.out

    accel.apply(pipe, {"cache": cfg})
    call()  # warm-up
    eager_t, eager_out = zip(*(timed() for _ in range(repeats)), strict=True)
    eager_reused = accel.stats(pipe)["cache"]["reused"]
    torch._dynamo.reset()
    counters.clear()
    denoiser.compile(backend=backend)
    first_call = measure(call)  # dynamo traces and compiles here: its wall time is the figure
    first, compile_s = first_call.out, first_call.wall_s
    graphs_first = counters["stats"]["unique_graphs"]
    comp_t, comp_out = zip(*(timed() for _ in range(repeats)), strict=True)
    reused = accel.stats(pipe)["cache"]["reused"]
    breaks = Counter()
    for k, v in counters["graph_break"].items():
        breaks[_reason(k)] += v
    row = dict(name=name, cfg=cfg, graphs_first=graphs_first, graphs_last=counters["stats"]["unique_graphs"],
               breaks=dict(breaks), diff=float(max(np.abs(o - eager_out[0]).max() for o in (first, *comp_out))),
               reused=(eager_reused, reused), eager_s=statistics.median(eager_t), compiled_s=statistics.median(comp_t),
               first_call_s=compile_s)
    torch._dynamo.reset()
    accel.remove(pipe)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="eager", help="torch.compile backend: eager, aot_eager, inductor")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", type=int, nargs="+", help="indices into CASES")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, backend {args.backend}, 1 thread, machine: 2-core CPU, shared/noisy, "
          f"load average {os.getloadavg()[0]:.1f}; tiny pipelines, {args.steps} steps, median of {args.repeats}\n")
    print("| pipeline | cache | graphs after call 1 / after last | max abs diff vs uncompiled cached "
          "| reused (uncompiled / compiled) | CPU s uncompiled | CPU s compiled | first compiled call s "
          "| graph breaks by reason |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, (name, cfg) in enumerate(CASES):
        if args.only and i not in args.only:
            continue
        r = one(name, cfg, args.backend, args.steps, args.repeats)
        what = ", ".join(f"{k}={v}" for k, v in cfg.items() if k != "method")
        breaks = "; ".join(f"{k}: {v}" for k, v in r["breaks"].items())
        print(f"| {name} | {cfg['method']} {what} | {r['graphs_first']} / {r['graphs_last']} | {r['diff']:.2e} "
              f"| {r['reused'][0]} / {r['reused'][1]} | {r['eager_s']:.2f} | {r['compiled_s']:.2f} "
              f"| {r['first_call_s']:.0f} | {breaks} |", flush=True)


if __name__ == "__main__":
    main()
