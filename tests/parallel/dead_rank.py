"""A 2-rank group in which rank 1 dies after the first collective; rank 0 keeps communicating.

``python dead_rank.py spawn``: through `accel.parallel.spawn` (the group is taken down).
``python dead_rank.py env RANK PORT``: one rank of a torchrun-style (env://) group; rank 0 must
raise ParallelError from its collective instead of hanging.
``python dead_rank.py components RANK PORT``: the same group running tiny Flux with ``components=2``;
rank 1 dies at step 4 (after the warm-up, while hand-overs flow), rank 0 must raise ParallelError.
"""

import os
import sys
import time

import torch
import torch.distributed as dist


def body(rank: int) -> None:
    from accel.parallel import barrier, runtime

    barrier()
    if rank == 1:
        os._exit(3)  # a crash: no clean shutdown, no message to the peer
    t = torch.ones(4)
    t0 = time.time()
    try:
        while time.time() - t0 < 120:
            runtime._guard(lambda: dist.all_reduce(t), "all-reduce")
    except runtime.ParallelError:
        print(f"error after {time.time() - t0:.1f}s", flush=True)
        raise


def components(rank: int) -> None:
    import accel
    from accel.pipelines import tiny

    pipe = tiny.make("flux")
    accel.parallelize(pipe, accel.ParallelConfig(components=2, timeout_s=10))

    def die(pipe, step, timestep, kwargs):
        if rank == 1 and step == 4:
            os._exit(3)
        return kwargs

    t0 = time.time()
    try:
        pipe(**tiny.example_inputs("flux", num_inference_steps=8), callback_on_step_end=die)
    except Exception as e:
        print(f"error after {time.time() - t0:.1f}s", flush=True)
        raise e


if __name__ == "__main__":
    from accel.parallel import ParallelError, init, spawn

    if sys.argv[1] == "spawn":
        try:
            spawn(body, 2, backend="gloo", timeout_s=10)
        except ParallelError as e:
            print(f"ParallelError: {e}", flush=True)
            sys.exit(2)
    else:
        rank, port = int(sys.argv[2]), sys.argv[3]
        os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        init("gloo", timeout_s=10)
        try:
            components(rank) if sys.argv[1] == "components" else body(rank)
        except ParallelError as e:
            print(f"ParallelError: {e}", flush=True)
            sys.exit(2)
