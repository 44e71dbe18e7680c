"""Serving a model with the web app: one pipeline per GPU, or one pipeline on a parallel worker group.

`serve_model` takes plain values (`accel app` parses them); a parallel group spawns its ranks, rank 0
serves the page and the others follow its actions (`accel.web.group`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import parallel
from ..io.outputs import check_writable
from ..parallel import ParallelConfig, spawn
from ..pipelines.load import load
from .group import Leader, follow, message_group
from .limits import Limits
from .page import build_app, serve


@dataclass(frozen=True)
class Options:
    """How `accel app` serves: the values of its flags.

    Args:
        model: the served model (a name `accel.pipelines.load.load` takes).
        out_dir: outputs, sidecars and configs; the only folder the server reads files from.
        limits: per-request ceilings.
        gpus: one pipeline per GPU (without ``parallel``).
        device, dtype: where and how the pipelines load.
        host, port: the address to bind.
        allow_model_paths: let the page load other models.
        approx_cache: the approximate cache's folder every Generate uses.
        config_sections: the ``--config`` file's technique sections, offered as preset ``config``.
    """

    model: str
    out_dir: str
    limits: Limits
    gpus: int = 1
    device: str | None = None
    dtype: str = "auto"
    host: str = "127.0.0.1"
    port: int = 7860
    allow_model_paths: bool = False
    approx_cache: str | None = None
    config_sections: dict | None = None


def serve_model(opts: Options, parallel: ParallelConfig | None = None) -> int:
    """Load ``opts.model`` and serve the app until interrupted.

    Args:
        opts: the server's options.
        parallel: serve one pipeline on ``parallel.world_size`` spawned processes (gloo on CPU).

    Returns:
        The exit status (0).
    """
    check_writable(Path(opts.out_dir) / "x.png")
    if parallel is not None and parallel.world_size > 1:
        backend = "gloo" if opts.device == "cpu" else parallel.backend
        spawn(_app_rank, parallel.world_size, (opts, parallel), backend=backend, timeout_s=parallel.timeout_s)
        return 0
    if opts.gpus > 1:
        import torch

        if torch.cuda.device_count() < opts.gpus:
            raise RuntimeError(f"--gpus {opts.gpus}: this machine has {torch.cuda.device_count()} CUDA device(s)")

    def loader(name: str, index: int):
        device = f"cuda:{index}" if opts.gpus > 1 else opts.device
        pipe = load(name, device=device, dtype=opts.dtype, seed=0)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return _serve(opts, loader, opts.gpus)


def _app_rank(rank: int, opts: Options, pcfg: ParallelConfig) -> None:
    """One process of `accel app --parallel`: rank 0 serves the page, the others follow it."""
    group = message_group()

    def loader(name: str, index: int):
        pipe = load(name, device=opts.device, dtype=opts.dtype, seed=0)
        pipe.set_progress_bar_config(disable=True)
        return parallel.parallelize(pipe, pcfg)

    if rank:
        return follow(loader, opts.model, group)
    leader = Leader(group)
    try:
        _serve(opts, loader, 1, leader, pcfg)
    finally:
        leader.close()


def _serve(opts: Options, loader, workers: int, group=None, parallel: ParallelConfig | None = None) -> int:
    out_dir = Path(opts.out_dir)
    demo = build_app(loader, opts.model, limits=opts.limits, out_dir=out_dir, workers=workers,
                     allow_model_paths=opts.allow_model_paths, group=group, approx_cache=opts.approx_cache,
                     config_sections=opts.config_sections, parallel=parallel)
    if opts.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"accel app: serving on {opts.host}: anyone who can reach this address can generate "
              "(limits still apply)")
    print(f"accel app: {opts.model} on {workers} worker(s){' (a parallel group)' if group else ''}; "
          f"outputs in {out_dir.resolve()}")
    serve(demo, opts.host, opts.port, block=True)
    return 0
