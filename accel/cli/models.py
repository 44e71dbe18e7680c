"""`accel models`: the supported families, the built-in models and the presets."""

from __future__ import annotations

from ..config import available_presets
from ..families import FAMILIES
from ..pipelines.load import DEFAULT_MODEL, DEFAULT_VIDEO_MODEL, builtin_models
from ..presets import PROMISES


def add_parser(sub) -> None:
    m = sub.add_parser("models", help="list supported families and built-in models")
    m.set_defaults(func=cmd_models)


def cmd_models(args) -> int:
    print("Supported families:")
    for f in FAMILIES.values():
        kind = "video" if f.video else "image"
        print(f"  {f.name:<13} {f.label} [{kind}; {', '.join(f.classes)}]")
    print("Built-in models (offline):")
    for name, what in builtin_models().items():
        mark = {DEFAULT_MODEL: "  (default)", DEFAULT_VIDEO_MODEL: "  (default for video)"}.get(name, "")
        print(f"  {name:<19} {what}{mark}")
    print(f"Presets: {', '.join(available_presets())}")
    for name in available_presets():
        print(f"  {name:<9} {PROMISES.get(name, '')}".rstrip())
    print("  Each preset's settings per family: accel.preset(NAME, FAMILY); the rule: docs/presets.md")
    return 0
