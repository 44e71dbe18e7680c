"""diffusers' own step caches (`enable_cache`) reached through `CacheConfig`, on any pipeline.

We do not reimplement what diffusers ships. This module maps our fields onto its configs, enables
the cache on each denoiser that has ``CacheMixin``, and adds what diffusers leaves to the
pipeline:

- a cache context for every forward: pipelines that never call ``cache_context`` (Flux img2img,
  inpaint, Kontext, ...) fail inside diffusers' hooks with "No cache context is set"; we enter
  ``module.cache_context(<tracked branch>)`` around the forward when the pipeline has not;
- a reset of the hooks' state at every new pipeline call (not every pipeline frees its hooks);
- the timestep the PAB/FasterCache hooks ask for, from the tracker;
- counts of executed vs skipped blocks and attention calls, for `accel.stats`;
- an exact undo: ``disable_cache`` leaves registries, ``forward`` attributes and ``_cache_config``
  on the instances, which we remove again;
- a refusal of FirstBlockCache and MagCache with a ControlNet (Flux, SD3): they would add the ControlNet
  residuals twice in reused steps (see `_SPAN_RESIDUAL`).
"""

from __future__ import annotations

import inspect

from diffusers.hooks import ModelHook

from ..config_base import ConfigError
from ..families import Adapter, bind_inputs
from ..patching import forward_slots
from .state import Streams, state_key

HOOK_CONTEXT = "accel.cache.diffusers.context"
HOOK_COUNT = "accel.cache.diffusers.count"

# FasterCache splits frames by tensor layout; (B, C, F, H, W) unless listed.
_TENSOR_FORMAT = {"cogvideox": "BFCHW", "flux": "BCHW", "sd3": "BCHW", "pixart": "BCHW"}
_DISTILLED = ("flux",)  # guidance embedded: no unconditional pass for FasterCache to skip
# Caches that reuse the residual of a span of blocks measured as its output minus its input: that
# includes what the forward adds between the span's blocks (ControlNet residuals, the family's
# `between_blocks` inputs), which a reused step then adds twice. Our 'block' method keeps them apart.
_SPAN_RESIDUAL = ("diffusers.first_block", "diffusers.mag")


def _refuse_between_blocks(method: str, module, where: str):
    raise ConfigError(f"cache.method: {method} with a ControlNet ({where}) on {type(module).__name__}: diffusers' "
                      "cache keeps the ControlNet residuals added between blocks in its cached residual and adds "
                      "them twice in every reused step; use method 'block', which keeps them apart")


def _progress_timestep(tracker) -> float:
    """A 1000..0 timestep from the step position: PAB/FasterCache ranges are in that scale, while
    flow-matching denoisers receive sigmas (0..1) or pipelines pass timestep / 1000."""
    s = tracker.state
    total = s.total_steps or 0
    return 1000.0 * (1.0 - s.step / total) if total else 1000.0


def make_config(method: str, cfg, family: str, tracker):
    """The diffusers cache config for ``method`` with our fields mapped onto it."""
    from diffusers.hooks import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    def timestep():
        return _progress_timestep(tracker)

    if method == "diffusers.first_block":
        return FirstBlockCacheConfig(threshold=cfg.threshold)
    if method == "diffusers.mag":
        if family != "flux":
            raise ConfigError(f"cache.method: diffusers.mag needs magnitude ratios calibrated for the model; "
                              f"diffusers ships them for flux only, not {family}; use method 'block'")
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

        total = tracker.state.total_steps or len(FLUX_MAG_RATIOS)
        return MagCacheConfig(threshold=cfg.threshold or 0.06, max_skip_steps=cfg.max_skip or 3,
                              retention_ratio=0.0, num_inference_steps=total, mag_ratios=FLUX_MAG_RATIOS)
    if method == "diffusers.taylorseer":
        return TaylorSeerCacheConfig(cache_interval=cfg.interval, disable_cache_before_step=max(1, cfg.warmup_steps),
                                     max_order=max(1, cfg.taylor_order), taylor_factors_dtype=None)
    if method == "diffusers.pab":
        return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=max(2, cfg.interval),
                                               current_timestep_callback=timestep)
    if method == "diffusers.faster":
        return FasterCacheConfig(spatial_attention_block_skip_range=max(2, cfg.interval),
                                 current_timestep_callback=timestep,
                                 tensor_format=_TENSOR_FORMAT.get(family, "BCFHW"),
                                 is_guidance_distilled=family in _DISTILLED)
    raise ConfigError(f"cache.method: unknown diffusers method {method!r}")


class DiffusersCache:
    """One denoiser with a diffusers cache enabled, plus our context, reset and counters."""

    def __init__(self, adapter: Adapter, cfg, tracker, streams: Streams, family: str):
        module = adapter.module
        if not hasattr(module, "enable_cache") or not hasattr(module, "cache_context"):
            raise ConfigError(
                f"cache.method: {cfg.method} needs a denoiser with diffusers' CacheMixin; "
                f"{type(module).__name__} ({family}) has none; use method 'block' or 'auto'")
        self.adapter, self.cfg, self.tracker, self.streams = adapter, cfg, tracker, streams
        self.between_blocks = adapter.family.between_blocks if cfg.method in _SPAN_RESIDUAL else ()
        if self.between_blocks and getattr(tracker.pipe, "controlnet", None) is not None:
            _refuse_between_blocks(cfg.method, module, type(tracker.pipe).__name__)
        self.config = make_config(cfg.method, cfg, family, tracker)
        self.blocks = [b for _, b in adapter.blocks()]
        self.attention = [s.module for s in adapter.attention()]
        self.part = f"{adapter.component or 'denoiser'}.{cfg.method}"
        self.ran = {"blocks": 0, "attention": 0}
        self._context_kwargs = "step_index" in inspect.signature(
            type(module).cache_context).parameters or _accepts_kwargs(type(module).cache_context)

    def install(self, ledger) -> None:
        module = self.adapter.module
        # Counting hooks first, so they sit inside diffusers' hooks and see only real executions.
        for b in self.blocks:
            ledger.add_hook(b, _Count(self.ran, "blocks"), HOOK_COUNT)
        for a in self.attention:
            ledger.add_hook(a, _Count(self.ran, "attention"), HOOK_COUNT)
        had_cache_config = "_cache_config" in module.__dict__
        # inside accelerate's offload hooks, where the ledger puts ours (patching.py)
        with forward_slots(module):
            before = {id(m): ("_diffusers_hook" in m.__dict__, "forward" in m.__dict__) for m in module.modules()}
            module.enable_cache(self.config)

        def undo():
            with forward_slots(module):
                module.disable_cache()
                for m in module.modules():
                    had_registry, had_forward = before.get(id(m), (False, False))
                    reg = m.__dict__.get("_diffusers_hook")
                    if reg is None or reg.hooks:
                        continue
                    if not had_forward:  # an emptied registry leaves the bound method behind
                        m.__dict__.pop("forward", None)
                    if not had_registry:
                        m.__dict__.pop("_diffusers_hook", None)
            if not had_cache_config:
                module.__dict__.pop("_cache_config", None)

        ledger.on_undo(undo)
        # After enable_cache: outside diffusers' denoiser-level hooks, inside the tracker's.
        ledger.add_hook(module, _Context(self), HOOK_CONTEXT)

    def on_call_start(self, s) -> None:
        self.adapter.module._reset_stateful_cache()
        if hasattr(self.config, "mag_ratios") and s.total_steps and s.total_steps != self.config.num_inference_steps:
            from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS, nearest_interp

            self.config.num_inference_steps = s.total_steps
            self.config.mag_ratios = nearest_interp(FLUX_MAG_RATIOS, s.total_steps)

    def context_name(self) -> str:
        s = self.tracker.state
        return "-".join(str(k) for k in state_key(s)[1:])

    def forward_done(self) -> None:
        """Count this forward as computed if every block ran, else reused."""
        key = state_key(self.tracker.state)
        reused = self.ran["blocks"] < len(self.blocks)
        self.streams.count(self.part, key, reused)
        att = self.streams.extra.setdefault(f"{self.part}.attention_calls", {"executed": 0, "skipped": 0})
        att["executed"] += self.ran["attention"]
        att["skipped"] += max(0, len(self.attention) - self.ran["attention"])
        self.ran.update(blocks=0, attention=0)


def _accepts_kwargs(fn) -> bool:
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


class _Count(ModelHook):
    def __init__(self, ran: dict, what: str):
        super().__init__()
        self.ran, self.what = ran, what

    def pre_forward(self, module, *args, **kwargs):
        self.ran[self.what] += 1
        return args, kwargs


class _Context(ModelHook):
    """Enter a cache context named after the tracked branch when the pipeline has not set one."""

    def __init__(self, cache: DiffusersCache):
        super().__init__()
        self.cache = cache

    def new_forward(self, module, *args, **kwargs):
        cache = self.cache
        if cache.cfg.method == "diffusers.faster" and cache.tracker.state.branch in ("cond", "uncond") \
                and cache.adapter.family.name not in _DISTILLED:
            raise ConfigError("cache.method: diffusers.faster skips the unconditional half of a batched "
                              f"[uncond, cond] call, but this {type(module).__name__} pipeline runs cond and "
                              "uncond as separate calls; use 'diffusers.pab' or 'block'")
        if cache.between_blocks:
            given = bind_inputs(module, args, kwargs)
            added = [n for n in cache.between_blocks if given.get(n) is not None]
            if added:
                _refuse_between_blocks(cache.cfg.method, module, f"{added[0]} given")
        try:
            # The tracker knows whether the pipeline entered its own cache_context around this call.
            if cache.tracker.context_name is not None:
                return self.fn_ref.original_forward(*args, **kwargs)
            s = cache.tracker.state
            extra = {"step_index": s.step, "num_inference_steps": s.total_steps} if cache._context_kwargs else {}
            with module.cache_context(cache.context_name(), **extra):
                return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            cache.forward_done()


def apply_diffusers_cache(adapter: Adapter, cfg, tracker, ledger, streams: Streams, family: str) -> DiffusersCache:
    cache = DiffusersCache(adapter, cfg, tracker, streams, family)
    cache.install(ledger)
    tracker.on_call_start(cache.on_call_start)
    return cache

