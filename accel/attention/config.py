"""`AttentionConfig`: sparse attention patterns and attention backends."""

from __future__ import annotations

from dataclasses import dataclass

from ..config_base import ConfigBase, ConfigError, spec

PATTERNS = ("dense", "tile", "spatial_temporal", "radial", "global_local", "topk")
BACKENDS = ("sdpa", "xformers", "flex", "triton", "gather")


@dataclass(frozen=True)
class AttentionConfig(ConfigBase):
    """Sparse attention over image/video tokens; text tokens always attend and are attended densely.

    Important: ``pattern`` (``dense`` is off), ``density`` (fraction of video query-block x
    key-block pairs computed; 1.0 is dense) and ``backend`` (``flex``, ``triton`` and ``gather``
    skip the blocks that are not computed: ``gather`` is the fast one on CPU, ``flex``/``triton``
    on GPU; ``sdpa``/``xformers`` apply the same mask densely, a reference).
    ``dense_steps`` first steps and ``dense_layers`` first attention layers stay dense, and so do
    calls over fewer than ``min_tokens`` video tokens.

    Tinkering: ``block_size`` tokens per block (a 3-D tile of the token grid), ``renorm``
    (Re-ttention-style correction for the attention mass of skipped blocks), the per-pattern
    knobs below, ``on_unavailable`` and ``flex_compile``.
    """

    section = "attention"
    pattern: str = spec("dense", choices=PATTERNS, help="sparsity pattern; dense is off")
    backend: str = spec("sdpa", choices=BACKENDS, help="attention kernel")
    density: float = spec(1.0, min=0.0, max=1.0, min_exclusive=True, help="fraction of blocks computed")
    dense_steps: int = spec(0, min=0, help="first N denoising steps stay dense")
    dense_layers: int = spec(0, min=0, help="first N attention layers stay dense")
    block_size: int = spec(64, choices=(16, 32, 64, 128), help="tokens per block (one 3-D tile of the grid)")
    on_unavailable: str = spec("error", choices=("error", "fallback"),
                               help="backend not installed/usable: raise, or log and use sdpa")
    renorm: bool = spec(False, help="Re-ttention: give skipped blocks their calibrated share of attention mass")
    flex_compile: bool = spec(True, help="torch.compile flex_attention (fused, skips blocks); off: eager reference")
    local_fraction: float = spec(0.5, min=0.0, max=1.0, min_exclusive=True,
                                 help="global_local: share of the block budget spent on the local window")
    sinks: int = spec(1, min=0, help="radial: first N key blocks every query keeps (attention sinks)")
    topk_mass: float = spec(0.9, min=0.0, max=1.0, min_exclusive=True,
                            help="topk: keep blocks until this cumulative pooled-score mass (capped by density)")
    min_tokens: int = spec(0, min=0, help="calls with fewer video tokens stay dense (sparse does not pay there)")
    profile_rows: int = spec(32, min=1, help="query rows sampled per head to profile spatial_temporal / renorm")

    @property
    def enabled(self) -> bool:
        return self.pattern != "dense" or self.backend != "sdpa"

    def validate(self) -> None:
        if self.pattern == "dense" and self.density != 1.0:
            raise ConfigError(f"attention.density: {self.density!r} needs a sparse attention.pattern "
                              f"(one of {', '.join(PATTERNS[1:])}); with pattern 'dense' it must be 1.0")


# From BENCHMARKS.md "Sparse attention" (2-core CPU): a Wan-shaped transformer (1536 wide, 12 heads, 1 block)
# at 8192 video tokens: radial d=0.25 1.55x dense at 67.6 dB PSNR, tile d=0.1 1.58x at 62.7 dB (every measured
# setting is >= 30 dB there, the floor the rule asks for). balanced = the density-0.25 setting with the best
# PSNR (its speed is within noise of the fastest at 0.25); fast = the fastest overall. Block 128 and the CPU
# 'gather' backend were the fastest measured. Video DiTs only, and only at >= 8192 video tokens, the size
# measured end to end: image families (sd15, sdxl, flux, sd3, pixart, animatediff) stay dense: their token
# counts (<= 4096 at 1024 px) are where sparse attention pays least, and no end-to-end run shows a gain there.
_VIDEO_DITS = ("wan", "hunyuanvideo", "cogvideox")
_COMMON = {"backend": "gather", "block_size": 128, "min_tokens": 8192}
PRESETS: dict = {
    "balanced": {f: {"pattern": "radial", "density": 0.25, **_COMMON} for f in _VIDEO_DITS},
    "fast": {f: {"pattern": "tile", "density": 0.1, **_COMMON} for f in _VIDEO_DITS},
}
