"""Token reduction and sparse attention with a torch.compile'd denoiser (the step caches: tests/cache/
test_cache_compile.py).

``module.compile(backend="eager")`` runs dynamo (capture, guards, graph breaks, recompiles) and executes the
captured graphs with the eager kernels, so the compiled run must equal the uncompiled accelerated run
bitwise (tolerance 0). Per case: the same counts in `accel.stats`; the graphs captured by the first call
serve a second call of the same size and a call with more steps (nothing specialised on the step or the
technique's counters); graph breaks are counted (the techniques' host bookkeeping runs in
``torch.compiler.disable``d functions, which is where the graphs break).
"""

import numpy as np
import pytest
import torch
from helpers.snapshot import run

import accel
from accel.pipelines import tiny
from combos.common import denoiser

CASES = {
    # the UNet token path: the step's merge and the per-block counts were read inside the graph (a recompile
    # per step and block until dynamo's cache limit); now host-side
    "sd15-merge": ("sd15", {"tokens": {"ratio": 0.5}}, {}),
    # prune's per-block cache (refresh counter, cached inputs) is host state as well
    "flux-prune": ("flux", {"tokens": {"ratio": 0.5, "method": "prune", "refresh_interval": 2}}, {}),
    "wan-sparse": ("wan", {"attention": {"pattern": "radial", "density": 0.5, "block_size": 16}},
                   {"height": 64, "width": 64}),
}


@pytest.mark.parametrize("case", CASES)
def test_compiled_denoiser_equals_uncompiled_run(case):
    from torch._dynamo.utils import counters

    name, cfg, size = CASES[case]
    section = next(iter(cfg))
    pipe = tiny.make(name)  # not the shared session pipeline: compile() stays on the module
    accel.apply(pipe, cfg)
    eager = run(pipe, name, **size)
    eager_stats = accel.stats(pipe)[section]
    torch._dynamo.reset()
    counters.clear()
    try:
        denoiser(pipe).compile(backend="eager")
        graphs = []
        for steps in (4, 4, 6):
            out = run(pipe, name, num_inference_steps=steps, **size)
            graphs.append(counters["stats"]["unique_graphs"])
            if steps == 4:
                np.testing.assert_array_equal(out, eager)
                assert accel.stats(pipe)[section] == eager_stats
        breaks = sum(counters["graph_break"].values())
    finally:
        torch._dynamo.reset()
        accel.remove(pipe)
    assert graphs[0] > 0 and graphs[0] == graphs[1] == graphs[2], graphs  # no recompiles
    assert breaks > 0

pytestmark = [pytest.mark.slow]
