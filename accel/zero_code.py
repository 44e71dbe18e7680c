"""The zero-code patch: accelerate every diffusers pipeline a process calls, configured by the environment.

Reached through ``import accel.auto`` or `accel run` (whose ``sitecustomize`` wraps the pipeline
classes without importing accel, and calls `before_call` / `after_call` here at each pipeline call):

    ACCEL_PRESET=fast python script.py       # with `import accel.auto` at the top of script.py
    accel run --preset fast -- python script.py   # no change to script.py at all

Environment:

* ``ACCEL_PRESET``: a preset name (see `accel models`); default ``balanced`` where the techniques
  define it, else ``off``.
* ``ACCEL_CONFIG``: a config file (.yaml/.toml/.json) instead of a preset.
* ``ACCEL_STATS=0``: do not print ``accel.stats`` at exit.

Every pipeline is accelerated at its first call (not when it is made, so a script can still swap
its scheduler or move it to a device first) with the preset resolved for its family; a pipeline
accel does not support (no unet/transformer of a known family) is left alone with a one-line note.
At exit, one line per accelerated pipeline, ``accel: stats {json}``, goes to stderr; the script's
own output and exit status are untouched. How the pipelines are caught is described in
``accel/sitecustomize/_accel_autopatch.py``: diffusers' pipeline classes get a wrapped
``__call__`` in this process only, which is the exception to accel's rule of patching instances.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import sys
import weakref
from pathlib import Path

from .config import Config, available_presets
from .config_base import ConfigError
from .families import UnsupportedModelError, denoisers_of

# `accel run` puts this folder first on PYTHONPATH; it is package data, not a package.
SITE_DIR = Path(__file__).parent / "sitecustomize"
_PATCH_FILE = SITE_DIR / "_accel_autopatch.py"
_state: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pipeline -> _Seen
_report: list[dict] = []  # one entry per accelerated pipeline, kept after the pipeline is gone


class _Seen:
    def __init__(self, entry: dict | None):
        self.entry = entry  # None: not accelerated


def default_preset() -> str:
    return "balanced" if "balanced" in available_presets() else "off"


def configured() -> tuple[str, str]:
    """("preset", name) or ("config", path) from the environment; ConfigError if it is wrong."""
    preset, config = os.environ.get("ACCEL_PRESET"), os.environ.get("ACCEL_CONFIG")
    if preset and config:
        raise ConfigError("ACCEL_PRESET and ACCEL_CONFIG are both set; unset one of them")
    if config:
        if not Path(config).is_file():
            raise ConfigError(f"ACCEL_CONFIG={config!r}: no such file")
        Config.load(config)  # fail now, not at the first call
        return "config", config
    preset = preset or default_preset()
    if preset not in available_presets():
        raise ConfigError(f"ACCEL_PRESET={preset!r} is not a preset; choose one of {', '.join(available_presets())}")
    return "preset", preset


def before_call(pipe) -> None:
    """Apply the configured acceleration to ``pipe`` once, at its first call."""
    if pipe in _state:
        return
    from . import api  # torch and diffusers: `accel run` reads this module without them

    _report_at_exit()
    try:
        denoisers_of(pipe)
    except UnsupportedModelError as e:
        _state[pipe] = _Seen(None)
        print(f"accel: {type(pipe).__name__} left as it is: {str(e).splitlines()[0].split('. Supported')[0]}",
              file=sys.stderr)
        return
    kind, value = configured()
    api.apply(pipe, value)
    entry = {"pipeline": type(pipe).__name__, kind: value, "calls": 0, "stats": None}
    _report.append(entry)
    _state[pipe] = _Seen(entry)


def after_call(pipe) -> None:
    seen = _state.get(pipe)
    if seen is None or seen.entry is None:
        return
    from . import api

    seen.entry["calls"] += 1
    seen.entry["stats"] = api.stats(pipe)


def _print_report() -> None:
    if os.environ.get("ACCEL_STATS", "1") == "0":
        return
    try:
        if not _report:
            print("accel: no diffusers pipeline was called, so nothing was accelerated", file=sys.stderr)
        for entry in _report:
            print("accel: stats " + json.dumps(entry, default=str), file=sys.stderr)
        sys.stderr.flush()
    except Exception:  # never change how the script ends
        pass


def _patch_module():
    """The patch module, shared with sitecustomize (one module object under one name)."""
    mod = sys.modules.get("_accel_autopatch")
    if mod is None:
        spec = importlib.util.spec_from_file_location("_accel_autopatch", _PATCH_FILE)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["_accel_autopatch"] = mod
        spec.loader.exec_module(mod)
    return mod


_registered = []


def _report_at_exit() -> None:
    if not _registered:
        atexit.register(_print_report)
        _registered.append(True)


def install() -> None:
    """Check the environment's settings, wrap diffusers' pipeline classes (idempotent), report at exit."""
    from diffusers import DiffusionPipeline

    configured()
    _patch_module().patch_pipeline_class(DiffusionPipeline)
    _report_at_exit()
