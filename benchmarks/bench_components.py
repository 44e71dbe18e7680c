"""AsyncDiff (``ParallelConfig.components``) beside CFG parallelism on 2 gloo ranks, 1 thread each.

    python benchmarks/bench_components.py speed [--rounds 3]        # shape models, one process vs 2 ranks
    python benchmarks/bench_components.py fidelity [--prompts 8]    # the trained models at N=2, stride 1 and 2
    python benchmarks/bench_components.py estimate --stage-ms ...   # N=4/8 on H100s, on paper
    python benchmarks/bench_components.py tables SPEED.json FIDELITY.json   # the markdown tables

``speed``: one spawned group of 2 ranks (1 thread each, as `accel.parallel.spawn` sets) runs, round after
round, the one-process baseline (rank 0 alone, rank 1 waiting at a barrier), then each parallel row on both
ranks; every round's ratio is the baseline of that round over the row, so the ratios are side by side in
time. The work done beside each time: the steps and, for components, which stages each rank computes and
their measured share of the denoiser. ``fidelity``: every trained model's held-out prompts, the single
process's outputs against each row's, PSNR/SSIM and the checker's scores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (model, call overrides, rows)
SPEED = [
    ("shape:sd15:layers_per_block=1", {"height": 256, "width": 256, "steps": 8},
     [("cfg=2", {"cfg": 2}), ("components=2", {"components": 2}),
      ("components=2 stride 2", {"components": 2, "component_stride": 2})]),
    ("shape:flux:num_layers=2,num_single_layers=4", {"height": 256, "width": 256, "steps": 8,
                                                     "extra": {"max_sequence_length": 64}},
     [("components=2", {"components": 2}), ("components=2 stride 2", {"components": 2, "component_stride": 2})]),
]
FIDELITY_ROWS = [("components=2", {"components": 2}),
                 ("components=2 correction none (AsyncDiff)", {"components": 2, "component_correction": "none"}),
                 ("components=2 correction extrapolate", {"components": 2, "component_correction": "extrapolate"}),
                 ("components=2 correction residual", {"components": 2, "component_correction": "residual"}),
                 ("components=2 correction residual_extrapolate", {"components": 2,
                                                                   "component_correction": "residual_extrapolate"}),
                 ("components=2 stride 2", {"components": 2, "component_stride": 2}),
                 ("components=2 stride 2 correction none", {"components": 2, "component_stride": 2,
                                                            "component_correction": "none"}),
                 ("components=2 warmup 3", {"components": 2, "warmup_steps": 3})]


def _gather(obj):
    import torch.distributed as dist

    box = [None] * dist.get_world_size()
    dist.all_gather_object(box, obj)
    return box


def _speed_model(rank: int, model: str, call: dict, rows: list, rounds: int) -> dict | None:
    """One model's rounds; rank 0 returns the entry (times, ratios per round, fidelity, stats)."""
    import torch.distributed as dist

    import accel
    from accel.eval.metrics import compare
    from accel.parallel import parallel_stats, unparallelize
    from accel.pipelines.call import call_kwargs, to_frames
    from accel.pipelines.load import load

    pipe = load(model, device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    given = {k: v for k, v in call.items() if k != "extra"}

    def go():
        return pipe(**call_kwargs(pipe, prompt="a red cube on a blue floor", seed=0, **given), **call.get("extra", {}))

    times: dict[str, list] = {"1 process": []}
    outs, stats = {}, {}
    for label, cfg in [("1 process", None), *rows]:  # warm-up round: first calls, the measured split
        if cfg is None:
            if rank == 0:
                outs[label] = to_frames(go())
        else:
            accel.parallelize(pipe, accel.ParallelConfig(**cfg))
            outs[label] = to_frames(go())
            unparallelize(pipe)
        dist.barrier()
    for _ in range(rounds):
        for label, cfg in [("1 process", None), *rows]:
            dist.barrier()
            if cfg is None:
                if rank == 0:
                    t0 = time.perf_counter()
                    go()
                    times[label].append(time.perf_counter() - t0)
                dist.barrier()
                continue
            accel.parallelize(pipe, accel.ParallelConfig(**cfg))
            dist.barrier()
            t0 = time.perf_counter()
            go()
            seconds = time.perf_counter() - t0
            st = {k: v for k, v in parallel_stats(pipe).items() if k != "config"}
            unparallelize(pipe)
            times.setdefault(label, []).append(max(_gather(seconds)))
            stats[label] = _gather(st)
    if rank != 0:
        return None
    base = times["1 process"]
    entry = {"model": model, "call": call, "rounds": rounds, "rows": []}
    for label, ts in times.items():
        ratios = [b / t for b, t in zip(base, ts, strict=True)]
        row = {"label": label, "s": ts, "ratio_median": statistics.median(ratios),
               "ratio_min": min(ratios), "ratio_max": max(ratios)}
        if label != "1 process" and "cfg=2" in times and label != "cfg=2":  # paired within each round
            row["vs_cfg_median"] = statistics.median(c / t for c, t in zip(times["cfg=2"], ts, strict=True))
        if label != "1 process":
            row["fidelity"] = compare(outs["1 process"], outs[label])
            row["stats"] = stats[label]  # the last round's, per rank
        entry["rows"].append(row)
    return entry


def speed_worker(rank: int, path: str, rounds: int, only: str | None) -> None:
    report = []
    for model, call, rows in SPEED:
        if only and only not in model:
            continue
        entry = _speed_model(rank, model, call, rows, rounds)
        if entry is not None:
            report.append(entry)
            print(json.dumps(entry, default=str)[:2000], flush=True)
    if rank == 0:
        with open(path, "w") as f:
            json.dump(report, f, indent=1, default=str)


def fidelity_worker(rank: int, path: str, n_prompts: int, models: list[str]) -> None:
    import torch.distributed as dist

    import accel
    from accel.eval import bench
    from accel.eval.metrics import compare
    from accel.parallel import parallel_stats, unparallelize
    from accel.pipelines.call import to_frames
    from accel.pipelines.load import load

    report = []
    for model in models:
        pipe = load(model, device="cpu")
        pipe.set_progress_bar_config(disable=True)
        work = bench.workload(pipe, model, n_prompts=n_prompts, device="cpu")

        def run_all(pipe=pipe, work=work):
            return [to_frames(pipe(**c.kwargs, generator=torch.Generator("cpu").manual_seed(c.seed)))
                    for c in work.calls]

        ref = run_all()
        items = [c.item for c in work.calls]
        entry = {"model": model, "prompts": len(work.calls), "steps": work.steps,
                 "baseline_scores": work.scorer(ref, items), "rows": []}
        for label, cfg in FIDELITY_ROWS:
            if os.environ.get("ROWS") and not any(x in label for x in os.environ["ROWS"].split("|")):
                continue
            accel.parallelize(pipe, accel.ParallelConfig(**cfg))
            outs = run_all()
            st = {k: v for k, v in parallel_stats(pipe).items() if k != "config"}
            unparallelize(pipe)
            dist.barrier()
            if rank == 0:
                per = [compare(a, b) for a, b in zip(ref, outs, strict=True)]
                psnrs = [p["psnr"] if p["psnr"] is not None else float("inf") for p in per]
                entry["rows"].append({"label": label, "psnr_median": statistics.median(psnrs),
                                      "psnr_worst": min(psnrs), "ssim": statistics.median(p["ssim"] for p in per),
                                      "scores": work.scorer(outs, items), "stats": st})
        if rank == 0:
            report.append(entry)
            print(json.dumps(entry, default=str)[:1500], flush=True)
    if rank == 0:
        with open(path, "w") as f:
            json.dump(report, f, indent=1, default=str)


def estimate(stage_ms: list[float], handover_mb: float, n_values=(2, 4, 8), link_gbs: float = 250.0) -> list[dict]:
    """Step time at N components from measured per-stage times and hand-over size (MB per boundary).

    t(N) = max part (the measured split rule at N) + one hand-over and the prediction's broadcast on the link;
    the hand-over overlaps the next step, so only its excess over the compute shows.
    """
    from accel.parallel.components import split

    total = sum(stage_ms)
    rows = []
    for n in n_values:
        owner = split(stage_ms, n)
        parts = [sum(c for c, o in zip(stage_ms, owner, strict=True) if o == j) for j in range(n)]
        link_ms = handover_mb / 1e3 / link_gbs * 1e3
        step = max(max(parts), link_ms) + link_ms  # the hand-over hides behind compute; the broadcast does not
        rows.append({"N": n, "largest_part_ms": max(parts), "link_ms": link_ms, "step_ms": step,
                     "speedup": total / step})
    return rows


def _share(st: list[dict]) -> str:
    waits = [x.get("component_wait_s", 0.0) / x["component_async_s"] for x in st if x.get("component_async_s")]
    return " / ".join(f"{w:.0%}" for w in waits)


def tables(speed: list | None, fidelity: list | None) -> str:
    """The markdown tables of a speed and a fidelity report (the JSON files the other commands write)."""
    lines = []
    for e in speed or []:
        call = e["call"]
        lines += [f"\n{e['model']}, {call.get('height')}x{call.get('width')} px, {call.get('steps')} steps, "
                  f"{e['rounds']} rounds\n",
                  "| row | s per call (min-max) | speed-up median (min-max) | vs cfg=2 | PSNR / SSIM vs 1 process | "
                  "work per rank | hand-over MB/step | waiting (rank 0 / 1) |", "|---|---|---|---|---|---|---|---|"]
        for r in e["rows"]:
            ts = r["s"]
            st = r.get("stats") or [{}]
            fid = r.get("fidelity") or {}
            if r["label"] == "1 process":
                work = f"{e['call'].get('steps')} steps, whole denoiser"
            elif "component_split" in st[0]:
                shares = st[0]["component_cost_share"]
                work = (f"{st[0]['component_async_steps']} of {e['call'].get('steps')} steps split: "
                        + "; ".join(f"{p} ({c:.0%})" for p, c in zip(st[0]["component_split"], shares, strict=True)))
            else:
                work = f"{e['call'].get('steps')} steps, half the batch"
            steps = max(st[0].get("component_async_steps", 0), 1)
            mb = f"{st[0].get('component_handover_bytes', 0) / steps / 1e6:.1f}" if "component_split" in st[0] else "-"
            vs = f"{r['vs_cfg_median']:.2f}" if "vs_cfg_median" in r else "-"
            psnr = "reference" if not fid else f"{fid['psnr']:.1f} / {fid['ssim']:.4f}"
            lines.append(f"| {r['label']} | {statistics.median(ts):.2f} ({min(ts):.2f}-{max(ts):.2f}) | "
                         f"{r['ratio_median']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | {vs} | {psnr} | "
                         f"{work} | {mb} | {_share(st) if 'component_split' in st[0] else '-'} |")
    for e in fidelity or []:
        base = e["baseline_scores"]
        keys = [k for k in base if k != "clips"]
        lines += [f"\n{e['model']}: {e['prompts']} held-out prompts, {e['steps']} steps; one process's checker "
                  + ", ".join(f"{k} {base[k]:.2f}" for k in keys) + "\n",
                  "| row | PSNR median (worst) | SSIM | " + " / ".join(keys) + " | held? |", "|---|---|---|---|---|"]
        for r in e["rows"]:
            held = all(r["scores"][k] >= base[k] - 1e-9 for k in keys)
            lines.append(f"| {r['label']} | {r['psnr_median']:.1f} ({r['psnr_worst']:.1f}) | {r['ssim']:.3f} | "
                         + " / ".join(f"{r['scores'][k]:.2f}" for k in keys) + f" | {'yes' if held else 'no'} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    from accel.parallel import spawn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("speed", "fidelity", "estimate", "tables"))
    ap.add_argument("files", nargs="*", help="tables: speed and fidelity JSON reports")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default=None, help="speed: only models whose name contains this")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--models", default="ref-sd,ref-dit,ref-video")
    ap.add_argument("--stage-ms", default=None, help="estimate: comma-separated per-stage ms")
    ap.add_argument("--handover-mb", type=float, default=0.0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    path = a.json or os.path.join(tempfile.mkdtemp(prefix="bench-components-"), "results.json")
    if a.what == "tables":
        reports = [json.load(open(f)) for f in a.files]
        speed = [e for r in reports for e in r if "rounds" in e]
        fidelity = [e for r in reports for e in r if "baseline_scores" in e]
        print(tables(speed, fidelity))
        return
    if a.what == "estimate":
        print(json.dumps(estimate([float(x) for x in a.stage_ms.split(",")], a.handover_mb), indent=1))
        return
    if a.what == "speed":
        spawn(speed_worker, 2, (path, a.rounds, a.only), backend="gloo", timeout_s=1800)
    else:
        spawn(fidelity_worker, 2, (path, a.prompts, a.models.split(",")), backend="gloo", timeout_s=1800)
    print("results:", path)


if __name__ == "__main__":
    main()
