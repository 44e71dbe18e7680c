"""The device and dtype a built-in or hub model loads on: CUDA when present, else CPU; bfloat16 on CUDA and
float32 on CPU (half precision on CPU is slow and inaccurate). torch is imported where it is used, so
`accel --help` reads the loader's defaults without it."""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """A model name or path could not be loaded; the message says what would work."""


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
