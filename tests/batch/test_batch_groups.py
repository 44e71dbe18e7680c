"""`accel batch --gpus 2 --parallel cfg=2`: a group of ranks per image.

The 2 processes form one copy of a CFG-parallel pipeline: both make every row together (each
computes one branch), and the copy's leader alone writes outputs, sidecars and manifest lines.
Every row is generated exactly once, and the images equal those of a single-process batch up to
one 8-bit level (the prediction differs by fp32 round-off only; see tests/parallel).
"""

import json

import numpy as np
from PIL import Image

from accel.batch import manifest as mf
from accel.cli import main

ROWS = [{"prompt": "a red cat", "steps": 2}, {"prompt": "a blue dog", "steps": 2, "seed": 11},
        {"prompt": "a green tree", "steps": 2, "id": "tree"}, {"prompt": "a boat", "steps": 2, "guidance": 3.0}]


def _batch(prompts, out, *extra) -> int:
    return main(["batch", str(prompts), "--model", "tiny-sd15", "--out", str(out), "--no-progress", *extra])


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def test_two_ranks_per_image_make_every_row_once_like_one_process(tmp_path, capfd):
    prompts = tmp_path / "rows.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    single, grouped = tmp_path / "single", tmp_path / "grouped"
    assert _batch(prompts, single) == 0
    assert _batch(prompts, grouped, "--gpus", "2", "--parallel", "cfg=2") == 0
    assert "4 rows: 4 generated, 0 already done, 0 failed" in capfd.readouterr().out  # leaders' tallies only
    ok = [r for r in mf.read_all(grouped) if r.get("event") == "row" and r.get("status") == "ok"]
    assert sorted(r["index"] for r in ok) == [0, 1, 2, 3]  # each row once
    assert {r["rank"] for r in ok} == {0}  # the copy's leader wrote them all
    starts = [r for r in mf.read_all(grouped) if r.get("event") == "start"]
    assert [r["rank"] for r in starts] == [0]  # rank 1 wrote no manifest line
    names = sorted(p.name for p in single.glob("*.png"))
    assert names == sorted(p.name for p in grouped.glob("*.png")) and len(names) == 4
    for name in names:
        assert np.abs(_pixels(grouped / name) - _pixels(single / name)).max() <= 1
        side = json.loads((grouped / (name + ".json")).read_text())
        assert side["parallel"]["config"]["cfg"] == 2 and side["parallel"]["cfg_gathers"] > 0  # really split
    # Resuming with the same command does nothing: the leader's list of rows to do is empty for both ranks.
    assert _batch(prompts, grouped, "--gpus", "2", "--parallel", "cfg=2") == 0
    assert "4 rows: 0 generated, 4 already done, 0 failed" in capfd.readouterr().out


def test_two_ranks_per_image_as_components_make_every_row_once(tmp_path, capfd):
    prompts = tmp_path / "rows.jsonl"
    prompts.write_text("".join(json.dumps({**r, "steps": 5}) + "\n" for r in ROWS[:2]))
    out = tmp_path / "async"
    assert _batch(prompts, out, "--gpus", "2", "--parallel", "components=2") == 0
    assert "2 rows: 2 generated, 0 already done, 0 failed" in capfd.readouterr().out
    sides = [json.loads(p.read_text()) for p in sorted(out.glob("*.png.json"))]
    assert len(sides) == 2
    for side in sides:
        assert side["parallel"]["strategies"] == ["components:2"] and side["parallel"]["component_async_steps"] > 0


def test_a_world_the_degree_does_not_divide_is_refused(tmp_path, capsys):
    prompts = tmp_path / "rows.jsonl"
    prompts.write_text(json.dumps(ROWS[0]) + "\n")
    assert _batch(prompts, tmp_path / "out", "--gpus", "3", "--parallel", "cfg=2") == 2
    assert "--parallel: a group of 2 ranks per image needs a number of processes that is a multiple of 2, not 3" \
        in capsys.readouterr().err

import pytest  # noqa: E402

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
