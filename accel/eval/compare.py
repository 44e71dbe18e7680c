"""Baseline against accelerated, side by side: what `accel generate --compare` reports.

One timed call each is noise (the first call of a process pays for allocation and compilation, and
whichever runs first warms the caches of the other), so `timed_pair` runs one untimed warm-up of each,
then alternates which goes first over ``repeats`` rounds, and reports medians with their spread.
`engaged` reads `accel.stats` to say what the accelerated call actually did (`Engaged` sums it over the
calls of a row): when nothing engaged, the outputs are identical and any time difference is noise, which
is what the report must say instead of a speed-up.
"""

from __future__ import annotations

import statistics
from typing import Callable

from .clock import measure
from .metrics import compare


class Engaged:
    """What the techniques did over every call of a row, summed from each call's `accel.stats` (which
    describes one call): ``add`` after each call, ``lines()`` at the end (empty: nothing engaged)."""

    def __init__(self):
        self.calls = 0
        self.reused = self.computed = 0  # step cache: denoiser computations
        self.token_calls = self.token_blocks = 0
        self.token_ratios: list[float] = []
        self.approx_hits = self.approx_skipped = self.approx_steps = 0
        self.approx_similarity: list[float] = []
        self.sparse_calls = self.attention_calls = 0
        self.densities: list[float] = []
        self.backends: set[str] = set()
        self.solver: dict | None = None  # the last call's sampler, when a config changed it
        self.solver_calls = 0

    def add(self, stats: dict) -> "Engaged":
        self.calls += 1
        cache = stats.get("cache") or {}
        self.reused += cache.get("reused") or 0
        self.computed += cache.get("computed") or 0
        tokens = stats.get("tokens") or {}
        if tokens.get("average_removed"):
            self.token_calls += 1
            self.token_ratios.append(tokens.get("realised_ratio") or 0.0)
            self.token_blocks = max(self.token_blocks, tokens.get("reduced_blocks") or 0)
        approx = stats.get("approx") or {}
        if approx.get("hit"):
            self.approx_hits += 1
            self.approx_similarity.append(approx.get("similarity") or 0.0)
            self.approx_skipped += approx.get("skipped_steps") or 0
        self.approx_steps += approx.get("total_steps") or stats.get("total_steps") or 0
        attention = stats.get("attention") or {}
        if attention.get("sparse_calls"):
            self.sparse_calls += attention["sparse_calls"]
            if attention.get("realised_density") is not None:
                self.densities.append(attention["realised_density"])
            self.backends.add(str(attention.get("backend")))
        solver = stats.get("solver") or {}
        if solver.get("changed"):
            self.solver, self.solver_calls = solver, self.solver_calls + 1
        self.attention_calls += sum(attention.get(k) or 0 for k in ("sparse_calls", "dense_calls", "passthrough_calls"))
        return self

    def lines(self) -> list[str]:
        over = f" over {self.calls} calls" if self.calls > 1 else ""
        out = []
        if self.reused:
            out.append(f"step cache reused {self.reused} of {self.reused + self.computed} denoiser computations{over}")
        if self.token_calls:
            ratio = statistics.mean(self.token_ratios)
            where = f" in {self.token_calls} of {self.calls} calls" if self.calls > 1 else ""
            out.append(f"token reduction removed {ratio:.0%} of the tokens in {self.token_blocks} blocks{where}")
        if self.approx_hits:
            sim = min(self.approx_similarity)
            hits = f" in {self.approx_hits} of {self.calls} calls" if self.calls > 1 else ""
            out.append(f"approximate cache started from a stored latent of a similar prompt{hits} (similarity "
                       f"{'>= ' if self.approx_hits > 1 else ''}{sim:.3f}), skipping {self.approx_skipped} of "
                       f"{self.approx_steps} steps")
        if self.sparse_calls:
            density = (f"{statistics.mean(self.densities):.3g}" if self.densities else "unknown")
            out.append(f"sparse attention ran {self.sparse_calls} of {self.attention_calls} attention calls{over} at "
                       f"density {density} ({', '.join(sorted(self.backends))})")
        if self.solver:
            asked = self.solver.get("asked_steps")
            where = f" in {self.solver_calls} of {self.calls} calls" if self.calls > 1 else ""
            out.append(f"sampler {self.solver['scheduler']} ran {self.solver['steps']} steps"
                       + (f" (the call asked {asked})" if asked and asked != self.solver["steps"] else "") + where)
        return out


def engaged(stats: dict) -> list[str]:
    """One line per technique that did work in the call ``stats`` describes (empty: nothing engaged);
    `Engaged` sums a row of many calls."""
    return Engaged().add(stats).lines()


def within_noise(baseline_range, accelerated_range) -> bool:
    """Whether a speed-up is within the noise of the machine: the baseline's and the accelerated run's
    ``[min, max]`` times (`timed_pair`'s ``*_range``) overlap, so the runs do not tell the two apart."""
    (b0, b1), (a0, a1) = baseline_range, accelerated_range
    return a0 <= b1 and b0 <= a1


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
