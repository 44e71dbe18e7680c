"""Multi-GPU parallelism on torch.distributed: CFG, sequence (Ulysses), displaced patch, clip, VAE.

    import accel
    accel.parallelize(pipe, accel.ParallelConfig(cfg=2, sequence=2))   # under torchrun, 4 ranks
    accel.parallel.unparallelize(pipe)

`spawn(fn, n)` starts a worker group without a launcher; `init()` joins one under torchrun.
"""

from .api import check, is_parallelized, parallel_stats, parallelize, unparallelize
from .config import ParallelConfig
from .runtime import ParallelError, barrier, init, is_main, rank, shared_seed, spawn, world_size

__all__ = ["parallelize", "unparallelize", "is_parallelized", "parallel_stats", "check", "ParallelConfig",
           "ParallelError", "init", "spawn", "rank", "world_size", "is_main", "shared_seed", "barrier"]
