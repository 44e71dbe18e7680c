"""Rank 0's progress bar over a whole batch: its own rows as they finish, other ranks' from their manifests."""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm.auto import tqdm

from . import manifest as mf


class Progress:
    """Rank 0's bar over the whole run: its own rows as they finish, other ranks' from their manifests."""

    def __init__(self, out: Path, rank, run: str, total: int, done_before: int, enabled: bool):
        self.rank, self.run, self.total, self.done_before = rank, run, total, done_before
        self.enabled = enabled and rank.rank == 0 and total > 0
        self.bar = None
        self.failed = 0
        self.tails = [mf.Tail(out / mf.manifest_name(r, rank.world)) for r in range(1, rank.world)]

    def begin(self) -> None:
        """Start the clock once the model is loaded, so the rate and ETA are about rows, not loading."""
        if self.enabled and self.bar is None:
            self.bar = tqdm(total=self.total, unit="row", desc="accel batch", dynamic_ncols=True, file=sys.stderr,
                            postfix={"done before": self.done_before} if self.done_before else None)

    def advance(self, failed: bool) -> None:
        if self.bar is None:
            return
        self._count(1, failed)
        self.poll()

    def _count(self, n: int, failed: int) -> None:
        self.failed += failed
        if self.failed:
            self.bar.set_postfix(failed=self.failed, refresh=False)
        self.bar.update(n)

    def poll(self) -> None:
        if self.bar is None:
            return
        for t in self.tails:
            recs = [r for r in t.read() if r.get("event") == "row" and r.get("run") == self.run]
            if recs:
                self._count(len(recs), sum(r.get("status") == "failed" for r in recs))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
