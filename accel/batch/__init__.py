"""`accel batch PROMPTS --model M --out DIR`: many prompts, resumable, on every GPU, never losing work.

Each row of the prompt file (see `accel.io.prompts`) becomes one output in DIR named
``{index:05d}_{slug}_s{seed}.png`` (or ``.webp``; ``.mp4``/``.gif`` for video models), or
``{id}.<ext>`` for a row with an id, plus a sidecar ``<output>.json``, and one ``ok`` or
``failed`` line in the manifest (see `accel.batch.manifest`). Writes are atomic, so after a kill
DIR holds only whole files, and running the same command again does only what is not verifiably
done. A failing row (a bad value, an exception, NaN output, out of memory) is recorded and the
batch goes on; the exit status is 1 when any row failed, 2 for a bad command or prompt file,
130/143 when interrupted.

Settings come, in increasing priority, from built-in defaults, a config file's ``[batch]`` table,
and the command line. The acceleration config is a preset (``--preset``, a row's ``preset``, or
the file's ``[batch] preset``), then the file's ``cache``/``tokens``/``attention`` sections, then
``--set section.field=value`` on top.

Sharding: rank R of W does the rows with ``index % W == R`` (see `accel.batch.workers`). With
``--parallel cfg=2`` (any `accel.ParallelConfig`, or the config file's ``[parallel]`` table) the
world splits into copies of ``degree`` ranks (the degrees' product) that make each image together
with the parallel strategies on their own process groups; copy C of W/degree does the rows with
``index % (W/degree) == C``, and its first rank alone writes outputs and manifest lines.

The command's parser and its settings are `accel.cli.batch`; the plan (one job per row) is
`accel.batch.plan`, the worker that makes a rank's share `accel.batch.driver`.
"""

from .._lazy import lazy

__getattr__, __dir__ = lazy(__name__, {
    **dict.fromkeys(("Job", "Settings", "dry_run", "plan"), ".plan"),
    **dict.fromkeys(("RowError", "run_worker"), ".driver"),
})

__all__ = ["Job", "RowError", "Settings", "dry_run", "plan", "run_worker"]
