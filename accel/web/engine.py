"""The web app's work, without gradio: check a request, run it on a free pipeline, write the files.

One `Worker` holds one pipeline (one GPU, or the CPU); the web queue runs at most one request per
worker, and `Engine.run` takes a free one. A request is either ``generate`` (the configured
acceleration) or ``compare`` (the pipeline with `accel.remove` first, then accelerated, same seed),
and ends as files in the output folder, each with a sidecar JSON, plus the numbers shown in the page.

Stopping: the caller sets a `threading.Event`; the pipeline's ``callback_on_step_end`` sees it at the
end of the current step and sets ``pipe._interrupt``, which diffusers pipelines honour by skipping the
remaining steps. The run then raises `Stopped` instead of writing anything.
"""

from __future__ import annotations

import collections
import gc
import inspect
import queue
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import api
from ..config import Config
from ..eval.compare import report, timed_pair, within_noise
from ..io import generate as once
from ..io import outputs
from ..io.generate import first_line as _first_line
from ..pipelines.call import accepted, all_frames, call_kwargs, family_name, is_video, size_multiple
from ..pipelines.load import ModelLoadError, call_defaults
from .limits import Limits


class InputError(ValueError):
    """A request the user can fix (bad value, model not served); shown as one line in the page."""


class Stopped(Exception):
    """The user stopped the run; nothing was written."""


@dataclass(frozen=True)
class Request:
    prompt: str
    negative_prompt: str | None = None
    width: int | None = None     # None: the model's default
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    frames: int | None = None
    fps: int = 8
    batch: int = 1
    model: str = ""              # "": the served model


@dataclass
class Worker:
    index: int
    model: str
    pipe: Any
    family: str = ""
    video: bool = False

    def __post_init__(self):
        self.describe()

    def describe(self):
        self.family, self.video = family_name(self.pipe), is_video(self.pipe)


@dataclass
class Result:
    mode: str
    seed: int
    outputs: list[Path]                     # accelerated outputs (one per batch item)
    baseline: list[Path] = field(default_factory=list)
    sidecars: list[Path] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)   # {"accelerated": s, "baseline": s}
    metrics: dict = field(default_factory=dict)   # speedup, psnr, ssim (compare only)
    stats: dict = field(default_factory=dict)     # accel.stats of the accelerated run
    record: dict = field(default_factory=dict)    # the first output's sidecar


def _is_pipeline(obj) -> bool:
    return hasattr(obj, "components") and callable(obj)


class Engine:
    """Pipelines, limits and the output folder of one web app.

    Args:
        pipe_or_loader: a pipeline, a list of pipelines (one per GPU group), or a callable
            ``loader(model, worker_index) -> pipeline`` (needed to load other models).
        model_name: the name of the served model, as `accel.pipelines.load.load` takes it.
        workers: how many pipelines to load with a loader (one per GPU group).
        allow_model_paths: let requests name other models (hub ids, folders); off by default.
        group: on rank 0 of a parallel worker group, its `accel.web.group.Leader`: every
            action on the (one) pipeline is mirrored to the other ranks first.
        approx_cache: the approximate cache's folder for Generate. Compare runs without it: a repeat of
            the same prompt would hit the entry its own warm-up stored and report that as a speed-up.
    """

    def __init__(self, pipe_or_loader, model_name: str, *, limits: Limits | None = None,
                 out_dir: str | Path = "outputs/app", workers: int = 1, allow_model_paths: bool = False,
                 group=None, approx_cache: str | None = None):
        self.model_name = model_name
        self.approx_cache = approx_cache
        self.group = group
        self.limits = limits or Limits()
        self.out_dir = Path(out_dir).resolve()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.allow_model_paths = allow_model_paths
        self.loader: Callable | None = None
        if isinstance(pipe_or_loader, (list, tuple)):
            pipes = list(pipe_or_loader)
        elif _is_pipeline(pipe_or_loader):
            pipes = [pipe_or_loader]
        elif callable(pipe_or_loader):
            self.loader = pipe_or_loader
            pipes = [pipe_or_loader(model_name, i) for i in range(workers)]
        else:
            raise TypeError("build_app needs a pipeline, a list of pipelines, or a loader(model, index)")
        self.workers = [Worker(i, model_name, p) for i, p in enumerate(pipes)]
        self._free: queue.Queue[Worker] = queue.Queue()
        for w in self.workers:
            self._free.put(w)
        #: the last runs' outcomes, newest last: mode, steps asked, steps done, stopped, seconds.
        self.log: collections.deque = collections.deque(maxlen=64)

    # --- what the page shows before any run ----------------------------------------------------
    @property
    def primary(self) -> Worker:
        return self.workers[0]

    def defaults(self) -> dict:
        """Initial values of the page's inputs for the served model."""
        params = inspect.signature(type(self.primary.pipe).__call__).parameters

        def sig(name, fallback):
            p = params.get(name)
            return fallback if p is None or p.default in (inspect.Parameter.empty, None) else p.default

        d, lim = call_defaults(self.model_name), self.limits
        return {"width": min(d.get("width", sig("width", 0)), lim.max_width),
                "height": min(d.get("height", sig("height", 0)), lim.max_height),
                "steps": min(d.get("num_inference_steps", sig("num_inference_steps", 30)), lim.max_steps),
                "guidance": d.get("guidance_scale", sig("guidance_scale", 5.0)),
                "frames": min(d.get("num_frames", sig("num_frames", 16)), lim.max_frames),
                "negative_prompt": d.get("negative_prompt", "")}

    # --- checking ------------------------------------------------------------------------------
    def parse(self, *, prompt, negative_prompt=None, width=None, height=None, steps=None, guidance=None,
              seed=0, randomize_seed=False, frames=None, fps=8, batch=1, model="") -> Request:
        """A `Request` from the page's or the API's raw values: every value is checked here, and one that is
        not what its field takes raises `InputError` naming the field and what to give (nothing is coerced:
        2.5 steps, ``True`` as a number, a string for a flag, NaN are refused), one over a limit `LimitError`.
        ``randomize_seed``: a new random seed instead of ``seed``."""
        prompt = _text("prompt", prompt).strip()
        if not prompt:
            raise InputError("prompt: empty; type what to generate")
        model = _text("model", model).strip()
        if model and model != self.model_name and not self.allow_model_paths:
            raise InputError(f"model: this server serves only {self.model_name!r}; it cannot load other models")
        seed = _whole("seed", seed, 0, maximum=2**63 - 1)
        if _flag("randomize_seed", randomize_seed):
            seed = random.randrange(2**31)
        req = Request(
            prompt=prompt, negative_prompt=_text("negative_prompt", negative_prompt).strip() or None,
            width=_whole("width", width, 0) or None, height=_whole("height", height, 0) or None,
            steps=_whole("steps", steps, 1), guidance=_number("guidance", guidance),
            seed=seed or 0, frames=_whole("frames", frames, 1),
            fps=_whole("fps", fps, 1, maximum=240) or 8, batch=_whole("batch", batch, 1) or 1, model=model)
        # the worker that holds the served model (None: the request names another model, or every worker
        # has loaded another one), whose size rules and kind (image/video) the request must meet
        served = None if model and model != self.model_name else \
            next((w for w in self.workers if w.model == self.model_name), None)
        if served is not None and not served.video and req.frames is not None:
            raise InputError(f"frames: {self.model_name} makes images, not video; leave frames out")
        if served is not None:
            multiple = size_multiple(served.pipe)
            for name in ("width", "height"):
                value = getattr(req, name)
                if value is not None and value % multiple:
                    raise InputError(f"{name}: {value} is not a multiple of {multiple}; {self.model_name} takes sizes "
                                     f"in steps of {multiple} (e.g. {max(multiple, value // multiple * multiple)})")
        frames_asked = req.frames if served is None or served.video else None
        self.limits.check(width=req.width, height=req.height, steps=req.steps, frames=frames_asked,
                          batch=req.batch, prompt=req.prompt, negative_prompt=req.negative_prompt or "")
        return req

    # --- running -------------------------------------------------------------------------------
    def run(self, req: Request, config, mode: str = "generate",
            on_step: Callable[[str, int, int], None] | None = None,
            cancel: threading.Event | None = None, preset: str | None = None) -> Result:
        """Run ``req`` with ``config`` (an `accel.Config`) on a free worker; blocks until one is free.
        ``preset``: the preset ``config`` was made from (the sidecars record it)."""
        if mode not in ("generate", "compare"):
            raise ValueError(f"mode {mode!r}: use generate or compare")
        cancel = cancel or threading.Event()
        worker = self._free.get()
        try:
            return self._run(worker, req, config, mode, on_step or (lambda *a: None), cancel, preset)
        finally:
            self._free.put(worker)

    def _run(self, worker: Worker, req: Request, config, mode, on_step, cancel, preset=None) -> Result:
        self._use_model(worker, req.model or self.model_name)
        pipe = worker.pipe
        result = Result(mode=mode, seed=req.seed, outputs=[])
        if self.approx_cache and mode != "compare":
            config = config.replace(approx={"dir": self.approx_cache})

        def remove():
            self._mirror("remove")
            api.remove(pipe)  # the baseline is the pipeline exactly as loaded

        def apply():
            self._mirror("apply", config.to_dict())
            try:
                once.apply_config(pipe, config)
            except ValueError as e:  # ConfigError, UnsupportedModelError: the user picks another setting
                raise InputError(_first_line(e)) from None

        call_kw = {}
        passes = collections.Counter()

        def call(phase):
            passes[phase] += 1  # compare: a warm-up, then the timed runs (a Stop names the one it ended)
            n = passes[phase]
            which = "" if mode != "compare" else \
                f"the {phase} warm-up" if n == 1 else f"the {phase} timed run {n - 1} of {COMPARE_REPEATS}"
            return self._call(worker, req, phase, on_step, cancel, which)

        def accelerated():
            frames, seconds, call_kw["kw"] = call("accelerated")
            result.stats = api.stats(pipe)
            return frames, seconds

        base = None
        if mode == "compare":  # timed side by side, as `accel generate --compare` (eval/compare.py)
            pair = timed_pair(lambda: call("baseline")[0], lambda: accelerated()[0], COMPARE_REPEATS,
                              prepare={"baseline": remove, "accelerated": apply})
            base, frames, result.metrics = report(pair, result.stats)
            # a time difference is a speed-up only where something engaged (else the outputs are the same call),
            # and it stands out of the machine's noise only where the two sides' ranges do not overlap
            result.metrics["within_noise"] = within_noise(result.metrics["baseline_range"],
                                                          result.metrics["accelerated_range"])
            if not result.metrics["engaged"]:
                result.metrics["speedup"] = None
            result.seconds = {"baseline": pair["baseline_s"], "accelerated": pair["accelerated_s"]}
        else:
            apply()
            frames, result.seconds["accelerated"] = accelerated()
        self._save(worker, req, config, call_kw["kw"], frames, result, base, preset)
        return result

    def _mirror(self, *message) -> None:
        if self.group is not None:
            self.group.send(*message)

    def _call(self, worker: Worker, req: Request, phase: str, on_step, cancel, which: str = ""):
        """One pipeline call of ``phase`` (``which``: the pass a Stop message names, "" for a lone call)."""
        pipe = worker.pipe
        kw = request_kwargs(pipe, worker.model, worker.video, req)
        total = int(kw.get("num_inference_steps") or 0)
        done = [0]
        watch = "callback_on_step_end" in accepted(pipe)
        self._mirror("call", req, watch)
        if watch:
            def step_end(p, i, t, tensors):
                done[0] = i + 1
                on_step(phase, i + 1, total)
                stop = cancel.is_set() if self.group is None else self.group.step(cancel.is_set())
                if stop:
                    p._interrupt = True  # diffusers skips the remaining steps
                return {}

            kw["callback_on_step_end"] = step_end
        on_step(phase, 0, total)
        try:
            frames, seconds = once.call(pipe, kw, frames=all_frames)
        except once.CallError as e:
            raise InputError(str(e)) from None
        self.log.append({"phase": phase, "steps": total, "steps_done": done[0], "stopped": cancel.is_set(),
                         "seconds": round(seconds, 4)})
        if cancel.is_set():
            raise Stopped(f"stopped {which + ' ' if which else ''}after {done[0]} of {total} steps")
        return frames, seconds, kw

    def _use_model(self, worker: Worker, model: str) -> None:
        if model == worker.model:
            return
        if self.loader is None:
            raise InputError(f"model: this server serves only {self.model_name!r}; it cannot load other models")
        self._mirror("model", model)
        worker.pipe = None  # free the old one before loading the next
        _empty_cache()
        error = None
        try:
            pipe = self.loader(model, worker.index)
        except (ModelLoadError, ValueError) as e:  # back to the served model, so the worker stays usable
            error = InputError(_first_line(e))
            model, pipe = self.model_name, self.loader(self.model_name, worker.index)
        worker.pipe, worker.model = pipe, model
        worker.describe()
        if error:
            raise error

    def _save(self, worker: Worker, req: Request, config, kw, frames, result: Result, base, preset=None) -> None:
        stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}-{outputs.slug(req.prompt, 32)}-s{req.seed}"
        ext = ".mp4" if worker.video else ".png"
        extra = {"mode": result.mode, **({"compare": result.metrics} if result.metrics else {})}
        for label, items, dest in (("baseline", base or [], result.baseline), ("", frames, result.outputs)):
            for i, item in enumerate(items):
                path = self.out_dir / f"{stem}{'-' + label if label else ''}{f'-{i}' if len(items) > 1 else ''}{ext}"
                record = once.save(
                    worker.pipe, item, path, fps=req.fps, model=worker.model, family=worker.family,
                    prompt=req.prompt, negative_prompt=req.negative_prompt, seed=req.seed, kw=kw,
                    preset=preset if not label else "off", config=config if not label else Config(),
                    timings={"generate_s": result.seconds["baseline" if label else "accelerated"]},
                    stats={"applied": False} if label else None,
                    # a video model may make other than the frames asked for (Wan: 4k+1): record what it made
                    extra={**extra, "side": label or "accelerated", "batch_index": i,
                           "fps": req.fps if worker.video else None, "frames": len(item) if worker.video else None})
                dest.append(path)
                result.sidecars.append(outputs.sidecar_path(path))
                if not label and i == 0:
                    result.record = record


COMPARE_REPEATS = 2  # timed runs of each side after a warm-up of each: one timed run each is noise


def request_kwargs(pipe, model: str, video: bool, req: Request) -> dict:
    """The pipeline call for ``req`` (a seeded generator included); the same on every rank of a group."""
    kw = call_kwargs(pipe, prompt=req.prompt, negative_prompt=req.negative_prompt, steps=req.steps,
                     height=req.height, width=req.width, frames=req.frames if video else None,
                     guidance=req.guidance, seed=req.seed, defaults=call_defaults(model))
    if req.batch > 1:
        names = accepted(pipe)
        per_prompt = next((n for n in ("num_images_per_prompt", "num_videos_per_prompt") if n in names), None)
        if per_prompt is None:
            raise InputError(f"batch: {type(pipe).__name__} makes one output per prompt; set batch to 1")
        kw[per_prompt] = req.batch
    return kw


def _text(name: str, value) -> str:
    """``value`` as the text it must be ("" when empty); `InputError` for anything else (a number, a list)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f"{name}: {_shown(value)} is not text; give a string")
    return value


def _flag(name: str, value) -> bool:
    """``value`` as the true/false it must be (False when empty); a string or a number is refused, not read."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InputError(f"{name}: {_shown(value)} is not true or false; give true or false")
    return value


def _number(name: str, value, minimum: float = 0, maximum: float | None = None, whole: bool = False):
    """``value`` as a number within bounds (None when empty); `InputError` otherwise. Only numbers are numbers:
    a string, a list or a bool is refused, as are NaN and infinities, and for ``whole`` a fraction."""
    if value is None or value == "":
        return None
    bounds = f">= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
    kind = "a whole number" if whole else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{name}: {_shown(value)} is not a number; give {kind} {bounds}")
    if not np.isfinite(value):
        raise InputError(f"{name}: {value} is not a finite number; give {kind} {bounds}")
    if whole and value != int(value):
        raise InputError(f"{name}: {value} is not a whole number; give {kind} {bounds}")
    v = int(value) if whole else float(value)
    if v < minimum or (maximum is not None and v > maximum):
        raise InputError(f"{name}: {v} must be {bounds}")
    return v


def _whole(name: str, value, minimum: int, maximum: int | None = None) -> int | None:
    return _number(name, value, minimum, maximum, whole=True)


def _shown(value) -> str:
    """A value as an error message quotes it: short, so a huge list does not fill the page."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _empty_cache() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
