"""Step caching across denoising steps. Configured by `accel.CacheConfig`; see config.py.

``apply_technique(target, cfg)`` picks the method (``auto``: DeepCache for UNets, block caching for
DiTs), installs it on every denoiser of the pipeline (Wan 2.2's two experts each get their own), and
returns a handle whose ``stats()`` reports, for the last pipeline call, the steps computed and
reused per cached part and per CFG branch, and the hit rate.
"""

from __future__ import annotations

from ..config_base import ConfigError
from .config import DIFFUSERS_METHODS, METHODS, PRESETS, CacheConfig

__all__ = ["CacheConfig", "CacheHandle", "METHODS", "PRESETS", "apply_technique", "resolve_method"]


def resolve_method(cfg: CacheConfig, kind: str) -> str:
    """The concrete method for a denoiser of ``kind`` ("unet" or "dit")."""
    method = cfg.method
    if method == "auto":
        return "deepcache" if kind == "unet" else "block"
    if method == "deepcache" and kind != "unet":
        raise ConfigError("cache.method: deepcache works on UNets (sd15, sdxl, animatediff); "
                          "use 'block' or 'auto' for this transformer")
    if method == "block" and kind != "dit":
        raise ConfigError("cache.method: block caching works on transformers (DiTs); "
                          "use 'deepcache' or 'auto' for this UNet")
    return method


class CacheHandle:
    """What `apply_technique` returns: the installed caches and their shared per-call state."""

    def __init__(self, method: str, caches: list, streams):
        self.method, self.caches, self.streams = method, caches, streams

    def stats(self) -> dict:
        return {"method": self.method, **self.streams.stats()}

    def trace(self) -> list:
        """Start recording (stream key, stream step, action, detail) events; returns the live list."""
        if self.streams.trace is None:
            self.streams.trace = []
        return self.streams.trace


def apply_technique(target, cfg: CacheConfig) -> CacheHandle:
    # the methods import torch and diffusers: only when a cache is applied, not with the package
    from .block import apply_block_cache
    from .deepcache import apply_deepcache
    from .diffusers_backend import apply_diffusers_cache
    from .state import Streams

    streams = Streams()
    target.tracker.on_call_start(streams.reset)
    caches, methods = [], set()
    for adapter in target.adapters:
        method = resolve_method(cfg, adapter.family.kind)
        methods.add(method)
        if method == "deepcache":
            c = apply_deepcache(adapter, cfg, target.tracker, target.ledger, streams)
        elif method == "block":
            c = apply_block_cache(adapter, cfg, target.tracker, target.ledger, streams)
        elif method in DIFFUSERS_METHODS:
            c = apply_diffusers_cache(adapter, cfg, target.tracker, target.ledger, streams, target.family)
        else:  # pragma: no cover - METHODS and the branches above are kept in step
            raise ConfigError(f"cache.method: {method!r} is not handled; choose one of {', '.join(METHODS)}")
        caches.append(c)
    return CacheHandle("+".join(sorted(methods)), caches, streams)
