"""The timing the benchmark scripts share: rows run round-robin, speed from process CPU time.

On a machine shared with other jobs the wall time of identical calls swings by 2-5x, while the CPU
time of a 1-thread run moves by a few percent, so CPU time is the speed figure (wall time is kept
beside it). Rows run round-robin (repeat r of every row before repeat r+1 of any), so the load's
drift over minutes hits every row alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed(fn: Callable, *args, **kwargs) -> tuple[float, float, object]:
    """(process CPU seconds, wall seconds, result) of one call."""
    c, w = time.process_time(), time.perf_counter()
    out = fn(*args, **kwargs)
    return time.process_time() - c, time.perf_counter() - w, out


def round_robin(rows: dict[str, Callable[[], object]], repeats: int, *, catch: bool = False,
                after: Callable | None = None, after_round: Callable | None = None):
    """Each row's ``fn()`` (one sample) ``repeats`` times, round-robin.

    Returns ``({label: [samples]}, {label: error})``. With ``catch`` a row that raises (a peer that
    cannot run here, a part a family lacks) is reported in the errors and left out of later rounds;
    without it the error propagates. ``after(r, label, sample)`` follows every sample (progress
    lines), ``after_round(r, samples)`` every round (tables that survive a stopped run).
    """
    samples: dict[str, list] = {label: [] for label in rows}
    errors: dict[str, str] = {}
    for r in range(repeats):
        for label, fn in rows.items():
            if label in errors:
                continue
            try:
                sample = fn()
            except Exception as e:
                if not catch:
                    raise
                errors[label] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                continue
            samples[label].append(sample)
            if after:
                after(r, label, sample)
        if after_round:
            after_round(r, samples)
    return samples, errors


def median(samples: list, index: int) -> float:
    """Median of field ``index`` over a row's samples."""
    return statistics.median(s[index] for s in samples)
