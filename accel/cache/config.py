"""`CacheConfig`: reuse of denoiser features across denoising steps (the caching technique)."""

from __future__ import annotations

import functools
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
    compute_first_n: int = spec(1, min=0, help="block cache: leading blocks always computed (the probe; 0: none, "
                                               "a fixed schedule reuses every block)")
    compute_last_n: int = spec(0, min=0, help="block cache: trailing blocks always computed")
    taylor_order: int = spec(0, min=0, max=2, help="block cache: Taylor extrapolation order of the cached residual")
    reuse_steps: str = spec("", help="block cache: a calibrated schedule, the steps reused (e.g. '3,5,6,8'; "
                                     "accel.cache.calibrate_schedule); in place of interval")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def reused(self) -> frozenset[int]:
        """The steps of ``reuse_steps`` (empty: none given); ConfigError naming a part that is no step."""
        return _steps(self.reuse_steps)


    def validate(self) -> None:
        if self.method == "deepcache" and self.threshold:
            raise ConfigError("cache.threshold: deepcache uses cache.interval, not a threshold; set threshold to 0")
        if self.method == "block" and self.threshold and self.interval > 1:
            raise ConfigError(f"cache.interval: {self.interval} with threshold {self.threshold}: the block cache "
                              "reuses either on a change test (threshold > 0) or on a fixed schedule "
                              "(interval > 1); set one of them to its default (threshold 0 or interval 1)")
        if self.reuse_steps:
            steps = self.reused()
            if self.method != "block" or self.threshold or self.interval > 1:
                raise ConfigError(f"cache.reuse_steps: {self.reuse_steps!r} is a schedule for method 'block' with "
                                  "threshold 0 and interval 1; set those (or leave reuse_steps empty)")
            if min(steps) < 1:
                raise ConfigError(f"cache.reuse_steps: {self.reuse_steps!r}: step 0 has nothing to reuse; "
                                  "give steps from 1")
        if self.method == "block" and self.compute_first_n == 0 and self.threshold:
            raise ConfigError(f"cache.compute_first_n: 0 leaves no probe block for threshold {self.threshold}; "
                              "use compute_first_n >= 1, or threshold 0 with an interval (a fixed schedule, "
                              "which needs no probe)")
        if self.taylor_order and self.method not in ("block", "auto", "diffusers.taylorseer"):
            raise ConfigError(f"cache.taylor_order: {self.taylor_order} needs method 'block' (or "
                              f"'diffusers.taylorseer'), not {self.method!r}; set taylor_order to 0")


# From benchmarks/tune_cache.py, BENCHMARKS.md "## Step caching", "Per-family sweep" (2-core CPU,
# median of 2; `python benchmarks/tune_cache.py --ref-sd ... --ref-dit ... --from-json ...` reprints
# the picks). Rule (`accel.presets`): per family and tier, the fastest setting by denoiser CPU time
# whose PSNR against the uncached output of the same seed is >= 40 dB (safe), 32 dB (balanced),
# 26 dB (fast); settings within 10% of the fastest count as equally fast and the higher PSNR wins.
# UNets: sd15 is decided on the trained ref-sd (SD1.5 layout, 25 steps); sdxl and animatediff on
# random weights with the floors raised by 5.3 dB, the median PSNR excess of the random SD1.5
# UNet over ref-sd on the same grid. Re-derived on the 7000-step ref-sd with the
# candidates measured on 24 held-out prompts x 3 (a one-prompt sweep could not rank them): interval
# 4 uniform 2.08x 44.1 dB, 4 nonuniform 2.20x 39.0 dB, 5 uniform 2.55x 38.1 dB, 5 nonuniform
# 2.46x 35.1 dB; so balanced/fast move from 4 nonuniform (the 2500-step model's pick) to 5 uniform.
# The sdxl/animatediff picks stand: the new offset (3.7-4.8 dB) lowers their floors, and the rule
# picks the same settings from the saved sweep; a fresh sweep differs only in sdxl's safe branch
# (1 vs 2: 3.67x vs 2.73x there, 3.11x vs 3.08x in the saved one), noise on calls of 0.1-0.2 s.
# DiTs: decided on the trained ref-dit (Flux classes, 20 steps, true CFG). The random-weight DiTs
# overstate fidelity by a median 37 dB against it (a random DiT's features barely move between
# steps), so their sweeps cannot rank settings; they only confirm that the trained pick runs and
# pays on each family (block interval 2 + Taylor 1: 1.27-2.04x denoiser on all seven). Re-derived
# on the 10000-step ref-dit, Taylor extrapolation no longer pays: interval 2 gives
# 33.5 dB at 1.36x plain and 21.7 dB with Taylor 1 (the 2500-step model: 33.7 dB with Taylor 1).
# On ref-dit no cached setting that saves time reliably reaches 40 dB (a change threshold of 0.2:
# 41.6 dB on the sweep's prompt, 22 dB on others), so
# `safe` leaves DiT caching off. compute_last_n is left out of presets (with the first block always
# computed it leaves nothing to cache in a 2-block model).
_W = {"method": "block", "warmup_steps": 2}  # every DiT row: 2 full warm-up steps, fixed schedule
_DIT = {**_W, "interval": 2}  # ref-dit: 33.5 dB, 1.36x denoiser


@functools.lru_cache(maxsize=64)  # read at every decided forward: parse each schedule once
def _steps(text: str) -> frozenset[int]:
    out = set()
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if not part.isdigit():
            raise ConfigError(f"cache.reuse_steps: {part!r} in {text!r} is not a step number; "
                              "write step numbers separated by commas, e.g. '3,5,6'")
        out.add(int(part))
    return frozenset(out)


def _dc(interval: int, branch: int = 1, schedule: str = "nonuniform") -> dict:
    return {"method": "deepcache", "interval": interval, "schedule": schedule, "branch": branch}


PRESETS: dict = {
    "safe": {
        "*": {"method": "none"},
        "sd15": _dc(4, schedule="uniform"),  # ref-sd: 44.1 dB, 2.08x (24 prompts)
        "sdxl": _dc(5, branch=2), "animatediff": _dc(4),  # 51.5, 48.0 dB (random; floor 45.3)
    },
    "balanced": {
        "*": _DIT,
        # ref-video (Wan, trained), 24 held-out clips: interval 2 gives 29.3 dB (below 32),
        # a change threshold of 0.1 gives 36.5 dB at 1.05-1.13x with the checker's scores unchanged.
        "wan": {**_W, "threshold": 0.1},
        "sd15": _dc(5, schedule="uniform"),  # ref-sd: 38.1 dB, 2.55x (24 prompts)
        "sdxl": _dc(5, schedule="uniform"), "animatediff": _dc(4),  # 41.1, 48.0 dB (random; floor 37.3)
    },
    "fast": {
        "*": _DIT,  # nothing faster reached 26 dB on ref-dit (interval 3: 25.4 dB, interval 4: 25.8 dB);
        # on ref-video interval 2 gives 29.3 dB at 1.50x, so wan keeps it here
        "sd15": _dc(5, schedule="uniform"),  # as balanced: interval 5 is the grid's largest
        "sdxl": _dc(5, schedule="uniform"), "animatediff": _dc(4),
    },
}
