"""The sampler's registry record (`accel.technique.Technique`).

In no preset (a step count is a trade a user measures, with `accel tune`); `accel tune` searches it on an axis
of its own (`accel.eval.tune`) and writes its section; the web page takes it from ``accel app --config``.
"""

from ..technique import Technique
from .config import PRESETS, SolverConfig

TECHNIQUE = Technique(
    section="solver", config=SolverConfig, presets=PRESETS, module="accel.solver", order=-1,
    help="the scheduler and step count (DPM-Solver++, UniPC, a fitted OLSS scheduler)", tuned=True, web=False,
    paths=("olss",),
)
