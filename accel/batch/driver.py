"""The worker of `accel batch`: one rank's share of the jobs, each row generated once, written atomically with
its sidecar and a manifest line; a failing row is recorded and the batch goes on (`accel.batch` has the rules)."""

from __future__ import annotations

import gc
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import api, parallel
from ..io import generate as once
from ..layering import layered
from ..parallel.runtime import ParallelError, backend_for
from ..pipelines.call import call_kwargs, family_name, is_video
from ..pipelines.load import call_defaults, default_device, load
from . import manifest as mf
from . import workers
from .plan import Job, Settings
from .progress import Progress


@dataclass
class _Tally:
    generated: int = 0
    skipped: int = 0
    failed: list = field(default_factory=list)  # (line, name, error)
    seconds: float = 0.0


def run_worker(jobs: list[Job], s: Settings, rank, *, overwrite=False, progress=True, source="", pipe=None) -> int:
    """This rank's share of ``jobs``; on rank 0 also the progress bar and the summary. ``pipe``: use this
    pipeline instead of loading ``s.model`` (it is restored before returning)."""
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    mine = [j for j in jobs if rank.owns(j.row.index)]
    with workers.folder_lock(out, rank.rank), workers.Signals() as signals:
        group = workers.Group(rank, _backend(s, rank))
        try:
            run = group.run_id()
            done = mf.Done(out, mf.read_all(out, warn=rank.rank == 0))
            if rank.leader:
                _remove_stale_temporaries(out, {j.stem for j in mine})
            status = {j.stem: ("todo" if overwrite else done.status(j.stem, j.key))
                      for j in (jobs if rank.rank == 0 else mine)}
            # A copy's ranks make every image together: they take the leader's list, read before any
            # of it was written.
            todo_names = group.from_leader([j.stem for j in mine if status[j.stem] != "done"])
            todo = [j for j in mine if j.stem in set(todo_names)]
            tally = _Tally(skipped=len(mine) - len(todo))
            total_todo = sum(st != "done" for st in status.values())
            writer = mf.Writer(out / mf.manifest_name(rank.copy, rank.copies)) if rank.leader else _NoWriter()
            bar = Progress(out, rank, run, total_todo, len(jobs) - total_todo, enabled=progress)
            try:
                writer.write({"event": "start", "run": run, "rank": rank.rank, "world": rank.world,
                              "rows": len(mine), "todo": len(todo), "source": str(source)})
                # parallelize builds its process groups collectively: with --parallel every rank
                # joins once any copy has work, even one with none of its own.
                busy = any(group.gather(bool(todo))) if rank.degree > 1 else bool(todo)
                if todo or busy:
                    _generate_all(todo, s, rank, run, writer, signals, tally, bar, pipe)
                writer.write({"event": "end", "run": run, "rank": rank.rank, "generated": tally.generated,
                              "failed": len(tally.failed), "skipped": tally.skipped})
                bar.begin()
                group.wait_all(poll=bar.poll if rank.rank == 0 else None)
                bar.poll()
            except workers.Interrupted as e:
                writer.write({"event": "interrupted", "run": run, "rank": rank.rank, "signal": str(e)})
                bar.close()
                raise
            finally:
                writer.close()
            bar.close()
            tallies = group.gather(tally)[::rank.degree]  # the leaders' (the other ranks made the same rows)
        finally:
            group.close()
    if rank.rank == 0 and rank.copies > 1:
        mf.merge_rank_files(out)
    return _summary(tallies, len(jobs), out, rank.rank == 0)


class _NoWriter:
    """The manifest of a rank that is not its copy's leader: it writes nothing."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _backend(s: Settings, rank) -> str:
    """The default group's backend: gloo, or NCCL when --parallel runs its strategies on GPUs."""
    if rank.degree == 1:
        return "gloo"
    return backend_for(s.device or default_device(), s.parallel.backend)


def _remove_stale_temporaries(out: Path, stems: set[str]) -> None:
    """Temporary files a killed run of this rank left (``.<name>.<pid>.tmp<suffix>``); only this rank
    writes these names, so none of them is in use."""
    pattern = re.compile(r"^\.(?P<base>.+)\.\d+\.tmp(\.[^.]*)?$")
    for p in out.iterdir():
        m = pattern.match(p.name)
        if m:
            base = m["base"]
            for suffix in (".png", ".webp", ".mp4", ".gif"):
                if base.endswith(suffix):
                    base = base[: -len(suffix)]
            if base in stems:
                p.unlink(missing_ok=True)


def _generate_all(todo, s: Settings, rank, run, writer, signals, tally, bar, pipe) -> None:
    own_pipe = pipe is None
    t0 = time.perf_counter()
    if own_pipe:
        device = s.device
        if device is None and default_device() == "cuda":
            device = f"cuda:{rank.local_rank}"
        pipe = load(s.model, device=device, dtype=s.dtype, seed=0)
    load_s = time.perf_counter() - t0
    bar.begin()
    if own_pipe:
        pipe.set_progress_bar_config(disable=True)  # one bar for the batch, not one per row
    family, video = family_name(pipe), is_video(pipe)
    ctx = _Context(s, pipe, family, video, load_s, leader=rank.leader)
    if s.parallel is not None:
        if todo:  # the usual single preset goes on before the parallel hooks, as in `accel generate`
            ctx.current = ctx.configs[todo[0].preset] = layered(todo[0].preset, s.sections, family, s.parallel)
            api.apply(pipe, ctx.current)
        parallel.parallelize(pipe, s.parallel, replicas=rank.copies)
    try:
        for job in todo:
            t = time.perf_counter()
            try:
                record = _generate_one(job, ctx, signals, writer, run, rank.rank)
                tally.generated += 1
            except ParallelError:  # a rank of this copy is gone: the group cannot go on
                raise
            except Exception as e:  # the row fails, the batch goes on
                err = _describe(e)
                record = {"event": "row", "status": "failed", "name": job.stem, "index": job.row.index,
                          "line": job.row.line, "id": job.row.id, "request": job.key, "error": err,
                          "rank": rank.rank, "run": run}
                with signals.commit():
                    writer.write(record)
                tally.failed.append((job.row.line, job.stem, err))
                _free_memory()
            tally.seconds += time.perf_counter() - t
            bar.advance(failed=record["status"] == "failed")
    finally:
        if s.parallel is not None:
            parallel.unparallelize(pipe)
        if not own_pipe:
            api.remove(pipe)


@dataclass
class _Context:
    s: Settings
    pipe: object
    family: str
    video: bool
    load_s: float
    configs: dict = field(default_factory=dict)
    current: object = None
    leader: bool = True  # the rank that writes (with --parallel, a copy's first rank)


class RowError(ValueError):
    """A row's request cannot be generated (the message says why)."""


def _generate_one(job: Job, ctx: _Context, signals, writer, run, rank) -> dict:
    s, pipe, req = ctx.s, ctx.pipe, job.request
    if req["frames"] is not None and not ctx.video:
        raise RowError(f"frames: {s.model} makes images, not video")
    if job.preset not in ctx.configs:
        ctx.configs[job.preset] = layered(job.preset, s.sections, ctx.family, s.parallel)
    cfg = ctx.configs[job.preset]
    if ctx.current is not cfg:
        once.apply_config(pipe, cfg)
        ctx.current = cfg
    kw = call_kwargs(pipe, prompt=req["prompt"], negative_prompt=req["negative_prompt"], steps=req["steps"],
                     height=req["height"], width=req["width"], frames=req["frames"], guidance=req["guidance"],
                     seed=job.seed, defaults=call_defaults(s.model))
    frames, generate_s = once.call(pipe, kw)
    if not np.isfinite(frames).all():
        raise RowError("the output has NaN or infinite values (try float32, fewer steps' skipping, or preset off)")
    if not ctx.leader:
        return {"status": "ok"}
    suffix = "." + (s.video_format if ctx.video else s.image_format)
    out = Path(s.out) / (job.stem + suffix)
    with signals.commit():
        extra = {"row": job.row.fields(), "line": job.row.line, "index": job.row.index, "id": job.row.id,
                 "request": job.key}
        if s.parallel is not None:
            extra["parallel"] = parallel.parallel_stats(pipe)
        side = once.save(pipe, frames, out, fps=s.fps, model=s.model, family=ctx.family, prompt=req["prompt"],
                         negative_prompt=req["negative_prompt"], seed=job.seed, kw=kw, preset=job.preset,
                         config=cfg, timings={"load_s": ctx.load_s, "generate_s": generate_s}, extra=extra)
        size, sha = mf.file_digest(out)
        record = {"event": "row", "status": "ok", "name": job.stem, "output": out.name, "index": job.row.index,
                  "line": job.row.line, "id": job.row.id, "request": job.key, "size": size, "sha256": sha,
                  "seconds": round(generate_s + side["timings"]["save_s"], 4), "rank": rank, "run": run}
        approx = side["stats"].get("approx")
        if approx:  # the row started from a cached latent (hit), or ran fully and stored its own
            record["approx"] = {k: approx.get(k) for k in ("hit", "similarity", "skipped_steps", "entry", "stored")}
        writer.write(record)
    return record


def _describe(e: BaseException) -> str:
    if isinstance(e, once.CallError) and e.__cause__ is not None:  # the pipeline's own error, as it raised it
        e = e.__cause__
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _summary(tallies: list[_Tally], rows: int, out: Path, speak: bool) -> int:
    generated = sum(t.generated for t in tallies)
    skipped = sum(t.skipped for t in tallies)
    failed = sorted(f for t in tallies for f in t.failed)
    if speak:
        busy = max((t.seconds for t in tallies), default=0.0)
        rate = f"; {60 * (generated + len(failed)) / busy:.1f} rows/min" if busy > 0 else ""
        print(f"accel batch: {rows} rows: {generated} generated, {skipped} already done, {len(failed)} failed"
              f"{rate}; outputs in {out}")
        for line, name, err in failed:
            print(f"  failed: line {line} ({name}): {err}")
        if failed:
            print(f"  the manifest {out / mf.MANIFEST} records each error; fix and run the same command to retry")
    return 1 if failed else 0
