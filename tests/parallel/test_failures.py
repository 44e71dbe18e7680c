"""A dead rank makes the others stop with a clear error within a bounded time (gloo, CPU).

Both launch styles run at once (each process pays the import of torch and diffusers):
- our own `spawn`: the group is taken down and the error names the dead worker;
- env:// (as under torchrun): the surviving rank's collective raises `ParallelError`.
"""

import os
import subprocess
import sys
import time

from accel.parallel.runtime import free_port

SCRIPT = os.path.join(os.path.dirname(__file__), "dead_rank.py")
BOUND_S = 300  # whole test, imports of 3-4 processes included, on a loaded 2-core machine
ERROR_WITHIN_S = 30  # from the peer's death to the survivor's error (collective timeout: 10 s)


def test_dead_rank_stops_the_group_with_an_error():
    t0 = time.time()
    port = str(free_port())
    spawned = subprocess.Popen([sys.executable, SCRIPT, "spawn"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    env = [subprocess.Popen([sys.executable, SCRIPT, "env", str(r), port], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        out_spawn, err_spawn = spawned.communicate(timeout=BOUND_S)
        out0, err0 = env[0].communicate(timeout=BOUND_S)
        env[1].wait(timeout=10)
    finally:
        for p in (spawned, *env):
            if p.poll() is None:
                p.kill()
    assert time.time() - t0 < BOUND_S
    assert spawned.returncode == 2, err_spawn[-2000:]
    assert "worker rank 1 exited with code 3" in out_spawn
    assert env[1].returncode == 3
    assert env[0].returncode == 2, err0[-2000:]
    assert "ParallelError: rank 0: all-reduce failed: another rank stopped responding" in out0
    elapsed = float(out0.split("error after ")[1].split("s")[0])
    assert elapsed < ERROR_WITHIN_S


def test_a_dead_rank_stops_the_components_group_with_an_error():
    t0 = time.time()
    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, SCRIPT, "components", str(r), port], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        out0, err0 = ranks[0].communicate(timeout=BOUND_S)
        ranks[1].wait(timeout=10)
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
    assert ranks[1].returncode == 3
    assert ranks[0].returncode == 2, err0[-2000:]
    assert "ParallelError: rank 0:" in out0 and "another rank stopped responding" in out0
    assert time.time() - t0 < BOUND_S


import pytest  # noqa: E402

pytestmark = [pytest.mark.multiprocess]
