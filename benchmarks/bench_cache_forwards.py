"""Per-forward CPU time of our DeepCache against DeepCacheSDHelper on SD1.5's real UNet.

Where `bench_cache.py` compares whole calls (which swing with the machine's load), this times
each denoiser forward (full and shallow steps separately), calls round-robin, so a per-step
overhead on either side would show as a consistently slower shallow forward.

    python benchmarks/bench_cache_forwards.py [--steps 7 --interval 5 --repeats 3 --px 512]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))

from bench_cache import sd15_pipe  # noqa: E402

import accel  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--interval", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--px", type=int, default=512)
    ap.add_argument("--width", type=int, default=320)
    args = ap.parse_args(argv)
    from DeepCache import DeepCacheSDHelper

    torch.set_num_threads(1)
    pipe = sd15_pipe(args.width)
    kw = dict(prompt="a photo of a cat", negative_prompt="blurry", height=args.px, width=args.px,
              num_inference_steps=args.steps, guidance_scale=7.5, output_type="np")
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=args.interval, cache_branch_id=0)
    rows = {"ours": (lambda: accel.apply(pipe, {"cache": {"method": "deepcache", "interval": args.interval}}),
                     lambda: accel.remove(pipe)),
            "DeepCache": (helper.enable, helper.disable)}
    print(f"SD1.5 UNet width {args.width}, {args.px} px, {args.steps} steps, interval {args.interval}, CFG batched, "
          "1 thread; CPU s per call and per denoiser forward")
    print("| repeat | setting | call | forwards |\n|---|---|---|---|")
    for r in range(args.repeats):
        for name, (on, off) in rows.items():
            on()
            per: list[float] = []
            h1 = pipe.unet.register_forward_pre_hook(lambda *_, per=per: per.append(time.process_time()))
            h2 = pipe.unet.register_forward_hook(
                lambda *_, per=per: per.__setitem__(-1, time.process_time() - per[-1]))
            t = time.process_time()
            try:
                pipe(**kw, generator=torch.Generator().manual_seed(0))
            finally:
                h1.remove(), h2.remove(), off()
            print(f"| {r + 1} | {name} | {time.process_time() - t:.1f} | {' / '.join(f'{x:.2f}' for x in per)} |",
                  flush=True)


if __name__ == "__main__":
    main()
