"""The batch manifest: an append-only JSON-lines log of what was generated, and the resume check.

Every record is one line written with a single ``write`` and ``fsync``ed before the next row
starts, so a kill loses at most the line being written; a torn line (no newline, invalid JSON)
is skipped with a warning when read, and the next append starts on a fresh line.

One process writes ``manifest.jsonl``. In a sharded run each rank appends to its own
``manifest.rank<R>.jsonl`` (no two processes ever write one file, which also holds on network
filesystems where appends from several nodes can interleave); when every rank has finished, rank 0
appends their lines to ``manifest.jsonl`` and deletes them. Readers take the union of
``manifest*.jsonl``, so an interrupted merge loses nothing and a duplicated line changes nothing.

A row counts as done only if a record says ``ok`` for the same output name *and* the same
request (a hash of everything that determines the output), and the file on disk still has the
recorded size and SHA-256, and its sidecar exists. Everything else is generated (again).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

MANIFEST = "manifest.jsonl"


def manifest_name(rank: int, world: int) -> str:
    return MANIFEST if world <= 1 else f"manifest.rank{rank}.jsonl"


def request_key(request: dict) -> str:
    """A stable hash of a row's request (canonical JSON)."""
    text = json.dumps(request, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def file_digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return path.stat().st_size, h.hexdigest()


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds")


def _parse_lines(data: bytes, where: str, warn: bool) -> list[dict]:
    out = []
    lines = data.split(b"\n")
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict):
                raise ValueError
        except ValueError:
            if warn:
                torn = n == len(lines)  # no newline after it: cut short by a kill
                what = "torn last line (ignored)" if torn else "not a record (ignored)"
                print(f"accel: warning: {where} line {n}: {what}", file=sys.stderr)
            continue
        out.append(rec)
    return out


def read_all(folder: Path, warn: bool = True) -> list[dict]:
    """Every record of every manifest file in ``folder``, file by file in name order."""
    out = []
    for path in sorted(Path(folder).glob("manifest*.jsonl")):
        out += _parse_lines(path.read_bytes(), str(path), warn)
    return out


class Done:
    """Answers "is this row done?" from the manifest records and the files on disk."""

    def __init__(self, folder: Path, records: list[dict]):
        self.folder = Path(folder)
        self.by_name: dict[str, list[dict]] = defaultdict(list)
        for r in records:
            if r.get("event") == "row" and isinstance(r.get("name"), str):
                self.by_name[r["name"]].append(r)
        self._digests: dict[str, tuple[int, str] | None] = {}

    def _digest(self, name: str):
        if name not in self._digests:
            p = self.folder / name
            self._digests[name] = file_digest(p) if p.is_file() else None
        return self._digests[name]

    def status(self, name: str, key: str) -> str:
        """``done``; ``todo`` (never tried); ``failed`` (last try failed); ``changed`` (done with other
        settings); ``missing`` (the file or its sidecar is gone or altered since it was recorded)."""
        records = self.by_name.get(name, [])
        if not records:
            return "todo"
        ok = [r for r in records if r.get("status") == "ok" and r.get("request") == key]
        for r in reversed(ok):
            out = r.get("output")
            if not isinstance(out, str) or not (self.folder / (out + ".json")).is_file():
                continue
            if self._digest(out) == (r.get("size"), r.get("sha256")):
                return "done"
        if ok:
            return "missing"
        if any(r.get("status") == "ok" for r in records):
            return "changed"
        return "failed"


class Writer:
    """Appends records to one manifest file, each flushed and fsynced before returning."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "ab")
        # A torn last line from a kill: start ours on a fresh line rather than glued to it.
        if self._f.tell() > 0:
            with open(self.path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    self._f.write(b"\n")

    def write(self, record: dict) -> None:
        line = json.dumps({**record, "time": now()}, default=str).encode() + b"\n"
        self._f.write(line)
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


class Tail:
    """New whole lines of a file that another process appends to (for rank 0's progress bar)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        return _parse_lines(data[:end], str(self.path), warn=False)


def merge_rank_files(folder: Path) -> int:
    """Append every ``manifest.rank*.jsonl`` to ``manifest.jsonl`` (fsynced), then delete them."""
    folder = Path(folder)
    parts = sorted(folder.glob("manifest.rank*.jsonl"))
    if not parts:
        return 0
    w = Writer(folder / MANIFEST)
    n = 0
    try:
        for p in parts:
            data = p.read_bytes()
            end = data.rfind(b"\n") + 1  # a torn last line stays behind, as in the rank file
            if end:
                w._f.write(data[:end])
                n += data[:end].count(b"\n")
        w._f.flush()
        os.fsync(w._f.fileno())
    finally:
        w.close()
    for p in parts:
        p.unlink()
    return n
