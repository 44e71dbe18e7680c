"""`SolverConfig`: the scheduler and the step count a pipeline runs with."""

from __future__ import annotations

from dataclasses import dataclass

from ..config_base import ConfigBase, ConfigError, spec

# The solvers by name (`accel.solver.schedulers` builds them); "olss" is a scheduler fitted to the model.
NAMES = ("ddim", "dpm++2m", "unipc", "euler", "flow-euler", "flow-unipc", "flow-dpm++2m", "olss")


@dataclass(frozen=True)
class SolverConfig(ConfigBase):
    """The sampler: which scheduler runs the loop and for how many steps.

    Important: ``steps`` (the step count every call runs, whatever it asks; 0 keeps the call's) and
    ``scheduler`` (a solver built from the pipeline's own scheduler config, so its noise schedule and
    prediction type carry over; empty keeps the pipeline's). ``olss``: the folder of a scheduler fitted to
    this model by `accel tune` (OLSS); a relative path in a config file is read from that file's folder.
    `accel.remove` puts the pipeline's scheduler back.
    """

    section = "solver"
    scheduler: str = spec("", help=f"solver: {', '.join(NAMES)}; empty keeps the pipeline's scheduler")
    steps: int = spec(0, min=0, help="denoising steps of every call; 0 keeps the call's own")
    olss: str = spec("", help="folder of a fitted OLSS scheduler (scheduler: olss), as accel tune writes it")

    @property
    def enabled(self) -> bool:
        return bool(self.scheduler or self.steps)

    def validate(self) -> None:
        if self.scheduler and self.scheduler not in NAMES:
            raise ConfigError(f"solver.scheduler: {self.scheduler!r}; choose one of {', '.join(NAMES)} "
                              "(or leave it empty to keep the pipeline's)")
        if self.scheduler == "olss" and not self.olss:
            raise ConfigError("solver.olss: empty; scheduler olss needs the folder accel tune wrote "
                              "(solver.olss: tuned.olss)")
        if self.olss and self.scheduler != "olss":
            raise ConfigError(f"solver.olss: given with scheduler {self.scheduler!r}; set solver.scheduler: olss "
                              "or drop solver.olss")


PRESETS: dict = {}  # no preset changes the sampler: a step count is the user's trade, measured by accel tune
