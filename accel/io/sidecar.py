"""The sidecar: the JSON written next to every output, recording what made it and how fast."""

from __future__ import annotations

from .. import __version__
from ..api import stats as accel_stats


def versions() -> dict:
    """The versions of accel, diffusers and torch, for a record of what made an output."""
    import diffusers
    import torch

    return {"accel": __version__, "diffusers": diffusers.__version__, "torch": torch.__version__}


def sidecar(pipe, *, output: str, model: str, family: str, prompt: str, negative_prompt, seed: int, kw: dict,
            preset, config, timings: dict, stats: dict | None = None) -> dict:
    """The JSON written next to every output: what made it (model, prompt, seed, call, config) and how fast.

    ``stats`` defaults to `accel.stats` of the pipeline's last call; a caller that made the output
    some other way (the web app's baseline, run with accel removed) passes its own."""
    denoiser = next(iter(pipe.components[n] for n in ("unet", "transformer") if n in pipe.components))
    stats = accel_stats(pipe) if stats is None else stats
    return {
        "output": output, "model": model, "family": family, "prompt": prompt,
        "negative_prompt": negative_prompt, "seed": seed,
        # plain values only: a callback or a tensor in the call would be written as its repr
        "call": {k: v for k, v in kw.items() if k not in ("generator", "prompt", "negative_prompt") and _plain(v)},
        "preset": preset, "config": config.to_dict(),
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "stats": {k: v for k, v in stats.items() if k != "config"},  # the config is recorded once, above
        "versions": versions(), "device": str(pipe.device), "dtype": str(denoiser.dtype),
    }


def _plain(v) -> bool:
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    return v is None or isinstance(v, (str, int, float, bool))
