"""`accel batch PROMPTS --model M --out DIR`: the command's parser, its settings and its handler.

What a batch does (names, manifest, resume, sharding, failures) is `accel.batch`. Settings come, in
increasing priority, from built-in defaults, a config file's ``[batch]`` table, and the command line;
the acceleration config is layered by `accel.layering`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from ..batch.plan import Settings, dry_run, plan
from ..batch.workers import Interrupted, Rank, spawn
from ..config import available_presets
from ..io.prompts import PromptFileError, read_rows
from ..layering import layered, merge, parallel_config, read_sections
from ..pipelines.load import DEFAULT_MODEL, quiet_loading
from .args import UsageError, check_approx_dir, check_output, positive_int, row_field

# name -> (argparse type, built-in default, help). The same names are the keys of a config
# file's [batch] table.
SETTINGS = {
    "model": (str, None, "hub id, local folder or built-in name (default: the default built-in model)"),
    "out": (str, None, "output folder (required: here or in the config file)"),
    "preset": (str, "balanced", "preset for rows that name none (see `accel models`); default balanced, off turns "
                                "acceleration off"),
    # defaults for rows: checked as a row's own value is (accel.io.prompts.check)
    "seed": (row_field("seed"), 0, "seed of row i when the row gives none: SEED + i"),
    "steps": (row_field("steps"), None, "denoising steps for rows that give none"),
    "height": (row_field("height"), None, None),
    "width": (row_field("width"), None, None),
    "frames": (row_field("frames"), None, "video models: number of frames"),
    "guidance": (row_field("guidance"), None, "guidance scale"),
    "negative_prompt": (str, None, "negative prompt for rows that give none"),
    "fps": (positive_int, 8, "video models: frames per second"),
    "image_format": (str, "png", "png or webp"),
    "video_format": (str, "mp4", "mp4 (H.264) or gif"),
    "device": (str, None, "cuda, cpu, ... (default: cuda if present, one GPU per rank)"),
    "dtype": (str, "auto", "float32, bfloat16, float16 or auto"),
    "approx_cache": (str, None, "folder of the approximate cache (NIRVANA): a row whose prompt is close to an "
                                "earlier row's starts from that row's stored latent and skips its first steps"),
}
_CHOICES = {"image_format": ("png", "webp"), "video_format": ("mp4", "gif")}


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
    b.add_argument("--gpus", type=positive_int, default=None,
                   help="spawn N worker processes on this machine (one per GPU), each doing every Nth row")
    b.add_argument("--parallel", default=None, metavar="FIELD=VALUE,...",
                   help="a group of ranks per image, e.g. cfg=2: the processes split into groups of the degrees' "
                        "product, each making its rows with these parallel strategies (accel.ParallelConfig)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_batch, _parser=b)


def settings_from_args(args) -> Settings:
    tables, sections = read_sections(args.config, args.sets, {"batch": tuple(SETTINGS)})
    file_batch = tables.get("batch", {})
    values = {}
    for name, (typ, default, _) in SETTINGS.items():
        v = getattr(args, name)
        if v is None and name in file_batch:
            v = _convert(name, typ, file_batch[name], args.config)
        values[name] = default if v is None else v
    values["model"] = values["model"] or DEFAULT_MODEL
    if values["approx_cache"]:  # the approx section's folder; the file's other approx fields still apply
        sections = merge(sections, {"approx": {"dir": values["approx_cache"]}})
    if not values["out"]:
        raise UsageError("--out: give the output folder (or `out` in the config file's [batch] table)")
    return Settings(values, sections, parallel_config(getattr(args, "parallel", None), args.config))


def _convert(name, typ, value, path):
    try:
        v = typ(str(value))
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"--config {str(path)!r}: batch.{name}: {e}") from None
    if name in _CHOICES and v not in _CHOICES[name]:
        raise UsageError(f"--config {str(path)!r}: batch.{name}: {v!r}; choose one of {', '.join(_CHOICES[name])}")
    return v


def cmd_batch(args) -> int:
    s = settings_from_args(args)
    presets = available_presets()
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
        layered(name, s.sections, None)
    out = Path(s.out)
    if args.dry_run:
        return dry_run(jobs, out, args.overwrite)
    check_output("--out", out, folder=True)  # every folder the rows write into, before any model loads
    check_approx_dir(s.sections, "--approx-cache" if args.approx_cache else "approx.dir")
    rank = _rank_for(s, args.gpus)
    if args.gpus and args.gpus > 1 and rank.world == 1:
        return spawn(args.gpus, ["batch", *_argv_without_gpus(args)])
    with quiet_loading():  # the driver loads torch and diffusers; diffusers' first import says nothing to a user
        from ..batch.driver import run_worker

    try:
        return run_worker(jobs, s, rank, overwrite=args.overwrite, progress=not args.no_progress,
                          source=args.prompts)
    except Interrupted as e:
        print(f"accel: interrupted ({e}); run the same command again to resume", file=sys.stderr)
        return 128 + e.signum


def _rank_for(s: Settings, gpus: int | None):
    """This process's `workers.Rank`, with the --parallel degree; refuses a world the degree does not divide."""
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
