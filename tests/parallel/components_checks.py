"""AsyncDiff components on a spawned 2-process gloo group (results to JSON): what needs more than a tiny model.

- the trained ``ref-sd`` (a UNet, 25 steps) and ``ref-dit`` (a Flux-class DiT, 20 steps) on 2 held-out prompts
  each: fidelity against one process and the checker's scores, with the family's correction of the stale
  hand-over (``auto``) and without (``none``, AsyncDiff as published);
- token merging applied before `parallelize` (a token technique inside the stages each rank computes):
  with a warm-up over every step it equals one process with the same tokens config; asynchronous, it runs and
  merges;
- the step cache applied: the first call is refused on both ranks with one clear error (no hang).
"""

from __future__ import annotations

import json
import statistics
import sys

import numpy as np
import torch

import accel
from accel.parallel import ParallelConfig, parallel_stats, unparallelize
from accel.pipelines.call import to_frames


def trained(results: dict, model: str) -> None:
    from accel.eval import bench
    from accel.eval.metrics import compare
    from accel.pipelines.load import load

    pipe = load(model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    work = bench.workload(pipe, model, n_prompts=2, device="cpu")

    def run_all():
        return [to_frames(pipe(**c.kwargs, generator=torch.Generator("cpu").manual_seed(c.seed)))
                for c in work.calls]

    items = [c.item for c in work.calls]
    ref = run_all()
    for correction in ("auto", "none"):
        accel.parallelize(pipe, ParallelConfig(components=2, component_correction=correction))
        outs = run_all()
        stats = parallel_stats(pipe)
        unparallelize(pipe)
        per = [compare(a, b) for a, b in zip(ref, outs, strict=True)]
        results[f"{model}/{correction}"] = {
            "psnr": [p["psnr"] for p in per], "ssim": statistics.median(p["ssim"] for p in per),
            "scores": work.scorer(outs, items), "baseline_scores": work.scorer(ref, items),
            "async_steps": stats.get("component_async_steps", 0), "steps": work.steps}


def tokens(results: dict) -> None:
    from accel.pipelines import tiny

    pipe = tiny.make("sd15")
    kw = tiny.example_inputs("sd15", num_inference_steps=4)
    config = {"tokens": {"ratio": 0.5, "min_tokens": 0, "use_rand": False}}
    accel.apply(pipe, config)
    ref = to_frames(pipe(**kw))
    for label, cfg in (("tokens_sync", {"components": 2, "warmup_steps": 4}), ("tokens_async", {"components": 2})):
        accel.parallelize(pipe, ParallelConfig(**cfg))
        out = to_frames(pipe(**tiny.example_inputs("sd15", num_inference_steps=4)))
        merged = accel.stats(pipe).get("tokens", {})
        stats = parallel_stats(pipe)
        unparallelize(pipe)
        results[label] = {"max_abs": float(np.abs(out - ref).max()), "tokens": merged,
                          "async_steps": stats.get("component_async_steps", 0)}
    accel.remove(pipe)


def cache_refused(results: dict) -> None:
    from accel.pipelines import tiny

    pipe = tiny.make("flux")
    accel.apply(pipe, {"cache": {"method": "block", "threshold": 0.1}})
    accel.parallelize(pipe, ParallelConfig(components=2))
    try:
        pipe(**tiny.example_inputs("flux", num_inference_steps=2))
        results["cache_refused"] = None
    except accel.ConfigError as e:
        results["cache_refused"] = str(e)
    finally:
        unparallelize(pipe)
        accel.remove(pipe)


def run(rank: int, path: str) -> None:
    results: dict = {}
    trained(results, "ref-sd")
    trained(results, "ref-dit")
    tokens(results)
    cache_refused(results)
    everyone = [None] * 2
    torch.distributed.all_gather_object(everyone, results.get("cache_refused"))
    results["cache_refused_per_rank"] = everyone
    if rank == 0:
        with open(path, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    from accel.parallel import spawn

    spawn(run, 2, (sys.argv[1],), backend="gloo", timeout_s=120)
