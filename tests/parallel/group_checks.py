"""The checks one spawned 2-process gloo group runs; results go to a JSON file the tests read.

Spawning costs several seconds per process (imports), so every distributed check of the
strategies runs inside one group, and each test asserts on its recorded numbers.
"""

from __future__ import annotations

import functools
import json
import sys

import numpy as np
import torch

import accel
from accel.parallel import ParallelConfig, parallel_stats, unparallelize

STEPS = 2  # exactness needs no more; async patch runs use 3 (1 warmup + 2 displaced steps)

# (family, call overrides, [(label, config)])
CASES = [
    ("flux", {"true_cfg_scale": 2.0, "negative_prompt": "blurry"},
     [("cfg", {"cfg": 2}), ("sequence", {"sequence": 2}),
      ("sequence_ulysses", {"sequence": 2, "sequence_backend": "ulysses"}), ("patch_sync", {"patch": 2})]),
    ("flux", {"height": 48, "width": 48}, [("sequence_ulysses_odd", {"sequence": 2, "sequence_backend": "ulysses"})]),
    ("sd3", {}, [("cfg", {"cfg": 2}), ("sequence", {"sequence": 2})]),
    ("sd3", {"height": 48, "width": 48}, [("sequence_odd", {"sequence": 2})]),
    ("wan", {}, [("cfg", {"cfg": 2}), ("sequence", {"sequence": 2}),
                 ("sequence_ulysses", {"sequence": 2, "sequence_backend": "ulysses"})]),
    ("cogvideox", {}, [("cfg", {"cfg": 2}), ("sequence", {"sequence": 2})]),
    ("sd15", {}, [("patch_sync", {"patch": 2}), ("vae", {"vae": True})]),
    ("sd15", {"num_inference_steps": 3},
     [("patch_async", {"patch": 2, "patch_mode": "async"}), ("patch_stale_gn", {"patch": 2, "patch_mode": "stale_gn"}),
      ("patch_pcpp", {"patch": 2, "patch_mode": "async", "patch_kv_fraction": 0.5})]),
    ("sdxl", {}, [("patch_sync", {"patch": 2})]),
    ("flux", {"num_inference_steps": 3}, [("patch_async", {"patch": 2, "patch_mode": "async"})]),
]
# AsyncDiff components at 4 steps: a warm-up over every step (exact; it measures the split, kept for the
# pipeline), then the default (1 synchronous step, 3 asynchronous), twice.
COMPONENTS = [("components_sync", {"components": 2, "warmup_steps": 4}), ("components_async", {"components": 2})]
CASES += [(name, {"num_inference_steps": 4}, COMPONENTS)
          for name in ("sd15", "sdxl", "flux", "sd3", "wan", "cogvideox")]


def _frames(out) -> np.ndarray:
    x = getattr(out, "images", None)
    return np.asarray(x if x is not None else out.frames, dtype=np.float32)


def run(rank: int, path: str) -> None:
    from accel.eval.metrics import psnr
    from accel.pipelines import tiny

    results, pipes = {}, {}
    for name, overrides, configs in CASES:
        pipe = pipes.setdefault(name, tiny.make(name))
        kw = functools.partial(tiny.example_inputs, name, **{"num_inference_steps": STEPS, **overrides})
        ref = _frames(pipe(**kw()))
        for label, cfg in configs:
            accel.parallelize(pipe, ParallelConfig(**cfg))
            out = _frames(pipe(**kw()))
            stats = parallel_stats(pipe)
            again = _frames(pipe(**kw())) if label.startswith("components") else None
            again_stats = parallel_stats(pipe)
            unparallelize(pipe)
            results[f"{name}/{label}"] = {
                "max_abs": float(np.abs(out - ref).max()), "psnr": psnr(torch.from_numpy(out), torch.from_numpy(ref)),
                "stats": {k: v for k, v in stats.items() if k != "config"}}
            if again is not None:
                results[f"{name}/{label}/again"] = {
                    "max_abs": float(np.abs(again - ref).max()),
                    "psnr": psnr(torch.from_numpy(again), torch.from_numpy(ref)),
                    "stats": {k: v for k, v in again_stats.items() if k != "config"}}
        results[f"{name}/{'-'.join(overrides) or 'default'}/restored"] = {
            "max_abs": float(np.abs(_frames(pipe(**kw())) - ref).max())}
    if rank == 0:
        with open(path, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    from accel.parallel import spawn

    spawn(run, 2, (sys.argv[1],), backend="gloo", timeout_s=120)
