"""Putting a pipeline back exactly after a peer ran on it (`accel bench`'s peer rows)."""

from __future__ import annotations

import torch

_MISSING = object()


class Snapshot:
    """The instance attributes, submodules and hooks of every module of a pipeline, the pipeline's own
    attributes, and the ``__call__``/``forward`` of their classes, restored after a peer's ``disable``:
    a peer that leaves a patch behind (cache-dit 1.5 keeps its patched transformer forward after
    ``disable_cache``) would otherwise run under every later row."""

    def __init__(self, pipe):
        self.pipe_dict = dict(pipe.__dict__)
        mods = [m for c in pipe.components.values() if isinstance(c, torch.nn.Module) for m in c.modules()]
        self.modules = [(m, dict(m.__dict__), dict(m._modules), dict(m._forward_hooks), dict(m._forward_pre_hooks))
                        for m in mods]
        self.classes = {(cls, name): cls.__dict__[name] for cls in {type(pipe), *(type(m) for m in mods)}
                        for name in ("__call__", "forward") if name in cls.__dict__}
        # diffusers' hook registries are changed in place (a peer adds its hooks to an existing one)
        self.registries = [(r, dict(r.hooks), list(r._hook_order), list(r._fn_refs), r._module_ref)
                           for r in (m.__dict__.get("_diffusers_hook") for m in mods) if r is not None]

    @staticmethod
    def _put_back(live: dict, saved: dict, watch=lambda k: True) -> bool:
        """``live`` made equal to ``saved`` again; True when a ``watch``-ed key had changed."""
        changed = False
        for k in [k for k in live if k not in saved]:
            del live[k]
            changed |= watch(k)
        for k, v in saved.items():
            if live.get(k, _MISSING) is not v:
                live[k] = v
                changed |= watch(k)
        return changed

    def restore(self, pipe) -> bool:
        """Put everything back; True when a patch had been left behind (a forward or ``__call__``, a
        submodule, a hook). The attributes a pipeline or module sets on itself during a call are put back
        too, without counting."""
        changed = self._put_back(pipe.__dict__, self.pipe_dict, lambda k: k == "__call__")
        for m, d, children, hooks, pre in self.modules:
            # diffusers' hook removal leaves the class's own forward bound on the instance: the same code
            own = getattr(m.__dict__.get("forward"), "__func__", None) is type(m).forward and "forward" not in d
            changed |= self._put_back(m.__dict__, d, lambda k, own=own: k == "forward" and not own)
            for live, saved in ((m._modules, children), (m._forward_hooks, hooks), (m._forward_pre_hooks, pre)):
                changed |= self._put_back(live, saved)
        for reg, hooks, order, refs, ref in self.registries:
            if reg.hooks != hooks or reg._hook_order != order or reg._fn_refs != refs or reg._module_ref is not ref:
                reg.hooks, reg._hook_order, reg._fn_refs, reg._module_ref = dict(hooks), list(order), list(refs), ref
                changed = True
        for (cls, name), fn in self.classes.items():
            if cls.__dict__.get(name) is not fn:
                setattr(cls, name, fn)
                changed = True
        return changed
