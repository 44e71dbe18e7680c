"""What one spawned 2-process gloo group checks for the web app's parallel worker group (results to JSON).

Rank 0 runs an `Engine` on a parallel tiny SD 1.5 (``cfg=2``, or the strategy given as FIELD=VALUE after the
results path, e.g. ``components=2``) with `web_group.Leader`; rank 1 follows.
Requests: a generate, a generate stopped after its first step, then a compare; and, on rank 0
alone, the same generate on a plain single-process pipeline as the reference.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import numpy as np
from PIL import Image

import accel
from accel.config import Config
from accel.parallel import ParallelConfig, parallel_stats

MODEL = "tiny-sd15"


def run(rank: int, path: str, strategy: dict) -> None:
    from accel.pipelines.load import load
    from accel.web.engine import Engine, Stopped
    from accel.web.group import Leader, follow, message_group

    group = message_group()

    def loader(name, index):
        pipe = load(name, seed=0)
        pipe.set_progress_bar_config(disable=True)
        return accel.parallelize(pipe, ParallelConfig(**strategy))

    if rank:
        follow(loader, MODEL, group)
        return
    out = Path(path).parent
    leader = Leader(group)
    try:
        engine = Engine(loader, MODEL, out_dir=out / "group", group=leader)
        req = engine.parse(prompt="a red cat", steps=2, seed=3)
        res = engine.run(req, Config(), "generate")
        stats = parallel_stats(engine.workers[0].pipe)
        gathers = stats.get("cfg_gathers", 0)
        cancel = threading.Event()
        stopped = False
        try:
            engine.run(engine.parse(prompt="a blue dog", steps=3, seed=1), Config(), "generate",
                       lambda phase, i, n: cancel.set() if i == 1 else None, cancel)
        except Stopped:
            stopped = True
        stopped_log = dict(engine.log[-1])
        comp = engine.run(req, Config(), "compare")  # the group still works after a stop
    finally:
        leader.close()
    single = Engine(load(MODEL, seed=0), MODEL, out_dir=out / "single")
    ref = single.run(req, Config(), "generate")

    def pixels(p):
        return np.asarray(Image.open(p), dtype=np.int16)

    results = {"max_level_diff": int(np.abs(pixels(res.outputs[0]) - pixels(ref.outputs[0])).max()),
               "compare_max_level_diff": int(np.abs(pixels(comp.outputs[0]) - pixels(ref.outputs[0])).max()),
               "cfg_gathers": gathers, "strategies": stats["strategies"], "stopped": stopped,
               "stopped_log": stopped_log,
               "outputs": sorted(p.name for p in (out / "group").iterdir() if p.suffix == ".png")}
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    from accel.parallel import spawn

    fields = dict(kv.split("=") for kv in sys.argv[2:]) or {"cfg": "2"}
    spawn(run, 2, (sys.argv[1], {k: int(v) for k, v in fields.items()}), backend="gloo", timeout_s=120)
