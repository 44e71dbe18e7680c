"""The app's history gallery: one entry per run, read back from the sidecars in the output folder.

Each run's first accelerated output has a sidecar JSON beside it (`accel.io.outputs.sidecar_path`),
and an entry is built from that record alone, so a page opened later (or after a restart) shows the
same history: `load` reads the newest sidecars of ``out_dir``, newest first.
"""

from __future__ import annotations

import json
from pathlib import Path


def entry(record: dict, path: str | Path) -> dict:
    """A history entry: the output's path, a caption (speed-up or seconds, and the seed) and its sidecar."""
    m = record.get("compare")
    if m:
        psnr = "∞" if m.get("psnr") is None else m["psnr"]
        noise = " within noise" if m.get("within_noise") else ""
        caption = f"{m['speedup']}x{noise}, PSNR {psnr}" if m.get("engaged") and m.get("speedup") else "nothing engaged"
    else:
        caption = f"{(record.get('timings') or {}).get('generate_s', 0):.2f}s"
    return {"path": str(path), "caption": f"{caption} · s{record.get('seed')}", "record": record}


def gallery(history: list[dict]) -> list[tuple[str, str]]:
    return [(h["path"], h["caption"]) for h in history]


def load(out_dir: str | Path, size: int) -> list[dict]:
    """Entries for the ``size`` newest runs in ``out_dir``: first accelerated outputs whose file is there."""
    out_dir = Path(out_dir)
    sidecars = sorted((p for p in out_dir.glob("*.json") if not p.name.startswith(".")),
                      key=_mtime, reverse=True)
    entries = []
    for side in sidecars:
        if len(entries) >= size:
            break
        try:
            record = json.loads(side.read_text())
        except (OSError, ValueError):
            continue
        if not _is_run(record):
            continue
        output = out_dir / str(record["output"])
        if output.parent == out_dir and output.is_file():
            entries.append(entry(record, output))
    return entries


def _is_run(record) -> bool:
    """A web run's first accelerated output (not a baseline, not a later item of a batch)."""
    return (isinstance(record, dict) and isinstance(record.get("output"), str) and "mode" in record
            and record.get("side", "accelerated") == "accelerated" and not record.get("batch_index"))


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
