"""`accel run [--preset P | --config F] -- COMMAND ...`: run an unchanged script with its pipelines accelerated.

The command replaces this process (``exec``), with ``accel/sitecustomize`` first on
``PYTHONPATH`` and ``ACCEL_PRESET`` or ``ACCEL_CONFIG`` set, so every Python process it starts
(the script, torchrun's workers, ...) accelerates each diffusers pipeline at its first call and
prints ``accel: stats {json}`` lines to stderr at exit (see `accel.auto`). Its standard output,
exit status and signals are the command's own. Python run with ``-I`` or ``-E`` ignores
``PYTHONPATH``; use ``import accel.auto`` there. The command must use a Python that can import accel.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..config import Config, available_presets
from ..zero_code import SITE_DIR
from .args import UsageError


def add_parser(sub) -> None:
    r = sub.add_parser("run", help="run a script with every diffusers pipeline it creates accelerated",
                       description="Run COMMAND (e.g. `python script.py args`) so that every diffusers pipeline it "
                                   "calls is accelerated, without changing the script. accel.stats goes to stderr "
                                   "at exit; the script's output and exit status are its own.")
    conf = r.add_mutually_exclusive_group()
    conf.add_argument("--preset", default=None, help="preset name (see `accel models`); default balanced where "
                                                     "defined, else off")
    conf.add_argument("--config", default=None, help="config file (.json, .yaml, .toml)")
    r.add_argument("--no-stats", action="store_true", help="do not print accel.stats at exit")
    r.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    r.set_defaults(func=cmd_run)


def run_env(preset: str | None = None, config: str | None = None, stats: bool = True, base: dict | None = None) -> dict:
    """The environment `accel run` gives the command."""
    env = dict(os.environ if base is None else base)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(SITE_DIR) + (os.pathsep + path if path else "")
    env.pop("ACCEL_PRESET", None)
    env.pop("ACCEL_CONFIG", None)
    if config:
        env["ACCEL_CONFIG"] = str(Path(config).resolve())
    elif preset:
        env["ACCEL_PRESET"] = preset
    env["ACCEL_STATS"] = "1" if stats else "0"
    return env


def cmd_run(args) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("give the command to run after --, e.g. accel run --preset fast -- python script.py")
    if args.preset and args.preset not in available_presets():
        raise UsageError(f"--preset {args.preset!r}: choose one of {', '.join(available_presets())}")
    if args.config:
        if not Path(args.config).is_file():
            raise UsageError(f"--config {args.config!r}: no such file")
        Config.load(args.config)  # a bad file fails here, once, not in every child
    env = run_env(args.preset, args.config, stats=not args.no_stats)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(command[0], command, env)
    except FileNotFoundError:
        raise UsageError(f"{command[0]!r}: command not found") from None
    except PermissionError:
        raise UsageError(f"{command[0]!r}: not executable") from None
    return 127  # not reached
