"""Baseline against accelerated, side by side: what `accel generate --compare` reports.

One timed call each is noise (the first call of a process pays for allocation and compilation, and
whichever runs first warms the caches of the other), so `timed_pair` runs one untimed warm-up of each,
then alternates which goes first over ``repeats`` rounds, and reports medians with their spread.
`engaged` reads `accel.stats` to say what the accelerated call actually did: when nothing engaged, the
outputs are identical and any time difference is noise, which is what the report must say instead
of a speed-up.
"""

from __future__ import annotations

import statistics
from typing import Callable

from .clock import measure
from .metrics import compare


def engaged(stats: dict) -> list[str]:
    """One line per technique that did work in the last call (empty: nothing engaged)."""
    out = []
    cache = stats.get("cache") or {}
    if cache.get("reused"):
        out.append(f"step cache reused {cache['reused']} of {cache['reused'] + cache.get('computed', 0)} "
                   "denoiser computations")
    tokens = stats.get("tokens") or {}
    if tokens.get("average_removed"):
        out.append(f"token reduction removed {tokens.get('realised_ratio', 0):.0%} of the tokens in "
                   f"{tokens.get('reduced_blocks', 0)} blocks")
    approx = stats.get("approx") or {}
    if approx.get("hit"):
        out.append(f"approximate cache started from a stored latent of a similar prompt (similarity "
                   f"{approx['similarity']:.3f}), skipping {approx['skipped_steps']} of {approx['total_steps']} steps")
    attention = stats.get("attention") or {}
    if attention.get("sparse_calls"):
        out.append(f"sparse attention ran {attention['sparse_calls']} calls at density "
                   f"{attention.get('realised_density')} ({attention.get('backend')})")
    return out


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def timed_pair(baseline: Callable[[], object], accelerated: Callable[[], object], repeats: int = 2,
               prepare: dict | None = None) -> dict:
    """Warm up each, then ``repeats`` rounds alternating the order. ``prepare``: {"baseline"/"accelerated":
    callable} run untimed before each call of that side (`accel.remove` / `accel.apply`). Returns
    ``baseline_s``/``accelerated_s`` (medians), ``*_range`` ([min, max]), ``speedup`` (ratio of the medians)
    and the last output of each."""
    prepare = prepare or {}
    device = _device()  # the wall time a user waits, measured by the one clock (synchronised on CUDA)
    fns = {"baseline": baseline, "accelerated": accelerated}
    outs = {}
    for name in fns:  # warm-up, untimed
        prepare.get(name, lambda: None)()
        outs[name] = fns[name]()
    times: dict = {"baseline": [], "accelerated": []}
    for r in range(repeats):
        for name in (("baseline", "accelerated") if r % 2 == 0 else ("accelerated", "baseline")):
            prepare.get(name, lambda: None)()
            sample = measure(fns[name], device)
            outs[name] = sample.out
            times[name].append(sample.wall_s)
    b, a = (statistics.median(times[n]) for n in ("baseline", "accelerated"))
    return {"baseline_s": b, "accelerated_s": a, "speedup": b / max(a, 1e-9), "repeats": repeats,
            "baseline_range": [min(times["baseline"]), max(times["baseline"])],
            "accelerated_range": [min(times["accelerated"]), max(times["accelerated"])],
            "baseline_out": outs["baseline"], "accelerated_out": outs["accelerated"]}


def report(pair: dict, stats: dict) -> tuple[object, object, dict]:
    """(baseline output, accelerated output, JSON-safe metrics) of a `timed_pair` run whose accelerated call
    left ``stats``: PSNR/SSIM of the accelerated output against the baseline, the timings (rounded) and what
    engaged. Outputs are arrays, or lists of frames (stacked for the metrics)."""
    import numpy as np

    base, acc = pair["baseline_out"], pair["accelerated_out"]
    def rounded(v):  # medians and their ranges alike, so a median never falls outside its rounded range
        return round(v, 4) if isinstance(v, float) else [rounded(x) for x in v] if isinstance(v, list) else v

    timings = {k: rounded(v) for k, v in pair.items() if not k.endswith("_out")}
    return base, acc, {**compare(np.stack(base), np.stack(acc)), **timings, "engaged": engaged(stats)}
