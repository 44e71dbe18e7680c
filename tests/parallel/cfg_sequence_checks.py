"""The checks one spawned 4-process gloo group runs (results to JSON): CFG x sequence, and copies.

- cfg=2 x sequence=2 on tiny Flux with true CFG (two denoiser calls per step), with diffusers'
  context parallelism (Flux has ``_cp_plan``) and with our Ulysses;
- ``replicas=2`` x cfg=2: the world holds two copies of the pipeline on ranks {0,1} and {2,3},
  each running its own prompt (the batch driver's group of ranks per image);
- cfg=2 x clip=2 on tiny Wan (`clip_checks.cfg_clip`: one 4-process group for all of them);
- cfg=2 x components=2 on tiny Flux with true CFG (4 steps): a warm-up over every step equals one
  process; the default runs asynchronous steps in each branch's own pair of ranks.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

import accel
from accel.parallel import ParallelConfig, parallel_stats, unparallelize

CALL = {"num_inference_steps": 2, "true_cfg_scale": 2.0, "negative_prompt": "blurry"}
PROMPTS = ["a photo of a cat", "a red boat at sea"]


def _images(pipe, **kw) -> np.ndarray:
    from accel.pipelines import tiny

    return np.asarray(pipe(**tiny.example_inputs("flux", **{**CALL, **kw})).images, dtype=np.float32)


def run(rank: int, path: str) -> None:
    from accel.pipelines import tiny

    torch.manual_seed(0)
    pipe = tiny.make("flux")
    refs = [_images(pipe, prompt=p) for p in PROMPTS]
    results = {}
    for label, cfg in [("cfg_sequence", {"cfg": 2, "sequence": 2}),
                       ("cfg_sequence_ulysses", {"cfg": 2, "sequence": 2, "sequence_backend": "ulysses"})]:
        accel.parallelize(pipe, ParallelConfig(**cfg))
        out = _images(pipe, prompt=PROMPTS[0])
        stats = parallel_stats(pipe)
        unparallelize(pipe)
        results[label] = {"max_abs": float(np.abs(out - refs[0]).max()),
                          "stats": {k: v for k, v in stats.items() if k != "config"}}
    # Two copies of cfg=2: copy c (ranks 2c, 2c+1) makes prompt c.
    accel.parallelize(pipe, ParallelConfig(cfg=2), replicas=2)
    copy = rank // 2
    out = _images(pipe, prompt=PROMPTS[copy])
    stats = parallel_stats(pipe)
    unparallelize(pipe)
    per_rank = torch.tensor([float(np.abs(out - refs[copy]).max()), float(np.abs(out - refs[1 - copy]).max()),
                             float(stats.get("cfg_gathers", 0))])
    gathered = [torch.empty_like(per_rank) for _ in range(4)]
    torch.distributed.all_gather(gathered, per_rank)
    results["replicas"] = {"own_max_abs": [float(g[0]) for g in gathered],
                           "other_max_abs": [float(g[1]) for g in gathered],
                           "cfg_gathers": [int(g[2]) for g in gathered]}
    results["restored_max_abs"] = float(np.abs(_images(pipe, prompt=PROMPTS[0]) - refs[0]).max())
    ref4 = _images(pipe, prompt=PROMPTS[0], num_inference_steps=4)
    for label, cfg in [("cfg_components_sync", {"cfg": 2, "components": 2, "warmup_steps": 4}),
                       ("cfg_components", {"cfg": 2, "components": 2})]:
        accel.parallelize(pipe, ParallelConfig(**cfg))
        out = _images(pipe, prompt=PROMPTS[0], num_inference_steps=4)
        stats = parallel_stats(pipe)
        unparallelize(pipe)
        everyone = [None] * 4
        torch.distributed.all_gather_object(everyone, {
            "max_abs": float(np.abs(out - ref4).max()), "strategies": stats["strategies"],
            "cfg_gathers": stats.get("cfg_gathers", 0), "async_steps": stats.get("component_async_steps", 0)})
        results[label] = everyone
    import clip_checks  # beside this script

    everyone = [None] * 4
    torch.distributed.all_gather_object(everyone, clip_checks.cfg_clip(rank))
    results["cfg_clip"] = everyone
    if rank == 0:
        with open(path, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    from accel.parallel import spawn

    spawn(run, 4, (sys.argv[1],), backend="gloo", timeout_s=120)
