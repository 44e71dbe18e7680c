"""The step cache's registry record (`accel.technique.Technique`)."""

from ..technique import Knob, Technique
from .config import PRESETS, CacheConfig

_DIT = {"method": "block", "warmup_steps": 2}  # as every DiT preset row: 2 full warm-up steps

TECHNIQUE = Technique(
    section="cache", config=CacheConfig, presets=PRESETS, module="accel.cache", order=3, help="step caching",
    sweep=(
        # UNets: DeepCache's interval (a full UNet every N steps)
        Knob("interval", (2, 3, 4, 5, 6, 8, 10), "cache deepcache interval {interval:g}",
             fixed={"method": "deepcache", "schedule": "uniform"}, kinds=("unet",)),
        # DiTs: the block cache's change threshold (reuse while the first block's output moved less than
        # this); `accel tune` reads the thresholds off the user's prompts instead
        Knob("threshold", (0.05, 0.1, 0.2, 0.3), "cache block threshold {threshold:g}", fixed=_DIT,
             kinds=("dit",), calibrated=True),
        Knob("interval", (2, 3), "cache block interval {interval:g}", fixed=_DIT, kinds=("dit",),
             group="cache:interval"),
    ),
    tuned=True,
)
