"""Multi-GPU parallelism on torch.distributed: CFG, sequence (Ulysses), displaced patch, clip, components
(AsyncDiff), VAE.

    import accel
    accel.parallelize(pipe, accel.ParallelConfig(cfg=2, sequence=2))   # under torchrun, 4 ranks
    accel.parallel.unparallelize(pipe)

`spawn(fn, n)` starts a worker group without a launcher; `init()` joins one under torchrun.
"""

from .._lazy import lazy

__getattr__, __dir__ = lazy(__name__, {
    **dict.fromkeys(("check", "is_parallelized", "parallel_stats", "parallelize", "unparallelize"), ".api"),
    "ParallelConfig": ".config",
    **dict.fromkeys(("ParallelError", "barrier", "init", "is_main", "rank", "shared_seed", "spawn", "world_size"),
                    ".runtime"),
})

__all__ = ["parallelize", "unparallelize", "is_parallelized", "parallel_stats", "check", "ParallelConfig",
           "ParallelError", "init", "spawn", "rank", "world_size", "is_main", "shared_seed", "barrier"]
