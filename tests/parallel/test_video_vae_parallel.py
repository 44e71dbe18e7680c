"""Parallel decode of the video VAEs (Wan, CogVideoX, LTX) on 2 gloo processes vs one process.

One spawned group (`video_vae_checks.py`) decodes a random latent of 6 latent rows (48 pixel
rows) whole and in two bands of 3 rows. The decode is exact by construction (halo rows for every
spatial convolution, whole-image GroupNorm statistics, Wan's per-frame attention on the gathered
frame), so the only differences allowed are fp32 round-off: ``EXACT`` max abs on outputs of
magnitude ~1 (measured: Wan 0.0, CogVideoX 2.9e-6, LTX 1.7e-6).
"""

import os

import pytest
from helpers.spawned import run_checks

EXACT = 1e-4
HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_checks(os.path.join(HERE, "video_vae_checks.py"), tmp_path_factory.mktemp("video_vae"))


@pytest.mark.parametrize("family", ["wan", "cogvideox", "ltx"])
def test_parallel_video_vae_decode_equals_single_decode(results, family):
    r = results[family]
    assert r["shape"] == [1, 3, 9, 48, 32]  # 3 (LTX: 2) latent frames -> 9 frames, 6 latent rows -> 48
    assert r["max_abs"] <= EXACT
    assert r["stats"]["halo_bytes"] > 0 and r["stats"]["gather_bytes"] > 0  # the bands really were split
    assert r["restored_max_abs"] == 0.0  # unparallelize restores the VAE bitwise


def test_cogvideox_groupnorm_statistics_are_shared(results):
    assert results["cogvideox"]["stats"]["norm_bytes"] > 0


def test_wan_pipeline_with_parallel_vae_equals_single_process(results):
    r = results["wan/pipeline"]
    assert r["shape"] == [1, 9, 48, 32, 3]
    assert r["max_abs"] <= EXACT


def test_unsupported_vae_is_refused_before_any_work():
    from diffusers import AutoencoderKLHunyuanVideo

    from accel.parallel import ParallelError
    from accel.parallel.config import ParallelConfig
    from accel.parallel.vae import apply_vae
    from accel.patching import Ledger

    vae = AutoencoderKLHunyuanVideo(block_out_channels=(8, 8), down_block_types=("HunyuanVideoDownBlock3D",) * 2,
                                    up_block_types=("HunyuanVideoUpBlock3D",) * 2, layers_per_block=1,
                                    norm_num_groups=2, latent_channels=4)
    with pytest.raises(ParallelError, match="AutoencoderKLHunyuanVideo is not supported.*set vae=False"):
        apply_vae(Ledger(), vae, ParallelConfig(vae=True), {})

pytestmark = [pytest.mark.multiprocess]
