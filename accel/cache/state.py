"""Per-call cache state, kept apart per denoiser, CFG branch and call slot, plus the reuse counters.

Why keyed: a cached feature is only valid for the stream of forwards it came from. Pipelines that
run CFG as two calls per step (``cache_context("cond")`` / ``("uncond")``, or two plain calls) get one
state per branch; pipelines that batch [uncond, cond] get one state for the concatenated batch
(the reuse decision then covers both halves at once: see `relative_l1`). Wan 2.2's two experts are
two denoisers, so two states, each counting its own steps. Everything is dropped at each new
pipeline call, so nothing leaks between prompts or sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import ModelHook

from ..loop import StepState


def state_key(s: StepState) -> tuple:
    """Which stream a forward belongs to: (component, branch[, slot within the step])."""
    if s.branch in ("none", "batched"):
        # Unnamed repeated calls within one step (a pipeline running CFG as two plain calls) are
        # told apart by their order in the step.
        return (s.component, s.branch, s.call_in_step)
    return (s.component, s.branch)


@dataclass
class StreamState:
    """What one stream remembers between its steps within a call."""

    step: int = -1  # this stream's own step counter (0-based after the first forward)
    last_full: int | None = None  # stream step of the last full computation
    reused_in_row: int = 0
    reuse: bool = False  # decision for the forward in flight
    probe: torch.Tensor | None = None  # block cache: first blocks' residual at the last full step
    data: dict = field(default_factory=dict)  # method-specific cached tensors


class Streams:
    """The per-call store: one `StreamState` per key, counters per cached part and per branch."""

    def __init__(self):
        self.states: dict[tuple, StreamState] = {}
        self.counts: dict[str, dict[str, int]] = {}
        self.by_branch: dict[str, dict[str, int]] = {}
        self.extra: dict[str, dict[str, int]] = {}  # counters that are not steps (attention calls)
        self.trace: list | None = None  # set to a list to record (key, step, action, detail) events

    def reset(self, *_: Any) -> None:
        self.states.clear()
        self.counts.clear()
        self.by_branch.clear()
        self.extra.clear()
        if self.trace is not None:
            self.trace.clear()

    def begin(self, key: tuple) -> StreamState:
        st = self.states.get(key)
        if st is None:
            st = self.states[key] = StreamState()
        st.step += 1
        return st

    def count(self, part: str, key: tuple, reused: bool) -> None:
        what = "reused" if reused else "computed"
        c = self.counts.setdefault(part, {"computed": 0, "reused": 0})
        c[what] += 1
        b = self.by_branch.setdefault(key[1], {"computed": 0, "reused": 0})
        b[what] += 1

    def record(self, key: tuple, step: int, action: str, detail: Any = None) -> None:
        if self.trace is not None:
            self.trace.append((key, step, action, detail))

    def stats(self) -> dict:
        parts = {p: {**c, "hit_rate": _rate(c)} for p, c in self.counts.items()}
        computed = sum(c["computed"] for c in self.counts.values())
        reused = sum(c["reused"] for c in self.counts.values())
        total = {"computed": computed, "reused": reused}
        return {"parts": parts, **total, "hit_rate": _rate(total),
                "by_branch": {b: {**c, "hit_rate": _rate(c)} for b, c in self.by_branch.items()},
                **({"other": {k: dict(v) for k, v in self.extra.items()}} if self.extra else {})}


def _rate(c: dict) -> float:
    n = c["computed"] + c["reused"]
    return round(c["reused"] / n, 4) if n else 0.0


def full_steps(total: int, interval: int, warmup: int, schedule: str, power: float) -> set[int]:
    """Stream steps computed in full by a fixed schedule of ``total`` steps.

    ``uniform``: every ``interval``-th step after the warm-up. ``nonuniform``: the same number of full
    steps, placed at ``warmup + (total - warmup) * (i / k) ** power``: denser early, where the
    features of adjacent steps differ most (early steps set the layout).
    """
    full = set(range(min(warmup, total)))
    rest = total - warmup
    if rest <= 0:
        return full
    k = math.ceil(rest / interval)
    if schedule == "uniform":
        full.update(warmup + i * interval for i in range(k))
    else:
        full.update(warmup + min(rest - 1, round(rest * (i / k) ** power)) for i in range(k))
    return full


def fixed_schedule_reuses(st: StreamState, total: int | None, cfg) -> bool:
    """Reuse decision of a fixed schedule (``interval``, or the calibrated ``reuse_steps``) for the stream's
    current step."""
    calibrated = cfg.reused() if getattr(cfg, "reuse_steps", "") else None
    if (cfg.interval <= 1 and not calibrated) or st.step < cfg.warmup_steps or st.last_full is None:
        return False
    if cfg.max_skip and st.reused_in_row >= cfg.max_skip:
        return False
    if calibrated:
        return st.step in calibrated
    if total and cfg.schedule == "nonuniform" and st.step < total:
        return st.step not in full_steps(total, cfg.interval, cfg.warmup_steps, cfg.schedule, cfg.schedule_power)
    return (st.step - cfg.warmup_steps) % cfg.interval != 0


def settle(st: StreamState, reuse: bool) -> None:
    """Book-keeping after a stream's decision for its current step."""
    st.reuse = reuse
    if reuse:
        st.reused_in_row += 1
    else:
        st.reused_in_row = 0
        st.last_full = st.step


def fingerprint(t: torch.Tensor) -> float:
    """A number identifying a cached tensor in traces (tests compare which cache a step used).

    A host sync: called only while a trace is recording (``Streams.trace`` set), never in normal runs."""
    return float(t.detach().double().abs().sum())


def relative_l1(now: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """Relative mean absolute change per sample, the largest over the batch (0-d tensor).

    Taking the largest keeps a batched [uncond, cond] pair (or batch > 1) honest: a cached step is
    reused only when every sample in it changed little.
    """
    b = now.shape[0]
    num = (now - before).abs().reshape(b, -1).float().mean(dim=1)
    den = before.abs().reshape(b, -1).float().mean(dim=1).clamp_min(1e-12)
    return (num / den).max()


class BeginForwardHook(ModelHook):
    """On the denoiser: tells a cache (anything with ``begin_forward()``) that a forward starts."""

    def __init__(self, cache):
        super().__init__()
        self.cache = cache

    def pre_forward(self, module, *args, **kwargs):
        self.cache.begin_forward()
        return args, kwargs
