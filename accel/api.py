"""`apply`, `remove`, `applied`, `stats`: compose the techniques on a pipeline or a bare denoiser.

Each technique's record (`accel.config.TECHNIQUES`) names a module exposing
``apply_technique(target, config) -> handle``; the handle may offer ``stats() -> dict``. Techniques
make every change through ``target.ledger``, so `remove` undoes all of them the same way. Techniques
never import each other; the records' ``order`` (the approximate cache, attention processors, token
reduction, then step caching, which wraps the others) is the only place they meet.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import TECHNIQUES as _RECORDS
from .config import Config, resolve
from .config_base import ConfigError
from .families import Adapter, denoisers_of
from .loop import LoopView, observe
from .patching import Ledger

# (Config section, module with apply_technique) in application order, read from the records.
TECHNIQUES = tuple((t.section, t.module) for t in sorted(_RECORDS, key=lambda t: t.order))

_STATE_ATTR = "_accel"


@dataclass
class Target:
    """What a technique is given: the pipeline (or None), one adapter per denoiser, the loop observer's view
    (``tracker``), the ledger."""

    pipe: Any
    adapters: list[Adapter]
    tracker: LoopView
    ledger: Ledger
    family: str


@dataclass
class _Applied:
    config: Config
    target: Target
    handles: dict = field(default_factory=dict)


def _technique(section: str, package: str):
    module = importlib.import_module(package)
    fn = getattr(module, "apply_technique", None)
    if fn is None:
        raise ConfigError(f"{section}: this version of accel has no {section} technique yet; "
                          f"leave the {section} section at its defaults")
    return fn


def apply(target, config: Any = None):
    """Accelerate a diffusers pipeline or a bare denoiser in place; returns ``target``.

    Args:
        target: a diffusers pipeline (any with a ``unet``/``transformer`` of a supported family)
            or the denoiser module itself.
        config: a preset name (``"off"``, ...), an `accel.Config`, a technique sub-config, a
            dict, or a path to a JSON/YAML/TOML config file. None means ``"off"``.

    Applying again replaces the previous configuration. `remove` restores the pipeline exactly.
    """
    pairs = denoisers_of(target)  # raises UnsupportedModelError with the supported list
    adapters = [Adapter(m, name) for name, m in pairs]
    family = adapters[0].family.name
    cfg = resolve(config, family)
    remove(target)
    ledger = Ledger()
    tracker = observe(target, ledger, adapters)
    t = Target(None if isinstance(target, torch.nn.Module) else target, adapters, tracker, ledger, family)
    state = _Applied(cfg, t)
    try:
        for section, package in TECHNIQUES:
            sub = getattr(cfg, section)
            if sub.enabled:
                state.handles[section] = _technique(section, package)(t, sub)
        # Last, so its hooks are outermost and the state is current before any technique runs.
        tracker.attach(read_inputs=True)
    except BaseException:
        ledger.undo_all()
        _clear_registry_caches(adapters)
        raise
    target.__dict__[_STATE_ATTR] = state
    return target


def remove(target):
    """Undo everything `apply` did to ``target``; a no-op if nothing is applied. Returns ``target``."""
    state = target.__dict__.pop(_STATE_ATTR, None)
    if state is not None:
        try:
            state.target.ledger.undo_all()
        finally:
            _clear_registry_caches(state.target.adapters)
    return target


def _clear_registry_caches(adapters):
    # diffusers caches each registry's list of child registries; ours may be gone now.
    for a in adapters:
        for m in a.module.modules():
            reg = m.__dict__.get("_diffusers_hook")
            if reg is not None:
                reg._child_registries_cache = None


def is_applied(target) -> bool:
    return _STATE_ATTR in target.__dict__


def config_of(target) -> Config | None:
    state = target.__dict__.get(_STATE_ATTR)
    return state.config if state else None


@contextlib.contextmanager
def applied(target, config: Any = None):
    """``with accel.applied(pipe, "fast"): ...``: applied inside, restored on exit, even on error.

    A configuration that was applied before entering is applied again on exit.
    """
    previous = config_of(target)
    apply(target, config)
    try:
        yield target
    finally:
        remove(target)
        if previous is not None:
            apply(target, previous)


def stats(target) -> dict:
    """What the last pipeline call did: steps, per-technique counts (reuse, merging, density), timings."""
    state = target.__dict__.get(_STATE_ATTR)
    if state is None:
        return {"applied": False}
    out = {"applied": True, "family": state.target.family, "config": state.config.to_dict(),
           **state.target.tracker.stats()}
    for section, handle in state.handles.items():
        fn = getattr(handle, "stats", None)
        out[section] = fn() if fn else {}
    return out
