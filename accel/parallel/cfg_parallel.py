"""CFG parallelism: the conditional and unconditional branches run on different ranks.

Two pipeline styles, both exact:

- **batched** (SD, SDXL, SD3, PixArt, CogVideoX, LTX): the denoiser gets ``[uncond, cond]``
  concatenated on the batch axis. Each CFG rank keeps its half of every batch-sized input
  (rank 0 the unconditional half), and one all-gather per step rebuilds the full prediction.
- **two calls** (Wan, Flux true-CFG, HunyuanVideo): the pipeline calls the denoiser once per
  branch inside ``cache_context("cond")`` / ``("uncond")``. At the first call of a step the rank
  that owns the second branch returns a placeholder of the right shape without computing; at the
  second call the ranks exchange their predictions with one all-gather and the placeholder is
  filled in place, before the pipeline combines the two (pipelines only read the first result
  after the second call). The first step of every pipeline call runs the first branch on both
  ranks, which also learns whether this call has a second branch at all and the output shape.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from diffusers.hooks import ModelHook

from .context import Groups, LoopState
from .runtime import _guard

HOOK_NAME = "accel.parallel.cfg"
# Inputs that are per-token tables, never per-sample, even when their first size equals the batch.
_NOT_BATCHED = ("img_ids", "txt_ids", "image_rotary_emb", "rotary_emb", "freqs_cis")


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        return out[0]
    return out[next(iter(out.keys()))]  # diffusers BaseOutput (sample=...)


def _with_first(out, tensor):
    if isinstance(out, torch.Tensor):
        return tensor
    if isinstance(out, tuple):
        return (tensor, *out[1:])
    fields = dict(out.items())
    fields[next(iter(out.keys()))] = tensor
    return type(out)(**fields)


def _slice_batch(value, batch: int, half: int, name: str = ""):
    if name in _NOT_BATCHED:
        return value
    if isinstance(value, torch.Tensor):
        if value.ndim >= 1 and value.shape[0] == batch:
            n = batch // 2
            return value[half * n:(half + 1) * n]
        return value
    if isinstance(value, dict):
        return {k: _slice_batch(v, batch, half, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_slice_batch(v, batch, half) for v in value)
    return value


class CFGParallelHook(ModelHook):
    def __init__(self, pipe, groups: Groups, state: LoopState):
        super().__init__()
        self.pipe = pipe
        self.groups = groups
        self.state = state
        self.bytes = 0
        self.gathers = 0
        self._reset()
        state.on_call_start(self._reset)

    def _reset(self):
        self.two_calls = False  # learned at the first step of each pipeline call
        self.pending = None  # rank 0's placeholder for the first branch
        self.first_out = None  # rank 1's first-branch prediction, until the exchange
        self.form = None  # an output of the denoiser, to build placeholders of the same form

    def _batched(self, module, args, kwargs) -> int:
        from ..families import bind_inputs

        if self.state.branch in ("cond", "uncond") or self.pipe is None:
            return 0
        cfg_on = getattr(self.pipe, "do_classifier_free_guidance", None)
        if cfg_on is None:  # pipelines that keep it in a local variable (CogVideoX, PixArt) keep the scale
            cfg_on = getattr(self.pipe, "_guidance_scale", 1.0) > 1.0
        if not cfg_on:
            return 0
        inputs = bind_inputs(module, args, kwargs)
        x = inputs.get("sample", inputs.get("hidden_states"))
        return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.shape[0] % 2 == 0 else 0

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(self.groups.cfg_degree)]
        _guard(lambda: dist.all_gather(parts, local, group=self.groups.cfg_group), "CFG all-gather")
        self.bytes += local.numel() * local.element_size() * (self.groups.cfg_degree - 1)
        self.gathers += 1
        return torch.cat(parts, 0)

    def new_forward(self, module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        batch = self._batched(module, args, kwargs)
        me = self.groups.cfg_index
        if batch:
            from ..families import forward_params

            names = forward_params(type(module))
            args = tuple(_slice_batch(a, batch, me, names[i] if i < len(names) else "") for i, a in enumerate(args))
            kwargs = {k: _slice_batch(v, batch, me, k) for k, v in kwargs.items()}
            out = forward(*args, **kwargs)
            return _with_first(out, self._gather(_first_tensor(out)))
        if self.state.branch not in ("cond", "uncond"):
            return forward(*args, **kwargs)  # no CFG in this call: every rank computes it
        return self._two_calls(forward, args, kwargs)

    def _two_calls(self, forward, args, kwargs):
        s, me = self.state, self.groups.cfg_index
        if s.call_in_step == 0:
            if self.two_calls and (self.pending is not None or self.first_out is not None):
                raise RuntimeError("CFG parallel: a step ended without its second branch; this pipeline "
                                   "changes its CFG pattern mid-call, use cfg=1 for it")
            if self.two_calls and me == 0:
                placeholder = torch.empty_like(_first_tensor(self.form))
                self.pending = placeholder
                return _with_first(self.form, placeholder)
            self.pending = None
            out = forward(*args, **kwargs)
            self.form = out
            self.first_out = _first_tensor(out) if me == 1 else None
            return out
        if s.call_in_step != 1:
            return forward(*args, **kwargs)
        self.two_calls = True
        if me == 0:
            out = forward(*args, **kwargs)
            both = self._gather(_first_tensor(out))  # [second branch (ours), first branch (rank 1's)]
            n = both.shape[0] // 2
            if self.pending is not None:
                self.pending.copy_(both[n:])
                self.pending = None
            return out
        local = self.first_out
        self.first_out = None
        both = self._gather(local)
        n = both.shape[0] // 2
        return _with_first(self.form, both[:n].clone())

    def stats(self) -> dict:
        return {"cfg_gathers": self.gathers, "cfg_bytes": self.bytes}
