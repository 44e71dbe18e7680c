"""Request-level approximate caching (NIRVANA, NSDI 2024): a call starts from a similar earlier call's latent.

Configured by `accel.ApproxCacheConfig` (``config.py``); the folder of stored latents is `ApproxCache`
(``store.py``); the pipeline hooks are ``hooks.py``; `accel.eval.approx_policy` measures the policy on a model.
Imports are lazy, so reading the config does not load torch.
"""

from .._lazy import lazy

_EXPORTS = {"ApproxCacheConfig": ".config", "PRESETS": ".config", "ApproxCache": ".store",
            "apply_technique": ".hooks", "open_cache": ".hooks"}
__getattr__, __dir__ = lazy(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
