"""`CacheConfig`: reuse of denoiser features across denoising steps (the caching technique)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config_base import ConfigBase, ConfigError, spec

METHODS = ("none", "auto", "deepcache", "block",
           "diffusers.first_block", "diffusers.mag", "diffusers.taylorseer", "diffusers.pab", "diffusers.faster")


@dataclass(frozen=True)
class CacheConfig(ConfigBase):
    """Step caching.

    Important: ``method`` (``none`` is off; ``auto`` picks per family), ``threshold`` (block cache:
    relative L1 change under which the cached residual is reused; 0 never reuses) and ``interval``
    (DeepCache: a full step every ``interval`` steps; 1 never reuses).
    Tinkering: ``warmup_steps`` always computed at the start, ``max_skip`` reuses in a row at most.
    """

    section = "cache"
    method: str = spec("none", choices=METHODS, help="caching method; none is off")
    threshold: float = spec(0.0, min=0.0, help="block cache: reuse while the relative L1 change is below this")
    interval: int = spec(1, min=1, help="deepcache: full computation every N steps")
    warmup_steps: int = spec(0, min=0, help="steps always computed fully at the start")
    max_skip: int = spec(0, min=0, help="at most this many reused steps in a row (0: no limit)")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def validate(self) -> None:
        if self.method == "deepcache" and self.threshold:
            raise ConfigError("cache.threshold: deepcache uses cache.interval, not a threshold; set threshold to 0")


PRESETS: dict = {}
