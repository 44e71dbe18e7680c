"""The torch.distributed runtime: start or join a process group, spawn a worker group, fail fast.

- Under ``torchrun`` / ``accelerate launch`` the environment (``RANK``, ``WORLD_SIZE``,
  ``MASTER_ADDR``...) is set and `init` joins through ``env://`` (multi-node rendezvous included).
- `spawn(fn, n)` starts its own group on 127.0.0.1 with a free port, for ``accel generate --gpus N``.
- Every collective has a timeout (``ParallelConfig.timeout_s``); a rank that dies makes the
  others raise `ParallelError` (connection closed, or the timeout) instead of hanging, and
  `spawn` takes the whole group down when one worker fails.
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Callable

import torch
import torch.distributed as dist


class ParallelError(RuntimeError):
    """A distributed run failed: a bad degree for this world, or a rank that stopped responding."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_for(device: torch.device | str | None, requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    return "nccl" if torch.device(device or "cpu").type == "cuda" and dist.is_nccl_available() else "gloo"


def init(backend: str = "auto", timeout_s: float = 300.0, device: str | None = None) -> tuple[int, int]:
    """Join (or reuse) the default process group; returns (rank, world_size).

    With no launcher environment and no group, returns (0, 1): a single process.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    if device is None and torch.cuda.is_available():
        device = "cuda"
    if torch.device(device or "cpu").type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # NCCL only honours the timeout with async error handling on (the default in recent torch).
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    dist.init_process_group(backend_for(device, backend), init_method="env://",
                            timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """True on the rank that writes files and prints (rank 0, or a single process)."""
    return rank() == 0


def shared_seed(seed: int | None) -> int:
    """The same seed on every rank: rank 0's value (drawn at random there if ``seed`` is None)."""
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item()) if is_main() else 0
    if world_size() == 1:
        return seed
    t = torch.tensor([seed], dtype=torch.int64, device=_collective_device())
    _guard(lambda: dist.broadcast(t, 0), "broadcast of the seed")
    return int(t.item())


def _collective_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


COMM_SECONDS = {"total": 0.0}  # wall time spent inside collectives (async launches excluded)


def _guard(fn: Callable, what: str):
    """Run a collective; turn a peer's death or a timeout into one clear ParallelError."""
    import time

    t0 = time.perf_counter()
    try:
        return fn()
    except ParallelError:
        raise
    except (RuntimeError, dist.DistBackendError) as e:  # gloo/nccl report peers' deaths as these
        _abandon_group()
        raise ParallelError(
            f"rank {rank()}: {what} failed: another rank stopped responding or crashed "
            f"({str(e).splitlines()[0][:160]}). "
            "See that rank's error above; the whole group stops.") from e
    finally:
        COMM_SECONDS["total"] += time.perf_counter() - t0


def _abandon_group() -> None:
    """Tear down a group whose peer is gone, so this process can exit cleanly.

    Left alive, the backend's threads are destroyed at interpreter exit while still joinable, and
    the process aborts (SIGABRT) after our error was printed. The group cannot be used again anyway.
    """
    if not dist.is_initialized():
        return
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort on a broken group; the ParallelError follows
        pass


def barrier() -> None:
    if world_size() > 1:
        _guard(dist.barrier, "barrier")


# --- spawning ---------------------------------------------------------------------------------

def _worker(local_rank: int, fn: Callable, nprocs: int, port: int, backend: str, timeout_s: float, args: tuple):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nprocs), LOCAL_WORLD_SIZE=str(nprocs))
    if torch.cuda.is_available() and backend != "gloo":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = "cuda"
    else:
        device = "cpu"
        # Ranks share the host's cores; oversubscribing threads makes every rank slower.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nprocs))
    init(backend, timeout_s, device)
    try:
        fn(local_rank, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable, nprocs: int, args: tuple = (), backend: str = "auto", timeout_s: float = 300.0) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` fresh processes forming one group on this machine.

    ``fn`` must be importable (a module-level function). If any worker fails, the others are
    terminated and a `ParallelError` names the failing rank.
    """
    import torch.multiprocessing as mp

    if nprocs < 1:
        raise ParallelError(f"spawn: nprocs must be >= 1, got {nprocs}")
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= nprocs else "gloo"
    try:
        mp.spawn(_worker, args=(fn, nprocs, free_port(), backend, timeout_s, args), nprocs=nprocs, join=True)
    except mp.ProcessRaisedException as e:
        first = str(e).strip().splitlines()
        last = next((ln for ln in reversed(first) if ln.strip()), "")
        raise ParallelError(f"worker rank {e.error_index} failed: {last.strip()}") from e
    except mp.ProcessExitedException as e:
        raise ParallelError(f"worker rank {e.error_index} exited with code {e.exit_code}; "
                            "the other workers were stopped") from e
