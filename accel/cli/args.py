"""What every command's parser shares: the one-line usage error and the argument types."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..io.outputs import check_folder, check_writable
from ..io.prompts import check


class UsageError(Exception):
    """A bad argument value the user can fix; printed as one line."""


def check_output(flag: str, path, *, folder: bool = False) -> Path:
    """Refuse, before any model loads, a path this command will write (a file, or with ``folder`` a folder):
    one line naming the option, the path and what is wrong. A missing folder is created."""
    try:
        (check_folder if folder else check_writable)(Path(path))
    except OSError as e:
        raise UsageError(f"{flag}: {e}") from None
    return Path(path)


def check_approx_dir(sections: dict, flag: str = "approx.dir") -> None:
    """The approximate cache's folder, when the config names one (``sections``: `accel.layering.read_sections`)."""
    folder = (sections.get("approx") or {}).get("dir")
    if folder:
        check_output(flag, folder, folder=True)


def positive_int(text: str) -> int:
    """An argparse type: a whole number above zero."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return v


def row_field(name: str):
    """An argparse type checking a value as a prompt-file row's ``name`` is checked (`accel.io.prompts.check`),
    so a default given on the command line or in a config file meets the same bounds as a row's own value."""

    def typ(text: str):
        try:
            return check(name, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    typ.__name__ = name  # argparse names the type in its messages
    return typ


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, exit status 2, with the usage hint on the same line."""

    def error(self, message):
        self.exit(2, f"accel: error: {message} (see `{self.prog} --help`)\n")

