"""The peers `accel bench` measures beside our techniques, each at its own documented default.

A peer is switched on before a timed call and off after it, on the same pipeline as every other row
(so it sees the same weights, memory and clock). A peer that is not installed, or that does not cover
the pipeline's family, is not run: `unavailable` says why, and the report lists it with that reason.

- diffusers' own step caches, on transformers with ``enable_cache`` (``CacheMixin``): FirstBlockCache,
  MagCache (with the magnitude ratios diffusers ships, which exist for Flux only), TaylorSeer,
  Pyramid Attention Broadcast and FasterCache.
- cache-dit 1.5.x: DBCache (its default F8B0) and DBCache F1B0 with its TaylorSeer calibrator.
- tomesd (token merging for SD UNets) and DeepCache (UNet feature caching).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from ..families import denoisers_of


@dataclass
class Peer:
    """One peer setting: ``enable(pipe, steps, call)`` / ``disable(pipe)`` around a call of ``steps`` steps with
    keyword arguments ``call``."""

    name: str
    package: str  # the import name whose absence skips it
    install: str  # what to run to get it
    kind: str  # "dit": transformers with diffusers' CacheMixin; "transformer": any DiT pipeline; "unet": SD UNets
    enable: Callable = field(repr=False)
    disable: Callable = field(repr=False)
    families: tuple[str, ...] = ()  # only these families (empty: every family of its kind)
    min_blocks: int = 0  # the denoiser needs more transformer blocks than this
    # runs after every other row: it leaves state behind that breaks rows after it (cache-dit 1.5: diffusers'
    # FirstBlockCache fails on any later call, though the pipeline's instance and class attributes, hooks and
    # submodules are as before)
    late: bool = False

    def unavailable(self, pipe, family: str) -> str | None:
        """Why this peer cannot run on ``pipe`` (None: it can)."""
        if importlib.util.find_spec(self.package) is None:
            return f"not installed ({self.install})"
        if self.families and family not in self.families:
            return f"only for {', '.join(self.families)} in this benchmark"
        den = _denoiser(pipe)
        if self.kind == "dit" and not hasattr(den, "enable_cache"):
            return f"{type(den).__name__} has no diffusers enable_cache (CacheMixin)"
        if self.kind == "transformer" and not hasattr(pipe, "transformer"):
            return "works on transformer (DiT) pipelines only"
        if self.kind == "unet" and not hasattr(pipe, "unet"):
            return "works on UNet pipelines (SD1.5, SDXL) only"
        if self.min_blocks and _blocks(den) <= self.min_blocks:
            return f"needs more than {self.min_blocks} transformer blocks; this model has {_blocks(den)}"
        return None


def _blocks(module) -> int:
    """Transformer blocks of a denoiser: the lengths of its top-level block lists added up."""
    import torch

    return sum(len(m) for m in module.children() if isinstance(m, torch.nn.ModuleList))


def _denoiser(pipe):
    return denoisers_of(pipe)[0][1]


# --- diffusers' caches ---------------------------------------------------------------------------
def _diffusers(make_config: Callable) -> tuple[Callable, Callable]:
    def enable(pipe, steps, call=None):
        _denoiser(pipe).enable_cache(make_config(pipe, steps))

    def disable(pipe):
        _denoiser(pipe).disable_cache()

    return enable, disable


def _timestep(pipe) -> Callable[[], int]:
    return lambda: pipe.current_timestep


def _fbc(threshold: float = 0.05):
    def make(pipe, steps):
        from diffusers import FirstBlockCacheConfig

        return FirstBlockCacheConfig(threshold=threshold)
    return make


def _mag(threshold: float | None = None, max_skip: int | None = None):
    def make(pipe, steps):
        from diffusers import MagCacheConfig
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

        given = {k: v for k, v in (("threshold", threshold), ("max_skip_steps", max_skip)) if v is not None}
        return MagCacheConfig(mag_ratios=FLUX_MAG_RATIOS, num_inference_steps=steps, **given)
    return make


def _taylor(interval: int | None = None, order: int | None = None):
    def make(pipe, steps):
        from diffusers import TaylorSeerCacheConfig

        given = {k: v for k, v in (("cache_interval", interval), ("max_order", order)) if v is not None}
        return TaylorSeerCacheConfig(**given)
    return make


def _pab(pipe, steps):
    from diffusers import PyramidAttentionBroadcastConfig

    return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                           current_timestep_callback=_timestep(pipe))


def _faster(pipe, steps):
    from diffusers import FasterCacheConfig

    return FasterCacheConfig(current_timestep_callback=_timestep(pipe),
                             is_guidance_distilled=type(pipe).__name__.startswith("Flux"),
                             tensor_format="BFCHW" if type(pipe).__name__.startswith("CogVideoX") else "BCFHW")


# --- cache-dit ------------------------------------------------------------------------------------
def _cache_dit(taylor: bool, threshold: float | None = None) -> tuple[Callable, Callable]:
    def enable(pipe, steps, call=None):
        os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")  # its per-call notes go to stderr otherwise
        import cache_dit

        # cache-dit compares a forward with the previous one of the same CFG branch only when told the pipeline
        # runs its branches as separate calls; it guesses from the class, and FluxPipeline's true CFG is not guessed
        separate = True if (call or {}).get("true_cfg_scale", 1.0) > 1 and (call or {}).get("negative_prompt") \
            is not None else None
        given = {} if threshold is None else {"residual_diff_threshold": threshold}
        if taylor:
            cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(
                Fn_compute_blocks=1, Bn_compute_blocks=0, enable_separate_cfg=separate, **given),
                calibrator_config=cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1))
        else:
            cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(enable_separate_cfg=separate, **given))

    def disable(pipe):
        import cache_dit

        cache_dit.disable_cache(pipe)

    return enable, disable


# --- UNet peers -----------------------------------------------------------------------------------
def _tomesd() -> tuple[Callable, Callable]:
    def enable(pipe, steps, call=None):
        import tomesd

        tomesd.apply_patch(pipe, ratio=0.5)

    def disable(pipe):
        import tomesd

        tomesd.remove_patch(pipe)

    return enable, disable


def _deepcache(interval: int = 3, branch: int = 0) -> tuple[Callable, Callable]:
    helpers = {}

    def enable(pipe, steps, call=None):
        from DeepCache import DeepCacheSDHelper

        helper = helpers[id(pipe)] = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        helper.enable()

    def disable(pipe):
        helper = helpers.pop(id(pipe), None)
        if helper is not None:
            helper.disable()

    return enable, disable


def first_block_cache(threshold: float) -> Peer:
    """diffusers' FirstBlockCache at ``threshold`` (the table's row uses its default, 0.05)."""
    return Peer(f"diffusers FirstBlockCache {threshold:g}", "diffusers", "pip install -U diffusers", "dit",
                *_diffusers(_fbc(threshold)))


def deepcache(interval: int, branch: int = 0) -> Peer:
    """DeepCache's DeepCacheSDHelper at ``interval`` / ``branch`` (the table's row: 3 / 0)."""
    return Peer(f"DeepCache interval {interval}" + (f" branch {branch}" if branch else ""), "DeepCache",
                "pip install DeepCache", "unet", *_deepcache(interval, branch))


_CACHE_DIT = "pip install 'cache-dit>=1.5,<1.6'"
PEERS: dict[str, Peer] = {p.name: p for p in (
    Peer("diffusers FirstBlockCache 0.05", "diffusers", "pip install -U diffusers", "dit", *_diffusers(_fbc())),
    Peer("diffusers MagCache (Flux ratios)", "diffusers", "pip install -U diffusers", "dit", *_diffusers(_mag()),
         families=("flux",)),
    Peer("diffusers TaylorSeer interval 5", "diffusers", "pip install -U diffusers", "dit", *_diffusers(_taylor())),
    Peer("diffusers PAB spatial 2", "diffusers", "pip install -U diffusers", "dit", *_diffusers(_pab)),
    Peer("diffusers FasterCache", "diffusers", "pip install -U diffusers", "dit", *_diffusers(_faster)),
    # F8B0 always computes the first 8 blocks; cache-dit refuses a model without more
    Peer("cache-dit DBCache F8B0", "cache_dit", _CACHE_DIT, "transformer", *_cache_dit(False), min_blocks=8, late=True),
    Peer("cache-dit DBCache F1B0 + TaylorSeer", "cache_dit", _CACHE_DIT, "transformer", *_cache_dit(True), late=True),
    Peer("tomesd ratio 0.5", "tomesd", "pip install tomesd", "unet", *_tomesd()),
    deepcache(3),
)}


def sweep() -> list[Peer]:
    """Each step-caching peer over its main knob (3-5 settings), for a frontier against ours."""
    d = ("diffusers", "pip install -U diffusers", "dit")
    out = [first_block_cache(t) for t in (0.05, 0.1, 0.2, 0.3)]
    out += [Peer(f"diffusers MagCache threshold {t:g} K {k}", *d, *_diffusers(_mag(t, k)), families=("flux",))
            for t, k in ((0.06, 2), (0.12, 2), (0.12, 4), (0.24, 4))]
    out += [Peer(f"diffusers TaylorSeer interval {i} order {o}", *d, *_diffusers(_taylor(i, o)))
            for i, o in ((3, 1), (5, 1), (5, 2), (7, 2))]
    out += [Peer(f"cache-dit DBCache F1B0 + TaylorSeer threshold {t:g}", "cache_dit", _CACHE_DIT, "transformer",
                 *_cache_dit(True, t), late=True) for t in (0.08, 0.12, 0.2, 0.3)]
    out += [deepcache(i) for i in (2, 3, 4, 5)]
    return out


def select(spec: str | None) -> list[Peer]:
    """Peers named by ``spec``: "all", "sweep" (`sweep`: each step cache over its main knob), "none"/"" or a
    comma list of names or name prefixes (``cache-dit``, ``diffusers``, ``tomesd``, ``DeepCache``,
    case-insensitive)."""
    if spec is None or spec.strip().lower() in ("", "none"):
        return []
    if spec.strip().lower() == "all":
        return list(PEERS.values())
    if spec.strip().lower() == "sweep":
        return sweep()
    out = []
    for part in (p.strip().lower() for p in spec.split(",") if p.strip()):
        hits = [p for p in PEERS.values() if p.name.lower().startswith(part)] or \
            [p for p in sweep() if p.name.lower().startswith(part)]  # a point of the sweep, by name
        if not hits:
            raise ValueError(f"--peers: no peer is called {part!r}; peers: all, none, or names starting with "
                             f"{', '.join(sorted({n.split()[0] for n in PEERS}))} ({'; '.join(PEERS)})")
        out += [p for p in hits if p not in out]
    return out
