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
    # Clip parallelism: 8 latent frames (4 per clip); baseline = the whole video in one process.
    ("clip, no cross-clip context", "wan", {"height": 64, "width": 64, "num_frames": 29},
     {"clip": 2, "clip_neighbour_frames": 0, "clip_global_tokens": 0}),
    ("clip, dual scope (1 frame, 8 tokens)", "wan", {"height": 64, "width": 64, "num_frames": 29}, {"clip": 2}),
    ("clip, no cross-clip context", "ltx", {"height": 64, "width": 64, "num_frames": 57},
     {"clip": 2, "clip_neighbour_frames": 0, "clip_global_tokens": 0}),
    ("clip, dual scope (1 frame, 8 tokens)", "ltx", {"height": 64, "width": 64, "num_frames": 57}, {"clip": 2}),
]
STEPS = 6


def _seam_error(ref_latents, latents, frame_dim):
    """The step across the clip boundary against the single-process video's: mean|d - d_ref| / mean|d_ref|."""
    x, r = latents.movedim(frame_dim, 1).float(), ref_latents.movedim(frame_dim, 1).float()
    b = x.shape[1] // 2
    d, dr = x[:, b] - x[:, b - 1], r[:, b] - r[:, b - 1]
    return float((d - dr).abs().mean() / dr.abs().mean())


def _latents(pipe, fam, kw):
    """The denoised latents as (B, C, F, H, W) or (B, F, ...): one untimed call with output_type latent."""
    out = pipe(**{**kw(), "output_type": "latent"}).frames
    if fam == "ltx":  # packed (B, F*H*W, C): frames of H*W tokens
        frames = (kw()["num_frames"] - 1) // pipe.vae_temporal_compression_ratio + 1
        return out.reshape(out.shape[0], frames, -1), 1
    return out, 2 if fam == "wan" else 1


def _frames(out):
    x = getattr(out, "images", None)
    return np.asarray(x if x is not None else out.frames, dtype=np.float32)


def _timed(pipe, kw, repeats, together=True):
    """(median seconds, median seconds in synchronous collectives, last output). The figure is the wall
    time of `accel.eval.clock.measure`: with several processes the time a rank waits on the others is
    part of what parallelism costs, and a rank's CPU time leaves it out."""
    from accel.eval.clock import measure
    from accel.parallel import runtime

    times, comm, out = [], [], None
    for _ in range(repeats):
        if together:
            runtime.barrier()
        runtime.COMM_SECONDS["total"] = 0.0
        sample = measure(lambda: _frames(pipe(**kw())))
        out = sample.out
        times.append(sample.wall_s)
        comm.append(runtime.COMM_SECONDS["total"])
    return statistics.median(times), statistics.median(comm), out


def worker(rank, path, quick, only=None):
    import accel
    from accel.eval.metrics import psnr
    from accel.parallel import ParallelConfig, parallel_stats, unparallelize
    from accel.pipelines import tiny

    repeats = 1 if quick else 3
    cases = CASES[:3] + CASES[4:5] if quick else CASES
    if only:
        cases = [c for c in CASES if only in c[0]]
    rows, pipes = [], {}
    for label, fam, over, cfg in cases:
        pipe = pipes.setdefault(fam, tiny.make(fam))
        kw = lambda fam=fam, over=over: tiny.example_inputs(fam, **{"num_inference_steps": STEPS, **over})  # noqa: E731
        # The baseline runs alone on rank 0 (no collectives) while rank 1 waits.
        base_t, _, ref = _timed(pipe, kw, repeats, together=False) if rank == 0 else (0.0, 0.0, None)
        clip = cfg.get("clip", 1) > 1
        ref_lat = _latents(pipe, fam, kw)[0] if clip else None
        accel.parallelize(pipe, ParallelConfig(**cfg))
        par_t, comm_t, out = _timed(pipe, kw, repeats)
        stats = parallel_stats(pipe)
        if clip:
            lat, frame_dim = _latents(pipe, fam, kw)
            clip_row = {"seam_error": _seam_error(ref_lat, lat, frame_dim),
                        "latent_rel_err": float((lat - ref_lat).norm() / ref_lat.norm()),
                        "kv_bytes_per_step": stats.get("clip_kv_bytes", 0) / (repeats + 1) / STEPS,
                        "gather_bytes_per_step": stats.get("gather_bytes", 0) / (repeats + 1) / STEPS}
        unparallelize(pipe)
        if rank == 0:
            sent = sum(v for k, v in stats.items() if k.endswith("_bytes") and isinstance(v, (int, float)))
            rows.append({"strategy": label, "family": fam, "inputs": over, "steps": STEPS,
                         "base_s": base_t, "parallel_s": par_t, "speedup": base_t / par_t,
                         "bytes_per_step": sent / repeats / STEPS, "sync_comm_s_per_step": comm_t / STEPS,
                         "wait_s_per_step": stats.get("wait_s", 0.0) / repeats / STEPS,
                         "psnr": psnr(torch.from_numpy(out), torch.from_numpy(ref))})
            if clip:
                rows[-1].update(clip_row)
                rows[-1]["bytes_per_step"] = clip_row["kv_bytes_per_step"] + clip_row["gather_bytes_per_step"]
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


def clip_estimate(neighbour_frames=1, global_tokens=8):
    """Dual-scope traffic per step and rank at Wan 2.1 14B shapes (81 frames, 720p: 21 latent frames
    of 45x80 tokens, 40 layers, hidden 5120, bf16, CFG batch 2); an edge rank sends one side."""
    tokens, layers, hidden, batch, elt = 45 * 80, 40, 5120, 2, 2
    lines = []
    for n in (2, 4, 8):
        per_call = (2 * neighbour_frames * tokens + (n - 1) * global_tokens) * 2 * hidden * batch * elt
        step = per_call * layers
        lines.append(f"estimate: Wan-14B 720p, clip={n}, dual scope ({neighbour_frames} frame, {global_tokens} "
                     f"tokens): {step / 1e9:.2f} GB/step/rank, {step / 250e9 * 1e3:.0f} ms at NVLink "
                     f"(~250 GB/s), {step / 25e9 * 1e3:.0f} ms at PCIe 4.0 (~25 GB/s)")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", help="run only the cases whose strategy label contains this (e.g. clip)")
    args = ap.parse_args()
    from accel.parallel import spawn

    path = os.path.join(tempfile.mkdtemp(), "rows.json")
    spawn(worker, 2, (path, args.quick, args.only), backend="gloo", timeout_s=900)
    rows = json.load(open(path))
    print("| strategy | model (tiny, random weights) | inputs | 1 process s | 2 ranks s | speedup | "
          "bytes/step/rank | sync comm s/step | exposed async wait s/step | overlap | PSNR dB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        overlap = ""
        sync = next((x for x in rows if x["family"] == r["family"] and x["strategy"] == "patch sync"), None)
        if r["strategy"].startswith("patch async") and sync and sync["sync_comm_s_per_step"] > 0:
            overlap = f"{max(0.0, 1 - r['wait_s_per_step'] / sync['sync_comm_s_per_step']):.2f}"
        print(f"| {r['strategy']} | {r['family']} | {r['inputs']} | {r['base_s']:.2f} | {r['parallel_s']:.2f} | "
              f"{r['speedup']:.2f}x | {r['bytes_per_step'] / 1e6:.2f} MB | {r['sync_comm_s_per_step'] * 1e3:.1f} ms | "
              f"{r['wait_s_per_step'] * 1e3:.2f} ms | {overlap} | {r['psnr']:.1f} |")
    clips = [r for r in rows if "seam_error" in r]
    if clips:
        print()
        print("| clip parallelism | model | K/V bytes/step/rank | output gather bytes/step/rank | "
              "seam error (0 = seamless) | latent error vs 1 process | PSNR dB (video) |")
        print("|---|---|---|---|---|---|---|")
        for r in clips:
            print(f"| {r['strategy']} | {r['family']} {r['inputs']} | {r['kv_bytes_per_step'] / 1e3:.1f} kB | "
                  f"{r['gather_bytes_per_step'] / 1e3:.1f} kB | {r['seam_error']:.4f} | {r['latent_rel_err']:.4f} | "
                  f"{r['psnr']:.1f} |")
        print()
        for line in clip_estimate():
            print(line)
    print()
    for name, n, comm in estimate(rows):
        print(f"estimate: {name}: {n} GPUs, K/V+halo+GN traffic of this model per step {comm * 1e6:.1f} us")


if __name__ == "__main__":
    main()
