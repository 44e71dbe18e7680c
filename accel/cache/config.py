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


# From benchmarks/bench_cache.py (BENCHMARKS.md "## Step caching", 2-core CPU, random weights):
# SD1.5-shaped UNet, 25 DDIM steps: interval 3 branch 2 -> 43.3 dB at 1.9x; interval 5 nonuniform
# -> 43.5 dB at 5.7x; interval 5 uniform -> 37.1 dB at 6.8x. Flux-shaped DiT, 20 steps: interval 2
# + Taylor 1 -> 62.7 dB at 2.0x; interval 3 + Taylor 2 -> 59.2 dB at 1.9x (with compute_last_n=1).
# DiT presets use fixed schedules: change thresholds measured on random weights (where features
# move 5-10x more per step than in trained models) would not transfer to real checkpoints. Video
# DiTs share the "*" row (not benchmarked separately on this CPU).
_UNETS = ("sd15", "sdxl", "animatediff")


def _per_family(unet: dict, dit: dict) -> dict:
    return {"*": dit, **{f: unet for f in _UNETS}}


PRESETS: dict = {
    "safe": _per_family({"method": "deepcache", "interval": 3, "branch": 2},
                        {"method": "block", "interval": 2, "warmup_steps": 2, "taylor_order": 1}),
    "balanced": _per_family({"method": "deepcache", "interval": 5, "schedule": "nonuniform"},
                            {"method": "block", "interval": 3, "warmup_steps": 2, "taylor_order": 2}),
    "fast": _per_family({"method": "deepcache", "interval": 5},
                        {"method": "block", "interval": 4, "warmup_steps": 2, "taylor_order": 2}),
}
