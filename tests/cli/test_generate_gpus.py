"""`accel generate --gpus N --parallel ...`: the CLI spawns its own worker group (gloo on CPU).

Two processes with CFG parallelism write one image (rank 0 alone) equal to the single-process
image: the prediction is exact up to fp32 round-off (see tests/parallel), so the saved 8-bit
pixels may differ by at most one level where a value sits on a rounding edge. A worker that fails
ends the command with one `accel: error:` line naming the rank and the cause.
"""

import json

import numpy as np
import pytest
from PIL import Image

from accel.cli import main

BASE = ["generate", "--model", "tiny-sd15", "--prompt", "a red cat", "--steps", "2", "--seed", "3"]


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def test_two_processes_cfg_parallel_write_the_single_process_image(tmp_path, capfd):
    single, parallel = tmp_path / "single.png", tmp_path / "parallel.png"
    assert main([*BASE, "--out", str(single)]) == 0
    assert main([*BASE, "--out", str(parallel), "--gpus", "2", "--parallel", "cfg=2"]) == 0
    out = capfd.readouterr().out
    assert out.count(f"wrote {parallel}") == 1  # rank 0 alone prints
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parallel.png", "parallel.png.json", "single.png",
                                                          "single.png.json"]  # one output, no temporaries
    assert np.abs(_pixels(parallel) - _pixels(single)).max() <= 1
    side = json.loads((tmp_path / "parallel.png.json").read_text())
    assert side["parallel"]["config"]["cfg"] == 2 and side["parallel"]["cfg_gathers"] == 2  # really split


def test_two_processes_split_the_denoiser_into_components(tmp_path, capfd):
    out = tmp_path / "async.png"
    assert main([*BASE[:-4], "--steps", "5", "--seed", "3", "--out", str(out), "--gpus", "2",
                 "--parallel", "components=2"]) == 0
    assert capfd.readouterr().out.count(f"wrote {out}") == 1
    side = json.loads((tmp_path / "async.png.json").read_text())["parallel"]
    assert side["strategies"] == ["components:2"] and len(side["component_split"]) == 2
    assert side["component_async_steps"] >= 2 and side["component_handover_bytes"] > 0  # rank 0's hand-overs


def test_a_failing_worker_is_one_clear_error(tmp_path, capsys):
    # sd15 is a UNet: sequence parallelism refuses it on every rank, before any work.
    assert main([*BASE, "--out", str(tmp_path / "x.png"), "--parallel", "sequence=2", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("accel: error: worker rank ")
    assert "parallel.sequence: 2 is not available for sd15" in err[-1]
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "2"], "--gpus 2: say how the processes share the image with --parallel"),
    (["--gpus", "2", "--parallel", "cfg=2,sequence=2"], "--gpus 2: --parallel cfg=2,sequence=2 needs 4 processes"),
    (["--parallel", "cfg=3"], "--parallel: parallel.cfg: 3"),
    (["--parallel", "cfg"], "--parallel 'cfg': write FIELD=VALUE pairs"),
])
def test_bad_parallel_options_are_refused_before_spawning(tmp_path, capsys, argv, message):
    assert main([*BASE, "--out", str(tmp_path / "x.png"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_parallel_table_of_the_config_file(tmp_path, capsys):
    conf = tmp_path / "c.yaml"
    conf.write_text("cache: {}\nparallel: {cfg: 2, sequence: 2}\n")
    assert main([*BASE, "--out", str(tmp_path / "x.png"), "--config", str(conf), "--gpus", "2"]) == 2
    assert "--gpus 2: --parallel (from --config) needs 4 processes" in capsys.readouterr().err

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
