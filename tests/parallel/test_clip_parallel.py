"""Clip parallelism (Video-Infinity) on gloo: 2 ranks (clip=2); the 4-rank cfg=2 x clip=2 check runs in
test_cfg_sequence_parallel.py (one 4-process group for every 4-rank check).

`clip_checks.py` runs every distributed check in one spawned group and records numbers; the
tests assert on them. Latent videos of 4 latent frames (2 per clip), fp32 tiny pipelines, 3 steps.

- Independent clips (no cross-clip context) equal single-process runs of each clip alone (same
  latents slice, same global positions): ``EXACT`` max abs.
- A neighbour scope covering the whole other clip is full attention: equals the single-process
  run of the whole video (``EXACT``), which proves the exchange and the positions.
- Dual-scope attention (1 neighbour frame, 8 global tokens) joins the clips better. Seam metric:
  the step across the clip boundary (first frame of clip 1 minus last frame of clip 0) against
  that step in the single-process video, mean |d - d_ref| / mean |d_ref|. Measured on this
  machine: independent / dual = wan 0.0156 / 0.0080, cogvideox 0.0258 / 0.0079, ltx 0.0141 /
  0.0052 (latents seed 7; over seeds 1-3 the reduction was 1.4x-4.8x, every family and seed
  improved); the test asks for at least a 1.3x reduction and a lower whole-video error.
"""

import os

import pytest
from helpers.spawned import run_checks

import accel
from accel.parallel import ParallelConfig, ParallelError, check, parallelize

EXACT = 1e-4
HERE = os.path.dirname(__file__)
SCRIPT = os.path.join(HERE, "clip_checks.py")
FAMILIES = ("wan", "cogvideox", "ltx")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_checks(SCRIPT, tmp_path_factory.mktemp("clip"))


@pytest.mark.parametrize("family", FAMILIES)
def test_independent_clips_equal_single_process_runs_of_each_clip(results, family):
    for rank in results:
        r = rank[family]
        assert r["strategies"] == ["clip"]
        assert r["clip_vs_alone_max_abs"] <= EXACT
        assert r["kv_bytes_independent"] == 0  # no cross-clip context: nothing but the output gather
        assert r["gather_bytes"] > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_neighbour_scope_over_the_whole_other_clip_is_full_attention(results, family):
    assert all(rank[family]["whole_context_max_abs"] <= EXACT for rank in results)


@pytest.mark.parametrize("family", FAMILIES)
def test_dual_scope_attention_smooths_the_seam(results, family):
    r = results[0][family]
    assert r["kv_bytes_dual"] > 0
    assert r["seam_dual"] * 1.3 <= r["seam_independent"]
    assert r["err_dual"] < r["err_independent"]


def test_unparallelize_restores_bitwise(results):
    assert all(rank[f]["restored_max_abs"] == 0.0 for rank in results for f in FAMILIES)


def test_frames_that_do_not_split_into_equal_clips_say_what_to_use(results):
    message = results[0]["wan"]["odd_frames_error"]
    assert "3 latent frames, which do not split into 2 equal clips" in message
    assert "num_frames=5 or 13" in message  # Wan compresses time 4x
    assert "num_frames=9 or 25" in results[0]["ltx"]["odd_frames_error"]  # the tiny LTX VAE 8x


@pytest.mark.parametrize("kwargs, message", [
    ({"clip": 2, "sequence": 2}, "parallel.clip: 2 cannot be combined with sequence=2"),
    ({"clip": 2, "patch": 2}, "parallel.clip: 2 cannot be combined with patch=2"),
    ({"clip_neighbour_frames": -1}, "parallel.clip_neighbour_frames: -1 is out of range"),
])
def test_invalid_clip_configs_fail_at_construction(kwargs, message):
    with pytest.raises(accel.ConfigError, match=message):
        ParallelConfig(**kwargs)


def test_clip_config_round_trip():
    c = ParallelConfig(cfg=2, clip=4, clip_neighbour_frames=2, clip_global_tokens=0)
    assert c.world_size == 8 and ParallelConfig.from_dict(c.to_dict()) == c


def test_clip_on_unsupported_families_fails_before_any_work(tiny_cache):
    sd15, flux = tiny_cache("sd15"), tiny_cache("flux")
    with pytest.raises(accel.ConfigError, match="clip parallelism splits video frames and supports wan, cogvideox, "
                                                "ltx. Use patch= for UNets"):
        check(sd15, ParallelConfig(clip=2))
    with pytest.raises(accel.ConfigError, match="Use sequence= for other DiTs"):
        check(flux, ParallelConfig(clip=2))
    wan = tiny_cache("wan")
    assert check(wan, ParallelConfig(clip=2)) == ["clip"]
    with pytest.raises(ParallelError, match="need 2 processes but this is a single process"):
        parallelize(wan, ParallelConfig(clip=2))
    registry = wan.transformer.__dict__.get("_diffusers_hook")
    assert "_accel_parallel" not in wan.__dict__
    assert registry is None or not any(name.startswith("accel.parallel") for name in registry.hooks)

pytestmark = [pytest.mark.multiprocess]
