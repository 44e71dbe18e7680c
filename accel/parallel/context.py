"""Per-pipeline parallel state: the process groups and where the denoising loop is.

Ranks are laid out as ``rank = c * inner + i``: ``c`` is the CFG branch (0 = unconditional,
1 = conditional), ``i`` the position along the token axis (a sequence shard or a row patch).
The step counters come from the denoiser's own ``timestep`` argument (a new value is a new step,
a larger value a new pipeline call) so they work without wrapping the scheduler, which
`accel.apply` may wrap too.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import StateManager

from .config import ParallelConfig
from .runtime import ParallelError, rank, world_size


class Groups:
    """The CFG group (same token shard, both branches) and the inner group (one branch, all shards).

    With ``replicas`` > 1 the world holds that many copies of the pipeline, each on
    ``cfg.world_size`` consecutive ranks running its own inputs (the batch driver's group of
    ranks per image); every group lies inside one copy, and ``replica_group`` spans a copy.
    """

    def __init__(self, cfg: ParallelConfig, replicas: int = 1):
        n, size = world_size(), cfg.world_size
        if n != size * replicas:
            copies = f"{replicas} copies x " if replicas > 1 else ""
            axis = next((a for a in ("sequence", "patch", "clip") if getattr(cfg, a) > 1), "token axis")
            raise ParallelError(
                f"parallel: world size {n} does not match the degrees ({copies}cfg={cfg.cfg} x "
                f"{axis}={cfg.inner} "
                f"= {size * replicas}); launch {size * replicas} processes (torchrun --nproc-per-node "
                f"{size * replicas}, or accel generate --gpus {size * replicas}) or change the degrees")
        self.rank = rank()
        self.size = size
        self.replica, self.local_rank = divmod(self.rank, size)
        self.cfg_degree, self.inner_degree = cfg.cfg, cfg.inner
        self.cfg_index, self.inner_index = divmod(self.local_rank, cfg.inner)
        self.cfg_group = self.inner_group = self.replica_group = None
        # new_group is collective: every rank creates every group (of every copy), in the same order.
        # Each gets the config's collective timeout (torch would give new groups its own default,
        # 30 min for gloo, and a dead rank would hang the others that long).
        timeout = datetime.timedelta(seconds=cfg.timeout_s)
        for base in range(0, n, size):
            for i in range(cfg.inner):
                ranks = [base + c * cfg.inner + i for c in range(cfg.cfg)]
                g = dist.new_group(ranks, timeout=timeout) if cfg.cfg > 1 else None
                if self.rank in ranks:
                    self.cfg_group = g
            for c in range(cfg.cfg):
                ranks = [base + c * cfg.inner + i for i in range(cfg.inner)]
                g = dist.new_group(ranks, timeout=timeout) if cfg.inner > 1 else None
                if self.rank in ranks:
                    self.inner_group = g
            if replicas > 1 and size > 1:
                ranks = list(range(base, base + size))
                g = dist.new_group(ranks, timeout=timeout)
                if self.rank in ranks:
                    self.replica_group = g


class _ContextSpy(StateManager):
    """Receives the pipeline's ``cache_context("cond"/"uncond")`` name through diffusers' hook machinery."""

    def __init__(self):
        self.name = None

    def set_context(self, context):
        self.name = getattr(context, "name", context)


@dataclass
class LoopState:
    call: int = 0
    step: int = -1
    call_in_step: int = 0
    timestep: float | None = None
    branch: str | None = None  # the cache_context name of this forward, if the pipeline gave one
    text_len: int = 0
    real_len: int = 0  # tokens along the sharded axis before padding
    pad_len: int = 0  # tokens along the sharded axis after padding (a multiple of the degree)
    listeners: list = field(default_factory=list)


class StepHook(ModelHook):
    """Innermost parallel hook on the denoiser: keeps `LoopState` current."""

    _is_stateful = True

    def __init__(self, state: LoopState):
        super().__init__()
        self.state = state
        self.spy = _ContextSpy()

    def pre_forward(self, module, *args, **kwargs):
        from ..families import bind_inputs

        s = self.state
        inputs = bind_inputs(module, args, kwargs)
        t = inputs.get("timestep")
        t = float(t.flatten()[0]) if isinstance(t, torch.Tensor) and t.numel() else (None if t is None else float(t))
        if s.timestep is None or (t is not None and t > s.timestep) or s.call == 0:
            s.call += 1
            s.step, s.call_in_step = 0, 0
            for fn in s.listeners:
                fn()
        elif t != s.timestep:
            s.step += 1
            s.call_in_step = 0
        else:
            s.call_in_step += 1
        s.timestep = t
        s.branch = self.spy.name
        ehs = inputs.get("encoder_hidden_states")
        s.text_len = int(ehs.shape[1]) if isinstance(ehs, torch.Tensor) and ehs.ndim == 3 else 0
        return args, kwargs

    def reset_state(self, module):
        return module
