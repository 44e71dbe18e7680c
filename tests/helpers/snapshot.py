"""What `accel.remove` must put back: every instance attribute, processor and hook of a pipeline."""

import numpy as np
import torch

from accel.pipelines import tiny
from accel.pipelines.call import to_frames


def state_of(pipe) -> dict:
    """A comparable description of everything apply could touch (identities, not just values)."""
    out = {"pipe": _dict_view(pipe)}
    sched = getattr(pipe, "scheduler", None)
    if sched is not None:
        out["scheduler"] = _dict_view(sched)
    for name in ("unet", "transformer", "transformer_2"):
        m = getattr(pipe, name, None)
        if isinstance(m, torch.nn.Module):
            out[name] = {n: (_dict_view(sub), id(getattr(sub, "processor", None)))
                         for n, sub in m.named_modules()}
    return out


def _dict_view(obj) -> tuple:
    # Values a pipeline call itself replaces (timesteps, step index) are compared by key only;
    # callables and modules by identity, so a leftover wrapper or hook shows.
    return tuple(sorted((k, id(v) if callable(v) or isinstance(v, torch.nn.Module) else None)
                        for k, v in vars(obj).items() if not k.startswith("_progress_bar")))


def run(pipe, name, **overrides) -> np.ndarray:
    return to_frames(pipe(**tiny.example_inputs(name, **overrides)))
