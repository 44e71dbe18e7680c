"""The one observer of the denoising loop: call, steps, CFG branch, token grid, for every technique to read.

Pipelines do not tell their denoiser which step it is on or whether a call is the conditional or
unconditional branch, and they differ in how they run CFG. One `LoopObserver` per pipeline (or bare
denoiser) watches instead of asking, for every user at once (`accel.apply` and `accel.parallelize` each
hold a `LoopView` of it), and publishes:

- the pipeline call (``on_call_enter`` / ``on_call_exit``), with its bound arguments: the instance's class is
  swapped for a subclass of the same name whose ``__call__`` reports the call; before that, ``on_call_args``
  listeners may replace arguments (a tuned config's step count);
- the timesteps set (``on_timesteps``, then ``on_call_start``): every diffusers pipeline calls
  ``scheduler.set_timesteps`` once before its loop; this starts the loop's state (step 0, ``total_steps``);
- each denoiser forward (``on_forward``), from a hook outermost on the denoiser: which denoiser, its step,
  and the branch: the name the pipeline gives ``cache_context`` ("cond"/"uncond") when it calls the denoiser
  twice per step (Flux true-CFG, Wan), else ``batched`` when the pipeline concatenates [uncond, cond] in one
  batch (``do_classifier_free_guidance``; CogVideoX and LTX name that context "cond_uncond"), else ``none``;
- the step end (``on_step_end``), at ``scheduler.step``, with the scheduler's output.

Steps are 0-based from the first step after ``set_timesteps``. The grid, text length and batch are read by a
second hook that `accel.apply` places outermost of its own hooks, so they describe the inputs its techniques
see (parallel strategies shard them outside it). Applied to a bare denoiser (no scheduler to watch), steps are
told apart by the ``timestep`` argument: a new value is a new step, a larger value than the last one starts a
new call (denoising always runs from high noise to low).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from diffusers.hooks import ModelHook

from .families import Adapter, bind_inputs, denoisers_of
from .patching import Ledger

HOOK_NAME = "accel.loop"  # one per view, outside that view's user's hooks; the last attached view's acts
INPUTS_HOOK = "accel.loop.inputs"  # outermost of accel.apply's hooks: the inputs its techniques see
EVENTS = ("call_args", "call_enter", "call_exit", "timesteps", "call_start", "forward", "step_end")
_ATTR = "_accel_loop"


@dataclass
class StepState:
    call: int = 0  # pipeline calls seen (1-based once the first call starts)
    step: int = 0  # denoising step within the call (0-based)
    total_steps: int | None = None
    call_in_step: int = 0  # denoiser forwards already made in this step
    branch: str = "none"  # "cond", "uncond", "batched" (uncond first, cond second) or "none"
    component: str = ""  # which denoiser runs now ("unet", "transformer", "transformer_2")
    component_step: int = 0  # the step of that denoiser within the call, 0-based from its first step
    grid: tuple = (1, 1, 1)
    text_len: int = 0
    batch: int = 0
    timestep: float | None = None  # bare denoiser: the last forward's timestep; None under a pipeline
    steps_by_component: dict = field(default_factory=dict)  # Wan 2.2 counts steps per transformer
    branches: list = field(default_factory=list)  # CFG branches seen in this call, in first-seen order


@dataclass
class CallInfo:
    """The pipeline call in flight."""

    index: int  # pipeline calls entered (1-based)
    args: dict  # the bound arguments of the pipeline's ``__call__``, defaults filled, ``**kwargs`` flattened


def observe(target, ledger: Ledger, adapters: list[Adapter] | None = None) -> LoopView:
    """A view of ``target``'s loop observer for one user; the observer is shared by every user of ``target``.

    Args:
        target: a diffusers pipeline or a bare denoiser module.
        ledger: the user's ledger; undoing it drops the view, and the last view takes the observer's changes.
        adapters: the denoisers' adapters, if the caller has them (built from ``target`` otherwise).

    Returns:
        A `LoopView`: register listeners on it, then call `LoopView.attach` once the user's hooks are in.
    """
    observer = target.__dict__.get(_ATTR)
    if observer is None:
        if adapters is None:
            adapters = [Adapter(m, name) for name, m in denoisers_of(target)]
        observer = LoopObserver(target, adapters)
    return LoopView(observer, ledger)


def _listener(event: str, doc: str):
    def register(self, fn: Callable) -> None:
        self.listeners[event].append(fn)
    register.__doc__ = doc
    return register


class LoopView:
    """One user's window on a `LoopObserver`: its listeners, and the state every user shares."""

    def __init__(self, observer: LoopObserver, ledger: Ledger):
        self.observer = observer
        self.ledger = ledger
        self.listeners: dict[str, list[Callable]] = {e: [] for e in EVENTS}

    @property
    def state(self) -> StepState:
        return self.observer.state

    @property
    def pipe(self):
        """The pipeline, or None for a bare denoiser."""
        return self.observer.pipe

    @property
    def call(self) -> CallInfo | None:
        """The pipeline call in flight, or None between calls."""
        return self.observer.call

    @property
    def context_name(self) -> str | None:
        """The name the pipeline itself gave ``cache_context`` for the running forward, if any."""
        return self.observer.context_name

    on_call_args = _listener("call_args", "``fn(args) -> dict``: before the call, the arguments to replace (by name; "
                                          "{} for none), given the bound arguments.")
    on_call_enter = _listener("call_enter", "``fn(call)`` when the pipeline's ``__call__`` starts, before it runs.")
    on_call_exit = _listener("call_exit", "``fn(call)`` when the pipeline's ``__call__`` returns or raises.")
    on_timesteps = _listener("timesteps", "``fn(scheduler)`` right after ``set_timesteps``, before the loop's state "
                                          "starts (it may cut the schedule: ``total_steps`` is read after it).")
    on_call_start = _listener("call_start", "``fn(state)`` when the loop of a new call starts (step 0, "
                                            "``total_steps`` known).")
    on_forward = _listener("forward", "``fn(state, adapter, inputs)`` before each denoiser forward, outside every "
                                      "other hook.")
    on_step_end = _listener("step_end", "``fn(state, output)`` after each ``scheduler.step``; ``state.step`` "
                                        "counts the steps done.")

    def attach(self, read_inputs: bool = False) -> None:
        """Start observing (once per target) and put this view's loop hook outside every hook there now.

        Args:
            read_inputs: also keep ``state.grid``, ``text_len`` and ``batch`` current, from a hook outside
                the hooks this user has added so far (and removed with its ledger).
        """
        obs = self.observer
        obs.start()
        try:
            for adapter in obs.adapters if read_inputs else ():
                self.ledger.add_hook(adapter.module, _InputsHook(obs, adapter, self), INPUTS_HOOK)
            # A hook per view, not one moved outward: diffusers' remove_hook drops a new_forward hook's forward
            # when it takes the hook under it (CFG parallel's is such a hook).
            obs.attached += 1
            name = f"{obs.hook_name}.{obs.attached}"
            for adapter in obs.adapters:
                self.ledger.add_hook(adapter.module, _LoopHook(obs, adapter, self), name)
            obs.views.append(self)
        except BaseException:
            obs.release(self)
            raise
        # Registered last, so undone first: the view leaves (the last takes the wrappers) before its hooks go.
        self.ledger.on_undo(lambda: obs.release(self))

    def stats(self) -> dict:
        return self.observer.stats()


class LoopObserver:
    """Keeps `state` current for one pipeline or bare denoiser and calls its views' listeners."""

    def __init__(self, target, adapters: list[Adapter]):
        self.target = target
        self.pipe = None if isinstance(target, torch.nn.Module) else target
        self.adapters = adapters
        self.state = StepState()
        self.call: CallInfo | None = None
        self.views: list[LoopView] = []
        self.context_name: str | None = None
        self.timings = {"denoise_s": 0.0, "denoiser_forwards": 0}
        self._ledger = Ledger()  # the call, scheduler and cache_context wrappers
        self._started = False
        self._watching_scheduler = False
        self._scheduler = None
        self._watched: list = []  # schedulers whose methods are wrapped (identity, not equality)
        self._calls_entered = 0
        self._call_t0 = None
        self._batched_cfg: tuple = (None, False)  # ((call, component, batch), answer) of _pipe_batches_cfg
        self.hook_name = HOOK_NAME if self.pipe is not None else f"{HOOK_NAME}.denoiser"
        self.attached = 0  # views attached so far: names their loop hooks

    def _emit(self, event: str, *args) -> None:
        for fn in [fn for view in self.views for fn in view.listeners[event]]:
            fn(*args)

    # --- attachment ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.target.__dict__[_ATTR] = self
        self._ledger.on_undo(lambda: self.target.__dict__.pop(_ATTR, None))
        if self.pipe is not None:
            self._wrap_call()
            if hasattr(getattr(self.pipe, "scheduler", None), "set_timesteps"):
                self._watching_scheduler = True
                self._watch(self.pipe.scheduler)
        for adapter in self.adapters:
            if hasattr(adapter.module, "cache_context"):
                self._ledger.wrap_method(adapter.module, "cache_context", self._make_cache_context)

    def release(self, view: LoopView) -> None:
        """Drop ``view``; with the last view gone, undo every change the observer made."""
        if view in self.views:
            self.views.remove(view)
        if not self.views:
            self._started = self._watching_scheduler = False
            self._scheduler, self._watched = None, []
            self._ledger.undo_all()

    def _wrap_call(self) -> None:
        # `pipe(...)` looks ``__call__`` up on the type, so the instance gets a subclass of the same name whose
        # ``__call__`` reports the call; the class itself is not touched, and undo puts the instance's class back.
        pipe, cls = self.pipe, type(self.pipe)
        original = cls.__call__
        signature = inspect.signature(original)

        def __call__(this, *args, **kwargs):
            if this is not self.pipe or self.call is not None:  # a copy of the pipeline, or a nested call
                return original(this, *args, **kwargs)
            args, kwargs = self._replace_args(signature, this, args, kwargs)
            self._enter_call(signature, this, args, kwargs)
            try:
                return original(this, *args, **kwargs)
            finally:
                call, self.call = self.call, None
                self._emit("call_exit", call)

        functools.update_wrapper(__call__, original)
        observed = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                                "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
        pipe.__class__ = observed

        def undo():
            if type(pipe) is observed:
                pipe.__class__ = cls

        self._ledger.on_undo(undo)

    def _watch(self, scheduler) -> bool:
        """Wrap ``scheduler``'s ``set_timesteps`` (a loop starts) and ``step`` (a step ends), once per scheduler:
        a scheduler swapped out and back in is already wrapped."""
        self._scheduler = scheduler
        if any(s is scheduler for s in self._watched):
            return False
        self._watched.append(scheduler)

        def make_set_timesteps(original):
            def set_timesteps(*args, **kwargs):
                out = original(*args, **kwargs)
                self._emit("timesteps", scheduler)
                self._start_call(scheduler)
                return out
            return set_timesteps

        def make_step(original):
            def step(*args, **kwargs):
                out = original(*args, **kwargs)
                self._end_step(out)
                return out
            return step

        self._ledger.wrap_method(scheduler, "set_timesteps", make_set_timesteps)
        self._ledger.wrap_method(scheduler, "step", make_step)
        return True

    def _make_cache_context(self, original):
        @contextlib.contextmanager
        def cache_context(name, *args, **kwargs):
            previous, self.context_name = self.context_name, name
            try:
                with original(name, *args, **kwargs):
                    yield
            finally:
                self.context_name = previous

        return cache_context

    # --- events -------------------------------------------------------------------------------
    def _replace_args(self, signature, this, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The call's arguments with the ``call_args`` listeners' replacements (unchanged when none)."""
        fns = [fn for view in self.views for fn in view.listeners["call_args"]]
        if not fns:
            return args, kwargs
        bound_args = _bound_arguments(signature, this, args, kwargs)
        changes = {}
        for fn in fns:
            changes.update(fn(bound_args) or {})
        if not changes:
            return args, kwargs
        bound = signature.bind(this, *args, **kwargs)
        varkw = next((n for n, p in signature.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
        for name, value in changes.items():
            if name in signature.parameters and name != varkw:
                bound.arguments[name] = value
            elif varkw is not None:
                bound.arguments[varkw] = {**bound.arguments.get(varkw, {}), name: value}
        return bound.args[1:], bound.kwargs

    def _enter_call(self, signature, this, args, kwargs) -> None:
        scheduler = getattr(self.pipe, "scheduler", None)
        if self._watching_scheduler and scheduler is not self._scheduler and hasattr(scheduler, "set_timesteps"):
            self._watch(scheduler)  # swapped since the last call (``pipe.scheduler = X.from_config(...)``)
        self._calls_entered += 1
        self.call = CallInfo(self._calls_entered, _bound_arguments(signature, this, args, kwargs))
        self._emit("call_enter", self.call)

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
        self._emit("call_start", s)

    def _end_step(self, output=None) -> None:
        self.state.step += 1
        self.state.call_in_step = 0
        if self._call_t0 is not None:
            self.timings["denoise_s"] = time.perf_counter() - self._call_t0
        self._emit("step_end", self.state, output)

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
            # The scheduler was swapped inside a call, or the pipeline is run without its ``__call__``: this
            # call's set_timesteps went unseen. Watch the new one; this forward starts a call. A scheduler
            # swapped back in is still wrapped: its set_timesteps already started this call.
            if self._watch(self.pipe.scheduler):
                self._start_call(self._scheduler)
        elif s.call == 0:  # the pipeline set its timesteps before we were attached
            self._start_call(self._scheduler)
        if self._call_t0 is None:
            self._call_t0 = time.perf_counter()
        s.timestep = t
        s.component = adapter.component
        counted = s.steps_by_component.setdefault(adapter.component, {"steps": 0, "last_step": None})
        if counted["last_step"] != s.step:
            counted["steps"] += 1
            counted["last_step"] = s.step
        s.component_step = counted["steps"] - 1
        name = self.context_name
        s.branch = name if name in ("cond", "uncond") else "batched" if self._pipe_batches_cfg(inputs) else "none"
        if s.branch not in s.branches:
            s.branches.append(s.branch)
        self._emit("forward", s, adapter, inputs)

    def _pipe_batches_cfg(self, inputs: dict) -> bool:
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
    def _read_inputs(self, adapter: Adapter, inputs: dict) -> None:
        s = self.state
        s.grid = adapter.grid(inputs)
        s.text_len = adapter.text_len(inputs)
        s.batch = adapter.batch_size(inputs)

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


def _bound_arguments(signature: inspect.Signature, this, args: tuple, kwargs: dict) -> dict:
    """``__call__``'s arguments by name, defaults filled and ``**kwargs`` flattened ({} if they do not bind:
    the call itself then raises the error)."""
    try:
        bound = signature.bind(this, *args, **kwargs)
    except TypeError:
        return {}
    bound.apply_defaults()
    params = signature.parameters
    out = {}
    for i, (name, value) in enumerate(bound.arguments.items()):
        if i == 0:
            continue  # self
        if params[name].kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


class _LoopHook(ModelHook):
    def __init__(self, observer: LoopObserver, adapter: Adapter, view: LoopView):
        super().__init__()
        self.observer, self.adapter, self.view = observer, adapter, view

    def acts(self) -> bool:  # the last attached view's hook is the outermost: it alone counts
        views = self.observer.views
        return bool(views) and views[-1] is self.view

    def pre_forward(self, module, *args, **kwargs):
        if self.acts():
            self.observer._before_forward(self.adapter, bind_inputs(module, args, kwargs))
        return args, kwargs

    def post_forward(self, module, output):
        if self.acts():
            self.observer._after_forward()
        return output


class _InputsHook(_LoopHook):
    def pre_forward(self, module, *args, **kwargs):
        self.observer._read_inputs(self.adapter, bind_inputs(module, args, kwargs))
        return args, kwargs

    def post_forward(self, module, output):
        return output
