"""Token reduction's registry record (`accel.technique.Technique`)."""

from ..technique import Knob, Technique
from .config import PRESETS, TokenConfig

TECHNIQUE = Technique(
    section="tokens", config=TokenConfig, presets=PRESETS, module="accel.tokens", order=2,
    help="token merging / pruning",
    # the fraction of tokens removed, with the family's own method (merge for UNets and video DiTs, prune
    # for image DiTs) and UNet depth, as its presets set them
    sweep=(Knob("ratio", (0.3, 0.5, 0.7), "tokens {method} {ratio:g}", fixed={"min_tokens": 0},
                from_preset=("method", "max_downsample")),),
    tuned=True,
)
