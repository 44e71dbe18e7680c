"""The pipeline side of the approximate cache: plan each call (hit or miss), cut its schedule, swap its latents.

``apply_technique(target, cfg)`` wraps two pipeline methods (through the ledger) and reads the loop
observer (`accel.loop`) for the rest:

- ``encode_prompt``: the first encoding of a call gives the pooled prompt embedding; the call's arguments
  (the observer's `CallInfo`) give the scope; the nearest stored entry of that scope decides hit (K by the
  policy table) or miss;
- timesteps set: on a hit, the schedule starts at step K (``timesteps`` and ``sigmas`` sliced, so the loop
  runs N - K steps and the scheduler's own step index stays consistent);
- ``prepare_latents``: on a hit, the fresh noise is replaced by the stored latent after K steps;
- step end: on a miss, the latents after the ``store_at`` steps are kept, and the entry is written when the
  call's last step ends, by the one process that writes files (`accel.roles.writes_files`).

Processes that run one call together (`accel.parallelize`) take one decision: the writing process's
(`accel.roles.decide`), latent included, so their schedules stay the same length.

A call the cache cannot serve honestly runs untouched and says why in ``stats()["approx"]["reason"]``:
a batch of prompts or images per prompt, given latents, an input image/video/mask (img2img, I2V,
inpaint), a second-order scheduler. With a first-order deterministic scheduler (DDIM, Euler, flow
matching Euler), a hit on an entry of the same prompt and seed reproduces the full run bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import torch

from ..config_base import ConfigError
from ..loop import CallInfo
from ..roles import decide, writes_files
from .config import ApproxCacheConfig
from .store import ApproxCache, Entry, Match, logger

# __call__ arguments that change the trajectory (with the model, scheduler and dtype): the scope.
SCOPE_ARGS = ("height", "width", "num_frames", "num_inference_steps", "guidance_scale", "guidance_scale_2",
              "true_cfg_scale", "negative_prompt", "max_sequence_length", "eta", "guidance_rescale",
              "use_resolution_binning", "attention_kwargs", "joint_attention_kwargs")
# __call__ arguments that make a call ineligible when given: the cache serves text-to-image/video only.
INPUT_ARGS = ("image", "video", "mask_image", "control_image", "ip_adapter_image", "ip_adapter_image_embeds",
              "last_image", "image_latents")

_OPEN: dict[tuple[str, int], ApproxCache] = {}


def open_cache(folder: str, max_gb: float = 10.0) -> ApproxCache:
    """The one `ApproxCache` of ``folder`` in this process (its folder is scanned once)."""
    key = (os.path.realpath(folder), int(max_gb * 2**30))
    if key not in _OPEN:
        _OPEN[key] = ApproxCache(folder, key[1])
    return _OPEN[key]


@dataclass
class _Plan:
    call: CallInfo | None  # the pipeline call this plan belongs to; released when the call ends
    scope: str = ""
    prompt: str = ""
    embedding: torch.Tensor | None = None
    reason: str | None = None  # why the cache does not serve or store this call
    match: object = None  # store.Match of a hit
    skip: int = 0  # K: steps skipped
    total: int = 0  # the call's step count N
    steps_done: int = 0
    keep: dict = field(default_factory=dict)  # step -> latent kept for the store
    stored: str | None = None  # the entry written
    similarity: float | None = None
    latent: torch.Tensor | None = None  # a hit's stored latent after ``skip`` steps


class ApproxHandle:
    def __init__(self, target, cfg: ApproxCacheConfig):
        self.pipe = target.pipe
        self.cfg = cfg
        self.cache = open_cache(cfg.dir, cfg.max_gb)
        self.ledger = target.ledger
        self.denoisers = [a.module for a in target.adapters]
        self.plan: _Plan | None = None
        self.totals = {"calls": 0, "hits": 0, "misses": 0, "stored": 0, "steps_saved": 0, "steps_total": 0}
        self.loop = target.tracker
        self.ledger.wrap_method(self.pipe, "encode_prompt", self._wrap_encode)
        self.ledger.wrap_method(self.pipe, "prepare_latents", self._wrap_prepare)
        self.loop.on_timesteps(self._on_timesteps)
        self.loop.on_step_end(self._on_step_end)
        self.loop.on_call_exit(self._on_call_exit)

    # --- wrappers and loop events -------------------------------------------------------------
    def _wrap_encode(self, original):
        def encode_prompt(*args, **kwargs):
            out = original(*args, **kwargs)
            call = self.loop.call
            if call is not None and (self.plan is None or self.plan.call is not call):
                self._plan_call(call, out)  # the call's first encoding is its prompt's
            return out
        return encode_prompt

    def _on_call_exit(self, call: CallInfo) -> None:
        plan = self.plan
        if plan is not None and plan.call is call:  # the call is over: let its arguments and latents go
            plan.call = plan.latent = None
            plan.keep = {}

    def _on_timesteps(self, scheduler) -> None:
        plan = self._live_plan()
        if plan is not None and plan.reason is None:
            self._start(plan, scheduler)

    def _wrap_prepare(self, original):
        def prepare_latents(*args, **kwargs):
            out = original(*args, **kwargs)
            plan = self._live_plan()
            if plan is None or plan.match is None:
                return out
            fresh = out[0] if isinstance(out, tuple) else out
            stored = plan.latent
            if tuple(stored.shape) != tuple(fresh.shape):
                raise RuntimeError(f"approximate cache: entry {plan.match.entry.id} holds a latent of shape "
                                   f"{tuple(stored.shape)} for a call whose latents are {tuple(fresh.shape)}; the "
                                   "scope missed what makes them differ. Clear approx.dir and report this model.")
            # the dtype the loop held at step K (a scheduler may return the model's dtype, e.g. bf16, from
            # fp32 starting latents): casting to the fresh latents' dtype would change the remaining steps
            stored = stored.to(device=fresh.device)
            return (stored, *out[1:]) if isinstance(out, tuple) else stored
        return prepare_latents

    def _on_step_end(self, state, out) -> None:
        plan = self._live_plan()
        if plan is None or plan.reason is not None or plan.total == 0:
            return
        plan.steps_done += 1
        done = plan.skip + plan.steps_done  # steps of the full schedule behind this latent
        if plan.match is None and done in self._store_steps(plan.total):
            sample = out[0] if isinstance(out, tuple) else out.prev_sample
            plan.keep[done] = sample.detach().clone()
        if plan.steps_done == plan.total - plan.skip:
            self._finish(plan)

    # --- the plan of one call -----------------------------------------------------------------
    def _live_plan(self) -> _Plan | None:
        plan = self.plan
        if plan is None or plan.call is None or self.loop.call is not plan.call:
            return None
        return plan

    def _plan_call(self, call: CallInfo, encoded) -> None:
        plan = self.plan = _Plan(call)
        self.totals["calls"] += 1
        local = call.args
        plan.reason = _ineligible(local, self.pipe.scheduler)
        if plan.reason is None:
            plan.embedding = _pooled(encoded)
            if plan.embedding is None:
                plan.reason = "no prompt embedding found in encode_prompt's output"
        if plan.reason is not None:
            return
        steps = local.get("num_inference_steps")
        if not isinstance(steps, int) or steps < 2:
            plan.reason = f"num_inference_steps is {steps!r}"
            return
        prompt = local.get("prompt")
        plan.prompt = prompt if isinstance(prompt, str) else prompt[0] if isinstance(prompt, (list, tuple)) else ""
        plan.scope, plan.total = self._scope(local), steps
        choice = decide(self.pipe, lambda: self._choose(plan.scope, plan.embedding, steps))
        if choice is not None:
            eid, plan.similarity, k, latent = choice
            if latent is not None:
                entry = self.cache.entries.get(eid) or Entry(eid, plan.scope, steps, (k,), 0)  # the writer's
                plan.latent, plan.match, plan.skip = latent, Match(entry, plan.similarity), k

    def _choose(self, scope: str, embedding: torch.Tensor, steps: int):
        """(entry id, similarity, K, the entry's latent after K steps or None) of the nearest entry, or None."""
        match = self.cache.nearest(scope, embedding)
        if match is None:
            return None
        k = self._skip_for(match, steps)
        latent = None
        if k > 0:
            try:  # read now: another process may evict the entry before prepare_latents runs
                latent = self.cache.latent(match.entry, k)
            except Exception as e:  # noqa: BLE001 - an entry that cannot be read is a miss
                logger.warning("approximate cache: entry %s unreadable (%s); running fully", match.entry.id, e)
        return match.entry.id, match.similarity, k if latent is not None else 0, latent

    def _start(self, plan: _Plan, scheduler) -> None:
        """set_timesteps ran: check the schedule has the planned length, and cut it on a hit."""
        n = len(scheduler.timesteps)
        if n != plan.total:
            if plan.match is not None:
                raise RuntimeError(f"approximate cache: the call asked for {plan.total} steps but its scheduler set "
                                   f"{n}; this pipeline cannot be served from the cache. Leave approx.dir empty.")
            plan.reason, plan.keep = f"the schedule has {n} steps for num_inference_steps={plan.total}", {}
            return
        if plan.match is not None:
            _cut_schedule(scheduler, plan.skip)

    def _skip_for(self, match, total: int) -> int:
        for threshold, fraction in zip(self.cfg.similarity, self.cfg.skip, strict=True):
            if match.similarity >= threshold:
                want = int(round(fraction * total))
                have = [s for s in match.entry.stored if s <= want and s < total]
                return max(have, default=0)
        return 0

    def _store_steps(self, total: int) -> set[int]:
        return {s for s in (int(round(f * total)) for f in self.cfg.store_at) if 0 < s < total}

    def _finish(self, plan: _Plan) -> None:
        self.totals["steps_total"] += plan.total
        if plan.match is not None:
            self.totals["hits"] += 1
            self.totals["steps_saved"] += plan.skip
            if writes_files(self.pipe):
                self.cache.record_hit(plan.match.entry, plan.skip)
            return
        self.totals["misses"] += 1
        if plan.keep and writes_files(self.pipe):
            entry = self.cache.add(plan.scope, plan.total, plan.embedding, plan.keep, plan.prompt)
            plan.stored = entry.id
            self.totals["stored"] += 1
        plan.keep = {}

    def _scope(self, local: dict) -> str:
        """Hash of everything besides the prompt that the stored latents depend on."""
        den = self.denoisers[0]
        parts = {
            "pipeline": type(self.pipe).__name__,
            "model": _model_digest(self.denoisers),
            "dtype": str(next(den.parameters()).dtype),
            "scheduler": [type(self.pipe.scheduler).__name__, _jsonable(dict(self.pipe.scheduler.config))],
            "call": {k: _jsonable(local.get(k)) for k in SCOPE_ARGS if k in local},
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def stats(self) -> dict:
        plan = self.plan
        last = {}
        if plan is not None:
            last = {"hit": plan.match is not None, "similarity": plan.similarity, "skipped_steps": plan.skip,
                    "total_steps": plan.total, "entry": plan.match.entry.id if plan.match else plan.stored,
                    "stored": plan.stored is not None, "reason": plan.reason}
        return {**last, "totals": dict(self.totals), "entries": len(self.cache.entries),
                "bytes": self.cache.total_bytes(), "evicted": self.cache.evicted,
                "skipped_files": len(self.cache.skipped)}


def apply_technique(target, cfg: ApproxCacheConfig) -> ApproxHandle:
    if target.pipe is None:
        raise ConfigError("approx.dir: the approximate cache works on a pipeline (it replaces the starting latents "
                          "and schedule of a call); apply it to the pipeline, not to its denoiser")
    for name in ("encode_prompt", "prepare_latents"):
        if not callable(getattr(target.pipe, name, None)):
            raise ConfigError(f"approx.dir: {type(target.pipe).__name__} has no {name}(); the approximate cache "
                              "needs a diffusers text-to-image/video pipeline")
    return ApproxHandle(target, cfg)


# --- helpers ------------------------------------------------------------------------------------

def _ineligible(local: dict, scheduler) -> str | None:
    prompt = local.get("prompt")
    if isinstance(prompt, (list, tuple)) and len(prompt) != 1:
        return "a batch of prompts (the cache serves one prompt per call)"
    if (local.get("num_images_per_prompt") or 1) != 1 or (local.get("num_videos_per_prompt") or 1) != 1:
        return "several outputs per prompt (the cache serves one per call)"
    if local.get("latents") is not None:
        return "latents were given (the call already chose its start)"
    given = [k for k in INPUT_ARGS if local.get(k) is not None]
    if given:
        return f"an input {given[0]} (the cache serves text-to-image and text-to-video calls)"
    if getattr(scheduler, "order", 1) != 1:
        return (f"{type(scheduler).__name__} takes {scheduler.order} model calls per step; its schedule cannot "
                "start mid-way")
    return None


def _pooled(encoded) -> torch.Tensor | None:
    """The prompt's pooled embedding from encode_prompt's output: the pipeline's own pooled vector where it
    returns one (SDXL, SD3, Flux), else the mean over the first embedding's tokens (masked when a mask follows)."""
    items = list(encoded) if isinstance(encoded, (tuple, list)) else [encoded]
    tensors = [t for t in items if isinstance(t, torch.Tensor)]
    first = next((t for t in tensors if t.is_floating_point() and t.ndim == 3), None)
    if first is None:
        return None
    pooled = next((t for t in tensors if t.is_floating_point() and t.ndim == 2 and t.shape[0] == first.shape[0]
                   and t.shape[1] > 16), None)
    if pooled is not None:
        return pooled[0].float()
    i = next(i for i, t in enumerate(items) if t is first)
    mask = items[i + 1] if i + 1 < len(items) else None
    if isinstance(mask, torch.Tensor) and mask.ndim == 2 and tuple(mask.shape) == tuple(first.shape[:2]):
        w = mask[0].float()
        return (first[0].float() * w[:, None]).sum(0) / w.sum().clamp_min(1)
    return first[0].float().mean(0)


def _cut_schedule(scheduler, k: int) -> None:
    """Start ``scheduler``'s schedule at step ``k``: the loop then runs the remaining steps, and the
    scheduler finds its step index from the first remaining timestep as on a fresh schedule."""
    n = len(scheduler.timesteps)
    scheduler.timesteps = scheduler.timesteps[k:]
    sigmas = getattr(scheduler, "sigmas", None)
    if isinstance(sigmas, torch.Tensor) and sigmas.ndim == 1 and len(sigmas) in (n, n + 1):
        scheduler.sigmas = sigmas[k:]
    for name in ("_step_index", "_begin_index"):
        if hasattr(scheduler, name):
            setattr(scheduler, name, None)


def _model_digest(modules) -> str:
    """A fingerprint of the denoisers' weights as they are now (LoRA fused or not): names, shapes, dtypes and a
    few sampled values of every tensor, read in one transfer."""
    h = hashlib.sha256()
    samples = []
    for m in modules:
        h.update(type(m).__name__.encode())
        h.update(json.dumps(_jsonable(dict(getattr(m, "config", {}))), sort_keys=True, default=str).encode())
        for name, p in m.named_parameters():
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            flat = p.detach().reshape(-1)
            if flat.is_floating_point() and flat.numel():
                samples.append(flat[:: max(1, flat.numel() // 8)][:8].float().sum())
    if samples:
        h.update(torch.stack([s.to(samples[0].device) for s in samples]).cpu().numpy().tobytes())
    return h.hexdigest()


def _jsonable(v):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, torch.Tensor) and v.numel() <= 16:
        return v.tolist()
    return repr(v) if not hasattr(v, "shape") else f"tensor{tuple(v.shape)}"

