"""accel: make Hugging Face diffusers pipelines fast without retraining.

    import accel
    accel.apply(pipe, "off")          # a preset name, an accel.Config, a dict or a config file
    out = pipe(prompt)
    accel.stats(pipe)
    accel.remove(pipe)                # restores the pipeline exactly
"""

from ._lazy import lazy

# What `import accel` offers, imported on first use: torch and diffusers load only when a name needs them.
_EXPORTS = {
    **dict.fromkeys(("apply", "remove", "applied", "stats", "is_applied", "config_of"), ".api"),
    "AttentionConfig": ".attention.config", "CacheConfig": ".cache.config", "TokenConfig": ".tokens.config",
    "ApproxCacheConfig": ".approx.config", "ApproxCache": ".approx.store", "SolverConfig": ".solver.config",
    **dict.fromkeys(("Config", "available_presets", "preset"), ".config"), "ConfigError": ".config_base",
    **dict.fromkeys(("FAMILIES", "UnsupportedModelError"), ".families"),
    "ParallelConfig": ".parallel.config", "parallelize": ".parallel.api",
}
__getattr__, __dir__ = lazy(__name__, _EXPORTS)

__version__ = "0.1.0"

__all__ = [
    "apply", "remove", "applied", "stats", "is_applied", "config_of",
    "Config", "CacheConfig", "TokenConfig", "AttentionConfig", "ApproxCacheConfig", "ApproxCache", "SolverConfig",
    "ConfigError",
    "preset", "available_presets", "FAMILIES", "UnsupportedModelError",
    "parallelize", "ParallelConfig",
]
