"""Per-pipeline parallel state: the process groups and where the denoising loop is.

Ranks are laid out as ``rank = c * inner + i``: ``c`` is the CFG branch (0 = unconditional,
1 = conditional), ``i`` the position inside the branch (a sequence shard, a row patch, a clip or a component).
Where the loop is (the denoiser's step, the forward's index within the step, the CFG branch the
pipeline named) comes from the loop observer (`accel.loop`), which every technique shares.
"""

from __future__ import annotations

import datetime
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..loop import LoopView
from .config import ParallelConfig
from .runtime import ParallelError, _guard, rank, world_size


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
            axis = next((a for a in ("sequence", "patch", "clip", "components") if getattr(cfg, a) > 1), "token axis")
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

    def decide(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` of this copy's first rank (the one that writes files), on every rank of the copy.

        The first rank sends its error instead when ``fn`` raises, so the others raise too rather than
        wait for a result that never comes.
        """
        first = self.replica * self.size
        error = None
        box = [None]
        if self.rank == first:
            try:
                box = [("ok", fn())]
            except Exception as e:  # noqa: BLE001 - re-raised below, after the others are told
                error, box = e, [("error", f"{type(e).__name__}: {e}")]
        _guard(lambda: dist.broadcast_object_list(box, src=first, group=self.replica_group),
               "broadcast of a decision")
        if error is not None:
            raise error
        status, value = box[0]
        if status == "error":
            raise ParallelError(f"rank {self.rank}: rank {first} failed to take a decision for the group: {value}")
        return value


class LoopState:
    """What the parallel hooks of one denoiser read about the loop.

    ``step`` (this denoiser's step within the call, 0-based), ``call_in_step`` (forwards already made
    in this step) and ``branch`` ("cond"/"uncond" when the pipeline named the forward's branch, else
    None) are the observer's; ``text_len`` is the forward's text length (``encoder_hidden_states``),
    and ``real_len`` / ``pad_len`` the sharded axis's length before and after padding, set by the
    sharding hooks. Without a view (the VAE's decode), the loop reads as step 0 of a plain call.
    """

    def __init__(self, view: LoopView | None = None, module: torch.nn.Module | None = None):
        self.view = view
        self.text_len = 0
        self.real_len = 0  # tokens along the sharded axis before padding
        self.pad_len = 0  # tokens along the sharded axis after padding (a multiple of the degree)
        if view is not None:
            def read_text(state, adapter, inputs):
                if adapter.module is module:
                    ehs = inputs.get("encoder_hidden_states")
                    self.text_len = int(ehs.shape[1]) if isinstance(ehs, torch.Tensor) and ehs.ndim == 3 else 0

            view.on_forward(read_text)

    @property
    def step(self) -> int:
        return self.view.state.component_step if self.view is not None else 0

    @property
    def call_in_step(self) -> int:
        return self.view.state.call_in_step if self.view is not None else 0

    @property
    def branch(self) -> str | None:
        branch = self.view.state.branch if self.view is not None else None
        return branch if branch in ("cond", "uncond") else None

    def on_call_start(self, fn: Callable[[], None]) -> None:
        """``fn()`` at the start of each pipeline call's loop."""
        if self.view is not None:
            self.view.on_call_start(lambda _state: fn())
