"""Fewer steps on the trained models: each solver's curve (steps against worst-prompt PSNR) and OLSS against the
hand-made solvers at equal steps, on prompts the OLSS fit never saw.

For each model: the baseline is the pipeline as loaded (its scheduler at its step count); OLSS schedulers are
fitted from ``--fit-prompts`` full runs of it on held-out prompts of one set (``olss-plain``: on the teacher's
outputs; ``olss``: refitted on its own, `accel.solver.olss.refit_olss`), and every row (the pipeline's own
scheduler, each solver `accel.solver.candidates` offers for the model, OLSS) runs at `accel.eval.space.step_counts`
on ``--prompts`` held-out prompts of another set (`accel.eval.bench.run`). The work done is the step count.

    python benchmarks/bench_solver.py                          # ref-sd, ref-dit and ref-video
    python benchmarks/bench_solver.py --models ref-sd --prompts 24 --repeats 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from accel import Config
from accel.eval import bench, space
from accel.pipelines.load import load
from accel.solver import candidates, fit_olss, record_trajectories, refit_olss


def _fit_calls(pipe, model: str, n: int, avoid: set, steps: int | None) -> list[bench.Call]:
    """``n`` held-out calls of another set than the evaluation's (no prompt in ``avoid``)."""
    other = bench.workload(pipe, model, n_prompts=3 * n + 8, steps=steps, device="cpu", prompt_seed=2024)
    calls = [c for c in other.calls if c.kwargs["prompt"] not in avoid][:n]
    assert len(calls) == n, "not enough distinct held-out prompts for the fit"
    return calls


def run_model(model: str, n_fit: int, n_eval: int, repeats: int, steps: int | None) -> None:
    pipe = load(model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    work = bench.workload(pipe, model, n_prompts=n_eval, steps=steps, device="cpu")
    seen = {c.kwargs["prompt"] for c in work.calls}
    fit = _fit_calls(pipe, model, n_fit, seen, steps)
    t = time.perf_counter()
    traj = record_trajectories(pipe, [(c.kwargs, c.seed) for c in fit])
    record_s = time.perf_counter() - t
    counts = space.step_counts(work.steps)
    folder = Path(tempfile.mkdtemp(prefix="bench-solver-"))
    fit_s = {}
    own = type(pipe.scheduler).__name__
    rows = [bench.Row("off (baseline)", "baseline")]
    for n in counts:
        rows.append(bench.Row(f"{own} {n}", "config", Config.from_dict({"solver": {"steps": n}})))
        for name in candidates(pipe.scheduler):
            rows.append(bench.Row(f"{name} {n}", "config",
                                  Config.from_dict({"solver": {"scheduler": name, "steps": n}})))
        t = time.perf_counter()
        plain = fit_olss(traj, n)
        plain.save_pretrained(folder / f"plain-{n}")
        refit_olss(pipe, [(c.kwargs, c.seed) for c in fit], traj, plain).save_pretrained(folder / str(n))
        fit_s[n] = time.perf_counter() - t
        for label, sub in ((f"olss-plain {n}", f"plain-{n}"), (f"olss {n}", str(n))):
            rows.append(bench.Row(label, "config",
                                  Config.from_dict({"solver": {"scheduler": "olss", "olss": str(folder / sub)}})))
    results, _ = bench.run(work, rows, repeats=repeats, progress=False)
    env = bench.environment("cpu")
    print(f"\n### {model}: baseline {own} at {work.steps} steps; {n_eval} held-out prompts, OLSS fitted on {n_fit} "
          f"others (recording {record_s:.1f}s, fit and refit {max(fit_s.values()):.2f}s or less per step count; "
          "olss-plain: fitted on the teacher's outputs only, olss: refitted on its own); "
          f"{env['device_name']}, torch {env['torch']}, diffusers {env['diffusers']}, commit {env['commit']}, "
          f"{env['date']}, median of {repeats}\n")
    print(bench.table(results))
    by = {r.label: r for r in results}
    names = [own] + list(candidates(pipe.scheduler)) + ["olss-plain", "olss"]
    print(f"\nworst-prompt PSNR dB (median) by steps; baseline {work.steps} steps\n")
    print("| scheduler | " + " | ".join(f"{n} steps" for n in counts) + " |")
    print("|---|" + "---|" * len(counts))
    for name in names:
        cells = []
        for n in counts:
            r = by.get(f"{name} {n}")
            cells.append("error" if r is None or r.error else
                         f"{bench._fmt_db(r.psnr_worst)} ({bench._fmt_db(r.psnr)})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["ref-sd", "ref-dit", "ref-video"])
    ap.add_argument("--fit-prompts", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="baseline steps (default: the model's own)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for model in args.models:
        run_model(model, args.fit_prompts, args.prompts, args.repeats, args.steps)


if __name__ == "__main__":
    main()
