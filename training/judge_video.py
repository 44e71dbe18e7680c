"""The presets and every technique part judged on a trained video reference model, and the tiers re-derived.

    python -m training.judge_video --model DIR --out DIR [--prompts 24] [--seeds 3] [--budget S]

Rows (`rows`): the unaccelerated baseline; each technique part alone: token merge 0.3 / 0.5, prune
0.5 / 0.75, kv_downsample 0.5, sparse tile / radial / spatial_temporal at density 0.5 / 0.25 / 0.1,
block cache interval 2 and threshold 0.1 (two warm-up steps, as the presets); the presets ``safe``,
``balanced`` and ``fast`` as they stand for the model's family (their stacks of those parts). Every
row runs on the same held-out prompts (one batched call per seed) and seeds, round-robin over rows
(`accel.eval.clock`), and records: the checker's direction / colour (middle frame) / shape (middle
frame) accuracy, the prompts whose verdicts differ from the baseline's and the most prompts lost on
any score (medians over seeds), PSNR / SSIM against the baseline of the same seed, the call's median
time on the run's device and its ratio to the baseline's, and what engaged (`accel.stats`): a row
where nothing engaged says so, and is never a candidate.

The derivation (`derive`) applies the presets' stated rule to these rows. A candidate keeps the
checker within one prompt of the baseline on every score (`MAX_LOST`) and runs faster than it.
Per technique, as the preset tables chose (cache/config.py, tokens/config.py, attention/config.py):
the step cache takes the fastest candidate at >= 40 / 32 / 26 dB (safe / balanced / fast); token
reduction (not prune: its token cache is too large at real video sizes) and sparse attention (one
table: they do not stack) take, for ``safe``, the
highest-PSNR candidate at >= 1.2x, for ``balanced`` / ``fast`` the fastest at >= 35 / 30 dB;
candidates within `SPEED_TIE` of the fastest count as equally fast and the higher PSNR wins. A tier
is its two picks stacked; the stack is then run (``derived <tier>`` rows) and kept if it still keeps
the checker within one prompt, else the faster pick alone stands. The presets are not changed here:
the tables say which setting each tier would get.

Outputs in ``--out``: ``judge.json`` (every figure) and ``judge.md`` (the tables), rewritten after
every round of seeds, so a run stopped by its budget leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from accel import presets
from accel.eval import clock
from accel.eval.bench import environment
from accel.eval.compare import engaged
from accel.eval.metrics import compare
from accel.pipelines.call import family_name
from accel.pipelines.load import load
from accel.pipelines.ref import call_defaults, checker
from accel.pipelines.ref import data as shapes
from accel.presets import CACHE_FLOORS, REDUCTION_FLOORS, SAFE_MIN_SPEEDUP, TIERS

CRITERIA = ("direction", "colour", "shape")
MAX_LOST = 1  # prompts a candidate may lose on any checker score
# Measured and reported, never picked for a video DiT: prune's per-block cache (input and update of every token,
# per CFG branch) is ~12 GB in bf16 for Wan 1.3B at 480p x 81 frames, why the token presets leave it out there.
VIDEO_EXCLUDED_METHODS = ("prune",)
_CACHE = {"method": "block", "warmup_steps": 2}


def rows(family: str = "wan") -> dict[str, dict | None]:
    """Row label -> config dict (None: the baseline): each part alone, then the presets."""
    import accel

    parts = [{"tokens": {"method": m, "ratio": r}}
             for m, ratios in (("merge", (0.3, 0.5)), ("prune", (0.5, 0.75)), ("kv_downsample", (0.5,)))
             for r in ratios]  # fmt: skip
    parts += [{"attention": {"pattern": p, "density": d}}
              for p in ("tile", "radial", "spatial_temporal") for d in (0.5, 0.25, 0.1)]  # fmt: skip
    parts += [{"cache": {**_CACHE, "interval": 2}}, {"cache": {**_CACHE, "threshold": 0.1}}]
    out: dict[str, dict | None] = {"off": None, **{describe(p): sections(p) for p in parts}}
    for tier in TIERS:
        cfg = sections(accel.preset(tier, family))
        out[f"{tier} preset: {describe(cfg)}"] = cfg
    return out


def sections(config) -> dict:
    """The enabled sections of an `accel.Config` (or config dict), as a dict."""
    import accel

    conf = config if isinstance(config, accel.Config) else accel.Config.from_dict(config or {})
    return {s: getattr(conf, s).to_dict() for s in ("cache", "tokens", "attention", "approx")
            if getattr(conf, s).enabled}


def describe(config: dict | None) -> str:
    """A short name of what a config does: ``block interval 2 + merge 0.5``."""
    full = sections(config)
    out = []
    if "cache" in full:
        c = full["cache"]
        how = f"threshold {c['threshold']}" if c["threshold"] else f"interval {c['interval']}"
        out.append(f"{c['method']} {how}")
    if "tokens" in full:
        out.append(f"{full['tokens']['method']} {full['tokens']['ratio']}")
    if "attention" in full:
        out.append(f"{full['attention']['pattern']} {full['attention']['density']}")
    return " + ".join(out) or "off"


def parts_of(config: dict | None) -> tuple[str, ...]:
    return tuple(s for s in ("cache", "tokens", "attention") if s in sections(config))


def lower_gates(config: dict | None) -> dict | None:
    """``config`` with its ``min_tokens`` gates at 0 and 16-token attention blocks: a micro model's few
    tokens still see every technique engage (at full size the gates pass anyway)."""
    if config is None:
        return None
    out = {k: dict(v) for k, v in config.items()}
    for s in ("tokens", "attention"):
        if s in out:
            out[s]["min_tokens"] = 0
    if "attention" in out:
        out["attention"]["block_size"] = 16
    return out


# --- scoring -------------------------------------------------------------------------------------


def score_run(videos: np.ndarray, base: np.ndarray, clips) -> dict:
    """The checker's verdicts on each clip (`accel.pipelines.ref.checker.clip_verdicts`) and PSNR / SSIM against the baseline's
    clips of the same seed (a worker process's job)."""
    return {"verdicts": [checker.clip_verdicts(v, c) for v, c in zip(videos, clips, strict=True)], **compare(base, videos)}


def _engaged_counts(stats: dict) -> dict:
    return {"cache_reused": (stats.get("cache") or {}).get("reused", 0),
            "tokens_removed": (stats.get("tokens") or {}).get("average_removed", 0),
            "sparse_calls": (stats.get("attention") or {}).get("sparse_calls", 0)}


def _psnr(row: dict) -> float:
    return math.inf if row.get("psnr") is None else row["psnr"]


def summarise(base: list[dict], runs: list[dict], n: int) -> dict:
    """A row's figures from its per-seed runs against the baseline's runs of the same seeds."""
    out: dict = {"seeds": len(runs)}
    for k in CRITERIA:
        out[k] = round(statistics.median(sum(v[k] for v in r["verdicts"]) / n for r in runs), 4)
    lost = {k: statistics.median(sum(b[k] for b in base[i]["verdicts"]) - sum(v[k] for v in r["verdicts"])
                                 for i, r in enumerate(runs)) for k in CRITERIA}
    out["lost"] = max(lost.values())
    out["differ"] = statistics.median(sum(b != v for b, v in zip(base[i]["verdicts"], r["verdicts"], strict=True))
                                      for i, r in enumerate(runs))
    psnrs = [math.inf if r["psnr"] is None else r["psnr"] for r in runs]
    p = statistics.median(psnrs)
    out["psnr"] = None if math.isinf(p) else round(p, 2)
    out["ssim"] = round(statistics.median(r["ssim"] for r in runs), 4)
    out["seconds"] = round(statistics.median(r["seconds"] for r in runs), 4)
    out["speedup"] = round(statistics.median(b["seconds"] for b in base[: len(runs)]) / out["seconds"], 3)
    peaks = [r["peak_bytes"] for r in runs if r["peak_bytes"] is not None]
    out["peak_gb"] = round(statistics.median(peaks) / 1e9, 2) if peaks else None
    out["per_seed"] = [{k: r[k] for k in ("seed", "seconds", "wall_s", "psnr", "ssim")} for r in runs]
    last = runs[-1]["engaged"]
    out["engaged"] = ["-"] if last is None else last or ["nothing engaged"]
    out["engaged_counts"] = runs[-1]["counts"]
    return out


# --- the rule --------------------------------------------------------------------------------------


def why_not(row: dict, min_speedup: float = 1.0) -> str:
    """Why ``row`` is not a candidate; empty when it is one: measured, did something, lost at most
    `MAX_LOST` prompts on every checker score, and faster than the baseline (at least ``min_speedup``
    when that is above 1)."""
    if row.get("error") or not row.get("seeds"):
        return row.get("error") or "not measured"
    if row.get("engaged") == ["nothing engaged"]:
        return "nothing engaged"
    if row["lost"] > MAX_LOST:
        return f"lost {row['lost']:g} prompts"
    fast = row["speedup"] >= min_speedup if min_speedup > 1.0 else row["speedup"] > 1.0
    return "" if fast else f"not faster ({row['speedup']:.2f}x)"


def is_candidate(row: dict, min_speedup: float = 1.0) -> bool:
    return not why_not(row, min_speedup)


def pick(rows: list[dict], floor: float | None = None, *, min_speedup: float = 1.0,
         most_faithful: bool = False) -> dict | None:
    """The rule's choice among ``rows``: of the candidates (`is_candidate`) at PSNR >= ``floor``, the
    fastest (near-ties within `SPEED_TIE` go to the higher PSNR), or with ``most_faithful`` the highest
    PSNR. None when no row qualifies."""
    return presets.pick([r for r in rows if is_candidate(r, min_speedup)], floor, most_faithful=most_faithful,
                        psnr=_psnr)


def derive(table: list[dict]) -> dict:
    """Each tier's picks by the rule (module docstring): {tier: {cache, reduction, config, label}}."""
    cache = [r for r in table if r["parts"] == ["cache"]]
    reduction = [r for r in table if r["parts"] in (["tokens"], ["attention"])
                 and r["config"].get("tokens", {}).get("method") not in VIDEO_EXCLUDED_METHODS]
    out = {}
    for tier in TIERS:
        c = pick(cache, CACHE_FLOORS[tier])
        if tier == "safe":
            r = pick(reduction, min_speedup=SAFE_MIN_SPEEDUP, most_faithful=True)
        else:
            r = pick(reduction, REDUCTION_FLOORS[tier])
        config = {**(c["config"] if c else {}), **(r["config"] if r else {})}
        out[tier] = {"cache": c["label"] if c else None, "reduction": r["label"] if r else None,
                     "config": config, "label": describe(config)}
    return out


def settle(picks: dict, table: list[dict]) -> dict:
    """Each tier's setting once its stack is measured: the stack if it is a candidate, else the faster pick
    alone (or the stack's figures missing: the picks stand, unverified)."""
    by_label = {r["label"]: r for r in table}
    out = {}
    for tier, p in picks.items():
        stack = next((r for r in table if r["setting"] == p["label"] and r["parts"]), None)
        chosen, why = p["label"], "one part"
        if p["cache"] and p["reduction"]:
            if stack is None or not stack.get("seeds"):
                why = "stack not measured (ran out of time)"
            elif is_candidate(stack):
                why = f"stack keeps the checker (lost {stack['lost']:g}) at {stack['speedup']:.2f}x"
            else:
                alone = [by_label[p["cache"]], by_label[p["reduction"]]]
                chosen = max(alone, key=lambda r: r["speedup"])["label"]
                why = f"stack {why_not(stack)}: the faster part alone"
        elif not p["cache"] and not p["reduction"]:
            chosen, why = "off", "no row meets the rule"
        row = by_label.get(chosen) or stack
        out[tier] = {**p, "setting": chosen, "why": why,
                     **({k: row.get(k) for k in ("speedup", "psnr", "lost")} if row else {})}
    return out


# --- running ---------------------------------------------------------------------------------------


class Judge:
    """Runs rows on one pipeline and keeps their per-seed runs against the baseline's."""

    def __init__(self, pipe, clips, call: dict, device: str, workers: int = 0, low_gates: bool = False):
        self.pipe, self.clips, self.call, self.device, self.low_gates = pipe, clips, call, device, low_gates
        self.prompts = [c.prompt for c in clips]
        self.runs: dict[str, list[dict]] = {}
        self.configs: dict[str, dict | None] = {}
        self.errors: dict[str, str] = {}
        self.base_out: dict[int, np.ndarray] = {}
        self.pool = None
        if workers:
            import multiprocessing

            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

    def generate(self, seed: int) -> np.ndarray:
        out = self.pipe(self.prompts, output_type="np", generator=torch.Generator().manual_seed(seed), **self.call)
        return np.asarray(out.frames, np.float32)

    def row_fn(self, label: str, config: dict | None):
        import accel

        self.configs[label] = config
        self.runs.setdefault(label, [])
        applied = lower_gates(config) if self.low_gates else config

        def run():
            seed = len(self.runs[label])
            with accel.applied(self.pipe, applied or "off"):
                sample = clock.measure(lambda: self.generate(seed), self.device)
                stats = accel.stats(self.pipe)
            videos = sample.out
            if label == "off":
                self.base_out[seed] = videos
            job = (videos, self.base_out[seed], self.clips)
            scored = self.pool.submit(score_run, *job) if self.pool else score_run(*job)
            self.runs[label].append({"seed": seed, "seconds": sample.seconds, "wall_s": sample.wall_s,
                                     "peak_bytes": sample.peak_bytes, "scored": scored,
                                     "engaged": engaged(stats) if config else None, "counts": _engaged_counts(stats)})
            return sample.seconds

        return run

    def run(self, table: dict, seeds: int, deadline: float | None, after_round=None) -> None:
        fns = {label: self.row_fn(label, cfg) for label, cfg in table.items()}
        _, errors = clock.round_robin(fns, seeds, catch=True, after_round=after_round,
                                      stop=(lambda: time.time() > deadline) if deadline else None)
        self.errors.update(errors)

    def resolve(self) -> None:
        """Collect the scores from the worker processes."""
        for runs in self.runs.values():
            for r in runs:
                if "scored" in r:
                    scored = r.pop("scored")
                    r.update(scored if isinstance(scored, dict) else scored.result())

    def table(self) -> list[dict]:
        self.resolve()
        base, n = self.runs.get("off", []), len(self.prompts)
        out = []
        for label, runs in self.runs.items():
            config = self.configs[label]
            row = {"label": label, "setting": describe(config), "config": config or {}, "parts": list(parts_of(config))}
            if label in self.errors:
                row["error"] = self.errors[label]
            if runs and base:
                row.update(summarise(base, runs, n))
            else:
                row["seeds"] = 0
            out.append(row)
        return out

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown()


def judge(pipe, out: Path, *, prompts: int = 24, seeds: int = 3, call: dict, device: str,
          deadline: float | None = None, workers: int = 0, low_gates: bool = False) -> dict:
    """Every row of `rows` on ``pipe`` (its family's presets), then the derived tier stacks; writes
    ``judge.json`` / ``judge.md`` into ``out`` and returns what they hold."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe.set_progress_bar_config(disable=True)
    family = family_name(pipe)
    clips = shapes.held_out_clips(prompts, frames=call["num_frames"])
    j = Judge(pipe, clips, call, device, workers, low_gates)
    meta = {"family": family, "prompts": prompts, "seeds": seeds, "call": call,
            "device": environment(device)["device_name"],
            "dtype": str(pipe.transformer.dtype), "low_gates": low_gates, "max_lost": MAX_LOST,
            "cache_floors": CACHE_FLOORS, "reduction_floors": REDUCTION_FLOORS, "safe_min_speedup": SAFE_MIN_SPEEDUP}
    t0 = time.time()
    try:
        j.run(rows(family), seeds, deadline, after_round=lambda r, s: write(out, meta, j.table(), None))
        table = j.table()
        picks = derive(table)
        known, extra = {r["setting"] for r in table}, {}
        for tier, p in picks.items():  # stacks no row measured yet, each once
            if p["cache"] and p["reduction"] and p["label"] not in known:
                known.add(p["label"])
                extra[f"derived {tier}: {p['label']}"] = p["config"]
        if extra:
            j.run(extra, seeds, deadline, after_round=lambda r, s: write(out, meta, j.table(), None))
        table = j.table()
        result = write(out, {**meta, "seconds": round(time.time() - t0, 1)}, table, settle(picks, table))
    finally:
        j.close()
    return result


def write(out: Path, meta: dict, table: list[dict], tiers: dict | None) -> dict:
    """``judge.json`` and ``judge.md`` in ``out``; returns the JSON's content."""
    result = {**meta, "rows": table, "tiers": tiers}
    (out / "judge.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "judge.md").write_text(markdown(meta, table, tiers))
    return result


def _fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def markdown(meta: dict, table: list[dict], tiers: dict | None) -> str:
    lines = [f"### {meta['family']}: {meta['prompts']} held-out prompts x {meta['seeds']} seeds, "
             f"{meta['call']['num_frames']} frames of {meta['call']['height']} px, "
             f"{meta['call']['num_inference_steps']} steps; {meta['device']}, {meta['dtype']}"
             + (" (min_tokens gates lowered)" if meta.get("low_gates") else ""), "",
             "Scores: the checker's accuracy (median over seeds); differ: prompts whose verdicts differ from the "
             "baseline's; lost: most prompts lost on any score; PSNR/SSIM against the baseline of the same seed; "
             "s: median seconds a call of all prompts.", "",
             "| row | direction | colour | shape | differ | lost | PSNR dB | SSIM | s | speed-up | seeds | engaged |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        if not r.get("seeds"):
            lines.append(f"| {r['label']} | {r.get('error', 'not run (budget)')} |" + " |" * 10)
            continue
        p = "inf" if r["psnr"] is None else f"{r['psnr']:.1f}"
        lines.append(f"| {r['label']} | {r['direction']:.2f} | {r['colour']:.2f} | {r['shape']:.2f} | "
                     f"{r['differ']:g} | {r['lost']:g} | {p} | {r['ssim']:.3f} | {r['seconds']:.3f} | "
                     f"{r['speedup']:.2f}x | {r['seeds']} | {'; '.join(r['engaged'])} |")
    if tiers:
        lines += ["", f"Re-derived tiers (rule: module docstring of training.judge_video; a candidate "
                      f"loses at most {meta['max_lost']} prompt on every score):", "",
                  "| tier | cache pick | token/attention pick | setting | why | speed-up | PSNR dB | current preset |",
                  "|---|---|---|---|---|---|---|---|"]
        current = {r["label"].split(" preset:")[0]: r["label"].split(": ", 1)[1] for r in table
                   if " preset: " in r["label"]}
        for tier, t in tiers.items():
            lines.append(f"| {tier} | {t['cache'] or '-'} | {t['reduction'] or '-'} | {t['setting']} | {t['why']} | "
                         f"{_fmt(t.get('speedup'))}x | {_fmt(t.get('psnr'), '.1f')} | {current.get(tier, '?')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a saved pipeline folder or a reference model name")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budget", type=float, default=None, help="seconds; rows stop between calls when it ends")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=0, help="processes scoring clips beside the GPU")
    ap.add_argument("--low-gates", action="store_true", help="min_tokens gates at 0 (a micro model)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    record = Path(args.model) / "training.json"
    call = json.loads(record.read_text())["call"] if record.is_file() else call_defaults(args.model)
    if not call:
        raise SystemExit(f"{args.model}: no training.json with the call, and not a reference model name")
    deadline = time.time() + args.budget if args.budget else None
    result = judge(load(args.model, device=args.device), args.out, prompts=args.prompts, seeds=args.seeds, call=call,
                   device=args.device, deadline=deadline, workers=args.workers, low_gates=args.low_gates)
    print((args.out / "judge.md").read_text())
    print(f"{len(result['rows'])} rows in {result.get('seconds')}s")


if __name__ == "__main__":
    main()
