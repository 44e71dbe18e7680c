"""`TokenConfig`: fewer image/video tokens through attention (token merging and pruning)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config_base import ConfigBase, spec

METHODS = ("merge", "kv_downsample", "prune")


@dataclass(frozen=True)
class TokenConfig(ConfigBase):
    """Token reduction.

    Important: ``ratio`` (fraction of image/video tokens removed from the attention input; 0 is
    off) and ``method`` (``merge``: ToMe merge/unmerge; ``kv_downsample``: pooled keys/values;
    ``prune``: recompute only the tokens that changed most).
    """

    section = "tokens"
    ratio: float = spec(0.0, min=0.0, max=0.95, help="fraction of image/video tokens removed; 0 is off")
    method: str = spec("merge", choices=METHODS, help="merge, kv_downsample or prune")

    @property
    def enabled(self) -> bool:
        return self.ratio > 0


PRESETS: dict = {}
