"""A ledger of every change `apply` makes, undone in reverse by `remove`.

Techniques never patch a module directly: they ask the ledger, which records the prior state so
`remove` can put back exactly what was there (an instance attribute that did not exist is
deleted, not set to its old class value; a diffusers `HookRegistry` we created is dropped
whole). Only instances are touched, never classes.
"""

from __future__ import annotations

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
        had_forward = module.__dict__.get("forward", _MISSING)
        registry = HookRegistry.check_if_exists_or_initialize(module)
        registry.register_hook(hook, name)
        registry.invalidate_child_registries_cache()

        def undo():
            registry.remove_hook(name, recurse=False)
            if not registry.hooks:
                # HookRegistry leaves the original bound method as an instance attribute.
                if had_forward is _MISSING:
                    module.__dict__.pop("forward", None)
                if not had_registry:
                    module.__dict__.pop("_diffusers_hook", None)
            # A parent's cached list of child registries may still name this one.
            for m in module.modules():
                if "_diffusers_hook" in m.__dict__:
                    m._diffusers_hook._child_registries_cache = None

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
