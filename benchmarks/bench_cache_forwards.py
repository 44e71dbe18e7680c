"""Per-forward CPU time of our DeepCache against DeepCacheSDHelper on SD1.5's real UNet.

Where `bench_cache.py` compares whole calls (which swing with the machine's load), this times
each denoiser forward (full and shallow steps separately), calls round-robin, so a per-step
overhead on either side would show as a consistently slower shallow forward.

The model is the shape model ``shape:sd15`` (``--width`` sets its channel width); the peer is
`accel.eval.peers`' DeepCache (interval 3, branch 0), and ours runs at the same interval. Times come
from `accel.eval.clock` (`tune_cache.DenoiserClock` around each forward).

    python benchmarks/bench_cache_forwards.py [--steps 7 --repeats 3 --px 512 --width 320]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from tune_cache import DenoiserClock  # noqa: E402

import accel  # noqa: E402
from accel.eval import peers  # noqa: E402
from accel.eval.clock import measure  # noqa: E402
from accel.pipelines import sized  # noqa: E402

PEER = peers.PEERS["DeepCache interval 3"]
INTERVAL = 3  # the peer's


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--px", type=int, default=512)
    ap.add_argument("--width", type=int, default=320)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    w = args.width
    pipe = sized.make("sd15", overrides={"block_out_channels": (w, 2 * w, 4 * w, 4 * w)})
    kw = dict(prompt="a photo of a cat", negative_prompt="blurry", height=args.px, width=args.px,
              num_inference_steps=args.steps, guidance_scale=7.5, output_type="np")
    rows = {"ours": (lambda: accel.apply(pipe, {"cache": {"method": "deepcache", "interval": INTERVAL}}),
                     lambda: accel.remove(pipe)),
            PEER.name: (lambda: PEER.enable(pipe, args.steps), lambda: PEER.disable(pipe))}
    print(f"SD1.5 UNet width {w}, {args.px} px, {args.steps} steps, interval {INTERVAL}, CFG batched, "
          "1 thread; CPU s per call and per denoiser forward")
    print("| repeat | setting | call | forwards |\n|---|---|---|---|")
    for r in range(args.repeats):
        for name, (on, off) in rows.items():
            on()
            try:
                clock = DenoiserClock(pipe)
                try:
                    call = measure(lambda: pipe(**kw, generator=torch.Generator().manual_seed(0)))
                finally:
                    clock.close()
            finally:
                off()
            print(f"| {r + 1} | {name} | {call.seconds:.1f} | {' / '.join(f'{x:.2f}' for x in clock.times)} |",
                  flush=True)


if __name__ == "__main__":
    main()
