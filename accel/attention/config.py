"""`AttentionConfig`: sparse attention patterns and attention backends."""

from __future__ import annotations

from dataclasses import dataclass

from ..config_base import ConfigBase, ConfigError, spec
from .backends import NAMES as BACKEND_NAMES

PATTERNS = ("dense", "tile", "spatial_temporal", "radial", "global_local", "topk")
BACKENDS = ("auto", *BACKEND_NAMES)  # `auto` picks one of the registry's backends per call


@dataclass(frozen=True)
class AttentionConfig(ConfigBase):
    """Sparse attention over image/video tokens; text tokens always attend and are attended densely.

    Important: ``pattern`` (``dense`` is off), ``density`` (fraction of video query-block x
    key-block pairs computed; 1.0 is dense) and ``backend``: ``auto`` (the default) picks, per
    call, the fastest measured kernel for the tensors' device and dtype (`backends.AUTO`:
    our Triton kernel on CUDA in fp16/bf16, ``flex`` on CUDA in fp32, ``gather`` on CPU);
    ``flex``, ``triton`` and ``gather`` name one (each skips the blocks that are not computed);
    ``sdpa``/``xformers`` apply the same mask densely, a reference.
    ``dense_steps`` first steps and ``dense_layers`` first attention layers stay dense, and so do
    calls over fewer than ``min_tokens`` video tokens.

    On a GPU, masks and layouts are built once per shape on the device and reused by every layer and
    step; the per-call path has no host sync, except the data-dependent ones: ``topk`` (its mask is new
    every call: one read of its density), ``spatial_temporal`` and ``renorm`` (one profile per site and
    pipeline call), a text key-padding mask (HunyuanVideo), and the CPU ``gather`` backend.

    Tinkering: ``block_size`` tokens per block (a 3-D tile of the token grid), ``renorm``
    (Re-ttention-style correction for the attention mass of skipped blocks), the per-pattern
    knobs below, ``on_unavailable`` and ``flex_compile``.
    """

    section = "attention"
    pattern: str = spec("dense", choices=PATTERNS, help="sparsity pattern; dense is off")
    backend: str = spec("auto", choices=BACKENDS, help="attention kernel; auto: fastest measured for device/dtype")
    density: float = spec(1.0, min=0.0, max=1.0, min_exclusive=True, help="fraction of blocks computed")
    dense_steps: int = spec(0, min=0, help="first N denoising steps stay dense")
    dense_layers: int = spec(0, min=0, help="first N attention layers stay dense")
    # 128: the fastest measured on the GPU (our kernel's 128-row tiles) and on CPU (gather's larger GEMMs)
    block_size: int = spec(128, choices=(16, 32, 64, 128), help="tokens per block (one 3-D tile of the grid)")
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
        return self.pattern != "dense" or self.backend not in ("auto", "sdpa")

    def validate(self) -> None:
        if self.pattern == "dense" and self.density != 1.0:
            raise ConfigError(f"attention.density: {self.density!r} needs a sparse attention.pattern "
                              f"(one of {', '.join(PATTERNS[1:])}); with pattern 'dense' it must be 1.0")


# Video DiTs only, at >= 8192 video tokens; image families (sd15, sdxl, flux, sd3, pixart, animatediff) stay
# dense: their token counts (<= 4096 at 1024 px) are where sparse attention pays least. Sparse attention and token
# reduction do not stack (token reduction shortens the sequence, and the processor no longer sees the token grid),
# so each video-DiT preset takes one of the two, by the token presets' rule applied to both techniques' rows of one
# end-to-end table: WanPipeline, Wan2.1-1.3B-size random weights, 480x832x81 (32,760 tokens), 8 steps, CFG, one
# H200 in bf16 (BENCHMARKS.md "Sparse attention" / "On the GPU"): radial d=0.25 1.62x at 57.4 dB, tile d=0.1
# 1.98x at 57.1 dB, token merging 0.3 1.59x at 50.4 dB, token merging 0.5 (balanced/fast's part, with their
# cache) 2.51x at 48.1 dB.
#   safe     = the highest-PSNR row at >= 1.2x: sparse attention, radial d=0.25 (tokens off there);
#   balanced = the fastest row at >= 35 dB, fast = the fastest at >= 30 dB: token merging 0.5 (no attention part).
# HunyuanVideo and CogVideoX follow Wan's table. Block 128 and backend auto (our Triton kernel on CUDA, gather on
# CPU) are the fastest measured.
VIDEO_DITS = ("wan", "hunyuanvideo", "cogvideox")
_COMMON = {"backend": "auto", "block_size": 128, "min_tokens": 8192}
PRESETS: dict = {
    "safe": {f: {"pattern": "radial", "density": 0.25, **_COMMON} for f in VIDEO_DITS},
}
