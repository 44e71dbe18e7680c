"""Where the denoising loop is: call, step, CFG branch, token grid, for every technique to read.

Pipelines do not tell their denoiser which step it is on or whether a call is the conditional
or unconditional branch, and they differ in how they run CFG. The tracker observes instead of
asking:

- a new pipeline call starts when the pipeline calls ``scheduler.set_timesteps`` (every
  diffusers pipeline does, once, before its loop); a step ends at ``scheduler.step``;
- the branch is the name the pipeline gives ``cache_context`` ("cond"/"uncond") when it
  calls the denoiser twice per step (Flux true-CFG, Wan), else ``batched`` when the pipeline
  concatenates [uncond, cond] in one batch (``do_classifier_free_guidance``; CogVideoX and LTX
  name that context "cond_uncond"), else ``none``;
- the grid and text length come from the denoiser's own inputs, through the family adapter.

Applied to a bare denoiser (no scheduler to watch), steps are told apart by the ``timestep``
argument: a new value is a new step, a larger value than the last one starts a new call
(denoising always runs from high noise to low).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from diffusers.hooks import ModelHook

from .families import Adapter, bind_inputs
from .patching import Ledger

HOOK_NAME = "accel.tracker"


@dataclass
class StepState:
    call: int = 0  # pipeline calls seen (1-based once the first call starts)
    step: int = 0  # denoising step within the call (0-based)
    total_steps: int | None = None
    call_in_step: int = 0  # denoiser forwards already made in this step
    branch: str = "none"  # "cond", "uncond", "batched" (uncond first, cond second) or "none"
    component: str = ""  # which denoiser runs now ("unet", "transformer", "transformer_2")
    grid: tuple = (1, 1, 1)
    text_len: int = 0
    batch: int = 0
    timestep: float | None = None  # bare denoiser: the last forward's timestep; None under a pipeline
    steps_by_component: dict = field(default_factory=dict)  # Wan 2.2 counts steps per transformer
    branches: list = field(default_factory=list)  # CFG branches seen in this call, in first-seen order


class StepTracker:
    """Keeps `state` current; calls `on_call_start` listeners at each new pipeline call."""

    def __init__(self, pipe=None):
        self.pipe = pipe
        self.state = StepState()
        self._listeners: list[Callable[[StepState], None]] = []
        self._context_name: str | None = None
        self._watching_scheduler = False
        self._scheduler = self._ledger = None
        self._watched: list = []  # schedulers whose methods are wrapped (identity, not equality)
        self._call_t0 = None
        self.timings = {"denoise_s": 0.0, "denoiser_forwards": 0}
        self._batched_cfg: tuple = (None, False)  # ((call, component, batch), answer) of _pipe_batches_cfg

    def on_call_start(self, fn: Callable[[StepState], None]) -> None:
        self._listeners.append(fn)

    @property
    def context_name(self) -> str | None:
        """The name the pipeline itself gave ``cache_context`` for the running call, if any."""
        return self._context_name

    # --- attachment ---------------------------------------------------------------------------
    def attach(self, adapters: list[Adapter], ledger: Ledger) -> None:
        self._ledger = ledger
        scheduler = getattr(self.pipe, "scheduler", None) if self.pipe is not None else None
        if scheduler is not None and hasattr(scheduler, "set_timesteps") and hasattr(scheduler, "step"):
            self._watching_scheduler = True
            self._watch(scheduler)
        for adapter in adapters:
            ledger.add_hook(adapter.module, _TrackerHook(self, adapter), HOOK_NAME)
            if hasattr(adapter.module, "cache_context"):
                ledger.wrap_method(adapter.module, "cache_context", self._make_cache_context)

    def _watch(self, scheduler) -> bool:
        """Wrap ``scheduler``'s ``set_timesteps`` (a call starts) and ``step`` (a step ends), once per scheduler:
        a scheduler swapped out and back in is already wrapped (wrapping again counted every call and step twice)."""
        self._scheduler = scheduler
        if any(s is scheduler for s in self._watched):
            return False
        self._watched.append(scheduler)

        def make_set_timesteps(original):
            def set_timesteps(*args, **kwargs):
                out = original(*args, **kwargs)
                self._start_call(scheduler)
                return out
            return set_timesteps

        def make_step(original):
            def step(*args, **kwargs):
                out = original(*args, **kwargs)
                self._end_step()
                return out
            return step

        self._ledger.wrap_method(scheduler, "set_timesteps", make_set_timesteps)
        self._ledger.wrap_method(scheduler, "step", make_step)
        return True

    def _make_cache_context(self, original):
        import contextlib

        @contextlib.contextmanager
        def cache_context(name, *args, **kwargs):
            previous, self._context_name = self._context_name, name
            try:
                with original(name, *args, **kwargs):
                    yield
            finally:
                self._context_name = previous

        return cache_context

    # --- events -------------------------------------------------------------------------------
    def _start_call(self, scheduler=None) -> None:
        s = self.state
        s.call += 1
        s.step = 0
        s.call_in_step = 0
        s.timestep = None
        s.steps_by_component = {}
        s.branches = []
        s.total_steps = len(scheduler.timesteps) if scheduler is not None and scheduler.timesteps is not None else None
        self._call_t0 = None
        self.timings = {"denoise_s": 0.0, "denoiser_forwards": 0}
        for fn in self._listeners:
            fn(s)

    def _end_step(self) -> None:
        self.state.step += 1
        self.state.call_in_step = 0
        if self._call_t0 is not None:
            self.timings["denoise_s"] = time.perf_counter() - self._call_t0

    # Host-side bookkeeping: kept out of torch.compile graphs, where dynamo would specialise on the
    # counters and recompile at every step and call.
    @torch.compiler.disable
    def _before_forward(self, adapter: Adapter, inputs: dict) -> None:
        s = self.state
        t = None
        if not self._watching_scheduler:
            # Documented host sync (bare denoiser only, one per forward): without a scheduler to watch,
            # the timestep's value is what tells steps and calls apart. Under a pipeline it is not read.
            t = inputs.get("timestep")
            if isinstance(t, torch.Tensor):
                t = float(t.flatten()[0]) if t.numel() else None
            elif t is not None:
                t = float(t)
            if s.call == 0 or (t is not None and s.timestep is not None and t > s.timestep):
                self._start_call()
            elif t is not None and s.timestep is not None and t != s.timestep:
                self._end_step()
        elif getattr(self.pipe, "scheduler", None) is not self._scheduler:
            # The user swapped the scheduler after `apply` (``pipe.scheduler = X.from_config(...)``):
            # this call's set_timesteps went unseen. Watch the new one; this forward starts a call. A scheduler
            # swapped back in is still wrapped: its set_timesteps already started this call.
            if self._watch(self.pipe.scheduler):
                self._start_call(self._scheduler)
        elif s.call == 0:  # the pipeline set its timesteps before we were applied
            self._start_call(self._scheduler)
        if self._call_t0 is None:
            self._call_t0 = time.perf_counter()
        s.timestep = t
        s.component = adapter.component
        counted = s.steps_by_component.setdefault(adapter.component, {"steps": 0, "last_step": None})
        if counted["last_step"] != s.step:
            counted["steps"] += 1
            counted["last_step"] = s.step
        s.grid = adapter.grid(inputs)
        s.text_len = adapter.text_len(inputs)
        s.batch = adapter.batch_size(inputs)
        if self._context_name in ("cond", "uncond"):
            s.branch = self._context_name
        elif self._pipe_batches_cfg(adapter, inputs):
            s.branch = "batched"
        else:
            s.branch = "none"
        if s.branch not in s.branches:
            s.branches.append(s.branch)

    def _pipe_batches_cfg(self, adapter: Adapter, inputs: dict) -> bool:
        # Most pipelines expose the flag; CogVideoX keeps it in a local variable but stores the
        # guidance scale, and guidance > 1 is exactly its condition for batching. PixArt keeps
        # neither: there, a batch whose two halves hold the same latents is a CFG batch.
        if self.pipe is None:
            return False
        flag = getattr(self.pipe, "do_classifier_free_guidance", None)
        if flag is not None:
            return bool(flag)  # a host bool (or int) the pipeline set
        scale = getattr(self.pipe, "_guidance_scale", None)
        if scale is not None:
            return float(scale) > 1.0  # a host float the pipeline set
        x = inputs.get("sample", inputs.get("hidden_states"))
        if not isinstance(x, torch.Tensor) or x.shape[0] % 2:
            return False
        key = (self.state.call, self.state.component, x.shape[0])
        if self._batched_cfg[0] != key:
            half = x.shape[0] // 2
            # Documented host sync, once per call and denoiser (not per forward): a pipeline batches
            # CFG for the whole call or not at all, so the first forward's answer holds for the rest.
            self._batched_cfg = (key, bool(torch.equal(x[:half], x[half:])))
        return self._batched_cfg[1]

    @torch.compiler.disable
    def _after_forward(self) -> None:
        self.state.call_in_step += 1
        self.timings["denoiser_forwards"] += 1
        if not self._watching_scheduler and self._call_t0 is not None:
            self.timings["denoise_s"] = time.perf_counter() - self._call_t0

    def stats(self) -> dict:
        s = self.state
        return {
            "calls": s.call,
            "steps": s.step if self._watching_scheduler else s.step + (1 if s.call else 0),
            "total_steps": s.total_steps,
            "denoiser_forwards": self.timings["denoiser_forwards"],
            "denoise_s": round(self.timings["denoise_s"], 6),
            "grid": list(s.grid),
            "steps_by_component": {k: v["steps"] for k, v in s.steps_by_component.items()},
            "cfg_branches": list(s.branches),
        }


class _TrackerHook(ModelHook):
    def __init__(self, tracker: StepTracker, adapter: Adapter):
        super().__init__()
        self.tracker = tracker
        self.adapter = adapter

    def pre_forward(self, module, *args, **kwargs):
        self.tracker._before_forward(self.adapter, bind_inputs(module, args, kwargs))
        return args, kwargs

    def post_forward(self, module, output):
        self.tracker._after_forward()
        return output
