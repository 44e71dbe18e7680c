"""The block cache without a probe (``compute_first_n=0``, a fixed schedule): a reused step runs no block.

Floor on the trained ref-dit (20 steps, 4 held-out prompts, interval 2 after 2 full steps): measured
34.6-37.5 dB on this machine; the floor, 31 dB, sits under the worst.
"""

import numpy as np
import pytest
import torch

import accel
from accel.eval.work import StageWork
from accel.pipelines import tiny

PROBE_FREE = {"method": "block", "interval": 2, "warmup_steps": 2, "compute_first_n": 0}


def _images(pipe, kw):
    return np.asarray(pipe(**kw).images, dtype=np.float32)


def test_probe_free_interval_1_is_an_exact_no_op():
    pipe = tiny.make("flux")
    ref = _images(pipe, tiny.example_inputs("flux", num_inference_steps=6))
    accel.apply(pipe, {"cache": {**PROBE_FREE, "interval": 1}})
    out = _images(pipe, tiny.example_inputs("flux", num_inference_steps=6))
    assert accel.stats(pipe)["cache"]["reused"] == 0
    accel.remove(pipe)
    assert np.array_equal(out, ref)


def test_a_reused_step_runs_no_block_and_remove_restores_exactly():
    pipe = tiny.make("flux")  # 2 blocks
    ref = _images(pipe, tiny.example_inputs("flux", num_inference_steps=8))
    counts = {}
    for first in (0, 1):
        accel.apply(pipe, {"cache": {**PROBE_FREE, "compute_first_n": first}})
        with StageWork(pipe) as work:
            _images(pipe, tiny.example_inputs("flux", num_inference_steps=8))
        counts[first] = (work.computed, work.entered, accel.stats(pipe)["cache"]["reused"])
        accel.remove(pipe)
    computed, entered, reused = counts[0]
    assert reused == 3 and entered == 16 and computed == entered - 2 * reused  # both blocks skipped
    assert counts[1][0] == entered - reused  # with the probe, the first block still ran
    assert np.array_equal(_images(pipe, tiny.example_inputs("flux", num_inference_steps=8)), ref)


def test_a_threshold_without_a_probe_is_refused_with_what_to_do():
    with pytest.raises(accel.ConfigError, match="compute_first_n: 0 leaves no probe block for threshold 0.1"):
        accel.Config.from_dict({"cache": {"method": "block", "threshold": 0.1, "compute_first_n": 0}})


@pytest.mark.slow
def test_probe_free_keeps_the_trained_dit_above_its_floor():
    from accel.eval import bench
    from accel.eval.metrics import compare
    from accel.pipelines.load import load

    pipe = load("ref-dit", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    work = bench.workload(pipe, "ref-dit", n_prompts=4, device="cpu")

    def run_all():
        return [np.asarray(pipe(**c.kwargs, generator=torch.Generator("cpu").manual_seed(c.seed)).images[0])
                for c in work.calls]

    ref = run_all()
    accel.apply(pipe, {"cache": PROBE_FREE})
    outs = run_all()
    reused = accel.stats(pipe)["cache"]["reused"]
    accel.remove(pipe)
    psnrs = [compare(a, b)["psnr"] for a, b in zip(ref, outs, strict=True)]
    assert reused > 0
    assert min(psnrs) >= 31.0
    assert max(psnrs) < 100  # lossy: reused steps changed the output


def test_the_calibrated_schedule_reuses_while_the_accumulated_change_stays_small():
    from accel.cache.calibrate import schedule

    changes = [0.0, 5.0, 5.0, 0.1, 0.1, 0.1, 0.1, 2.0, 0.1]
    assert schedule(changes, 0.25, warmup=2) == [3, 4, 6, 8]  # 0.1+0.1 < 0.25; a third step would not be
    assert schedule(changes, 0.25, max_skip=1, warmup=2) == [3, 5, 8]
    assert schedule(changes, 0.0, warmup=2) == []  # no error allowed: every step computed


def test_reuse_steps_reuses_exactly_the_steps_given_and_is_checked():
    from accel.cache.calibrate import record_changes

    pipe = tiny.make("flux")
    changes = record_changes(pipe, [tiny.example_inputs("flux", num_inference_steps=8)])
    assert len(changes) == 8 and changes[0] == 0.0 and all(c > 0 for c in changes[1:])
    ref = _images(pipe, tiny.example_inputs("flux", num_inference_steps=8))
    accel.apply(pipe, {"cache": {"method": "block", "compute_first_n": 0, "warmup_steps": 2, "reuse_steps": "3,4,6"}})
    with StageWork(pipe) as work:
        out = _images(pipe, tiny.example_inputs("flux", num_inference_steps=8))
    stats = accel.stats(pipe)["cache"]
    accel.remove(pipe)
    assert stats["reused"] == 3 and work.computed == work.entered - 3 * 2
    assert not np.array_equal(out, ref)
    assert np.array_equal(_images(pipe, tiny.example_inputs("flux", num_inference_steps=8)), ref)
    for bad, says in (({"interval": 2}, "a schedule for method 'block' with threshold 0 and interval 1"),
                      ({"reuse_steps": "3,x"}, "'x' in '3,x' is not a step number"),
                      ({"reuse_steps": "0,2"}, "step 0 has nothing to reuse")):
        with pytest.raises(accel.ConfigError, match=says):
            accel.Config.from_dict({"cache": {"method": "block", "reuse_steps": "3,4", **bad}})
