"""`accel bench`: measure speed and fidelity of presets, config files, sweeps and peers on a model.

The engine is `accel.eval.bench`; this module holds the command's options (shared with `accel tune`) and
prints the report.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..io.outputs import keep_text
from ..pipelines.load import DEFAULT_MODEL, ModelLoadError, default_device, load, quiet_loading
from .args import UsageError, check_output, positive_int, row_field

DESCRIPTION = "`accel bench`: speed and fidelity of presets, config files, sweeps and peers on any model, in one run."


def write_report(path: Path, report: dict) -> Path | None:
    """Write a JSON report to ``path`` (checked by `check_output` before the run); if the write fails now, the
    report goes beside it or to standard output (`accel.io.outputs.keep_text`). Returns where it went."""
    return keep_text(path, json.dumps(report, indent=1, default=str), say=lambda m: print(m, file=sys.stderr))


def add_model_args(p) -> None:
    """The model and call options `accel bench` and `accel tune` share with `accel generate`."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"hub id, local diffusers folder, built-in name (default {DEFAULT_MODEL}; see `accel models`), "
                        "or a shape model: shape:flux, shape:wan-1.3b, shape:sd15, shape:sdxl "
                        "(random weights at the real size; shape:flux:num_layers=2 shrinks it)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when present)")
    p.add_argument("--dtype", default="auto", help="bf16, fp16, fp32 or auto (bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--steps", type=row_field("steps"), default=None, help="denoising steps (default: the model's)")
    p.add_argument("--height", type=row_field("height"), default=None)
    p.add_argument("--width", type=row_field("width"), default=None)
    p.add_argument("--frames", type=row_field("frames"), default=None, help="video frames (video models)")
    p.add_argument("--guidance", type=row_field("guidance"), default=None)
    p.add_argument("--seeds", type=positive_int, default=1, help="seeds per prompt (0..N-1; default 1)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU: torch threads (1 keeps CPU time steady on a shared machine)")


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure speed and fidelity of presets, configs and peers on a model",
                       description=DESCRIPTION)
    add_model_args(p)
    p.add_argument("--presets", default="off,safe,balanced,fast",
                   help="comma list of presets to measure (off is the baseline and always runs; default: "
                        "off,safe,balanced,fast)")
    p.add_argument("--configs", nargs="+", default=[], metavar="FILE",
                   help="config files (or outputs' sidecars) to measure, one row each")
    p.add_argument("--sweep", action="append", default=[], metavar="KNOB",
                   help="rows over a technique's main knob (cache, tokens, attention) or section.field=v1,v2,... "
                        "(e.g. cache.threshold=0.05,0.1,0.2); repeatable")
    p.add_argument("--peers", default="none",
                   help="peer rows: all, sweep (each step cache over its main knob), none, or a comma list "
                        "(diffusers, cache-dit, tomesd, DeepCache, or a full name); peers not installed or not for "
                        "this family are listed with the reason")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="prompt file (.txt/.jsonl/.csv as accel batch reads); default: the built-in trained "
                        "model's held-out prompts (scored by the checker), else a few generic prompts")
    p.add_argument("--n-prompts", type=positive_int, default=None, help="how many default prompts (default 4 "
                   "on ref-* models, else 2)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed rounds (median; default 3)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up call of each row")
    p.add_argument("--json", default=None, metavar="FILE", help="write the JSON report here")
    p.set_defaults(func=cmd_bench)


def prepare(args):
    """The `Workload` of the model and call options; a prompt file is read before the model loads."""
    with quiet_loading():
        from ..eval.bench import read_prompts, workload

    if args.prompts is not None and not Path(args.prompts).is_file():
        raise UsageError(f"--prompts {args.prompts!r}: no such file")
    prompts = read_prompts(args.prompts) if args.prompts else None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    device = args.device or default_device()
    try:
        pipe = load(args.model, device=device, dtype=args.dtype, seed=0)
    except ModelLoadError as e:
        raise UsageError(str(e)) from None
    pipe.set_progress_bar_config(disable=True)
    work = workload(pipe, args.model, prompts=prompts, n_prompts=getattr(args, "n_prompts", None), seeds=args.seeds,
                    steps=args.steps, height=args.height, width=args.width, frames=args.frames,
                    guidance=args.guidance, device=device)
    return work


def cmd_bench(args) -> int:
    with quiet_loading():  # the engine loads torch and diffusers; diffusers' first import says nothing to a user
        from ..eval import peers
        from ..eval.bench import (
            RANDOM_WEIGHTS_NOTE,
            Row,
            config_rows,
            environment,
            frontier_lines,
            peer_rows,
            preset_rows,
            report,
            run,
            sweep_rows,
            table,
        )

    names = [n.strip() for n in args.presets.split(",") if n.strip()]
    for path in args.configs:
        if not Path(path).is_file():
            raise UsageError(f"--configs {path!r}: no such file")
    if args.json:
        check_output("--json", args.json)
    try:
        peers.select(args.peers)
    except ValueError as e:
        raise UsageError(str(e)) from None
    try:  # config files are read and checked before the model loads (the preset under them is off)
        configs = config_rows(args.configs, None)
        preset_rows(None, names)
    except ValueError as e:
        raise UsageError(str(e)) from None
    work = prepare(args)
    try:
        rows = [Row("off (baseline)", "baseline")] + preset_rows(work.family, names) + configs + \
            sweep_rows(work.family, args.sweep) + peer_rows(work, args.peers)
    except ValueError as e:
        raise UsageError(str(e)) from None
    env = environment(work.device)
    print(f"accel bench: {args.model} ({work.family}, {type(work.pipe).__name__}) on {env['device_name']}, "
          f"{len(work.calls)} call(s) of {work.steps} steps per row, {len(rows)} rows, {args.repeats} rounds",
          file=sys.stderr)
    if work.random_weights:
        print(f"note: {RANDOM_WEIGHTS_NOTE}", file=sys.stderr)
    results, stopped = run(work, rows, repeats=args.repeats, warmup=not args.no_warmup)
    rep = report(work, results, repeats=args.repeats, stopped=stopped, env=env)
    print(f"\n### {args.model}: {env['device_name']}, torch {env['torch']}, diffusers {env['diffusers']}, "
          f"commit {env['commit'] or '-'}, {env['date']}\n")
    print(f"{len(work.calls)} call(s) per row ({work.steps} steps); time: {env['timing']}, median of "
          f"{args.repeats} round(s) after a warm-up; fidelity against the baseline's output of the same prompt and "
          "seed" + (" and the checker's scores" if work.scorer else "") + "\n")
    print(table(results))
    lines = frontier_lines(results)
    if lines:
        print("\nAgainst the peers (ours at least as fast, at least as close on the worst prompt, scores at least "
              "as high):\n" + "\n".join(lines))
    if work.random_weights:
        print(f"\nNote: {RANDOM_WEIGHTS_NOTE}.")
    if stopped:
        print("\nStopped early: the rows above hold what was measured.")
    if args.json and (where := write_report(Path(args.json), rep)):
        print(f"\nwrote {where}")
    return 130 if stopped else 0
