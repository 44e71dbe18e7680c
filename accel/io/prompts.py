"""Reading a batch's prompt file (.txt, .jsonl, .csv) into validated rows, with every problem's line number.

Formats:

* ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped.
* ``.jsonl``: one JSON object per line with any of `FIELDS` (a bare JSON string is a prompt).
* ``.csv``: a header line naming columns from `FIELDS`, then one row per line; empty cells are unset.

All problems (malformed lines, unknown fields, bad values, duplicate ids or output names) are
collected and raised together as one `PromptFileError`, so a user fixes the file in one pass and
no work starts on a file with mistakes in it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

from .outputs import slug

FIELDS = ("prompt", "negative_prompt", "seed", "height", "width", "frames", "steps", "guidance", "preset", "id")
SUFFIXES = (".txt", ".jsonl", ".csv")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,119}$")
_MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Row:
    """One line of work. ``index`` counts rows from 0 in file order; ``line`` is the 1-based line number."""

    index: int
    line: int
    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    steps: int | None = None
    guidance: float | None = None
    preset: str | None = None
    id: str | None = None

    def fields(self) -> dict:
        """The row's own settings as given in the file (unset ones left out)."""
        return {f: getattr(self, f) for f in FIELDS if getattr(self, f) is not None}


class PromptFileError(ValueError):
    """Problems in a prompt file; ``problems`` is a list of (line, message)."""

    def __init__(self, path, problems: list[tuple[int, str]]):
        self.path = str(path)
        self.problems = sorted(problems)
        n = len(self.problems)
        lines = [f"{self.path}: {n} problem{'s' if n != 1 else ''}; fix {'them' if n != 1 else 'it'} and run again "
                 f"(nothing was generated)"]
        lines += [f"  line {ln}: {msg}" if ln else f"  {msg}" for ln, msg in self.problems]
        super().__init__("\n".join(lines))


def stem(row: Row, seed: int) -> str:
    """The output file name without suffix: the row's id, else ``{index:05d}_{slug}_s{seed}``."""
    return row.id if row.id else f"{row.index:05d}_{slug(row.prompt)}_s{seed}"


def read_rows(path, presets: tuple[str, ...] = ()) -> list[Row]:
    """Parse and validate ``path``; raises `PromptFileError` listing every problem with its line."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise PromptFileError(path, [(0, f"unknown prompt file type {suffix or '(no suffix)'!r}; "
                                         "use .txt (one prompt per line), .jsonl or .csv")])
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise PromptFileError(path, [(0, "no such file")]) from None
    except UnicodeDecodeError as e:
        raise PromptFileError(path, [(0, f"not UTF-8 text ({e.reason} at byte {e.start})")]) from None
    except OSError as e:
        raise PromptFileError(path, [(0, f"cannot read: {e.strerror or e}")]) from None

    problems: list[tuple[int, str]] = []
    raw = {".txt": _txt, ".jsonl": _jsonl, ".csv": _csv}[suffix](text, problems)
    rows = []
    for line, data in raw:
        row = _validate(len(rows), line, data, presets, problems)
        if row is not None:
            rows.append(row)
    _check_unique(rows, problems)
    if not rows and not problems:
        problems.append((0, "no prompts in the file"))
    if problems:
        raise PromptFileError(path, problems)
    return rows


def _txt(text: str, problems) -> list[tuple[int, dict]]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if s and not s.startswith("#"):
            out.append((n, {"prompt": s}))
    return out


def _jsonl(text: str, problems) -> list[tuple[int, dict]]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append((n, f"not valid JSON ({e.msg} at column {e.colno})"))
            continue
        if isinstance(data, str):
            data = {"prompt": data}
        if not isinstance(data, dict):
            problems.append((n, f"expected a JSON object like {{\"prompt\": \"...\"}}, got {type(data).__name__}"))
            continue
        out.append((n, data))
    return out


def _csv(text: str, problems) -> list[tuple[int, dict]]:
    reader = csv.reader(io.StringIO(text))
    header = None
    out = []
    start = 1
    try:
        for cells in reader:
            line, start = start, reader.line_num + 1
            if not any(c.strip() for c in cells):
                continue
            if header is None:
                header = [c.strip() for c in cells]
                unknown = [c for c in header if c not in FIELDS]
                if unknown:
                    problems.append((line, f"unknown column {unknown[0]!r}; columns may be {', '.join(FIELDS)}"))
                    return []
                if "prompt" not in header:
                    problems.append((line, "the header needs a 'prompt' column"))
                    return []
                continue
            if len(cells) != len(header):
                problems.append((line, f"{len(cells)} cells but the header has {len(header)} columns"))
                continue
            out.append((line, {k: v for k, v in zip(header, cells, strict=True) if v.strip() != "" or k == "prompt"}))
    except csv.Error as e:
        problems.append((reader.line_num, f"not valid CSV ({e})"))
    return out


def _validate(index: int, line: int, data: dict, presets, problems) -> Row | None:
    errors = []
    unknown = [k for k in data if k not in FIELDS]
    for k in unknown:
        errors.append(f"unknown field {k!r}; fields are {', '.join(FIELDS)}")
    values = {}
    for f in fields(Row):
        if f.name in ("index", "line") or f.name not in data or data[f.name] is None:
            continue
        try:
            values[f.name] = _CHECKS[f.name](data[f.name], presets)
        except ValueError as e:
            errors.append(f"{f.name}: {e}")
    if "prompt" not in data and not errors:
        errors.append("no 'prompt'")
    for e in errors:
        problems.append((line, e))
    if errors:
        return None
    return Row(index=index, line=line, **values)


def _text(v, presets) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected text, got {v!r}")
    return v


def _prompt(v, presets) -> str:
    v = _text(v, presets).strip()
    if not v:
        raise ValueError("empty; give the text to generate from")
    return v


def _whole(v, lo: int, what: str) -> int:
    if isinstance(v, str):
        try:
            v = int(v.strip())
        except ValueError:
            raise ValueError(f"{v!r} is not a whole number") from None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{v!r} is not a whole number")
    if v < lo or v > _MAX_SEED:
        raise ValueError(f"{v} is out of range; it must be {what}")
    return v


def _number(v, presets) -> float:
    if isinstance(v, str):
        try:
            v = float(v.strip())
        except ValueError:
            raise ValueError(f"{v!r} is not a number") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{v!r} is not a finite number")
    if v < 0:
        raise ValueError(f"{v} is negative; it must be >= 0")
    return float(v)


def _preset(v, presets) -> str:
    v = _text(v, presets).strip()
    if presets and v not in presets:
        raise ValueError(f"{v!r} is not a preset; choose one of {', '.join(presets)}")
    return v


def _id(v, presets) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        v = str(v)
    v = _text(v, presets).strip()
    if not _ID.match(v):
        raise ValueError(f"{v!r} cannot name a file; use letters, digits, '_', '-', '.' (up to 120, "
                         "starting with a letter or digit)")
    return v


_CHECKS = {
    "prompt": _prompt,
    "negative_prompt": _text,
    "seed": lambda v, p: _whole(v, 0, f">= 0 and <= {_MAX_SEED}"),
    "height": lambda v, p: _whole(v, 1, "positive"),
    "width": lambda v, p: _whole(v, 1, "positive"),
    "frames": lambda v, p: _whole(v, 1, "positive"),
    "steps": lambda v, p: _whole(v, 1, "positive"),
    "guidance": _number,
    "preset": _preset,
    "id": _id,
}


def check(name: str, value, presets: tuple[str, ...] = ()):
    """``value`` (text, or a parsed JSON value) for field ``name``, checked and converted as a row's would be;
    a ValueError says what is wrong. Command-line and config-file defaults for rows go through this too."""
    return _CHECKS[name](value, presets)


def _check_unique(rows: list[Row], problems) -> None:
    seen: dict[str, int] = {}
    for r in rows:
        if r.id is None:
            continue
        if r.id in seen:
            problems.append((r.line, f"duplicate id {r.id!r} (first on line {seen[r.id]})"))
        else:
            seen[r.id] = r.line
