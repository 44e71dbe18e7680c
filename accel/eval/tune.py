"""`accel tune`: the fastest setting that keeps every one of your prompts above a PSNR floor.

    accel tune --model ref-dit --prompts prompts.txt --min-psnr 32 --out tuned.yaml
    accel generate --model ref-dit --config tuned.yaml --prompt "..."

The floor is PSNR against the unaccelerated output of the same prompt and seed, checked per prompt:
a setting passes only if its worst prompt meets it (a fixed cache threshold of 0.2 gave 42.8 dB on
one prompt and 22.3 dB on another). The search, on the user's model, prompts and call:

1. Calibrate: a DiT's block-cache change thresholds are read off the user's prompts (the quantiles
   of the first block's step-to-step change, `calibrate_thresholds`), not taken from a fixed grid.
2. Screen: the presets ``safe``/``balanced``/``fast`` and each technique's knob alone (the cache,
   token and sparse-attention settings valid for the family, `accel.eval.space`), one timed run
   each; a knob stops at its first setting that fails the floor (the next ones are more lossy).
3. Stack: the fastest passing cache setting with the fastest passing token or attention setting.
4. Time: the fastest passing settings, the best passing preset and the baseline, round-robin over
   ``--repeats`` (`accel.eval.bench.run`); the pick is the fastest median that meets the floor, so it
   is never slower than the best preset that meets it in the same measurement.

The result is a config file (every technique section written out, so the preset under ``--config``
does not change it) that `accel generate`, `accel batch` and `accel app` take. When no setting meets
the floor, the unaccelerated config is written and the message says so. ``--time-budget`` ends the
screening early; Ctrl-C ends it at once; either way the best setting found so far is written.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import bench, space

SPEED_TIE = 0.03  # final medians within 3% count as equally fast: the higher worst-prompt PSNR wins
SECTIONS = ("cache", "tokens", "attention")
QUANTILES = (0.3, 0.5, 0.7, 0.85)


def parse_duration(text: str) -> float:
    """Seconds of ``90``, ``90s``, ``10m``, ``1.5h``."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"--time-budget {text!r}: give a duration such as 600, 600s, 10m or 1h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def calibrate_thresholds(work: bench.Workload, quantiles=QUANTILES) -> list[float]:
    """Block-cache thresholds at ``quantiles`` of the step-to-step change of the first block's output
    on the workload's calls (DiTs; [] for UNets). A threshold at the q-quantile would let about a
    fraction q of the steps reuse if changes did not accumulate; they do, so fewer reuse."""
    import numpy as np
    import torch

    import accel
    from accel.api import _STATE_ATTR

    if space.FAMILIES[work.family].kind != "dit":
        return []
    accel.apply(work.pipe, {"cache": {"method": "block", "threshold": 1e-12, "warmup_steps": 2}})
    try:
        trace = work.pipe.__dict__[_STATE_ATTR].handles["cache"].trace()
        changes = []
        for call in work.calls:
            trace.clear()
            work.pipe(**call.kwargs, generator=torch.Generator("cpu").manual_seed(call.seed))
            changes += [d for _, _, action, d in trace if action == "change" and np.isfinite(d)]
    finally:
        accel.remove(work.pipe)
    if not changes:
        return []
    qs = sorted({float(f"{np.quantile(changes, q):.3g}") for q in quantiles})
    return [q for q in qs if q > 0]


@dataclasses.dataclass
class Outcome:
    pick: bench.Result | None  # None: nothing met the floor
    pick_config: object  # accel.Config (the unaccelerated one when nothing met the floor)
    best_preset: bench.Result | None
    screened: list[bench.Result]
    final: list[bench.Result]
    thresholds: list[float]
    stopped: str | None  # why the search ended early ("time budget", "interrupted") or None


def _row(s: space.Setting) -> bench.Row:
    return bench.Row(s.label, "preset" if s.technique == "preset" else "candidate", s.config)


def _stack(a: space.Setting, b: space.Setting) -> space.Setting:
    from ..config import Config

    parts = {sec: getattr(s.config, sec).to_dict() for s in (a, b) for sec in SECTIONS
             if getattr(s.config, sec).enabled}
    return space.Setting(f"{a.label} + {b.label}", Config.from_dict(parts), "stack")


def search(work: bench.Workload, floor: float, *, budget_s: float | None = None, repeats: int = 2,
           shortlist: int = 3, progress: bool = True, log: Callable = print) -> Outcome:
    """Screen, stack and time the settings for ``work`` (see the module's docstring)."""
    t0 = time.monotonic()
    sampler = bench._Sampler(work)
    base = bench.Row("off (baseline)", "baseline")
    results: dict[str, bench.Result] = {}
    settings: dict[str, space.Setting] = {}
    stopped = None
    bar = bench._progress(0, progress, "accel tune")

    def out_of_time() -> bool:
        return budget_s is not None and time.monotonic() - t0 > budget_s

    def screen(s: space.Setting | None) -> bench.Result:
        row = base if s is None else _row(s)
        bar.total = (bar.total or 0) + 1
        bar.set_postfix_str(row.label[:40], refresh=False)
        runs, error = [], None
        try:
            sampler.sample(row, work.calls[:1], keep=False)  # untimed warm-up
            runs.append(sampler.sample(row))
        except KeyboardInterrupt:
            raise
        except Exception as e:
            from .clock import error_line

            if s is None:
                raise RuntimeError(f"the baseline could not run: {error_line(e)}") from e
            error = error_line(e)
        b = results.get(base.label)
        res = bench.result_of(row, runs, b.seconds if b else (runs[0][0] if runs else None), sampler, error)
        bar.update(1)
        results[row.label] = res
        if s is not None:
            settings[row.label] = s
        return res

    from ..pipelines.load import quiet_loading as quiet

    thresholds: list[float] = []
    try:
        with quiet():
            screen(None)
            thresholds = calibrate_thresholds(work)
            if thresholds:
                log(f"calibrated block-cache thresholds on your prompts: {', '.join(f'{t:g}' for t in thresholds)}")
            groups: dict[str, list[space.Setting]] = {}
            for s in (space.preset_settings(work.family) + space.cache_settings(work.family, thresholds or None)
                      + space.token_settings(work.family) + space.attention_settings(work.family)):
                groups.setdefault(s.technique, []).append(s)
            best: dict[str, space.Setting] = {}  # technique -> fastest passing single setting
            for tech, group in groups.items():
                for s in sorted(group, key=lambda s: s.order):
                    if out_of_time():
                        raise TimeoutError
                    if s.technique == "preset" and any(s.config == settings[k].config for k in settings):
                        continue  # a preset equal to one already screened (off on this family)
                    if s.technique == "preset" and not s.config.enabled:
                        continue
                    r = screen(s)
                    if not r.meets(floor):
                        if tech != "preset":
                            break  # the rest of this knob removes more
                        continue
                    key = tech.split(":")[0]
                    if key != "preset" and (key not in best or r.seconds < results[best[key].label].seconds):
                        best[key] = s
            for extra in ("tokens", "attention"):
                if "cache" in best and extra in best and not out_of_time():
                    screen(_stack(best["cache"], best[extra]))
            if out_of_time():
                raise TimeoutError
    except TimeoutError:
        stopped = "time budget"
    except KeyboardInterrupt:
        stopped = "interrupted"
    finally:
        bar.close()

    # a setting that did nothing on these calls (identical output) is never a pick, whatever the clock said
    passing = [r for r in results.values() if r.kind != "baseline" and r.meets(floor) and r.speedup and r.engaged]
    presets = [r for r in passing if r.kind == "preset"]
    final: list[bench.Result] = []
    if passing and stopped is None:
        chosen = sorted(passing, key=lambda r: r.seconds)[:shortlist]
        if presets:
            top_preset = min(presets, key=lambda r: r.seconds)
            chosen += [top_preset] if top_preset not in chosen else []
        rows = [base] + [bench.Row(r.label, r.kind, settings[r.label].config) for r in chosen]
        final, interrupted = bench.run(work, rows, repeats=repeats, progress=progress, sampler=sampler)
        if interrupted:
            stopped = "interrupted"
            final = []
    ranked = [r for r in (final or list(results.values()))
              if r.kind != "baseline" and r.ran and r.meets(floor) and r.engaged and (r.speedup or 0) > 1 + SPEED_TIE]
    pick = _fastest(ranked)
    best_preset = _fastest([r for r in ranked if r.kind == "preset"])
    from ..config import Config

    return Outcome(pick, settings[pick.label].config if pick else Config(), best_preset,
                   list(results.values()), final, thresholds, stopped)


def _fastest(rows: list[bench.Result]) -> bench.Result | None:
    """The fastest row; rows within SPEED_TIE of it count as equally fast and the best worst-prompt PSNR wins."""
    if not rows:
        return None
    top = min(r.seconds for r in rows)
    tied = [r for r in rows if r.seconds <= top * (1 + SPEED_TIE)]
    return max(tied, key=lambda r: (float("inf") if r.psnr_worst is None else r.psnr_worst, -r.seconds))


def config_text(outcome: Outcome, *, model: str, floor: float, calls: int) -> str:
    """The tuned config file (YAML): a comment saying what was measured, then every technique section."""
    import yaml

    cfg = outcome.pick_config
    body = {s: getattr(cfg, s).to_dict() for s in SECTIONS}
    if outcome.pick is None:
        what = f"no faster setting kept every prompt at or above {floor:g} dB: this is the unaccelerated config"
    else:
        p = outcome.pick
        what = (f"{p.label}: {p.speedup:.2f}x, worst prompt {bench._fmt_db(p.psnr_worst)} dB "
                f"(floor {floor:g} dB)")
    head = [f"# accel tune --model {model} --min-psnr {floor:g}: {calls} call(s)", f"# {what}",
            "# every technique section is written, so the preset under --config does not change it"]
    return "\n".join(head) + "\n" + yaml.safe_dump(body, sort_keys=False)


# --- the command ---------------------------------------------------------------------------------
def add_parser(sub) -> None:
    p = sub.add_parser("tune", help="find the fastest setting that meets a PSNR floor on your prompts",
                       description=__doc__.split("\n\n")[0])
    bench.add_model_args(p)
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
    import json

    from ..app.cli import UsageError
    from ..config_base import FILE_FORMATS

    if not (0 < args.min_psnr < 100):
        raise UsageError(f"--min-psnr {args.min_psnr}: give a floor in dB between 0 and 100 (e.g. 32)")
    out = Path(args.out)
    if out.suffix.lower() not in FILE_FORMATS:
        raise UsageError(f"--out {args.out!r}: use a .yaml, .json or .toml file name")
    if not out.parent.is_dir():
        raise UsageError(f"--out {args.out!r}: the folder {str(out.parent)!r} does not exist")
    if args.repeats < 1:
        raise UsageError("--repeats: at least 1")
    try:
        budget = parse_duration(args.time_budget) if args.time_budget else None
    except ValueError as e:
        raise UsageError(str(e)) from None
    work = bench.prepare(args)
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
    text = config_text(outcome, model=args.model, floor=args.min_psnr, calls=len(work.calls))
    if out.suffix.lower() == ".yaml" or out.suffix.lower() == ".yml":
        out.write_text(text)
    else:
        outcome.pick_config.save(out)
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
        Path(args.json).write_text(json.dumps({**env, "model": args.model, "floor_db": args.min_psnr,
                                               "thresholds": outcome.thresholds, "stopped": outcome.stopped,
                                               "pick": outcome.pick.label if outcome.pick else None,
                                               "screened": [dataclasses.asdict(r) for r in outcome.screened],
                                               "final": [dataclasses.asdict(r) for r in outcome.final]},
                                              indent=1, default=str))
    return 0
