"""`CacheConfig`: reuse of denoiser features across denoising steps (the caching technique)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config_base import ConfigBase, ConfigError, spec

DIFFUSERS_METHODS = ("diffusers.first_block", "diffusers.mag", "diffusers.taylorseer", "diffusers.pab",
                     "diffusers.faster")
METHODS = ("none", "auto", "deepcache", "block", *DIFFUSERS_METHODS)
SCHEDULES = ("uniform", "nonuniform")


@dataclass(frozen=True)
class CacheConfig(ConfigBase):
    """Step caching.

    Important: ``method`` (``none`` is off; ``auto`` picks ``deepcache`` for UNets and ``block`` for
    DiTs; ``diffusers.*`` uses diffusers' own cache hooks on models that have them), ``threshold``
    (block cache: relative L1 change of the first blocks' residual under which the cached residual
    of the remaining blocks is reused; 0 never reuses on a change test) and ``interval`` (a full
    step every ``interval`` steps: DeepCache, or the block cache on a fixed schedule when
    ``threshold`` is 0; 1 never reuses).
    Tinkering: ``warmup_steps`` always computed at the start (counted per denoiser and CFG branch),
    ``max_skip`` reuses in a row at most, ``schedule`` places the full steps of ``interval``
    (``nonuniform``: denser early, where features change fastest, by ``schedule_power``),
    ``branch`` (DeepCache: how many of the UNet's top skip connections are recomputed in a cached
    step; more is slower and closer), ``compute_first_n``/``compute_last_n`` (block cache: blocks
    always computed before/after the cached span), ``taylor_order`` (block cache: extrapolate the
    cached residual with a Taylor series of this order from the last full steps, TaylorSeer; 0 is
    plain reuse).
    """

    section = "cache"
    method: str = spec("none", choices=METHODS, help="caching method; none is off")
    threshold: float = spec(0.0, min=0.0, help="block cache: reuse while the relative L1 change is below this")
    interval: int = spec(1, min=1, help="full computation every N steps (deepcache; block when threshold is 0)")
    warmup_steps: int = spec(0, min=0, help="steps always computed fully at the start")
    max_skip: int = spec(0, min=0, help="at most this many reused steps in a row (0: no limit)")
    schedule: str = spec("uniform", choices=SCHEDULES, help="where the full steps of `interval` fall")
    schedule_power: float = spec(1.5, min=1.0, max=4.0, help="nonuniform schedule: >1 puts full steps early")
    branch: int = spec(1, min=1, help="deepcache: top skip connections recomputed in a cached step")
    compute_first_n: int = spec(1, min=1, help="block cache: leading blocks always computed (the probe)")
    compute_last_n: int = spec(0, min=0, help="block cache: trailing blocks always computed")
    taylor_order: int = spec(0, min=0, max=2, help="block cache: Taylor extrapolation order of the cached residual")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def validate(self) -> None:
        if self.method == "deepcache" and self.threshold:
            raise ConfigError("cache.threshold: deepcache uses cache.interval, not a threshold; set threshold to 0")
        if self.method == "block" and self.threshold and self.interval > 1:
            raise ConfigError(f"cache.interval: {self.interval} with threshold {self.threshold}: the block cache "
                              "reuses either on a change test (threshold > 0) or on a fixed schedule "
                              "(interval > 1); set one of them to its default (threshold 0 or interval 1)")
        if self.taylor_order and self.method not in ("block", "auto", "diffusers.taylorseer"):
            raise ConfigError(f"cache.taylor_order: {self.taylor_order} needs method 'block' (or "
                              f"'diffusers.taylorseer'), not {self.method!r}; set taylor_order to 0")


# Measured in benchmarks/bench_cache.py (see BENCHMARKS.md "## Step caching"): DeepCache settings
# for the SD1.5-shaped UNet, block-cache thresholds for the Flux-shaped transformer. Families
# without their own row take the "*" DiT settings; video DiTs share them (not benchmarked
# separately on this CPU).
_UNETS = ("sd15", "sdxl", "animatediff")


def _per_family(unet: dict, dit: dict) -> dict:
    return {"*": dit, **{f: unet for f in _UNETS}}


PRESETS: dict = {
    "safe": _per_family({"method": "deepcache", "interval": 2, "branch": 2, "warmup_steps": 1},
                        {"method": "block", "threshold": 0.05, "warmup_steps": 2, "max_skip": 2}),
    "balanced": _per_family({"method": "deepcache", "interval": 3, "branch": 1, "warmup_steps": 1},
                            {"method": "block", "threshold": 0.1, "warmup_steps": 2, "max_skip": 3}),
    "fast": _per_family({"method": "deepcache", "interval": 5, "branch": 1, "warmup_steps": 1},
                        {"method": "block", "threshold": 0.2, "warmup_steps": 1, "max_skip": 4, "taylor_order": 1}),
}
