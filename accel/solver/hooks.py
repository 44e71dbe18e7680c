"""Installing a `SolverConfig` on a pipeline: the scheduler swapped (put back by `accel.remove`), the step count
given to every call through the loop observer's ``on_call_args``."""

from __future__ import annotations

from pathlib import Path

from ..config_base import ConfigError
from .config import SolverConfig
from .schedulers import build, takes_steps


class SolverHandle:
    def __init__(self, target, cfg: SolverConfig):
        pipe = target.pipe
        self.cfg = cfg
        self.pipe = pipe
        self.original = pipe.scheduler
        self.scheduler = self._scheduler(cfg, pipe.scheduler)
        self.steps = cfg.steps or (self.scheduler.num_inference_steps if cfg.scheduler == "olss" else 0)
        if cfg.scheduler == "olss" and cfg.steps and cfg.steps != self.scheduler.num_inference_steps:
            raise ConfigError(f"solver.steps: {cfg.steps}, but the OLSS scheduler in {cfg.olss!r} was fitted for "
                              f"{self.scheduler.num_inference_steps} steps; set solver.steps to that or 0")
        self.asked = None  # the step count the last call asked for
        if self.scheduler is not self.original:
            pipe.scheduler = self.scheduler
            target.ledger.on_undo(lambda: setattr(pipe, "scheduler", self.original))
        target.tracker.on_call_args(self._call_args)

    @staticmethod
    def _scheduler(cfg: SolverConfig, base):
        if not cfg.scheduler:
            return base
        if cfg.scheduler == "olss":
            from .olss import OLSSScheduler

            folder = Path(cfg.olss)
            if not (folder / OLSSScheduler.config_name).is_file():
                raise ConfigError(f"solver.olss: {cfg.olss!r} holds no {OLSSScheduler.config_name}; give the folder "
                                  "accel tune wrote beside the tuned config")
            return OLSSScheduler.from_pretrained(folder)
        try:
            return build(cfg.scheduler, base)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def _call_args(self, args: dict) -> dict:
        self.asked = args.get("num_inference_steps")
        return {"num_inference_steps": self.steps} if self.steps else {}

    def stats(self) -> dict:
        return {"scheduler": type(self.scheduler).__name__, "steps": self.steps or self.asked,
                "asked_steps": self.asked, "changed": self.scheduler is not self.original
                or bool(self.steps and self.asked != self.steps)}


def apply_technique(target, cfg: SolverConfig) -> SolverHandle:
    if target.pipe is None:
        raise ConfigError("solver: the scheduler and step count belong to a pipeline; apply the config to the "
                          "pipeline, not to its denoiser")
    why = takes_steps(target.pipe)
    if why:
        raise ConfigError(f"solver: {why}; leave the solver section out for this pipeline")
    return SolverHandle(target, cfg)
