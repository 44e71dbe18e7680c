"""`accel tune`: the fastest setting that keeps every one of your prompts above a PSNR floor.

    accel tune --model ref-dit --prompts prompts.txt --min-psnr 32 --out tuned.yaml
    accel generate --model ref-dit --config tuned.yaml --prompt "..."

The floor is PSNR against the unaccelerated output of the same prompt and seed, checked per prompt
(and on the built-in trained models, every checker score at least the baseline's): a setting passes only
if its worst prompt meets it (a fixed cache threshold of 0.2 gave 42.8 dB on
one prompt and 22.3 dB on another). The search, on the user's model, prompts and call:

1. Calibrate: a DiT's block-cache change thresholds are read off the user's prompts (the quantiles
   of the first block's step-to-step change, `calibrate_thresholds`), not taken from a fixed grid.
2. Screen: the presets ``safe``/``balanced``/``fast`` and each technique's knob alone (the cache,
   token and sparse-attention settings valid for the family, `accel.eval.space`), one timed run
   each; a knob stops at its first setting that fails the floor (the next ones are more lossy).
3. Stack: the fastest passing cache setting with the fastest passing token or attention setting.
4. Time: the fastest passing settings, the best passing preset and the baseline, round-robin over
   ``--repeats`` (`accel.eval.bench.run`); the pick follows the preset rule (`accel.presets.pick`):
   the fastest median that meets the floor, medians within `SPEED_TIE` (10%) counting as equally fast
   (the higher worst-prompt PSNR wins); so the pick is never clearly slower than the best preset that
   meets the floor in the same measurement.

The result is a config file (every technique section written out, so the preset under ``--config``
does not change it) that `accel generate`, `accel batch` and `accel app` take. When no setting meets
the floor, the unaccelerated config is written and the message says so. ``--time-budget`` ends the
screening early; Ctrl-C ends it at once; either way the best setting found so far is written.
"""

from __future__ import annotations

import dataclasses
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml

from .. import api, presets
from ..api import _STATE_ATTR
from ..config import TECHNIQUES, Config
from ..families import FAMILIES
from ..pipelines.load import quiet_loading
from ..presets import SPEED_TIE  # noqa: F401  (the tie this search uses, named here for its readers)
from . import bench, space
from .clock import error_line

SECTIONS = tuple(t.section for t in TECHNIQUES if t.tuned)  # the sections a search screens
QUANTILES = (0.3, 0.5, 0.7, 0.85)
OLSS_RUNS = 4  # full runs of the baseline an OLSS scheduler is fitted from


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
    if FAMILIES[work.family].kind != "dit":
        return []
    api.apply(work.pipe, {"cache": {"method": "block", "threshold": 1e-12, "warmup_steps": 2}})
    try:
        trace = work.pipe.__dict__[_STATE_ATTR].handles["cache"].trace()
        changes = []
        for call in work.calls:
            trace.clear()
            work.pipe(**call.kwargs, generator=torch.Generator("cpu").manual_seed(call.seed))
            changes += [d for _, _, action, d in trace if action == "change" and np.isfinite(d)]
    finally:
        api.remove(work.pipe)
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
    notes: list = dataclasses.field(default_factory=list)  # what the search left out, and why


def _row(s: space.Setting) -> bench.Row:
    return bench.Row(s.label, "preset" if s.technique == "preset" else "candidate", s.config)


def _stack(a: space.Setting, b: space.Setting) -> space.Setting:
    parts = {sec: getattr(s.config, sec).to_dict() for s in (a, b) for sec in SECTIONS
             if getattr(s.config, sec).enabled}
    return space.Setting(f"{a.label} + {b.label}", Config.from_dict(parts), "stack")


def _step_axis(work: bench.Workload, workdir: str | None, notes: list, log: Callable) -> list[space.Setting]:
    """The step axis's rows: each solver at fewer steps, and OLSS schedulers fitted on the first `OLSS_RUNS`
    calls (saved under ``workdir``); ``notes`` gets why the axis, or OLSS, is left out."""
    rows, why = space.solver_settings(work.pipe, work.steps)
    if why:
        notes.append(f"step axis: left out ({why}); tuned without it")
        log(notes[-1])
        return []
    from ..solver.olss import fit_olss, record_trajectories, refit_olss

    folder = Path(workdir or tempfile.mkdtemp(prefix="accel-tune-"))
    calls = work.calls[:OLSS_RUNS]
    t = time.monotonic()
    try:
        runs = [(c.kwargs, c.seed) for c in calls]
        traj = record_trajectories(work.pipe, runs)
        fitted, plain = {}, None
        for n in space.step_counts(work.steps):
            out = folder / f"olss-{n}"
            sch = fit_olss(traj, n)
            try:  # refitted on the student's own model outputs (one batched run of the fit calls)
                sch = refit_olss(work.pipe, runs, traj, sch)
            except Exception as e:  # a pipeline that cannot batch these calls keeps the plain fit
                plain = plain or error_line(e)
            sch.save_pretrained(out)
            fitted[n] = str(out)
        if plain:
            notes.append(f"OLSS: fitted on the teacher's outputs only (the refit's batched run failed: {plain})")
            log(notes[-1])
    except (ValueError, RuntimeError) as e:
        notes.append(f"OLSS: left out ({error_line(e)})")
        log(notes[-1])
        return rows
    log(f"OLSS: fitted {len(fitted)} schedulers ({', '.join(map(str, fitted))} steps) from {len(calls)} full "
        f"run(s) of {work.steps} steps in {time.monotonic() - t:.1f}s")
    return rows + space.olss_settings(fitted)


def search(work: bench.Workload, floor: float, *, budget_s: float | None = None, repeats: int = 2,
           shortlist: int = 3, progress: bool = True, log: Callable = print, steps_axis: bool = True,
           workdir: str | None = None) -> Outcome:
    """Screen, stack and time the settings for ``work`` (see the module's docstring). ``steps_axis``: also
    search the step count and the solver; ``workdir``: where fitted OLSS schedulers go (a temporary folder
    by default; `accel tune` copies the pick's beside the tuned config)."""
    t0 = time.monotonic()
    notes: list[str] = []
    sampler = bench._Sampler(work)
    base = bench.Row("off (baseline)", "baseline")
    results: dict[str, bench.Result] = {}
    settings: dict[str, space.Setting] = {}
    stopped = None
    bar = bench._progress(0, progress, "accel tune")

    def holds(r: bench.Result) -> bool:
        """The floor on every prompt, and on the built-in trained models the checker's scores of the baseline."""
        b = results.get(base.label)
        return r.meets(floor) and r.keeps_scores(b.scores if b else None)

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

    quiet = quiet_loading

    thresholds: list[float] = []
    try:
        with quiet():
            screen(None)
            thresholds = calibrate_thresholds(work)
            if thresholds:
                log(f"calibrated block-cache thresholds on your prompts: {', '.join(f'{t:g}' for t in thresholds)}")
            best: dict[str, space.Setting] = {}  # technique -> fastest passing single setting

            def screen_knobs(rows: list[space.Setting]) -> None:
                groups: dict[str, list[space.Setting]] = {}
                for s in rows:
                    groups.setdefault(s.technique, []).append(s)
                for tech, group in groups.items():
                    for s in sorted(group, key=lambda s: s.order):
                        if out_of_time():
                            raise TimeoutError
                        if s.technique == "preset" and any(s.config == settings[k].config for k in settings):
                            continue  # a preset equal to one already screened (off on this family)
                        if s.technique == "preset" and not s.config.enabled:
                            continue
                        r = screen(s)
                        if not holds(r):
                            if tech != "preset":
                                break  # the rest of this knob removes more
                            continue
                        key = tech.split(":")[0]
                        if key != "preset" and (key not in best or r.seconds < results[best[key].label].seconds):
                            best[key] = s

            screen_knobs(space.preset_settings(work.family)
                         + [r for sec in SECTIONS for r in space.settings(work.family, sec, thresholds or None)])
            for extra in ("tokens", "attention"):
                if "cache" in best and extra in best and not out_of_time():
                    screen(_stack(best["cache"], best[extra]))
            if steps_axis:
                rows = _step_axis(work, workdir, notes, log)
                screen_knobs(rows)
                tried = [results[s.label] for s in rows if s.label in results]
                if tried and all(r.error for r in tried):
                    notes.append(f"step axis: no solver ran on this pipeline ({tried[0].error}); tuned without it")
                    log(notes[-1])
                for extra in ("cache", "tokens", "attention"):  # the cache's schedule follows the new step count
                    if "solver" in best and extra in best and not out_of_time():
                        screen(_stack(best["solver"], best[extra]))
            if out_of_time():
                raise TimeoutError
    except TimeoutError:
        stopped = "time budget"
    except KeyboardInterrupt:
        stopped = "interrupted"
    finally:
        bar.close()

    # a setting that did nothing on these calls (identical output) is never a pick, whatever the clock said
    passing = [r for r in results.values() if r.kind != "baseline" and holds(r) and r.speedup and r.engaged]
    passing_presets = [r for r in passing if r.kind == "preset"]
    final: list[bench.Result] = []
    if passing and stopped is None:
        chosen = sorted(passing, key=lambda r: r.seconds)[:shortlist]
        # a near-tie with the fastest (same work, other noise) that keeps more on its worst prompt is timed too:
        # the preset rule would pick it if measured
        fastest = min(r.seconds for r in passing)
        tied = [r for r in passing if r.seconds <= fastest * (1 + presets.SPEED_TIE)]
        keeper = max(tied, key=lambda r: r.psnr_worst if r.psnr_worst is not None else float("inf"))
        chosen += [keeper] if keeper not in chosen else []
        if passing_presets:
            top_preset = min(passing_presets, key=lambda r: r.seconds)
            chosen += [top_preset] if top_preset not in chosen else []
        rows = [base] + [bench.Row(r.label, r.kind, settings[r.label].config) for r in chosen]
        final, interrupted = bench.run(work, rows, repeats=repeats, progress=progress, sampler=sampler)
        if interrupted:
            stopped = "interrupted"
            final = []
    ranked = [r for r in (final or list(results.values()))
              if r.kind != "baseline" and r.ran and holds(r) and r.engaged]
    # the preset rule (accel.presets.pick): faster than the baseline, and within SPEED_TIE of the fastest
    # counts as equally fast (the higher worst-prompt PSNR wins); the floor holds on every prompt
    pick = presets.pick(ranked, psnr="psnr_worst")
    best_preset = presets.pick([r for r in ranked if r.kind == "preset"], psnr="psnr_worst")
    return Outcome(pick, settings[pick.label].config if pick else Config(), best_preset,
                   list(results.values()), final, thresholds, stopped, notes)


def config_text(outcome: Outcome, *, model: str, floor: float, calls: int) -> str:
    """The tuned config file (YAML): a comment saying what was measured, then every technique section."""
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
