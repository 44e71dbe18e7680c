"""Sparse attention processor and backends. Configured by `accel.AttentionConfig`; see config.py.

`apply_technique(target, cfg)` installs one `SparseProcessor` (processor.py) on every self, joint
and temporal attention module of each denoiser, through ``target.ledger`` so `accel.remove`
restores the original processors. Masks come from patterns.py over the tiled token layout of
layout.py; kernels from backends/ (one module per backend behind one registry) and kernels/ (our Triton
kernel).
"""

from __future__ import annotations

import logging

from .._lazy import lazy
from ..config_base import ConfigError
from .backends import FALLBACK
from .config import AttentionConfig

# the engine and the processor import torch and diffusers: only when used, not with the package
__getattr__, __dir__ = lazy(__name__, {"SparseAttention": ".sparse", "SparseProcessor": ".processor"})

__all__ = ["AttentionConfig", "SparseAttention", "SparseProcessor", "apply_technique", "resolve_backend"]

logger = logging.getLogger("accel.attention")
_FALLBACK_TEXT = " (else ".join(FALLBACK) + ")" * (len(FALLBACK) - 1)  # "flex (else sdpa)"


def unavailable_reason(backend: str, device) -> str | None:
    """`backends.unavailable_reason`, looked up here when a config is applied (tests patch this name)."""
    from .backends import unavailable_reason as reason

    return reason(backend, device)


def _device_of(module):
    import torch

    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def resolve_backend(cfg: AttentionConfig, device) -> tuple[str, str | None]:
    """(backend to use, reason it differs from the configured one or None). Raises per ``on_unavailable``."""
    reason = unavailable_reason(cfg.backend, device)
    if reason is None:
        return cfg.backend, None
    if cfg.on_unavailable == "error":
        raise ConfigError(f"attention.backend: {cfg.backend!r} is unavailable: {reason}; "
                          f"or set attention.on_unavailable='fallback' to use {_FALLBACK_TEXT} instead")
    fallback = next((b for b in FALLBACK[:-1] if unavailable_reason(b, device) is None), FALLBACK[-1])
    logger.warning("accel.attention: backend %r unavailable (%s); falling back to %r", cfg.backend, reason, fallback)
    return fallback, reason


class AttentionHandle:
    def __init__(self, engine, sites: int, fallback: str | None):
        self.engine = engine
        self.sites = sites
        self.fallback = fallback

    def stats(self) -> dict:
        return {**self.engine.stats(), "sites": self.sites, "fallback_reason": self.fallback}


def apply_technique(target, cfg: AttentionConfig) -> AttentionHandle:
    from .processor import sparse_sites, wrap
    from .sparse import SparseAttention

    backend, reason = resolve_backend(cfg, _device_of(target.adapters[0].module))
    engine = SparseAttention(cfg, backend)
    target.tracker.on_call_start(lambda state: engine.reset_stats())
    n = 0
    for adapter in target.adapters:
        for rank, site in enumerate(sparse_sites(adapter)):
            original = site.module.processor
            target.ledger.set_processor(site.module, wrap(original, site, rank, adapter, engine, target.tracker))
            n += 1
    return AttentionHandle(engine, n, reason)
