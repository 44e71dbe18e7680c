"""Calibrate the approximate cache's policy on your own model: what skipping K steps from a neighbour costs.

``measure(pipe, pairs, fractions, call_kwargs)`` runs, for each (earlier prompt, new prompt) pair, the
earlier prompt fully (its latents stored in a scratch cache), then the new prompt started from them at
every fraction of the steps, and the new prompt fully from the same seed. Each row has the pair's
similarity (as the cache measures it), the skipped fraction, and PSNR/SSIM against the full run;
``score(image, prompt) -> bool`` adds a judge (our checker on the reference models, a CLIP score on
yours). ``table(rows, ...)`` turns the rows into the policy: for each skip, the lowest similarity down to
which the pairs kept the judge's agreement rate (and a PSNR floor).
"""

from __future__ import annotations

import tempfile
from typing import Callable

import numpy as np
import torch

from .. import api
from .metrics import compare


def measure(pipe, pairs: list[tuple[str, str]], fractions=(0.1, 0.2, 0.3, 0.4, 0.5), call_kwargs: dict | None = None,
            score: Callable[[np.ndarray, str], bool] | None = None, seed: int = 0) -> list[dict]:
    """One row per (pair, fraction): similarity, skip, psnr, ssim, and ``ok`` (the judge's verdict on the
    cached output) beside ``ok_full`` (its verdict on the full run), when ``score`` is given."""
    kw = {"output_type": "np", **(call_kwargs or {})}
    previous = api.config_of(pipe)
    rows = []
    try:
        for earlier, new in pairs:
            api.remove(pipe)
            full = _image(pipe(prompt=new, generator=torch.Generator().manual_seed(seed + 1), **kw))
            ok_full = score(full, new) if score else None
            with tempfile.TemporaryDirectory() as scratch:
                store = {"dir": scratch, "store_at": list(fractions), "similarity": [-1.0], "skip": [0.0]}
                api.apply(pipe, {"approx": store})
                pipe(prompt=earlier, generator=torch.Generator().manual_seed(seed), **kw)
                for f in fractions:  # every fraction a forced hit on the one stored entry
                    api.apply(pipe, {"approx": {**store, "skip": [f]}})
                    out = _image(pipe(prompt=new, generator=torch.Generator().manual_seed(seed + 1), **kw))
                    st = api.stats(pipe)["approx"]
                    rows.append({"earlier": earlier, "new": new, "similarity": round(st["similarity"], 5),
                                 "skip": f, "skipped_steps": st["skipped_steps"], **compare(full, out),
                                 "ok": score(out, new) if score else None, "ok_full": ok_full})
    finally:
        api.remove(pipe)
        if previous is not None:
            api.apply(pipe, previous)
    return rows


def table(rows: list[dict], min_agreement: float = 23 / 24, min_psnr: float | None = None,
          min_pairs: int = 4) -> tuple[tuple, tuple]:
    """(similarity thresholds, skips) for `ApproxCacheConfig`. Per skip, walking down the similarities: the lowest
    one at which the pairs at or above it still agree with the full run's verdict at least ``min_agreement`` of
    the time (pairs the full run itself failed do not count) and, with ``min_psnr``, keep that mean PSNR; at
    least ``min_pairs`` judged pairs are needed. Larger skips come first; a smaller skip gets a row only where
    it reaches lower similarities. The judge's own noise is why agreement is a rate, not every pair."""
    policy = []
    for f in sorted({r["skip"] for r in rows}, reverse=True):
        at = sorted((r for r in rows if r["skip"] == f), key=lambda r: -r["similarity"])
        judged, agree, psnrs, lowest = 0, 0, [], None
        for r in at:
            if r["ok"] is not None and r["ok_full"]:
                judged += 1
                agree += bool(r["ok"])
            if r["psnr"] is not None:
                psnrs.append(r["psnr"])
            good = judged >= min_pairs and agree >= min_agreement * judged
            if min_psnr is not None and psnrs and sum(psnrs) / len(psnrs) < min_psnr:
                good = False
            if good:
                lowest = r["similarity"]
        if lowest is not None and (not policy or lowest < policy[-1][0]):
            policy.append((lowest, f))
    return tuple(p[0] for p in policy), tuple(p[1] for p in policy)


def _image(out) -> np.ndarray:
    frames = getattr(out, "frames", None)
    x = frames if frames is not None else out.images
    return np.asarray(x[0], dtype=np.float32)
