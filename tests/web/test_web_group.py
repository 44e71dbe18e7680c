"""The web app's engine on a parallel worker group (`accel app --parallel cfg=2`, and `components=2`), 2 gloo
processes.

Rank 0 serves (here: runs the `Engine` directly, no browser), rank 1 follows its broadcast actions
(`web_group_checks.py`). A generate writes the image of a single-process engine up to one 8-bit
level (CFG parallelism is exact up to fp32 round-off); Stop after step 1 of 3 stops every rank at
the same step (no hang), and the group serves the next request (a compare) normally.
"""

import os

import pytest
from helpers.spawned import run_checks

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module", params=["cfg=2", "components=2"])
def results(request, tmp_path_factory):
    out = run_checks(os.path.join(HERE, "web_group_checks.py"), tmp_path_factory.mktemp("web_group"), request.param)
    return {**out, "strategy": request.param}


def test_group_engine_writes_the_single_process_image(results):
    assert results["max_level_diff"] <= 1
    if results["strategy"] == "cfg=2":
        assert results["cfg_gathers"] == 2  # the branches really were split (2 steps)
    else:  # AsyncDiff: a new size's first 3 steps are synchronous, so a 2-step call equals one process
        assert results["strategies"] == ["components:2"]


def test_stop_is_mirrored_and_the_group_goes_on(results):
    assert results["stopped"] and results["stopped_log"]["steps_done"] == 1
    assert results["compare_max_level_diff"] <= 1
    names = results["outputs"]  # generate, then compare (baseline + accelerated); the stopped run wrote nothing
    assert len(names) == 3 and sum(n.endswith("-baseline.png") for n in names) == 1


def test_parallel_app_options_are_checked_before_spawning(capsys):
    pytest.importorskip("gradio")
    from accel.cli import main

    assert main(["app", "--parallel", "cfg=2", "--gpus", "3"]) == 2
    assert "--gpus 3: --parallel cfg=2 serves one pipeline on 2 processes" in capsys.readouterr().err

pytestmark = [pytest.mark.multiprocess]
