"""`AttentionConfig`: sparse attention patterns and attention backends."""

from __future__ import annotations

from dataclasses import dataclass

from ..config_base import ConfigBase, ConfigError, spec

PATTERNS = ("dense", "tile", "spatial_temporal", "radial", "global_local", "topk")
BACKENDS = ("sdpa", "xformers", "flex", "triton")


@dataclass(frozen=True)
class AttentionConfig(ConfigBase):
    """Sparse attention.

    Important: ``pattern`` (``dense`` is off), ``density`` (fraction of query-block x key-block
    pairs computed; 1.0 is dense) and ``backend``.
    Tinkering: ``dense_steps`` first steps and ``dense_layers`` first layers stay dense.
    """

    section = "attention"
    pattern: str = spec("dense", choices=PATTERNS, help="sparsity pattern; dense is off")
    backend: str = spec("sdpa", choices=BACKENDS, help="attention kernel")
    density: float = spec(1.0, min=0.0, max=1.0, min_exclusive=True, help="fraction of blocks computed")
    dense_steps: int = spec(0, min=0, help="first N denoising steps stay dense")
    dense_layers: int = spec(0, min=0, help="first N attention layers stay dense")

    @property
    def enabled(self) -> bool:
        return self.pattern != "dense" or self.backend != "sdpa"

    def validate(self) -> None:
        if self.pattern == "dense" and self.density != 1.0:
            raise ConfigError(f"attention.density: {self.density!r} needs a sparse attention.pattern "
                              f"(one of {', '.join(PATTERNS[1:])}); with pattern 'dense' it must be 1.0")


PRESETS: dict = {}
