"""A ledger of every change `apply` makes, undone in reverse by `remove`.

Techniques never patch a module directly: they ask the ledger, which records the prior state so
`remove` can put back exactly what was there (an instance attribute that did not exist is
deleted, not set to its old class value; a diffusers `HookRegistry` we created is dropped
whole). Only instances are touched, never classes.

Hooks live inside accelerate's: `enable_model_cpu_offload`, `enable_sequential_cpu_offload` and
device maps wrap a module's ``forward`` with accelerate's hook, which calls ``module._old_forward``,
and model offloading unwraps and rewraps every model at the end of each pipeline call. A diffusers
hook registered over accelerate's wrapper would be unwrapped with it after the first call, and one
removed from under it would take accelerate's wrapper along. So where accelerate's hook is present
(`_forward_slot`), our registry wraps and unwraps ``_old_forward``, whichever of the two came first.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook

_MISSING = object()


class Ledger:
    def __init__(self):
        self._undo: list[Callable[[], None]] = []

    def __len__(self):
        return len(self._undo)

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Set an instance attribute; undo restores the old instance value or deletes it."""
        old = obj.__dict__.get(name, _MISSING)
        if isinstance(obj, torch.nn.Module) and old is _MISSING:
            for store in ("_parameters", "_buffers", "_modules"):
                if name in obj.__dict__.get(store, {}):
                    raise ValueError(f"refusing to shadow {store[1:-1]} {name!r} of {type(obj).__name__}")
        setattr(obj, name, value)

        def undo():
            if old is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                obj.__dict__[name] = old

        self._undo.append(undo)

    def wrap_method(self, obj: Any, name: str, make: Callable[[Callable], Callable]) -> None:
        """Replace ``obj.name`` with ``make(current_bound_method)`` on the instance.

        ``functools.wraps`` keeps the signature visible, which diffusers inspects (for example
        `retrieve_timesteps` reads ``scheduler.set_timesteps``'s parameters).
        """
        import functools

        original = getattr(obj, name)
        wrapper = functools.wraps(original)(make(original))
        self.set_attr(obj, name, wrapper)

    def set_processor(self, attn: torch.nn.Module, processor: Any) -> None:
        old = attn.processor
        attn.set_processor(processor)
        self._undo.append(lambda: attn.set_processor(old))

    def add_hook(self, module: torch.nn.Module, hook: ModelHook, name: str) -> None:
        """Register a diffusers hook; undo removes it and, if we created the registry, the registry."""
        had_registry = "_diffusers_hook" in module.__dict__
        with _forward_slot(module):
            had_forward = module.__dict__.get("forward", _MISSING)
            registry = HookRegistry.check_if_exists_or_initialize(module)
            registry.register_hook(hook, name)
        _invalidate_child_registries(module)

        def undo():
            with _forward_slot(module):
                registry.remove_hook(name, recurse=False)
                # HookRegistry leaves the original bound method as an instance attribute.
                if not registry.hooks and had_forward is _MISSING:
                    module.__dict__.pop("forward", None)
            if not registry.hooks and not had_registry:
                module.__dict__.pop("_diffusers_hook", None)
            # A parent's cached list of child registries may still name this one.
            _invalidate_child_registries(module)

        self._undo.append(undo)

    def on_undo(self, fn: Callable[[], None]) -> None:
        """Register a custom undo step (for state a technique cannot express as the above)."""
        self._undo.append(fn)

    def undo_all(self) -> None:
        errors = []
        while self._undo:
            fn = self._undo.pop()
            try:
                fn()
            except Exception as e:  # keep undoing: a half-restored model is worse than a reported error
                errors.append(e)
        if errors:
            raise RuntimeError(f"accel.remove: {len(errors)} undo step(s) failed; first: {errors[0]!r}") from errors[0]


def _invalidate_child_registries(module: torch.nn.Module) -> None:
    """Drop the cached child-registry lists in ``module``'s tree after a hook came or went.

    diffusers 0.38 on caches them in ``HookRegistry._child_registries_cache`` (0.41 on also clears them with
    ``invalidate_child_registries_cache``, which this does by hand); 0.36 and 0.37 cache nothing, and the
    attribute is then unused.
    """
    for m in module.modules():
        if "_diffusers_hook" in m.__dict__:
            m._diffusers_hook._child_registries_cache = None


@contextlib.contextmanager
def _forward_slot(module: torch.nn.Module):
    """Within: ``module.forward`` is the forward that accelerate's hook on ``module`` calls, if it has one.

    accelerate (`add_hook_to_module`) keeps the wrapped forward in ``module._old_forward`` and its own
    wrapper in ``module.forward``; the wrapper reads ``_old_forward`` at every call, so a registry
    (un)registered in here sits inside it, and stays there when model offloading unwraps and rewraps.
    """
    d = module.__dict__
    if "_hf_hook" not in d or "_old_forward" not in d:
        yield
        return
    outer = d.get("forward", _MISSING)
    d["forward"] = d["_old_forward"]
    try:
        yield
    finally:
        inner = d.pop("forward", _MISSING)
        # popped: the class's own forward, bound as accelerate binds it
        d["_old_forward"] = module.forward if inner is _MISSING else inner
        if outer is not _MISSING:
            d["forward"] = outer


@contextlib.contextmanager
def forward_slots(root: torch.nn.Module):
    """`_forward_slot` for ``root`` and every submodule: for code that registers diffusers hooks itself
    (diffusers' ``enable_cache``)."""
    with contextlib.ExitStack() as stack:
        for m in root.modules():
            if "_hf_hook" in m.__dict__:
                stack.enter_context(_forward_slot(m))
        yield
