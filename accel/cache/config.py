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


# From benchmarks/tune_cache.py, BENCHMARKS.md "## Step caching", "Per-family sweep" (2-core CPU,
# 20 steps, median of 2; `python benchmarks/tune_cache.py --ref-sd <ref-sd folder> --from-json ...`
# reprints these picks). Rule (tune_cache.pick): per family and tier, the fastest setting by
# denoiser CPU time whose PSNR against the uncached output of the same seed is >= 40 dB (safe),
# 32 dB (balanced), 26 dB (fast); settings within 10% of the fastest count as equally fast and the
# higher PSNR wins; a looser tier is never slower than a stricter one. sd15 is decided on the
# trained ref-sd model (SD1.5 layout); every other family on random weights (DiTs rebuilt at 8
# blocks), where the floors are raised by 10.1 dB, the measured median PSNR excess of the random
# SD1.5-layout UNet over the trained one on the same grid. No setting met the safe floor on
# cogvideox, nor on every DiT at once ("*"): safe leaves caching off there. compute_last_n is left
# out of presets (with the first block always computed it leaves nothing to cache in a 2-block model).
_W = {"method": "block", "warmup_steps": 2}  # every DiT row: 2 full warm-up steps, fixed schedule


def _dc(interval: int, branch: int = 1) -> dict:
    return {"method": "deepcache", "interval": interval, "schedule": "nonuniform", "branch": branch}


PRESETS: dict = {
    "safe": {
        "*": {"method": "none"},
        "sd15": _dc(3), "sdxl": _dc(5, branch=2), "animatediff": _dc(3),  # 43.2 (trained), 51.5, 52.5 dB
        "flux": {**_W, "interval": 5},  # 59.1 dB, 1.88x
        "sd3": {**_W, "interval": 3, "taylor_order": 2},  # 54.5 dB, 1.65x
        "pixart": {**_W, "interval": 6},  # 69.7 dB, 2.23x
        "cogvideox": {"method": "none"},  # best: interval 3, 47.4 dB < 50.1
        "wan": {**_W, "interval": 8},  # 50.3 dB, 2.59x
        "ltx": {**_W, "interval": 2},  # 56.6 dB, 1.73x
        "hunyuanvideo": {**_W, "interval": 2},  # 50.1 dB, 1.30x
    },
    "balanced": {
        "*": {**_W, "interval": 3, "taylor_order": 1},  # >= 42.1 dB on every DiT
        "sd15": _dc(4), "sdxl": _dc(5), "animatediff": _dc(4),  # 40.0 (trained), 46.7, 48.0 dB
        "flux": {**_W, "interval": 5},  # 59.1 dB, 1.88x
        "sd3": {**_W, "interval": 8},  # 48.3 dB, 2.26x
        "pixart": {**_W, "interval": 6},  # 69.7 dB, 2.23x
        "cogvideox": {**_W, "interval": 3, "taylor_order": 1},  # 43.5 dB, 1.75x
        "wan": {**_W, "interval": 8},  # 50.3 dB, 2.59x
        "ltx": {**_W, "interval": 6},  # 47.2 dB, 1.90x
        "hunyuanvideo": {**_W, "interval": 8},  # 47.4 dB, 1.87x
    },
    "fast": {
        "*": {**_W, "interval": 6, "taylor_order": 1},  # >= 36.1 dB on every DiT
        "sd15": _dc(4), "sdxl": _dc(5), "animatediff": _dc(5),  # 40.0 (trained), 46.7, 45.9 dB
        "flux": {**_W, "interval": 5},  # 59.1 dB, 1.88x
        "sd3": {**_W, "interval": 8},  # 48.3 dB, 2.26x
        "pixart": {**_W, "interval": 6},  # 69.7 dB, 2.23x
        "cogvideox": {**_W, "interval": 5},  # 41.9 dB, 2.08x
        "wan": {**_W, "interval": 8},  # 50.3 dB, 2.59x
        "ltx": {**_W, "interval": 8},  # 45.2 dB, 2.03x
        "hunyuanvideo": {**_W, "interval": 6},  # 40.9 dB, 2.02x
    },
}
