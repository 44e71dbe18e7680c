"""Attention backends over the tiled block layout: one module per backend behind one registry.

Every backend takes q, k, v as [B, H, n_blocks*block, D] in tiled order and a `SparseMask`, and
computes softmax attention restricted to the mask's blocks and to real (non-pad) keys:

- ``sdpa`` and ``xformers`` apply the expanded mask densely (a reference; no speed-up);
- ``flex`` skips masked blocks (FlexAttention, compiled);
- ``triton`` is our kernel, which skips them too, and also reads and writes the model's token order;
- ``gather`` (the fast path on CPU) copies each query block's kept key/value blocks together and
  runs batched BLAS matmuls over them.

Each module ``<name>.py`` here defines ``BACKEND``, a `Backend`. `NAMES` lists them; `AUTO` ranks
them for ``backend="auto"``; `FALLBACK` is what ``on_unavailable="fallback"`` tries. This module
imports no torch, so the config can name the backends; a backend's module loads when it is used.
Adding a backend is its module plus its name in `NAMES` (and a row in `AUTO` if it should be picked).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from ..._lazy import lazy

logger = logging.getLogger("accel.attention")

# One module of this package per name, in the order errors and --help list them.
NAMES = ("sdpa", "xformers", "flex", "triton", "gather")
# `auto`: the fastest measured backend for the tensors' device and dtype (BENCHMARKS.md, "Sparse attention",
# "On the GPU" and "On CPU"). Rows are (backend, device type or None for any, dtypes or None for any); the
# first row that matches, whose backend can run here and has not failed in this process, wins. Our kernel
# is for CUDA in fp16/bf16 (its fp32 dot would run in tf32); compiled flex for CUDA otherwise; gather elsewhere.
AUTO = (("triton", "cuda", ("float16", "bfloat16")), ("flex", "cuda", None), ("gather", None, None))
# `on_unavailable="fallback"`: the first of these that can run here.
FALLBACK = ("flex", "sdpa")


@dataclass(frozen=True)
class Backend:
    """One attention backend, as the registry knows it.

    Args:
        name: its `AttentionConfig.backend` name.
        run: ``run(q, k, v, mask, scale, **options) -> out`` on tiled q, k, v; options it does not
            take are ignored (``flex_compile``).
        unavailable: ``unavailable(device) -> None`` when it can run on ``device``, else why not and
            what to do.
        run_model_order: ``run_model_order(q, k, v, mask, scale) -> out`` with q, k, v and the output
            in the model's token order, for masks built from shapes alone; None: the engine tiles
            q, k, v for ``run`` and restores the order after.
        dropped_on_failure: a kernel built at its first launch: when it fails there under ``auto``,
            ``auto`` drops it for this process with a warning and runs the next ranked backend.
    """

    name: str
    run: Callable
    unavailable: Callable = lambda device: None
    run_model_order: Callable | None = None
    dropped_on_failure: bool = False


def get(name: str) -> Backend:
    """The record of backend ``name`` (its module is imported on first use).

    Args:
        name: one of `NAMES`.

    Returns:
        Its `Backend`.
    """
    record = _loaded.get(name)
    if record is None:
        if name not in NAMES:
            raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(NAMES)}")
        record = _loaded[name] = importlib.import_module(f".{name}", __name__).BACKEND
    return record


_loaded: dict[str, Backend] = {}  # name -> record, once its module is imported


def unavailable_reason(backend: str, device) -> str | None:
    """None when ``backend`` can run on ``device``, else why not and what to do.

    Args:
        backend: a backend name or ``"auto"`` (always available: it picks one that is).
        device: the torch device the attention runs on.

    Returns:
        None, or the reason as a sentence.
    """
    if backend == "auto":
        return None
    if backend not in NAMES:
        return f"unknown backend {backend!r}"
    return get(backend).unavailable(device)


_auto_failed: dict = {}  # backend -> the error that made `auto` stop choosing it in this process


def auto_backend(device, dtype) -> str:
    """The backend ``auto`` runs for tensors on ``device`` of ``dtype``: the first fitting row of `AUTO`.

    Args:
        device: a torch device.
        dtype: a torch dtype.

    Returns:
        A backend name.
    """
    dtype_name = str(dtype).rpartition(".")[2]
    for name, device_type, dtypes in AUTO:
        if device_type is not None and device.type != device_type:
            continue
        if dtypes is not None and dtype_name not in dtypes:
            continue
        if name not in _auto_failed and unavailable_reason(name, device) is None:
            return name
    return AUTO[-1][0]


def run_auto(q, k, v, mask, scale: float, flex_compile: bool = True, model_order: bool = False,
             backend: str | None = None):
    """Attention with ``backend="auto"``; a kernel that fails to build here is dropped from auto's choices.

    Args:
        q, k, v: [B, H, N, D] in tiled order, or in the model's token order with ``model_order``.
        mask: the `SparseMask` of the call.
        scale: the softmax scale.
        flex_compile: flex runs compiled (else eager).
        model_order: q, k, v and the output are in the model's token order.
        backend: auto's choice when the caller has made it already (`auto_backend`).

    Returns:
        ``(output, name of the backend that ran)``.
    """
    backend = backend or auto_backend(q.device, q.dtype)
    record = get(backend)
    try:
        return _call(record, q, k, v, mask, scale, flex_compile, model_order), backend
    except Exception as e:  # a kernel's compile errors surface at its first launch
        if not record.dropped_on_failure:
            raise
        _auto_failed[backend] = e
        backend = auto_backend(q.device, q.dtype)
        logger.warning("accel.attention: the %s kernel failed here (%s); backend 'auto' uses %s from now on",
                       record.name, str(e).splitlines()[0] if str(e) else type(e).__name__, backend)
    return _call(get(backend), q, k, v, mask, scale, flex_compile, model_order), backend


def _call(record: Backend, q, k, v, mask, scale, flex_compile: bool, model_order: bool):
    if not model_order:
        return record.run(q, k, v, mask, scale, flex_compile=flex_compile)
    if record.run_model_order is not None:
        return record.run_model_order(q, k, v, mask, scale)
    from ..layout import from_blocks, to_blocks

    lay = mask.layout
    out = record.run(to_blocks(q, lay), to_blocks(k, lay), to_blocks(v, lay), mask, scale, flex_compile=flex_compile)
    return from_blocks(out, lay)


def run(backend: str, q, k, v, mask, scale: float, flex_compile: bool = True):
    """Attention of tiled q, k, v under ``mask`` with ``backend``.

    Args:
        backend: one of `NAMES`, or ``"auto"``.
        q, k, v: [B, H, n_blocks*block, D] in tiled order.
        mask: the `SparseMask` of the call.
        scale: the softmax scale.
        flex_compile: flex runs compiled (else eager).

    Returns:
        The output, [B, H, n_blocks*block, D] in tiled order.
    """
    if backend == "auto":
        return run_auto(q, k, v, mask, scale, flex_compile)[0]
    return get(backend).run(q, k, v, mask, scale, flex_compile=flex_compile)


# Our kernel in the model's token order, by its own name (benchmarks and the kernel's tests call it).
__getattr__, __dir__ = lazy(__name__, {"triton_model_order": ".triton"})
