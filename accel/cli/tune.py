"""`accel tune`: the command that finds the fastest setting keeping every prompt above a PSNR floor.

The search is `accel.eval.tune`; the model and call options are `accel bench`'s.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from ..config_base import FILE_FORMATS
from ..io.outputs import keep_text
from .args import UsageError, check_output
from .bench import add_model_args, prepare, write_report

DESCRIPTION = "`accel tune`: the fastest setting that keeps every one of your prompts above a PSNR floor."


def add_parser(sub) -> None:
    p = sub.add_parser("tune", help="find the fastest setting that meets a PSNR floor on your prompts",
                       description=DESCRIPTION)
    add_model_args(p)
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help="prompt file (.txt/.jsonl/.csv as accel batch reads): the prompts the floor must hold on")
    p.add_argument("--min-psnr", type=float, default=32.0,
                   help="floor in dB: every prompt's PSNR against the unaccelerated output (default 32)")
    p.add_argument("--out", required=True, metavar="FILE", help="config file to write (.yaml, .json or .toml)")
    p.add_argument("--time-budget", default=None, help="stop screening after this long (e.g. 10m, 600s)")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds of the final comparison (default 2)")
    p.add_argument("--json", default=None, metavar="FILE", help="write every measured row as JSON")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args) -> int:
    from ..eval import bench  # loads torch and diffusers
    from ..eval.tune import config_text, parse_duration, search

    if not (0 < args.min_psnr < 100):
        raise UsageError(f"--min-psnr {args.min_psnr}: give a floor in dB between 0 and 100 (e.g. 32)")
    out = Path(args.out)
    if out.suffix.lower() not in FILE_FORMATS:
        raise UsageError(f"--out {args.out!r}: use a .yaml, .json or .toml file name")
    check_output("--out", out)  # every file this run writes is checked before the model loads
    if args.json:
        check_output("--json", args.json)
    if args.repeats < 1:
        raise UsageError("--repeats: at least 1")
    try:
        budget = parse_duration(args.time_budget) if args.time_budget else None
    except ValueError as e:
        raise UsageError(str(e)) from None
    work = prepare(args)
    if work.random_weights:
        print(f"note: {bench.RANDOM_WEIGHTS_NOTE}", file=sys.stderr)
    print(f"accel tune: {args.model} ({work.family}), {len(work.calls)} call(s) of {work.steps} steps, floor "
          f"{args.min_psnr:g} dB on every prompt", file=sys.stderr)
    outcome = search(work, args.min_psnr, budget_s=budget, repeats=args.repeats,
                     log=lambda m: print(m, file=sys.stderr))
    print("\n### screened (one timed run each)\n")
    print(bench.table(outcome.screened))
    if outcome.final:
        print(f"\n### final: median of {args.repeats} rounds\n")
        print(bench.table(outcome.final))
    if outcome.stopped:
        print(f"\nStopped early ({outcome.stopped}): the pick is the best of what was measured.")
    for note in outcome.notes:
        print(f"\nNote: {note}.")
    outcome = _keep_olss(outcome, out)
    text = config_text(outcome, model=args.model, floor=args.min_psnr, calls=len(work.calls))
    if out.suffix.lower() not in (".yaml", ".yml"):
        text = outcome.pick_config.text_for(out)
    out = keep_text(out, text, say=lambda m: print(m, file=sys.stderr)) or out
    if outcome.pick is None:
        worst = max((r for r in outcome.screened if r.ran and r.kind != "baseline"),
                    key=lambda r: r.psnr_worst or 0, default=None)
        near = f" (closest: {worst.label}, worst prompt {bench._fmt_db(worst.psnr_worst)} dB)" if worst else ""
        print(f"\nNo setting kept every prompt at or above {args.min_psnr:g} dB while running faster than the "
              f"baseline{near}. Wrote the unaccelerated config to {out}; lower --min-psnr to trade fidelity for speed.")
    else:
        p = outcome.pick
        print(f"\nPicked {p.label}: {p.speedup:.2f}x, worst prompt {bench._fmt_db(p.psnr_worst)} dB "
              f"(floor {args.min_psnr:g} dB).")
        bp = outcome.best_preset
        print("Best preset meeting the floor: " + (f"{bp.label} at {bp.speedup:.2f}x." if bp else "none."))
        print(f"The floor held on these {len(work.calls)} calls; a prompt unlike them can still fall below it "
              "(BENCHMARKS.md \"Measuring your own model\"): tune on prompts like the ones you will run.")
        print(f"Wrote {out}: accel generate --model {args.model} --config {out} ...")
    if args.json:
        env = bench.environment(work.device)
        write_report(Path(args.json), {**env, "model": args.model, "floor_db": args.min_psnr,
                                               "thresholds": outcome.thresholds, "stopped": outcome.stopped,
                                               "pick": outcome.pick.label if outcome.pick else None,
                                               "screened": [dataclasses.asdict(r) for r in outcome.screened],
                                               "final": [dataclasses.asdict(r) for r in outcome.final]})
    return 0


def _keep_olss(outcome, out: Path):
    """A picked OLSS scheduler is copied beside the tuned config (``tuned.olss/`` for ``tuned.yaml``) and the
    config names it relative to the file, so the two move together."""
    import shutil

    solver = outcome.pick_config.solver
    if solver.scheduler != "olss":
        return outcome
    folder = out.with_name(f"{out.stem}.olss")
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(solver.olss, folder)
    print(f"Wrote the fitted scheduler to {folder}/ (solver.olss in the config names it; keep them together).")
    return dataclasses.replace(outcome, pick_config=outcome.pick_config.replace(solver={"olss": folder.name}))

