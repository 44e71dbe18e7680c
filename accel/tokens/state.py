"""Per-denoiser state of the token technique: the step's merges (shared by blocks), caches, counts."""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from . import matching
from .config import TokenConfig


class TokenState:
    """What the hooks of one denoiser share.

    Merges are built once per (step, forward, resolution, batch, amount) and reused by every
    block of that resolution in the forward: the first block's tokens choose the matching.
    """

    def __init__(self, cfg: TokenConfig, tracker, adapter):
        self.cfg = cfg
        self.tracker = tracker
        self.adapter = adapter
        self.family = adapter.family
        self.current: matching.Merge | None = None  # the merge in force inside a running block
        self.in_self_attention = False
        self.prune_cache: dict = {}
        self._merges: dict = {}
        self._merge_key = None
        self._windows: dict = {}
        self.reset()

    def reset(self, *_):
        self.prune_cache.clear()
        self._merges.clear()
        self._merge_key = None
        self.counts = defaultdict(lambda: [0, 0, 0])  # block -> [runs, tokens in, tokens removed]
        self.built = 0
        self.reused = 0

    # --- per call facts -----------------------------------------------------------------------
    def ratio(self) -> float:
        s = self.tracker.state
        if self.cfg.min_tokens and math.prod(s.grid or (0,)) < self.cfg.min_tokens:
            return 0.0
        return self.cfg.ratio_at(s.step, s.total_steps)

    def grid(self, n: int) -> tuple[int, int, int] | None:
        """The (F, H, W) grid of ``n`` tokens seen by a block, or None where it is not known."""
        g = tuple(self.tracker.state.grid)
        if self.family.kind == "unet":
            try:
                f, h, w = self.adapter.grid_for_tokens(g, n)
            except ValueError:
                return None
            return (1, h, w)  # UNet spatial blocks see frames as batch
        return g if g[0] * g[1] * g[2] == n else None

    def level_allowed(self, n: int) -> bool:
        """UNets: is this resolution within ``max_downsample`` of the top level?"""
        if self.family.kind != "unet":
            return True
        _, h, w = self.tracker.state.grid
        return math.sqrt(h * w / max(n, 1)) <= self.cfg.max_downsample + 1e-6

    def text(self) -> tuple[int, str | None]:
        return self.tracker.state.text_len, self.family.text_position

    # Host-side bookkeeping (counters, the step's merge cache): outside torch.compile graphs, where dynamo
    # would guard on the counters and the step and recompile at every step.
    @torch.compiler.disable
    def record(self, block: str, n: int, removed: int) -> None:
        c = self.counts[block]
        c[0] += 1
        c[1] += n
        c[2] += removed

    # --- prune's cache (per block, denoiser, CFG branch and call slot); host state, as `record` ----
    def _prune_key(self, block: str) -> tuple:
        s = self.tracker.state
        return (block, s.component, s.branch, s.call_in_step)

    @torch.compiler.disable
    def prune_cached_input(self, block: str, x: torch.Tensor, keep_n: int) -> torch.Tensor | None:
        """The input the block's cached update was computed from, or None when this run computes every
        token (nothing cached for this shape, a refresh run, or nothing to skip)."""
        entry = self.prune_cache.get(self._prune_key(block))
        n = x.shape[1]
        if entry is None or entry["x"].shape != x.shape or entry["runs"] % self.cfg.refresh_interval == 0 \
                or keep_n >= n:
            return None
        return entry["x"]

    @torch.compiler.disable
    def prune_store(self, block: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """A full run: cache its input and its update of every token."""
        self.prune_cache[self._prune_key(block)] = {"x": x.detach().clone(), "delta": (y - x).detach(), "runs": 1}

    @torch.compiler.disable
    def prune_update(self, block: str, sel: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """A reduced run: the recomputed tokens' inputs and updates replace theirs in the cache; returns
        the update of every token."""
        entry = self.prune_cache[self._prune_key(block)]
        entry["delta"].index_copy_(1, sel, (ys - xs).detach())
        entry["x"].index_copy_(1, sel, xs.detach())
        entry["runs"] += 1
        return entry["delta"]

    @torch.compiler.disable
    def prune_drop(self, block: str) -> None:
        self.prune_cache.pop(self._prune_key(block), None)

    # --- merges -------------------------------------------------------------------------------
    def _windows_for(self, grid, device) -> matching.Windows:
        cfg = self.cfg
        key = (grid, str(device))
        if key not in self._windows:
            self._windows[key] = matching.Windows(grid, (cfg.st, cfg.sy, cfg.sx), device)
        return self._windows[key]

    @torch.compiler.disable
    def merge_for(self, x: torch.Tensor, grid, kind: str, amount: int, shared: bool, block: str = "") -> matching.Merge:
        """The step's merge for tokens like ``x``: built by the first block that asks, then reused
        (with ``match_per_block``: built by every block from its own input)."""
        s = self.tracker.state
        step_key = (s.call, s.step, s.call_in_step, s.component)
        if step_key != self._merge_key:
            self._merges.clear()
            self._merge_key = step_key
        key = (kind, x.shape[0], x.shape[1], grid, amount, shared, block if self.cfg.match_per_block else "")
        m = self._merges.get(key)
        if m is not None:
            self.reused += 1
            return m
        windows = self._windows_for(grid, x.device)
        with torch.no_grad():
            if kind == "bipartite":
                gen = None
                if self.cfg.use_rand:
                    # From the seed and the step only, not the call count: the same call twice (a
                    # resumed batch row, a re-run in the app) must give the same picture. A CPU
                    # generator on purpose: the same picks on every device (copied without a sync).
                    gen = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + s.step) % (2 ** 63))
                m = matching.bipartite(x.detach(), windows, amount, shared, gen)
            else:
                m = matching.window_pool(x.detach(), windows, amount)
        self._merges[key] = m
        self.built += 1
        return m

    # --- stats --------------------------------------------------------------------------------
    def stats(self) -> dict:
        blocks = {}
        runs = tokens = removed = 0
        for name, (r, n, k) in self.counts.items():
            blocks[name] = {"runs": r, "tokens": n // max(r, 1), "removed": k // max(r, 1)}
            runs, tokens, removed = runs + r, tokens + n, removed + k
        return {"blocks": blocks, "block_runs": runs, "tokens": tokens, "removed": removed,
                "merges_built": self.built, "merges_reused": self.reused}
