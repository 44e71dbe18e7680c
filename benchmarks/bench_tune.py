"""`accel tune` against the presets and against its own search without the step axis, on prompts it never saw.

For each trained reference model: `accel tune`'s search (`accel.eval.tune.search`) picks a setting on
``--tune-prompts`` held-out prompts at the floor; then the baseline, the pick and every preset run
round-robin on ``--prompts`` other held-out prompts (`accel.eval.bench.run`). The table says whether
the pick still meets the floor on every new prompt, and how its speed compares with the fastest preset
that meets the same floor there.

    python benchmarks/bench_tune.py                        # ref-sd and ref-dit, floor 32 dB
    python benchmarks/bench_tune.py --models ref-sd --floor 35 --prompts 12 --repeats 2
"""

from __future__ import annotations

import argparse

import torch

from accel.eval import bench, space, tune
from accel.pipelines.load import load
from accel.pipelines.ref import data as shapes


def run_model(model: str, floor: float, n_tune: int, n_eval: int, repeats: int, steps: int | None,
              with_cache_only: bool = True) -> None:
    pipe = load(model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    held = bench.workload(pipe, model, n_prompts=n_eval, steps=steps, device="cpu")  # the default held-out set
    seen = {c.kwargs["prompt"] for c in held.calls}
    others = [s.prompt for s in shapes.held_out_scenes(4 * n_tune + 40, n_shapes=1, seed=2024) if s.prompt not in seen]
    tuning = bench.workload(pipe, model, prompts=list(dict.fromkeys(others))[:n_tune], steps=steps, device="cpu")
    outcome = tune.search(tuning, floor, repeats=repeats, progress=False, log=lambda m: print(f"  {m}"))
    pick = outcome.pick
    print(f"\n### {model}: tuned on {n_tune} prompts at {floor:g} dB -> "
          f"{pick.label + f' ({pick.speedup:.2f}x, worst {bench._fmt_db(pick.psnr_worst)} dB)' if pick else 'nothing'}")
    assert len(tuning.calls) == n_tune and not seen & {c.kwargs["prompt"] for c in tuning.calls}
    rows = [bench.Row("off (baseline)", "baseline")]
    if pick:
        rows.append(bench.Row(f"tuned: {pick.label}", "config", outcome.pick_config))
    if with_cache_only:  # the same search without the step axis: what the caches alone reach
        alone = tune.search(tuning, floor, repeats=repeats, progress=False, log=lambda m: None, steps_axis=False)
        if alone.pick:
            print(f"  cache/token-only pick: {alone.pick.label} ({alone.pick.speedup:.2f}x on the tuning prompts)")
            rows.append(bench.Row(f"tuned without steps: {alone.pick.label}", "config", alone.pick_config))
    rows += [bench.Row(s.label, "preset", s.config) for s in space.preset_settings(held.family)]
    results, _ = bench.run(held, rows, repeats=repeats, progress=False)
    env = bench.environment("cpu")
    print(f"\n{n_eval} other held-out prompts, {held.steps} steps, median of {repeats}; {env['device_name']}, "
          f"torch {env['torch']}, diffusers {env['diffusers']}, commit {env['commit']}, {env['date']}\n")
    print(bench.table(results))
    passing = [r for r in results[1:] if r.meets(floor) and r.engaged and r.kind == "preset"]
    best = min(passing, key=lambda r: r.seconds, default=None)
    tuned = results[1] if pick else None
    verdict = (f"tuned meets {floor:g} dB on every new prompt: {tuned.meets(floor)} (worst "
               f"{bench._fmt_db(tuned.psnr_worst)} dB); " if tuned else "no pick; ")
    verdict += (f"fastest preset meeting it: {best.label} {best.speedup:.2f}x" if best else "no preset meets it")
    if tuned and best:
        verdict += f"; tuned / preset speed: {best.seconds / tuned.seconds:.2f}"
    alone = next((r for r in results if r.label.startswith("tuned without steps")), None)
    if tuned and alone:
        verdict += (f"; without the step axis: {alone.label[len('tuned without steps: '):]} "
                    f"{alone.speedup:.2f}x, worst {bench._fmt_db(alone.psnr_worst)} dB (meets: {alone.meets(floor)}); "
                    f"tuned / it speed: {alone.seconds / tuned.seconds:.2f}")
    print(f"\n{verdict}\n", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["ref-sd", "ref-dit"])
    ap.add_argument("--floor", type=float, default=32.0)
    ap.add_argument("--tune-prompts", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's own)")
    ap.add_argument("--no-cache-only", action="store_true", help="skip the search without the step axis")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # CPU time of a 1-thread run does not inflate with other jobs' load
    for model in args.models:
        run_model(model, args.floor, args.tune_prompts, args.prompts, args.repeats, args.steps,
                  not args.no_cache_only)


if __name__ == "__main__":
    main()
