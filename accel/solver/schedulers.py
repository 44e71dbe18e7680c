"""The solvers by name, each built from the pipeline's own scheduler config (noise schedule, prediction type,
shift), and which of them a scheduler's model can take.

A noise-prediction or v-prediction model (SD1.5, SDXL, PixArt: ``prediction_type`` epsilon or v_prediction)
takes ``ddim``, ``dpm++2m``, ``unipc`` and ``euler``; a flow-matching model (Flux, SD3, Wan, LTX, HunyuanVideo,
CogVideoX's flow variants: a ``FlowMatch*`` scheduler or ``prediction_type`` flow_prediction) takes
``flow-euler``, ``flow-unipc`` and ``flow-dpm++2m``. A pipeline that hands its scheduler ``sigmas`` (Flux, SD3)
takes only the solvers whose ``set_timesteps`` accepts them; `accel tune` tries each and lists the ones a
pipeline refuses with the reason.
"""

from __future__ import annotations

import inspect

DIFFUSION = ("ddim", "dpm++2m", "unipc", "euler")
FLOW = ("flow-euler", "flow-unipc", "flow-dpm++2m")


def is_flow(scheduler) -> bool:
    """Whether ``scheduler`` belongs to a flow-matching model."""
    config = dict(getattr(scheduler, "config", {}) or {})
    return type(scheduler).__name__.startswith("FlowMatch") or config.get("prediction_type") == "flow_prediction" \
        or bool(config.get("use_flow_sigmas"))


def candidates(scheduler) -> tuple[str, ...]:
    """The solver names for the model ``scheduler`` belongs to (`is_flow`)."""
    return FLOW if is_flow(scheduler) else DIFFUSION


def _flow_shift(config: dict) -> float:
    return float(config.get("shift") or config.get("flow_shift") or 1.0)


def build(name: str, base):
    """The scheduler ``name`` for the model whose scheduler is ``base`` (its config carried over).

    Raises:
        ValueError: ``name`` is not for this kind of model (a flow solver for a noise-prediction model, or
            the reverse), with the names that are.
    """
    import diffusers

    if name not in candidates(base):
        kind = "flow-matching" if is_flow(base) else "noise- or v-prediction"
        raise ValueError(f"solver.scheduler {name!r} is not for a {kind} model ({type(base).__name__}); "
                         f"use one of {', '.join(candidates(base))}")
    config = dict(base.config)
    if name == "ddim":  # DDIM clips its x0 estimate to [-1, 1] unless told: latents are not in that range
        return diffusers.DDIMScheduler.from_config(config, clip_sample=config.get("clip_sample", False))
    if name == "dpm++2m":
        return diffusers.DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    if name == "unipc":
        return diffusers.UniPCMultistepScheduler.from_config(config)
    if name == "euler":
        return diffusers.EulerDiscreteScheduler.from_config(config)
    if name == "flow-euler":
        if type(base).__name__ == "FlowMatchEulerDiscreteScheduler":
            return diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
        return diffusers.FlowMatchEulerDiscreteScheduler.from_config(config, shift=_flow_shift(config))
    flow = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": _flow_shift(config)}
    if name == "flow-unipc":
        return diffusers.UniPCMultistepScheduler.from_config(config, **flow)
    return diffusers.DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
                                                             **flow)


def takes_steps(pipe) -> str | None:
    """Why ``pipe``'s step count and scheduler cannot be changed (None: they can)."""
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None or not callable(getattr(scheduler, "set_timesteps", None)):
        return f"{type(pipe).__name__} has no scheduler with set_timesteps"
    if "num_inference_steps" not in inspect.signature(type(pipe).__call__).parameters:
        return f"{type(pipe).__name__}'s call takes no num_inference_steps"
    return None
