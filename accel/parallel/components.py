"""AsyncDiff: the denoiser cut into sequential components, one per rank, all running at once.

The denoiser's stages (`accel.families.Adapter.stages`: DiT blocks; a UNet's ``conv_in``, its blocks'
resnets, attentions and resamplers, and its mid block) are cut at stage boundaries into
``components`` contiguous parts of equal measured cost; rank ``k`` of a CFG branch owns part ``k``.
Each denoiser forward then runs on every rank, but a rank computes only its own stages:

- the stages before its part return the *hand-over* it received from rank ``k - 1`` at the
  previous step (the output of that part's last stage, plus, in a UNet, the skip connections its
  later stages read); every other stage returns a zero placeholder of the recorded shape;
- after its part, the rank sends its own hand-over to rank ``k + 1`` without waiting
  (``isend``; it is used one step later, so the transfer overlaps the next step's work) and posts
  the receive of the next one;
- the last rank's output is the step's prediction: one broadcast gives it to every rank, so every
  rank steps the scheduler to the same latent.

So at each step all parts compute at once, part ``k`` on features ``k`` steps old: lossy, and the
first ``warmup_steps`` (at least one) run the whole denoiser on every rank, which is exact. The
split is measured, not guessed: a call with new input shapes times every stage in its first two
steps (on CUDA with synchronisation; the lesser of the two, since the first holds one-time costs),
the branch's first rank cuts the costs into parts minimising the largest and broadcasts the cut,
which is kept for later calls of the same shapes; that call runs at least three synchronous
steps, so that the last leaves every rank the hand-over it needs.

``component_stride`` S > 1: the parts run and hand over at every S-th step after the warm-up, and the
steps between return the last prediction (less communication and compute, more loss).

Composes with ``cfg=2`` (each branch has its own components). The step cache is refused: its reuse
decisions would differ between ranks that see different features, and the hand-overs already
reuse the previous step's features. Token techniques act inside the stages a rank computes.
"""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.distributed as dist
from diffusers.hooks import ModelHook
from torch.utils import _pytree as pytree

from ..config_base import ConfigError
from ..families import Adapter, bind, bind_inputs, block_io, forward_params
from .cfg_parallel import _first_tensor, _with_first
from .context import Groups, LoopState
from .runtime import ParallelError, _guard

STAGE_HOOK = "accel.parallel.component"
MEASURED_STEPS = 2  # synchronous steps a new input size times its stages in
DENOISER_HOOK = "accel.parallel.components"
UNSUPPORTED = {"animatediff": "its motion modules are untested with a split; use cfg=2 or patch="}
# Hooks of techniques that decide per rank what to skip; they cannot run inside a component split.
_REFUSED_HOOKS = {"accel.cache": "the step cache", "first_block_cache": "diffusers' FirstBlockCache",
                  "mag_cache": "diffusers' MagCache", "taylorseer": "diffusers' TaylorSeer cache",
                  "pyramid_attention_broadcast": "diffusers' PAB", "faster_cache": "diffusers' FasterCache"}
_STREAMS = ("hidden_states", "encoder_hidden_states")  # a DiT block's image and text streams, in block_io order
# Measured splits, per denoiser: (components, CFG branch, input shapes) -> owner of each stage. Kept outside
# the module (nothing on it changes) and across `parallelize` calls, so a re-parallelized pipeline does
# not measure again; every rank of a branch sees the same calls, so they hold the same entries.
_SPLITS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def check_components(adapter: Adapter, n: int) -> None:
    """ConfigError if ``adapter``'s denoiser cannot be cut into ``n`` components."""
    fam = adapter.family
    if fam.name in UNSUPPORTED:
        raise ConfigError(f"parallel.components: {n} is not available for {fam.name}: {UNSUPPORTED[fam.name]}")
    stages = len(adapter.stages())
    if n > stages:
        what = "blocks" if fam.kind == "dit" else "stages (conv_in, the blocks' resnets, attentions and resamplers)"
        raise ConfigError(f"parallel.components: {n} is more than the {stages} {what} of {fam.name}'s "
                          f"{type(adapter.module).__name__}; use at most {stages}")


def split(costs: list[float], n: int) -> list[int]:
    """The owner (0..n-1) of each stage: ``n`` contiguous non-empty parts, the largest part's cost least."""
    m = len(costs)
    if not 1 <= n <= m:
        raise ValueError(f"cannot cut {m} stages into {n} parts")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + max(float(c), 0.0))
    inf = float("inf")
    best = [[inf] * (m + 1) for _ in range(n + 1)]  # best[j][i]: first i stages in j parts
    cut = [[0] * (m + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for j in range(1, n + 1):
        for i in range(j, m - (n - j) + 1):
            for s in range(j - 1, i):  # the last part is stages s..i-1
                v = max(best[j - 1][s], prefix[i] - prefix[s])
                if v < best[j][i]:
                    best[j][i], cut[j][i] = v, s
    owner, i = [0] * m, m
    for j in range(n, 0, -1):
        s = cut[j][i]
        owner[s:i] = [j - 1] * (i - s)
        i = s
    return owner


class _Leaf(NamedTuple):
    """A tensor in a recorded stage output: what a placeholder or a received buffer is shaped from."""

    shape: tuple
    dtype: torch.dtype
    device: torch.device


@dataclass
class _Slot:
    """State of one forward index within a step (two-call CFG pipelines have two)."""

    specs: dict = field(default_factory=dict)  # stage -> (treespec, [_Leaf or a constant leaf])
    inbox: dict = field(default_factory=dict)  # stage -> output handed over to this rank
    outbox: dict = field(default_factory=dict)  # stage -> this step's output to hand over
    recv: list | None = None  # [(work, buffer)] of the next hand-over
    prev: dict | None = None  # dtype -> the previous hand-over as received (extrapolation)
    embedded: dict | None = None  # residual: this forward's input streams of the first stage
    embedded_before: dict | None = None  # ... of the forward whose features the hand-over holds
    residual: dict | None = None  # the last hand-over's streams minus the input they were computed from
    last: tuple | None = None  # (denoiser output, prediction) for the stride's reuse steps


class _StageHook(ModelHook):
    def __init__(self, plan: "Components", index: int):
        super().__init__()
        self.plan, self.index = plan, index

    def new_forward(self, module, *args, **kwargs):
        return self.plan.stage(self.index, self.fn_ref.original_forward, args, kwargs)


class _DenoiserHook(ModelHook):
    def __init__(self, plan: "Components"):
        super().__init__()
        self.plan = plan

    def new_forward(self, module, *args, **kwargs):
        return self.plan.forward(module, self.fn_ref.original_forward, args, kwargs)


class Components:
    """The component split of one denoiser on one rank, and the hand-overs between ranks."""

    def __init__(self, adapter: Adapter, groups: Groups, state: LoopState, cfg, stats: dict):
        self.adapter, self.groups, self.state, self.stats = adapter, groups, state, stats
        self.stages = adapter.stages()
        self.skip = [s for _, _, s in self.stages]
        self.n, self.k = cfg.components, groups.inner_index
        self.warmup, self.stride = max(1, cfg.warmup_steps), cfg.component_stride
        self.correction = correction_for(adapter, cfg.component_correction)
        self.extrapolate = self.correction == "extrapolate"
        self.residual = self.correction.startswith("residual")
        first = groups.replica * groups.size + groups.cfg_index * groups.inner_degree
        self.first, self.last = first, first + self.n - 1
        self.prev = groups.rank - 1 if self.k > 0 else None
        self.next = groups.rank + 1 if self.k < self.n - 1 else None
        self.splits = _SPLITS.setdefault(adapter.module, {})
        self._reset()
        state.on_call_start(self._reset)

    def install(self, ledger) -> None:
        for i, (_, module, _) in enumerate(self.stages):
            ledger.add_hook(module, _StageHook(self, i), STAGE_HOOK)
        ledger.add_hook(self.adapter.module, _DenoiserHook(self), DENOISER_HOOK)

    # --- per call ---------------------------------------------------------------------------------
    def _reset(self) -> None:
        for slot in getattr(self, "slots", {}).values():  # a hand-over posted for a step that never came
            for work, _ in slot.recv or ():
                _guard(work.wait, "component hand-over")
        for work in getattr(self, "sends", ()):
            _guard(work.wait, "component hand-over")
        self.slots: dict[int, _Slot] = {}
        self.sends: list = []
        self.owner = None
        self.signature = None
        self.sync_steps = self.warmup
        self.times: dict[int, dict] = {}  # stage -> (step, forward in step) -> seconds
        self.mode = None  # "full" (every stage), "async" (this rank's part), None (outside our forward)
        self.slot: _Slot | None = None
        self.measure = self.keep = False
        self.blanks: dict = {}
        self._sets: dict = {}

    def _boundary_set(self, j: int) -> list[int]:
        """Stages whose outputs part ``j`` hands to part ``j + 1``: its last stage and earlier skip stages."""
        key = (id(self.owner), j)
        if key not in self._sets:
            last = max(i for i, o in enumerate(self.owner) if o == j)
            self._sets[key] = sorted({last} | {i for i in range(last) if self.skip[i]})
        return self._sets[key]

    def _start(self, module, args, kwargs) -> None:
        for m in (module, *(s for _, s, _ in self.stages)):
            reg = m.__dict__.get("_diffusers_hook")
            for name in getattr(reg, "hooks", {}) if reg is not None else ():
                label = next((v for p, v in _REFUSED_HOOKS.items() if name.startswith(p)), None)
                if label is not None:
                    raise ConfigError(f"parallel.components: {label} is on {type(module).__name__}; it cannot "
                                      "run inside a component split (its reuse decisions would differ between "
                                      "ranks, and the hand-overs already reuse the previous step's features). "
                                      "Turn it off (cache.method=none, or --preset off) or use cfg=2 / patch=")
        inputs = bind_inputs(module, args, kwargs)
        self.signature = (self.n, self.groups.cfg_index, *sorted(
            (k, tuple(v.shape), str(v.dtype)) for k, v in inputs.items() if isinstance(v, torch.Tensor)))
        known = self.splits.get(self.signature)
        self.owner = known[0] if known is not None else None
        if known is not None:
            self._describe(*known)
        # A new size times its stages in steps 0 and 1 (the least of each: step 0 holds first-call costs)
        # and needs one more synchronous step after them, whose outputs are the first hand-overs.
        self.sync_steps = self.warmup if self.owner is not None else max(self.warmup, MEASURED_STEPS + 1)

    def _decide(self) -> None:
        """The split from the first steps' stage times, taken on the branch's first rank and told to the others."""
        costs = []
        for i in range(len(self.stages)):  # per step: the sum over its forwards; the least step
            steps: dict = {}
            for (step, _), t in self.times.get(i, {}).items():
                steps[step] = steps.get(step, 0.0) + t
            costs.append(min(steps.values(), default=0.0))
        box = [(split(costs, self.n), costs) if self.groups.rank == self.first else None]
        _guard(lambda: dist.broadcast_object_list(box, src=self.first, group=self.groups.inner_group),
               "broadcast of the component split")
        self.splits[self.signature] = box[0]
        self.owner = box[0][0]
        self._describe(*box[0])

    def _describe(self, owner: list[int], costs: list[float]) -> None:
        parts, share = [], [0.0] * self.n
        for j in range(self.n):
            mine = [self.stages[i][0] for i, o in enumerate(owner) if o == j]
            parts.append(mine[0] if len(mine) == 1 else f"{mine[0]}..{mine[-1]}")
        for i, o in enumerate(owner):
            share[o] += costs[i]
        total = sum(share) or 1.0
        self.stats["component_split"] = parts
        self.stats["component_cost_share"] = [round(c / total, 3) for c in share]  # measured on the first rank
        self.stats["component_stage_ms"] = [round(c * 1e3, 3) for c in costs]

    # --- the denoiser forward -----------------------------------------------------------------------
    def forward(self, module, fn, args, kwargs):
        st = self.state
        step, index = st.step, st.call_in_step
        if self.signature is None:
            self._start(module, args, kwargs)
        slot = self.slots.setdefault(index, _Slot())
        self.slot = slot
        if step < self.sync_steps:
            if self.owner is None and step >= MEASURED_STEPS:
                self._decide()
            self.mode, self.measure = "full", self.owner is None
            self.keep = step == self.sync_steps - 1 and self.k > 0
            try:
                return fn(*args, **kwargs)
            finally:
                self.mode = None
                slot.embedded_before = slot.embedded
        if (step - self.sync_steps) % self.stride:
            out, pred = slot.last
            self.stats["component_reused_steps"] = self.stats.get("component_reused_steps", 0) + 1
            return _with_first(out, pred)
        t0 = time.perf_counter()
        if slot.recv is not None:
            self._receive(slot)
        elif self.extrapolate and self.k > 0 and slot.prev is None:  # the warm-up's hand-over, as if received
            slot.prev = {b.dtype: b for b in self._pack(self._leaves(slot, self._boundary_set(self.k - 1)))}
        slot.outbox = {}
        self.mode = "async"
        try:
            out = fn(*args, **kwargs)
        finally:
            self.mode = None
            slot.embedded_before = slot.embedded  # what the hand-over sent at this step was computed from
        total = self.state.view.state.total_steps if self.state.view is not None else None
        if total is None or step + self.stride < total:
            if self.next is not None:
                self._send(slot)
            if self.prev is not None:
                self._post_receive(slot)
        pred = self._broadcast(_first_tensor(out))
        slot.last = (out, pred)
        self.stats["component_async_steps"] = self.stats.get("component_async_steps", 0) + 1
        self.stats["component_async_s"] = self.stats.get("component_async_s", 0.0) + time.perf_counter() - t0
        return _with_first(out, pred)

    # --- one stage --------------------------------------------------------------------------------
    def stage(self, i: int, fn, args, kwargs):
        slot = self.slot
        if i == 0 and self.residual and self.k > 0 and self.mode is not None:
            slot.embedded = _streams_in(self.stages[0][1], args, kwargs)
        if self.mode == "full":
            if self.measure:
                out = self._timed(i, fn, args, kwargs)
            else:
                out = fn(*args, **kwargs)
            leaves, spec = pytree.tree_flatten(out)
            slot.specs[i] = (spec, [_Leaf(tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else x
                                    for x in leaves])
            if self.keep and i in self._boundary_set(self.k - 1):
                slot.inbox[i] = out
            return out
        if self.mode != "async":
            return fn(*args, **kwargs)
        if self.owner[i] == self.k:
            out = fn(*args, **kwargs)
            slot.outbox[i] = out
            return out
        if i in slot.inbox:
            if self.residual and i == self._boundary_set(self.k - 1)[-1]:
                return self._brought_forward(slot, i)
            return slot.inbox[i]
        return self._blank(slot, i)

    def _brought_forward(self, slot: _Slot, i: int):
        """A DiT hand-over at this step: this step's embedded input plus the stale residual (the blocks'
        contribution: the hand-over minus the input it was computed from), ``residual_extrapolate``: plus
        the residual's change since the hand-over before (one step ahead, first order)."""
        block, value = self.stages[i][1], slot.inbox[i]
        streams, before, now = _out_streams(block, value), slot.embedded_before or {}, slot.embedded or {}
        names = [n for n, t in streams.items()
                 if n in before and n in now and t.shape == before[n].shape == now[n].shape]
        if not names:
            return value
        residual = {n: streams[n] - before[n] for n in names}
        last = slot.residual or {}
        moved = {}
        for n in names:
            moved[n] = now[n] + residual[n]
            if self.correction == "residual_extrapolate" and n in last:
                moved[n] = moved[n] + (residual[n] - last[n])
        slot.residual = residual
        return _with_streams(block, value, moved)

    def _timed(self, i, fn, args, kwargs):
        cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in (*args, *kwargs.values()))
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        key = (self.state.step, self.state.call_in_step)
        self.times.setdefault(i, {})[key] = self.times.get(i, {}).get(key, 0.0) + time.perf_counter() - t0
        return out

    def _blank(self, slot: _Slot, i: int):
        spec, meta = slot.specs[i]
        leaves = []
        for m in meta:
            if isinstance(m, _Leaf):
                if m not in self.blanks:
                    self.blanks[m] = torch.zeros(m.shape, dtype=m.dtype, device=m.device)
                leaves.append(self.blanks[m])
            else:
                leaves.append(m)
        return pytree.tree_unflatten(leaves, spec)

    # --- hand-overs -------------------------------------------------------------------------------
    def _leaves(self, slot: _Slot, stages: list[int]) -> list[torch.Tensor]:
        out = []
        for i in stages:
            value = slot.outbox[i] if i in slot.outbox else slot.inbox[i]
            out += [x for x in pytree.tree_leaves(value) if isinstance(x, torch.Tensor)]
        return out

    @staticmethod
    def _pack(leaves: list[torch.Tensor]) -> list[torch.Tensor]:
        by_dtype: dict = {}
        for x in leaves:
            by_dtype.setdefault(x.dtype, []).append(x.reshape(-1))
        return [torch.cat(parts) for parts in by_dtype.values()]

    def _send(self, slot: _Slot) -> None:
        self.sends = [w for w in self.sends if not w.is_completed()]
        for buf in self._pack(self._leaves(slot, self._boundary_set(self.k))):
            self.sends.append(_guard(lambda b=buf: dist.isend(b, self.next, group=self.groups.inner_group),
                                     "component hand-over"))
            self._count("component_handover_bytes", buf)

    def _post_receive(self, slot: _Slot) -> None:
        metas = []
        for i in self._boundary_set(self.k - 1):
            metas += [m for m in slot.specs[i][1] if isinstance(m, _Leaf)]
        sizes: dict = {}
        for shape, dtype, device in metas:
            sizes[dtype] = (sizes.get(dtype, (0, device))[0] + math.prod(shape), device)
        slot.recv = []
        for dtype, (n, device) in sizes.items():
            buf = torch.empty(n, dtype=dtype, device=device)
            slot.recv.append((_guard(lambda b=buf: dist.irecv(b, self.prev, group=self.groups.inner_group),
                                     "component hand-over"), buf))

    def _receive(self, slot: _Slot) -> None:
        t0 = time.perf_counter()
        for work, _ in slot.recv:
            _guard(work.wait, "component hand-over")
        self._waited(t0)
        buffers = {buf.dtype: buf for _, buf in slot.recv}
        if self.extrapolate:  # one step ahead along the last two hand-overs: h + (h - h_prev)
            raw, prev = buffers, slot.prev or {}
            buffers = {d: torch.sub(b, prev[d]).add_(b) if d in prev else b for d, b in raw.items()}
            slot.prev = raw
        offsets = dict.fromkeys(buffers, 0)
        slot.inbox = {}
        for i in self._boundary_set(self.k - 1):
            spec, meta = slot.specs[i]
            leaves = []
            for m in meta:
                if isinstance(m, _Leaf):
                    n = math.prod(m.shape)
                    leaves.append(buffers[m.dtype][offsets[m.dtype]:offsets[m.dtype] + n].view(m.shape))
                    offsets[m.dtype] += n
                else:
                    leaves.append(m)
            slot.inbox[i] = pytree.tree_unflatten(leaves, spec)
        slot.recv = None

    def _broadcast(self, local: torch.Tensor) -> torch.Tensor:
        t = local.contiguous() if self.groups.rank == self.last else torch.empty_like(local)
        t0 = time.perf_counter()
        _guard(lambda: dist.broadcast(t, self.last, group=self.groups.inner_group), "broadcast of the prediction")
        self._waited(t0)
        if self.groups.rank == self.last:
            self._count("component_broadcast_bytes", t)
        return t

    def _waited(self, t0: float) -> None:
        self.stats["component_wait_s"] = self.stats.get("component_wait_s", 0.0) + time.perf_counter() - t0

    def _count(self, key: str, t: torch.Tensor) -> None:
        self.stats[key] = self.stats.get(key, 0) + t.numel() * t.element_size()


def correction_for(adapter: Adapter, name: str) -> str:
    """The correction a family gets. ``auto``: the best on the trained models that held their checker scores
    (BENCHMARKS.md): ``extrapolate`` for UNets (no residual stream runs through their stages),
    ``residual_extrapolate`` for image DiTs, ``residual`` for video DiTs (extrapolating lost a clip's shape)."""
    if name != "auto":
        return name
    if adapter.family.kind == "unet":
        return "extrapolate"
    return "residual" if adapter.family.video else "residual_extrapolate"


def _streams_in(block, args, kwargs) -> dict:
    """The image and text streams a DiT block takes (``hidden_states``, ``encoder_hidden_states``), copied."""
    inputs = bind(forward_params(type(block)), args, kwargs)
    return {k: inputs[k].clone() for k in _STREAMS if isinstance(inputs.get(k), torch.Tensor)}


def _out_streams(block, value) -> dict:
    """The image and text streams in a DiT block's output (where `block_io` says they are); {} if unknown."""
    io = block_io(block)
    if io is None:
        return {}
    values = (value,) if isinstance(value, torch.Tensor) else tuple(value)
    return {n: values[j] for n, j in zip(_STREAMS, io, strict=True)
            if j is not None and isinstance(values[j], torch.Tensor)}


def _with_streams(block, value, streams: dict):
    """``value`` with the streams replaced."""
    io = block_io(block)
    if isinstance(value, torch.Tensor):
        return streams.get("hidden_states", value)
    out = list(value)
    for n, j in zip(_STREAMS, io, strict=True):
        if n in streams:
            out[j] = streams[n]
    return type(value)(out)


def apply_components(ledger, adapter: Adapter, groups: Groups, state: LoopState, cfg, stats: dict) -> Components:
    if groups.inner_group is None:
        raise ParallelError("parallel.components: the branch has one rank; components needs components >= 2")
    plan = Components(adapter, groups, state, cfg, stats)
    plan.install(ledger)
    return plan
