"""The approximate cache's registry record (`accel.technique.Technique`).

It is in no preset and no sweep (it needs a folder, and it makes outputs depend on earlier calls), and the
web page has no knobs for it: its folder is the server's (``accel app --approx-cache DIR``).
"""

from ..technique import Technique
from .config import PRESETS, ApproxCacheConfig

TECHNIQUE = Technique(
    section="approx", config=ApproxCacheConfig, presets=PRESETS, module="accel.approx", order=0,
    help="approximate caching across calls (NIRVANA): start from a similar prompt", web=False,
)
