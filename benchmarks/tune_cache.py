"""Per-family sweep of step-cache settings: the table the cache presets are read from.

For every family it runs the uncached pipeline and a grid of cache settings side by side (round-robin
over repeats, so the machine's load drift hits every row alike), and prints one table per family:
the median CPU time of the denoiser's forwards (the part a step cache can save) and of the whole
call, their ratios to the baseline, the hit rate (reused / all denoiser forwards), and PSNR/SSIM of
the output against the uncached output of the same seed. Then it applies the preset rule
(`pick`) and prints the resulting ``PRESETS`` rows.

Models: the tiny pipelines of `accel.pipelines.tiny` with the DiT families' transformers rebuilt
at reduced depth (8 blocks: a 1-2 block stack leaves nothing worth caching), random weights;
``--ref-sd PATH`` and ``--ref-dit PATH`` add the trained reference pipelines (SD1.5 layout, Flux
classes; trained on procedural shapes): their rows decide ``sd15`` and ``flux``, and the PSNR
offset between each and its random-weight twin corrects the floors of the other UNets and DiTs,
since random weights misstate how much features move between steps.

    python benchmarks/tune_cache.py                       # all families (~10 min on 2 cores)
    python benchmarks/tune_cache.py --families flux wan --quick
    python benchmarks/tune_cache.py --ref-sd accel/pipelines/ref_models/ref-sd \
        --ref-dit accel/pipelines/ref_models/ref-dit --json tune.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import numpy as np
import torch

import accel
from accel import presets
from accel.eval.clock import measure, median, round_robin
from accel.eval.metrics import compare
from accel.pipelines import tiny
from accel.pipelines.call import to_frames
from accel.presets import CACHE_FLOORS, SPEED_TIE

UNETS = ("sd15", "sdxl", "animatediff")
DITS = ("flux", "sd3", "pixart", "cogvideox", "wan", "ltx", "hunyuanvideo")
# Transformer depth for the sweep; dual-stream families keep 2 joint blocks before the single ones.
DEPTH = {"flux": {"num_layers": 2, "num_single_layers": 6},
         "hunyuanvideo": {"num_layers": 2, "num_single_layers": 6}}
DEFAULT_DEPTH = {"num_layers": 8}

# The preset rule: a tier's setting is the fastest one (median denoiser CPU time) whose PSNR against
# the uncached output is at least the tier's floor; settings within SPEED_TIE of the fastest count as
# equally fast (this machine's noise) and the one with the higher PSNR among them wins. The floors
# hold for trained weights; random weights change the output less per skipped step (their features
# are noise-like and the random VAE flattens the image), so on random-weight models every floor is
# raised by the measured offset between the random and the trained SD1.5-layout UNet on the same
# grid (median PSNR difference, `random_offset`; RANDOM_OFFSET when the trained model is not run).
TIERS = tuple(CACHE_FLOORS.items())
RANDOM_OFFSET = 10.0  # dB; measured 10.1 in BENCHMARKS.md's run (sd15 random vs ref-sd trained)


def unet_grid(quick: bool) -> list[dict]:
    intervals = (2, 3, 5) if quick else (2, 3, 4, 5)
    return [dict(method="deepcache", interval=i, schedule=s, branch=b)
            for i in intervals for s in ("uniform", "nonuniform") for b in (1, 2)
            if not (i == 2 and s == "nonuniform")]  # interval 2 nonuniform ~ uniform


def dit_grid(quick: bool) -> list[dict]:
    intervals = (2, 3, 4) if quick else (2, 3, 4, 5, 6, 8)
    grid = [dict(method="block", interval=i, warmup_steps=2, taylor_order=o) for i in intervals for o in (0, 1, 2)]
    # DBCache's Bn: one trailing block always computed, at the middle interval
    grid += [dict(method="block", interval=3, warmup_steps=2, taylor_order=o, compute_last_n=1) for o in (1, 2)]
    # adaptive (first-block-cache style): reuse while the first block's residual moved less than this
    return grid + [dict(method="block", threshold=t, warmup_steps=2) for t in ((0.1,) if quick else (0.05, 0.1, 0.2))]


def label(cfg: dict) -> str:
    short = {"interval": "i", "schedule": "", "branch": "b", "warmup_steps": "w", "taylor_order": "taylor",
             "compute_last_n": "last", "threshold": "th", "compute_first_n": "first"}
    parts = []
    for k, v in cfg.items():
        if k == "method" or (k == "schedule" and v == "uniform"):
            continue
        parts.append(f"{short.get(k, k)}{v}" if k != "schedule" else "nonuni")
    return f"{cfg['method']} " + " ".join(parts)


def deepen(pipe, name: str, seed: int = 0):
    """Rebuild the pipeline's transformer with more blocks (same width), random weights."""
    t = pipe.transformer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = type(t).from_config({**t.config, **DEPTH.get(name, DEFAULT_DEPTH)})
    new.eval()
    pipe.transformer = new
    return pipe


# trained reference model -> the family whose presets its rows decide
TRAINED = {"ref-sd": "sd15", "ref-dit": "flux"}


def build(name: str, folder: str | None):
    if name in TRAINED:
        from accel.pipelines import ref
        from accel.pipelines.load import load

        pipe = load(folder, device="cpu")
        pipe.set_progress_bar_config(disable=True)
        kwargs = {**ref.call_defaults(name), "prompt": "a red circle and a blue square", "output_type": "np",
                  "negative_prompt": ""}
        return pipe, kwargs
    pipe = tiny.make(name)
    if name in DITS:
        deepen(pipe, name)
    return pipe, tiny.example_inputs(name)


class DenoiserClock:
    """The time of each of the denoiser's forwards (`accel.eval.clock.measure` around it: process CPU
    time on a CPU) while open. It wraps the forward the pipeline calls now (with any hook installed
    before it), so open it after switching a technique on and close it before switching it off."""

    def __init__(self, pipe, device="cpu"):
        self.module = pipe.unet if hasattr(pipe, "unet") and pipe.unet is not None else pipe.transformer
        self.times: list[float] = []
        self._saved = self.module.__dict__.get("forward")
        inner = self.module.forward

        def forward(*args, **kwargs):
            sample = measure(lambda: inner(*args, **kwargs), device)
            self.times.append(sample.seconds)
            return sample.out

        self.module.forward = forward

    @property
    def seconds(self) -> float:
        return sum(self.times)

    def close(self):
        if self._saved is None:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = self._saved


def sweep(name: str, pipe, kwargs, grid: list[dict], steps: int, repeats: int) -> list[dict]:
    kwargs = {**kwargs, "num_inference_steps": steps}

    def call():
        return to_frames(pipe(**{**kwargs, "generator": torch.Generator().manual_seed(0)}))

    call()  # warm-up: first-call set-up costs out of every row
    variants = [None, *grid]

    def row(cfg):
        """(denoiser CPU s, call CPU s, output, cache stats) of one call."""
        if cfg is not None:
            accel.apply(pipe, {"cache": cfg})
        try:
            clock = DenoiserClock(pipe)
            try:
                total = measure(call)
            finally:
                clock.close()
            return clock.seconds, total.seconds, total.out, accel.stats(pipe)["cache"] if cfg is not None else {}
        finally:
            if cfg is not None:
                accel.remove(pipe)

    samples, _ = round_robin({i: (lambda cfg=cfg: row(cfg)) for i, cfg in enumerate(variants)}, repeats)
    rows = []
    base_d, base_t = median(samples[0], 0), median(samples[0], 1)
    for i, cfg in enumerate(variants):
        d, t = median(samples[i], 0), median(samples[i], 1)
        c = compare(samples[0][-1][2], samples[i][-1][2])
        st = samples[i][-1][3]
        rows.append(dict(cfg=cfg, denoiser_s=d, speedup=base_d / d, call_s=t, call_speedup=base_t / t,
                         hit=st.get("hit_rate", 0.0), psnr=float("inf") if c["psnr"] is None else c["psnr"],
                         ssim=c["ssim"],
                         reused=st.get("reused", 0), computed=st.get("computed", 0)))
        print(f"  {name}: {label(cfg) if cfg else 'baseline'}: {base_d / d:.2f}x {rows[-1]['psnr']:.1f} dB",
              file=sys.stderr, flush=True)
    return rows


def pick(rows: list[dict], floor: float) -> dict | None:
    """The tier's setting by the preset rule (`accel.presets.pick`): fastest with PSNR >= floor; near-ties
    (SPEED_TIE) go to the higher PSNR."""
    return presets.pick([r for r in rows if _preset_ok(r)], floor)


def _preset_ok(row: dict) -> bool:
    """A preset must apply to a denoiser of any depth: compute_last_n > 0 is left out, since with the
    always-computed first block it leaves nothing to cache in a 2-block model (the tiny pipelines)."""
    return row["cfg"] is not None and not row["cfg"].get("compute_last_n")


def random_offset(random_rows: list[dict], trained_rows: list[dict]) -> float:
    """Median PSNR excess of the random-weight model over the trained one, setting by setting."""
    trained = {label(r["cfg"]): r["psnr"] for r in trained_rows if r["cfg"] is not None}
    diffs = [r["psnr"] - trained[label(r["cfg"])] for r in random_rows
             if r["cfg"] is not None and label(r["cfg"]) in trained]
    return statistics.median(diffs) if diffs else RANDOM_OFFSET


def pick_common(tables: dict[str, list[dict]], floor: float) -> dict | None:
    """One setting for every family of ``tables``: meets the floor on each, best worst-case speedup."""
    by_label = {}
    for rows in tables.values():
        for r in rows:
            if _preset_ok(r):
                by_label.setdefault(label(r["cfg"]), []).append(r)
    ok = {k: v for k, v in by_label.items() if len(v) == len(tables) and min(r["psnr"] for r in v) >= floor}
    if not ok:
        return None
    k = max(ok, key=lambda k: (min(r["speedup"] for r in ok[k]), min(r["psnr"] for r in ok[k])))
    return ok[k][0]


def print_table(name: str, rows: list[dict], steps: int, repeats: int) -> None:
    print(f"\n#### {name} ({steps} steps, median of {repeats})\n")
    print("| setting | denoiser CPU s | speedup (denoiser) | speedup (call) | hit rate | PSNR dB | SSIM "
          "| reused/computed |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        p = "inf" if r["psnr"] == float("inf") else f"{r['psnr']:.1f}"
        print(f"| {label(r['cfg']) if r['cfg'] else 'baseline'} | {r['denoiser_s']:.2f} | {r['speedup']:.2f}x "
              f"| {r['call_speedup']:.2f}x | {r['hit']:.2f} | {p} | {r['ssim']:.3f} "
              f"| {r['reused']}/{r['computed']} |")
    sys.stdout.flush()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=[*UNETS, *DITS], choices=[*UNETS, *DITS])
    ap.add_argument("--ref-sd", help="a trained ref-sd pipeline folder; its rows decide the sd15 presets")
    ap.add_argument("--ref-dit", help="a trained ref-dit (Flux) pipeline folder; its rows decide the flux presets "
                                      "and the random-weight offset of every DiT")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", help="also write the tables to this JSON file")
    ap.add_argument("--from-json", help="print the presets the rule picks from a saved --json run (no runs)")
    ap.add_argument("--quick", action="store_true", help="smaller grid, one repeat, 10 steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 10, 1
    # One thread: on a shared machine the CPU time of a 2-thread run inflates with the other jobs'
    # load (spin-waits); a 1-thread run's CPU time is what the work costs.
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, machine: 2-core CPU, shared/noisy, 1 thread, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    names = list(args.families)
    folders = {"ref-sd": args.ref_sd, "ref-dit": args.ref_dit}
    names += [n for n, f in folders.items() if f]
    tables = {}
    if args.from_json:  # re-apply the rule to a saved run
        with open(args.from_json) as f:
            tables, names = json.load(f)["tables"], []
    for name in names:
        pipe, kwargs = build(name, folders.get(name))
        steps = kwargs.get("num_inference_steps", args.steps) if name in TRAINED else args.steps
        grid = unet_grid(args.quick) if name in (*UNETS, "ref-sd") else dit_grid(args.quick)
        rows = sweep(name, pipe, kwargs, grid, steps, args.repeats)
        print_table(f"{name} (trained, 64 px)" if name in TRAINED else name, rows, steps, args.repeats)
        tables[name] = rows
    # Random weights misstate how much features move between steps, and by a different amount in
    # UNets and DiTs: each kind's offset is measured on its own trained model where it was run.
    offsets = {}
    for kind, (fam, trained) in {"unet": ("sd15", "ref-sd"), "dit": ("flux", "ref-dit")}.items():
        both = {fam, trained} <= set(tables)
        offsets[kind] = random_offset(tables[fam], tables[trained]) if both else RANDOM_OFFSET
    print(f"\n#### Preset rule: fastest (denoiser) with PSNR >= {', '.join(f'{f:g} dB ({t})' for t, f in TIERS)} "
          f"on trained weights, + the random-weight offset on random weights (UNets {offsets['unet']:+.1f} dB, "
          f"DiTs {offsets['dit']:+.1f} dB); within {SPEED_TIE:.0%} of the fastest the higher PSNR wins\n")
    chosen = {}
    for name, rows in tables.items():
        fam = TRAINED.get(name, name)
        if any(t in tables and f == name for t, f in TRAINED.items()):
            continue  # the trained model decides this family
        extra = 0.0 if name in TRAINED else offsets["unet" if name in UNETS else "dit"]
        above = None
        for tier, floor in TIERS:
            r = pick(rows, floor + extra)
            if above is not None and (r is None or r["speedup"] < above["speedup"]):
                r = above  # a looser floor never yields a slower tier (noise can make it look so)
            chosen.setdefault(tier, {})[fam] = above = r
    dits = {k: v for k, v in tables.items() if k in DITS}
    for tier, floor in TIERS:
        if dits:
            chosen[tier]["*"] = pick_common(dits, floor + offsets["dit"])
    for tier, fams in chosen.items():
        print(f"{tier}:")
        for fam, r in fams.items():
            what = "{'method': 'none'}  # no setting meets the floor" if r is None else \
                f"{r['cfg']}  # {r['speedup']:.2f}x denoiser, {r['psnr']:.1f} dB"
            print(f"    {fam!r}: {what}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"offsets": offsets, "tables": tables}, f, default=str)
    return tables, chosen


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
