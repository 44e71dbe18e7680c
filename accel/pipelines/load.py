"""Loading a pipeline from a hub id, a local diffusers folder, or a built-in name.

Built-in names: ``tiny-<name>`` for every tiny random-weight pipeline in `accel.pipelines.tiny`
(offline, for tests and demos), ``ref-<name>`` for the small reference models trained on
procedural shapes that ship with the package (`accel.pipelines.ref`), and
``shape:<name>[:key=value,...]`` for random-weight pipelines at the released models' sizes
(`accel.pipelines.sized`, for measuring speed). The device is CUDA when present, else CPU; the
dtype is bfloat16 on CUDA and float32 on CPU (half precision on CPU is slow and inaccurate).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from . import ref, sized, tiny
from .devices import ModelLoadError, default_device, default_dtype, parse_dtype

__all__ = ["DEFAULT_MODEL", "DEFAULT_VIDEO_MODEL", "ModelLoadError", "builtin_models", "call_defaults", "default_device",
           "default_dtype", "load", "parse_dtype", "quiet_loading"]

# The trained reference model (64 px, shipped in the package): a real picture of what the prompt
# asks for in the data's vocabulary ("a big red circle in the center on a white background").
DEFAULT_MODEL = "ref-sd"
# The trained video reference model (17 frames of 32 px, moving shapes): `accel generate` picks it
# when no --model is given and the call asks for video (--frames, or an .mp4/.gif --out).
DEFAULT_VIDEO_MODEL = "ref-video"


def builtin_models() -> dict[str, str]:
    """Built-in model name -> what it is."""
    tinies = {f"tiny-{n}": f"tiny random-weight {cls} (offline)" for n, cls in tiny.describe().items()}
    shapes = {f"{sized.PREFIX}{n}": what for n, what in sized.describe().items()}
    return {**ref.shipped(), **tinies, **shapes}


def call_defaults(model: str) -> dict:
    """A built-in model's call: a tiny model's fast defaults (few steps, small size), a reference model's
    trained call, a shape model's released call; other models keep their pipeline's.

    Args:
        model: a model name as `load` takes it.

    Returns:
        Keyword arguments for the pipeline call (no prompt, generator or output type).
    """
    if model.startswith("tiny-"):
        d = tiny.example_inputs(model[len("tiny-"):])
        return {k: v for k, v in d.items() if k not in ("prompt", "negative_prompt", "generator", "output_type")}
    if model.startswith("ref-"):
        return ref.call_defaults(model)
    if model.startswith(sized.PREFIX):  # the released model's own call (size, steps, guidance)
        return sized.call_defaults(sized.parse(model)[0])
    return {}


def load(model: str, *, device: str | None = None, dtype=None, seed: int = 0):
    """A ready pipeline for ``model`` on ``device`` (progress bar enabled)."""
    device = device or default_device()
    dtype = parse_dtype(dtype, device)
    if model.startswith("tiny-"):
        name = model[len("tiny-"):]
        if name not in tiny.NAMES:
            raise ModelLoadError(f"unknown built-in model {model!r}; built-in models: {', '.join(builtin_models())}")
        with quiet_loading():
            pipe = tiny.make(name, seed=seed, dtype=dtype, device=device)
    elif model.startswith("shape:"):
        try:
            name, overrides = sized.parse(model)
            with quiet_loading():
                pipe = sized.make(name, device=device, dtype=dtype, seed=seed, overrides=overrides)
        except ValueError as e:  # ours, or diffusers' for a config it cannot build
            raise ModelLoadError(f"{model!r}: {e}") from None
    elif model.startswith("ref-"):
        try:
            folder = ref.model_path(model)
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
        pipe = _from_pretrained(str(folder), dtype, local=True).to(device)
    elif Path(model).exists():
        if not (Path(model) / "model_index.json").is_file():
            raise ModelLoadError(f"{model!r} is a path but not a diffusers pipeline folder (no model_index.json)")
        pipe = _from_pretrained(model, dtype, local=True).to(device)
    elif "/" in model and not model.startswith((".", "/")) and model.count("/") == 1:
        pipe = _from_pretrained(model, dtype, local=False).to(device)
    else:
        raise ModelLoadError(f"unknown model {model!r}: give a hub id (org/name), a local diffusers folder, "
                             f"or a built-in name ({', '.join(builtin_models())})")
    pipe.set_progress_bar_config(disable=False, leave=False)
    return pipe


@contextlib.contextmanager
def quiet_loading():
    """No loading progress bars or import-time warnings from diffusers/transformers while a
    pipeline loads (hub downloads keep huggingface_hub's own bars): the CLI's output stays its
    own, and an error stays one line. The first import of diffusers is quiet too: with torchao installed it
    logs "Failed to load ..." lines and torch's pytree deprecations, which say nothing to a user."""
    import logging
    import sys

    first = "diffusers" not in sys.modules
    noisy = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    noisy_levels = [lg.level for lg in noisy]
    for lg in noisy:
        lg.setLevel(logging.ERROR)
    env = os.environ.get("DIFFUSERS_VERBOSITY")
    if first:
        os.environ["DIFFUSERS_VERBOSITY"] = "error"  # read once, when diffusers configures its logger
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog
    finally:
        if first:
            os.environ.pop("DIFFUSERS_VERBOSITY") if env is None else os.environ.update(DIFFUSERS_VERBOSITY=env)
    was = (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled(),
           logging.WARNING if first and env is None else dlog.get_verbosity(), tlog.get_verbosity())
    dlog.disable_progress_bar(), tlog.disable_progress_bar()
    dlog.set_verbosity_error(), tlog.set_verbosity_error()
    try:
        yield
    finally:
        (dlog.enable_progress_bar if was[0] else dlog.disable_progress_bar)()
        (tlog.enable_progress_bar if was[1] else tlog.disable_progress_bar)()
        dlog.set_verbosity(was[2]), tlog.set_verbosity(was[3])
        for lg, level in zip(noisy, noisy_levels, strict=True):
            lg.setLevel(level)


def _from_pretrained(model: str, dtype, local: bool):
    from packaging.version import Version

    try:
        with quiet_loading():
            import diffusers
            from diffusers import DiffusionPipeline

            # diffusers 0.42 renamed torch_dtype to dtype (the old name warns)
            dtype_kw = "dtype" if Version(diffusers.__version__) >= Version("0.42.0") else "torch_dtype"
            return DiffusionPipeline.from_pretrained(model, **{dtype_kw: dtype}, local_files_only=local
                                                     or bool(os.environ.get("HF_HUB_OFFLINE")))
    except Exception as e:
        where = "folder" if local else "hub id (is the network reachable, and the name right?)"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"could not load {model!r} as a diffusers {where}: {first}") from None
