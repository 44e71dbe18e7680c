"""`accel batch PROMPTS --model M --out DIR`: many prompts, resumable, on every GPU, never losing work.

Each row of the prompt file (see `accel.app.prompts`) becomes one output in DIR named
``{index:05d}_{slug}_s{seed}.png`` (or ``.webp``; ``.mp4``/``.gif`` for video models), or
``{id}.<ext>`` for a row with an id, plus a sidecar ``<output>.json``, and one ``ok`` or
``failed`` line in the manifest (see `accel.app.manifest`). Writes are atomic, so after a kill
DIR holds only whole files, and running the same command again does only what is not verifiably
done. A failing row (a bad value, an exception, NaN output, out of memory) is recorded and the
batch goes on; the exit status is 1 when any row failed, 2 for a bad command or prompt file,
130/143 when interrupted.

Settings come, in increasing priority, from built-in defaults, a config file's ``[batch]`` table,
and the command line. The acceleration config is a preset (``--preset``, a row's ``preset``, or
the file's ``[batch] preset``), then the file's ``cache``/``tokens``/``attention`` sections, then
``--set section.field=value`` on top.

Sharding: rank R of W does the rows with ``index % W == R`` (see `accel.app.workers`). With
``--parallel cfg=2`` (any `accel.ParallelConfig`, or the config file's ``[parallel]`` table) the
world splits into copies of ``degree`` ranks (the degrees' product) that make each image together
with the parallel strategies on their own process groups; copy C of W/degree does the rows with
``index % (W/degree) == C``, and its first rank alone writes outputs and manifest lines.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config_base import ConfigError
from . import manifest as mf
from .cli import UsageError, _positive_int, row_field
from .prompts import PromptFileError, Row, read_rows, stem

# name -> (argparse type, built-in default, help). The same names are the keys of a config
# file's [batch] table.
SETTINGS = {
    "model": (str, None, "hub id, local folder or built-in name (default: the default built-in model)"),
    "out": (str, None, "output folder (required: here or in the config file)"),
    "preset": (str, "balanced", "preset for rows that name none (see `accel models`); default balanced, off turns "
                                "acceleration off"),
    # defaults for rows: checked as a row's own value is (accel.app.prompts.check)
    "seed": (row_field("seed"), 0, "seed of row i when the row gives none: SEED + i"),
    "steps": (row_field("steps"), None, "denoising steps for rows that give none"),
    "height": (row_field("height"), None, None),
    "width": (row_field("width"), None, None),
    "frames": (row_field("frames"), None, "video models: number of frames"),
    "guidance": (row_field("guidance"), None, "guidance scale"),
    "negative_prompt": (str, None, "negative prompt for rows that give none"),
    "fps": (_positive_int, 8, "video models: frames per second"),
    "image_format": (str, "png", "png or webp"),
    "video_format": (str, "mp4", "mp4 (H.264) or gif"),
    "device": (str, None, "cuda, cpu, ... (default: cuda if present, one GPU per rank)"),
    "dtype": (str, "auto", "float32, bfloat16, float16 or auto"),
    "approx_cache": (str, None, "folder of the approximate cache (NIRVANA): a row whose prompt is close to an "
                                "earlier row's starts from that row's stored latent and skips its first steps"),
}
_CHOICES = {"image_format": ("png", "webp"), "video_format": ("mp4", "gif")}
_CONFIG_SECTIONS = ("cache", "tokens", "attention", "approx")
_PARALLEL_SECTION = "parallel"  # a config file's ParallelConfig table (accel.app.generation.parallel_config)


def add_parser(sub) -> None:
    b = sub.add_parser("batch", help="generate every row of a prompt file (resumable, multi-GPU)",
                       description="Generate every row of PROMPTS (.txt, .jsonl or .csv) into --out. Re-running "
                                   "resumes; rows verified done (manifest and file) are skipped.")
    b.add_argument("prompts", metavar="PROMPTS", help="prompt file: .txt (one per line), .jsonl or .csv")
    for name, (typ, default, hlp) in SETTINGS.items():
        extra = f" (default {default})" if default is not None and hlp and "default" not in hlp else ""
        b.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None,
                       choices=_CHOICES.get(name), help=(hlp or "") + extra or None)
    b.add_argument("--config", default=None,
                   help="config file (.yaml/.toml/.json): cache/tokens/attention sections and a [batch] table of "
                        "the options above; command-line options win")
    b.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field, e.g. --set cache.interval=3 (repeatable)")
    b.add_argument("--overwrite", action="store_true", help="generate every row again, even those done")
    b.add_argument("--dry-run", action="store_true", help="list what would be generated and what is done; "
                                                          "load nothing")
    b.add_argument("--gpus", type=_positive_int, default=None,
                   help="spawn N worker processes on this machine (one per GPU), each doing every Nth row")
    b.add_argument("--parallel", default=None, metavar="FIELD=VALUE,...",
                   help="a group of ranks per image, e.g. cfg=2: the processes split into groups of the degrees' "
                        "product, each making its rows with these parallel strategies (accel.ParallelConfig)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_batch, _parser=b)


# --------------------------------------------------------------------------------------------
# Settings and plan
# --------------------------------------------------------------------------------------------


@dataclass
class Settings:
    values: dict
    sections: dict = field(default_factory=dict)  # config overrides from the file and --set
    parallel: object = None  # accel.ParallelConfig of --parallel / the file's [parallel] table, or None

    def __getattr__(self, name):
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None


def settings_from_args(args) -> Settings:
    from ..pipelines.load import DEFAULT_MODEL

    file_batch, sections = read_sections(args.config, args.sets)
    values = {}
    for name, (typ, default, _) in SETTINGS.items():
        v = getattr(args, name)
        if v is None and name in file_batch:
            v = _convert(name, typ, file_batch[name], args.config)
        values[name] = default if v is None else v
    values["model"] = values["model"] or DEFAULT_MODEL
    if values["approx_cache"]:  # the approx section's folder; the file's other approx fields still apply
        sections = _merge(sections, {"approx": {"dir": values["approx_cache"]}})
    if not values["out"]:
        raise UsageError("--out: give the output folder (or `out` in the config file's [batch] table)")
    from .generation import parallel_config

    return Settings(values, sections, parallel_config(getattr(args, "parallel", None), args.config))


def read_sections(config_file, sets: list[str]) -> tuple[dict, dict]:
    """(the ``--config`` file's [batch] table, its cache/tokens/attention sections with each ``--set`` on top);
    `accel generate` reads its config the same way."""
    file_batch, sections = _read_config_file(config_file) if config_file else ({}, {})
    for k, v in _parse_sets(sets).items():
        _deep_set(sections, k, v)
    return file_batch, sections


def _read_config_file(path) -> tuple[dict, dict]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {str(path)!r}: no such file")
    from .generation import config_mapping

    try:
        data = config_mapping(p)
    except ConfigError as e:
        raise UsageError(f"--config: {e}") from None
    unknown = [k for k in data if k not in (*_CONFIG_SECTIONS, _PARALLEL_SECTION, "batch")]
    if unknown:
        raise UsageError(f"--config {str(path)!r}: unknown section {unknown[0]!r}; sections are "
                         f"{', '.join(_CONFIG_SECTIONS)}, {_PARALLEL_SECTION} and batch")
    batch = data.get("batch") or {}
    bad = [k for k in batch if k not in SETTINGS]
    if bad:
        raise UsageError(f"--config {str(path)!r}: batch.{bad[0]}: unknown setting; settings are {', '.join(SETTINGS)}")
    return batch, {k: v for k, v in data.items() if k not in ("batch", _PARALLEL_SECTION)}


def _convert(name, typ, value, path):
    try:
        v = typ(str(value))
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"--config {str(path)!r}: batch.{name}: {e}") from None
    if name in _CHOICES and v not in _CHOICES[name]:
        raise UsageError(f"--config {str(path)!r}: batch.{name}: {v!r}; choose one of {', '.join(_CHOICES[name])}")
    return v


def _parse_sets(sets: list[str]) -> dict:
    import yaml

    out = {}
    for s in sets:
        key, eq, value = s.partition("=")
        if not eq or key.count(".") != 1 or key.split(".")[0] not in _CONFIG_SECTIONS:
            sections = ", ".join(_CONFIG_SECTIONS)
            raise UsageError(f"--set {s!r}: write SECTION.FIELD=VALUE with SECTION one of {sections}")
        out[key] = yaml.safe_load(value) if value.strip() else ""
    return out


def _deep_set(d: dict, dotted: str, value) -> None:
    section, name = dotted.split(".")
    if not isinstance(d.get(section), dict):
        d[section] = {}
    d[section][name] = value


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_for(preset_name: str, sections: dict, family: str | None):
    """The Config a row runs with: its preset for ``family``, then the file's sections and --set on top."""
    from ..config import Config, preset

    return Config.from_dict(_merge(preset(preset_name, family).to_dict(), sections))


@dataclass(frozen=True)
class Job:
    row: Row
    stem: str
    seed: int
    preset: str
    request: dict
    key: str


def plan(rows: list[Row], s: Settings, source: str = "") -> list[Job]:
    """One job per row, with its output name and request; raises PromptFileError on a name clash."""
    jobs, seen, problems = [], {}, []
    for r in rows:
        seed = r.seed if r.seed is not None else s.seed + r.index
        name = stem(r, seed)
        if name in seen:
            problems.append((r.line, f"output name {name!r} is also the name of line {seen[name]}'s output; "
                                      "give one of them another id"))
        seen[name] = r.line
        preset_name = r.preset or s.preset
        request = {
            "model": s.model, "prompt": r.prompt,
            "negative_prompt": r.negative_prompt if r.negative_prompt is not None else s.negative_prompt,
            "seed": seed, "height": _pick(r.height, s.height), "width": _pick(r.width, s.width),
            "frames": _pick(r.frames, s.frames), "steps": _pick(r.steps, s.steps),
            "guidance": _pick(r.guidance, s.guidance), "preset": preset_name, "config": s.sections,
            "dtype": s.dtype, "fps": s.fps, "formats": [s.image_format, s.video_format],
        }
        jobs.append(Job(r, name, seed, preset_name, request, mf.request_key(request)))
    if problems:
        raise PromptFileError(source, problems)
    return jobs


def _pick(row_value, default):
    return row_value if row_value is not None else default


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def cmd_batch(args) -> int:
    import accel

    from .workers import Interrupted, spawn

    s = settings_from_args(args)
    presets = accel.available_presets()
    if s.preset not in presets:
        raise UsageError(f"--preset {s.preset!r}: choose one of {', '.join(presets)}")
    try:
        rows = read_rows(args.prompts, presets)
        jobs = plan(rows, s, args.prompts)
    except PromptFileError as e:
        first, *rest = str(e).splitlines()
        print(f"accel: error: {first}", *rest, sep="\n", file=sys.stderr)
        return 2
    # Every preset a row uses must combine with the overrides; say so now, not at row 9,000.
    for name in sorted({j.preset for j in jobs}):
        config_for(name, s.sections, None)
    out = Path(s.out)
    if args.dry_run:
        return _dry_run(jobs, out, args.overwrite)
    from .outputs import check_writable

    check_writable(out / "x")
    rank = _rank_for(s, args.gpus)
    if args.gpus and args.gpus > 1 and rank.world == 1:
        return spawn(args.gpus, ["batch", *_argv_without_gpus(args)])
    try:
        return run_worker(jobs, s, rank, overwrite=args.overwrite, progress=not args.no_progress,
                          source=args.prompts)
    except Interrupted as e:
        print(f"accel: interrupted ({e}); run the same command again to resume", file=sys.stderr)
        return 128 + e.signum


def _rank_for(s: Settings, gpus: int | None):
    """This process's `workers.Rank`, with the --parallel degree; refuses a world the degree does not divide."""
    from dataclasses import replace

    from .workers import Rank

    rank = Rank.from_env()
    if s.parallel is None:
        return rank
    degree = s.parallel.world_size
    world = gpus if rank.world == 1 and gpus else rank.world
    if world % degree:
        raise UsageError(f"--parallel: a group of {degree} ranks per image needs a number of processes that is a "
                         f"multiple of {degree}, not {world}; use --gpus {degree * max(1, world // degree)}")
    return replace(rank, degree=degree)


def _argv_without_gpus(args) -> list[str]:
    """The command line again, for the children `--gpus` spawns."""
    argv = []
    for a in args._parser._actions:
        if a.dest in ("help", "gpus", "func", "_parser"):
            continue
        v = getattr(args, a.dest, None)
        if not a.option_strings:
            argv.append(str(v))
        elif isinstance(a, argparse._StoreTrueAction):
            argv += [a.option_strings[0]] if v else []
        elif isinstance(a, argparse._AppendAction):
            for x in v or ():
                argv += [a.option_strings[0], str(x)]
        elif v is not None:
            argv += [a.option_strings[0], str(v)]
    return argv


def _dry_run(jobs: list[Job], out: Path, overwrite: bool) -> int:
    done = mf.Done(out, mf.read_all(out)) if out.is_dir() else mf.Done(out, [])
    counts: dict[str, int] = {}
    words = {"done": "done, skip", "todo": "to do", "failed": "failed before, retry",
             "changed": "done with other settings, redo", "missing": "recorded but file gone or altered, redo"}
    for j in jobs:
        st = done.status(j.stem, j.key)
        if overwrite and st == "done":
            st = "overwrite"
        counts[st] = counts.get(st, 0) + 1
        print(f"line {j.row.line:>5}  {j.stem}  [{words.get(st, 'done, overwrite')}]")
    todo = len(jobs) - counts.get("done", 0)
    print(f"dry run: {len(jobs)} rows, {counts.get('done', 0)} done, {todo} to generate into {out}")
    return 0


@dataclass
class _Tally:
    generated: int = 0
    skipped: int = 0
    failed: list = field(default_factory=list)  # (line, name, error)
    seconds: float = 0.0


def run_worker(jobs: list[Job], s: Settings, rank, *, overwrite=False, progress=True, source="", pipe=None) -> int:
    """This rank's share of ``jobs``; on rank 0 also the progress bar and the summary. ``pipe``: use this
    pipeline instead of loading ``s.model`` (it is restored before returning)."""
    from . import workers

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
            bar = _Progress(out, rank, run, total_todo, len(jobs) - total_todo, enabled=progress)
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
    from ..parallel.runtime import backend_for
    from ..pipelines.load import default_device

    return backend_for(s.device or default_device(), s.parallel.backend)


def _remove_stale_temporaries(out: Path, stems: set[str]) -> None:
    """Temporary files a killed run of this rank left (``.<name>.<pid>.tmp<suffix>``); only this rank
    writes these names, so none of them is in use."""
    import re

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
    import accel

    from ..parallel import ParallelError
    from ..pipelines.call import family_name, is_video
    from ..pipelines.load import default_device, load

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
            ctx.current = ctx.configs[todo[0].preset] = config_for(todo[0].preset, s.sections, family)
            accel.apply(pipe, ctx.current)
        accel.parallelize(pipe, s.parallel, replicas=rank.copies)
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
            accel.parallel.unparallelize(pipe)
        if not own_pipe:
            accel.remove(pipe)


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
    import numpy as np

    import accel

    from ..pipelines.call import call_kwargs, to_frames
    from . import generation, outputs

    s, pipe, req = ctx.s, ctx.pipe, job.request
    if req["frames"] is not None and not ctx.video:
        raise RowError(f"frames: {s.model} makes images, not video")
    if job.preset not in ctx.configs:
        ctx.configs[job.preset] = config_for(job.preset, s.sections, ctx.family)
    cfg = ctx.configs[job.preset]
    if ctx.current is not cfg:
        accel.apply(pipe, cfg)
        ctx.current = cfg
    kw = call_kwargs(pipe, prompt=req["prompt"], negative_prompt=req["negative_prompt"], steps=req["steps"],
                     height=req["height"], width=req["width"], frames=req["frames"], guidance=req["guidance"],
                     seed=job.seed, defaults=generation.generation_defaults(s.model))
    t = time.perf_counter()
    frames = to_frames(pipe(**kw))
    generate_s = time.perf_counter() - t
    if not np.isfinite(frames).all():
        raise RowError("the output has NaN or infinite values (try float32, fewer steps' skipping, or preset off)")
    if not ctx.leader:
        return {"status": "ok"}
    suffix = "." + (s.video_format if ctx.video else s.image_format)
    out = Path(s.out) / (job.stem + suffix)
    with signals.commit():
        t = time.perf_counter()
        outputs.save_output(frames, out, fps=s.fps)
        save_s = time.perf_counter() - t
        side = generation.sidecar(pipe, output=out.name, model=s.model, family=ctx.family, prompt=req["prompt"],
                                  negative_prompt=req["negative_prompt"], seed=job.seed, kw=kw, preset=job.preset,
                                  config=cfg, timings={"load_s": ctx.load_s, "generate_s": generate_s,
                                                       "save_s": save_s})
        side.update({"row": job.row.fields(), "line": job.row.line, "index": job.row.index, "id": job.row.id,
                     "request": job.key})
        if s.parallel is not None:
            side["parallel"] = accel.parallel.parallel_stats(pipe)
        outputs.write_json(outputs.sidecar_path(out), side)
        size, sha = mf.file_digest(out)
        record = {"event": "row", "status": "ok", "name": job.stem, "output": out.name, "index": job.row.index,
                  "line": job.row.line, "id": job.row.id, "request": job.key, "size": size, "sha256": sha,
                  "seconds": round(generate_s + save_s, 4), "rank": rank, "run": run}
        approx = side["stats"].get("approx")
        if approx:  # the row started from a cached latent (hit), or ran fully and stored its own
            record["approx"] = {k: approx.get(k) for k in ("hit", "similarity", "skipped_steps", "entry", "stored")}
        writer.write(record)
    return record


def _describe(e: BaseException) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _Progress:
    """Rank 0's bar over the whole run: its own rows as they finish, other ranks' from their manifests."""

    def __init__(self, out: Path, rank, run: str, total: int, done_before: int, enabled: bool):
        self.rank, self.run, self.total, self.done_before = rank, run, total, done_before
        self.enabled = enabled and rank.rank == 0 and total > 0
        self.bar = None
        self.failed = 0
        self.tails = [mf.Tail(out / mf.manifest_name(r, rank.world)) for r in range(1, rank.world)]

    def begin(self) -> None:
        """Start the clock once the model is loaded, so the rate and ETA are about rows, not loading."""
        if self.enabled and self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, unit="row", desc="accel batch", dynamic_ncols=True, file=sys.stderr,
                            postfix={"done before": self.done_before} if self.done_before else None)

    def advance(self, failed: bool) -> None:
        if self.bar is None:
            return
        self._count(1, failed)
        self.poll()

    def _count(self, n: int, failed: int) -> None:
        self.failed += failed
        if self.failed:
            self.bar.set_postfix(failed=self.failed, refresh=False)
        self.bar.update(n)

    def poll(self) -> None:
        if self.bar is None:
            return
        for t in self.tails:
            recs = [r for r in t.read() if r.get("event") == "row" and r.get("run") == self.run]
            if recs:
                self._count(len(recs), sum(r.get("status") == "failed" for r in recs))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


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
