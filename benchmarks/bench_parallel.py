"""Parallel strategies on CPU/gloo, 2 ranks: bytes per step, compute, overlap; a GPU scaling estimate.

    python benchmarks/bench_parallel.py [--quick]

For each strategy: the single-process denoise time (baseline), the 2-rank time, bytes sent per
rank per step (from the strategies' own counters), the time spent inside synchronous collectives,
and for displaced (async) patch parallelism the overlap fraction, 1 - (time waiting on async
exchanges / the same exchanges done synchronously). PSNR against the single-process output sits
beside every figure. The estimate for 2/4/8 GPUs scales the measured bytes per step to the
target shape and applies NVLink / PCIe bandwidths: t(N) = t1 / N + exposed communication.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (label, family, call overrides, ParallelConfig fields)
CASES = [
    ("cfg", "sd15", {"height": 256, "width": 256}, {"cfg": 2}),
    ("patch sync", "sd15", {"height": 256, "width": 256}, {"patch": 2}),
    ("patch async", "sd15", {"height": 256, "width": 256}, {"patch": 2, "patch_mode": "async"}),
    ("patch async pcpp 0.5", "sd15", {"height": 256, "width": 256},
     {"patch": 2, "patch_mode": "async", "patch_kv_fraction": 0.5}),
    ("sequence (diffusers)", "flux", {"height": 256, "width": 256}, {"sequence": 2}),
    ("sequence (ulysses)", "flux", {"height": 256, "width": 256}, {"sequence": 2, "sequence_backend": "ulysses"}),
    ("patch sync", "flux", {"height": 256, "width": 256}, {"patch": 2}),
    ("patch async", "flux", {"height": 256, "width": 256}, {"patch": 2, "patch_mode": "async"}),
    ("cfg", "wan", {"height": 64, "width": 64, "num_frames": 17}, {"cfg": 2}),
    ("sequence (ulysses)", "wan", {"height": 64, "width": 64, "num_frames": 17},
     {"sequence": 2, "sequence_backend": "ulysses"}),
]
STEPS = 6


def _frames(out):
    x = getattr(out, "images", None)
    return np.asarray(x if x is not None else out.frames, dtype=np.float32)


def _timed(pipe, kw, repeats, together=True):
    from accel.parallel import runtime

    times, comm, out = [], [], None
    for _ in range(repeats):
        if together:
            runtime.barrier()
        runtime.COMM_SECONDS["total"] = 0.0
        t0 = time.perf_counter()
        out = _frames(pipe(**kw()))
        times.append(time.perf_counter() - t0)
        comm.append(runtime.COMM_SECONDS["total"])
    return statistics.median(times), statistics.median(comm), out


def worker(rank, path, quick):
    import accel
    from accel.eval.metrics import psnr
    from accel.parallel import ParallelConfig, parallel_stats, unparallelize
    from accel.pipelines import tiny

    repeats = 1 if quick else 3
    cases = CASES[:3] + CASES[4:5] if quick else CASES
    rows, pipes = [], {}
    for label, fam, over, cfg in cases:
        pipe = pipes.setdefault(fam, tiny.make(fam))
        kw = lambda: tiny.example_inputs(fam, **{"num_inference_steps": STEPS, **over})  # noqa: E731
        # The baseline runs alone on rank 0 (no collectives) while rank 1 waits.
        base_t, _, ref = _timed(pipe, kw, repeats, together=False) if rank == 0 else (0.0, 0.0, None)
        accel.parallelize(pipe, ParallelConfig(**cfg))
        par_t, comm_t, out = _timed(pipe, kw, repeats)
        stats = parallel_stats(pipe)
        unparallelize(pipe)
        if rank == 0:
            sent = sum(v for k, v in stats.items() if k.endswith("_bytes") and isinstance(v, (int, float)))
            rows.append({"strategy": label, "family": fam, "inputs": over, "steps": STEPS,
                         "base_s": base_t, "parallel_s": par_t, "speedup": base_t / par_t,
                         "bytes_per_step": sent / repeats / STEPS, "sync_comm_s_per_step": comm_t / STEPS,
                         "wait_s_per_step": stats.get("wait_s", 0.0) / repeats / STEPS,
                         "psnr": psnr(torch.from_numpy(out), torch.from_numpy(ref))})
    if rank == 0:
        with open(path, "w") as f:
            json.dump(rows, f)


def estimate(rows):
    """Scaling estimate for SDXL-like displaced patch parallelism at 2/4/8 GPUs."""
    lines = []
    for r in rows:
        if not r["strategy"].startswith("patch async") or r["family"] != "sd15":
            continue
        # Bytes per step per rank at 2 ranks are (N-1)/N = 1/2 of the whole activations exchanged.
        whole = 2 * r["bytes_per_step"]
        for name, gbps in (("NVLink (A100, ~250 GB/s)", 250e9), ("PCIe 4.0 (~25 GB/s)", 25e9)):
            for n in (2, 4, 8):
                comm = whole * (n - 1) / n / gbps
                lines.append((name, n, comm))
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    from accel.parallel import spawn

    path = os.path.join(tempfile.mkdtemp(), "rows.json")
    spawn(worker, 2, (path, args.quick), backend="gloo", timeout_s=900)
    rows = json.load(open(path))
    print(f"| strategy | model (tiny, random weights) | inputs | 1 process s | 2 ranks s | speedup | "
          f"bytes/step/rank | sync comm s/step | exposed async wait s/step | overlap | PSNR dB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        overlap = ""
        sync = next((x for x in rows if x["family"] == r["family"] and x["strategy"] == "patch sync"), None)
        if r["strategy"].startswith("patch async") and sync and sync["sync_comm_s_per_step"] > 0:
            overlap = f"{max(0.0, 1 - r['wait_s_per_step'] / sync['sync_comm_s_per_step']):.2f}"
        print(f"| {r['strategy']} | {r['family']} | {r['inputs']} | {r['base_s']:.2f} | {r['parallel_s']:.2f} | "
              f"{r['speedup']:.2f}x | {r['bytes_per_step'] / 1e6:.2f} MB | {r['sync_comm_s_per_step'] * 1e3:.1f} ms | "
              f"{r['wait_s_per_step'] * 1e3:.2f} ms | {overlap} | {r['psnr']:.1f} |")
    print()
    for name, n, comm in estimate(rows):
        print(f"estimate: {name}: {n} GPUs, K/V+halo+GN traffic of this model per step {comm * 1e6:.1f} us")


if __name__ == "__main__":
    main()
