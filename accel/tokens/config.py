"""`TokenConfig`: fewer image/video tokens through attention (token merging and pruning)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config_base import ConfigBase, ConfigError, spec

METHODS = ("merge", "kv_downsample", "prune")
SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class TokenConfig(ConfigBase):
    """Token reduction.

    Important: ``ratio`` (fraction of image/video tokens removed from the attention input; 0 is
    off) and ``method``:

    - ``merge``: ToMe. Bipartite soft matching with one destination per ``st x sy x sx`` window;
      the ``ratio * N`` most similar source tokens are averaged into their destination before
      the block and copied back out after it. UNet (and PixArt) ``BasicTransformerBlock``\\ s merge
      before self-attention (``merge_attn``), optionally cross-attention and MLP; other DiT blocks
      run whole on the merged tokens and their residual update is unmerged.
    - ``kv_downsample``: ToDo. Keys and values of image self/joint attention are averaged over the
      windows whose tokens are most alike (enough windows to remove ``ratio`` of the keys); queries
      stay full, so nothing is unmerged.
    - ``prune``: cached token pruning (ToCa / FastVAR). Each block recomputes only the
      ``1 - ratio`` fraction of tokens whose input changed most since they were last computed;
      the others reuse their cached residual. Every ``refresh_interval``-th run is full.

    Tinkering: window ``sx``/``sy``/``st`` (``st`` applies to video DiTs), ``use_rand`` (random
    destination within each window), ``max_downsample`` (UNets: deepest level still merged, 1 is
    the top resolution only), ``merge_attn``/``merge_crossattn``/``merge_mlp`` (BasicTransformerBlock
    only), ``schedule``/``ratio_end`` (ratio moves from ``ratio`` at the first step to ``ratio_end``
    at the last), ``skip_blocks`` (DiTs: first and last N blocks keep every token), ``seed``,
    ``min_tokens`` (a call whose image/video grid at the top resolution has fewer tokens is left
    whole: at small sizes reduction costs fidelity and saves nothing).
    Text tokens are never merged, pooled or pruned.
    """

    section = "tokens"
    ratio: float = spec(0.0, min=0.0, max=0.95, help="fraction of image/video tokens removed; 0 is off")
    method: str = spec("merge", choices=METHODS, help="merge, kv_downsample or prune")
    sx: int = spec(2, min=1, help="window width in tokens (one destination / one pooled key per window)")
    sy: int = spec(2, min=1, help="window height in tokens")
    st: int = spec(2, min=1, help="window length in frames (video DiTs)")
    use_rand: bool = spec(True, help="merge: random destination inside each window (else the first token)")
    max_downsample: int = spec(1, choices=(1, 2, 4, 8), help="UNets: deepest level merged (1: top resolution only)")
    merge_attn: bool = spec(True, help="BasicTransformerBlock: merge before self-attention")
    merge_crossattn: bool = spec(False, help="BasicTransformerBlock: merge before cross-attention")
    merge_mlp: bool = spec(False, help="BasicTransformerBlock: merge before the MLP")
    schedule: str = spec("constant", choices=SCHEDULES, help="ratio over steps: constant, linear or cosine")
    ratio_end: float = spec(0.0, min=0.0, max=0.95, help="ratio at the last step when schedule is not constant")
    refresh_interval: int = spec(3, min=1, help="prune: every Nth run of a block computes every token")
    skip_blocks: int = spec(0, min=0, help="DiTs: the first and last N blocks keep every token")
    seed: int = spec(0, min=0, help="seed of the random destinations (the pipeline's RNG is not touched)")
    match_per_block: bool = spec(False, help="merge/pool: match in every block from its own input (tomesd's "
                                               "way; more faithful, more matching work) instead of once per step")
    min_tokens: int = spec(0, min=0, help="calls with fewer image/video tokens (top resolution) keep every token")

    @property
    def enabled(self) -> bool:
        return self.ratio > 0 or (self.schedule != "constant" and self.ratio_end > 0)

    def validate(self) -> None:
        if not (self.merge_attn or self.merge_crossattn or self.merge_mlp):
            raise ConfigError("tokens.merge_attn: merge_attn, merge_crossattn and merge_mlp are all false, so "
                              "nothing would be merged; set at least merge_attn to true")
        if self.sx * self.sy * self.st < 2:
            raise ConfigError(f"tokens.sx: a {self.st}x{self.sy}x{self.sx} window holds one token; "
                              "make sx or sy at least 2")

    def ratio_at(self, step: int, total_steps: int | None) -> float:
        """The ratio in force at ``step`` (0-based) of ``total_steps``."""
        if self.schedule == "constant" or not total_steps or total_steps < 2:
            return self.ratio
        import math

        t = min(max(step / (total_steps - 1), 0.0), 1.0)
        w = t if self.schedule == "linear" else (1 - math.cos(math.pi * t)) / 2
        return self.ratio + (self.ratio_end - self.ratio) * w


# From benchmarks/bench_tokens.py, BENCHMARKS.md "## Token merging" (2-core CPU, heavily shared:
# speed-ups are +-15%; random weights with sharpened attention; PSNR of the denoiser's total
# update against the baseline's). Rule (`accel.presets`), per family group, over the rows of that table (UNets:
# the 1024 px table, where merging pays; DiTs: the 4096-token Wan-shaped table):
#   safe     = the highest-PSNR row that is at least 1.2x faster,
#   balanced = the fastest row at PSNR >= 35 dB,
#   fast     = the fastest row at PSNR >= 30 dB (= balanced: no faster row above 30 dB was measured).
# UNets (1024 px): merge 0.3 41.7 dB 1.26x; merge 0.5 38.6 dB 1.60x.
# Image DiTs: prune 0.5 43.6 dB 1.48x; prune 0.75 41.5 dB 1.84x; merge 0.5 35.4 dB 1.81x;
# merge 0.3 39.0 dB 1.37x; kv_downsample 0.75 33.9 dB 1.19x.
# Video DiTs: the same table without prune, whose per-block cache (input and update of every
# token, per CFG branch) is ~12 GB in bf16 for Wan 1.3B at 480p x 81 frames: merge only.
_UNETS = ("sd15", "sdxl", "animatediff")
_VIDEO_DITS = ("cogvideox", "wan", "ltx", "hunyuanvideo")


# Every preset leaves calls under 4096 image/video tokens whole (`min_tokens`): the smallest size
# measured to pay (SD1.5 at 512 px: 1.1-1.26x); on the trained 64 px reference models (256 and 64
# tokens) reduction gave no speed (0.95-1.17x) for 27-38 dB (BENCHMARKS.md "Reference models").
MIN_TOKENS = 4096


def _per_family(unet: dict, dit: dict, video_dit: dict) -> dict:
    # SDXL has no attention at the top level: its first attention level is 2x down
    table = {"*": dit, **{f: dict(unet) for f in _UNETS}, "sdxl": {**unet, "max_downsample": 2},
             **{f: dict(video_dit) for f in _VIDEO_DITS}}
    return {f: {**v, "min_tokens": MIN_TOKENS} for f, v in table.items()}


# safe leaves token reduction off where its sparse attention part runs (the two do not stack: attention/config.py
# has the end-to-end table that chose between them per preset)
_SPARSE_IN_SAFE = ("wan", "hunyuanvideo", "cogvideox")
PRESETS: dict = {
    "safe": {**_per_family({"ratio": 0.3}, {"ratio": 0.5, "method": "prune"}, {"ratio": 0.3}),
             **dict.fromkeys(_SPARSE_IN_SAFE)},
    "balanced": _per_family({"ratio": 0.5}, {"ratio": 0.75, "method": "prune"}, {"ratio": 0.5}),
    "fast": _per_family({"ratio": 0.5}, {"ratio": 0.75, "method": "prune"}, {"ratio": 0.5}),
}
