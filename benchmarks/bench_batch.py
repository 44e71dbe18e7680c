"""Batch driver throughput: rows/min of a 50-row batch on a tiny model, side by side in one run.

Rows: 50 prompts (seeds 0..49) on ``tiny-sd15`` (32 px, 8 steps by default). Compared:

* ``plain loop``: the loop a user writes with diffusers alone: ``pipe(**kw)`` per row, then a PIL
  ``save`` of the PNG. No sidecar, no manifest, no atomic rename.
* ``accel batch off``: `accel.batch.run_worker` (what ``accel batch`` runs after parsing) at
  preset ``off``: atomic PNG, sidecar JSON with accel.stats, manifest line with SHA-256, fsync each.
  Its cost over the plain loop is the driver's overhead (target < 5%).
* ``accel batch <preset>``: every other preset defined when the benchmark runs.

All use one pipeline object, built once (model loading is not part of a row), and the same seeds.
The machine is shared and its load drifts within minutes, so the rows run in chunks (10 rows) and
every chunk runs under each configuration back to back, in rotating order; the ratio column is the
median over chunks of (configuration time / plain-loop time on the same chunk). Times come from
`accel.eval.clock.measure`: rows/min and the time ratio from its wall time (the driver's fsyncs wait
on the disk, which CPU time leaves out), the CPU-time ratio beside it. The driver runs
each chunk as a resumed batch into one folder, so its per-run costs (manifest read, resume
check of the rows done so far) count five times, not once.
Fidelity: mean PSNR / SSIM of each configuration's PNGs against the plain loop's (decoded uint8).

    python benchmarks/bench_batch.py            # 50 rows x 2 repeats (~5-10 min on a quiet 2-core CPU)
    python benchmarks/bench_batch.py --quick    # 12 rows x 1 repeat
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import accel
from accel import batch
from accel.batch.workers import Rank
from accel.eval.clock import measure
from accel.eval.metrics import psnr, ssim
from accel.io.prompts import Row
from accel.cli.batch import SETTINGS
from accel.pipelines import tiny
from accel.pipelines.call import call_kwargs, to_frames
from accel.pipelines.load import call_defaults

SUBJECTS = "cat dog horse bird fox robot castle boat tree flower".split()
PLACES = "on the moon|in a forest|at the beach|in the snow|in a city".split("|")


def _rows(n: int) -> list[Row]:
    return [Row(index=i, line=i + 1, prompt=f"a {SUBJECTS[i % 10]} {PLACES[(i // 10) % 5]}") for i in range(n)]


def _plain_loop(pipe, rows, steps, out: Path) -> None:
    out.mkdir(parents=True)
    for r in rows:
        kw = call_kwargs(pipe, prompt=r.prompt, steps=steps, seed=r.index, defaults=call_defaults("tiny-sd15"))
        frames = to_frames(pipe(**kw))
        Image.fromarray((np.clip(frames, 0, 1) * 255 + 0.5).astype(np.uint8)).save(out / f"{r.index:05d}.png")


def _accel_batch(pipe, rows, steps, out: Path, preset: str) -> None:
    s = batch.Settings({**{k: d for k, (_, d, _) in SETTINGS.items()}, "model": "tiny-sd15", "out": str(out),
                        "preset": preset, "steps": steps})
    jobs = batch.plan(rows, s)
    with contextlib.redirect_stdout(io.StringIO()):
        rc = batch.run_worker(jobs, s, Rank(), progress=False, pipe=pipe)
    assert rc == 0, f"accel batch at {preset} failed"


def _images(folder: Path) -> dict[int, np.ndarray]:
    out = {}
    for p in folder.rglob("*.png"):
        if p.name[:5].isdigit():
            out[int(p.name[:5])] = np.asarray(Image.open(p), dtype=np.float32) / 255.0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--chunk", type=int, default=10, help="rows per interleaved chunk")
    ap.add_argument("--presets", default=None, help="comma-separated presets besides off (default: all defined)")
    a = ap.parse_args()
    n = a.rows or (12 if a.quick else 50)
    repeats = a.repeats or (1 if a.quick else 2)
    rows = _rows(n)
    pipe = tiny.make("sd15")
    presets = a.presets.split(",") if a.presets else [p for p in accel.available_presets() if p != "off"]
    configs = {"plain loop": None, "accel batch off": "off", **{f"accel batch {p}": p for p in presets}}
    chunks = [rows[i:i + a.chunk] for i in range(0, n, a.chunk)]
    times: dict[str, list[float]] = {k: [] for k in configs}  # wall seconds per chunk
    cpu: dict[str, list[float]] = {k: [] for k in configs}  # process CPU seconds per chunk
    root = Path(tempfile.mkdtemp(prefix="bench_batch_"))
    labels = list(configs)
    try:
        _plain_loop(pipe, rows[:2], a.steps, root / "warm")  # first calls pay for allocator warm-up
        for rep in range(repeats):
            for c, chunk in enumerate(chunks):
                k = (rep * len(chunks) + c) % len(labels)
                for label in labels[k:] + labels[:k]:  # rotate the order: no configuration always runs first
                    out = root / f"{rep}-{label.replace(' ', '_')}"
                    if configs[label] is None:
                        s = measure(lambda chunk=chunk, out=out, c=c: _plain_loop(pipe, chunk, a.steps, out / f"c{c}"))
                    else:  # the same folder each chunk: later chunks resume it, as a restarted batch would
                        s = measure(lambda chunk=chunk, out=out, p=configs[label]: _accel_batch(pipe, chunk, a.steps,
                                                                                               out, p))
                    times[label].append(s.wall_s)
                    cpu[label].append(s.seconds)
            print(f"  repeat {rep + 1}/{repeats}: " + ", ".join(
                f"{lb} {60 * n / sum(times[lb][-len(chunks):]):.1f}" for lb in labels) + " rows/min", flush=True)
        base = _images(root / "0-plain_loop")
        fidelity = {}
        for label in configs:
            imgs = _images(root / f"0-{label.replace(' ', '_')}")
            p = [psnr(base[i], imgs[i]) for i in sorted(base)]
            s = [ssim(base[i], imgs[i]) for i in sorted(base)]
            exact = all(np.array_equal(base[i], imgs[i]) for i in base)
            fidelity[label] = (statistics.mean(p), statistics.mean(s), exact)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"\n{n} rows, tiny-sd15 32 px, {a.steps} steps, {repeats} repeat(s) of {len(chunks)} interleaved chunks; "
          f"torch threads {torch.get_num_threads()}")
    print("| configuration | rows/min | time vs plain loop (median over chunks) | CPU time vs plain loop | "
          "PSNR (dB) vs plain | SSIM vs plain |")
    print("|---|---|---|---|---|---|")
    for label in configs:
        ratio = statistics.median(t / b for t, b in zip(times[label], times["plain loop"], strict=True))
        cpu_ratio = statistics.median(t / b for t, b in zip(cpu[label], cpu["plain loop"], strict=True))
        ps, ss, exact = fidelity[label]
        ps_text = "inf (bitwise equal)" if exact else ("inf" if ps == float("inf") else f"{ps:.2f}")
        rate = 60 * n * repeats / sum(times[label])
        print(f"| {label} | {rate:.1f} | {ratio:.3f} | {cpu_ratio:.3f} | {ps_text} | {ss:.4f} |")


if __name__ == "__main__":
    main()
