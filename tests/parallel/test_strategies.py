"""CFG, sequence and patch parallelism and parallel VAE decode on 2 gloo processes vs 1 process.

One spawned group runs every check (`group_checks.py`); each test reads its numbers. Outputs are
images/videos in [0, 1] from fp32 tiny pipelines. Exact strategies must match the single-process
output to ``EXACT`` (max abs; the differences are fp32 round-off from batch splitting and
reordered reductions). Displaced (async) patch parallelism is lossy by design: its floors below
are set under the PSNR measured on this machine (sd15 async 44.5 dB, stale_gn 29.1 dB, flux async
74 dB at 3 steps, 1 warmup step). AsyncDiff components at 4 steps on random tiny weights are lossy too;
their floor, 28 dB, is under the lowest PSNR measured here (cogvideox 33.6 dB with 1 synchronous step).
"""

import os

import pytest
from helpers.spawned import run_checks

EXACT = 1e-4
HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_checks(os.path.join(HERE, "group_checks.py"), tmp_path_factory.mktemp("parallel"))


@pytest.mark.parametrize("family", ["flux", "sd3", "wan", "cogvideox"])
def test_cfg_parallel_equals_single_process(results, family):
    r = results[f"{family}/cfg"]
    assert r["max_abs"] <= EXACT
    assert r["stats"]["cfg_gathers"] == 2  # one all-gather per step (2 steps): the branches really were split


@pytest.mark.parametrize("case", ["flux/sequence", "flux/sequence_ulysses", "sd3/sequence", "wan/sequence",
                                  "wan/sequence_ulysses", "cogvideox/sequence"])
def test_sequence_parallel_equals_single_process(results, case):
    r = results[case]
    assert r["max_abs"] <= EXACT
    backend = r["stats"]["strategies"][0]
    if backend == "sequence:ulysses":
        assert r["stats"]["a2a_bytes"] > 0


@pytest.mark.parametrize("case", ["flux/sequence_ulysses_odd", "sd3/sequence_odd"])
def test_sequence_parallel_pads_lengths_not_divisible_by_the_degree(results, case):
    assert results[case]["max_abs"] <= EXACT  # 9 image tokens on 2 ranks


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_patch_parallel_sync_equals_single_process(results, family):
    r = results[f"{family}/patch_sync"]
    assert r["max_abs"] <= EXACT
    assert r["stats"]["kv_bytes"] > 0


def test_patch_parallel_async_within_fidelity_floor(results):
    sd_async, sd_stale = results["sd15/patch_async"], results["sd15/patch_stale_gn"]
    assert sd_async["psnr"] >= 38.0
    assert sd_stale["psnr"] >= 24.0
    # The local correction of stale GroupNorm statistics is what keeps async close to exact.
    assert sd_async["psnr"] > sd_stale["psnr"] + 5
    assert results["flux/patch_async"]["psnr"] >= 60.0
    assert sd_async["stats"]["wait_s"] >= 0  # async exchanges were waited on, not issued synchronously


def test_pcpp_sends_less_kv_at_similar_fidelity(results):
    full, pcpp = results["sd15/patch_async"], results["sd15/patch_pcpp"]
    assert pcpp["stats"]["kv_bytes"] < full["stats"]["kv_bytes"]
    assert pcpp["psnr"] >= 38.0


COMPONENT_FAMILIES = ["sd15", "sdxl", "flux", "sd3", "wan", "cogvideox"]


@pytest.mark.parametrize("family", COMPONENT_FAMILIES)
def test_components_with_a_warmup_over_every_step_equal_one_process(results, family):
    r = results[f"{family}/components_sync"]
    assert r["max_abs"] <= EXACT
    assert "component_async_steps" not in r["stats"]  # every rank computed the whole denoiser at every step


@pytest.mark.parametrize("family", COMPONENT_FAMILIES)
def test_components_hand_over_asynchronously_within_the_floor(results, family):
    first, again = results[f"{family}/components_async"], results[f"{family}/components_async/again"]
    st = first["stats"]
    assert len(st["component_split"]) == 2 and abs(sum(st["component_cost_share"]) - 1) < 0.01
    assert st["component_async_steps"] >= 1 and st["component_handover_bytes"] > 0  # rank 0 sent its part
    assert first["max_abs"] > 0 and again["max_abs"] > 0  # lossy: parts ran on the previous step's features
    assert first["psnr"] >= 28.0 and again["psnr"] >= 28.0
    # The split measured by the warm-up case on this pipeline was kept: 1 synchronous step, then 3
    # asynchronous (per denoiser forward: Wan calls it twice a step), in both calls.
    assert st["component_async_steps"] % 3 == 0
    assert again["stats"]["component_async_steps"] == 2 * st["component_async_steps"]


def test_parallel_vae_decode_equals_single_decode(results):
    assert results["sd15/vae"]["max_abs"] <= EXACT


def test_unparallelize_restores_bitwise(results):
    restored = [v["max_abs"] for k, v in results.items() if k.endswith("/restored")]
    assert restored and all(x == 0.0 for x in restored)

pytestmark = [pytest.mark.multiprocess]
