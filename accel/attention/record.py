"""Sparse attention's registry record (`accel.technique.Technique`)."""

from ..technique import Knob, Technique
from .config import PRESETS, AttentionConfig

# the patterns a sweep tries, each its own knob: the fraction of attention blocks computed
SWEPT_PATTERNS = ("tile", "radial", "spatial_temporal")

TECHNIQUE = Technique(
    section="attention", config=AttentionConfig, presets=PRESETS, module="accel.attention", order=1,
    help="sparse attention",
    sweep=tuple(Knob("density", (0.5, 0.25, 0.1), "attention {pattern} {density:g}",
                     fixed={"pattern": p, "min_tokens": 0}, kinds=("dit",), video_only=True, group=f"attention:{p}")
                for p in SWEPT_PATTERNS),
    tuned=True,
)
