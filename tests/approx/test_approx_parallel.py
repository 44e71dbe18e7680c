"""The approximate cache under `accel.parallelize`: `accel batch --gpus 2 --parallel cfg=2 --approx-cache DIR`.

The 2 gloo processes make every row together (each computes one CFG branch). The copy's first rank alone
writes outputs and cache entries, and both ranks take its hit-or-miss decision, so a hit cuts both
schedules alike. Run through the command line in a fresh process, as a user runs it.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROWS = [{"prompt": "a red cat", "steps": 5}, {"prompt": "a blue dog", "steps": 5},
        {"prompt": "a red cat", "steps": 5, "seed": 9}]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_cfg_parallel_batch_writes_outputs_and_entries_once(tmp_path):
    prompts = tmp_path / "rows.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out, cache = tmp_path / "out", tmp_path / "cache"
    cmd = [sys.executable, "-m", "accel", "batch", str(prompts), "--model", "tiny-sd15", "--out", str(out),
           "--no-progress", "--device", "cpu", "--gpus", "2", "--parallel", "cfg=2", "--preset", "off",
           "--approx-cache", str(cache),
           # the random tiny text encoder finds every prompt alike: exact matches only
           "--set", "approx.similarity=[0.999]", "--set", "approx.skip=[0.4]"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    images = sorted(out.glob("*.png"))
    assert len(images) == 3
    approx = [json.loads(Path(f"{p}.json").read_text())["stats"]["approx"] for p in images]
    assert sorted(a["hit"] for a in approx) == [False, False, True]
    assert sum(a["stored"] for a in approx) == 2
    hit = next(a for a in approx if a["hit"])
    assert hit["skipped_steps"] == 2 and hit["similarity"] == pytest.approx(1.0)
    # one entry per missed prompt: the second rank wrote none
    assert len(list(cache.glob("*.safetensors"))) == 2
