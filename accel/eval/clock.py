"""The one clock of `accel bench`, `accel tune` and the benchmark scripts.

On CUDA a call is timed with CUDA events around it (the GPU's own time, after the host has queued
everything) and its peak allocated memory is read from the caching allocator. On a CPU the figure is
the process CPU time: on a machine shared with other jobs the wall time of identical calls swings by
2-5x, while the CPU time of a 1-thread run moves by a few percent. The wall time is kept beside it.

Rows run round-robin (repeat r of every row before repeat r+1 of any), so the machine's drift over
minutes hits every row alike; the figure of a row is the median of its repeats.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    """One timed call: ``seconds`` is the speed figure (CUDA event time on CUDA, process CPU time on a
    CPU), ``wall_s`` the host's wall time, ``peak_bytes`` the peak CUDA memory allocated during the call
    (None on a CPU), ``out`` what the call returned."""

    seconds: float
    wall_s: float
    peak_bytes: int | None = None
    out: Any = field(default=None, repr=False)


def _is_cuda(device) -> bool:
    return str(device).startswith("cuda")


def measure(fn: Callable[[], Any], device="cpu") -> Sample:
    """Time one call of ``fn`` on ``device`` (a string or torch.device)."""
    if not _is_cuda(device):
        c, w = time.process_time(), time.perf_counter()
        out = fn()
        return Sample(time.process_time() - c, time.perf_counter() - w, None, out)
    import torch

    dev = torch.device(device)
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    w = time.perf_counter()
    start.record()
    out = fn()
    end.record()
    torch.cuda.synchronize(dev)
    wall = time.perf_counter() - w
    return Sample(start.elapsed_time(end) / 1000.0, wall, torch.cuda.max_memory_allocated(dev), out)


def timed(fn: Callable, *args, **kwargs) -> tuple[float, float, object]:
    """(process CPU seconds, wall seconds, result) of one call on the CPU."""
    s = measure(lambda: fn(*args, **kwargs), "cpu")
    return s.seconds, s.wall_s, s.out


def round_robin(rows: dict[str, Callable[[], object]], repeats: int, *, catch: bool = False,
                after: Callable | None = None, after_round: Callable | None = None,
                stop: Callable[[], bool] | None = None):
    """Each row's ``fn()`` (one sample) ``repeats`` times, round-robin.

    Returns ``({label: [samples]}, {label: error})``. With ``catch`` a row that raises (a peer that
    cannot run here, a part a family lacks) is reported in the errors and left out of later rounds;
    without it the error propagates. ``after(r, label, sample)`` follows every sample (progress
    lines), ``after_round(r, samples)`` every round (tables that survive a stopped run); ``stop()``
    is asked before every sample, and True ends the run with what was measured.
    """
    samples: dict[str, list] = {label: [] for label in rows}
    errors: dict[str, str] = {}
    for r in range(repeats):
        for label, fn in rows.items():
            if label in errors:
                continue
            if stop is not None and stop():
                return samples, errors
            try:
                sample = fn()
            except Exception as e:
                if not catch:
                    raise
                errors[label] = error_line(e)
                continue
            samples[label].append(sample)
            if after:
                after(r, label, sample)
        if after_round:
            after_round(r, samples)
    return samples, errors


def error_line(e: BaseException) -> str:
    """``Type: first line of the message`` (at most 160 characters of it)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160] if text else ''}".rstrip(": ")


def median(samples: list, index: int | str) -> float:
    """Median of field ``index`` (a tuple position or a `Sample` attribute) over a row's samples."""
    if isinstance(index, str):
        return statistics.median(getattr(s, index) for s in samples)
    return statistics.median(s[index] for s in samples)
