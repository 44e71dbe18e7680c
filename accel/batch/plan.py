"""A batch's plan: its settings, and one job (output name, seed, preset, request) per prompt-file row.

Reading the plan loads no model, so ``accel batch --dry-run`` answers without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..io.prompts import PromptFileError, Row, stem
from . import manifest as mf


@dataclass
class Settings:
    """A batch's settings: ``values`` by name (`accel.cli.batch.SETTINGS`), read as attributes."""

    values: dict
    sections: dict = field(default_factory=dict)  # config overrides from the file and --set
    parallel: object = None  # accel.ParallelConfig of --parallel / the file's [parallel] table, or None

    def __getattr__(self, name):
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None


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


def dry_run(jobs: list[Job], out: Path, overwrite: bool) -> int:
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
