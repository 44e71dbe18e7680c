"""What `accel generate` and `accel batch` share: a built-in model's call defaults and the sidecar record."""

from __future__ import annotations


def generation_defaults(model: str) -> dict:
    """A tiny model's fast defaults (few steps, small size); real models keep their pipeline's."""
    if model.startswith("tiny-"):
        from ..pipelines import tiny

        d = tiny.example_inputs(model[len("tiny-"):])
        return {k: v for k, v in d.items() if k not in ("prompt", "negative_prompt", "generator", "output_type")}
    if model.startswith("ref-"):
        from ..pipelines import ref

        return ref.call_defaults(model)
    return {}


def versions() -> dict:
    import diffusers
    import torch

    import accel

    return {"accel": accel.__version__, "diffusers": diffusers.__version__, "torch": torch.__version__}


def sidecar(pipe, *, output: str, model: str, family: str, prompt: str, negative_prompt, seed: int, kw: dict,
            preset, config, timings: dict, stats: dict | None = None) -> dict:
    """The JSON written next to every output: what made it (model, prompt, seed, call, config) and how fast.

    ``stats`` defaults to `accel.stats` of the pipeline's last call; a caller that made the output
    some other way (the web app's baseline, run with accel removed) passes its own."""
    import accel

    denoiser = next(iter(pipe.components[n] for n in ("unet", "transformer") if n in pipe.components))
    return {
        "output": output, "model": model, "family": family, "prompt": prompt,
        "negative_prompt": negative_prompt, "seed": seed,
        "call": {k: v for k, v in kw.items() if k not in ("generator", "prompt", "negative_prompt")},
        "preset": preset, "config": config.to_dict(),
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "stats": accel.stats(pipe) if stats is None else stats, "versions": versions(), "device": str(pipe.device),
        "dtype": str(denoiser.dtype),
    }
