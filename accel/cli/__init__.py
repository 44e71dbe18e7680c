"""The `accel` command: one module per subcommand, each with its parser (``add_parser``) and handler.

Every user-facing failure (unknown model, bad size, bad config, unwritable path) ends as one
``accel: error: ...`` line and exit status 2; set ``ACCEL_DEBUG=1`` for the traceback. A command
module imports argparse and light library modules at its top; its handler imports the engine it
drives (which loads torch and diffusers) when the command runs, so ``accel --help`` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import app, batch, bench, generate, models, run, tune
from .args import Parser, UsageError

__all__ = ["UsageError", "build_parser", "main"]

# The subcommands, in the order `accel --help` lists them.
COMMANDS = (models, generate, batch, run, app, bench, tune)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="accel", description="Make diffusers pipelines fast without retraining.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("accel: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("ACCEL_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"accel: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
