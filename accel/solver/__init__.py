"""The sampler: which scheduler runs the denoising loop and for how many steps (DDIM, DPM-Solver++, UniPC, Euler,
the flow-matching solvers, or an OLSS scheduler fitted to the model). Configured by `accel.SolverConfig`
(``config.py``); ``schedulers.py`` names the solvers; ``olss.py`` is the fitted scheduler and its fit;
``hooks.py`` installs a choice on a pipeline. Imports are lazy, so reading the config does not load torch.
"""

from .._lazy import lazy

_EXPORTS = {"SolverConfig": ".config", "PRESETS": ".config", "apply_technique": ".hooks",
            **dict.fromkeys(("OLSSScheduler", "Trajectories", "fit_olss", "record_trajectories", "refit_olss"),
                            ".olss"),
            "SCHEDULERS": ".schedulers", "build": ".schedulers", "candidates": ".schedulers",
            "is_flow": ".schedulers"}
__getattr__, __dir__ = lazy(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
