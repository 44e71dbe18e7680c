"""accel: make Hugging Face diffusers pipelines fast without retraining.

    import accel
    accel.apply(pipe, "off")          # a preset name, an accel.Config, a dict or a config file
    out = pipe(prompt)
    accel.stats(pipe)
    accel.remove(pipe)                # restores the pipeline exactly
"""

from .api import applied, apply, config_of, is_applied, remove, stats
from .attention.config import AttentionConfig
from .cache.config import CacheConfig
from .config import Config, available_presets, preset
from .config_base import ConfigError
from .families import FAMILIES, UnsupportedModelError
from .parallel import ParallelConfig, parallelize
from .tokens.config import TokenConfig

__version__ = "0.1.0"

__all__ = [
    "apply", "remove", "applied", "stats", "is_applied", "config_of",
    "Config", "CacheConfig", "TokenConfig", "AttentionConfig", "ConfigError",
    "preset", "available_presets", "FAMILIES", "UnsupportedModelError",
    "parallelize", "ParallelConfig",
]
