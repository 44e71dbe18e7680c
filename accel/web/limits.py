"""What one web request may ask for: size, steps, frames, batch, prompt length, queue length.

The web app serves people who cannot see the machine, so every request is checked against these
limits before it reaches the pipeline; a request over a limit gets an error saying what the page
allows ("steps: 500 is more than this server allows: at most 100 steps"), and the server keeps
serving. The person at the page cannot change the server's flags, so the message does not name
them; the operator loads the limits from a JSON/YAML/TOML file (``--limits``) or sets them per flag
(``--max-steps`` ...).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..config_base import ConfigBase, read_mapping, spec


class LimitError(ValueError):
    """A request asks for more than this server allows; the message says how much it allows."""


@dataclass(frozen=True)
class Limits(ConfigBase):
    """Per-request ceilings of the web app (defaults suit one 24-80 GB GPU)."""

    section = "limits"
    max_width: int = spec(1536, min=8, help="widest image/video in pixels")
    max_height: int = spec(1536, min=8, help="tallest image/video in pixels")
    max_steps: int = spec(100, min=1, help="most denoising steps per request")
    max_frames: int = spec(129, min=1, help="most video frames per request")
    max_batch: int = spec(4, min=1, help="most outputs per request")
    max_prompt_chars: int = spec(2000, min=1, help="longest prompt, and longest negative prompt, in characters")
    max_queue: int = spec(16, min=1, help="requests waiting at most; more are refused until the queue drains")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Limits":
        """A limits file: the fields above at the top level, or under a ``limits`` key."""
        data = read_mapping(path, "limits file")
        if isinstance(data, dict) and isinstance(data.get("limits"), dict):
            data = data["limits"]
        return cls.from_dict(data)

    def check(self, *, width: int | None, height: int | None, steps: int | None, frames: int | None,
              batch: int, prompt: str, negative_prompt: str = "") -> None:
        """Raise `LimitError` for the first value over its limit (None means the model's default)."""
        asked = (("width", width, self.max_width, "pixels"),
                 ("height", height, self.max_height, "pixels"),
                 ("steps", steps, self.max_steps, "steps"),
                 ("frames", frames, self.max_frames, "frames"),
                 ("batch", batch, self.max_batch, "outputs per run"),
                 ("prompt length", len(prompt), self.max_prompt_chars, "characters"),
                 ("negative prompt length", len(negative_prompt), self.max_prompt_chars, "characters"))
        for name, value, limit, unit in asked:
            if value is not None and value > limit:
                raise LimitError(f"{name}: {value} is more than this server allows: at most {limit} {unit}")


# CLI flag -> Limits field, shared by `accel app` and its tests.
FLAGS = {f"--{name.replace('_', '-')}": name for name in (
    "max_width", "max_height", "max_steps", "max_frames", "max_batch", "max_prompt_chars", "max_queue")}
