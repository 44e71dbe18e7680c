"""`accel bench`: speed and fidelity of presets, config files, sweeps and peers on any model, in one run.

    accel bench --model ref-dit --presets off,balanced,fast --peers all
    accel bench --model shape:flux --device cuda --steps 28 --sweep cache --json flux.json
    accel bench --model my/hub-model --configs tuned.yaml --prompts prompts.txt

Every row runs the same calls (prompts x seeds) on the same pipeline, round-robin over ``--repeats``
after one untimed warm-up call of each row (`accel.eval.clock`: CUDA events and peak memory on CUDA,
process CPU time on a CPU). A row's speed is the median over repeats of the total time of its calls,
as a ratio to the unaccelerated baseline measured in the same rounds. Its fidelity is measured
against the baseline's output of the same prompt and seed: PSNR (median and worst call) and SSIM,
and on the built-in trained models (``ref-*``, called with their held-out prompts) the attribute
checker's scores beside the baseline's. On random weights (``tiny-*``, ``shape:*``) fidelity is not
meaningful, and the report says so. Results: a markdown table on stdout, a JSON report (``--json``)
with device, versions and commit; Ctrl-C ends the run and reports what was measured.

The engine (`Workload`, `Row`, `run`) is what `accel tune` and the scripts in ``benchmarks/`` call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __file__ as package_file
from .. import __version__, api
from ..config import available_presets, preset
from ..config_base import ConfigError
from ..io.prompts import read_rows
from ..layering import layered, read_sections
from ..pipelines.call import call_kwargs, family_name, to_frames
from ..pipelines.load import call_defaults, quiet_loading
from ..pipelines.ref import checker
from ..pipelines.ref import data as shapes
from . import peers, space
from .clock import error_line, measure, round_robin
from .compare import Engaged
from .metrics import compare
from .snapshot import Snapshot
from .work import StageWork

RANDOM_WEIGHTS_NOTE = ("random weights: PSNR/SSIM say how much a setting changes the output, not whether a trained "
                       "model would still draw the same thing (random weights overstated DiT fidelity by a median "
                       "37 dB against the trained ref-dit); judge quality on your trained model")
GENERIC_PROMPTS = ("a photo of a red fox in a snowy forest, golden hour",
                   "a bowl of ramen on a wooden table, studio light",
                   "a lighthouse on a cliff during a storm, waves crashing", "an astronaut riding a horse on the moon")


# --- what is measured ----------------------------------------------------------------------------
@dataclasses.dataclass
class Call:
    """One pipeline call of the workload: keyword arguments (no generator), its seed, and what the
    checker scores it against (a scene or clip of `accel.pipelines.ref.data`; None: not scored)."""

    kwargs: dict
    seed: int
    item: Any = None


@dataclasses.dataclass
class Workload:
    pipe: Any
    model: str
    family: str
    device: str
    calls: list[Call]
    steps: int
    scorer: Callable | None = None  # (outputs, items) -> {score: value}; built-in trained models
    random_weights: bool = False


@dataclasses.dataclass
class Row:
    """A row: the baseline (no config, no peer), one of our configs, or a peer."""

    label: str
    kind: str = "config"  # baseline | preset | config | sweep | peer | candidate
    config: Any = None  # accel.Config
    peer: Any = None  # accel.eval.peers.Peer
    skipped: str | None = None  # why it was not run


@dataclasses.dataclass
class Result:
    label: str
    kind: str
    config: dict | None = None
    seconds: float | None = None  # median over repeats of the row's total call time
    wall_s: float | None = None
    peak_gib: float | None = None
    speedup: float | None = None
    psnr: float | None = None  # median over calls; None: identical to the baseline
    psnr_worst: float | None = None
    ssim: float | None = None
    per_call_psnr: list = dataclasses.field(default_factory=list)  # inf as None
    scores: dict | None = None
    engaged: list = dataclasses.field(default_factory=list)
    work: tuple | None = None  # (denoiser stages computed, stages called) over the scored sample's calls
    repeats: int = 0
    error: str | None = None
    skipped: str | None = None

    @property
    def ran(self) -> bool:
        return self.seconds is not None

    def meets(self, floor: float) -> bool:
        """Every call's PSNR against the baseline is at least ``floor`` dB (identical counts as inf)."""
        return self.ran and all(p is None or p >= floor for p in self.per_call_psnr)

    def keeps_scores(self, reference: dict | None) -> bool:
        """Every checker score (built-in trained models) is at least the baseline's ``reference`` score."""
        return all((self.scores or {}).get(k, v) >= v for k, v in (reference or {}).items())


def _scorer(model: str):
    """The checker for a built-in trained model: (outputs, items) -> scores."""
    if model == "ref-video":
        return checker.score_videos
    if model.startswith("ref-"):
        return lambda outs, items: {k: v for k, v in checker.score_images(outs, items).items() if k != "objects"}
    return None


def read_prompts(path) -> list[tuple[str, str | None]]:
    """(prompt, negative prompt) of each row of a prompt file (.txt, .jsonl, .csv as `accel batch` reads)."""
    return [(r.prompt, r.negative_prompt) for r in read_rows(Path(path))]


def workload(pipe, model: str, *, prompts: list | None = None, n_prompts: int | None = None, seeds: int = 1,
             steps: int | None = None, height: int | None = None, width: int | None = None,
             frames: int | None = None, guidance: float | None = None, device: str = "cpu",
             prompt_seed: int | None = None) -> Workload:
    """The calls of a benchmark: ``prompts`` ((prompt, negative) pairs, or strings) x ``seeds`` seeds.
    Without prompts, a built-in trained model gets ``n_prompts`` of its held-out prompts (scored by the
    checker; ``prompt_seed`` picks another held-out set) and other models a few generic ones."""
    family = family_name(pipe)
    defaults = call_defaults(model)
    items: list = []
    if prompts is None and model.startswith("ref-"):
        n = n_prompts or 4
        kw = {} if prompt_seed is None else {"seed": prompt_seed}
        items = shapes.held_out_clips(n, **kw) if model == "ref-video" else shapes.held_out_scenes(n, n_shapes=1, **kw)
        prompts = [(it.prompt, None) for it in items]
    elif prompts is None:
        prompts = [(p, None) for p in GENERIC_PROMPTS[:n_prompts or 2]]
    prompts = [p if isinstance(p, tuple) else (p, None) for p in prompts]
    if not prompts:
        raise ValueError("no prompts to run")
    calls = []
    for i, (prompt, negative) in enumerate(prompts):
        for seed in range(seeds):
            kw = call_kwargs(pipe, prompt=prompt, negative_prompt=negative, steps=steps, height=height, width=width,
                             frames=frames, guidance=guidance, seed=seed, defaults=defaults)
            kw.pop("generator")
            calls.append(Call(kw, seed, items[i] if items else None))
    n_steps = int(calls[0].kwargs.get("num_inference_steps") or 50)
    return Workload(pipe, model, family, str(device), calls, n_steps, _scorer(model) if items else None,
                    random_weights=model.startswith(("tiny-", "shape:")))


# --- the engine ----------------------------------------------------------------------------------
class _Sampler:
    """Runs one sample of a row (all its calls) and keeps the baseline's outputs for fidelity."""

    def __init__(self, work: Workload):
        self.work = work
        self.reference: list | None = None  # the baseline's outputs, one per call
        self.fidelity: dict[str, dict] = {}  # label -> psnr/ssim/scores/engaged of its first sample
        self.left_behind: set[str] = set()  # peers whose disable left the pipeline changed (put back by us)

    def _call(self, call: Call):
        def go():
            return self.work.pipe(**call.kwargs, generator=torch.Generator("cpu").manual_seed(call.seed))

        s = measure(go, self.work.device)
        return s, to_frames(s.out)

    def sample(self, row: Row, calls: list[Call] | None = None, keep: bool = True):
        """(seconds, wall seconds, peak bytes) of the row's calls; the first kept sample of a row is
        scored against the baseline."""
        work = self.work
        calls = work.calls if calls is None else calls
        snapshot = None
        if row.config is not None:
            api.apply(work.pipe, row.config)
        elif row.peer is not None:
            snapshot = Snapshot(work.pipe)
            try:
                row.peer.enable(work.pipe, work.steps, work.calls[0].kwargs)
            except BaseException:  # a peer that fails half-way through patching leaves nothing behind
                snapshot.restore(work.pipe)
                raise
        try:
            seconds = wall = 0.0
            peak = None
            outs = []
            score = keep and row.label not in self.fidelity
            did = Engaged()  # `accel.stats` describes the last call: a row's work is summed over its calls
            counter = StageWork(work.pipe) if score else contextlib.nullcontext()
            with counter:  # the stages computed, counted the same way for every row (scored sample only)
                for call in calls:
                    s, frames = self._call(call)
                    seconds, wall = seconds + s.seconds, wall + s.wall_s
                    peak = s.peak_bytes if peak is None or (s.peak_bytes or 0) > peak else peak
                    if score:
                        outs.append(frames)
                    if row.config is not None:
                        did.add(api.stats(work.pipe))
            what = did.lines()
        finally:
            if row.config is not None:
                api.remove(work.pipe)
            elif row.peer is not None:
                try:
                    row.peer.disable(work.pipe)
                finally:
                    if snapshot.restore(work.pipe):
                        self.left_behind.add(row.label)
        if score:
            self._score(row, outs, what)
            self.fidelity[row.label]["work"] = (counter.computed, counter.entered)
        return seconds, wall, peak

    def _score(self, row: Row, outs: list, what: list) -> None:
        if row.kind == "baseline":
            self.reference = outs
        ref = self.reference
        if ref is None:
            raise RuntimeError("the baseline row must run first")
        per = [compare(a, b) for a, b in zip(ref, outs, strict=True)]
        psnrs = [p["psnr"] for p in per]
        finite = [p for p in psnrs if p is not None]
        rec = {"per_call_psnr": psnrs, "ssim": round(statistics.median(p["ssim"] for p in per), 4),
               "psnr": None if len(finite) <= len(psnrs) // 2 else round(statistics.median(
                   [p if p is not None else float("inf") for p in psnrs]), 2),
               "psnr_worst": round(min(finite), 2) if finite else None, "engaged": what}
        if finite and not what and row.config is not None:  # changed the output: never "nothing engaged"
            rec["engaged"] = [f"no technique counted work, yet {len(finite)} of {len(psnrs)} outputs differ from the "
                              "baseline (see accel.stats)"]
        if self.work.scorer is not None:
            rec["scores"] = {k: round(v, 3) for k, v in self.work.scorer([np.asarray(o) for o in outs],
                                                                       [c.item for c in self.work.calls]).items()
                             if isinstance(v, float)}
        self.fidelity[row.label] = rec


def _progress(total: int, enabled: bool, desc: str = "accel bench"):
    """A progress bar on stderr when it is a terminal (``enabled`` False: none)."""
    return tqdm(total=total, desc=desc, unit="run", disable=None if enabled else True, file=sys.stderr, leave=False,
                dynamic_ncols=True, mininterval=0.5)


def run(work: Workload, rows: list[Row], *, repeats: int = 3, warmup: bool = True, progress: bool = True,
        stop: Callable[[], bool] | None = None, sampler: _Sampler | None = None) -> tuple[list[Result], bool]:
    """Measure ``rows`` (the first must be the baseline) round-robin; returns (results, stopped).

    A row that raises is reported with its error and left out of later rounds. Ctrl-C (or ``stop()``
    returning True) ends the run; what was measured is returned, with ``stopped`` True."""
    if not rows or rows[0].kind != "baseline":
        raise ValueError("the first row must be the baseline")
    sampler = sampler or _Sampler(work)
    live = [r for r in rows if r.skipped is None]
    bar = _progress(len(live) * (repeats + (1 if warmup else 0)), progress)
    samples: dict[str, list] = {r.label: [] for r in live}
    errors: dict[str, str] = {}
    stopped = False
    quiet = quiet_loading  # diffusers' per-call warnings would break the bar

    def one(row):
        def fn():
            bar.set_postfix_str(row.label[:40], refresh=False)
            if not sampler.fidelity.get(row.label) and warmup:
                sampler.sample(row, work.calls[:1], keep=False)  # untimed warm-up: first-call set-up costs
                bar.update(1)
            out = sampler.sample(row)
            bar.update(1)
            return out
        return fn

    def after(r, label, sample):
        samples[label].append(sample)

    try:
        with quiet():
            # peers that leave state behind which later rows trip on run after all the others (`Peer.late`)
            late = [r for r in live if getattr(r.peer, "late", False)]
            for phase in ([r for r in live if r not in late], late):
                _, errs = round_robin({r.label: one(r) for r in phase}, repeats, catch=True, after=after, stop=stop)
                errors.update(errs)
                if stop and stop():
                    break
        stopped = bool(stop and stop())
    except KeyboardInterrupt:
        stopped = True
    except Exception as e:  # the baseline itself failed: nothing can be compared
        raise RuntimeError(f"the baseline could not run: {error_line(e)}") from e
    finally:
        bar.close()
    return _results(rows, samples, errors, sampler), stopped


def result_of(row: Row, runs: list, base_s: float | None, sampler: _Sampler, error: str | None = None) -> Result:
    """A row's `Result` from its samples ((seconds, wall, peak) each) and what the sampler scored."""
    res = Result(row.label, row.kind, row.config.to_dict() if row.config is not None else None,
                 skipped=row.skipped, error=error)
    if runs and error is None:
        res.seconds = statistics.median(s[0] for s in runs)
        res.wall_s = statistics.median(s[1] for s in runs)
        peaks = [s[2] for s in runs if s[2] is not None]
        res.peak_gib = round(max(peaks) / 2**30, 2) if peaks else None
        res.speedup = round(base_s / res.seconds, 3) if base_s and res.seconds else None
        res.repeats = len(runs)
        for k, v in sampler.fidelity.get(row.label, {}).items():
            setattr(res, k, v)
        if row.label in sampler.left_behind:
            res.engaged = ["its disable left a patch behind, undone after each of its runs"]
    return res


def _results(rows, samples, errors, sampler) -> list[Result]:
    base = samples.get(rows[0].label) or []
    base_s = statistics.median(s[0] for s in base) if base else None
    return [result_of(row, samples.get(row.label) or [], base_s, sampler, errors.get(row.label)) for row in rows]


# --- rows from the command line ------------------------------------------------------------------
def preset_rows(family: str | None, names: list[str]) -> list[Row]:
    known = available_presets()
    rows = []
    for name in names:
        if name not in known:
            raise ValueError(f"--presets: {name!r} is not a preset; choose from {', '.join(known)}")
        if name != "off":
            rows.append(Row(f"preset {name}", "preset", preset(name, family)))
    return rows


def config_rows(paths: list[str], family: str | None) -> list[Row]:
    """One row per config file (a config file or an output's sidecar); a bad file raises ValueError
    naming the file and what is wrong, before anything runs."""
    rows = []
    for path in paths:
        try:
            _, sections = read_sections(path, [])
            cfg = layered("off", sections, family)
        except ConfigError as e:
            raise ValueError(f"--configs {path}: {e}") from None
        except Exception as e:  # UsageError from the reader: no such file, unknown section, unreadable
            raise ValueError(str(e).replace("--config", "--configs", 1)) from None
        rows.append(Row(f"config {Path(path).name}", "config", cfg))
    return rows


def sweep_rows(family: str, specs: list[str]) -> list[Row]:
    return [Row(s.label, "sweep", s.config) for spec in specs for s in space.sweep(family, spec)]


def peer_rows(work: Workload, spec: str | None) -> list[Row]:
    return [Row(f"peer {p.name}", "peer", peer=p, skipped=p.unavailable(work.pipe, work.family))
            for p in peers.select(spec)]


# --- the report ----------------------------------------------------------------------------------
def _fmt_db(v) -> str:
    return "identical" if v is None else f"{v:.1f}"


def table(results: list[Result]) -> str:
    """The markdown table of a run."""
    scored = any(r.scores for r in results)
    score_keys = next((list(r.scores) for r in results if r.scores), [])
    peak = any(r.peak_gib is not None for r in results)
    counted = any(r.work for r in results)
    head = ["row", "s (median)", "speed-up"] + (["peak GiB"] if peak else []) \
        + (["stages computed"] if counted else []) + ["PSNR dB (worst)", "SSIM"] \
        + ([" / ".join(score_keys)] if scored else []) + ["engaged"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if not r.ran:
            why = f"skipped: {r.skipped}" if r.skipped else f"error: {r.error}" if r.error else "not run (stopped)"
            lines.append("| " + " | ".join([r.label, why] + [""] * (len(head) - 2)) + " |")
            continue
        idle = r.kind != "baseline" and r.psnr is None and r.psnr_worst is None and not r.engaged
        speed = f"{r.speedup:.2f}x" if r.speedup else "-"
        cells = [r.label, f"{r.seconds:.3f}", f"{speed} (noise)" if idle and r.speedup else speed]
        if peak:
            cells.append("-" if r.peak_gib is None else f"{r.peak_gib:.1f}")
        if counted:  # of the baseline's stages: a peer may skip a stage by not calling it at all
            full = next((b.work[1] for b in results if b.kind == "baseline" and b.work), None) or \
                (r.work[1] if r.work else 1)
            cells.append(f"{r.work[0]} of {full} ({r.work[0] / max(full, 1):.0%})" if r.work else "-")
        if r.kind == "baseline":
            cells += ["reference", "1.000"]
        else:
            cells += [f"{_fmt_db(r.psnr)} ({_fmt_db(r.psnr_worst)})" if r.psnr is not None or r.psnr_worst is not None
                      else "identical", f"{r.ssim:.3f}" if r.ssim is not None else "-"]
        if scored:
            cells.append(" / ".join(f"{r.scores[k]:.2f}" for k in score_keys) if r.scores else "-")
        if r.kind == "peer":
            cells.append("; ".join(r.engaged) or "(peer)" if r.psnr is not None or r.psnr_worst is not None
                         else "nothing changed")
        elif r.kind == "baseline":
            cells.append("-")
        else:
            cells.append("; ".join(r.engaged) if r.engaged else "nothing engaged")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


OURS = ("preset", "config", "sweep", "candidate")


def _worst(r: Result) -> float:
    return float("inf") if r.psnr_worst is None else r.psnr_worst  # None: identical to the baseline


def dominates(ours: Result, peer: Result) -> bool:
    """``ours`` is at least as fast, at least as close on its worst prompt, and scores at least as well."""
    return (ours.speedup or 0) >= (peer.speedup or 0) and _worst(ours) >= _worst(peer) \
        and all((ours.scores or {}).get(k, -1.0) >= v for k, v in (peer.scores or {}).items())


def frontier(results: list[Result]) -> list[dict]:
    """For every peer row that ran: the fastest of our rows that dominates it, or, where none does, the
    fastest of ours at least as close on the worst prompt and the speed it lacks."""
    ours = [r for r in results if r.kind in OURS and r.ran]
    out = []
    for peer in (r for r in results if r.kind == "peer" and r.ran):
        winners = sorted((r for r in ours if dominates(r, peer)), key=lambda r: -(r.speedup or 0))
        if winners:
            out.append({"peer": peer.label, "by": winners[0].label, "dominated": True})
            continue
        close = sorted((r for r in ours if _worst(r) >= _worst(peer)), key=lambda r: -(r.speedup or 0))
        best = close[0] if close else None
        out.append({"peer": peer.label, "by": best.label if best else None, "dominated": False,
                    "speed_short": round((peer.speedup or 0) - (best.speedup or 0), 3) if best else None,
                    "scores_short": sorted(k for k, v in (peer.scores or {}).items()
                                           if best and (best.scores or {}).get(k, -1.0) < v)})
    return out


def frontier_lines(results: list[Result]) -> list[str]:
    """One line per peer row: dominated by which of ours, or what ours lacks."""
    lines = []
    for f in frontier(results):
        if f["dominated"]:
            lines.append(f"- {f['peer']}: dominated by {f['by']}")
        elif f["by"] is None:
            lines.append(f"- {f['peer']}: not dominated; none of ours is as close on the worst prompt")
        else:
            short = ([f"{f['speed_short']:.2f}x slower"] if f["speed_short"] > 0 else []) + \
                [f"lower {k}" for k in f["scores_short"]]
            lines.append(f"- {f['peer']}: not dominated; {f['by']} is as close on the worst prompt but "
                         f"{', '.join(short)}")
    return lines


def environment(device: str) -> dict:
    """Device, versions and commit, for a report."""
    import platform

    import diffusers

    dev = str(device)
    name = torch.cuda.get_device_name(torch.device(dev)) if dev.startswith("cuda") else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    try:
        here = str(Path(package_file).resolve().parent)
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"device": dev, "device_name": name, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "accel": __version__, "commit": commit, "date": time.strftime("%Y-%m-%d"),
            "timing": "CUDA events" if dev.startswith("cuda") else "process CPU time"}


def report(work: Workload, results: list[Result], *, repeats: int, stopped: bool, env: dict) -> dict:
    return {"model": work.model, "family": work.family, **env, "repeats": repeats, "stopped": stopped,
            "calls": [{**{k: v for k, v in c.kwargs.items() if isinstance(v, (str, int, float, bool, type(None)))},
                       "seed": c.seed} for c in work.calls],
            "random_weights": work.random_weights, "rows": [dataclasses.asdict(r) for r in results]}
