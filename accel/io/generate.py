"""The one "generate once" path of `accel generate`, `accel batch` and the web app.

A front end loads a pipeline and builds the call's keyword arguments (`accel.pipelines.call.call_kwargs`);
then, for each output:

1. `apply` the run's configuration (`accel.apply`; a bad setting raises `ConfigError`/`ValueError`),
2. `call` the pipeline once, timed; the pipeline's own refusal of a size or an argument becomes a
   `CallError` with its first line,
3. `save` the output atomically with its sidecar JSON (`accel.io.sidecar`).

Each front end turns the library errors into its own: `accel generate` one ``accel: error:`` line,
`accel batch` a failed row, the web app a message on the page.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ..api import apply as apply_config
from ..pipelines.call import to_frames
from . import outputs
from .sidecar import sidecar

__all__ = ["CallError", "apply_config", "call", "save"]


class CallError(ValueError):
    """The pipeline refused the call (a size it cannot make, an argument it does not take)."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def call(pipe, kw: dict, *, frames: Callable = to_frames):
    """Call ``pipe(**kw)`` once and time it.

    Args:
        pipe: a diffusers pipeline (accelerated or not).
        kw: the call's keyword arguments, with ``output_type="np"``.
        frames: how to read the output: `accel.pipelines.call.to_frames` (the first result, the default)
            or `all_frames` (every result of a batch).

    Returns:
        ``(frames, seconds)``: the output as float32 frames in [0, 1] and the call's wall time.
    """
    t = time.perf_counter()
    try:
        out = pipe(**kw)
    except (ValueError, TypeError) as e:  # pipelines check sizes and arguments with these
        raise CallError(first_line(e)) from e
    return frames(out), time.perf_counter() - t


def save(pipe, data, path: Path, *, fps: int, timings: dict, extra: dict | None = None, **record) -> dict:
    """Write one output and its sidecar, both atomically.

    Args:
        pipe: the pipeline that made ``data`` (the sidecar reads its stats, device and dtype).
        data: the frames (an image (H, W, 3) or a video (F, H, W, 3)).
        path: the output file; its suffix picks the format (`accel.io.outputs.save_output`).
        fps: frames per second for a video.
        timings: seconds by name (``generate_s``, ``load_s``); ``save_s`` is added.
        extra: more fields for the sidecar (a batch row's line, a comparison's metrics).
        **record: the sidecar's fields (`accel.io.sidecar.sidecar`: model, family, prompt, ...).

    Returns:
        The sidecar record as written.
    """
    t = time.perf_counter()
    outputs.save_output(data, path, fps=fps)
    timings = {**timings, "save_s": time.perf_counter() - t}
    side = sidecar(pipe, output=path.name, timings=timings, **record)
    side.update(extra or {})
    outputs.write_json(outputs.sidecar_path(path), side)
    return side
