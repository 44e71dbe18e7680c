"""Loading a pipeline from a hub id, a local diffusers folder, or a built-in name.

Built-in names: ``tiny-<name>`` for every tiny random-weight pipeline in `accel.pipelines.tiny`
(offline, for tests and demos), ``ref-<name>`` for the small reference models trained on
procedural shapes that ship with the package (`accel.pipelines.ref`), and
``shape:<name>[:key=value,...]`` for random-weight pipelines at the released models' sizes
(`accel.pipelines.shape`, for measuring speed). The device is CUDA when present, else CPU; the
dtype is bfloat16 on CUDA and float32 on CPU (half precision on CPU is slow and inaccurate).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

# torch is imported where it is used: `accel --help` reads this module's defaults without it

# The trained reference model (64 px, shipped in the package): a real picture of what the prompt
# asks for in the data's vocabulary ("a big red circle in the center on a white background").
DEFAULT_MODEL = "ref-sd"
# The trained video reference model (17 frames of 32 px, moving shapes): `accel generate` picks it
# when no --model is given and the call asks for video (--frames, or an .mp4/.gif --out).
DEFAULT_VIDEO_MODEL = "ref-video"


class ModelLoadError(RuntimeError):
    """A model name or path could not be loaded; the message says what would work."""


def builtin_models() -> dict[str, str]:
    """Built-in model name -> what it is."""
    from . import ref, shape, tiny

    tinies = {f"tiny-{n}": f"tiny random-weight {cls} (offline)" for n, cls in tiny.describe().items()}
    shapes = {f"{shape.PREFIX}{n}": what for n, what in shape.describe().items()}
    return {**ref.shipped(), **tinies, **shapes}


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str):
    import torch

    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}


def parse_dtype(name, device: str):
    """A torch dtype from a name (``bf16``, ``float32``, ... or ``auto``: bf16 on CUDA, fp32 elsewhere) or a dtype."""
    import torch

    if name is None or name == "auto":
        return default_dtype(device)
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; use one of {', '.join(_DTYPES)} or auto")
    return getattr(torch, _DTYPES[name])


def load(model: str, *, device: str | None = None, dtype=None, seed: int = 0):
    """A ready pipeline for ``model`` on ``device`` (progress bar enabled)."""
    device = device or default_device()
    dtype = parse_dtype(dtype, device)
    if model.startswith("tiny-"):
        from . import tiny

        name = model[len("tiny-"):]
        if name not in tiny.NAMES:
            raise ModelLoadError(f"unknown built-in model {model!r}; built-in models: {', '.join(builtin_models())}")
        with quiet_loading():
            pipe = tiny.make(name, seed=seed, dtype=dtype, device=device)
    elif model.startswith("shape:"):
        from . import shape

        try:
            name, overrides = shape.parse(model)
            with quiet_loading():
                pipe = shape.make(name, device=device, dtype=dtype, seed=seed, overrides=overrides)
        except ValueError as e:  # ours, or diffusers' for a config it cannot build
            raise ModelLoadError(f"{model!r}: {e}") from None
    elif model.startswith("ref-"):
        from . import ref

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
