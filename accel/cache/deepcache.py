"""DeepCache for UNets: recompute the shallow skip branch every step, reuse the deep features.

A UNet's skip connections nest: skip 0 (``conv_in``'s output) is consumed by the last up layer,
skip 1 by the one before, and so on, so the modules producing and consuming skips
``0..branch-1`` form an outer shell around the rest of the network. In a cached step only that shell
runs; the deep interior is replaced by the feature it fed into the shell at the last full step
(the output of the module just before the shell's first up layer, "the feeder"). The other interior
modules return zero-cost placeholders of their recorded shapes: their outputs only flow into other
interior modules, never into the result.

Layers are the UNet's own units (a resnet with its attention and motion module, a down/upsampler),
so ``branch`` is finer than whole blocks: ``branch=1`` recomputes only ``conv_in``, the last up
layer and ``conv_out`` (DeepCache's shallowest setting).

Which steps are full: ``interval`` (uniform or nonuniform ``schedule``), ``warmup_steps``,
``max_skip``; all decided on the host from step counts, without reading a tensor.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass

import torch
from diffusers.hooks import ModelHook

from ..config_base import ConfigError
from ..families import Adapter
from .state import BeginForwardHook, Streams, fixed_schedule_reuses, settle, state_key

HOOK_DENOISER = "accel.cache.deepcache.denoiser"
HOOK_DEEP = "accel.cache.deepcache.deep"


def _layer_modules(block, i: int) -> list[torch.nn.Module]:
    mods = [block.resnets[i]]
    for attr in ("attentions", "motion_modules"):
        seq = getattr(block, attr, None)
        if seq is not None and i < len(seq):
            mods.append(seq[i])
    return mods


def unet_layers(unet) -> tuple[list, list]:
    """(down units, up units) in execution order.

    Down unit: (skip index it produces, modules). Up unit: (skip index it consumes, or None for an
    upsampler, modules). Skip 0 is ``conv_in``'s output.
    """
    down, skip = [], 1
    for block in unet.down_blocks:
        for i in range(len(block.resnets)):
            down.append((skip, _layer_modules(block, i)))
            skip += 1
        if getattr(block, "downsamplers", None):
            down.append((skip, list(block.downsamplers)))
            skip += 1
    up, consume = [], skip - 1
    for block in unet.up_blocks:
        for i in range(len(block.resnets)):
            up.append((consume, _layer_modules(block, i)))
            consume -= 1
        if getattr(block, "upsamplers", None):
            up.append((None, list(block.upsamplers)))
    if consume != -1:
        raise ConfigError(f"cache.method: deepcache cannot pair the skip connections of this "
                          f"{type(unet).__name__}; use method 'none' for it")
    return down, up


def split_shell(unet, branch: int) -> tuple[list, torch.nn.Module, int]:
    """(interior modules, the feeder, number of skips) for ``branch`` live skip connections."""
    down, up = unet_layers(unet)
    n_skips = len(down) + 1
    if branch >= n_skips:
        raise ConfigError(f"cache.branch: {branch} recomputes every skip connection of this UNet "
                          f"({n_skips}), so nothing would be cached; use a value below {n_skips}")
    interior = [m for skip, mods in down if skip >= branch for m in mods]
    if unet.mid_block is not None:
        interior.append(unet.mid_block)
    feeder = unet.mid_block if unet.mid_block is not None else interior[-1]
    live = False
    for consumes, mods in up:
        if consumes is not None:
            live = consumes < branch
        if live:
            break
        interior.extend(mods)
        feeder = mods[-1]
    return interior, feeder, n_skips


class DeepCache:
    def __init__(self, adapter: Adapter, cfg, tracker, streams: Streams):
        self.adapter, self.cfg, self.tracker, self.streams = adapter, cfg, tracker, streams
        self.interior, self.feeder, n_skips = split_shell(adapter.module, cfg.branch)
        self.part = f"{adapter.component or 'denoiser'}.deep(branch={cfg.branch}/{n_skips})"
        self.current = None

    def install(self, ledger) -> None:
        ledger.add_hook(self.adapter.module, BeginForwardHook(self), HOOK_DENOISER)
        for m in self.interior:
            ledger.add_hook(m, _InteriorHook(self, feeder=m is self.feeder), HOOK_DEEP)

    @torch.compiler.disable  # host-side counters: no graph specialised on them
    def begin_forward(self) -> None:
        key = state_key(self.tracker.state)
        st = self.streams.begin(key)
        reuse = "feature" in st.data and fixed_schedule_reuses(st, self.tracker.state.total_steps, self.cfg)
        settle(st, reuse)
        self.streams.count(self.part, key, reuse)
        self.streams.record(key, st.step, "reuse" if reuse else "full")
        self.current = (key, st)


    @torch.compiler.disable  # state writes stay on the host, out of torch.compile graphs
    def keep(self, module, output, feeder: bool) -> None:
        st = self.current[1]
        if feeder:
            st.data["feature"] = output
        st.data.setdefault("shapes", {})[id(module)] = _shape_of(output)


class _InteriorHook(ModelHook):
    def __init__(self, cache: DeepCache, feeder: bool):
        super().__init__()
        self.cache, self.feeder = cache, feeder
        self.zeros: dict = {}  # (dtype, device) -> a 0-d zero, expanded into every placeholder

    def new_forward(self, module, *args, **kwargs):
        _, st = self.cache.current
        if st.reuse:
            if self.feeder:
                return st.data["feature"]
            return _placeholder(st.data["shapes"][id(module)], self.zeros)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.feeder or id(module) not in st.data.get("shapes", ()):  # a graph break: only when needed
            self.cache.keep(module, output, self.feeder)
        return output


def _shape_of(x):
    """The structure of a module output with each tensor replaced by (shape, dtype, device)."""
    if isinstance(x, torch.Tensor):
        return ("t", tuple(x.shape), x.dtype, x.device)
    if isinstance(x, (tuple, list)):
        return (type(x), [_shape_of(v) for v in x])
    if is_dataclass(x):
        return ("dc", type(x), {f.name: _shape_of(getattr(x, f.name)) for f in fields(x)})
    return ("v", x)


def _placeholder(shape, zeros: dict):
    """A zero-cost stand-in of a recorded output: expanded views of one 0-d zero per (dtype, device),
    made once on the output's own device, so a cached step launches no kernel for them."""
    kind = shape[0]
    if kind == "t":
        _, size, dtype, device = shape
        zero = zeros.get((dtype, device))
        if zero is None:
            zero = zeros[(dtype, device)] = torch.zeros((), dtype=dtype, device=device)
        return zero.expand(size)
    if kind == "dc":
        return shape[1](**{k: _placeholder(v, zeros) for k, v in shape[2].items()})
    if kind == "v":
        return shape[1]
    return kind(_placeholder(v, zeros) for v in shape[1])


def apply_deepcache(adapter: Adapter, cfg, tracker, ledger, streams: Streams) -> DeepCache:
    cache = DeepCache(adapter, cfg, tracker, streams)
    cache.install(ledger)
    return cache
