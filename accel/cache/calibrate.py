"""A step schedule calibrated on the model: which steps the block cache reuses, from how fast its blocks' work changes.

MagCache's observation, measured here on the model itself instead of shipped for one: the residual the
denoiser's blocks add (last block's output minus first block's input) changes between consecutive steps
by an amount that depends on the step far more than on the prompt. `record_changes` measures that
change per step (relative L1 against the previous step, averaged over a few calls and over the CFG
branches); `schedule` then reuses a step while the change accumulated since the last computed step
stays under ``error`` (and at most ``max_skip`` steps in a row), which is where a fixed interval spends
its reuses evenly whatever the model does. The result is ``cache.reuse_steps`` for the probe-free block
cache (``compute_first_n=0``): no block runs in a reused step and no host sync decides it.

    changes = record_changes(pipe, calls)                 # calls: keyword arguments of pipeline calls
    steps = schedule(changes, error=0.6, warmup=2)        # e.g. [3, 5, 7, 8, 10, ...]
    accel.apply(pipe, {"cache": {"method": "block", "compute_first_n": 0, "warmup_steps": 2,
                                 "reuse_steps": ",".join(map(str, steps))}})
"""

from __future__ import annotations

import torch

from ..families import Adapter, bind, block_io, denoisers_of, forward_params


def record_changes(pipe, calls: list[dict]) -> list[float]:
    """The mean relative change of the blocks' residual at each step (index 0: 0.0), over ``calls``.

    Args:
        pipe: a DiT pipeline, nothing applied.
        calls: keyword arguments of each call (each with its own ``generator`` if it needs one).

    Returns:
        One value per step of the calls (they must share the step count).
    """
    name, den = denoisers_of(pipe)[0]
    blocks = Adapter(den, name).blocks()
    if not blocks:
        raise ValueError(f"{type(den).__name__} has no transformer blocks to calibrate a block schedule on")
    first, last = blocks[0][1], blocks[-1][1]
    first_params, last_io = forward_params(type(first)), block_io(last)
    den_params = forward_params(type(den))
    state: dict = {}

    def on_denoiser(module, args, kwargs):
        t = bind(den_params, args, kwargs).get("timestep")
        t = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else t
        if t != state.get("t"):
            state.update(t=t, step=state.get("step", -1) + 1, index=0)
        else:
            state["index"] += 1

    def on_first(module, args, kwargs):
        state["in"] = bind(first_params, args, kwargs)["hidden_states"]

    def on_last(module, args, output):
        hidden = output[last_io[0]] if isinstance(output, tuple) else output
        residual = (hidden - state["in"]).float()
        key = state["index"]
        before = state["last"].get(key)
        if before is not None and before.shape == residual.shape:
            change = float((residual - before).abs().mean() / before.abs().mean().clamp_min(1e-12))
            sums = state["sums"]
            sums.setdefault(state["step"], []).append(change)
        state["last"][key] = residual

    handles = [den.register_forward_pre_hook(on_denoiser, with_kwargs=True),
               first.register_forward_pre_hook(on_first, with_kwargs=True), last.register_forward_hook(on_last)]
    sums: dict = {}
    steps = 0
    try:
        for kw in calls:
            state.clear()
            state.update(last={}, sums=sums)
            with torch.no_grad():
                pipe(**kw)
            steps = max(steps, state.get("step", -1) + 1)
    finally:
        for h in handles:
            h.remove()
    return [0.0] + [sum(sums.get(t, [0.0])) / max(len(sums.get(t, [])), 1) for t in range(1, steps)]


def schedule(changes: list[float], error: float, max_skip: int = 0, warmup: int = 2) -> list[int]:
    """The steps to reuse: after ``warmup`` computed steps, a step is reused while the change accumulated
    since the last computed step is under ``error`` and fewer than ``max_skip`` (0: any number) were
    reused in a row; a computed step starts the sum again."""
    reused, total, run = [], 0.0, 0
    for t in range(max(warmup, 1), len(changes)):
        total += changes[t]
        if total < error and (not max_skip or run < max_skip):
            reused.append(t)
            run += 1
        else:
            total, run = 0.0, 0
    return reused
