"""Token-axis sharding of a denoiser: split inputs across the inner group, gather outputs.

A plan says, per submodule, which forward arguments (or outputs) to split along which dimension,
and where to gather the result, in the spirit of diffusers' ``_cp_plan`` but with text tokens
kept whole on every rank (so one plan serves Ulysses and displaced patches alike) and with
padding: a length not divisible by the degree is padded at the end and the attention layer drops
the padding (`LoopState.real_len`), so the result is exact for any length.

For a DiT the image tokens are row-major, so a contiguous shard of them is a band of rows: the
same plan gives DistriFusion's row patches.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.hooks import ModelHook

from .context import Groups, LoopState
from .runtime import _guard

# module path -> {argument name or "__output__": (dim, ndims)}; "gather": module path -> (output index, dim).
# "*" matches every block of a stack, "-1" the last one. "text": where text tokens sit in joint attention.
PLANS = {
    "flux": {"split": {"": {"hidden_states": (1, 3), "img_ids": (0, 2)}},
             "gather": {"proj_out": (None, 1)}, "text": "first"},
    "sd3": {"split": {"transformer_blocks.0": {"hidden_states": (1, 3)}},
            "gather": {"transformer_blocks.-1": (1, 1)}, "text": "last"},
    "pixart": {"split": {"transformer_blocks.0": {"hidden_states": (1, 3)}},
               "gather": {"transformer_blocks.-1": (None, 1)}, "text": None},
    "cogvideox": {"split": {"transformer_blocks.0": {"hidden_states": (1, 3)},
                            "transformer_blocks.*": {"image_rotary_emb": (0, 2)}},
                  "gather": {"transformer_blocks.-1": (0, 1)}, "text": "first"},
    "wan": {"split": {"blocks.0": {"hidden_states": (1, 3)}, "rope": {"__output__": (1, 4)}},
            "gather": {"proj_out": (None, 1)}, "text": None},
    "ltx": {"split": {"": {"hidden_states": (1, 3)}, "rope": {"__output__": (1, 3)}},
            "gather": {"proj_out": (None, 1)}, "text": None},
}

SPLIT_HOOK, GATHER_HOOK = "accel.parallel.split", "accel.parallel.gather"


def _resolve(root: torch.nn.Module, path: str) -> list[torch.nn.Module]:
    if path == "":
        return [root]
    mods = [root]
    for part in path.split("."):
        nxt = []
        for m in mods:
            if part == "*":
                nxt.extend(list(m))
            elif part.lstrip("-").isdigit() and isinstance(m, torch.nn.ModuleList):
                nxt.append(m[int(part)])
            else:
                nxt.append(getattr(m, part))
        mods = nxt
    return mods


def pad_to(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    extra = length - x.shape[dim]
    if extra <= 0:
        return x
    pads = [0, 0] * (x.ndim - dim - 1) + [0, extra]
    return F.pad(x, pads)


class SplitHook(ModelHook):
    def __init__(self, specs: dict, groups: Groups, state: LoopState):
        super().__init__()
        self.specs, self.groups, self.state = specs, groups, state

    def _split(self, x, spec, main: bool):
        if isinstance(x, (tuple, list)):
            return type(x)(self._split(v, spec, main) for v in x)
        dim, ndims = spec
        if not isinstance(x, torch.Tensor) or x.ndim != ndims:
            return x
        p = self.groups.inner_degree
        n = x.shape[dim]
        padded = -(-n // p) * p
        if main:
            self.state.real_len, self.state.pad_len = n, padded
        elif self.state.pad_len and n == self.state.real_len:
            padded = self.state.pad_len
        return pad_to(x, dim, padded).chunk(p, dim)[self.groups.inner_index]

    def pre_forward(self, module, *args, **kwargs):
        from ..families import forward_params

        names = forward_params(type(module))
        args = list(args)
        for name, spec in self.specs.items():
            if name == "__output__":
                continue
            main = name == "hidden_states"
            if name in kwargs:
                kwargs[name] = self._split(kwargs[name], spec, main)
            elif name in names and names.index(name) < len(args):
                i = names.index(name)
                args[i] = self._split(args[i], spec, main)
        return tuple(args), kwargs

    def post_forward(self, module, output):
        spec = self.specs.get("__output__")
        return output if spec is None else self._split(output, spec, False)


class GatherHook(ModelHook):
    def __init__(self, index, dim: int, groups: Groups, state: LoopState, stats: dict, narrow: bool = True):
        super().__init__()
        self.index, self.dim, self.groups, self.state, self.stats = index, dim, groups, state, stats
        self.narrow = narrow

    def post_forward(self, module, output):
        from .cfg_parallel import _first_tensor, _with_first

        if not isinstance(output, (tuple, torch.Tensor)):  # a diffusers BaseOutput
            return _with_first(output, self._gather(_first_tensor(output)))
        index = 0 if self.index is None and isinstance(output, tuple) else self.index
        x = output if index is None else output[index]
        full = self._gather(x)
        if index is None:
            return full
        out = list(output)
        out[index] = full
        return type(output)(out)

    def _gather(self, x):
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.groups.inner_degree)]
        _guard(lambda: dist.all_gather(parts, x, group=self.groups.inner_group), "output all-gather")
        self.stats["gather_bytes"] = self.stats.get("gather_bytes", 0) + x.numel() * x.element_size() * (len(parts) - 1)
        full = torch.cat(parts, self.dim)
        return full.narrow(self.dim, 0, self.state.real_len) if self.narrow else full


def apply_plan(ledger, module: torch.nn.Module, plan: dict, groups: Groups, state: LoopState, stats: dict) -> None:
    merged: dict[int, tuple[torch.nn.Module, dict]] = {}
    for path, specs in plan["split"].items():
        for m in _resolve(module, path):
            merged.setdefault(id(m), (m, {}))[1].update(specs)
    for m, specs in merged.values():
        ledger.add_hook(m, SplitHook(specs, groups, state), SPLIT_HOOK)
    for path, (index, dim) in plan["gather"].items():
        for m in _resolve(module, path):
            ledger.add_hook(m, GatherHook(index, dim, groups, state, stats), GATHER_HOOK)
